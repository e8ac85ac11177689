"""Each code-interpreter conversation's files and its kernel.

A conversation's workspace is a directory under the data dir; its sandboxed kernel sees it as
/mnt/data.  The browser uploads into it and downloads what the code wrote.  Code in the sandbox
can create, rename and symlink files there at any moment, as the server's own user on the host,
so no path is trusted between a check and its use: uploads go to a fresh temporary file that is
renamed into place (a rename replaces a symlink, it does not follow it), and downloads open each
path component with O_NOFOLLOW and serve the descriptor that was checked."""

from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

from ..errors import GlmkitError

_NAME = re.compile(r"^[^/\\\x00-\x1f]{1,200}$")
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
_OPEN_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK   # NONBLOCK: a FIFO must not hang us


class Workspaces:
    def __init__(self, root: Path, interpreter_factory=None, max_kernels: int = 4, quota_bytes: int | None = None):
        from ..chat.interpreter import Limits
        self.root = Path(root)
        # the same quota the sandbox enforces on code, so an upload cannot fill what code may not
        self.quota_bytes = quota_bytes if quota_bytes is not None else Limits().workspace_mb << 20
        self.factory = interpreter_factory    # workspace path -> chat.interpreter.Interpreter
        self.max_kernels = max_kernels
        self._kernels: OrderedDict[str, object] = OrderedDict()
        self._in_use: dict[str, int] = {}
        self._closing: set[str] = set()
        self._lock = threading.Lock()

    def path(self, cid: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{32}", cid):
            raise GlmkitError("bad conversation id")
        return self.root / cid

    # -- files -----------------------------------------------------------------------------
    def list(self, cid: str, max_depth: int = 16, max_files: int = 1000) -> list[dict]:
        base = self.path(cid)
        if not base.is_dir():
            return []
        out = []
        # fwalk holds each directory open and never follows a symlink, even one swapped in mid-walk
        for dirpath, dirnames, filenames, dfd in os.fwalk(base, follow_symlinks=False):
            rel = Path(dirpath).relative_to(base)
            dirnames[:] = [] if len(rel.parts) >= max_depth else sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                try:
                    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                except OSError:
                    continue
                if name.startswith(".") or not stat.S_ISREG(st.st_mode):
                    continue
                out.append({"name": (rel / name).as_posix(), "size": st.st_size, "modified": st.st_mtime})
                if len(out) >= max_files:
                    return out
        return out

    def save(self, cid: str, name: str, data: bytes) -> dict:
        if not _NAME.match(name) or name.startswith("."):
            raise GlmkitError("a file name must be a plain name, without '/' and not starting with '.'")
        base = self.path(cid)
        base.mkdir(parents=True, exist_ok=True)
        self._check_quota(base, name, len(data))
        fd, tmp = tempfile.mkstemp(dir=base, prefix=".upload-")    # O_EXCL: never an existing path
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, base / name)
        except OSError as e:     # a directory of that name, or the code moved the file meanwhile
            raise GlmkitError(f"could not save {name} in the workspace ({e.strerror})") from None
        finally:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        return {"name": name, "size": len(data)}

    def _check_quota(self, base: Path, name: str, size: int):
        from ..chat.interpreter import WORKSPACE_ENTRIES, workspace_usage
        used, entries = workspace_usage(base)
        try:
            used -= os.stat(base / name, follow_symlinks=False).st_size     # a file being replaced
        except OSError:
            pass
        if used + size > self.quota_bytes or entries >= WORKSPACE_ENTRIES:
            raise GlmkitError(f"the workspace is full: {used + size} bytes would exceed its quota of "
                              f"{self.quota_bytes} bytes ({WORKSPACE_ENTRIES} files); delete files first")

    def open(self, cid: str, name: str) -> tuple[int, int]:
        """(descriptor, size) of a regular file inside the workspace, opened without following
        any symlink on the way; FileNotFoundError otherwise.  The caller closes the descriptor."""
        parts = name.split("/")
        if any(p in ("", ".", "..") or "\0" in p for p in parts):
            raise FileNotFoundError(name)
        fd = os.open(self.path(cid), _OPEN_DIR)
        try:
            for part in parts[:-1]:
                nxt = os.open(part, _OPEN_DIR, dir_fd=fd)
                os.close(fd)
                fd = nxt
            try:
                f = os.open(parts[-1], _OPEN_FILE, dir_fd=fd)
            except OSError:
                raise FileNotFoundError(name) from None
        except OSError:
            raise FileNotFoundError(name) from None
        finally:
            os.close(fd)
        st = os.fstat(f)
        if not stat.S_ISREG(st.st_mode):
            os.close(f)
            raise FileNotFoundError(name)
        os.set_blocking(f, True)
        return f, st.st_size

    def remove(self, cid: str) -> None:
        self.close_kernel(cid)
        shutil.rmtree(self.path(cid), ignore_errors=True)

    # -- kernels ---------------------------------------------------------------------------
    def acquire(self, cid: str):
        """The conversation's kernel (variables persist between its turns), held until release().
        At most `max_kernels` idle kernels stay up; the least recently used idle one is shut
        down first, and a kernel in use is never shut down."""
        if self.factory is None:
            raise GlmkitError("this server does not run code (start it with --code)")
        evicted = []
        with self._lock:
            k = self._kernels.pop(cid, None)
            if k is None:
                self.path(cid).mkdir(parents=True, exist_ok=True)
                k = self.factory(self.path(cid))
            self._kernels[cid] = k
            self._in_use[cid] = self._in_use.get(cid, 0) + 1
            idle = [c for c in self._kernels if not self._in_use.get(c)]
            while len(self._kernels) > self.max_kernels and idle:
                evicted.append(self._kernels.pop(idle.pop(0)))
        for old in evicted:
            old.close(final=True)
        return k

    def release(self, cid: str) -> None:
        k = None
        with self._lock:
            self._in_use[cid] = self._in_use.get(cid, 1) - 1
            if self._in_use[cid] <= 0:
                del self._in_use[cid]
                if cid in self._closing:        # closed while in use: closed now
                    self._closing.discard(cid)
                    k = self._kernels.pop(cid, None)
        if k is not None:
            k.close(final=True)

    def close_kernel(self, cid: str) -> None:
        """Shut the kernel down now, or when its turn releases it."""
        with self._lock:
            if self._in_use.get(cid):
                self._closing.add(cid)
                return
            k = self._kernels.pop(cid, None)
        if k is not None:
            k.close(final=True)

    def close_all(self) -> None:
        with self._lock:
            kernels, self._kernels = list(self._kernels.values()), OrderedDict()
        for k in kernels:
            k.close(final=True)
