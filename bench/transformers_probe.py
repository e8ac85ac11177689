"""Time Hugging Face transformers (the official stack's engine) on the default model's weights.

Loads SmolLM2-135M-Instruct from the same GGUF file through transformers' GGUF support (which
dequantizes it), then greedy-decodes with model.generate.  Runs in the project's .venv, where
transformers is a test dependency; its GGUF loader also needs `pip install accelerate` there.

    .venv/bin/python bench/transformers_probe.py [--dtype bfloat16] [--new 128] [--threads 2]
"""

import argparse
import json
import os
import time

import torch
import transformers

from glmkit.models.loader import default_model_path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = default_model_path()
    dtype = getattr(torch, args.dtype)
    model = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                              torch_dtype=dtype).eval()
    ids = torch.randint(300, 30000, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model.generate(ids[:, :8], max_new_tokens=4, do_sample=False)
        t0 = time.perf_counter()
        model(ids)
        t1 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False)
        t2 = time.perf_counter()
    n = out.shape[1] - ids.shape[1]
    decode_s = (t2 - t1) - (t1 - t0)  # generate() includes one prefill
    print(json.dumps({"engine": "transformers " + transformers.__version__, "dtype": args.dtype,
                      "prefill_tok_s": args.prompt / (t1 - t0), "decode_tok_s": n / decode_s,
                      "decode_ms_per_token": 1000 * decode_s / n}))


if __name__ == "__main__":
    main()
