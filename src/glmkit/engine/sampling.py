"""Turning logits into the next token: repetition penalty, temperature, top-k, top-p.

Applied in the order Hugging Face's `generate` applies them, which is what ChatGLM3's official
defaults were tuned with.  Temperature 0 means greedy.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .requests import SamplingParams


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


CANDIDATES = (64, 1024)  # nucleus search: this many most likely tokens first, then more, then a full sort


def _draw(probs: Tensor, generator: torch.Generator | None) -> int:
    """Index drawn with probability proportional to `probs` (which need not sum to 1): one uniform
    number against the running total.  (An exponential race, argmax p / E with E ~ Exp(1), draws
    as many random numbers as there are tokens: 1 ms of a step per sequence over a 49k vocabulary,
    against ~30 us for the running total.)"""
    total = probs.cumsum(-1)
    u = torch.rand((), generator=generator) * total[-1]
    return min(int(torch.searchsorted(total, u, right=True)), probs.shape[-1] - 1)


def _top(logits: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """The n largest logits, most likely first and equal values by token id, as argmax breaks ties:
    a filter that keeps one token then picks greedy's token (half-precision logits tie often)."""
    vals, idx = torch.topk(logits, n)
    by_id = torch.argsort(idx)
    order = torch.sort(vals[by_id], descending=True, stable=True).indices
    return vals[by_id][order], idx[by_id][order]


def sample_row(logits: Tensor, params: SamplingParams, seen: Tensor, generator: torch.Generator | None) -> int:
    """Pick the next token for one sequence. logits: [V] float32.

    Exact top-k/top-p without sorting the vocabulary in the common case: the nucleus is taken
    from the CANDIDATES most likely tokens when they already hold top_p of the mass, and from a
    full sort only when they do not."""
    logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return int(logits.argmax())
    logits = logits / params.temperature
    V = logits.shape[-1]
    k = min(params.top_k, V) if params.top_k else 0
    if not k and params.top_p >= 1.0:
        return _draw(logits.softmax(-1), generator)
    if k:
        vals, idx = _top(logits, k)                                    # most likely first
        probs = vals.softmax(-1)                                       # top-k renormalizes first
    else:
        lse = torch.logsumexp(logits, -1)
        for n in CANDIDATES:
            vals, idx = _top(logits, min(n, V))
            probs = (vals - lse).exp()                                 # shares of the whole vocabulary
            if float(probs.sum()) >= params.top_p or n >= V:
                break
        else:                                                          # nucleus wider than the candidates
            filtered = filter_top_k_top_p(logits, 0, params.top_p)
            return _draw(filtered.softmax(-1), generator)
    if params.top_p < 1.0:
        before = probs.cumsum(-1) - probs                              # mass of more likely tokens
        keep = before < params.top_p * float(probs.sum()) if k else before < params.top_p
        keep[0] = True
        probs = probs * keep
    return int(idx[_draw(probs, generator)])


def remember(seen: torch.Tensor, tok: int) -> torch.Tensor:
    """`seen` (the ids repetition_penalty applies to) with `tok` added, without duplicates."""
    return seen if (seen == tok).any() else torch.cat([seen, torch.tensor([tok], dtype=seen.dtype)])
