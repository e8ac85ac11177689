"""The decode loop: continuous batching, the one way glmkit generates tokens.

Many sequences share one model and its KV cache.  Each step (1) drops cancelled sequences,
(2) admits waiting ones into free cache slots, first come first served, (3) advances every
running sequence by one token in a single batched forward pass, and (4) prefills at most
`prefill_chunk` prompt tokens of one sequence, so that a long prompt delays running streams by one
chunk at a time.  Sequences join and leave at any step.  Results flow back through a queue per sequence.

Who runs the steps: after start(), a background thread; in run(), the thread that calls it (`glmkit
serve` runs the steps in its main thread, the one that loaded the model, and HTTP in another);
without either, the synchronous callers themselves: a caller waiting for its next event runs one
step at a time under a lock, each step advancing every sequence (the Python API and the terminal
iterate a Handle and need no thread).  The caller's own thread matters on CPU: libgomp, PyTorch's
OpenMP, stops spinning between parallel regions as soon as two threads own thread pools (here the
one that loaded the model and an engine thread), which costs ~40% of a small model's decode speed.

Cache slots are rows of the model's KV cache (see models/transformer.py); sequences are placed in
the lowest free slot so the running rows stay packed at the front and the decode step can use a
view of the cache instead of a gather.  The cache lives in the model, so a model has one
scheduler.  It grows (doubling, contents kept) to what admitted sequences need, up to
max_batch x max_seq_len; `from_memory` allocates it whole up front instead.

With `compile=True` the decode step (3) runs a compiled step (engine/compiled_step.py) once its
batch bucket is compiled, and the eager one until then: the running rows are padded up to the
bucket (1, 2, 4, 8, ...), and the cache has all max_batch rows from the start so that every bucket
fits.  Its length still grows by doubling (the compiled step takes lengths as dynamic sizes), except
with a static step (CUDA graphs), which needs the whole max_batch x max_seq_len cache up front.
Prefill chunks always run eagerly.

LoRA adapters served unmerged (models/lora.py): each request names its adapter by index
(GenerationRequest.adapter, 0 = none) and rows of different adapters share one decode step, each
row getting its own adapter's product.  A step with any adapter's row in it runs eagerly (the
compiled step has no LoRA path); steps of base rows only keep the compiled step.  A kept or running
row donates its prefix only to sequences of the same adapter (its keys and values are that adapter's).
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import replace

import torch

from ..errors import GlmkitError
from ..models.transformer import Transformer
from .compiled_step import CompiledDecode
from .prefix_cache import PrefixCache
from .requests import GenerationRequest, QueueFull, TokenEvent, budget
from .sampling import remember, sample_row
from .sequence import Handle, _Seq
from .stats import Stats

log = logging.getLogger("glmkit")


class Scheduler:
    def __init__(self, model: Transformer, max_batch: int = 8, max_seq_len: int | None = None,
                 max_queue: int | None = 64, prefill_chunk: int = 256, prefix_cache: bool = True,
                 compile: bool | CompiledDecode = False, progress=None):
        """`max_queue`: most sequences waiting for a slot (None: no limit) before submit raises
        QueueFull.  `prefix_cache`: reuse finished sequences' keys and values (engine/prefix_cache.py).
        `compile`: decode through a compiled step (True, or a CompiledDecode made for this model and
        max_batch), each bucket compiled in the background when first needed; `progress` is told
        when a compilation starts (default: the "glmkit" logger)."""
        self.model = model
        self.max_batch = max_batch
        self.max_seq_len = min(max_seq_len or model.cfg.context_length, model.cfg.context_length)
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.stats = Stats()
        self._ids = itertools.count()
        self._waiting: deque[_Seq] = deque()
        self._slots: list[_Seq | None] = [None] * max_batch
        self.prefix = PrefixCache(max_batch, prefix_cache)
        self._cache_version = None     # the model's cache_version after our last write
        self._cv = threading.Condition(threading.Lock())   # guards the queue and the slots
        self._step_lock = threading.Lock()                   # one step at a time, whoever runs it
        self._thread: threading.Thread | None = None      # the thread running the steps, if any
        self._loop_ended = threading.Event()
        self.compiled = CompiledDecode(model, max_batch, progress=progress) if compile is True else compile or None
        if self.compiled is not None:
            self._reserve(max_batch, self.max_seq_len if self.compiled.static else 1)

    @classmethod
    def from_memory(cls, model: Transformer, kv_cache_mb: int, max_batch: int, **kwargs) -> Scheduler:
        """A scheduler whose KV cache takes `kv_cache_mb` MiB: `max_batch` rows of as many tokens as
        fit (at least 256, at most the model's context).  Allocated now, so that a cache the device
        cannot hold fails at startup rather than under load."""
        cfg = model.cfg
        per_token = cfg.n_layer * 2 * cfg.n_kv_head * cfg.head_dim * model.dtype.itemsize   # keys + values
        # a P-tuning prefix takes model.prefix_len slots of every row (models/transformer.py)
        max_seq = max(256, min(cfg.context_length, kv_cache_mb * 2**20 // (max_batch * per_token) - model.prefix_len))
        s = cls(model, max_batch, max_seq, **kwargs)
        s._reserve(max_batch, s.max_seq_len)       # (already done by a static compiled step)
        return s

    # -- caller side ---------------------------------------------------------------------
    def submit(self, req: GenerationRequest) -> Handle:
        """Queue a sequence; its events arrive on the Handle."""
        if not req.prompt:
            raise GlmkitError("the prompt is empty")
        served = len(getattr(self.model.lora, "names", ()))
        if not 0 <= req.adapter <= served:
            raise GlmkitError(f"LoRA adapter {req.adapter} asked for; this model serves {served}")
        req = replace(req, max_new_tokens=budget(len(req.prompt), req.max_new_tokens, self.max_seq_len))
        seq = _Seq(next(self._ids), req, queue.Queue())
        if req.params.seed is not None:
            seq.generator = torch.Generator().manual_seed(req.params.seed)
        seq.seen = torch.tensor(sorted(set(req.prompt)), dtype=torch.long)
        if req.params.grammar is not None:
            seq.matcher = req.params.grammar.matcher()
        with self._cv:
            if self.max_queue is not None and len(self._waiting) >= self.max_queue:
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

    def start(self) -> Scheduler:
        """Run the steps in a background thread from now on (a daemon: a program that never calls
        stop() still exits).  Nothing to do if a thread already runs them."""
        with self._cv:
            if self._thread is None:
                self._loop_ended.clear()
                self._thread = threading.Thread(target=self._loop, name="glmkit-scheduler", daemon=True)
                self._thread.start()
        return self

    def run(self, claimed=None):
        """Run the steps in the calling thread until stop() is called from another.  For a program
        whose model-loading thread has nothing else to do: its OpenMP pool is the only one, and stays
        warm between steps (see the module docstring).  `claimed()`, if given, is called once the
        steps are this thread's: what it starts may call stop() at any time from then on."""
        with self._cv:
            if self._thread is not None:
                raise GlmkitError("the scheduler's steps already run in another thread")
            self._loop_ended.clear()
            self._thread = threading.current_thread()
        if claimed is not None:
            claimed()
        self._loop()

    def stop(self):
        """End the steps' thread, if any, after its current step; sequences still queued or running
        get an error.  The scheduler stays usable (driven by its callers, or start() again)."""
        with self._cv:
            thread, self._thread = self._thread, None
            self._cv.notify()
        if thread is not None and thread is not threading.current_thread():
            self._loop_ended.wait(timeout=10)    # not join(): run()'s thread goes on to other work
        with self._step_lock, self._cv:
            self._fail_all(GlmkitError("the engine stopped before this generation finished"))

    def _wake(self):
        with self._cv:
            self._cv.notify()

    # -- stepping -------------------------------------------------------------------------
    def _loop(self):
        me = threading.current_thread()
        try:
            while True:
                with self._cv:
                    while self._thread is me and not self._waiting and self.running == 0:
                        self._cv.wait()
                    if self._thread is not me:
                        return
                with self._step_lock:
                    self._tick()
        finally:
            self._loop_ended.set()

    def _drive(self, seq: _Seq, timeout: float | None):
        """Without a background thread: run steps in the caller's thread until `seq` has an event
        or `timeout` has passed.  Concurrent callers take turns, one step each."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while seq.events.empty():
            left = -1 if deadline is None else deadline - time.monotonic()
            if deadline is not None and left <= 0 or not self._step_lock.acquire(timeout=left):
                return
            try:
                if seq.events.empty():
                    self._tick()
            finally:
                self._step_lock.release()

    def _tick(self):
        with self._cv:
            self._admit()
        try:
            with torch.inference_mode():
                self._step()
        except Exception as e:  # a bug: fail the running sequences, keep serving
            log.exception("scheduler step failed")
            for i, s in enumerate(self._slots):
                if s is not None:
                    self._put(s, e)
                    self._slots[i] = None

    def _fail_all(self, e: BaseException):
        for s in [*self._waiting, *self._slots]:
            if s is not None and not s.cancelled:
                self._put(s, e)
        self._waiting.clear()
        self._slots = [None] * self.max_batch

    def _admit(self):
        for s in self._slots:          # cancelled sequences leave first: their rows are free to reuse
            if s is not None and s.cancelled:
                self.stats.cancelled += 1
                self._finish(s)
        # after they have left: a sequence cancelled while another scheduler wrote the cache must not
        # leave its (overwritten) keys and values behind as a prefix to reuse
        if self.model.cache_version != self._cache_version:
            self.prefix.forget_all()   # someone else wrote the cache: what we kept is gone
        for i in range(self.max_batch):
            while self._waiting and self._waiting[0].cancelled:
                self._waiting.popleft()
                self.stats.cancelled += 1
            if not self._waiting:
                return
            if self._slots[i] is None:
                seq = self._waiting.popleft()
                self._reserve(i + 1, len(seq.req.prompt) + seq.req.max_new_tokens)
                free = [j for j, other in enumerate(self._slots) if other is None]
                # keys and values differ per LoRA adapter: only sequences of the same one donate
                running = [(o.slot, o.cached_tokens()) for o in self._slots
                           if o is not None and o.req.adapter == seq.req.adapter] if self.prefix.enabled else []
                seq.prefilled = self.prefix.admit(self.model, seq.req.prompt, i, free, running, self.model.cache_batch,
                                                  seq.req.adapter)
                if seq.prefilled:
                    self.stats.prefix_hits += 1
                    self.stats.prefix_hit_tokens += seq.prefilled
                self._cache_version = self.model.cache_version
                seq.slot = i
                self._slots[i] = seq

    def _reserve(self, rows: int, length: int):
        """Make the model's KV cache at least rows x length, keeping what it holds: rows and
        length at least double when they grow (up to max_batch x max_seq_len), so a long
        generation reallocates a few times only; it never shrinks.  Checked against the model
        itself: its cache may have been resized (by direct use of the model) while we were idle."""
        m = self.model
        if m.cache_batch >= rows and m.cache_length >= length:
            return
        old = [(layer.attention.kv_cache.k, layer.attention.kv_cache.v) for layer in m.layers] if m.cache_batch else []
        with torch.inference_mode(False):   # plain tensors: the model may also be run outside inference mode
            m.setup_caches(max(m.cache_batch, min(self.max_batch, max(rows, 2 * m.cache_batch))),
                           max(m.cache_length, min(self.max_seq_len, max(length, 2 * m.cache_length, 256))))
        for layer, (k, v) in zip(m.layers, old):
            new, n, t = layer.attention.kv_cache, k.shape[0], k.shape[2] - 1    # the last slot is scratch
            new.k[:n, :, :t], new.v[:n, :, :t] = k[:, :, :t], v[:, :, :t]

    def _finish(self, seq: _Seq):
        self._slots[seq.slot] = None
        self.prefix.keep(seq.slot, seq.cached_tokens(), seq.req.adapter)

    def _step(self):
        dev = self.model.device
        # (3) one decode step for every sequence with a token to feed: running streams get their
        # token before a newcomer's prefill chunk runs
        ready = [s for s in self._slots if s is not None and s.next_token is not None]
        if ready:
            hi = max(s.slot for s in ready) + 1
            c = self.compiled
            adapters = [0] * hi                # each row's LoRA adapter (models/lora.py), 0: none
            for s in ready:
                adapters[s.slot] = s.req.adapter
            # the compiled step has no LoRA path: a step with an adapter's row in it runs eagerly
            compiled = c is not None and not any(adapters) and self._compiled_bucket(hi)
            rows = c.bucket(hi) if compiled else hi
            tokens = torch.zeros((rows, 1), dtype=torch.long)
            start = torch.zeros(rows, dtype=torch.long)
            lengths = torch.zeros(rows, dtype=torch.long)  # free slots below `rows` ride along as padding
            for s in ready:
                tokens[s.slot, 0], start[s.slot], lengths[s.slot] = s.next_token, s.pos, 1
            if compiled:
                try:
                    logits = c(tokens[:, 0], start, lengths > 0, max(s.pos for s in ready) + 1)
                except Exception as e:     # e.g. a guard failed: this bucket goes eager, this step too
                    c.fail(rows, e)
                    compiled = False
            if not compiled:
                logits = self.model(tokens.to(dev), start.to(dev), lengths.to(dev),
                                    adapters=adapters if any(adapters) else None)
            logits = logits.float().cpu()                  # one copy per step
            self._cache_version = self.model.cache_version
            for s in ready:
                self._emit(s, logits[s.slot])
        # (4) one prefill chunk for the oldest sequence that still needs it; its first token ends
        # the step (so a caller driving the steps sees it after the prefill alone)
        pending = [s for s in self._slots if s is not None and s.prefilled < len(s.req.prompt)]
        if pending:
            s = min(pending, key=lambda q: q.id)
            chunk = s.req.prompt[s.prefilled:s.prefilled + self.prefill_chunk]
            logits = self.model(torch.tensor([chunk], device=dev), torch.tensor([s.prefilled], device=dev),
                                rows=torch.tensor([s.slot], device=dev),
                                adapters=[s.req.adapter] if s.req.adapter else None)
            self._cache_version = self.model.cache_version
            s.prefilled += len(chunk)
            if s.prefilled == len(s.req.prompt):
                self._emit(s, logits[0].float().cpu())

    def _compiled_bucket(self, rows: int) -> bool:
        """Whether the compiled step runs `rows` rows now; if its bucket is not compiled yet, it
        starts compiling in the background (the eager step serves meanwhile)."""
        c, b = self.compiled, self.compiled.bucket(rows)
        if b not in c.ready:
            c.request(b)
            return False
        # the model's cache may have been reallocated by direct use while we were idle
        return self.model.cache_batch >= b and (not c.static or self.model.cache_length >= self.max_seq_len)

    def _emit(self, s: _Seq, logits: torch.Tensor):
        """Choose the next token of `s` from its float32 CPU logits and hand it to the caller."""
        req = s.req
        if s.generated < len(req.forced_prefix):
            tok = req.forced_prefix[s.generated]      # the model ran; the choice is fixed
        elif s.matcher is not None:                   # a grammar: only the tokens it allows
            tok = sample_row(s.matcher.mask(logits), req.params, s.seen, s.generator)
            s.matcher.consume(tok)
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
        s.out.append(tok)
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
        elif s.generated >= req.max_new_tokens:
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
