"""`glmkit bench`: load time, memory, prefill and decode speed, and perplexity.

Measures the engine as the chat and the server use it (the continuous-batching Scheduler's steps,
greedy sampling, events read through a Handle), so the figures include per-token Python overhead.
`--random-like chatglm3-6b` builds a model with the real shapes and random weights, tensor by
tensor through the same loader (and quantizer), so anyone can reproduce the figures without the
12 GB download.
"""

from __future__ import annotations

import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

from .engine import GenerationRequest, SamplingParams, Scheduler
from .errors import GlmkitError
from .models.config import ModelConfig
from .models.loader import build, pick_dtype

# Shapes of the real checkpoints (their config.json files); weights are random.
RANDOM_LIKE = {
    "chatglm3-6b": ModelConfig(family="chatglm", n_layer=28, dim=4096, n_head=32, n_kv_head=2, head_dim=128,
                               ffn_dim=13696, vocab_size=65024, context_length=8192, rope_dims=64, qkv_bias=True,
                               name="chatglm3-6b (random weights)"),
    "smollm2-135m": ModelConfig(family="llama", n_layer=30, dim=576, n_head=9, n_kv_head=3, head_dim=64,
                                ffn_dim=1536, vocab_size=49152, context_length=8192, rope_base=100000.0,
                                tied_embeddings=True, name="smollm2-135m (random weights)"),
}


def random_state(cfg: ModelConfig, dtype: torch.dtype, seed: int = 0):
    """(source, name, tensor) with the shapes of `cfg`, generated one tensor at a time."""
    from .models.transformer import Transformer
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    for name, shape in shapes.items():
        if cfg.tied_embeddings and name == "output.weight":
            continue
        if name.endswith("norm.weight"):
            t = torch.ones(shape, dtype=dtype)
        else:
            t = torch.empty(shape, dtype=dtype).normal_(0, 0.02, generator=g)
        yield "random", name, t


