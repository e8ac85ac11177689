"""The code interpreter: model-written Python runs in a sandboxed, stateful kernel.

Isolation is bubblewrap (Debian package `bubblewrap`): new user, network, PID, IPC and UTS
namespaces, so no network and no other processes; a file system holding only read-only system
libraries, the Python installation and its packages, plus the conversation's workspace at
/mnt/data (read-write) and a private /tmp; an empty environment (no API keys); resource limits on
memory, processes, file size and CPU; a wall-clock limit per cell enforced from outside (the kernel
is killed and restarted).  Without bubblewrap the interpreter refuses to start unless the user
passes unsafe=True (--unsafe-interpreter), and then says so loudly.

The kernel is sandbox_runner.py, sent as `python -c` source: nothing of the project is mounted.
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

ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
RUNNER = Path(__file__).with_name("sandbox_runner.py")
MOUNT = "/mnt/data"


@dataclass
class Limits:
    wall_seconds: float = 30.0
    cpu_seconds: int = 600            # for the kernel's lifetime
    memory_mb: int = 2048
    max_procs: int = 32
    max_file_mb: int = 100
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


def sandbox_available() -> str | None:
    """None if bubblewrap can isolate here, else the reason it cannot."""
    bwrap = shutil.which("bwrap")
    if not bwrap:
        return "bubblewrap is not installed (Debian/Ubuntu: apt-get install bubblewrap)"
    probe = subprocess.run([bwrap, "--unshare-all", "--ro-bind", "/usr", "/usr", "--symlink", "usr/lib", "/lib",
                            "--symlink", "usr/lib64", "/lib64", "--symlink", "usr/bin", "/bin", "/bin/true"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        return f"bubblewrap cannot create namespaces here: {probe.stderr.strip()[:200]}"
    return None


def _pids_hierarchy() -> Path | None:
    """Where a pids cgroup can be made: cgroup v2 with the pids controller, or v1's pids tree."""
    v2 = Path("/sys/fs/cgroup")
    controllers = v2 / "cgroup.controllers"
    if controllers.exists() and "pids" in controllers.read_text().split():
        return v2
    v1 = Path("/sys/fs/cgroup/pids")
    if (v1 / "cgroup.procs").exists() and os.access(v1, os.W_OK):
        return v1
    return None


