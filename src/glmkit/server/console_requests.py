"""The console's request bodies (strict: its own page is the only client) and how a conversation
is named: its title from the first message, an export's file name from the title."""

from __future__ import annotations

import re
from copy import copy
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .openai_requests import SamplingFields

MODES = ("chat", "tool", "code", "knowledge")
TITLE_MAX, CONTENT_MAX, SYSTEM_MAX = 200, 100_000, 20_000
_API = SamplingFields.model_fields      # the API's sampling fields: the same types and bounds here


class _Strict(BaseModel):
    # the console's own page is the client: a field it does not know is a mistake, said so;
    # no number may be infinite or NaN (the JSON decoder refuses them before this, too)
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ConsoleSettings(_Strict):
    """A conversation's settings.  None (or absent): the default.  max_new_tokens is further
    limited by the server's --max-tokens, which this model does not know (see `checked`)."""
    temperature: float | None = copy(_API["temperature"])
    top_p: float | None = copy(_API["top_p"])
    top_k: int | None = copy(_API["top_k"])
    repetition_penalty: float | None = copy(_API["repetition_penalty"])
    max_new_tokens: int | None = copy(_API["max_tokens"])
    system: str | None = Field(None, max_length=SYSTEM_MAX)    # the system prompt (Chat mode)


MODEL_NAME = Field(None, max_length=200)      # one of the server's models (`serve --models`); None: as before


class NewConversation(_Strict):
    title: str = Field("New conversation", max_length=TITLE_MAX)
    mode: Literal["chat", "tool", "code", "knowledge"] = "chat"
    model: str | None = MODEL_NAME
    settings: ConsoleSettings = Field(default_factory=ConsoleSettings)


class ConversationPatch(_Strict):
    title: str | None = Field(None, max_length=TITLE_MAX)
    settings: ConsoleSettings | None = None                          # replaces them all
    mode: Literal["chat", "tool", "code", "knowledge"] | None = None              # only while it has no messages


class Run(_Strict):
    code: str = Field(min_length=1, max_length=CONTENT_MAX)


class Send(_Strict):
    content: str | None = Field(None, max_length=CONTENT_MAX)
    regenerate: bool = False          # drop the last assistant turn and answer again
    edit_seq: int | None = Field(None, ge=1, le=2**53)   # replace the user message at this seq and answer again
    settings: ConsoleSettings = Field(default_factory=ConsoleSettings)
    model: str | None = MODEL_NAME    # the header's model picker: it answers this and later turns
    kb: str | None = Field(None, min_length=1, max_length=64)   # Knowledge mode: the owner's knowledge base it answers from


def title_of(content: str) -> str:
    """A new conversation's title: the first line of its first message with words in it, not
    a code fence, and without Markdown's heading and emphasis marks."""
    for line in content.splitlines():
        line = line.strip()
        if line.startswith(("```", "~~~")):
            continue
        line = re.sub(r"^(#+|>|[-*+]|\d+\.)\s+", "", line).replace("**", "").strip()
        if re.search(r"\w", line):
            return line[:60]
    return "New conversation"


def slug(title: str) -> str:
    """An export's file name from its conversation's title: "Trip to Paris!" -> trip-to-paris."""
    s = re.sub(r"[^\w]+", "-", title.lower(), flags=re.UNICODE).strip("-_")[:60].strip("-_")
    return s or "conversation"
