"""The code interpreter: model-written Python runs in a sandboxed, stateful kernel.

Isolation is bubblewrap (Debian package `bubblewrap`): new user (nested ones disabled), network,
PID, IPC and UTS namespaces, so no network and no other processes; a read-only file system holding
only system libraries, the Python installation and its packages, plus the conversation's workspace
at /mnt/data (read-write) and size-limited tmpfs at /tmp and /dev/shm; an empty environment, for
bubblewrap itself too (its environment would otherwise be readable in /proc).

`Limits` bound the sandbox as a whole where cgroups can be made (root): its memory, tmpfs pages
included; its number of processes; the CPU time of all its processes over the kernel's life.  Per
process everywhere: address space, file size, CPU time.  Outside: the workspace's total size and a
wall-clock limit per cell, both watched by the host while the cell runs (the kernel is killed and
restarted).  Every process a cell starts is killed when the cell ends.  Without bubblewrap the
interpreter refuses to start unless the user passes unsafe=True (--unsafe-interpreter), and then
says so loudly.

The kernel is sandbox_runner.py, sent as `python -c` source: nothing of the project is mounted.  It
answers on a pipe no cell can reach (see that file); the host reads it against the wall deadline
with a size cap, and any reply that is not what the kernel writes restarts the kernel.
"""

from __future__ import annotations

import base64
import concurrent.futures
import itertools
import json
import os
import re
import select
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import GlmkitError

ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
RUNNER = Path(__file__).with_name("sandbox_runner.py")
MOUNT = "/mnt/data"
REPLY_CAP = 16 * 1024 * 1024      # bytes of one reply (text, and figures up to half of it)
WORKSPACE_ENTRIES = 100_000       # files and directories a workspace may hold
MB = 1024 * 1024


@dataclass
class Limits:
    wall_seconds: float = 30.0        # per cell
    cpu_seconds: int = 600            # CPU time of all the kernel's processes together, over its life
    memory_mb: int = 2048             # the whole sandbox, tmpfs included (and each process's address space)
    max_procs: int = 32               # processes in the sandbox
    max_file_mb: int = 100            # one file
    tmpfs_mb: int = 256               # each of /tmp and /dev/shm
    workspace_mb: int = 1024          # everything in /mnt/data
    max_output: int = 20_000          # characters of output kept per cell


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


# -- cgroups --------------------------------------------------------------------------------
_CG_NAME = re.compile(r"glmkit-interpreter-(\d+)-\d+")   # the creating server's pid: see _remove_stale
_cg_serial = itertools.count()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _write(path: Path, value) -> bool:
    try:
        path.write_text(str(value))
        return True
    except OSError:
        return False


