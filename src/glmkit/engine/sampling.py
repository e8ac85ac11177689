"""Turning logits into the next token: repetition penalty, temperature, top-k, top-p.

Applied in the order Hugging Face's `generate` applies them, which is what ChatGLM3's official
defaults were tuned with.  Temperature 0 means greedy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                  # 0 = off
    repetition_penalty: float = 1.0
    seed: int | None = None

    def validate(self):
        from ..errors import GlmkitError
        if self.temperature < 0:
            raise GlmkitError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise GlmkitError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise GlmkitError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise GlmkitError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL-style: scores of tokens already in the sequence are divided (or, if negative,
    multiplied) by the penalty.  logits [V], seen: 1-D tensor of token ids."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    score = logits.gather(0, seen)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return logits.scatter(0, seen, score)


def filter_top_k_top_p(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """Mask (to -inf) every token outside the top-k and outside the top-p nucleus. logits [V]."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum <= (1 - top_p)
        drop_sorted[-1] = False  # always keep the most likely token
        logits = logits.masked_fill(drop_sorted.scatter(0, order, drop_sorted), float("-inf"))
    return logits


def sample_row(logits: Tensor, params: SamplingParams, seen: Tensor, generator: torch.Generator | None) -> int:
    """Pick the next token for one sequence. logits: [V] float32."""
    logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return int(logits.argmax())
    logits = filter_top_k_top_p(logits / params.temperature, params.top_k, params.top_p)
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))
