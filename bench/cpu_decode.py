"""CPU decode and prefill speed of the embedded default model for each precision choice:
float32, bfloat16, int8 and int4 weights (bf16 activations), measured with glmkit's own engine (its
scheduler, as the server runs it) in one run.  Float32 is the baseline for the ratios.

    .venv/bin/python bench/cpu_decode.py [--threads N] [--tokens 128]
"""

import argparse
import json
import platform

import torch

import glmkit
from glmkit.benchmark import decode_speed


def measure(model, prompt_len: int, new_tokens: int, batch: int = 1) -> dict:
    prompt = (model.tokenizer.encode("The quick brown fox jumps over the lazy dog. ") * 200)[:prompt_len]
    return decode_speed(model.model, [prompt] * batch, new_tokens)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for dtype, quant in (("float32", None), ("bfloat16", None), ("bfloat16", "int8"), ("bfloat16", "int4")):
        # SmolLM2's width 576 is a multiple of 64, not of 128
        model = glmkit.load(None, dtype=dtype, quantize=quant or "none", group_size=64)   # "none": float weights
        measure(model, 16, 8)  # warm-up
        r = measure(model, args.prompt, args.tokens)
        r.update(dtype=dtype, quantize=quant or "none", model=model.name)
        rows.append(r)
        print(f"{model.name:28s} {dtype:9s} {quant or 'none':5s} prefill {r['prefill_tok_s']:7.1f} tok/s   "
              f"decode {r['decode_ms_per_step']:6.2f} ms/token ({r['decode_tok_s']:6.1f} tok/s)")
    for r in rows[1:]:
        print(f"{r['dtype']}/{r['quantize']}: decode speed {r['decode_tok_s'] / rows[0]['decode_tok_s']:.2f}x float32")
    print(f"({platform.machine()}, {args.threads} threads, torch {torch.__version__})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "torch": torch.__version__, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
