"""QueuedStream: the caller's side of a sequence whose token events another thread reads in (a
remote engine's HTTP stream, engine/remote.py and engine/llamacpp.py; a Ray replica's, engine/
ray_serve.py), used as a local scheduler's Handle is (engine/sequence.py)."""

from __future__ import annotations

import queue
import threading

from .requests import EventStream, TokenEvent


class QueuedStream(EventStream):
    """A sequence whose events a reader thread puts in a queue (a remote engine's stream, a Ray
    replica's): the caller's side of chat/backend.py's TokenStream, and the reader's put and fail.
    A subclass sets `backend` (whose scheduler counts cancels), starts its reader, keeps the
    upstream call in `_response` and says in `_close` how that call is ended."""

    def __init__(self):
        self.events: queue.Queue[TokenEvent | BaseException] = queue.Queue()
        self._notify = None
        self._cancelled = threading.Event()
        self._response = None
        self._done = False

    # -- the caller's side (as engine/sequence.py's Handle) -------------------------------------
    def get(self, timeout: float | None = None) -> TokenEvent:
        return self._unwrap(self.events.get(timeout=timeout))

    def get_nowait(self) -> TokenEvent:
        return self._unwrap(self.events.get_nowait())

    def on_event(self, callback) -> None:
        self._notify = callback

    def cancel(self) -> None:
        """End the upstream call: the engine sees its client go and frees the sequence."""
        if self._cancelled.is_set():
            return
        self._cancelled.set()
        if not self._done:
            self.backend.scheduler.stats.cancelled += 1
        response = self._response
        if response is not None:
            try:
                self._close(response)     # unblocks the reader: its next read fails, and is ignored
            except Exception:
                pass

    def _close(self, response) -> None:
        response.close()

    def abort(self, e: BaseException):
        """End the sequence with `e` for its reader, and the upstream call with it."""
        self._fail(e)
        self.cancel()

    @staticmethod
    def _unwrap(ev):
        if isinstance(ev, BaseException):
            raise ev
        return ev

    # -- the reader thread --------------------------------------------------------------------
    def _put(self, ev):
        self.events.put(ev)
        if self._notify is not None:
            self._notify()

    def _fail(self, e: BaseException):
        # after cancel() nobody reads on, and the reader's own failure (a closed socket) is expected
        if not self._done and not self._cancelled.is_set():
            self._done = True
            self._put(e)
