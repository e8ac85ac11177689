"""Ollama's HTTP API, one APIRouter: /api/chat, /api/generate, /api/tags, /api/show, /api/ps and
/api/version, so that Ollama's clients (the `ollama` Python package, tools that speak to Ollama)
work against `glmkit serve` unchanged.

A request becomes a prompt the way the OpenAI route makes one (protocol.api_messages, then the
model's chat format), is submitted through server.completions, and its one choice's reply stream
is shaped as Ollama shapes it: NDJSON lines with `done: false`, then a last line with
`done: true`, the done_reason and the counts and durations (nanoseconds); not streamed, that last
object carries the whole reply.  Every refusal is Ollama's `{"error": "message"}`: the server's
own exception handlers word it and OllamaRoute reshapes it, so the reasons match the OpenAI API's."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from .. import __version__
from ..chat.protocols import TaggedCallParser
from ..chat.template import PlainReplyParser
from ..errors import GlmkitError, GrammarError
from .completions import Choice, submit
from .errors import APIError, StrictJSONRoute
from .ollama_requests import ChatRequest, GenerateRequest, ShowRequest, _Generation
from .state import Server, ServerState


class OllamaRoute(StrictJSONRoute):
    """A route whose refusals are Ollama's `{"error": "message"}` with the same status.  Whatever the
    route or FastAPI raises (a bad body, an APIError, a full queue, a GlmkitError) goes to the app's
    own handler for it, so the wording is the server's one wording; only the shape changes."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def ollama_errors(request: Request):
            try:
                return await handler(request)
            except Exception as e:
                respond = next((request.app.exception_handlers[c] for c in type(e).__mro__
                                if c in request.app.exception_handlers), None)
                if respond is None:
                    raise                   # a fault: the Guard middleware logs it and answers 500
                return _ollama_error(await respond(request, e))
        return ollama_errors


def _ollama_error(response) -> JSONResponse:
    message = json.loads(response.body)["error"]["message"]
    headers = {k: v for k, v in response.headers.items() if k.lower() == "retry-after"}
    return JSONResponse({"error": message}, status_code=response.status_code, headers=headers)


router = APIRouter(route_class=OllamaRoute)
NDJSON = "application/x-ndjson"


@router.post("/api/chat")
async def chat(body: ChatRequest, server: Server):
    started = time.perf_counter_ns()
    server = _pick(body.model, server)
    if not body.messages:           # Ollama loads the model and answers at once
        return _loaded(server, {"message": {"role": "assistant", "content": ""}})
    chat_model, protocol = server.chat_model, server.chat_model.protocol
    tools = body.flat_tools()
    params, json_check = await _format(body, server, constrain=not tools, tools=body.tools or [])
    try:
        history = protocol.api_messages(body.message_dicts(), tools)
        prompt = await asyncio.to_thread(chat_model.encode_chat, history)
    except GlmkitError as e:
        raise APIError(400, str(e), param="messages") from None
    schemas = {t["name"]: t.get("parameters") for t in tools}
    return await _answer(server, body, started, True, prompt, params, chat_model.format.stop_ids,
                         lambda: protocol.call_parser(chat_model.format.reply_parser(), schemas), json_check)


@router.post("/api/generate")
async def generate(body: GenerateRequest, server: Server):
    started = time.perf_counter_ns()
    server = _pick(body.model, server)
    if not body.prompt:             # Ollama loads the model and answers at once
        return _loaded(server, {"response": ""})
    chat_model = server.chat_model
    tokenizer = chat_model.tokenizer
    if body.raw:
        if body.format:     # a grammar ends where the chat format ends a reply; a raw prompt has none
            raise APIError(400, "format needs the model's chat format; send it without raw: true")
        prompt = await asyncio.to_thread(tokenizer.encode, body.prompt)   # ordinary text, never special tokens
        # all visible text is the reply: a call parser without tools calls nothing
        return await _answer(server, body, started, False, prompt, body.options.sampling_params(
                                 chat_model.default_sampling), frozenset({tokenizer.eos_id}),
                             lambda: TaggedCallParser(PlainReplyParser(tokenizer), {}), None)
    params, json_check = await _format(body, server, constrain=True)
    messages = ([{"role": "system", "content": body.system}] if body.system else []) + \
        [{"role": "user", "content": body.prompt}]
    try:
        prompt = await asyncio.to_thread(chat_model.encode_chat, chat_model.protocol.api_messages(messages, []))
    except GlmkitError as e:
        raise APIError(400, str(e), param="prompt") from None
    return await _answer(server, body, started, False, prompt, params, chat_model.format.stop_ids,
                         lambda: chat_model.protocol.call_parser(chat_model.format.reply_parser(), {}), json_check)


@router.get("/api/tags")
async def tags(server: Server):
    return {"models": [await _model_entry(server.pick(name)) for name in _listed(server)]}


