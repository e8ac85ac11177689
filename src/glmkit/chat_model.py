"""`glmkit.load()` and the object it returns: a checkpoint joined to its chat format and the
engine.  This is the Python API; the CLI and the server are thin layers over it."""

from __future__ import annotations

import copy
import sys
import threading
from collections.abc import Iterator

from .chat import chat_format_for
from .chat.formats import ReplyEvent
from .chat.protocols import protocol_for
from .chat.reply_stream import Reply, ReplyStream
from .engine import LocalBackend, SamplingParams, Scheduler, budget
from .errors import ContextLengthError, GlmkitError
from .models import Checkpoint, load_checkpoint
from .models.quantize import QuantConfig

__all__ = ["ChatModel", "Reply", "load"]

# Sampling defaults per family: ChatGLM3's official chat() values; SmolLM2's model card.
DEFAULT_SAMPLING = {
    "chatglm": dict(temperature=0.8, top_p=0.8, top_k=0, repetition_penalty=1.0),
    "llama": dict(temperature=0.2, top_p=0.9, top_k=0, repetition_penalty=1.1),
}


class ChatModel:
    def __init__(self, checkpoint: Checkpoint, compile: bool = False, progress: bool = False):
        """`compile`: the engine decodes through a compiled step once it is compiled (in the
        background; engine/compiled_step.py); `progress`: say so on stderr when compiling starts."""
        self.checkpoint = checkpoint
        self.compile = compile
        self.progress = progress
        self.tokenizer = checkpoint.tokenizer
        self.config = checkpoint.config
        self.format = chat_format_for(checkpoint)
        self.protocol = protocol_for(self.format)      # how replies are shown and calls written
        self.name = checkpoint.config.name
        self.context_length = checkpoint.config.context_length
        self.default_sampling = dict(DEFAULT_SAMPLING.get(checkpoint.config.family, DEFAULT_SAMPLING["llama"]))
        self._backend: LocalBackend | None = None
        # a with_adapter() view: the model it is a view of, and the adapter's index in its LoraSet
        self._parent: ChatModel | None = None
        self._adapter = 0
        self.adapter: str | None = None
        self._vocabulary = None          # the vocabulary as the grammar library sees it (json_grammar)
        self._lock = threading.Lock()

    @classmethod
    def over(cls, checkpoint: Checkpoint, backend) -> ChatModel:
        """A model whose tokens come from `backend` (engine.remote.RemoteBackend: an engine in
        another process), with `checkpoint`'s tokenizer, config and chat format; its weights are
        not loaded here (models.loader.without_weights), and what needs them is refused."""
        view = cls(checkpoint)
        view._backend = backend
        # the engine may hold fewer tokens per sequence than the config says (RemoteBackend.check
        # lowers its context_length): what fit() drops old turns to fit is the engine's limit
        view.context_length = min(view.context_length, backend.context_length)
        return view

    @property
    def remote(self) -> bool:
        return self.checkpoint.model is None

    @property
    def model(self):
        """The Transformer, for what runs in this process; a clear error where it runs elsewhere."""
        if self.checkpoint.model is None:
            raise GlmkitError(self._elsewhere("the model's weights"))
        return self.checkpoint.model

    def _elsewhere(self, what: str) -> str:
        url = getattr(self._backend, "url", "another process")
        return f"{what} are not in this process: the model runs in the engine at {url}"

    # -- the engine ------------------------------------------------------------------------
    @property
    def backend(self) -> LocalBackend:
        """Everything this model generates goes through here: a continuous-batching Scheduler,
        made on first use (its KV cache grows with use; without a thread of its own, the threads
        waiting for tokens run its steps), or the one given to serve_with()."""
        with self._lock:
            if self._parent is not None:     # an adapter's view: the same scheduler, its own index
                base = self._parent.backend
                if self._backend is None or self._backend.scheduler is not base.scheduler:
                    self._backend = LocalBackend(base.scheduler, self.tokenizer, self.format, self.name, self._adapter)
                return self._backend
            if self._backend is None:        # (a remote model has had its backend from the start)
                self._use(Scheduler(self.model, max_queue=None, compile=self.compile,
                                    progress=self.compile_progress))
            return self._backend

    def start_compiling(self):
        """With compile=True: begin compiling the one-row decode step in the background now, rather
        than at the first reply (the terminal chat calls this while the user types)."""
        if self.compile and not self.remote:
            scheduler = self.backend.scheduler
            if scheduler.compiled is not None:
                scheduler.compiled.request(1)

    @property
    def compile_progress(self):
        """Where a compiled step says that it compiles: stderr with progress=True, else the log."""
        return _to_stderr if self.progress else None

    def serve_with(self, scheduler: Scheduler) -> LocalBackend:
        """Generate through `scheduler` (the server's, sized for its load) from now on; the
        previous one stops.  The KV cache lives in the model, so it has one scheduler at a time."""
        if self.remote:
            raise GlmkitError(self._elsewhere("the model's weights and KV cache"))
        if self._parent is not None:
            self._parent.serve_with(scheduler)
            return self.backend
        with self._lock:
            return self._use(scheduler)

    @property
    def adapters(self) -> list[str]:
        """The LoRA adapters this model serves unmerged (load(adapters=...)), by name."""
        lora = None if self.remote else self.checkpoint.model.lora
        return list(lora.names) if lora is not None else []

    def with_adapter(self, name: str) -> ChatModel:
        """This model generating with its LoRA adapter `name` (served unmerged, models/lora.py):
        same weights, tokenizer and format, the same scheduler (its sequences batch with the base
        model's and the other adapters'), named `<name of the model>:<adapter>`."""
        base = self._parent or self
        if name not in base.adapters:
            raise GlmkitError(f"no adapter {name!r}; this model serves "
                              f"{', '.join(base.adapters) or 'none'} (load(adapters={{name: DIR}}))")
        view = copy.copy(base)
        view._lock, view._backend, view._parent = threading.Lock(), None, base
        view._adapter, view.adapter = base.checkpoint.model.lora.index(name), name
        view.name = f"{base.name}:{name}"
        return view

    def with_backend(self, backend) -> ChatModel:
        """This model (same weights, tokenizer and format) generating through `backend` instead:
        a chat.scripted.ScriptedBackend in tests, or any other Backend wrapping this one's."""
        view = copy.copy(self)
        view._backend, view._lock, view._parent = backend, threading.Lock(), None
        return view

    def _use(self, scheduler: Scheduler) -> LocalBackend:
        if self._backend is not None and self._backend.scheduler is not scheduler:
            self._backend.scheduler.stop()
        self._backend = LocalBackend(scheduler, self.tokenizer, self.format, self.name)
        return self._backend

    # -- token level -----------------------------------------------------------------------
    def json_grammar(self, schema: dict, call: bool = False):
        """A grammar (for SamplingParams.grammar) that makes the reply one JSON value matching
        `schema`, written as this model's format writes a plain answer; with `call`, the rest of
        a tool call whose start was forced (its arguments, then the protocol's end of a call;
        None where the protocol's calls are not JSON).  GrammarError (with the reason) when the
        schema cannot be compiled."""
        from .engine.grammar import Vocabulary
        if self.remote:
            # the engine samples without our grammar: callers validate the reply instead, as they
            # do for replies that could not be constrained
            return None
        if call and self.protocol.call_suffix is None:
            return None
        with self._lock:
            if self._vocabulary is None:      # once per model: ~0.1 s for a 50k vocabulary
                self._vocabulary = Vocabulary(self.tokenizer, self.config.vocab_size, self.format.stop_ids)
        if call:
            return self._vocabulary.json_grammar(schema, suffix=self.protocol.call_suffix)
        return self._vocabulary.json_grammar(schema, self.protocol.json_prefix)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return self.format.encode(messages)

    def params(self, **overrides) -> SamplingParams:
        """This model's default sampling with `overrides` (None: the default), checked once."""
        merged = {**self.default_sampling, **{k: v for k, v in overrides.items() if v is not None}}
        return SamplingParams(**merged)

    def _params(self, params: SamplingParams | None, sampling: dict) -> SamplingParams:
        """An edge passes one SamplingParams; Python callers may pass keywords instead."""
        if params is None:
            return self.params(**sampling)
        if sampling:
            raise TypeError(f"pass either params= or sampling keywords, not both ({', '.join(sampling)})")
        return params

    def generate_batch(self, prompts: list[list[int]], max_new_tokens: int | None = 256,
                       max_length: int | None = None, stop_ids=None, params: SamplingParams | None = None,
                       **sampling) -> list[list[int]]:
        """New ids for each prompt (stop id excluded), decoded together by the scheduler."""
        params, backend = self._params(params, sampling), self.backend
        stops = self.format.stop_ids if stop_ids is None else frozenset(stop_ids)
        limit = backend.context_length if max_length is None else min(max_length, backend.context_length)
        budgets = [budget(len(p), max_new_tokens, limit) for p in prompts]   # every prompt checked before any runs
        handles = []
        try:
            for p, n in zip(prompts, budgets):
                handles.append(backend.submit(p, params, stops, n))
            return [[ev.token for ev in h if ev.finish != "stop"] for h in handles]
        finally:
            for h in handles:
                h.cancel()

    def generate(self, ids: list[int], max_new_tokens: int | None = 256, max_length: int | None = None,
                 stop_ids=None, params: SamplingParams | None = None, **sampling) -> list[int]:
        return self.generate_batch([ids], max_new_tokens, max_length, stop_ids, params, **sampling)[0]

    # -- chat level ------------------------------------------------------------------------
    def reply(self, messages: list[dict], max_new_tokens: int | None = None, max_length: int | None = None,
              stop: list[str] | None = None, reply: Reply | None = None,
              cancel: threading.Event | None = None, params: SamplingParams | None = None,
              **sampling) -> Iterator[ReplyEvent]:
        """Stream the assistant's reply to `messages` as ReplyEvents; `reply` is filled in.

        Sampling: `params` (a SamplingParams, as the CLI, the API and the console build once), or
        keywords (temperature=, top_p=, top_k=, repetition_penalty=, seed=) over this model's
        defaults.  `cancel`, once set, stops generation and raises chat.reply_stream.Cancelled."""
        yield from ReplyStream(self.backend, messages, self._params(params, sampling), max_new_tokens, max_length,
                               stop, reply=reply, cancel=cancel)

    def stream_chat(self, messages: list[dict], **kwargs) -> Iterator[str]:
        """Visible text of the reply, piece by piece (takes reply()'s arguments).  Shown as every
        edge shows it: a ChatGLM3 segment the model names (there are no tools here) comes under
        its `[name]`, and the text of a <tool_call> block is not shown."""
        return self.protocol.visible_text(self.reply(messages, **kwargs), set())

    def chat(self, messages: list[dict], **kwargs) -> tuple[str, list[dict]]:
        """(reply text, messages + the reply's messages) like the official chat()."""
        r = kwargs.pop("reply", None) or Reply()
        text = "".join(self.stream_chat(messages, reply=r, **kwargs))
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


