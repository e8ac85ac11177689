"""The compiled decode step: one token for each of `bucket` cache rows, compiled once per bucket.

Why: a small model's eager decode step is overhead-bound (SmolLM2-135M: 30 layers x a dozen small
kernels, each paying Python and dispatch).  torch.compile (Inductor) fuses the small ops into a few
C++ kernels per layer and runs the whole step from one wrapper; the quantized matmuls and the
attention stay PyTorch's own kernels (docs/BENCHMARKS.md, "Compiled decode step", has the figures).

Shapes, so that a bucket compiles once and never again:
- Batch: the scheduler pads the decode batch up to a bucket (1, 2, 4, 8, 16, 32, and max_batch),
  rows 0..bucket-1 of the cache; rows without a token ride along as padding.  Each bucket is its
  own torch.compile (isolate_recompiles, recompile_limit=1, fullgraph): a guard that fails after
  warm-up raises instead of recompiling, and the scheduler then runs that bucket eagerly for good
  (logged; the tests' compile counters and `failed` would show it).
- Positions, cache slots and the attention mask are tensors; the rope rows are gathered inside.
  A P-tuning prefix (models/transformer.py) only shifts the slots and the mask, outside the step.
- Length, on CPU: the cache keeps growing by doubling (engine/scheduler.py) and attention reads only
  the keys up to the longest row, as the eager step does.  Both lengths are marked dynamic, one
  symbol each, so growth and every new token reuse the same kernels: no recompilation, and a short
  chat neither allocates nor reads a context-sized cache.
- Length, on CUDA: CUDA graphs need fixed shapes and addresses, so the scheduler allocates the cache
  at its full size up front and attention reads all of it (later positions masked), as gpt-fast does.
  (`static=True` gives this variant on CPU too; the tests run it there.)

The quantized Linears' own forward checks its input's address (models/quantize.py kernel_ready),
which Dynamo cannot trace; `linear` below calls the same kernels directly (Inductor's buffers are
aligned).  The layer loop mirrors Transformer._run for one token per row; tests/test_compiled_step.py
checks that both give the same greedy tokens.

Compilation is lazy and off the caller's path: `request(bucket)` compiles in a background thread
(one bucket at a time; the thread ends when the queue is empty, which releases its OpenMP pool, see
engine/scheduler.py) while the scheduler keeps using the eager step; `compile(buckets)` compiles now,
in the caller's thread (benchmarks, tests, CUDA).  Warm-up calls mark every row as padding, so they
write only the cache's scratch slot and never touch a sequence's keys and values.  Compiled code is
cached on disk by Inductor (FX graph cache) in $TORCHINDUCTOR_CACHE_DIR, which glmkit points at
~/.cache/glmkit/inductor unless it is set: a later process recompiles in seconds instead of a minute.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.quantize import (DENSE_MIN_ROWS, DEQUANT_MIN_ROWS, Int4Linear, Int8Linear, PackedLinear, dense_linear,
                               has_dense)
from ..models.transformer import MKLDNN_MIN_ROWS, Transformer, apply_rope

log = logging.getLogger("glmkit")

BUCKETS = (1, 2, 4, 8, 16, 32)
MIN_WINDOW = 2      # attention windows are at least this long: Dynamo specializes sizes 0 and 1


def cache_dir() -> str:
    """Where Inductor keeps compiled code: $TORCHINDUCTOR_CACHE_DIR if the user set it, else
    $XDG_CACHE_HOME/glmkit/inductor or ~/.cache/glmkit/inductor (set now for this process), which
    outlives /tmp/torchinductor_<user>, PyTorch's default (PyTorch writes that default into the
    variable when it first needs it, so that value counts as unset)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not current or os.path.abspath(current) == os.path.abspath(default_cache_dir()):
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(base) / "glmkit" / "inductor")
        from torch._inductor.utils import clear_caches
        clear_caches()                  # paths PyTorch derived from the old value
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]


def buckets_for(max_batch: int) -> tuple[int, ...]:
    return tuple(sorted({b for b in BUCKETS if b < max_batch} | {max_batch}))


