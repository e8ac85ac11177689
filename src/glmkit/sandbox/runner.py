"""The code interpreter's kernel.  THIS FILE RUNS ONLY INSIDE THE SANDBOX (sandbox/interpreter.py
starts it under bubblewrap with `python -c <this source>`); glmkit never imports it.

Two processes, so that no cell can reach the host's pipes (a descriptor of the process running the
cell can always be found, e.g. in /proc/self/fd, so it must be in another process):

- the supervisor is the sandbox's PID 1 (bwrap --as-pid-1).  It alone holds the host's pipes:
  cells arrive on stdin, and it answers once per cell, with the cell's number, on reply_fd.  It
  makes itself non-dumpable, so no other process here may open its /proc/1/fd/*, read its memory
  or ptrace it, and as init of the PID namespace it ignores every signal sent from inside.  After
  each cell, and every half second while idle, it kills every other process of the sandbox but
  the worker: nothing a cell starts outlives the cell.
- the worker, its child, closes every inherited descriptor before any cell runs, keeps one
  namespace across cells (InteractiveInterpreter: the last expression is shown like Jupyter's
  Out), captures stdout/stderr up to a limit, collects matplotlib figures as PNG and answers on a
  private pipe.  A cell can write to that pipe too, so the supervisor reads at most reply_cap
  bytes of it, checks each answer's shape and the random nonce it gave that cell (a cell cannot
  know the next cell's), and passes on only the answer's fields: a cell can shape its own result
  (as printing does), not a later one's, and a malformed or oversized answer means a broken kernel,
  which the host restarts.
"""

import base64
import code
import ctypes
import io
import json
import os
import resource
import select
import signal
import sys
import time
import traceback


class CappedText(io.TextIOBase):
    def __init__(self, limit):
        self.limit, self.parts, self.size, self.dropped = limit, [], 0, 0

    def write(self, s):
        room = self.limit - self.size
        if room > 0:
            self.parts.append(s[:room])
            self.size += min(len(s), room)
        self.dropped += max(0, len(s) - max(room, 0))
        return len(s)

    def text(self):
        out = "".join(self.parts)
        return out + (f"\n... [output truncated: {self.dropped} more characters]" if self.dropped else "")


