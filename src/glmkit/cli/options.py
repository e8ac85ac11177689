"""Options that several subcommands share, and what each group builds.

The model options (`add_model_options`) load the model (`load_model`), or stand for one whose
tokens come from an engine elsewhere (`remote_model_at`: serve --engine, and engine entries of a
models file); the sampling options
(`add_sampling_options`) become the chat's one SamplingParams (`sampling_params`); the
interpreter flag becomes the KernelPool that the terminal chat and the server both keep their
kernels in (`kernel_pool`).  Also the argparse value types that refuse a bad count or a missing
directory before anything loads."""

from __future__ import annotations

import argparse
import os
from contextlib import nullcontext

from ..engine.requests import DEFAULT_MAX_NEW_TOKENS, SamplingParams
from ..errors import GlmkitError


def positive(text: str) -> int:
    """A count that must be at least 1: 0 would otherwise fall through to a default unnoticed."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def existing_dir(text: str) -> str:
    """A directory that is already there: glmkit does not create one wherever a typo points."""
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text}: no such directory (create it first)")
    return text


def default_data_dir() -> str:
    """Where glmkit keeps what it writes for a user (the terminal's chat log, the console's
    conversations): $GLMKIT_DATA_DIR, else the XDG data directory (~/.local/share/glmkit)."""
    if os.environ.get("GLMKIT_DATA_DIR"):
        return os.environ["GLMKIT_DATA_DIR"]
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "glmkit")


def add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("-m", "--model", metavar="PATH",
                   help="ChatGLM3 directory (config.json + tokenizer.model + safetensors/.bin shards) or a "
                        ".gguf file; default: $MODEL_PATH, else the embedded SmolLM2-135M-Instruct")
    g.add_argument("--device", default="cpu", help="cpu or cuda (or cuda:N); default cpu")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights and activations; auto = float32 on CPU, float16 on CUDA")
    g.add_argument("--threads", type=positive, metavar="N", help="CPU threads for PyTorch (default: PyTorch's choice)")
    g.add_argument("--quantize", choices=["auto", "none", "int8", "int4"], default="auto",
                   help="Linear weights: auto = as the checkpoint comes (GGUF Q4_0/Q4_1/Q8_0 stay quantized), "
                        "none = float, int8 = per channel, int4 = group-wise (quantized while loading)")
    g.add_argument("--group-size", type=int, default=128, choices=[32, 64, 128, 256],
                   help="int4 group size (input columns sharing one scale); default 128")
    g.add_argument("--adapter", metavar="[NAME=]DIR", action="append", default=[],
                   help="a LoRA adapter (`glmkit finetune` output, or peft's adapter_config.json + "
                        "adapter_model.safetensors for ChatGLM3) merged into the weights as they load, before "
                        "--quantize; or a P-tuning v2 checkpoint of the official ChatGLM3 demo (config.json with "
                        "pre_seq_len + the prefix encoder's weights), served as a KV-cache prefix.  serve: "
                        "repeat as NAME=DIR to serve several LoRA adapters unmerged, each request choosing one "
                        "by model id <model>:NAME (batched with the base model's requests; on top of --quantize "
                        "too)")
    g.add_argument("--no-compile", action="store_true", default=os.environ.get("GLMKIT_NO_COMPILE") == "1",
                   help="decode with the eager step only (also GLMKIT_NO_COMPILE=1).  Default: a torch.compile'd "
                        "step, compiled in the background (about a minute the first time, seconds once cached "
                        "in ~/.cache/glmkit/inductor) while the eager step answers")


def split_adapters(values, named_ok: bool = True) -> tuple[str | None, dict[str, str]]:
    """--adapter's values: (the one plain DIR, merged at load, or None; {NAME: DIR} served per request).
    An existing directory is a DIR whatever its name holds; else NAME=DIR names an adapter."""
    plain, named = [], {}
    for value in values or ():
        name, eq, where = str(value).partition("=")
        if not eq or os.path.isdir(value) or "/" in name or not name:
            plain.append(value)
        elif name in named:
            raise GlmkitError(f"--adapter {name}= is given twice")
        else:
            named[name] = where
    if named and not named_ok:
        raise GlmkitError("--adapter NAME=DIR serves an adapter per request (glmkit serve); here give one "
                          "adapter as --adapter DIR, merged into the weights")
    if len(plain) > 1:
        raise GlmkitError(f"--adapter {plain[0]} and --adapter {plain[1]}: one adapter is merged into the weights; "
                          f"to serve several, name each: --adapter NAME=DIR (glmkit serve)")
    if plain and named:
        raise GlmkitError(f"--adapter {plain[0]} (merged into the weights) and named adapters together: name it too "
                          f"(NAME=DIR) to serve every adapter unmerged, each by its own model id")
    return (plain[0] if plain else None), named


def load_model(args, progress: bool, compile: bool = True, named_adapters: bool = False):
    """The ChatModel that the model options name; `compile`: unless --no-compile, decode through the
    compiled step once it is compiled (engine/compiled_step.py).  `named_adapters`: the command
    serves --adapter NAME=DIR adapters per request (glmkit serve); elsewhere they are refused."""
    merged, named = split_adapters(getattr(args, "adapter", None), named_adapters)
    import glmkit
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    from .spinner import spinner
    # `progress`: a spinner on a terminal (the GGUF start cache's note, if any, prints above it)
    with spinner(f"loading {os.path.basename(os.path.normpath(args.model or os.environ.get('MODEL_PATH') or 'the default model'))}") \
            if progress else nullcontext():
        return glmkit.load(args.model, device=args.device, dtype=None if args.dtype == "auto" else args.dtype,
                           quantize=args.quantize, group_size=args.group_size,
                           compile=compile and not args.no_compile, adapter=merged, adapters=named or None)


def remote_model_at(path, url: str, kind: str, model_id: str | None, timeout: float, api_key: str | None):
    """A ChatModel over the engine at `url` with `path`'s tokenizer, config and chat format (not its
    weights).  The engine is asked what it serves now, so that a wrong URL is one error at startup."""
    from ..chat_model import ChatModel
    from ..chat import chat_format_for
    from ..engine.llamacpp import LlamaCppBackend
    from ..engine.remote import RemoteBackend
    from ..models.loader import without_weights
    checkpoint = without_weights(path)
    # llama-server speaks its own dialect; every other kind, vLLM's /v1/completions
    backend_class = LlamaCppBackend if kind == "llamacpp" else RemoteBackend
    backend = backend_class(url, kind, checkpoint.tokenizer, chat_format_for(checkpoint),
                            model_id or checkpoint.config.name, checkpoint.config.context_length,
                            timeout=timeout, api_key=api_key)
    backend.check()
    return ChatModel.over(checkpoint, backend)


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation (defaults: the model's official values)")
    g.add_argument("--temperature", type=float, help="0 = greedy; ChatGLM3 default 0.8")
    g.add_argument("--top-p", type=float, help="nucleus sampling mass; ChatGLM3 default 0.8")
    g.add_argument("--top-k", type=int, help="sample among the k most likely tokens (0 = off)")
    g.add_argument("--repetition-penalty", type=float, help="> 1 discourages repeating tokens (1 = off)")
    g.add_argument("--max-new-tokens", type=positive, default=DEFAULT_MAX_NEW_TOKENS,
                   help=f"most tokens in one reply (default {DEFAULT_MAX_NEW_TOKENS})")
    g.add_argument("--max-length", type=positive, default=None,
                   help="most tokens of prompt + reply (the official demos' max_length); default: the model's context")
    g.add_argument("--seed", type=int, help="seed the sampler for reproducible replies")
    g.add_argument("--stop", action="append", metavar="TEXT", help="stop the reply at this text (repeatable)")


def sampling_params(args, model) -> SamplingParams:
    """The chat's SamplingParams, made once: the sampling options given over the model's defaults.
    The values are checked here, so a bad one (--top-p 0) is one GlmkitError before anything is
    generated; the limits (--max-new-tokens, --max-length, --stop) are the reply's, not sampling."""
    return model.params(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                        repetition_penalty=args.repetition_penalty, seed=args.seed)


def kernel_pool(args):
    """The pool that the code interpreter's kernels live in, for `chat --code` as for `serve --code`
    (each kernel is refused without a sandbox unless --unsafe-interpreter)."""
    from functools import partial

    from ..sandbox import Interpreter, KernelPool
    return KernelPool(partial(Interpreter, unsafe=args.unsafe_interpreter))
