"""The seam between the chat layer and whatever generates tokens.

The chat layer (chat/reply_stream.py) turns messages into prompt ids with the backend's chat
format, submits them, and reads TokenEvents back; it never touches torch.  LocalBackend is the
model in this process, generating through its Scheduler; a remote engine would be another
implementation of the same two protocols.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Protocol

from .sampling import SamplingParams
from .scheduler import GenerationRequest, Handle, Scheduler, TokenEvent

if TYPE_CHECKING:
    from ..chat.formats import ChatFormat
    from ..tokenizers.base import Tokenizer


class TokenStream(Protocol):
    """One submitted sequence, as its caller sees it."""

    def __iter__(self) -> Iterator[TokenEvent]:
        """Every event, blocking, through the one with `finish` set; leaving early cancels."""

    def get(self, timeout: float | None = None) -> TokenEvent:
        """The next event; raises queue.Empty after `timeout` seconds without one, and re-raises
        an engine failure."""

    def get_nowait(self) -> TokenEvent: ...

    def on_event(self, callback) -> None:
        """Call `callback()` (from the engine's thread) whenever an event is ready."""

    def cancel(self) -> None:
        """Stop generating and free the engine's resources; a no-op once finished."""


class Backend(Protocol):
    model_id: str
    tokenizer: Tokenizer
    chat_format: ChatFormat       # messages -> prompt ids, stop ids, reply parser
    context_length: int           # most tokens of prompt + reply one sequence may hold

    def submit(self, prompt: Sequence[int], params: SamplingParams, stop_ids: frozenset[int],
               max_new_tokens: int | None = None, logprobs: int | None = None,
               forced_prefix: Sequence[int] = ()) -> TokenStream:
        """Start generating after `prompt`.  Ends at a stop id (finish "stop", the id is the last
        event) or after `max_new_tokens` (None: as many as context_length leaves; finish "length").
        `logprobs`: None, or report the chosen token's logprob and the top k.  `forced_prefix`:
        the first tokens must be these (testing seam).  Raises ContextLengthError when the prompt
        leaves no room, QueueFull when the engine is saturated."""


class LocalBackend:
    """A Backend over a Scheduler in this process."""

    def __init__(self, scheduler: Scheduler, tokenizer: Tokenizer, chat_format: ChatFormat, model_id: str):
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.chat_format = chat_format
        self.model_id = model_id

    @property
    def context_length(self) -> int:
        return self.scheduler.max_seq_len

    def submit(self, prompt: Sequence[int], params: SamplingParams, stop_ids: frozenset[int],
               max_new_tokens: int | None = None, logprobs: int | None = None,
               forced_prefix: Sequence[int] = ()) -> Handle:
        return self.scheduler.submit(GenerationRequest(list(prompt), params, max_new_tokens, frozenset(stop_ids),
                                                       logprobs, tuple(forced_prefix)))
