"""Weight-only quantization of Linear layers: int8 per output channel, int4 group-wise.

The matmuls are PyTorch's own kernels (`aten._weight_int8pack_mm`,
`aten._weight_int4pack_mm_for_cpu` on CPU, `aten._weight_int4pack_mm` on CUDA), the ones gpt-fast
and torchao use underneath; on CPU torchao's weight-only int8/int4 paths end in these same kernels, so
we call them directly and keep one dependency fewer.

Those CPU kernels are tuned for one row: they dequantize each weight once per block of four input
rows, so a step of 8 rows costs ~2.5x a step of one and a 256-token prefill chunk ~64x.  Many-row
matmuls therefore take another path, chosen by row count (bench/quant_rows.py measured where each
wins):
- a small model (its quantized Linears' dense weights within DENSE_COPY_MAX_BYTES, like the
  embedded default model's: 212 MB in bf16) keeps a dense copy of its dequantized weights next to
  the packed ones, and decode steps of DENSE_MIN_ROWS sequences or more use the dense GEMM
  (oneDNN/AMX), whose cost hardly grows with rows.  Prefill keeps the kernel: its results for a
  row do not depend on how many rows share the call, so a prefix-cache hit, whose remainder is a
  shorter chunk, and a cold prefill give the same keys and values (engine/prefix_cache.py's
  promise), and a sequence decoded alone and one decoded in a small batch agree bit for bit; only
  in batches of 8+ can the last bits differ (as in llama.cpp's and vLLM's servers);
- a large int8 model converts a layer's int8 weights to the activation dtype for matmuls of
  DEQUANT_MIN_ROWS rows or more (prefill chunks) and applies the per-channel scales to the output
  (exact: int8 values are exact in bf16), which beats the one-row kernel from that many rows on.
  (There, in bf16, a prefix-cache hit's keys and values can differ in the last bits from a cold
  prefill's: a conversion per layer is too slow for a few rows to take the same path.)
Both see the same quantized values as the one-row kernel; only rounding and summation order differ
(tests/test_quantize.py bounds the logits' difference).

int4 follows gpt-fast's asymmetric scheme: per group of `group_size` input columns,
scale = (max - min) / 15 and zero = min + 8 * scale, so w ≈ (q - 8) * scale + zero with q in 0..15.
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import GlmkitError

GROUP_SIZES = (32, 64, 128, 256)


@dataclass(frozen=True)
class QuantConfig:
    """What to do with Linear weights while loading.

    bits 8 or 4: quantize every eligible layer to that.  bits 0: keep every weight in float
    (dequantizing a GGUF file's blocks).  `None` instead of a QuantConfig means "as the
    checkpoint comes": float checkpoints stay float, quantized ones stay quantized."""
    bits: int                 # 8, 4, or 0 for float
    group_size: int = 128     # int4 only
    output_layer: bool = False

    def __post_init__(self):
        if self.bits not in (0, 4, 8):
            raise GlmkitError(f"quantization bits must be 4 or 8, got {self.bits}")
        if self.bits == 4 and self.group_size not in GROUP_SIZES:
            raise GlmkitError(f"int4 group size must be one of {GROUP_SIZES}, got {self.group_size}")

    @classmethod
    def parse(cls, name: str | None, group_size: int = 128, output_layer: bool = False) -> "QuantConfig | None":
        if name in (None, "", "auto"):
            return None
        bits = {"int8": 8, "int4": 4, "8": 8, "4": 4, "none": 0, "float": 0}.get(str(name))
        if bits is None:
            raise GlmkitError(f"unknown quantization {name!r}; choose auto, none, int8 or int4")
        return cls(bits, group_size, output_layer)


@dataclass
class QTensor:
    """A Linear weight that arrives already quantized (GGUF blocks, glmkit checkpoints).

    bits 8: q int8 [N, K], scales [N].  bits 4: q uint8 in 0..15 [N, K],
    scales [K/group, N, 2] holding (scale, zero) as in quantize_int4."""
    bits: int
    q: Tensor
    scales: Tensor
    group_size: int = 0
    dense: Tensor | None = None    # the float values, when the reader had them anyway (GGUF): saves a dequantization
    packed: Tensor | None = None   # int4: q in the CPU kernel's layout, when a cache kept it (models/gguf_cache.py)

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def dequantize(self) -> Tensor:
        if self.dense is not None:
            return self.dense
        if self.bits == 8:
            return self.q.float() * self.scales.float()[:, None]
        return dequantize_int4(self.q, self.scales.float(), self.group_size)

    @staticmethod
    def cat(parts: list["QTensor"]) -> "QTensor":
        """Stack along output rows (to fuse Q/K/V or gate/up)."""
        p0 = parts[0]
        dim = 0 if p0.bits == 8 else 1
        dense = torch.cat([p.dense for p in parts]) if all(p.dense is not None for p in parts) else None
        return QTensor(p0.bits, torch.cat([p.q for p in parts]), torch.cat([p.scales for p in parts], dim=dim),
                       p0.group_size, dense)

    def compatible(self, other: "QTensor") -> bool:
        return self.bits == other.bits and self.group_size == other.group_size


ROWS_PER_CHUNK = 1024  # quantize this many rows at a time: float temporaries stay small


def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel int8: (q [N, K] int8, scales [N] float32)."""
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scales = torch.empty(w.shape[0], device=w.device)
    for i in range(0, w.shape[0], ROWS_PER_CHUNK):
        c = w[i:i + ROWS_PER_CHUNK].float()
        s = (c.abs().amax(dim=1) / 127).clamp(min=1e-10)
        q[i:i + ROWS_PER_CHUNK] = (c / s[:, None]).round().clamp(-128, 127)
        scales[i:i + ROWS_PER_CHUNK] = s
    return q, scales


def quantize_int4(w: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """Asymmetric group-wise int4: (q [N, K] uint8 in 0..15, scales_and_zeros [K/g, N, 2] float32)."""
    N, K = w.shape
    q = torch.empty((N, K), dtype=torch.uint8, device=w.device)
    sz = torch.empty((K // group_size, N, 2), device=w.device)
    for i in range(0, N, ROWS_PER_CHUNK):
        wg = w[i:i + ROWS_PER_CHUNK].float().reshape(-1, K // group_size, group_size)
        lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
        scales = ((hi - lo) / 15).clamp(min=1e-6)
        zeros = lo + scales * 8
        q[i:i + ROWS_PER_CHUNK] = ((wg - lo) / scales).round().clamp(0, 15).reshape(-1, K)
        sz[:, i:i + ROWS_PER_CHUNK] = torch.cat([scales, zeros], dim=-1).transpose(0, 1)
    return q, sz


def dequantize_int4(q: Tensor, sz: Tensor, group_size: int) -> Tensor:
    N, K = q.shape
    scales, zeros = sz[..., 0].t(), sz[..., 1].t()                        # [N, K/g]
    qg = q.reshape(N, K // group_size, group_size).float()
    return ((qg - 8) * scales[..., None] + zeros[..., None]).reshape(N, K)


DENSE_COPY_MAX_BYTES = 256 << 20   # keep dense copies when all quantized Linears' dense weights fit in this
DENSE_MIN_ROWS = 8                 # from this many rows on, a layer with a dense copy uses it
DEQUANT_MIN_ROWS = 64             # from this many rows on, a large int8 layer dequantizes for the matmul


_PACKED: dict[int, Tensor] = {}       # handle -> a dense copy prepacked for oneDNN (see keep_dense)
_handles = itertools.count()


@torch.library.custom_op("glmkit::packed_linear", mutates_args=())
def packed_linear(x: Tensor, handle: int, out_features: int) -> Tensor:
    """x [rows, K] times the prepacked weight `handle` (an op of its own: torch.compile cannot
    trace oneDNN's opaque packed tensors, but can call an op that holds one)."""
    return torch.ops.mkldnn._linear_pointwise(x, _PACKED[handle], None, "none", [None], "")


@packed_linear.register_fake
def _(x: Tensor, handle: int, out_features: int) -> Tensor:
    return x.new_empty(x.shape[0], out_features)


def keep_dense(mod: nn.Module, w: Tensor | None):
    """Give a quantized Linear its dense copy `w` (or none).  In bf16 on CPU the copy is kept
    prepacked in oneDNN's blocked layout instead: F.linear hands bf16 to oneDNN anyway, which then
    reorders the weights on every call; prepacked, a decode step of 8-16 rows reads them ~1.5x
    faster (docs/BENCHMARKS.md, "Speed round two"), with the same bits (oneDNN runs the same
    kernel either way; tests/test_quantize.py checks it)."""
    mod.dense, mod.packed = w, None
    if w is not None and can_prepack(w):
        mod.dense, mod.packed = None, _register_packed(mod, w)


def can_prepack(w: Tensor) -> bool:
    return w.device.type == "cpu" and w.dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()


def _register_packed(owner: nn.Module, w: Tensor) -> int:
    handle = next(_handles)
    _PACKED[handle] = torch.ops.mkldnn._reorder_linear_weight(w)
    weakref.finalize(owner, _PACKED.pop, handle, None)      # freed with the module
    return handle


class PackedLinear(nn.Module):
    """A large model's bf16 Linear on CPU, its weight kept prepacked for oneDNN (and not also plain).

    At ChatGLM3-6B's sizes a decode step is bound by reading the weights: ATen's bf16 one-row
    matmul read them at 15 GB/s on the 2-core host, oneDNN on the plain weight at 18.5 (it
    reorders it on every call), oneDNN on the prepacked weight at 21 (docs/BENCHMARKS.md, "bf16
    decode").  One kernel for every row count also means a row's result depends on no flag."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = _register_packed(self, linear.weight.detach())
        self.bias = linear.bias

    def forward(self, x: Tensor) -> Tensor:
        y = packed_linear(x.reshape(-1, self.in_features), self.packed, self.out_features)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y


def prepack_linears(model: nn.Module) -> int:
    """Swap the bf16 CPU nn.Linear layers of `model` for PackedLinear; how many were swapped."""
    swapped = 0
    for name, mod in list(model.named_modules()):
        if type(mod) is nn.Linear and can_prepack(mod.weight):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, PackedLinear(mod))
            swapped += 1
    return swapped


def has_dense(mod: nn.Module) -> bool:
    return mod.dense is not None or mod.packed is not None


def dense_linear(mod: nn.Module, x2: Tensor) -> Tensor:
    """x2 [rows, K] times `mod`'s dense copy."""
    if mod.packed is not None:
        return packed_linear(x2, mod.packed, mod.out_features)
    return F.linear(x2, mod.dense)


def decode_rows(x: Tensor) -> int:
    """How many sequences `x` advances by one token each ([B, 1, K], or [B, K] from the compiled
    step); 0 for a prefill chunk ([1, T, K] with T > 1)."""
    return x.shape[0] if x.dim() == 2 or x.shape[-2] == 1 else 0


def wants_dense_copy(dense_bytes: int, device) -> bool:
    """Whether quantized Linears whose dense weights total `dense_bytes` keep a dense copy: on CPU
    only (GPU kernels batch well) and only when it is small next to what the machine has."""
    return torch.device(device).type == "cpu" and dense_bytes <= DENSE_COPY_MAX_BYTES


KERNEL_ALIGN = 64  # bytes: the CPU kernels use aligned vector loads on their weights and scales


def kernel_ready(t: Tensor) -> Tensor:
    """`t` as the quantized matmul kernels need it: contiguous and 64-byte aligned.

    safetensors (mmap) and other loaders may hand back views at any offset in a file; the CPU
    kernels then crash the process (SIGSEGV) instead of raising.  PyTorch's allocator aligns every
    fresh buffer, so a copy is enough, and it is made only when needed."""
    if t.is_contiguous() and t.data_ptr() % KERNEL_ALIGN == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def pack_int4(q: Tensor, device: torch.device, inner_k_tiles: int = 8) -> Tensor:
    """q [N, K] uint8 values 0..15 -> the kernel's packed layout on `device`."""
    if device.type == "cuda":
        packed_pairs = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8).to(device)
        return torch.ops.aten._convert_weight_to_int4pack(packed_pairs, inner_k_tiles)
    # row blocks pack independently on CPU; chunking keeps the int32 staging copy small
    return torch.cat([torch.ops.aten._convert_weight_to_int4pack_for_cpu(q[i:i + ROWS_PER_CHUNK].to(torch.int32), 2)
                      for i in range(0, q.shape[0], ROWS_PER_CHUNK)])


class Int8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.empty(out_features))
        self.register_buffer("dense", None, persistent=False)      # see the module docstring
        self.packed: int | None = None                              # or prepacked: keep_dense
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def load_float(self, w: Tensor, dtype: torch.dtype, dense: bool = False):
        self.load_quantized(QTensor(8, *quantize_int8(w)), w.device, dtype, dense)

    def load_quantized(self, qt: QTensor, device, dtype: torch.dtype, dense: bool = False):
        self.weight = kernel_ready(qt.q.to(device))
        self.scales = kernel_ready(qt.scales.to(device=device, dtype=dtype))
        keep_dense(self, qt.dequantize().to(device=device, dtype=dtype) if dense else None)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        rows = x2.shape[0]
        if has_dense(self) and decode_rows(x) >= DENSE_MIN_ROWS:
            y = dense_linear(self, x2)
        elif rows >= DEQUANT_MIN_ROWS and x.device.type == "cpu":
            y = F.linear(x2, self.weight.to(x.dtype)) * self.scales
        else:
            y = torch.ops.aten._weight_int8pack_mm(kernel_ready(x2), self.weight, self.scales)
        y = y.reshape(*shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y


class Int4Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("weight", torch.empty(0, dtype=torch.uint8))
        self.register_buffer("scales_and_zeros", torch.empty(in_features // group_size, out_features, 2))
        self.register_buffer("dense", None, persistent=False)      # see the module docstring
        self.packed: int | None = None                              # or prepacked: keep_dense
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def load_float(self, w: Tensor, dtype: torch.dtype, dense: bool = False):
        self.load_quantized(QTensor(4, *quantize_int4(w, self.group_size), self.group_size), w.device, dtype, dense)

    def load_quantized(self, qt: QTensor, device, dtype: torch.dtype, dense: bool = False):
        device = torch.device(device)
        packed = qt.packed if qt.packed is not None and device.type == "cpu" else pack_int4(qt.q, device)
        self.weight = kernel_ready(packed)
        self.scales_and_zeros = kernel_ready(qt.scales.to(device=device, dtype=dtype))
        keep_dense(self, qt.dequantize().to(device=device, dtype=dtype) if dense else None)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = kernel_ready(x.reshape(-1, shape[-1]))
        if has_dense(self) and decode_rows(x) >= DENSE_MIN_ROWS:
            y = dense_linear(self, x2)
        elif x.is_cuda:
            y = torch.ops.aten._weight_int4pack_mm(x2, self.weight, self.group_size, self.scales_and_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.weight, self.group_size, self.scales_and_zeros)
        y = y.reshape(*shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y


def quantizable(name: str, qc: QuantConfig) -> bool:
    return name.startswith("layers.") or (qc.output_layer and name == "output")


def int4_fits(out_features: int, in_features: int, group_size: int) -> bool:
    """The int4 kernels need whole groups along K and output rows in multiples of 16."""
    return in_features % group_size == 0 and out_features % 16 == 0 and in_features % 32 == 0


def module_for(qt: QTensor, bias: bool) -> nn.Module:
    """An empty quantized Linear shaped for `qt`."""
    N, K = qt.shape
    return Int8Linear(K, N, bias) if qt.bits == 8 else Int4Linear(K, N, bias, qt.group_size)


def replace_linears(model: nn.Module, qc: QuantConfig) -> list[str]:
    """Swap eligible nn.Linear modules (still on the meta device) for quantized ones.

    int4 needs the input width to be a multiple of the group size (and output rows in multiples of
    16); a layer where it is not falls back to int8 (named in the returned list)."""
    fallbacks = []
    if qc.bits == 0:
        return fallbacks
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, nn.Linear) or not quantizable(name, qc):
            continue
        bias = mod.bias is not None
        if qc.bits == 4 and int4_fits(mod.out_features, mod.in_features, qc.group_size):
            new = Int4Linear(mod.in_features, mod.out_features, bias, qc.group_size)
        else:
            if qc.bits == 4:
                fallbacks.append(name)
            new = Int8Linear(mod.in_features, mod.out_features, bias)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new.to("meta"))
    return fallbacks


def is_quantized(module: nn.Module) -> bool:
    return isinstance(module, (Int8Linear, Int4Linear))


__all__ = ["wants_dense_copy", "PackedLinear", "prepack_linears", "has_dense", "dense_linear", "keep_dense", "QuantConfig", "QTensor", "module_for", "Int8Linear", "Int4Linear", "replace_linears", "quantize_int8", "quantize_int4",
           "dequantize_int4", "is_quantized"]
