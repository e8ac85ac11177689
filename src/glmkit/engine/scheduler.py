"""Continuous batching: many sequences share one model and one KV-cache pool.

One background thread owns the model.  Each step it (1) drops cancelled sequences, (2) admits
waiting ones into free cache slots, first come first served, (3) prefills at most `prefill_chunk`
prompt tokens of one sequence, so that a long prompt delays running streams by one chunk at a time,
and (4) advances every running sequence by one token in a single batched forward pass.  Sequences
join and leave at any step.  Results flow back through a thread-safe queue per sequence.

Cache slots are rows of the model's KV cache (see models/transformer.py); sequences are placed in
the lowest free slot so the running rows stay packed at the front and the decode step can use a
view of the cache instead of a gather.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from ..errors import ContextLengthError, GlmkitError
from ..models.transformer import Transformer
from .generate import GenerationRequest
from .sampling import remember, sample_row


class QueueFull(GlmkitError):
    """More requests are waiting than the server accepts (HTTP 429)."""


SeqRequest = GenerationRequest  # one request type for the batch loop and the scheduler


@dataclass
class TokenEvent:
    token: int
    finish: str | None = None          # "stop" or "length" on the last event
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass
class _Seq:
    id: int
    req: SeqRequest
    events: "queue.Queue[TokenEvent | BaseException]"
    slot: int = -1
    prefilled: int = 0                 # prompt tokens already in the cache
    generated: int = 0
    next_token: int | None = None      # sampled, not yet fed to the model
    generator: torch.Generator | None = None
    seen: torch.Tensor | None = None
    cancelled: bool = False
    notify: object = None              # called (from the scheduler thread) after each event
    submitted: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    last_token_at: float | None = None

    @property
    def pos(self) -> int:              # tokens in the cache
        return self.prefilled + max(0, self.generated - 1)


class Handle:
    """The caller's side of one sequence: get() TokenEvents; cancel() to stop early."""

    def __init__(self, seq: _Seq, scheduler: "Scheduler"):
        self._seq = seq
        self._scheduler = scheduler

    def on_event(self, callback):
        """Call `callback()` from the scheduler thread whenever an event is queued."""
        self._seq.notify = callback

    def get_nowait(self) -> TokenEvent:
        ev = self._seq.events.get_nowait()
        if isinstance(ev, BaseException):
            raise ev
        return ev

    def get(self, timeout: float | None = None) -> TokenEvent:
        ev = self._seq.events.get(timeout=timeout)
        if isinstance(ev, BaseException):
            raise ev
        return ev

    def cancel(self):
        self._seq.cancelled = True
        self._scheduler._wake()


class Histogram:
    """Cumulative buckets in the Prometheus sense (seconds)."""

    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float):
        self.count += 1
        self.sum += value
        for i, b in enumerate(self.buckets):
            if value <= b:
                self.counts[i] += 1


@dataclass
class Stats:
    """Counters the server exposes at /metrics."""
    requests: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    cancelled: int = 0
    ttft: Histogram = field(default_factory=lambda: Histogram((0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)))
    token_latency: Histogram = field(default_factory=lambda: Histogram((0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)))