def linear(mod, x: Tensor) -> Tensor:
    """`mod(x)` for x [B, K], traceable by Dynamo (see the module docstring), taking the same
    row-count paths as the quantized modules' forward (models/quantize.py); B is fixed per bucket,
    so each bucket traces one of them."""
    rows = x.shape[0]
    if isinstance(mod, (Int4Linear, Int8Linear)) and has_dense(mod) and rows >= DENSE_MIN_ROWS:
        y = dense_linear(mod, x)
    elif isinstance(mod, Int4Linear):
        op = torch.ops.aten._weight_int4pack_mm if x.is_cuda else torch.ops.aten._weight_int4pack_mm_for_cpu
        y = op(x.contiguous(), mod.weight, mod.group_size, mod.scales_and_zeros)
    elif isinstance(mod, Int8Linear):
        if rows >= DEQUANT_MIN_ROWS and not x.is_cuda:
            y = F.linear(x, mod.weight.to(x.dtype)) * mod.scales
        else:
            y = torch.ops.aten._weight_int8pack_mm(x.contiguous(), mod.weight, mod.scales)
    elif isinstance(mod, PackedLinear):
        return mod(x)
    else:
        return F.linear(x, mod.weight, mod.bias)
    return y + mod.bias if mod.bias is not None else y


def decode(model: Transformer, tokens: Tensor, pos: Tensor, slots: Tensor, mask: Tensor, rope_table: Tensor,
           ks: list[Tensor], vs: list[Tensor]) -> Tensor:
    """Transformer._run for one token in each of rows 0..B-1: tokens, pos, slots [B] (slot = where
    the key goes: pos, or the scratch slot for padding), mask [B, 1, 1, S] over the first S cache
    positions; ks, vs the layers' caches, rows 0..B-1.  Returns logits [B, V]."""
    cfg = model.cfg
    B, S = tokens.shape[0], mask.shape[-1]
    H, Hkv, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    rows, slots = torch.arange(B, device=tokens.device)[:, None], slots[:, None]   # ks, vs have B rows
    rope = rope_table[pos][:, None]                                   # [B, 1, rope_dims/2, 2]
    x = model.tok_embeddings(tokens)                                  # [B, dim]
    for layer, kc, vc in zip(model.layers, ks, vs):
        a, ff = layer.attention, layer.feed_forward
        q, k, v = linear(a.wqkv, layer.attention_norm(x)).split([H * D, Hkv * D, Hkv * D], dim=-1)
        q = apply_rope(q.view(B, 1, H, D), rope)
        kc[rows, :, slots] = apply_rope(k.view(B, 1, Hkv, D), rope)   # KVCache.write
        vc[rows, :, slots] = v.view(B, 1, Hkv, D)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), kc[:, :, :S], vc[:, :, :S], attn_mask=mask,
                                           enable_gqa=H != Hkv)
        x = x + linear(a.wo, y.reshape(B, H * D))
        gate, up = linear(ff.w13, layer.ffn_norm(x)).chunk(2, dim=-1)
        x = x + linear(ff.w2, F.silu(gate) * up)
    return linear(model.output, model.norm(x))


