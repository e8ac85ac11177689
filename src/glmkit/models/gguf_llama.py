"""Llama-family models in GGUF files (what the embedded default model is).

Read with the `gguf` package (the llama.cpp project's own reader): metadata gives the config,
the tokenizer and the chat template; tensors are memory-mapped and dequantized one by one with
`gguf.quants`.  llama.cpp's converter permutes Q and K so that rotary pairs are adjacent, which
is exactly our interleaved rotary, so the weights are used as stored.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError
from .config import ModelConfig
from .quantize import QTensor, quantize_int8

SUPPORTED_ARCHS = ("llama",)
SUPPORTED_TYPES = {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K", "Q8_K", "Q2_K", "Q3_K"}

_LAYER = re.compile(r"^blk\.(\d+)\.(.+)$")
_LAYER_KEYS = {
    "attn_norm.weight": "attention_norm.weight",
    "attn_output.weight": "attention.wo.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "ffn_down.weight": "feed_forward.w2.weight",
}
_FUSED = {"attn_q.weight": ("attention.wqkv.weight", 0), "attn_k.weight": ("attention.wqkv.weight", 1),
          "attn_v.weight": ("attention.wqkv.weight", 2),
          "ffn_gate.weight": ("feed_forward.w13.weight", 0), "ffn_up.weight": ("feed_forward.w13.weight", 1)}
_FUSED_PARTS = {"attention.wqkv.weight": 3, "feed_forward.w13.weight": 2}


class GGUFFile:
    def __init__(self, path: Path):
        import gguf
        self.path = path
        try:
            self.reader = gguf.GGUFReader(str(path), "r")
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable GGUF file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None

    def get(self, key: str, default=None):
        field = self.reader.fields.get(key)
        if field is None:
            return default
        return field.contents()

    def require(self, key: str):
        v = self.get(key)
        if v is None:
            raise CheckpointError(f"{self.path}: GGUF metadata {key!r} is missing")
        return v

    def config(self) -> ModelConfig:
        arch = self.require("general.architecture")
        if arch not in SUPPORTED_ARCHS:
            raise CheckpointError(f"{self.path}: unsupported GGUF architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHS)})")
        heads = int(self.require(f"{arch}.attention.head_count"))
        dim = int(self.require(f"{arch}.embedding_length"))
        head_dim = int(self.get(f"{arch}.attention.key_length", dim // heads))
        names = {t.name for t in self.reader.tensors}
        vocab = self.get(f"{arch}.vocab_size") or len(self.require("tokenizer.ggml.tokens"))
        return ModelConfig(
            family="llama", n_layer=int(self.require(f"{arch}.block_count")), dim=dim, n_head=heads,
            n_kv_head=int(self.get(f"{arch}.attention.head_count_kv", heads)), head_dim=head_dim,
            ffn_dim=int(self.require(f"{arch}.feed_forward_length")), vocab_size=int(vocab),
            context_length=int(self.get(f"{arch}.context_length", 2048)),
            norm_eps=float(self.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_base=float(self.get(f"{arch}.rope.freq_base", 10000.0)),
            rope_dims=int(self.get(f"{arch}.rope.dimension_count", head_dim)),
            qkv_bias="blk.0.attn_q.bias" in names, tied_embeddings="output.weight" not in names,
            name=path_stem(self.path),  # general.name is often a training-run label
        )

    def tokenizer(self):
        from ..tokenizers.gguf_bpe import GGUFBPETokenizer
        model = self.require("tokenizer.ggml.model")
        if model != "gpt2":
            raise CheckpointError(f"{self.path}: tokenizer model {model!r} is not supported yet (only byte-level BPE, 'gpt2')")
        return GGUFBPETokenizer(
            self.require("tokenizer.ggml.tokens"), self.require("tokenizer.ggml.token_type"),
            self.get("tokenizer.ggml.merges", []), self.get("tokenizer.ggml.pre", "default"),
            eos_id=int(self.require("tokenizer.ggml.eos_token_id")),
            bos_id=self.get("tokenizer.ggml.bos_token_id"), source=str(self.path))

    def has_quantized_linears(self) -> bool:
        return any(t.tensor_type.name in NATIVE_TYPES and t.name.startswith("blk.") for t in self.reader.tensors)

    def chat_template(self) -> str | None:
        return self.get("tokenizer.chat_template")

    def iter_state(self, cfg: ModelConfig) -> Iterator[tuple[Path, str, torch.Tensor]]:
        """(file, our parameter name, float32 tensor); Q/K/V and gate/up are fused on the way."""
        from gguf import quants
        pending: dict[str, list] = {}
        for t in self.reader.tensors:
            qtype = t.tensor_type.name
            if qtype not in SUPPORTED_TYPES:
                raise CheckpointError(f"{self.path}: tensor {t.name} has unsupported type {qtype}")
            name = t.name
            try:
                arr = quants.dequantize(t.data, t.tensor_type)
            except Exception as e:
                raise CheckpointError(f"{self.path}: tensor {t.name} cannot be decoded ({e})") from None
            tensor = torch.from_numpy(np.array(arr, dtype=np.float32))  # copy: GGUF data is a read-only mmap
            if qtype in NATIVE_TYPES and name != "token_embd.weight" and tensor.ndim == 2:
                tensor = native_qtensor(t.data, qtype, tensor)
            if name == "token_embd.weight":
                if cfg.tied_embeddings and qtype in NATIVE_TYPES:
                    # the output layer multiplies by this matrix too, and the file stores it quantized:
                    # build() runs that matmul on the quantized kernel (as llama.cpp does), the lookup
                    # keeps the float values
                    q = native_qtensor(t.data, qtype, tensor)
                    tensor = QTensor(q.bits, q.q, q.scales, q.group_size, dense=tensor)
                yield self.path, "tok_embeddings.weight", tensor  # tied output: set up in build()
                continue
            if name in ("output_norm.weight", "output.weight"):
                yield self.path, {"output_norm.weight": "norm.weight", "output.weight": "output.weight"}[name], tensor
                continue
            m = _LAYER.match(name)
            if not m:
                raise CheckpointError(f"{self.path}: unexpected tensor {name!r}")
            layer, key = m.groups()
            if key in _LAYER_KEYS:
                yield self.path, f"layers.{layer}.{_LAYER_KEYS[key]}", tensor
            elif key in _FUSED:
                ours, slot = _FUSED[key]
                full = f"layers.{layer}.{ours}"
                parts = pending.setdefault(full, [None] * _FUSED_PARTS[ours])
                parts[slot] = tensor
                if all(p is not None for p in parts):
                    yield self.path, full, fuse(pending.pop(full))
            elif key == "rope_freqs.weight":
                raise CheckpointError(f"{self.path}: rope scaling factors (rope_freqs) are not supported yet")
            else:
                raise CheckpointError(f"{self.path}: unexpected tensor {name!r}")
        if pending:
            raise CheckpointError(f"{self.path}: incomplete layers, missing parts of {', '.join(sorted(pending))}")


NATIVE_TYPES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}  # block bytes for 32 weights


def native_qtensor(raw: np.ndarray, qtype: str, deq: torch.Tensor) -> QTensor:
    """GGML blocks of 32 as glmkit int4/int8 weights.

    Q4_0 (w = (q-8)·d) and Q4_1 (w = q·d + m) map exactly onto int4 with group 32: scale d and
    zero m + 8d (0 for Q4_0).  Q8_0 has one scale per 32 weights, but the int8 kernel takes one
    per row, so it is re-quantized per row (error under half a step of the coarser scale)."""
    if qtype == "Q8_0":
        return QTensor(8, *quantize_int8(deq))
    N, K = deq.shape
    blocks = np.asarray(raw).reshape(N, K // 32, NATIVE_TYPES[qtype])
    d = torch.from_numpy(blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32))
    if qtype == "Q4_1":
        m = torch.from_numpy(blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32))
        zero = m + 8 * d
    else:
        zero = torch.zeros_like(d)
    # the codes straight from the blocks (ggml's layout: byte j of a block holds weight j in its low
    # nibble and weight j + 16 in its high one), with no float arithmetic: exact, and ~8x faster
    # than recovering them from the dequantized values
    nib = torch.from_numpy(blocks[..., NATIVE_TYPES[qtype] - 16:].copy())                 # [N, K/32, 16]
    q = torch.cat([nib & 0x0F, nib >> 4], dim=-1).reshape(N, K)
    scales = torch.stack([d, zero], dim=-1).transpose(0, 1).contiguous()    # [K/32, N, 2]
    return QTensor(4, q, scales, 32, dense=deq)


def fuse(parts: list) -> "torch.Tensor | QTensor":
    """Concatenate along output rows, staying quantized when every part is quantized alike."""
    if all(isinstance(p, QTensor) for p in parts) and all(p.compatible(parts[0]) for p in parts):
        return QTensor.cat(parts)
    return torch.cat([p.dequantize() if isinstance(p, QTensor) else p for p in parts], dim=0)


def path_stem(p: Path) -> str:
    return p.name.removesuffix(".gguf")