@router.get("/api/ps")
async def ps(server: Server):
    return {"models": [await _running(server.pick(name)) for name in _listed(server)]}


async def _running(server: ServerState) -> dict:
    entry = await _model_entry(server)
    # a model served by a remote engine holds no memory here
    on_gpu = not server.chat_model.remote and server.chat_model.model.device.type != "cpu"
    return {**entry, "expires_at": "2999-12-31T23:59:59Z",     # loaded until the server stops
            "size_vram": entry["size"] if on_gpu else 0, "context_length": server.scheduler.max_seq_len}


@router.post("/api/show")
async def show(body: ShowRequest, server: Server):
    server = _pick(body.model_name(), server)
    chat_model = server.chat_model
    entry = await _model_entry(server)
    info = await _describe(server)
    family = chat_model.config.family
    # Ollama's `parameters` text: one "name value" line per default, as a Modelfile writes them
    defaults = {{"repetition_penalty": "repeat_penalty"}.get(k, k): v for k, v in chat_model.default_sampling.items()}
    defaults["num_ctx"] = server.scheduler.max_seq_len
    return {"modified_at": entry["modified_at"], "details": entry["details"],
            "parameters": "\n".join(f"{k:<30} {v}" for k, v in defaults.items()),
            "template": chat_model.checkpoint.chat_template or "",    # ChatGLM's formats are code, not a template
            # the file's name, not its path: the server's directories are nobody's business
            "modelfile": f"# served by glmkit {__version__}\nFROM {Path(chat_model.checkpoint.source).name}\n",
            "model_info": {"general.architecture": family, "general.name": chat_model.name,
                           "general.parameter_count": info.get("parameters", 0),
                           f"{family}.context_length": server.scheduler.max_seq_len,
                           f"{family}.embedding_length": chat_model.config.dim,
                           f"{family}.block_count": chat_model.config.n_layer},
            "capabilities": ["completion", "tools"]}


@router.get("/api/version")
def version():
    return {"version": __version__}


# -- answering -------------------------------------------------------------------------------------
async def _format(body: _Generation, server: ServerState, constrain: bool, tools=()):
    """The request's sampling and, for `format`, a check of the reply.  Decoding is constrained
    to the schema unless the reply may be a tool call instead (`constrain` False); then the
    reply is checked afterwards, as the OpenAI route does."""
    chat_model = server.chat_model
    params = body.options.sampling_params(chat_model.default_sampling)
    fmt = body.response_format()
    if fmt is not None or tools:
        await asyncio.to_thread(body.check_schemas, tools)    # jsonschema's meta-schema check is slow
    if fmt is None:
        return params, None
    if not constrain:
        return params, fmt.checker()
    try:
        grammar = await asyncio.to_thread(chat_model.json_grammar, fmt.schema())
    except GrammarError as e:
        raise APIError(400, str(e), param="format") from None
    return replace(params, grammar=grammar), None


async def _answer(server: ServerState, body: _Generation, started: int, chat: bool, prompt: list[int], params,
                  stop_ids, new_parser, json_check):
    if not prompt:
        raise APIError(400, "the prompt is empty", param="prompt")
    max_new = body.options.max_new_tokens(server.config.max_tokens_limit)
    [choice] = submit(server.chat_model.backend, 1, prompt, params, stop_ids, max_new, new_parser,
                      body.options.stops(), prompt_param="messages" if chat else "prompt")
    reply = _Reply(server.model_id, chat, choice, len(prompt), started, json_check)
    if body.stream:
        return StreamingResponse(reply.lines(), media_type=NDJSON)
    return await reply.whole()