class ProcessCap:
    """A pids cgroup holding the kernel and everything it forks: caps their number (RLIMIT_NPROC
    does not bind root, and the sandbox's processes belong to the caller's real uid) and lets
    close() kill every one of them."""

    def __init__(self, max_procs: int):
        root = _pids_hierarchy()
        self.path = None
        if root is None:
            return
        path = root / f"glmkit-interpreter-{os.getpid()}-{id(self)}"
        try:
            path.mkdir(exist_ok=True)
            (path / "pids.max").write_text(str(max_procs))
        except OSError:
            return
        self.path = path

    def enter(self):  # runs in the child between fork and exec
        if self.path is not None:
            with open(self.path / "cgroup.procs", "w") as f:
                f.write(str(os.getpid()))

    def kill_all(self):
        if self.path is None:
            return
        import signal
        for _ in range(100):
            try:
                pids = [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
            except OSError:
                return
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
        if self.path is not None:
            try:
                self.path.rmdir()
            except OSError:
                pass


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
        self._reply = None
        self._cap = None
        reason = sandbox_available()
        if reason is None and os.geteuid() == 0 and _pids_hierarchy() is None:
            reason = "running as root without a pids cgroup, so a fork bomb could not be contained"
        if reason and not unsafe:
            raise GlmkitError(f"the code interpreter needs a sandbox: {reason}. Pass --unsafe-interpreter to run "
                              "model-written code WITHOUT isolation (not recommended)")
        if reason:
            print(f"glmkit: WARNING: running model-written code WITHOUT a sandbox ({reason})", file=sys.stderr)
        self.sandboxed = reason is None
        self._cap = ProcessCap(self.limits.max_procs)

    # -- process ---------------------------------------------------------------------------
    def _command(self, reply_fd: int) -> list[str]:
        cfg = {"reply_fd": reply_fd, "memory_mb": self.limits.memory_mb, "max_procs": self.limits.max_procs,
               "max_file_mb": self.limits.max_file_mb, "cpu_seconds": self.limits.cpu_seconds,
               "max_output": self.limits.max_output, "workdir": MOUNT if self.sandboxed else str(self.workspace)}
        py = [sys.executable, "-I", "-c", RUNNER.read_text(encoding="utf-8"), json.dumps(cfg)]
        if not self.sandboxed:
            return py
        cmd = ["bwrap", "--unshare-all", "--die-with-parent", "--new-session", "--uid", "65534", "--gid", "65534",
               "--ro-bind", "/usr", "/usr", "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64",
               "--symlink", "usr/bin", "/bin", "--symlink", "usr/sbin", "/sbin",
               "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--dir", "/mnt",
               "--bind", str(self.workspace), MOUNT, "--chdir", MOUNT, "--clearenv",
               "--setenv", "HOME", MOUNT, "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "MPLBACKEND", "Agg",
               "--setenv", "MPLCONFIGDIR", "/tmp", "--setenv", "LANG", "C.UTF-8"]
        for root in _python_roots():
            cmd += ["--ro-bind", root, root]
        return cmd + py

    def start(self):
        r, w = os.pipe()
        env = None if self.sandboxed else {"PATH": "/usr/bin:/bin", "MPLBACKEND": "Agg", "HOME": str(self.workspace)}
        # bwrap's --die-with-parent is tied to the *thread* that spawned it, so kernels are spawned
        # from one long-lived thread: a kernel started during a server worker's turn must outlive it
        self._proc = _spawner.submit(subprocess.Popen, self._command(w), stdin=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, stderr=self._stderr(), pass_fds=(w,), env=env,
                                     text=True, preexec_fn=self._cap.enter).result()
        os.close(w)
        self._reply = os.fdopen(r, "r")

    @staticmethod
    def _stderr():
        path = os.environ.get("GLMKIT_INTERPRETER_LOG")  # debugging the sandbox itself
        return open(path, "a") if path else subprocess.DEVNULL

    def close(self, final: bool = False):
        if self._proc is not None:
            self._proc.kill()
            if self._cap is not None:
                self._cap.kill_all()      # whatever the cell forked dies with it
            self._proc.wait()
            self._proc = None
        if final and self._cap is not None:
            self._cap.remove()
        if self._reply is not None:
            self._reply.close()
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
        died = self._proc is not None and self._proc.poll() is not None
        result = self._run(code)
        if died and not result.restarted:   # e.g. interrupted while idle: say so, variables are gone
            result.text = "(The kernel had stopped and was restarted; earlier variables are gone.)\n" + result.text
            result.restarted = True
        return result

    def _run(self, code: str) -> CellResult:
        if self._proc is None or self._proc.poll() is not None:
            self.restart()
        try:
            self._proc.stdin.write(json.dumps({"code": code}) + "\n")
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError):
            self.restart()
            return CellResult("The kernel had stopped and was restarted; variables were lost. Run the cell again.",
                              error=True, restarted=True)
        with self._cell_lock:
            self._running, self._interrupted = self._proc, False
        try:
            return self._wait()
        finally:
            with self._cell_lock:
                self._running = None

    def _wait(self) -> CellResult:
        deadline = time.monotonic() + self.limits.wall_seconds
        fd = self._reply.fileno()
        line = ""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.restart()
                return CellResult(f"Timed out after {self.limits.wall_seconds:g} s; the kernel was restarted and "
                                  "its variables were lost.", error=True, timed_out=True, restarted=True)
            ready, _, _ = select.select([fd], [], [], min(left, 0.5))
            if ready:
                line = self._reply.readline()
                break
            if self._proc.poll() is not None:
                break
        if not line and self._interrupted:
            self.restart()
            return CellResult("Stopped; the kernel was restarted and its variables were lost.", error=True,
                              restarted=True)
        if not line:
            code_ = self._proc.poll()
            self.restart()
            why = "it ran out of memory or was killed" if code_ is not None and code_ < 0 or code_ == 137 else \
                f"it exited with status {code_}"
            return CellResult(f"The kernel died ({why}) and was restarted; variables were lost.", error=True,
                              restarted=True)
        data = json.loads(line)
        return CellResult(ANSI.sub("", data["text"]), [base64.b64decode(i) for i in data["images"]], data["error"])

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

