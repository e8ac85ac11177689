"""Chat templates shipped inside GGUF files (Jinja, as Hugging Face defines them), applied at
the level of token ids.

The template is rendered in Jinja's sandbox with a unique placeholder in place of each
message's content.  The text the template itself produces (trusted: it comes with the model)
is tokenized with special-token recognition, so `<|im_start|>` becomes its id; the messages'
content (untrusted) is tokenized as plain text, so a user typing `<|im_start|>` gets ordinary
pieces.
"""

from __future__ import annotations

import json
import re
import secrets

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import CheckpointError, GlmkitError
from ..tokenizers.streaming import IncrementalDecoder
from .formats import ReplyEvent
from .messages import validate_messages
from .tool_calls import ToolCall

ROLES = ("system", "user", "assistant", "tool")
# how a template model is asked to write a call (chat.protocols' tagged convention)
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"


def tool_call_text(call: ToolCall) -> str:
    """A call as a template model writes it (for an API client's assistant `tool_calls`)."""
    body = json.dumps({"name": call.name, "arguments": call.arguments}, ensure_ascii=False)
    return f"{TOOL_CALL_OPEN}\n{body}\n{TOOL_CALL_CLOSE}"


class TemplateFormat:
    name = "template"

    def __init__(self, tokenizer, template: str):
        self.tok = tokenizer
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        try:
            self.template = env.from_string(template)
        except TemplateError as e:
            raise CheckpointError(f"the model's chat template does not parse: {e}") from None
        # longest first so that '<|im_start|>' wins over any shorter special it contains
        specials = sorted(tokenizer.specials, key=len, reverse=True)
        self._special_re = re.compile("(" + "|".join(map(re.escape, specials)) + ")") if specials else None
        # the end-of-turn ids: the tokenizer's eos, those the checkpoint's generation_config.json
        # names, and the usual end-of-turn markers
        stops = {tokenizer.eos_id, *getattr(tokenizer, "stop_ids", ())} - {None}
        for name in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>"):
            if name in tokenizer.specials:
                stops.add(tokenizer.specials[name])
        self.stop_ids = frozenset(stops)

    def encode(self, messages: list[dict]) -> list[int]:
        msgs = validate_messages(messages, roles=ROLES + ("observation",))
        marks = []
        rendered_msgs = []
        for m in msgs:
            mark = f"\x00glmkit-{secrets.token_hex(8)}\x00"
            marks.append((mark, m["content"]))
            role = "tool" if m["role"] == "observation" else m["role"]
            rendered_msgs.append({"role": role, "content": mark})
        try:
            text = self.template.render(messages=rendered_msgs, add_generation_prompt=True,
                                        bos_token=getattr(self.tok, "bos_token", None) or "",
                                        eos_token=getattr(self.tok, "eos_token", None) or "")
        except TemplateError as e:
            raise GlmkitError(f"the model's chat template rejected the conversation: {e}") from None
        # The template's own text is split at its special tokens, which become ids; each run of text
        # between them, message content included, is encoded whole, as transformers'
        # apply_chat_template encodes it (pieces may merge across a content boundary).  Special
        # tokens are looked for in the template's text only, never in the content.
        ids: list[int] = []
        run: list[str] = []
        rest = text
        for mark, content in marks + [(None, None)]:
            if mark is not None and mark not in rest:
                if mark.strip("\x00") in text:     # there, but changed (or out of order)
                    raise GlmkitError("the model's chat template alters message content; glmkit cannot apply it safely")
                continue                           # the template leaves this message out (e.g. a system message)
            before, rest = rest.split(mark, 1) if mark is not None else (rest, "")
            parts = self._special_re.split(before) if self._special_re else [before]
            for part in parts:
                if part in self.tok.specials:
                    ids += self.tok.encode("".join(run)) + [self.tok.specials[part]]
                    run = []
                elif part:
                    run.append(part)
            if content:
                run.append(content)
        return ids + self.tok.encode("".join(run))

    def reply_parser(self) -> "PlainReplyParser":
        return PlainReplyParser(self.tok)


def _raise(message):
    raise TemplateError(message)


class PlainReplyParser:
    """A reply with no protocol inside: all visible text is content."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.decoder = IncrementalDecoder(tokenizer, getattr(tokenizer, "strip_leading_space", False))
        self.text = ""
        self.started = False

    def feed(self, token_id: int) -> list[ReplyEvent]:
        events = [] if self.started else [ReplyEvent("segment", metadata="")]
        self.started = True
        piece = "" if self.tok.is_special(token_id) else self.decoder.feed(token_id)
        self.text += piece
        return events + ([ReplyEvent("text", piece)] if piece else [])

    def finish(self) -> list[ReplyEvent]:
        piece = self.decoder.flush()
        self.text += piece
        return [ReplyEvent("text", piece)] if piece else []

    def messages(self) -> list[dict]:
        return [{"role": "assistant", "content": self.text}]
