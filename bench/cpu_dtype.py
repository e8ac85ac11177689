"""Which dtype should be the CPU default?  Decode and prefill speed of the embedded default model
in float32 and bfloat16, measured with glmkit's own engine in one run.

    .venv/bin/python bench/cpu_dtype.py [--threads N] [--tokens 128]
"""

import argparse
import json
import platform
import time

import torch

import glmkit
from glmkit.engine import GenerationRequest, SamplingParams, generate_batch


def measure(model, prompt_len: int, new_tokens: int, batch: int = 1) -> dict:
    prompt = (model.tokenizer.encode("The quick brown fox jumps over the lazy dog. ") * 200)[:prompt_len]
    reqs = [GenerationRequest(prompt, SamplingParams(temperature=0), new_tokens, frozenset()) for _ in range(batch)]
    t0 = time.perf_counter()
    steps = generate_batch(model.model, reqs)
    next(steps)                      # prefill + first token
    t1 = time.perf_counter()
    n = 0
    for _ in steps:
        n += 1
    t2 = time.perf_counter()
    return {"prefill_tok_s": batch * prompt_len / (t1 - t0), "decode_ms_per_step": 1000 * (t2 - t1) / max(n, 1),
            "decode_tok_s": batch * n / (t2 - t1)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for dtype in ("float32", "bfloat16"):
        model = glmkit.load(None, dtype=dtype)
        measure(model, 16, 8)  # warm-up
        r = measure(model, args.prompt, args.tokens)
        r.update(dtype=dtype, model=model.name)
        rows.append(r)
        print(f"{model.name:32s} {dtype:9s} prefill {r['prefill_tok_s']:7.1f} tok/s   "
              f"decode {r['decode_ms_per_step']:6.2f} ms/token ({r['decode_tok_s']:6.1f} tok/s)")
    ratio = rows[0]["decode_tok_s"] / rows[1]["decode_tok_s"]
    print(f"float32 / bfloat16 decode speed ratio: {ratio:.2f}  ({platform.processor() or platform.machine()}, "
          f"{args.threads} threads, torch {torch.__version__})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "torch": torch.__version__, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
