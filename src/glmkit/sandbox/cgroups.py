"""The cgroups that bound a sandboxed kernel as a whole: its processes, memory and CPU time."""

from __future__ import annotations

import itertools
import os
import re
import signal
import time
from pathlib import Path

from .limits import MB, Limits

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
