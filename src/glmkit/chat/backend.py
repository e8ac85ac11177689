"""What the chat layer needs from whatever generates tokens: the Backend seam.

Defined here, by its consumer, so the engine never imports the chat layer: engine.LocalBackend
(the model in this process) has this shape, and a remote engine would be another implementation.
Everything here is token ids and torch-free types from engine/requests.py."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Protocol

from ..engine.requests import SamplingParams, TokenEvent

if TYPE_CHECKING:
    from ..tokenizers.base import Tokenizer
    from .formats import ChatFormat


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