def limits(cfg):
    """Per-process limits; the sandbox as a whole is bounded by the host's cgroups."""
    mb = 1024 * 1024
    for what, value in ((resource.RLIMIT_AS, cfg["memory_mb"] * mb), (resource.RLIMIT_NPROC, cfg["max_procs"]),
                        (resource.RLIMIT_FSIZE, cfg["max_file_mb"] * mb), (resource.RLIMIT_CPU, cfg["cpu_seconds"]),
                        (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(what, (value, value))


# -- the worker -----------------------------------------------------------------------------
def figures(budget):
    """The open figures as base64 PNG, as many as fit in `budget` bytes, and how many did not."""
    if "matplotlib.pyplot" not in sys.modules:
        return [], 0
    plt = sys.modules["matplotlib.pyplot"]
    out, dropped = [], 0
    for num in plt.get_fignums():
        buf = io.BytesIO()
        plt.figure(num).savefig(buf, format="png", dpi=80)
        png = base64.b64encode(buf.getvalue()).decode()
        if len(png) <= budget:
            out.append(png)
            budget -= len(png)
        else:
            dropped += 1
    plt.close("all")
    return out, dropped


class Interp(code.InteractiveInterpreter):
    failed = False

    def showtraceback(self):
        self.failed = True
        super().showtraceback()

    def showsyntaxerror(self, filename=None, **kwargs):
        self.failed = True
        super().showsyntaxerror(filename)


def run_cell(interp, cell):
    import ast
    try:
        tree = ast.parse(cell)
    except SyntaxError:
        interp.failed = True
        traceback.print_exc(limit=0)
        return
    last = tree.body[-1] if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    head = tree.body[:-1] if last is not None else tree.body
    if head:
        interp.runsource(ast.unparse(ast.Module(head, [])), "<cell>", "exec")
    if last is not None and not interp.failed:
        interp.runsource(ast.unparse(last), "<cell>", "single")   # shows the value, like Out[n]


def worker(cfg, cells_fd, answers_fd):
    # Before any cell: keep only the private pipes and stdout/stderr (the host's /dev/null or log);
    # stdin becomes /dev/null, so the host's pipes are not open in this process or its children.
    for fd in map(int, os.listdir("/proc/self/fd")):
        if fd not in (1, 2, cells_fd, answers_fd):
            try:
                os.close(fd)
            except OSError:
                pass
    null = os.open(os.devnull, os.O_RDONLY)
    if null != 0:
        os.dup2(null, 0)
        os.close(null)
    try:  # under memory pressure the kernel's OOM killer takes the cell's processes, not the supervisor
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass
    interp = Interp({"__name__": "__main__"})
    real_out, real_err = sys.stdout, sys.stderr
    answers = os.fdopen(answers_fd, "w")
    for line in os.fdopen(cells_fd, "rb"):
        while True:   # reap what the supervisor killed after the last cell
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break
        msg = json.loads(line)
        out = CappedText(cfg["max_output"])
        sys.stdout = sys.stderr = out
        interp.failed = False
        try:
            run_cell(interp, msg["code"])
        except SystemExit as e:          # exit() in a cell ends the cell, not the kernel
            interp.failed = True
            print(f"SystemExit: {e}")
        except BaseException:            # e.g. MemoryError while formatting
            interp.failed = True
            traceback.print_exc()
        finally:
            sys.stdout, sys.stderr = real_out, real_err
        try:
            images, dropped = figures(cfg["reply_cap"] // 2)
            if dropped:
                out.write(f"\n[{dropped} figure(s) not shown: too large]")
        except Exception as e:
            images, interp.failed = [], True
            out.write(f"\n[figure could not be saved: {e}]")
        answers.write(json.dumps({"nonce": msg["nonce"], "text": out.text(), "images": images,
                                  "error": interp.failed}) + "\n")
        answers.flush()
    os._exit(0)


# -- the supervisor -------------------------------------------------------------------------
class Supervisor:
    def __init__(self, cfg, worker_pid, cells_w, answers_r):
        self.cfg, self.worker, self.cells, self.answers = cfg, worker_pid, cells_w, answers_r
        self.status = None                  # the worker's wait status, once it has ended
        self.sweeping = os.getpid() == 1    # only in our own PID namespace (never --unsafe-interpreter)

    def reap(self):
        """Reap every ended child (as init we inherit the orphans); True once the worker has ended."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid == self.worker:
                self.status = status
        return self.status is not None

    def sweep(self):
        """Kill every process of the sandbox but the worker and ourselves, again until none is left
        (one may fork while we list).  Zombies are skipped: their parent (or we) reaps them."""
        if not self.sweeping:
            return
        for _ in range(400):
            live = []
            for name in os.listdir("/proc"):
                if name.isdigit() and int(name) not in (1, self.worker):
                    try:
                        with open(f"/proc/{name}/stat", "rb") as f:
                            if f.read().rsplit(b")", 1)[1].split()[0] != b"Z":
                                live.append(int(name))
                    except (OSError, IndexError):
                        pass
            if not live:
                return
            for pid in live:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            time.sleep(0.005)
            self.reap()

    def why(self):
        if self.status is None:
            return "it closed its answer pipe"
        code_ = os.waitstatus_to_exitcode(self.status)
        if code_ == -signal.SIGKILL:
            return "it was killed, most likely for running out of memory"
        if code_ == -signal.SIGXCPU:
            return "it used up its CPU time"
        return f"it was killed by signal {-code_}" if code_ < 0 else f"it exited with status {code_}"

    @staticmethod
    def valid(line):
        """The answer's fields, or None when it is not what the worker writes."""
        try:
            a = json.loads(line)
            if (isinstance(a, dict) and isinstance(a.get("nonce"), str) and isinstance(a.get("text"), str)
                    and isinstance(a.get("error"), bool) and isinstance(a.get("images"), list)):
                for png in a["images"]:
                    base64.b64decode(png, validate=True)
                return {k: a[k] for k in ("nonce", "text", "images", "error")}
        except (ValueError, TypeError):   # binascii.Error is a ValueError
            pass
        return None

    def answer(self, seq, nonce):
        """The worker's answer to the host's cell `seq`, sent to it with `nonce`, or why there is none."""
        buf = bytearray()
        while True:
            if not select.select([self.answers], [], [], 0.5)[0]:
                if self.reap():
                    return {"seq": seq, "dead": self.why()}
                continue
            chunk = os.read(self.answers, 1 << 16)
            if not chunk:                    # the worker has ended, or closed the pipe
                for _ in range(100):
                    if self.reap():
                        break
                    time.sleep(0.01)
                return {"seq": seq, "dead": self.why()}
            buf += chunk
            while (end := buf.find(b"\n")) >= 0:
                line, buf = bytes(buf[:end]), buf[end + 1:]
                a = self.valid(line)
                if a is None:
                    return {"seq": seq, "dead": "it sent a malformed answer"}
                if a.pop("nonce") == nonce:
                    return {"seq": seq, **a}
                # an answer to an earlier cell (one a cell wrote ahead of the worker's): dropped
            if len(buf) > self.cfg["reply_cap"]:
                return {"seq": seq, "dead": f"it sent an answer over {self.cfg['reply_cap']} bytes"}

    def drain(self):
        """Drop what the worker's pipe holds between cells (written by a cell's leftover thread)."""
        while select.select([self.answers], [], [], 0)[0] and os.read(self.answers, 1 << 16):
            pass

    def serve(self, reply_fd):
        inbox = bytearray()
        while True:
            while (end := inbox.find(b"\n")) < 0:   # idle: wait for the host's next cell
                if select.select([0], [], [], 0.5)[0]:
                    chunk = os.read(0, 1 << 16)
                    if not chunk:
                        return                 # the host closed the kernel
                    inbox += chunk
                if self.reap():
                    return                     # the worker ended between cells: the host restarts us
                self.sweep()                   # whatever a cell's leftover thread started
            msg, inbox = json.loads(inbox[:end]), inbox[end + 1:]
            nonce = os.urandom(16).hex()
            self.drain()
            write_all(self.cells, (json.dumps({"nonce": nonce, "code": msg["code"]}) + "\n").encode())
            reply = self.answer(msg["seq"], nonce)
            self.sweep()
            write_all(reply_fd, (json.dumps(reply) + "\n").encode())
            if "dead" in reply:
                return


def write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def main():
    cfg = json.loads(sys.argv[1])
    limits(cfg)
    os.chdir(cfg["workdir"])
    cells_r, cells_w = os.pipe()
    answers_r, answers_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            worker(cfg, cells_r, answers_w)
        finally:
            os._exit(1)
    os.close(cells_r)
    os.close(answers_w)
    # PR_SET_DUMPABLE 0: no other process of the sandbox may open our /proc/1/fd/* (the host's
    # pipes), /proc/1/mem or ptrace us.  Without it the host's pipes would be reachable: stop.
    if ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0) != 0:
        os.kill(pid, signal.SIGKILL)
        sys.exit("glmkit kernel: prctl(PR_SET_DUMPABLE) failed")
    Supervisor(cfg, pid, cells_w, answers_r).serve(cfg["reply_fd"])
    os.kill(pid, signal.SIGKILL)


main()
