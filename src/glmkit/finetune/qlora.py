"""QLoRA on glmkit's int4 layers: the base stays int4 (models/quantize.py's Int4Linear, the same
kernel that serves), LoRA's A and B train in float32 beside it.

The int4 matmul kernels have no backward, and the frozen weights need none: only the gradient with
respect to the layer's input, so that it reaches the adapters of earlier layers.  That is
grad_x = grad_y · W, with W dequantized one slice at a time by running the layer's own kernel on
rows of the identity matrix (eye · Wᵀ = Wᵀ): exact with respect to the quantized weights the
forward pass used, whatever the kernel's packed layout, and never more than one layer's float
weight held at once.
"""

from __future__ import annotations

import torch
from peft.tuners.lora import Linear as LoraLinear

from ..models.quantize import Int4Linear

ROWS = 4096          # identity rows per slice when dequantizing for the backward pass


class _Int4Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, module):
        ctx.module = module
        with torch.no_grad():
            return Int4Linear.forward(module, x)

    @staticmethod
    def backward(ctx, grad):
        m = ctx.module
        wt = dequantized_t(m, grad.dtype)                         # [in, out]
        return (grad.reshape(-1, m.out_features) @ wt.t()).reshape(*grad.shape[:-1], m.in_features), None


def dequantized_t(m: Int4Linear, dtype) -> torch.Tensor:
    """Wᵀ [in, out] of an int4 layer, as its kernel computes with it."""
    dt = m.scales_and_zeros.dtype
    parts = []
    for i in range(0, m.in_features, ROWS):
        n = min(ROWS, m.in_features - i)
        eye = torch.zeros(n, m.in_features, dtype=dt, device=m.weight.device)
        eye[:, i:i + n] = torch.eye(n, dtype=dt, device=m.weight.device)
        y = Int4Linear.forward(m, eye)
        parts.append(y - m.bias.to(y.dtype) if m.bias is not None else y)
    return torch.cat(parts).to(dtype)


class TrainableInt4Linear(Int4Linear):
    """An Int4Linear whose output has a gradient with respect to its input."""

    def forward(self, x):
        if torch.is_grad_enabled() and x.requires_grad:
            return _Int4Matmul.apply(x, self)
        return super().forward(x)


def make_differentiable(model: torch.nn.Module) -> None:
    for m in model.modules():
        if type(m) is Int4Linear:
            m.__class__ = TrainableInt4Linear


class Int4LoraLinear(LoraLinear):
    """peft's LoRA Linear over an int4 base layer (registered with LoraConfig._register_custom_module);
    peft does not know the layer type, so its sizes are given here.  Merging into int4 is not
    supported: adapters are merged into float weights at load (models/adapters.py)."""

    def _get_in_out_features(self, module):
        return module.in_features, module.out_features