def _to_stderr(line: str):
    print(f"glmkit: {line}", file=sys.stderr, flush=True)


def load(model=None, device: str = "cpu", dtype=None, progress: bool = False, quantize: str | None = None,
         group_size: int = 128, quantize_output: bool = False, compile: bool = False,
         adapter=None, adapters: dict | None = None) -> ChatModel:
    """Load a ChatGLM3 directory, a GGUF file, or (model=None) the embedded default model.

    quantize: None/"auto" keeps the checkpoint's own precision (a GGUF file's Q4_0/Q4_1/Q8_0 blocks
    run on the int4/int8 kernels), "none" makes every weight float, "int8"/"int4" quantize Linear
    weights while loading (int4 in groups of `group_size` input columns; the output layer too
    with quantize_output=True).

    compile: decode through a compiled step (torch.compile; engine/compiled_step.py), each batch size
    compiled in a background thread when first needed while the eager step serves.  Off by default
    here: it needs a C++ compiler, costs a minute of CPU the first time, and its tokens may differ
    from the eager step's by rounding in bfloat16 (the `glmkit` commands turn it on).

    adapter: a LoRA adapter directory (peft's layout: adapter_config.json + adapter_model.safetensors,
    as `glmkit finetune` or peft writes it for ChatGLM3), merged into the weights as they load, before
    any quantization (models/adapters.py); one made for another base model is refused.  Or a P-tuning
    v2 checkpoint of the official demo (config.json with pre_seq_len), whose prefix keys and values sit
    in the KV cache before every sequence (models/ptuning.py).

    adapters: {name: LoRA adapter directory}, kept unmerged beside the (possibly quantized) weights
    and chosen per sequence (models/lora.py): `model.with_adapter(name)` generates with one, in the
    same batches as the base model and the other adapters."""
    quant = QuantConfig.parse(quantize, group_size, quantize_output)
    return ChatModel(load_checkpoint(model, device=device, dtype=dtype, progress=progress, quant=quant,
                                     adapter=adapter, adapters=adapters),
                     compile=compile, progress=progress)