def peak_rss_mib() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights (and their scales), not counting the KV cache."""
    tensors = [p for p in model.parameters()] + [b for n, b in model.named_buffers() if ".kv_cache." not in n]
    unique = {t.data_ptr(): t for t in tensors if not t.is_meta}     # a tied output's dense copy is the embedding
    return sum(t.numel() * t.element_size() for t in unique.values())


def decode_speed(model, prompts: list[list[int]], new_tokens: int, compiled=None,
                 params: SamplingParams | None = None) -> dict:
    """Time to the first token of every row (prefill), then per decode step, through a Scheduler
    with one slot per prompt (decoding through `compiled`, a CompiledDecode, if given).  Its steps
    run in this thread, as for the Python API (the server's engine thread runs the same steps; see
    engine/scheduler.py on what a thread costs on CPU)."""
    sched = Scheduler(model, max_batch=len(prompts), max_seq_len=max(map(len, prompts)) + new_tokens,
                      compile=compiled or False)
    t0 = time.perf_counter()
    params = params or SamplingParams(temperature=0)
    handles = [sched.submit(GenerationRequest(p, params, new_tokens)) for p in prompts]
    firsts = [h.get() for h in handles]           # prefill and the first token of every row
    t1 = time.perf_counter()
    rest = [sum(1 for _ in h) for h, ev in zip(handles, firsts) if not ev.finish]
    t2 = time.perf_counter()
    steps, n = max(rest, default=0), sum(rest)
    return {"batch": len(prompts), "ttft_s": t1 - t0, "prefill_tok_s": sum(map(len, prompts)) / (t1 - t0),
            "decode_ms_per_step": 1000 * (t2 - t1) / max(steps, 1), "decode_tok_s": n / max(t2 - t1, 1e-9)}


def speed(model, batch: int, prompt_tokens: int, new_tokens: int, vocab: int, compiled=None) -> dict:
    g = torch.Generator().manual_seed(batch)
    prompts = [torch.randint(100, min(vocab, 30000), (prompt_tokens,), generator=g).tolist() for _ in range(batch)]
    return decode_speed(model, prompts, new_tokens, compiled)


@torch.inference_mode()
def perplexity(model, ids: list[int], window: int = 512, stride: int = 256) -> dict:
    """Strided-window perplexity: every token is scored once, with up to `window` tokens of context."""
    if len(ids) < 2:
        raise GlmkitError(f"the perplexity text is {len(ids)} token(s) long: a perplexity needs at least 2 "
                          "(the first token is only context); use a text of a few hundred tokens or more")
    if len(ids) < 64:
        print(f"glmkit: warning: the perplexity text is only {len(ids)} tokens; a figure over so few tokens "
              "says little about the model", file=sys.stderr)
    window = min(window, model.cfg.context_length)
    model.setup_caches(1, window)
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        chunk = torch.tensor([ids[begin:end]], device=model.device)
        logits = model(chunk, torch.zeros(1, dtype=torch.long, device=model.device), all_logits=True)[0].float()
        first = max(prev_end, begin + 1) - begin      # score only tokens not scored before
        targets = chunk[0, first:]
        logp = torch.log_softmax(logits[first - 1:-1], dim=-1).gather(1, targets[:, None])
        nll -= logp.sum().item()
        count += targets.numel()
        prev_end = end
        if end == len(ids):
            break
    return {"tokens": count, "nll": nll / count, "perplexity": math.exp(nll / count), "window": window, "stride": stride}


def _perplexity_text(args) -> str:
    if args.random_like:
        raise GlmkitError("--perplexity needs a real model (not --random-like)")
    path = Path(args.perplexity)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GlmkitError(f"{path}: no such file (--perplexity needs a text file)") from None
    except IsADirectoryError:
        raise GlmkitError(f"{path}: is a directory (--perplexity needs a text file)") from None
    except UnicodeDecodeError as e:
        raise GlmkitError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise GlmkitError(f"{path}: cannot read: {e.strerror}") from None
    if not text.strip():
        raise GlmkitError(f"{path}: is empty; perplexity needs some text")
    return text


def run(args) -> dict:
    from .models.quantize import QuantConfig
    if args.threads:
        torch.set_num_threads(args.threads)
    quant = QuantConfig.parse(args.quantize, args.group_size, args.quantize_output)
    text = _perplexity_text(args) if args.perplexity else None     # a bad input fails before the slow load
    t0 = time.perf_counter()
    adapter = getattr(args, "adapter", None)      # one DIR, merged (cli/bench.py took --adapter's values apart)
    if args.random_like and adapter:
        raise GlmkitError("--adapter needs a real model (not --random-like)")
    if args.random_like:
        if args.random_like not in RANDOM_LIKE:
            raise GlmkitError(f"--random-like knows {', '.join(RANDOM_LIKE)}")
        cfg = RANDOM_LIKE[args.random_like]
        quantized = quant is not None and quant.bits > 0
        dtype = pick_dtype(None if args.dtype == "auto" else args.dtype, args.device, quantized)
        src_dtype = torch.bfloat16 if args.device == "cpu" else torch.float16
        model = build(cfg, random_state(cfg, src_dtype), dtype, args.device, progress=args.progress,
                      source=f"random-like {args.random_like}", quant=quant)
        tokenizer, name = None, cfg.name
    else:
        from . import load
        cm = load(args.model, device=args.device, dtype=None if args.dtype == "auto" else args.dtype,
                  progress=args.progress, quantize=args.quantize, group_size=args.group_size,
                  quantize_output=args.quantize_output, adapter=adapter)
        model, tokenizer, name = cm.model, cm.tokenizer, cm.name
    load_s = time.perf_counter() - t0
    result = {"model": name, "quantize": args.quantize, "group_size": args.group_size, "dtype": str(model.dtype).replace("torch.", ""),
              "device": args.device, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "machine": platform.machine(), "load_s": load_s, "model_bytes": model_bytes(model), "runs": []}
    if args.perplexity:
        if tokenizer is None:
            raise GlmkitError("--perplexity needs a real model (not --random-like)")
        result["perplexity"] = perplexity(model, tokenizer.encode(text), args.window, args.stride)
    else:
        compiled = {}
        if not getattr(args, "no_compile", False):
            from .engine.compiled_step import CompiledDecode
            def say(line):
                print(f"glmkit: {line}", file=sys.stderr, flush=True)
            compiled = {b: CompiledDecode(model, b, background=False, progress=say if args.progress else None)
                        for b in args.batch}
            result["compile"] = {"mode": compiled[args.batch[0]].mode, "cache_dir": compiled[args.batch[0]].cache_dir,
                                 "compile_s": {}}
        for b in args.batch:                          # warm-up; compiles the step for a full batch of b
            speed(model, b, 8, 4, model.cfg.vocab_size, compiled.get(b))
            if b in compiled:
                compiled[b].compile([b])
                if compiled[b].failed:
                    raise GlmkitError(f"the decode step could not be compiled ({compiled[b].failed[b]}); "
                                      "use --no-compile")
                result["compile"]["compile_s"][b] = compiled[b].compile_s[b]
        for b in args.batch:
            result["runs"].append(speed(model, b, args.prompt_tokens, args.new_tokens, model.cfg.vocab_size,
                                       compiled.get(b)))
    result["peak_rss_mib"] = peak_rss_mib()
    return result


def print_table(r: dict):
    print(f"{r['model']}  ·  {r['dtype']}  ·  quantize {r['quantize']}"
          + (f" (group {r['group_size']})" if r["quantize"] == "int4" else "")
          + f"  ·  {r['device']}, {r['threads']} threads, torch {r['torch']}")
    print(f"model {r['model_bytes'] / 2**30:.2f} GiB   load {r['load_s']:.1f} s   peak RSS "
          + (f"{r['peak_rss_mib'] / 1024:.2f} GiB" if r["peak_rss_mib"] else "n/a"))
    if "perplexity" in r:
        p = r["perplexity"]
        print(f"perplexity {p['perplexity']:.4f} over {p['tokens']} tokens (window {p['window']}, stride {p['stride']})")
        return
    c = r.get("compile")
    print("decode step: eager (--no-compile)" if c is None else
          f"decode step: compiled ({c['mode']}) in " + ", ".join(f"{s:.1f} s (batch {b})" for b, s in c["compile_s"].items())
          + f"; cache {c['cache_dir']}")
    print(f"{'batch':>5} {'TTFT s':>8} {'prefill tok/s':>14} {'decode ms/step':>15} {'decode tok/s':>13}")
    for run_ in r["runs"]:
        print(f"{run_['batch']:>5} {run_['ttft_s']:>8.2f} {run_['prefill_tok_s']:>14.1f} "
              f"{run_['decode_ms_per_step']:>15.1f} {run_['decode_tok_s']:>13.1f}")


def write_json(r: dict, path: str):
    Path(path).write_text(json.dumps(r, indent=2) + "\n", encoding="utf-8")
