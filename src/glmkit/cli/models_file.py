"""`glmkit serve --models FILE`: several models in one server, read from a YAML file.

    models:
      chatglm3-6b:  {path: /models/chatglm3-6b, quantize: int4, kv_cache_mb: 2048}         # loaded here
      chatglm3-gpu: {engine: http://gpu-box:8000, kind: vllm, path: /models/chatglm3-6b}  # a remote engine
      smollm2-cpp:  {engine: http://127.0.0.1:8080, kind: llamacpp, path: /models/smollm2.gguf}  # llama-server
      cloud-glm:    {openai: https://maas.example/v1, model: glm-4, api_key_env: MAAS_KEY} # a cloud chat API
    routes:
      default: chatglm3-6b        # what a request without a model (or "default") gets; default: the first
      fallback: {chatglm3-6b: cloud-glm}    # answers when chatglm3-6b is down, timed out or busy
    private_only: false           # true: no request is ever answered outside this machine

Each name is what clients send as `model`.  An entry with `engine` generates through that engine
(engine/remote.py; `path` gives the tokenizer, config and chat format, not weights); an entry with
`openai` passes chat requests through to that service's /v1/chat/completions (server/cloud_chat.py;
its key from the environment variable `api_key_env` names, never from this file); any other entry
is loaded in this process and gets a scheduler of its own (quantize, group_size, device and dtype
as the model options say them; max_batch and kv_cache_mb size its scheduler).

A model is outside this machine when it is a cloud entry, or an engine whose URL's host is not a
loopback address, unless its entry says `private: true` (the operator vouching for a host of their
own); `private_only` (here, `serve --private-only`, or a key marked so) keeps every request off
those.  The file is checked whole
before anything loads: a mistake is one GlmkitError naming the file and the field
("models.yaml: models.chatglm3-6b.quantize: ..."), which `glmkit` prints as one line (exit 1)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, ValidationError

from ..errors import GlmkitError

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")
RESERVED = ("default", "glmkit")          # the generic names: they mean the default model
ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class LocalEntry(_Strict):
    """A model loaded in this process (the serve command's --device/--dtype unless given here)."""
    path: str = Field(min_length=1)
    quantize: Literal["auto", "none", "int8", "int4"] = "auto"
    group_size: Literal[32, 64, 128, 256] = 128
    device: str | None = Field(None, min_length=1)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = None
    # this model's scheduler (default: --max-batch, --kv-cache-mb): each model has its own KV cache
    max_batch: int | None = Field(None, ge=1, le=1024)
    kv_cache_mb: int | None = Field(None, ge=1)


class EngineEntry(_Strict):
    """A model whose tokens come from another server: `glmkit serve` or vLLM (/v1/completions), or
    llama.cpp's llama-server (/completion, engine/llamacpp.py); engine/remote.py's KINDS."""
    engine: HttpUrl
    kind: Literal["glmkit", "vllm", "llamacpp"] = "glmkit"
    path: str = Field(min_length=1)       # the same model's directory: tokenizer, config, chat format
    timeout: float | None = Field(None, gt=0)      # default: --engine-timeout
    api_key: str | None = None                     # default: --engine-api-key
    private: bool | None = None                    # None: private when the engine is on loopback


class CloudEntry(_Strict):
    """A chat model another service answers at its OpenAI-compatible /v1/chat/completions."""
    openai: HttpUrl                                # its base URL, as OpenAI's clients take it (.../v1)
    model: str = Field(min_length=1)               # the service's name for the model
    api_key_env: str | None = Field(None, pattern=ENV_NAME)   # the environment variable with its key
    timeout: float | None = Field(None, gt=0)      # default: --engine-timeout
    private: bool | None = None


class Routes(_Strict):
    default: str | None = None
    fallback: dict[str, str] = Field(default_factory=dict)


LOCAL_ONLY = set(LocalEntry.model_fields) - set(EngineEntry.model_fields)


@dataclass
class ModelsFile:
    path: str
    models: dict[str, LocalEntry | EngineEntry | CloudEntry]     # in the file's order
    default: str
    fallbacks: dict[str, str] = field(default_factory=dict)
    private_only: bool = False

    def outside(self) -> dict[str, str]:
        """{name: host} of the models answered outside this machine (server.state.ServerConfig)."""
        from ..server.cloud_chat import host_of, on_this_machine
        out = {}
        for name, e in self.models.items():
            url = str(e.engine) if isinstance(e, EngineEntry) else str(e.openai) if isinstance(e, CloudEntry) else None
            # a cloud entry is outside even on loopback (a local proxy may forward anywhere), an
            # engine when its host is not loopback; `private: true` is the operator vouching
            local = on_this_machine(url) if isinstance(e, EngineEntry) and url else False
            if url is not None and not e.private and (e.private is False or not local):
                out[name] = host_of(url)
        return out

    def limits(self) -> dict:
        """{name: the scheduler sizes its entry sets} (server.state.ServerConfig.model_limits)."""
        return {name: e.model_dump(include={"max_batch", "kv_cache_mb"}, exclude_none=True)
                for name, e in self.models.items() if isinstance(e, LocalEntry)}


def read(path: str) -> ModelsFile:
    """The file, checked: a GlmkitError "PATH: FIELD: what is wrong" for the first mistake."""
    import yaml
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise GlmkitError(f"{path}: cannot read the models file ({e.strerror})") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" (line {where.line + 1})" if where is not None else ""
        raise GlmkitError(f"{path}: not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None

    def fail(field: str, why: str):
        raise GlmkitError(f"{path}: {field}: {why}")

    if not isinstance(data, dict):
        fail("(top level)", "expected a mapping with `models:` (and optionally `routes:`)")
    for key in data:
        if key not in ("models", "routes", "private_only"):
            fail(str(key), "unknown key (known: models, routes, private_only)")
    private_only = data.get("private_only", False)
    if not isinstance(private_only, bool):
        fail("private_only", "expected true or false")
    models = data.get("models")
    if not isinstance(models, dict) or not models:
        fail("models", ("required" if models is None else "expected") + ": a mapping of at least one name "
                       "to its entry, such as `chatglm3-6b: {path: /models/chatglm3-6b}`")
    entries = {}
    for name, raw in models.items():
        field = f"models.{name}"
        if not isinstance(name, str) or not NAME.fullmatch(name):
            fail(field, "a model's name is what clients send as `model`: letters, digits and . _ : / - "
                        "(at most 128, starting with a letter or digit)")
        if name in RESERVED:
            fail(field, f"{name!r} is reserved: it means the default model")
        if not isinstance(raw, dict):
            fail(field, "expected a mapping such as {path: /models/chatglm3-6b} or {engine: URL, path: ...}")
        if "openai" in raw:
            if "api_key" in raw:
                fail(f"{field}.api_key", "a key is never written in this file: put it in an environment variable "
                                         "and name that variable with api_key_env")
            if "engine" in raw or "path" in raw:
                fail(f"{field}.{'engine' if 'engine' in raw else 'path'}",
                     "a cloud model (openai:) is answered by its service: it has no engine or path here")
            entries[name] = _validated(CloudEntry, raw, field, fail)
        elif "engine" in raw:
            mixed = sorted(LOCAL_ONLY & set(raw))
            if mixed:
                fail(f"{field}.{mixed[0]}", "applies to a model loaded here, not to one an engine serves "
                                            "(set it where the engine runs)")
            entries[name] = _validated(EngineEntry, raw, field, fail)
        else:
            entries[name] = _validated(LocalEntry, raw, field, fail)
    routes = data.get("routes")
    if routes is None:
        routes = {}
    if not isinstance(routes, dict):
        fail("routes", "expected a mapping such as {default: NAME}")
    checked = _validated(Routes, routes, "routes", fail)
    default = checked.default
    if default is not None and default not in entries:
        fail("routes.default", f"{default!r} names no model in this file (models: {', '.join(entries)})")
    runs_here = [n for n, e in entries.items() if not isinstance(e, CloudEntry)]
    if not runs_here:
        fail("models", "at least one model must be one glmkit runs (path: or engine:): the console and "
                       "the APIs other than /v1/chat/completions need one")
    if default is not None and isinstance(entries[default], CloudEntry):
        fail("routes.default", f"{default!r} is a cloud model; the default must be one glmkit runs "
                               f"({', '.join(runs_here)})")
    for source, target in checked.fallback.items():
        for which, name in (("", source), (f".{source}", target)):
            if name not in entries:
                fail(f"routes.fallback{which}", f"{name!r} names no model in this file (models: {', '.join(entries)})")
        if source == target:
            fail(f"routes.fallback.{source}", "a model cannot be its own fallback")
    return ModelsFile(path, entries, default or runs_here[0], dict(checked.fallback), private_only)


def _validated(cls, raw: dict, field: str, fail):
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join([field, *map(str, err["loc"])])
        if err["type"] == "extra_forbidden":
            fail(loc, f"unknown field (known: {', '.join(cls.model_fields)})")
        if err["type"] == "missing":
            fail(loc, "required")
        fail(loc, err["msg"])


def load(spec: ModelsFile, args) -> dict:
    """{name: ChatModel or CloudChat}, in the file's order: each local entry loaded with the serve
    command's model options (--device, --dtype, --no-compile) unless the entry says otherwise; each
    engine entry asked what it serves now; each cloud entry's key variable checked (the service is
    not called: it may be down now and a fallback's target).  A failure names the entry."""
    import sys
    from argparse import Namespace

    from ..engine.remote import EngineUnavailable
    from .options import load_model
    from .options import remote_model_at
    models = {}
    for name, entry in spec.models.items():      # before any model loads (which takes a while)
        if isinstance(entry, CloudEntry) and entry.api_key_env and not os.environ.get(entry.api_key_env):
            raise GlmkitError(f"{spec.path}: models.{name}.api_key_env: the environment variable "
                              f"{entry.api_key_env} (this model's API key) is not set")
    for name, entry in spec.models.items():
        try:
            if isinstance(entry, CloudEntry):
                from ..server.cloud_chat import CloudChat
                models[name] = CloudChat(name, str(entry.openai), entry.model, entry.api_key_env,
                                         entry.timeout if entry.timeout is not None else args.engine_timeout)
            elif isinstance(entry, EngineEntry):
                models[name] = remote_model_at(
                    entry.path, str(entry.engine), entry.kind, name,
                    entry.timeout if entry.timeout is not None else args.engine_timeout,
                    entry.api_key if entry.api_key is not None else args.engine_api_key)
            else:
                options = Namespace(**{**vars(args), "model": entry.path, "quantize": entry.quantize,
                                       "group_size": entry.group_size, "device": entry.device or args.device,
                                       "dtype": entry.dtype or args.dtype, "adapter": None})
                models[name] = load_model(options, progress=sys.stderr.isatty())
        except EngineUnavailable as e:
            raise GlmkitError(f"{spec.path}: models.{name}.engine: {e}") from None
        except GlmkitError as e:     # the checkpoint at `path` (its weights, or its tokenizer and config)
            raise GlmkitError(f"{spec.path}: models.{name}.path: {e}") from None
    return models
