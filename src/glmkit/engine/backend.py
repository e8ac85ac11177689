"""LocalBackend: the model in this process, generating through its Scheduler.

It satisfies the chat layer's Backend protocol (chat/backend.py) by shape; the engine does not
import the chat layer, so the chat format it carries is opaque here."""

from __future__ import annotations

from collections.abc import Sequence

from .requests import GenerationRequest, SamplingParams
from .scheduler import Handle, Scheduler


class LocalBackend:
    """A Backend over a Scheduler in this process."""

    def __init__(self, scheduler: Scheduler, tokenizer, chat_format, model_id: str, adapter: int = 0):
        """`adapter`: the index of the LoRA adapter (in the model's LoraSet) every sequence submitted
        here runs with, 0 for the base model: one Backend per served model id, several per scheduler."""
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.chat_format = chat_format      # the chat layer's ChatFormat, carried for it
        self.model_id = model_id
        self.adapter = adapter

    @property
    def context_length(self) -> int:
        return self.scheduler.max_seq_len

    def submit(self, prompt: Sequence[int], params: SamplingParams, stop_ids: frozenset[int],
               max_new_tokens: int | None = None, logprobs: int | None = None,
               forced_prefix: Sequence[int] = ()) -> Handle:
        return self.scheduler.submit(GenerationRequest(list(prompt), params, max_new_tokens, frozenset(stop_ids),
                                                       logprobs, tuple(forced_prefix), self.adapter))
