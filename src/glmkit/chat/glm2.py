"""ChatGLM2-6B (and -32k, CodeGeeX2-6B): ChatGLM3's blocks, an older prompt.

The facts, from the original `tokenization_chatglm.py` / `modeling_chatglm.py` of chatglm2-6b
(nothing of it is imported): the prompt is plain text,

    [Round 1]\\n\\n问：{query}\\n\\n答：{response}\\n\\n[Round 2]\\n\\n问：{query}\\n\\n答：

encoded with SentencePiece as one string after the two prefix ids `[gMASK]` `sop`; generation ends
at `</s>` only; the reply is the decoded text, stripped.  There are no role tokens and no tool
protocol, so tools use the tagged convention (chat/protocols.py), and what has no slot in that
prompt goes where the original demos put it:
- system messages are joined and set before the first question, on lines of their own;
- a tool or observation result is the next round's question ("Observation: ...").
"""

from __future__ import annotations

from ..errors import GlmkitError
from .messages import validate_messages
from .template import PlainReplyParser

ROLES = ("system", "user", "assistant", "observation", "tool")


class GLM2Format:
    name = "chatglm2"

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.prefix = [tokenizer.special_id("[gMASK]"), tokenizer.special_id("sop")]
        self.stop_ids = frozenset({tokenizer.eos_id})

    def prompt_text(self, messages: list[dict]) -> str:
        msgs = validate_messages(messages, roles=ROLES)
        system = "\n".join(m["content"] for m in msgs if m["role"] == "system" and m["content"])
        rounds: list[list[str]] = []          # [question, answer so far]
        for m in msgs:
            if m["role"] == "system":
                continue
            if m["role"] == "assistant":
                if not rounds:
                    raise GlmkitError("a ChatGLM2 conversation starts with a user message")
                rounds[-1][1] = (rounds[-1][1] or "") + m["content"]     # several segments: one answer
                continue
            text = m["content"] if m["role"] == "user" else f"Observation: {m['content']}"
            rounds.append([text, None])
        if not rounds or rounds[-1][1] is not None:
            raise GlmkitError("a ChatGLM2 conversation ends with a user message (or a tool result)")
        if system:
            rounds[0][0] = f"{system}\n\n{rounds[0][0]}"
        history = "".join(f"[Round {i}]\n\n问：{q}\n\n答：{a}\n\n" for i, (q, a) in enumerate(rounds[:-1], 1))
        return history + f"[Round {len(rounds)}]\n\n问：{rounds[-1][0]}\n\n答："

    def encode(self, messages: list[dict]) -> list[int]:
        return self.prefix + self.tok.encode(self.prompt_text(messages))

    def reply_parser(self) -> PlainReplyParser:
        return PlainReplyParser(self.tok)