class Cgroups:
    """The kernel's cgroups, holding bwrap and everything started inside it: pids (RLIMIT_NPROC does
    not bind root, whose uid the sandbox's processes keep on the host), memory (the sandbox as a
    whole: its processes and its tmpfs and shared-memory pages) and CPU accounting (the lifetime
    budget).  cgroup v2 where its pids and memory controllers are available, else the v1
    hierarchies.  Each is made inside this process's own cgroup (limits set above it, e.g. by a
    container, keep applying), else at the hierarchy's root; what cannot be made (not root) is
    absent, and its limit falls back to the per-process rlimits."""

    def __init__(self, limits: Limits):
        self.dirs: dict[str, Path] = {}      # "pids", "memory", "cpu" -> cgroup directory
        self.v2 = False
        self._made: list[Path] = []
        try:
            mounts = [line.split() for line in Path("/proc/self/mounts").read_text().splitlines()]
            own = {}                          # controller ("" for v2) -> this process's cgroup path
            for line in Path("/proc/self/cgroup").read_text().splitlines():
                _, ctrls, path = line.split(":", 2)
                own.update({c: path for c in ctrls.split(",")})
        except (OSError, ValueError):
            return
        mounts = [(Path(m[1]), m[2], m[3].split(",")) for m in mounts if len(m) > 3 and m[2] in ("cgroup", "cgroup2")]
        for mount, _, _ in (m for m in mounts if m[1] == "cgroup2"):
            if {"pids", "memory"} <= set(self._read(mount / "cgroup.controllers")):
                d = self._make(mount, own.get("", "/"), enable=("pids", "memory", "cpu"))
                if d is not None:
                    self.v2, self.dirs = True, {"pids": d, "memory": d, "cpu": d}
                break
        if not self.v2:
            for ctrl, key in (("pids", "pids"), ("memory", "memory"), ("cpuacct", "cpu")):
                mount = next((m for m, kind, opts in mounts if kind == "cgroup" and ctrl in opts), None)
                if mount is None:
                    continue
                same = next((d for d in self.dirs.values() if mount in d.parents), None)   # e.g. cpu,cpuacct
                d = same or self._make(mount, own.get(ctrl, "/"))
                if d is not None:
                    self.dirs[key] = d
        if "pids" in self.dirs and not _write(self.dirs["pids"] / "pids.max", limits.max_procs):
            del self.dirs["pids"]
        if "memory" in self.dirs:
            d, limit = self.dirs["memory"], limits.memory_mb * MB
            if self.v2:
                ok = _write(d / "memory.max", limit)
                _write(d / "memory.swap.max", 0)
            else:
                ok = _write(d / "memory.limit_in_bytes", limit)
                if (d / "memory.memsw.limit_in_bytes").exists():
                    _write(d / "memory.memsw.limit_in_bytes", limit)   # no swapping past the limit
            if not ok:
                del self.dirs["memory"]
        for d in self._made:                  # made, but its limit could not be set
            if d not in self.dirs.values():
                self._rmdir(d)
        self._made = list(dict.fromkeys(self.dirs.values()))

    @staticmethod
    def _read(path: Path) -> list[str]:
        try:
            return path.read_text().split()
        except OSError:
            return []

    @staticmethod
    def _rmdir(d: Path):
        try:
            d.rmdir()
        except OSError:
            pass

    def _make(self, mount: Path, own: str, enable: tuple = ()) -> Path | None:
        for base in dict.fromkeys((mount / own.lstrip("/"), mount)):
            self._remove_stale(base)
            for ctrl in set(enable or ()) - set(self._read(base / "cgroup.subtree_control")):
                _write(base / "cgroup.subtree_control", f"+{ctrl}")   # refused in a v2 cgroup holding processes
            d = base / f"glmkit-interpreter-{os.getpid()}-{next(_cg_serial)}"
            try:
                d.mkdir()
            except OSError:
                continue
            if enable and not (d / "memory.max").exists():    # v2 without the controllers here
                self._rmdir(d)
                continue
            self._made.append(d)
            return d
        return None

    @staticmethod
    def _remove_stale(base: Path):
        """A server killed with -9 leaves its kernels' (empty) cgroups behind: those whose server's
        pid is gone are removed (rmdir refuses a cgroup that still holds a process)."""
        try:
            names = os.listdir(base)
        except OSError:
            return
        for name in names:
            m = _CG_NAME.fullmatch(name)
            if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
                Cgroups._rmdir(base / name)

    def enter(self):  # runs in the child between fork and exec
        for d in set(self.dirs.values()):
            with open(d / "cgroup.procs", "w") as f:
                f.write(str(os.getpid()))

    def cpu_seconds(self) -> float | None:
        """CPU time used by everything ever in the cgroup."""
        d = self.dirs.get("cpu")
        try:
            if d is None:
                return None
            if self.v2:
                return next(int(v) for k, v in (ln.split() for ln in (d / "cpu.stat").read_text().splitlines())
                            if k == "usage_usec") / 1e6
            return int((d / "cpuacct.usage").read_text()) / 1e9
        except (OSError, ValueError, StopIteration):
            return None

    def oom_kills(self) -> int:
        d = self.dirs.get("memory")
        if d is None:
            return 0
        for k, v in zip(*[iter(self._read(d / ("memory.events" if self.v2 else "memory.oom_control")))] * 2):
            if k == "oom_kill":
                return int(v)
        return 0

    def procs(self) -> list[int]:
        d = self.dirs.get("pids") or next(iter(self.dirs.values()), None)
        return [int(p) for p in self._read(d / "cgroup.procs")] if d is not None else []

    def kill_all(self):
        for _ in range(100):
            pids = self.procs()
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.02)

    def remove(self):
        self.kill_all()
        for d in self._made:
            self._rmdir(d)
        self.dirs, self._made = {}, []


# -- the workspace --------------------------------------------------------------------------
def workspace_usage(path: Path, max_entries: int = WORKSPACE_ENTRIES) -> tuple[int, int]:
    """(bytes, entries) of a workspace, counting what it takes on disk or its size if larger (a
    sparse file), a hard-linked file once; stops counting after max_entries + 1 entries.  fwalk
    holds each directory open and follows no symlink, even one the sandbox swaps in mid-walk."""
    total, entries, seen = 0, 0, set()
    for _, dirnames, filenames, dfd in os.fwalk(path, follow_symlinks=False):
        for name in dirnames + filenames:
            entries += 1
            if entries > max_entries:
                return total, entries
            try:
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            except OSError:
                continue
            if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
            total += max(st.st_size if stat.S_ISREG(st.st_mode) else 0, st.st_blocks * 512)
    return total, entries


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
