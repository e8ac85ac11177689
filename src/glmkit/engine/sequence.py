"""One sequence in the scheduler (_Seq: its request, cache row, progress and event queue) and the
caller's side of it (Handle).  A Handle with no engine thread behind it runs the scheduler's steps
itself while it waits (engine/scheduler.py)."""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass, field
from typing import Protocol

import torch

from .requests import EventStream, GenerationRequest, TokenEvent


@dataclass
class _Seq:
    id: int
    req: GenerationRequest             # max_new_tokens already within budget
    events: "queue.Queue[TokenEvent | BaseException]"
    slot: int = -1
    prefilled: int = 0                 # prompt tokens already in the cache
    generated: int = 0
    next_token: int | None = None      # sampled, not yet fed to the model
    generator: torch.Generator | None = None
    seen: torch.Tensor | None = None   # token ids the repetition penalty applies to
    matcher: object = None             # the row's place in its request's grammar (engine/grammar.py)
    cancelled: bool = False
    out: list[int] = field(default_factory=list)     # tokens emitted so far
    notify: object = None              # called (from the scheduler thread) after each event
    submitted: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    last_token_at: float | None = None

    @property
    def pos(self) -> int:              # tokens in the cache
        return self.prefilled + max(0, self.generated - 1)

    def cached_tokens(self) -> list[int]:
        """The tokens whose keys and values the sequence's cache row holds."""
        return (self.req.prompt[:self.prefilled] + self.out)[:self.pos]


class _Driver(Protocol):
    """What a Handle needs from the Scheduler that made it (engine/scheduler.py): its thread, if it
    runs one; running its steps in the caller's thread until `seq` has an event; waking it."""
    _thread: object

    def _drive(self, seq: _Seq, timeout: float | None) -> None: ...
    def _wake(self) -> None: ...


class Handle(EventStream):
    """The caller's side of one sequence: iterate (or get()) its TokenEvents; cancel() to stop early."""

    def __init__(self, seq: _Seq, scheduler: _Driver):
        self._seq = seq
        self._scheduler = scheduler

    def on_event(self, callback):
        """Call `callback()` (from the thread running the step) whenever an event is queued."""
        self._seq.notify = callback

    def get_nowait(self) -> TokenEvent:
        return self._unwrap(self._seq.events.get_nowait())

    def get(self, timeout: float | None = None) -> TokenEvent:
        """The next event (running steps in this thread if the scheduler has no thread of its own);
        queue.Empty after `timeout` seconds without one."""
        if self._scheduler._thread is None:
            self._scheduler._drive(self._seq, timeout)
            return self.get_nowait()
        return self._unwrap(self._seq.events.get(timeout=timeout))

    @staticmethod
    def _unwrap(ev):
        if isinstance(ev, BaseException):
            raise ev
        return ev

    def cancel(self):
        """Stop generating and free the slot (no-op once finished)."""
        self._seq.cancelled = True
        self._scheduler._wake()