@dataclass
class _Reply:
    """One choice shaped as Ollama's chat (`message`) or generate (`response`) objects."""
    model: str
    chat: bool
    choice: Choice
    prompt_tokens: int
    started: int                        # time.perf_counter_ns() when the request arrived
    json_check: Callable[[str], str | None] | None = None   # format, not constrained (tools): what is wrong
    first: int | None = field(default=None)   # when the first token came: prompt evaluation ends

    def _part(self, text: str, calls=(), done: bool = False) -> dict:
        head = {"model": self.model, "created_at": _now()}
        if not self.chat:
            return {**head, "response": text, "done": done}
        message = {"role": "assistant", "content": text}
        if calls:
            message["tool_calls"] = [{"function": {"name": c.name, "arguments": c.arguments}} for c in calls]
        return {**head, "message": message, "done": done}

    def _last(self, text: str = "", calls=()) -> dict:
        now = time.perf_counter_ns()
        first = self.first or now
        return {**self._part(text, calls, done=True), "done_reason": self.choice.tokens.finish_reason or "stop",
                "total_duration": now - self.started, "load_duration": 0,
                "prompt_eval_count": self.prompt_tokens, "prompt_eval_duration": first - self.started,
                "eval_count": self.choice.tokens.completion_tokens, "eval_duration": now - first}

    async def _problem(self) -> str | None:
        # a reply cut at num_predict is incomplete (done_reason "length"), not invalid
        if self.json_check is None or self.choice.calls or self.choice.tokens.finish_reason == "length":
            return None
        return await asyncio.to_thread(self.json_check, self.choice.content)

    async def whole(self) -> dict:
        try:
            async for _ in self.choice.pieces():
                self.first = self.first or time.perf_counter_ns()
        finally:
            self.choice.handle.cancel()
        if problem := await self._problem():
            raise APIError(422, problem, param="format")
        return self._last(self.choice.content, self.choice.calls)

    async def lines(self):
        """NDJSON: a line per piece of text or call, then the last line (or an error line).
        Closing the stream (the client went away) cancels the generation."""
        try:
            async for piece in self.choice.pieces():
                self.first = self.first or time.perf_counter_ns()
                if piece.content or piece.calls:
                    yield _line(self._part(piece.content, piece.calls))
            if problem := await self._problem():      # validated, not constrained: said in the stream
                yield _line({"error": problem})
                return
            yield _line(self._last())
        except GlmkitError as e:        # the response has begun: the error is its last line
            yield _line({"error": str(e)})
        finally:
            self.choice.handle.cancel()


def _line(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False) + "\n"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _loaded(server: ServerState, empty: dict) -> dict:
    """Ollama's answer to a request with nothing to generate: the model is loaded (it always is)."""
    return {"model": server.model_id, "created_at": _now(), **empty, "done": True, "done_reason": "load"}


# -- the model -------------------------------------------------------------------------------------
def _listed(server: ServerState) -> list[str]:
    """The models a request may name (a private_only one: those on this machine)."""
    return [n for n in server.models if not (server.private and n in server.config.outside)]


def _pick(name: str, server: ServerState) -> ServerState:
    """The model `name` names: one of our ids, the generic names (the default), or an id with a
    tag (Ollama clients add ":latest"); the longest id that matches, so that "m-32k" is not "m"."""
    if name in server.clouds:
        return server.pick(name)        # refused: a cloud model answers /v1/chat/completions only
    found = server.find(name)
    if found is None:
        found = max((m for m in server.models.values() if name.startswith(m.model_id)),
                    key=lambda m: len(m.model_id), default=None)
        # what follows the id must be a tag ("m:bee" is not the adapter "m:b"; "mx" is not "m").
        # "<model>:<tag>" where the model serves LoRA adapters as "<model>:<name>": a tag other than
        # Ollama's "latest" means an adapter, and one it does not serve is not the base model; an
        # adapter's own id takes only ":latest"
        tag = name[len(found.model_id):] if found is not None else ""
        if found is not None and tag and (not tag.startswith(":") or (tag != ":latest" and (
                found.parent is not None or any(m.parent == found.model_id for m in server.models.values())))):
            found = None
    if found is None:
        raise APIError(404, f"model {name!r} not found", param="model")
    return server.pick(found.model_id)


async def _describe(server: ServerState) -> dict:
    return await asyncio.to_thread(_describe_source, str(server.chat_model.checkpoint.source))


@lru_cache(maxsize=4)
def _describe_source(source: str) -> dict:
    """The checkpoint as `glmkit models` describes it (from its metadata; once per source), or {}
    where it cannot be (then the entry has what the loaded config says)."""
    from ..models.inventory import describe       # imports torch: only when asked
    from ..errors import CheckpointError
    try:
        info = describe(Path(source)).as_dict()
    except (CheckpointError, OSError, ValueError):
        return {}
    try:
        info["mtime"] = Path(source).stat().st_mtime
    except OSError:
        pass
    return info


async def _model_entry(server: ServerState) -> dict:
    """The served model as /api/tags lists it.  The digest names the file (path, size, time),
    not its bytes: hashing gigabytes for a listing would take minutes."""
    info = await _describe(server)
    config = server.chat_model.config
    mtime = info.get("mtime", server.started)
    size, params = info.get("bytes", 0), info.get("parameters", 0)
    layout = info.get("layout", "")
    digest = hashlib.sha256(f"{server.chat_model.checkpoint.source}\0{size}\0{mtime}".encode()).hexdigest()
    return {"name": server.model_id, "model": server.model_id,
            "modified_at": datetime.fromtimestamp(mtime, timezone.utc).isoformat().replace("+00:00", "Z"),
            "size": size, "digest": digest,
            "details": {"parent_model": "", "format": "gguf" if layout == "GGUF" else layout or "unknown",
                        "family": config.family, "families": [config.family],
                        "parameter_size": _parameter_size(params),
                        "quantization_level": info.get("precision", "unknown")}}


def _parameter_size(n: int) -> str:
    if not n:
        return "unknown"
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"
