"""The decoder, in the style of gpt-fast: a few small modules and a static KV cache.

Batching model: every batch row is an independent sequence with its own length.  A row's
tokens sit in its cache at positions 0..len-1 (no left padding); a forward call gets the
tokens [B, T] and, per row, the position where they start.  Rows shorter than T are padded on
the right and their padding is written to a scratch slot at the very end of the cache, which
no real query can see.  This lets one decode step advance rows of different lengths, which is
what continuous batching needs.

A P-tuning v2 prefix (models/ptuning.py, `set_prefix`) takes the first `prefix_len` slots of every
row: keys and values that every query sees and that have no position.  Positions stay 0..len-1 (the
rotary angles, the scheduler's bookkeeping); a token at position p sits at slot prefix_len + p.
Without a prefix, prefix_len is 0 and slots are positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig


MKLDNN_MIN_ROWS = 2  # up to this many token rows, half-precision CPU matmuls skip oneDNN (bench/cpu_decode.py)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # variance in float32 whatever the activation dtype, as both originals do
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_table(cfg: ModelConfig, length: int, dtype: torch.dtype, device=None) -> Tensor:
    """cos/sin for positions 0..length-1: [length, rope_dims/2, 2]."""
    half = cfg.rope_dims // 2
    inv_freq = 1.0 / (cfg.rope_base ** (torch.arange(0, cfg.rope_dims, 2, dtype=torch.float, device=device) / cfg.rope_dims))
    if cfg.rope_scaling:
        from .hf_transformers import scale_inv_freq
        inv_freq = scale_inv_freq(inv_freq, cfg.rope_scaling)
    angles = torch.outer(torch.arange(length, dtype=torch.float, device=device), inv_freq)
    assert angles.shape[-1] == half
    # rounded to the model dtype like the original GLM code does in fp16/bf16
    return torch.stack([angles.cos(), angles.sin()], dim=-1).to(dtype)


def apply_rope(x: Tensor, rope: Tensor) -> Tensor:
    """Rotate interleaved pairs (2i, 2i+1) of the first rope_dims of each head.

    x: [B, T, H, D]; rope: [B, T, rope_dims/2, 2].
    """
    rot = rope.shape[-2] * 2
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    xs = x_rot.reshape(*x_rot.shape[:-1], -1, 2)
    cos, sin = rope[:, :, None, :, 0], rope[:, :, None, :, 1]
    out = torch.stack([xs[..., 0] * cos - xs[..., 1] * sin,
                       xs[..., 1] * cos + xs[..., 0] * sin], dim=-1).flatten(-2)
    return torch.cat([out.type_as(x), x_pass], dim=-1) if x_pass.shape[-1] else out.type_as(x)


class KVCache(nn.Module):
    """Keys/values for `batch` rows of up to `length` tokens, plus one scratch slot."""

    def __init__(self, batch: int, n_kv_head: int, length: int, head_dim: int, dtype, device=None):
        super().__init__()
        shape = (batch, n_kv_head, length + 1, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def length(self) -> int:
        return self.k.shape[2] - 1

    def write(self, rows: Tensor, slots: Tensor, k: Tensor, v: Tensor):
        """rows [B, 1], slots [B, T]; k, v [B, T, H_kv, D]."""
        self.k[rows, :, slots] = k
        self.v[rows, :, slots] = v


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.wqkv = nn.Linear(cfg.dim, cfg.qkv_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_head * cfg.head_dim, cfg.dim, bias=False)
        self.kv_cache: KVCache | None = None

    def _qkv(self, x: Tensor, rope: Tensor, lora=None) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys (both rotated) and values of `x` [B, T, dim]: [B, T, heads, head_dim] each."""
        cfg = self.cfg
        B, T, _ = x.shape
        qkv = self.wqkv(x)
        if lora is not None:
            qkv = lora("attention.wqkv", x, qkv)
        q, k, v = qkv.split([cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim,
                             cfg.n_kv_head * cfg.head_dim], dim=-1)
        q = apply_rope(q.view(B, T, cfg.n_head, cfg.head_dim), rope)
        k = apply_rope(k.view(B, T, cfg.n_kv_head, cfg.head_dim), rope)
        return q, k, v.view(B, T, cfg.n_kv_head, cfg.head_dim)

    def _out(self, y: Tensor, lora=None) -> Tensor:
        """The output projection of the attention `y` [B, heads, T, head_dim]."""
        cfg = self.cfg
        B, _, T, _ = y.shape
        y = y.transpose(1, 2).reshape(B, T, cfg.n_head * cfg.head_dim)
        out = self.wo(y)
        return out if lora is None else lora("attention.wo", y, out)

    def forward(self, x: Tensor, rope: Tensor, mask: Tensor, rows: Tensor, slots: Tensor, kv_len: int,
                in_order: bool, lora=None) -> Tensor:
        """`lora`: the rows' LoRA adapters for this layer (models/lora.py LoraBatch.at), or None."""
        cfg = self.cfg
        B = x.shape[0]
        q, k, v = self._qkv(x, rope, lora)
        self.kv_cache.write(rows, slots, k, v)
        if in_order:  # rows 0..B-1: a view of the cache, no copy
            keys, values = self.kv_cache.k[:B, :, :kv_len], self.kv_cache.v[:B, :, :kv_len]
        else:
            keys, values = self.kv_cache.k[rows[:, 0], :, :kv_len], self.kv_cache.v[rows[:, 0], :, :kv_len]
        y = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask,
                                           enable_gqa=cfg.n_head != cfg.n_kv_head)
        return self._out(y, lora)

    def forward_train(self, x: Tensor, rope: Tensor) -> Tensor:
        """Causal self-attention over `x` [B, T, dim] at positions 0..T-1, without the KV cache
        (fine-tuning: finetune/train.py); right padding is never seen by a real token."""
        q, k, v = self._qkv(x, rope)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                           enable_gqa=self.cfg.n_head != self.cfg.n_kv_head)
        return self._out(y)


