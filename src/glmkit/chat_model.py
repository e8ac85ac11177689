"""`glmkit.load()` and the object it returns: a checkpoint joined to its chat format and the
engine.  This is the Python API; the CLI and the server are thin layers over it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from .chat import chat_format_for
from .chat.formats import ReplyEvent
from .engine import GenerationRequest, SamplingParams, StopStrings, generate_batch
from .engine.generate import budget
from .errors import ContextLengthError
from .models import Checkpoint, load_checkpoint
from .models.quantize import QuantConfig

# Sampling defaults per family: ChatGLM3's official chat() values; SmolLM2's model card.
DEFAULT_SAMPLING = {
    "chatglm": dict(temperature=0.8, top_p=0.8, top_k=0, repetition_penalty=1.0),
    "llama": dict(temperature=0.2, top_p=0.9, top_k=0, repetition_penalty=1.1),
}


@dataclass
class Reply:
    """Filled in while a reply streams; complete once iteration ends."""
    messages: list[dict] = field(default_factory=list)
    finish_reason: str | None = None      # "stop" or "length"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)


class ChatModel:
    def __init__(self, checkpoint: Checkpoint):
        self.checkpoint = checkpoint
        self.model = checkpoint.model
        self.tokenizer = checkpoint.tokenizer
        self.config = checkpoint.config
        self.format = chat_format_for(checkpoint)
        self.name = checkpoint.config.name
        self.context_length = checkpoint.config.context_length
        self.default_sampling = dict(DEFAULT_SAMPLING.get(checkpoint.config.family, DEFAULT_SAMPLING["llama"]))

    # -- token level -----------------------------------------------------------------------
    def encode_chat(self, messages: list[dict]) -> list[int]:
        return self.format.encode(messages)

    def _requests(self, prompts, max_new_tokens, max_length, stop_ids, params) -> list[GenerationRequest]:
        stops = self.format.stop_ids if stop_ids is None else frozenset(stop_ids)
        return [GenerationRequest(list(p), params, budget(len(p), max_new_tokens, max_length, self.context_length), stops)
                for p in prompts]

    def params(self, **overrides) -> SamplingParams:
        merged = {**self.default_sampling, **{k: v for k, v in overrides.items() if v is not None}}
        return SamplingParams(**merged).validate()

    def generate_batch(self, prompts: list[list[int]], max_new_tokens: int | None = 256,
                       max_length: int | None = None, stop_ids=None, **sampling) -> list[list[int]]:
        """New ids for each prompt (stop id excluded), all rows decoded together."""
        reqs = self._requests(prompts, max_new_tokens, max_length, stop_ids, self.params(**sampling))
        out: list[list[int]] = [[] for _ in prompts]
        for step in generate_batch(self.model, reqs):
            for row, tok, done in step:
                if not (done and done.reason == "stop"):
                    out[row].append(tok)
        return out

    def generate(self, ids: list[int], max_new_tokens: int | None = 256, max_length: int | None = None,
                 stop_ids=None, **sampling) -> list[int]:
        return self.generate_batch([ids], max_new_tokens, max_length, stop_ids, **sampling)[0]

    # -- chat level ------------------------------------------------------------------------
    def reply(self, messages: list[dict], max_new_tokens: int | None = None, max_length: int | None = None,
              stop: list[str] | None = None, reply: Reply | None = None, forced: list[int] | None = None,
              **sampling) -> Iterator[ReplyEvent]:
        """Stream the assistant's reply to `messages` as ReplyEvents; `reply` is filled in.

        `forced` constrains decoding to begin with these token ids (the model still runs)."""
        reply = reply if reply is not None else Reply()
        prompt = self.encode_chat(messages)
        [req] = self._requests([prompt], max_new_tokens, max_length, None, self.params(**sampling))
        req.forced = forced
        reply.prompt_tokens = len(prompt)
        parser = self.format.reply_parser()
        stops = StopStrings(stop)
        for step in generate_batch(self.model, [req]):
            for _, tok, done in step:
                reply.completion_tokens += 1
                reply.token_ids.append(tok)
                if not (done and done.reason == "stop"):
                    for ev in parser.feed(tok):
                        yield from self._filter(ev, stops)
                if done:
                    reply.finish_reason = done.reason
            if stops.hit:
                reply.finish_reason = "stop"
                break
        for ev in parser.finish():
            yield from self._filter(ev, stops)
        tail = stops.flush()
        if tail:
            yield ReplyEvent("text", tail)
        reply.messages = parser.messages()
        if stops.stops:
            for m in reply.messages:  # history keeps what the user saw
                cut = min((i for i in (m["content"].find(s) for s in stops.stops) if i >= 0), default=-1)
                if cut >= 0:
                    m["content"] = m["content"][:cut]

    @staticmethod
    def _filter(ev: ReplyEvent, stops: StopStrings):
        if ev.kind != "text":
            yield ev
            return
        text = stops.feed(ev.text)
        if text:
            yield ReplyEvent("text", text)

    def stream_chat(self, messages: list[dict], **kwargs) -> Iterator[str]:
        """Visible text of the reply, piece by piece."""
        for ev in self.reply(messages, **kwargs):
            if ev.kind == "text":
                yield ev.text

    def chat(self, messages: list[dict], **kwargs) -> tuple[str, list[dict]]:
        """(reply text, messages + the reply's messages) like the official chat()."""
        r = Reply()
        text = "".join(ev.text for ev in self.reply(messages, reply=r, **kwargs) if ev.kind == "text")
        return text, list(messages) + r.messages

    def fit(self, messages: list[dict], reserve: int, max_length: int | None = None) -> tuple[list[dict], int]:
        """Drop the oldest turns (keeping system messages and the last message) until the prompt
        leaves `reserve` tokens for the reply.  Returns (messages, number of messages dropped)."""
        limit = min(max_length or self.context_length, self.context_length)
        msgs = list(messages)
        dropped = 0
        while len(self.encode_chat(msgs)) + reserve > limit:
            idx = next((i for i, m in enumerate(msgs[:-1]) if m["role"] != "system"), None)
            if idx is None:
                n = len(self.encode_chat(msgs))
                raise ContextLengthError(f"the message is {n} tokens; with {reserve} reserved for the reply "
                                         f"it does not fit the limit of {limit}", n, limit)
            del msgs[idx]
            dropped += 1
        return msgs, dropped


def load(model=None, device: str = "cpu", dtype=None, progress: bool = False, quantize: str | None = None,
         group_size: int = 128, quantize_output: bool = False) -> ChatModel:
    """Load a ChatGLM3 directory, a GGUF file, or (model=None) the embedded default model.

    quantize: None/"auto" keeps the checkpoint's own precision (a GGUF file's Q4_0/Q4_1/Q8_0 blocks
    run on the int4/int8 kernels), "none" makes every weight float, "int8"/"int4" quantize Linear
    weights while loading (int4 in groups of `group_size` input columns; the output layer too
    with quantize_output=True)."""
    quant = QuantConfig.parse(quantize, group_size, quantize_output)
    return ChatModel(load_checkpoint(model, device=device, dtype=dtype, progress=progress, quant=quant))
