"""Each code-interpreter conversation's files and its kernel.

A conversation's workspace is a directory under the data dir; its sandboxed kernel sees it as
/mnt/data.  The browser uploads into it and downloads what the code wrote.  The code runs as
another user inside the sandbox and may leave symlinks there, so every path from a request is
resolved and must stay inside the workspace, and only regular files are served."""

from __future__ import annotations

import os
import re
import shutil
import threading
from collections import OrderedDict
from pathlib import Path

from ..errors import GlmkitError

_NAME = re.compile(r"^[^/\\\x00-\x1f]{1,200}$")


class Workspaces:
    def __init__(self, root: Path, interpreter_factory=None, max_kernels: int = 4):
        self.root = Path(root)
        self.factory = interpreter_factory    # workspace path -> chat.interpreter.Interpreter
        self.max_kernels = max_kernels
        self._kernels: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()

    def path(self, cid: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{32}", cid):
            raise GlmkitError("bad conversation id")
        return self.root / cid

    # -- files -----------------------------------------------------------------------------
    def list(self, cid: str) -> list[dict]:
        base = self.path(cid)
        if not base.is_dir():
            return []
        out = []
        for dirpath, dirnames, filenames in os.walk(base):          # os.walk does not follow symlinks
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                p = Path(dirpath) / name
                if name.startswith(".") or p.is_symlink() or not p.is_file():
                    continue
                st = p.stat()
                out.append({"name": p.relative_to(base).as_posix(), "size": st.st_size, "modified": st.st_mtime})
        return out

    def save(self, cid: str, name: str, data: bytes) -> dict:
        if not _NAME.match(name) or name in (".", "..") or name.startswith("."):
            raise GlmkitError("a file name must be a plain name, without '/' and not starting with '.'")
        base = self.path(cid)
        base.mkdir(parents=True, exist_ok=True)
        target = base / name
        if target.is_symlink() or target.exists() and not target.is_file():
            raise GlmkitError(f"{name} exists in the workspace and is not a regular file")
        tmp = base / f".upload-{threading.get_ident()}"
        tmp.write_bytes(data)
        os.replace(tmp, target)
        return {"name": name, "size": len(data)}

    def resolve(self, cid: str, name: str) -> Path:
        """A regular file inside the workspace, or GlmkitError (no symlinks, no '..' escapes)."""
        base = self.path(cid).resolve()
        target = (base / name)
        real = Path(os.path.realpath(target))
        if real != target.absolute() or base not in real.parents or not real.is_file():
            raise FileNotFoundError(name)
        return real

    def remove(self, cid: str) -> None:
        self.close_kernel(cid)
        shutil.rmtree(self.path(cid), ignore_errors=True)

    # -- kernels ---------------------------------------------------------------------------
    def kernel(self, cid: str):
        """The conversation's running kernel (variables persist between its turns); the least
        recently used one is shut down when more than `max_kernels` are open."""
        if self.factory is None:
            raise GlmkitError("this server does not run code (start it with --code)")
        with self._lock:
            k = self._kernels.pop(cid, None)
            if k is None:
                self.path(cid).mkdir(parents=True, exist_ok=True)
                k = self.factory(self.path(cid))
            self._kernels[cid] = k
            while len(self._kernels) > self.max_kernels:
                _, old = self._kernels.popitem(last=False)
                old.close(final=True)
            return k

    def close_kernel(self, cid: str) -> None:
        with self._lock:
            k = self._kernels.pop(cid, None)
        if k is not None:
            k.close(final=True)

    def close_all(self) -> None:
        with self._lock:
            kernels, self._kernels = list(self._kernels.values()), OrderedDict()
        for k in kernels:
            k.close(final=True)