class CompiledDecode:
    """Compiled decode steps for one model, one per batch bucket; see the module docstring."""

    def __init__(self, model: Transformer, max_batch: int, mode: str | None = None, static: bool | None = None,
                 progress: Callable[[str], None] | None = None, background: bool | None = None):
        """`mode`: torch.compile's (default: "max-autotune-no-cudagraphs" on CPU, "reduce-overhead",
        i.e. CUDA graphs, on CUDA).  `static`: attention over the whole cache, which the scheduler
        then allocates at full size (default: on CUDA only).  `progress`: called with one line when
        a compilation starts (default: the "glmkit" logger, which also gets the line when it ends:
        a terminal chat must not print it in the middle of an answer).  `background`: compile a
        bucket in a background thread when the scheduler first needs it (default: on CPU; CUDA
        graphs are recorded per thread, so there only compile() compiles, in the caller's thread)."""
        self.model = model
        self.buckets = buckets_for(max_batch)
        cuda = model.device.type == "cuda"
        self.static = cuda if static is None else static
        self.mode = mode or ("reduce-overhead" if cuda else "max-autotune-no-cudagraphs")
        self.progress = progress or log.info
        self.background = not cuda if background is None else background
        self.cache_dir = cache_dir()
        # Inductor keeps fused half-precision math in float32; emulating eager's rounding after each op
        # keeps greedy tokens those of the eager step (measured: bf16 default model, 100 tokens equal
        # with it, the first difference at token 85 without)
        # Guards on the model's modules are dropped: checking them (one per weight, every call) cost
        # 0.85 ms of a 13 ms step on the default model.  Safe here because a loaded model's modules
        # and weights never change, and each CompiledDecode compiles for its one model
        # (isolate_recompiles); the inputs (tokens, positions, the cache views) keep their guards.
        import torch._inductor   # here, not at the top: it imports torch._dynamo, seconds that an eager
                                 # start (`glmkit chat -p`) should not pay
        options = {**torch._inductor.list_mode_options(self.mode), "emulate_precision_casts": True,
                   "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
        self._fns = {b: torch.compile(decode, options=options, fullgraph=True, recompile_limit=1,
                                      isolate_recompiles=True) for b in self.buckets}
        self.ready: set[int] = set()            # compiled and warmed up
        self.failed: dict[int, str] = {}        # bucket -> why it stays eager
        self.compile_s: dict[int, float] = {}
        self.calls = dict.fromkeys(self.buckets, 0)   # real steps run compiled, per bucket
        self._queue: deque[int] = deque()
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None
        self._views: dict[int, tuple] = {}       # bucket -> (cache tensor, its row views)

    def bucket(self, rows: int) -> int:
        return next(b for b in self.buckets if b >= rows)

    # -- compiling -----------------------------------------------------------------------
    def request(self, bucket: int):
        """Compile `bucket` in the background unless it is ready, queued or failed (or compiling in
        the background is off)."""
        with self._lock:
            if not self.background or bucket in self.ready or bucket in self.failed or bucket in self._queue:
                return
            self._queue.append(bucket)
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="glmkit-compile", daemon=True)
                self._worker.start()

    def compile(self, buckets=None):
        """Compile `buckets` (default: all) now, in this thread."""
        for b in buckets or self.buckets:
            if b not in self.ready and b not in self.failed:
                self._compile(b)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the background queue is done; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                worker = self._worker
            if worker is None:
                return True
            worker.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if worker.is_alive():
                return False

    def _work(self):
        while True:
            with self._lock:
                if not self._queue:
                    self._worker = None
                    return
                b = self._queue[0]
            try:
                self._compile(b)
            finally:
                with self._lock:
                    self._queue.popleft()

    def _compile(self, b: int):
        self.progress(f"compiling the decode step for batch {b} (the first time takes a minute or more; "
                      f"cached in {self.cache_dir})")
        t0 = time.perf_counter()
        try:
            m = self.model
            if m.cache_batch < b:
                raise ValueError(f"the KV cache has {m.cache_batch} rows, fewer than the bucket")
            with torch.inference_mode():      # as the scheduler's steps run: same guards
                # every row is padding: only the scratch slot is written.  The window is one short of
                # the cache so that no two lengths share a size while Dynamo assigns symbols (with a
                # one-slot P-tuning prefix, two short: the window would be the rope table's length)
                n = m.cache_length - 1 - (m.prefix_len == 1)
                pad = torch.zeros(b, dtype=torch.bool)
                self._run(b, torch.zeros(b, dtype=torch.long), torch.full((b,), n - 1), pad, n, compiling=True)
        except Exception as e:   # no C++ compiler, an unsupported op...: this bucket stays eager
            self.failed[b] = f"{type(e).__name__}: {e}"
            log.warning("glmkit: the decode step for batch %d could not be compiled; it stays eager (%s)",
                        b, self.failed[b].splitlines()[0][:300])
            return
        self.compile_s[b] = time.perf_counter() - t0
        self.ready.add(b)
        log.info("glmkit: compiled the decode step for batch %d in %.0f s", b, self.compile_s[b])

    # -- running -------------------------------------------------------------------------
    def __call__(self, tokens: Tensor, pos: Tensor, real: Tensor, kv_len: int) -> Tensor:
        """Logits [B, V] for tokens [B] at positions pos [B] of rows 0..B-1 (B a ready bucket);
        rows where `real` is False are padding.  kv_len: the longest real row's length.

        Raises whatever the compiled step raises, e.g. a guard that fails (the bucket must not
        recompile); the caller then calls fail(B) and runs the eager step, which rewrites every key
        and value this step may have written."""
        b = tokens.shape[0]
        m = self.model
        m.cache_version += 1           # as Transformer.forward: this call writes the cache (a warm-up does not)
        if m.device.type == "cpu" and m.dtype != torch.float32 and b <= MKLDNN_MIN_ROWS:
            # as Transformer.forward: ATen's few-row half-precision matmul, not oneDNN's.  (The flag
            # is process-wide: only real steps, which run one at a time, set it, never a warm-up.)
            was = torch._C._get_mkldnn_enabled()
            torch._C._set_mkldnn_enabled(False)
            try:
                logits = self._run(b, tokens, pos, real, kv_len)
            finally:
                torch._C._set_mkldnn_enabled(was)
        else:
            logits = self._run(b, tokens, pos, real, kv_len)
        self.calls[b] += 1
        return logits

    def fail(self, b: int, e: BaseException):
        """Bucket `b` stays eager from now on."""
        self.ready.discard(b)
        self.failed[b] = f"{type(e).__name__}: {e}"
        log.warning("glmkit: the compiled decode step for batch %d failed; it stays eager (%s)",
                    b, self.failed[b].splitlines()[0][:300])

    def _caches(self, b: int) -> tuple[list[Tensor], list[Tensor]]:
        """Rows 0..b-1 of every layer's keys and values, sharing the cache's memory (so the step writes
        the cache itself) and shaped like contiguous tensors of b rows, so the step does not depend
        on how many rows the cache has (another scheduler of the same model may have grown them).
        Detached, so that Dynamo sees plain tensors, not views whose base it would guard on.  Made
        again only when the cache is reallocated."""
        m = self.model
        k0 = m.layers[0].attention.kv_cache.k
        cached = self._views.get(b)
        if cached is None or cached[0] is not k0:
            caches = [layer.attention.kv_cache for layer in m.layers]
            cached = self._views[b] = (k0, [c.k[:b].detach() for c in caches], [c.v[:b].detach() for c in caches])
        return cached[1], cached[2]

    def _run(self, b: int, tokens, pos, real, kv_len: int, compiling: bool = False) -> Tensor:
        m = self.model
        dev = m.device
        tokens, pos, real = tokens.to(dev), pos.to(dev), real.to(dev)
        P, L = m.prefix_len, m.cache_length                          # P-tuning prefix slots come first
        at = pos + P if P else pos                                    # the tokens' cache slots
        S = P + L if self.static else max(P + kv_len, MIN_WINDOW)
        slots = torch.where(real, at, P + L)                          # padding -> the scratch slot
        mask = (torch.arange(S, device=dev)[None, :] <= at[:, None])[:, None, None]
        ks, vs = self._caches(b)
        if compiling and not self.static:
            # one symbol per length (the window S; the cache's, which grows by doubling): the kernels
            # compiled now serve every later length.  Marks matter only when compiling.
            torch._dynamo.mark_dynamic(mask, 3)
            torch._dynamo.mark_dynamic(m.rope, 0)
            for t in ks + vs:
                torch._dynamo.mark_dynamic(t, 2)
        if compiling and dev.type == "cuda":
            for t in ks + vs:
                torch._dynamo.mark_static_address(t)   # CUDA graphs write the cache in place
        return self._fns[b](m, tokens, pos, slots, mask, m.rope, ks, vs)