class FeedForward(nn.Module):
    """SwiGLU with the gate and up projections fused into one matmul (gate first)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w13 = nn.Linear(cfg.dim, 2 * cfg.ffn_dim, bias=False)
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: Tensor, lora=None) -> Tensor:
        if lora is None:
            gate, up = self.w13(x).chunk(2, dim=-1)
            return self.w2(F.silu(gate) * up)
        gate, up = lora("feed_forward.w13", x, self.w13(x)).chunk(2, dim=-1)
        h = F.silu(gate) * up
        return lora("feed_forward.w2", h, self.w2(h))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, rope, mask, rows, slots, kv_len, in_order, lora=None):
        x = x + self.attention(self.attention_norm(x), rope, mask, rows, slots, kv_len, in_order, lora)
        return x + self.feed_forward(self.ffn_norm(x), lora)

    def forward_train(self, x: Tensor, rope: Tensor) -> Tensor:
        x = x + self.attention.forward_train(self.attention_norm(x), rope)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        # an explicit (uninitialised) weight skips Embedding's random init: every weight is loaded
        # anyway, and on the meta device that init (normal_) imports torch._dynamo, 2-3 s of a start
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim, _weight=torch.empty(cfg.vocab_size, cfg.dim))
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.cache_batch = 0
        self.cache_length = 0
        # bumped by every call that writes the cache (setup_caches, forward): a scheduler that keeps
        # finished sequences' keys and values for reuse checks that nobody else wrote them since
        self.cache_version = 0
        self.prefix_len = 0            # P-tuning v2 prefix slots at the start of every cache row
        self._prefix: list[tuple[Tensor, Tensor]] | None = None
        self.lora = None               # LoRA adapters served unmerged, per row (models/lora.py LoraSet)

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.weight.dtype

    def setup_caches(self, batch: int, length: int):
        """(Re)allocate KV caches for `batch` rows of up to `length` tokens (after the prefix, if any)."""
        length = min(length, self.cfg.context_length)
        if batch == self.cache_batch and length == self.cache_length:
            return
        self.cache_version += 1
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(batch, self.cfg.n_kv_head, self.prefix_len + length, self.cfg.head_dim,
                                               self.dtype, self.device)
        self.register_buffer("rope", rope_table(self.cfg, length, self.dtype, self.device), persistent=False)
        self.cache_batch, self.cache_length = batch, length
        self._write_prefix()

    def set_prefix(self, layers: list[tuple[Tensor, Tensor]] | None):
        """Keys and values every query sees before its row's own, with no position (a P-tuning v2
        prefix, models/ptuning.py): per layer (keys, values), each [n_kv_head, P, head_dim].  None
        removes it.  The caches are dropped (the next setup_caches allocates them with room for it)."""
        cfg = self.cfg
        if layers is not None:
            if len(layers) != cfg.n_layer:
                raise ValueError(f"a prefix for {len(layers)} layers; the model has {cfg.n_layer}")
            n = layers[0][0].shape[1]
            for k, v in layers:
                if tuple(k.shape) != (cfg.n_kv_head, n, cfg.head_dim) or k.shape != v.shape:
                    raise ValueError(f"prefix keys/values of shape {tuple(k.shape)}/{tuple(v.shape)}; expected "
                                     f"{(cfg.n_kv_head, n, cfg.head_dim)}")
            self._prefix = [(k.to(self.device, self.dtype), v.to(self.device, self.dtype)) for k, v in layers]
            self.prefix_len = n
        else:
            self._prefix, self.prefix_len = None, 0
        for layer in self.layers:
            layer.attention.kv_cache = None
        self.cache_batch = self.cache_length = 0
        self.cache_version += 1

    def _write_prefix(self):
        if self._prefix is None:
            return
        P = self.prefix_len
        for layer, (k, v) in zip(self.layers, self._prefix):
            c = layer.attention.kv_cache
            c.k[:, :, :P] = k
            c.v[:, :, :P] = v

    @torch.no_grad()
    def copy_cache(self, src: int, dst: int, length: int):
        """Copy the keys and values of positions 0..length-1 from cache row `src` to row `dst`."""
        lo, hi = self.prefix_len, self.prefix_len + length   # every row holds the prefix already
        for layer in self.layers:
            c = layer.attention.kv_cache
            c.k[dst, :, lo:hi] = c.k[src, :, lo:hi]
            c.v[dst, :, lo:hi] = c.v[src, :, lo:hi]

    def forward(self, tokens: Tensor, start: Tensor, lengths: Tensor | None = None,
                rows: Tensor | None = None, all_logits: bool = False, adapters=None) -> Tensor:
        """Run `tokens` [B, T] whose first token sits at position `start[b]` of cache row `rows[b]`.

        `lengths[b]` (default T) says how many of row b's tokens are real; the rest is padding.
        `adapters[b]` (a sequence of B ints, default all 0): the LoRA adapter of row b in
        `self.lora`, 0 for none.  Returns logits [B, V] at each row's last real token, or [B, T, V]
        with all_logits.
        """
        self.cache_version += 1
        lora = None
        if adapters is not None and any(adapters):
            if self.lora is None:
                raise ValueError("a row asks for a LoRA adapter but the model serves none")
            lora = self.lora.batch(adapters, tokens.device)
        if self.device.type == "cpu" and self.dtype != torch.float32 and tokens.numel() <= MKLDNN_MIN_ROWS:
            # oneDNN's bf16/fp16 matmul reaches about half the memory bandwidth for a few rows;
            # ATen's own kernel is faster there (and ~5x slower for prefill-sized inputs)
            was = torch._C._get_mkldnn_enabled()
            torch._C._set_mkldnn_enabled(False)
            try:
                return self._forward(tokens, start, lengths, rows, all_logits, lora)
            finally:
                torch._C._set_mkldnn_enabled(was)
        return self._forward(tokens, start, lengths, rows, all_logits, lora)

    def _forward(self, tokens, start, lengths, rows, all_logits, lora=None):
        B, T = tokens.shape
        dev = tokens.device
        in_order = rows is None
        if in_order:
            rows = torch.arange(B, device=dev)
        if lengths is None:
            lengths = torch.full((B,), T, device=dev)
        offsets = torch.arange(T, device=dev)
        positions = start[:, None] + offsets[None, :]                       # [B, T]
        real = offsets[None, :] < lengths[:, None]
        P = self.prefix_len
        at = positions + P if P else positions                               # cache slots of the tokens
        # padding goes to the scratch slot at the end of the cache
        slots = torch.where(real, at, torch.full_like(positions, P + self.cache_length))
        kv_len = int((start + lengths).max())
        if kv_len > self.cache_length:
            raise ValueError(f"sequence of {kv_len} tokens exceeds the cache of {self.cache_length}")
        kv_len += P
        # a query at position p sees keys 0..p of its own row (and the prefix before them)
        mask = torch.arange(kv_len, device=dev)[None, None, :] <= at[:, :, None]
        mask = mask[:, None]                                                 # [B, 1, T, S]
        rope = self.rope[positions.clamp(max=self.cache_length - 1)]
        last = (lengths - 1).clamp(min=0)
        return self._run(tokens, rope, mask, rows[:, None], slots, kv_len, in_order, last, all_logits, lora)

    def _run(self, tokens, rope, mask, rows2, slots, kv_len: int, in_order: bool, last, all_logits: bool,
             lora=None):
        """The layers proper: only tensor work from here on."""
        x = self.tok_embeddings(tokens)
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, mask, rows2, slots, kv_len, in_order, None if lora is None else lora.at(i))
        if not all_logits:
            x = x[torch.arange(x.shape[0], device=x.device), last][:, None]
        logits = self.output(self.norm(x))
        return logits if all_logits else logits[:, 0]

    def forward_train(self, tokens: Tensor, checkpoint: bool = False) -> Tensor:
        """Logits [B, T, V] for `tokens` [B, T] at positions 0..T-1 (rows right-padded), with
        autograd and without the KV cache: the fine-tuning pass (finetune/train.py).  `checkpoint`
        recomputes each block's activations in the backward pass instead of keeping them."""
        T = tokens.shape[1]
        if self.prefix_len:
            raise ValueError("fine-tuning a model that carries a P-tuning v2 prefix is not supported; load the base "
                             "model without --adapter")
        if T > self.cfg.context_length:
            raise ValueError(f"sequence of {T} tokens exceeds the model's context of {self.cfg.context_length}")
        rope = rope_table(self.cfg, T, self.dtype, tokens.device)[None]
        x = self.tok_embeddings(tokens)
        for layer in self.layers:
            if checkpoint and torch.is_grad_enabled():
                from torch.utils.checkpoint import checkpoint as recompute
                x = recompute(layer.forward_train, x, rope, use_reentrant=False)
            else:
                x = layer.forward_train(x, rope)
        return self.output(self.norm(x))
