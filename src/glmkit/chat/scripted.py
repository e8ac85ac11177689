"""Scripted replies: a Backend wrapper that makes a model write given replies (testing aid).

Tests need a tiny random model, or the 135M default, to write tool calls and code; the engine's
one constrained-decoding seam is a request's `forced_prefix` (the model still runs on every
token, the choice is fixed).  ScriptedBackend is the only place that sets it for scripts: wrap a
model's backend (`model.with_backend(ScriptedBackend(model.backend, ...))`, or `glmkit serve
--scripted-replies FILE`) and everything above it, the agent, the API, the console, runs unchanged.

A script is the text a model would write: segments separated by '<|assistant|>', each starting
with its metadata line.  It ends the way the model ends such a reply: <|observation|> after a
tool or interpreter segment (ChatGLM3, GLM-4), else end-of-sequence."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence

from ..engine.requests import SamplingParams

# After the last user message a prompt holds only the assistant's turn marker ("" once special
# tokens are dropped, "assistant" in ChatML); a later round's prompt holds the reply and its
# observation, which are longer.
_MARKER_CHARS = 16


def scripted_reply_ids(tokenizer, text: str, chatglm: bool | None = None) -> list[int]:
    """Token ids of a scripted reply (chatglm: end tool segments with <|observation|>; None: from
    the tokenizer)."""
    if chatglm is None:
        chatglm = _is_chatglm(tokenizer)
    parts = text.split("<|assistant|>")
    ids: list[int] = []
    for i, part in enumerate(parts):
        if i:
            ids.append(tokenizer.special_id("<|assistant|>"))
        ids += tokenizer.encode(part)
    last_meta = parts[-1].split("\n", 1)[0].strip() if "\n" in parts[-1] else ""
    if chatglm and last_meta:
        return ids + [tokenizer.special_id("<|observation|>")]
    return ids + [tokenizer.eos_id]


def _is_chatglm(tokenizer) -> bool:
    try:
        tokenizer.special_id("<|observation|>")
        return True
    except Exception:
        return False


class ScriptedBackend:
    """A Backend that forces scripted replies, then passes everything else through.

    `replies`: token-id lists (or script texts) forced on successive generations, in order, then
    none.  `by_message`: {user message: script text}, forced on a generation whose prompt ends with
    that user message (the first round of a turn; later rounds end with an observation)."""

    def __init__(self, inner, replies: Sequence[Sequence[int] | str] = (), by_message: dict[str, str] | None = None):
        self.inner = inner
        self.model_id, self.tokenizer, self.chat_format = inner.model_id, inner.tokenizer, inner.chat_format
        self._queue = deque(self._ids(r) for r in replies)
        self._by_message = dict(by_message or {})
        self._lock = threading.Lock()

    @property
    def context_length(self) -> int:
        return self.inner.context_length

    def _ids(self, reply) -> list[int]:
        if not isinstance(reply, str):
            return list(reply)
        # a tool segment ends with <|observation|> where the format stops there (ChatGLM3, GLM-4;
        # not ChatGLM2, whose tokenizer has the id but whose prompt has no tool protocol)
        segments = _is_chatglm(self.tokenizer) and \
            self.tokenizer.special_id("<|observation|>") in getattr(self.chat_format, "stop_ids", ())
        return scripted_reply_ids(self.tokenizer, reply, chatglm=segments)

    def script_for(self, prompt: Sequence[int]) -> list[int]:
        with self._lock:
            if self._queue:
                return self._queue.popleft()
        if not self._by_message:
            return []
        text = self.tokenizer.decode(list(prompt))
        best = None       # the message the prompt ends with: the one leaving the least text after it
        for message, reply in self._by_message.items():
            at = text.rfind(message)
            if at < 0 or (at and not text[at - 1].isspace()):     # a message starts its turn
                continue
            rest = len(text[at + len(message):].strip())
            if rest <= _MARKER_CHARS and (best is None or rest < best[0]):
                best = (rest, reply)
        return self._ids(best[1]) if best else []

    def submit(self, prompt: Sequence[int], params: SamplingParams, stop_ids: frozenset[int],
               max_new_tokens: int | None = None, logprobs: int | None = None, forced_prefix: Sequence[int] = ()):
        # a caller's own prefix (a named tool_choice's start of the call) comes first; the script continues it
        forced = list(forced_prefix) + self.script_for(prompt)
        return self.inner.submit(prompt, params, stop_ids, max_new_tokens, logprobs, forced)