class Scheduler:
    def __init__(self, model: Transformer, max_batch: int = 8, max_seq_len: int | None = None,
                 max_queue: int = 64, prefill_chunk: int = 256):
        self.model = model
        self.max_batch = max_batch
        self.max_seq_len = min(max_seq_len or model.cfg.context_length, model.cfg.context_length)
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.stats = Stats()
        self._ids = itertools.count()
        self._waiting: deque[_Seq] = deque()
        self._slots: list[_Seq | None] = [None] * max_batch
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._stop = False
        self._thread: threading.Thread | None = None
        model.setup_caches(max_batch, self.max_seq_len)

    # -- caller side ---------------------------------------------------------------------
    def submit(self, req: SeqRequest) -> Handle:
        if not req.prompt:
            raise GlmkitError("the prompt is empty")
        if len(req.prompt) + 1 > self.max_seq_len:
            raise ContextLengthError(f"the prompt is {len(req.prompt)} tokens but this server's context is "
                                     f"{self.max_seq_len} tokens (prompt + reply)", len(req.prompt), self.max_seq_len)
        req.params.validate()
        req.max_new_tokens = max(1, min(req.max_new_tokens, self.max_seq_len - len(req.prompt)))
        seq = _Seq(next(self._ids), req, queue.Queue())
        if req.params.seed is not None:
            seq.generator = torch.Generator().manual_seed(req.params.seed)
        seq.seen = torch.tensor(sorted(set(req.prompt)), dtype=torch.long)
        with self._cv:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting; try again shortly")
            self._waiting.append(seq)
            self.stats.requests += 1
            self.stats.prompt_tokens += len(req.prompt)
            self._cv.notify()
        return Handle(seq, self)

    @property
    def queue_length(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return sum(s is not None for s in self._slots)

    def start(self):
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="glmkit-scheduler", daemon=True)
            self._thread.start()
        return self

    def stop(self):
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread:
            self._thread.join(timeout=10)

    def _wake(self):
        with self._cv:
            self._cv.notify()

    # -- scheduler thread -----------------------------------------------------------------
    def _loop(self):
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not self._stop and not self._waiting and self.running == 0:
                        self._cv.wait()
                    if self._stop:
                        return
                    self._admit()
                try:
                    self._step()
                except Exception as e:  # a bug: fail the running sequences, keep serving
                    import logging
                    logging.getLogger("glmkit").exception("scheduler step failed")
                    for i, s in enumerate(self._slots):
                        if s is not None:
                            self._put(s, e)
                            self._slots[i] = None

    def _admit(self):
        for i in range(self.max_batch):
            if not self._waiting:
                return
            if self._slots[i] is None:
                seq = self._waiting.popleft()
                while seq.cancelled and self._waiting:
                    self.stats.cancelled += 1
                    seq = self._waiting.popleft()
                if seq.cancelled:
                    self.stats.cancelled += 1
                    return
                seq.slot = i
                self._slots[i] = seq

    def _finish(self, seq: _Seq):
        self._slots[seq.slot] = None

    def _step(self):
        for s in self._slots:
            if s is not None and s.cancelled:
                self.stats.cancelled += 1
                self._finish(s)
        dev = self.model.device
        # (3) one prefill chunk for the oldest sequence that still needs it
        pending = [s for s in self._slots if s is not None and s.prefilled < len(s.req.prompt)]
        if pending:
            s = min(pending, key=lambda q: q.id)
            chunk = s.req.prompt[s.prefilled:s.prefilled + self.prefill_chunk]
            logits = self.model(torch.tensor([chunk], device=dev), torch.tensor([s.prefilled], device=dev),
                                rows=torch.tensor([s.slot], device=dev))
            s.prefilled += len(chunk)
            if s.prefilled == len(s.req.prompt):
                self._emit(s, logits[0])
        # (4) one decode step for every sequence with a token to feed
        ready = [s for s in self._slots if s is not None and s.next_token is not None]
        if not ready:
            return
        hi = max(s.slot for s in ready) + 1
        tokens = torch.zeros((hi, 1), dtype=torch.long)
        start = torch.zeros(hi, dtype=torch.long)
        lengths = torch.zeros(hi, dtype=torch.long)
        for s in ready:
            tokens[s.slot, 0], start[s.slot], lengths[s.slot] = s.next_token, s.pos, 1
        logits = self.model(tokens.to(dev), start.to(dev), lengths.to(dev)).float().cpu()   # one copy per step
        for s in ready:
            self._emit(s, logits[s.slot])

    def _emit(self, s: _Seq, logits: torch.Tensor):
        """Sample the next token of `s` from its logits and hand it to the caller."""
        req = s.req
        logits = logits.float().cpu()
        if req.forced and s.generated < len(req.forced):
            tok = req.forced[s.generated]      # constrained: the model ran, the choice is fixed
        else:
            tok = sample_row(logits, req.params, s.seen, s.generator)
        ev = TokenEvent(tok)
        if req.logprobs is not None:
            lp = torch.log_softmax(logits, dim=-1)
            ev.logprob = float(lp[tok])
            if req.logprobs:
                top = torch.topk(lp, req.logprobs)
                ev.top_logprobs = list(zip(top.indices.tolist(), top.values.tolist()))
        if req.params.repetition_penalty != 1.0:
            s.seen = remember(s.seen, tok)
        s.generated += 1
        now = time.perf_counter()
        if s.first_token_at is None:
            s.first_token_at = now
            self.stats.ttft.observe(now - s.submitted)
        else:
            self.stats.token_latency.observe(now - s.last_token_at)
        s.last_token_at = now
        self.stats.generated_tokens += 1
        if tok in req.stop_ids:
            ev.finish = "stop"
        elif s.generated >= req.max_new_tokens or s.pos + 1 >= self.max_seq_len:
            ev.finish = "length"
        if ev.finish:
            s.next_token = None
            self._finish(s)
        else:
            s.next_token = tok
        self._put(s, ev)

    @staticmethod
    def _put(s: _Seq, ev):
        s.events.put(ev)
        if s.notify is not None:
            s.notify()
