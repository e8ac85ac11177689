"""Sandboxed kernels kept by key, from their making to their closing: the one place for their life.

A key is whoever owns a kernel: a console conversation (its variables persist between turns), one
API request, the terminal chat.  `acquire` makes the key's kernel on first use, in the workspace
given or in a temporary directory that is removed with the kernel, and pins it until `release`.
At most `max_kernels` stay up: past that the least recently used idle kernel is closed, never one
in use (a cell may be running in it).  `close` shuts a kernel down now, or as soon as its user
lets go.  A `Lease` is one user's hold, taken at its first cell."""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .interpreter import CellResult, Interpreter


@dataclass
class _Held:
    kernel: Interpreter
    temporary: Path | None        # the workspace the pool made, removed with the kernel
    users: int = 0
    closing: bool = False         # close() came while in use: closed at the last release


class KernelPool:
    def __init__(self, make_kernel: Callable[[Path], Interpreter], max_kernels: int = 4):
        self.make_kernel = make_kernel    # workspace -> a kernel, not started (it starts at its first cell)
        self.max_kernels = max_kernels
        self._held: OrderedDict[str, _Held] = OrderedDict()    # least recently used first
        self._lock = threading.Lock()

    def check(self) -> None:
        """Make and close one kernel now, so that a server that cannot run code (no sandbox, and
        no --unsafe-interpreter) refuses to start instead of failing at its first cell."""
        with tempfile.TemporaryDirectory(prefix="glmkit-probe-") as probe:
            self.make_kernel(Path(probe)).close(final=True)

    def acquire(self, key: str, workspace: str | Path | None = None) -> Interpreter:
        """The key's kernel, pinned until release(key); made now if the key has none, in
        `workspace` (None: a temporary directory, removed with the kernel)."""
        evicted = []
        with self._lock:     # held while a kernel is made, so that one key never gets two
            held = self._held.pop(key, None) or self._make(workspace)
            self._held[key] = held
            held.users += 1
            idle = [k for k, h in self._held.items() if not h.users]
            while len(self._held) > self.max_kernels and idle:
                evicted.append(self._held.pop(idle.pop(0)))
        for old in evicted:
            self._shut(old)
        return held.kernel

    def _make(self, workspace: str | Path | None) -> _Held:
        temporary = None if workspace is not None else Path(tempfile.mkdtemp(prefix="glmkit-workspace-"))
        try:
            return _Held(self.make_kernel(Path(workspace or temporary)), temporary)
        except BaseException:
            if temporary is not None:
                shutil.rmtree(temporary, ignore_errors=True)
            raise

    def release(self, key: str) -> None:
        with self._lock:
            held = self._held.get(key)
            if held is None:              # closed meanwhile by close_all()
                return
            held.users -= 1
            if held.users > 0 or not held.closing:
                return
            del self._held[key]
        self._shut(held)

    def close(self, key: str) -> None:
        """Shut the key's kernel down now, or when its last user releases it."""
        with self._lock:
            held = self._held.get(key)
            if held is None:
                return
            if held.users:
                held.closing = True
                return
            del self._held[key]
        self._shut(held)

    def close_all(self) -> None:
        """Every kernel, in use or not (the server is shutting down, the chat has ended)."""
        with self._lock:
            everything, self._held = list(self._held.values()), OrderedDict()
        for held in everything:
            self._shut(held)

    @staticmethod
    def _shut(held: _Held) -> None:
        held.kernel.close(final=True)
        if held.temporary is not None:
            shutil.rmtree(held.temporary, ignore_errors=True)

    def lease(self, key: str, workspace: str | Path | None = None) -> Lease:
        return Lease(self, key, workspace)


class Lease:
    """One user's hold on the pool's kernel for `key`, to hand to the Agent as its interpreter.
    The kernel is acquired at the first cell, in the thread that runs it: a turn that runs no code
    makes none, and making one never blocks the server's event loop."""

    def __init__(self, pool: KernelPool, key: str, workspace: str | Path | None = None):
        self._pool, self._key, self._workspace = pool, key, workspace
        self._kernel: Interpreter | None = None
        self._stopped = False

    def run(self, code: str) -> CellResult:
        if self._kernel is None and not self._stopped:
            self._kernel = self._pool.acquire(self._key, self._workspace)
        if self._stopped:
            return CellResult("Stopped: the turn was cancelled before this cell ran.", error=True)
        return self._kernel.run(code)

    def interrupt(self) -> bool:
        """Stop the running cell (from another thread), and refuse any later one: the turn is over."""
        self._stopped = True
        kernel = self._kernel
        return kernel is not None and kernel.interrupt()

    def release(self) -> None:
        """Let go: the kernel stays up, variables and all, for the key's next user (until evicted)."""
        if self._kernel is not None:
            self._kernel = None
            self._pool.release(self._key)

    def close(self) -> None:
        """Let go and shut the kernel down, with its workspace if the pool made it."""
        self._pool.close(self._key)       # while still held: the release below shuts it
        self.release()
