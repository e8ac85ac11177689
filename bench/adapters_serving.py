"""Decode-step time with LoRA adapters served unmerged, per row (models/lora.py), against none.

The default model (SmolLM2-135M, a Llama-family GGUF) takes no adapter: glmkit's adapters are
peft LoRA for ChatGLM3's module names and are refused on other families.  So this builds a ChatGLM3
model with random weights at ChatGLM3-6B's width (dim 4096, ffn 13696, 32 heads, 2 KV groups,
qkv bias) and --layers of its 28 layers, with a small vocabulary (--vocab, default 4096) so that the
layers, where LoRA works, dominate the step as they do in the full model (a 6B step is ~93%
layers); a full-depth model's ratio would be about the same, its step --layers/28 of the time.

Measured: one batched decode step (Transformer.forward, one token per row, each row at position
--context) for --batch rows: (a) no adapter in the batch (the path a base-only batch takes: nothing
added); (b) --adapters different adapters spread over all rows (row i uses adapter i % n + 1),
all four target matrices, at each --rank; (c) the same with half the rows on the base model.  Each
LoRA way of models/lora.py (MODES: grouped, stacked, concat) is timed: --repeat pairs of steps
after --warmup, (a) and (b) alternating, the ratio the median of the pairs' (a shared, loaded
machine drifts by tens of percent within a minute).  Goal: (b) <= 1.3x (a).

    .venv/bin/python bench/adapters_serving.py [--layers 2] [--batch 16] [--ranks 8 32] [--quantize int8]
"""

import argparse
import json
import os
import platform
import statistics
import time

import torch

from glmkit.benchmark import random_state
from glmkit.models.adapters import Adapter
from glmkit.models.config import ModelConfig
from glmkit.models.loader import build, pick_dtype
from glmkit.models.lora import MODES, LoraSet
from glmkit.models.quantize import QuantConfig

TARGETS = {"attention.wqkv": "query_key_value", "attention.wo": "dense", "feed_forward.w13": "dense_h_to_4h",
           "feed_forward.w2": "dense_4h_to_h"}


def config(layers: int, vocab: int) -> ModelConfig:
    return ModelConfig(family="chatglm", n_layer=layers, dim=4096, n_head=32, n_kv_head=2, head_dim=128,
                       ffn_dim=13696, vocab_size=vocab, context_length=8192, rope_dims=64, qkv_bias=True,
                       name=f"chatglm3-6b width, {layers} layers, vocab {vocab} (random weights)")


def random_adapter(model, r: int, seed: int) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for i, layer in enumerate(model.layers):
        for sub in TARGETS:
            lin = layer.get_submodule(sub)
            weights[f"layers.{i}.{sub}"] = (torch.randn(r, lin.in_features, generator=g) * 0.01,
                                            torch.randn(lin.out_features, r, generator=g) * 0.01, 2.0)
    return Adapter(path=f"random-r{r}-{seed}", config={"r": r, "lora_alpha": 2 * r}, weights=weights)


def step_s(model, tokens, start, adapters) -> float:
    t0 = time.perf_counter()
    model(tokens, start, adapters=adapters)
    return time.perf_counter() - t0


def paired(model, batch: int, context: int, adapters, warmup: int, repeat: int) -> tuple[float, float, float]:
    """(base ms, with adapters ms, ratio): base and adapter steps alternate, and the ratio is the
    median of each pair's, so that a shared machine's drift (other jobs starting and ending) falls
    on both sides alike."""
    tokens = torch.randint(0, model.cfg.vocab_size, (batch, 1))
    start = torch.full((batch,), context)
    base, lora, ratios = [], [], []
    with torch.inference_mode():
        for i in range(warmup + repeat):
            b = step_s(model, tokens, start, None)
            a = step_s(model, tokens, start, adapters)
            if i >= warmup:
                base.append(b)
                lora.append(a)
                ratios.append(a / b)
    return statistics.median(base) * 1000, statistics.median(lora) * 1000, statistics.median(ratios)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--context", type=int, default=128, help="each row's position (tokens already in the cache)")
    ap.add_argument("--quantize", choices=["none", "int8", "int4"], default="none",
                    help="the base weights (LoRA A/B stay in the activation dtype: QLoRA-style serving)")
    ap.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--json", metavar="FILE", help="also write the figures here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = config(args.layers, args.vocab)
    quant = QuantConfig.parse(args.quantize, 128, False)
    dtype = pick_dtype(None if args.dtype == "auto" else args.dtype, "cpu", quantized=quant is not None and quant.bits > 0)
    model = build(cfg, random_state(cfg, torch.bfloat16), dtype, "cpu", quant=quant)
    model.setup_caches(args.batch, args.context + 16)
    n = args.adapters
    spread = [i % n + 1 for i in range(args.batch)]                     # (b): every row on an adapter
    half = [0 if i % 2 else i // 2 % n + 1 for i in range(args.batch)]  # (c): half the rows on the base
    out = {"model": cfg.name, "dtype": str(dtype).replace("torch.", ""), "quantize": args.quantize,
           "batch": args.batch, "adapters": n, "context": args.context, "threads": args.threads,
           "cpus": os.cpu_count(), "machine": platform.machine(), "torch": torch.__version__,
           "load_avg_start": os.getloadavg()[0], "runs": []}
    print(f"{cfg.name}, {out['dtype']}, quantize {args.quantize}, batch {args.batch}, {args.threads} threads, "
          f"load average {out['load_avg_start']:.1f} on {os.cpu_count()} CPUs")
    for r in args.ranks:
        model.lora = LoraSet.build(model, [(f"r{r}-{k}", random_adapter(model, r, 100 * r + k)) for k in range(n)])
        for mode in args.modes:
            model.lora.mode = mode
            for label, ids in (("all rows", spread), ("half base", half)):
                base, ms, ratio = paired(model, args.batch, args.context, ids, args.warmup, args.repeat)
                out["runs"].append({"rank": r, "mode": mode, "rows": label, "base_ms": round(base, 2),
                                    "ms": round(ms, 2), "ratio": round(ratio, 3)})
                print(f"{n} adapters r={r:<3} {mode:<8} {label:<9}: {ms:7.1f} ms/step vs {base:7.1f} with none: "
                      f"{ratio:.2f}x", flush=True)
        model.lora = None
    out["load_avg_end"] = os.getloadavg()[0]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
