"""The decode loop: prefill a batch of prompts, then one token per row per step from the KV cache.

Rows are independent sequences (see models/transformer.py); a row stops on one of its stop ids
or at its token budget while the others go on.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ..errors import ContextLengthError, GlmkitError
from ..models.transformer import Transformer
from .sampling import SamplingParams, remember, sample_row


@dataclass
class GenerationRequest:
    prompt: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    max_new_tokens: int = 256
    stop_ids: frozenset[int] = frozenset()
    logprobs: int | None = None       # scheduler only: None, or report the chosen token's and the top k
    forced: list[int] | None = None   # constrained decoding: the first tokens must be these


@dataclass
class Finished:
    reason: str           # "stop" (a stop id) or "length"


def budget(prompt_len: int, max_new_tokens: int | None, max_length: int | None, context: int) -> int:
    """How many tokens may be generated after a prompt, or ContextLengthError."""
    limit = context if max_length is None else min(max_length, context)
    if prompt_len >= limit:
        raise ContextLengthError(
            f"the prompt is {prompt_len} tokens but the limit is {limit} (prompt + reply); "
            "shorten the conversation or raise max_length", prompt_len, limit)
    room = limit - prompt_len
    return room if max_new_tokens is None else max(0, min(max_new_tokens, room))


@torch.inference_mode()
def generate_batch(model: Transformer, requests: list[GenerationRequest]) -> Iterator[list[tuple[int, int, Finished | None]]]:
    """Yield, per step, (row, token, finished-or-None) for every row that produced a token.

    A row's stop token is yielded with Finished("stop"); its last token within budget with
    Finished("length").  The caller may stop iterating at any time (cancellation).
    """
    cfg = model.cfg
    for r in requests:
        if r.max_new_tokens < 1:
            raise GlmkitError(f"max_new_tokens must be at least 1, got {r.max_new_tokens}")
        budget(len(r.prompt), r.max_new_tokens, None, cfg.context_length)
        r.params.validate()
    B = len(requests)
    dev = model.device
    lengths = [len(r.prompt) for r in requests]
    cache_len = max(n + r.max_new_tokens for n, r in zip(lengths, requests))
    model.setup_caches(B, cache_len)
    tokens = torch.zeros((B, max(lengths)), dtype=torch.long)
    for b, r in enumerate(requests):
        tokens[b, :lengths[b]] = torch.tensor(r.prompt, dtype=torch.long)
    gens = []
    for r in requests:
        g = None
        if r.params.seed is not None:
            g = torch.Generator().manual_seed(r.params.seed)
        gens.append(g)
    seen = [torch.tensor(sorted(set(r.prompt)), dtype=torch.long) for r in requests]
    lens_t = torch.tensor(lengths, device=dev)
    logits = model(tokens.to(dev), torch.zeros(B, dtype=torch.long, device=dev), lens_t)
    pos = list(lengths)
    produced = [0] * B
    active = [True] * B
    while any(active):
        step = []
        logits_cpu = logits.float().cpu()
        next_tokens = [0] * B
        for b, r in enumerate(requests):
            if not active[b]:
                continue
            if r.forced and produced[b] < len(r.forced):
                tok = r.forced[produced[b]]
            else:
                tok = sample_row(logits_cpu[b], r.params, seen[b], gens[b])
            next_tokens[b] = tok
            produced[b] += 1
            if r.params.repetition_penalty != 1.0:
                seen[b] = remember(seen[b], tok)
            done = None
            if tok in r.stop_ids:
                done = Finished("stop")
            elif produced[b] >= r.max_new_tokens:
                done = Finished("length")
            step.append((b, tok, done))
            if done:
                active[b] = False
        yield step
        if not any(active):
            break
        # finished rows ride along as padding (length 0): their cache stays untouched
        logits = model(torch.tensor(next_tokens, device=dev)[:, None], torch.tensor(pos, device=dev),
                       torch.tensor(active, dtype=torch.long, device=dev))
        pos = [p + a for p, a in zip(pos, active)]
