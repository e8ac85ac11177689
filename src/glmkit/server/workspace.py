"""Each code-interpreter conversation's files, and its kernel from the server's kernel pool.

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
from pathlib import Path

from ..errors import GlmkitError
from ..sandbox.limits import WORKSPACE_ENTRIES, Limits, workspace_usage
from ..sandbox.pool import KernelPool, Lease

_NAME = re.compile(r"^[^/\\\x00-\x1f]{1,200}$")
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
_OPEN_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK   # NONBLOCK: a FIFO must not hang us


class Workspaces:
    def __init__(self, root: Path, kernels: KernelPool | None = None, quota_bytes: int | None = None):
        self.root = Path(root)
        # the same quota the sandbox enforces on code, so an upload cannot fill what code may not
        self.quota_bytes = quota_bytes if quota_bytes is not None else Limits().workspace_mb << 20
        self.kernels = kernels        # None: this server runs no code

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
        self.close_kernel(cid)        # first: its kernel works in the directory
        shutil.rmtree(self.path(cid), ignore_errors=True)

    # -- kernels ---------------------------------------------------------------------------
    def lease(self, cid: str) -> Lease:
        """The conversation's kernel for one turn (variables persist between turns), made at its
        first cell; the caller releases it when the turn ends."""
        if self.kernels is None:
            raise GlmkitError("this server does not run code (start it with --code)")
        return self.kernels.lease(cid, self.path(cid))

    def close_kernel(self, cid: str) -> None:
        """Shut the kernel down (its variables go, its files stay) now, or when its turn ends."""
        if self.kernels is not None:
            self.kernels.close(cid)
