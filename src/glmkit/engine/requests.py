"""What goes into the engine and what comes out, with no torch: sampling parameters, a request,
its token events, and the one budget rule.  The chat layer and the server import these; only the
engine's own modules touch tensors."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from ..errors import ContextLengthError, GlmkitError

# A reply's length when the caller names none (the terminal, the console, the API), within the
# context and any server limit.
DEFAULT_MAX_NEW_TOKENS = 1024


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen; checked once, when built, and immutable after that."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                  # 0 = off
    repetition_penalty: float = 1.0
    seed: int | None = None
    # tokens generated after any forced prefix must follow this grammar (engine/grammar.py): a
    # compiled, immutable object whose matcher() gives each row its own place in it
    grammar: object | None = None

    def __post_init__(self):
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise GlmkitError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise GlmkitError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise GlmkitError(f"top_k must be >= 0, got {self.top_k}")
        if not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise GlmkitError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        # what torch.Generator.manual_seed takes; beyond it the sampler would raise mid-request
        if self.seed is not None and not -2**63 <= self.seed < 2**64:
            raise GlmkitError(f"seed must be a 64-bit integer, got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class EventStream:
    """What every token stream (engine/sequence.py's Handle, engine/remote.py's RemoteStream) does
    with its own get() and cancel(): iterate every event, blocking, through the one with
    `finish`; leaving early cancels."""

    def get(self, timeout: float | None = None) -> TokenEvent: ...
    def cancel(self) -> None: ...

    def __iter__(self) -> Iterator[TokenEvent]:
        try:
            while True:
                ev = self.get()
                yield ev
                if ev.finish:
                    return
        finally:
            self.cancel()


class QueueFull(GlmkitError):
    """More requests are waiting than the scheduler accepts (HTTP 429)."""


@dataclass
class GenerationRequest:
    """One sequence to generate: token ids in, token ids out."""
    prompt: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    max_new_tokens: int | None = None     # None: as many as the context leaves
    stop_ids: frozenset[int] = frozenset()
    logprobs: int | None = None           # None, or report the chosen token's logprob and the top k (0: none)
    # The one constrained-decoding seam: the first generated tokens are these (the model still
    # runs on them).  Tests use it to make a tiny random model write tool calls.
    forced_prefix: Sequence[int] = ()
    # the LoRA adapter this sequence runs with, served unmerged (models/lora.py): 0 = none, k = the
    # model's k-th; the Backend of a `<base>:<name>` model id sets it, the engine never sees names
    adapter: int = 0


@dataclass
class TokenEvent:
    token: int
    finish: str | None = None          # "stop" (a stop id) or "length" on the last event
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


def budget(prompt_tokens: int, max_new_tokens: int | None, limit: int) -> int:
    """The one budget rule: prompt and reply together fit in `limit` tokens.  How many tokens may
    be generated (at most `max_new_tokens`), or ContextLengthError when the prompt leaves no room."""
    if max_new_tokens is not None and max_new_tokens < 1:
        raise GlmkitError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if prompt_tokens >= limit:
        raise ContextLengthError(f"the prompt is {prompt_tokens} tokens but the context limit is {limit} tokens "
                                 "(prompt and reply together); shorten the prompt or drop earlier turns",
                                 prompt_tokens, limit)
    room = limit - prompt_tokens
    return room if max_new_tokens is None else min(max_new_tokens, room)


