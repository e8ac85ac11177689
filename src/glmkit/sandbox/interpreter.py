"""The code interpreter: model-written Python runs in a sandboxed, stateful kernel.

Isolation is bubblewrap (Debian package `bubblewrap`): new user (nested ones disabled), network,
PID, IPC and UTS namespaces, so no network and no other processes; a read-only file system holding
only system libraries, the Python installation and its packages, plus the conversation's workspace
at /mnt/data (read-write) and size-limited tmpfs at /tmp and /dev/shm; an empty environment, for
bubblewrap itself too (its environment would otherwise be readable in /proc).

`Limits` (limits.py) bound the sandbox as a whole where cgroups can be made (root, cgroups.py):
its memory, tmpfs pages included; its number of processes; the CPU time of all its processes over
the kernel's life.  Per process everywhere: address space, file size, CPU time.  Outside: the
workspace's total size and a wall-clock limit per cell, both watched by the host while the cell
runs (the kernel is killed and restarted).  Every process a cell starts is killed when the cell
ends.  Without bubblewrap the interpreter refuses to start unless the user passes unsafe=True
(--unsafe-interpreter), and then says so loudly.

The kernel is runner.py, sent as `python -c` source: nothing of the project is mounted.  It
answers on a pipe no cell can reach (see that file); the host reads it against the wall deadline
with a size cap, and any reply that is not what the kernel writes restarts the kernel.
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
import os
import re
import select
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import GlmkitError
from .cgroups import Cgroups
from .limits import MB, WORKSPACE_ENTRIES, Limits, workspace_usage

ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
RUNNER = Path(__file__).with_name("runner.py")
MOUNT = "/mnt/data"
REPLY_CAP = 16 * 1024 * 1024      # bytes of one reply (text, and figures up to half of it)


@dataclass
class CellResult:
    text: str
    images: list[bytes] = field(default_factory=list)
    error: bool = False
    timed_out: bool = False
    restarted: bool = False

    def observation(self) -> str:
        """What the model reads back: a ```result fence, images as [Image]."""
        body = self.text.rstrip("\n")
        if self.images:
            body += ("\n" if body else "") + "\n".join("[Image]" for _ in self.images)
        return f"```result\n{body}\n```"


# bwrap options the kernel depends on; the probe uses them too, so an older bwrap is refused up front
_HARDENING = ["--unshare-all", "--unshare-user", "--disable-userns", "--as-pid-1", "--die-with-parent",
              "--new-session"]


def sandbox_available() -> str | None:
    """None if bubblewrap can isolate here, else the reason it cannot."""
    bwrap = shutil.which("bwrap")
    if not bwrap:
        return "bubblewrap is not installed (Debian/Ubuntu: apt-get install bubblewrap)"
    probe = subprocess.run([bwrap, *_HARDENING, "--ro-bind", "/usr", "/usr", "--symlink", "usr/lib", "/lib",
                            "--symlink", "usr/lib64", "/lib64", "--symlink", "usr/bin", "/bin",
                            "--size", "65536", "--tmpfs", "/tmp", "/bin/true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"bubblewrap cannot create the sandbox here: {probe.stderr.strip()[:200]}"
    return None


def _python_roots() -> list[str]:
    """Directories the sandboxed Python needs: its installation and the environment's packages."""
    roots = {sys.base_prefix, sys.prefix, sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"],
             os.path.realpath(sys.executable)}
    roots = sorted({os.path.realpath(r) if not os.path.isfile(r) else os.path.dirname(r) for r in roots})
    # keep the outermost directories only
    out: list[str] = []
    for r in roots:
        if not any(r == o or r.startswith(o + os.sep) for o in out):
            out.append(r)
    return out


_spawner = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="glmkit-kernel-spawner")


class Interpreter:
    def __init__(self, workspace: str | Path, limits: Limits | None = None, unsafe: bool = False):
        self.workspace = Path(workspace).resolve()
        self.workspace.mkdir(parents=True, exist_ok=True)
        self.limits = limits or Limits()
        self.unsafe = unsafe
        self._proc: subprocess.Popen | None = None
        self._running: subprocess.Popen | None = None   # the kernel while a cell runs in it
        self._cell_lock = threading.Lock()
        self._interrupted = False
        self._reply: int | None = None                  # read end of the kernel's reply pipe
        self._seq = 0
        self._cpu_base = 0.0                            # the cgroup's CPU time when this kernel started
        self._cg = None
        reason = sandbox_available()
        self._cg = Cgroups(self.limits)
        if reason is None and os.geteuid() == 0 and "pids" not in self._cg.dirs:
            reason = "running as root without a pids cgroup, so a fork bomb could not be contained"
        if reason and not unsafe:
            self._cg.remove()
            raise GlmkitError(f"the code interpreter needs a sandbox: {reason}. Pass --unsafe-interpreter to run "
                              "model-written code WITHOUT isolation (not recommended)")
        if reason:
            print(f"glmkit: WARNING: running model-written code WITHOUT a sandbox ({reason})", file=sys.stderr)
        self.sandboxed = reason is None

    # -- process ---------------------------------------------------------------------------
    def _command(self, reply_fd: int) -> list[str]:
        lim = self.limits
        # per process, CPU time stops at the budget; where the cgroup counts all processes together,
        # a little later, so that the budget for the whole kernel is what stops it, with its message
        cpu = lim.cpu_seconds + (5 if "cpu" in self._cg.dirs else 0)
        cfg = {"reply_fd": reply_fd, "memory_mb": lim.memory_mb, "max_procs": lim.max_procs,
               "max_file_mb": lim.max_file_mb, "cpu_seconds": cpu, "max_output": lim.max_output,
               "reply_cap": REPLY_CAP - 4096, "workdir": MOUNT if self.sandboxed else str(self.workspace)}
        py = [sys.executable, "-I", "-c", RUNNER.read_text(encoding="utf-8"), json.dumps(cfg)]
        if not self.sandboxed:
            return py
        tmpfs = str(lim.tmpfs_mb * MB)
        cmd = [shutil.which("bwrap"), *_HARDENING, "--uid", "65534", "--gid", "65534",
               "--ro-bind", "/usr", "/usr", "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64",
               "--symlink", "usr/bin", "/bin", "--symlink", "usr/sbin", "/sbin", "--proc", "/proc",
               # bwrap's /dev and / are unsized tmpfs: read-only, with sized tmpfs where writing is needed
               "--dev", "/dev", "--size", tmpfs, "--tmpfs", "/dev/shm", "--remount-ro", "/dev",
               "--size", tmpfs, "--tmpfs", "/tmp", "--dir", "/mnt",
               "--bind", str(self.workspace), MOUNT, "--chdir", MOUNT, "--clearenv",
               "--setenv", "HOME", MOUNT, "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "MPLBACKEND", "Agg",
               "--setenv", "MPLCONFIGDIR", "/tmp", "--setenv", "LANG", "C.UTF-8"]
        for root in _python_roots():
            cmd += ["--ro-bind", root, root]
        return cmd + ["--remount-ro", "/"] + py

    def start(self):
        r, w = os.pipe()
        # bwrap itself gets an empty environment: the sandbox could read its environment in /proc
        env = {} if self.sandboxed else {"PATH": "/usr/bin:/bin", "MPLBACKEND": "Agg", "HOME": str(self.workspace)}
        # bwrap's --die-with-parent is tied to the *thread* that spawned it, so kernels are spawned
        # from one long-lived thread: a kernel started during a server worker's turn must outlive it
        try:
            self._proc = _spawner.submit(subprocess.Popen, self._command(w), stdin=subprocess.PIPE,
                                         stdout=subprocess.DEVNULL, stderr=self._stderr(), pass_fds=(w,), env=env,
                                         preexec_fn=self._cg.enter).result()
        finally:
            os.close(w)
        os.set_blocking(r, False)
        os.set_blocking(self._proc.stdin.fileno(), False)
        self._reply = r
        self._cpu_base = self._cg.cpu_seconds() or 0.0

    @staticmethod
    def _stderr():
        path = os.environ.get("GLMKIT_INTERPRETER_LOG")  # debugging the sandbox itself
        return open(path, "a") if path else subprocess.DEVNULL

    def close(self, final: bool = False):
        if self._proc is not None:
            self._proc.kill()
            if self._cg is not None:
                self._cg.kill_all()      # whatever the sandbox holds dies with it
            self._proc.wait()
            self._proc.stdin.close()
            self._proc = None
        if final and self._cg is not None:
            self._cg.remove()
        if self._reply is not None:
            os.close(self._reply)
            self._reply = None

    def restart(self):
        self.close()
        self.start()

    # -- cells -----------------------------------------------------------------------------
    def interrupt(self) -> bool:
        """Stop the cell that is running (from another thread): that cell's kernel process is
        killed, so run() reports a restarted kernel.  An idle kernel, or one started after that
        cell, is left alone.  True if a cell was stopped."""
        with self._cell_lock:
            proc, self._running = self._running, None
            self._interrupted = proc is not None
        if proc is None:
            return False
        proc.kill()
        return True

    def run(self, code: str) -> CellResult:
        # a kernel that died while idle, or spent its CPU budget (a cell's leftover thread), is replaced
        why = None if self._proc is None else f"used up its CPU time ({self.limits.cpu_seconds} s)" \
            if self._cpu_spent() else "had stopped" if self._proc.poll() is not None else None
        if why:
            self.close()
        result = self._run(code)
        if why and not result.restarted:   # e.g. interrupted while idle: say so, variables are gone
            result.text = f"(The kernel {why} and was restarted; earlier variables are gone.)\n" + result.text
            result.restarted = True
        return result

    def _run(self, code: str) -> CellResult:
        if self._proc is None or self._proc.poll() is not None:
            self.restart()
        self._seq += 1
        with self._cell_lock:
            self._running, self._interrupted = self._proc, False
        try:
            return self._exchange((json.dumps({"seq": self._seq, "code": code}) + "\n").encode())
        finally:
            with self._cell_lock:
                self._running = None

    def _broken(self, text: str, timed_out: bool = False) -> CellResult:
        self.restart()
        return CellResult(text, error=True, timed_out=timed_out, restarted=True)

    def _cpu_spent(self) -> bool:
        used = self._cg.cpu_seconds() if self._cg is not None else None
        return used is not None and used - self._cpu_base > self.limits.cpu_seconds

    def _over_quota(self) -> str | None:
        used, entries = workspace_usage(self.workspace)
        if used > self.limits.workspace_mb * MB or entries > WORKSPACE_ENTRIES:
            return (f"the workspace holds {used / MB:.0f} MB in {entries}{'+' if entries > WORKSPACE_ENTRIES else ''} "
                    f"files, over its quota of {self.limits.workspace_mb} MB and {WORKSPACE_ENTRIES} files")
        return None

    def _exchange(self, request: bytes) -> CellResult:
        """Send the cell and read the one reply line, all before the wall deadline.  Meanwhile the
        CPU budget and the workspace quota are watched: a cell past either is stopped."""
        lim, oom = self.limits, self._cg.oom_kills()
        deadline = time.monotonic() + lim.wall_seconds
        out, buf = memoryview(request), bytearray()
        fd_in, fd = self._proc.stdin.fileno(), self._reply
        next_quota = time.monotonic() + 1.0
        while (end := buf.find(b"\n")) < 0:
            now = time.monotonic()
            if now >= deadline:
                return self._broken(f"Timed out after {lim.wall_seconds:g} s; the kernel was restarted and its "
                                    "variables were lost.", timed_out=True)
            if self._cpu_spent():
                return self._broken(f"The kernel used up its CPU time ({lim.cpu_seconds} s for all its processes "
                                    "together) and was restarted; variables were lost.")
            if now >= next_quota:
                over = self._over_quota()
                if over:
                    return self._broken(f"Stopped: {over}; the kernel was restarted and its variables were lost. "
                                        "Delete files in /mnt/data to make room.")
                next_quota = time.monotonic() + max(1.0, 10 * (time.monotonic() - now))   # a big tree: less often
            readable, writable, _ = select.select([fd], [fd_in] if out else [], [], min(deadline - now, 0.25))
            try:
                if writable:
                    out = out[os.write(fd_in, out):]
                if not readable:
                    continue
                chunk = os.read(fd, 1 << 16)
            except BlockingIOError:
                continue
            except OSError:      # BrokenPipeError: the kernel is gone
                chunk = b""
            if not chunk:
                return self._died()
            buf += chunk
            if len(buf) > REPLY_CAP:
                return self._broken("The kernel sent an oversized reply and was restarted; variables were lost.")
        return self._result(bytes(buf[:end]), oom)

    def _died(self) -> CellResult:
        if self._interrupted:
            return self._broken("Stopped; the kernel was restarted and its variables were lost.")
        try:
            code_ = self._proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            code_ = None
        why = "it ran out of memory or was killed" if code_ is not None and (code_ < 0 or code_ == 137) else \
            f"it exited with status {code_}"
        return self._broken(f"The kernel died ({why}) and was restarted; variables were lost.")

    def _result(self, line: bytes, oom: int) -> CellResult:
        oom_note = (f"; a process of the sandbox ran out of memory (the sandbox may use {self.limits.memory_mb} MB)"
                    if self._cg.oom_kills() > oom else "")
        try:
            msg = json.loads(line)
            if msg["seq"] != self._seq:
                raise ValueError("a reply to another cell")
            if "dead" in msg:
                return self._broken(f"The kernel died ({str(msg['dead'])[:200]}{oom_note}) and was restarted; "
                                    "variables were lost.")
            text, error, images = msg["text"], msg["error"], msg["images"]
            if not (isinstance(text, str) and isinstance(error, bool) and isinstance(images, list)):
                raise ValueError("bad field types")
            images = [base64.b64decode(i, validate=True) for i in images]
        except (ValueError, KeyError, TypeError):    # json and base64 errors are ValueErrors
            return self._broken("The kernel sent a malformed reply and was restarted; variables were lost.")
        result = CellResult(ANSI.sub("", text), images, error)
        if oom_note:
            result.text += f"\n[{oom_note[2:]}]"
        over = self._over_quota()
        if over:
            result.text += f"\n[{over}: delete files in /mnt/data to make room]"
            result.error = True
        return result

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.close(final=True)

    def __del__(self):
        try:
            self.close(final=True)
        except Exception:
            pass
