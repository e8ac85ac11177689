"""Time llama.cpp (through llama-cpp-python) on one GGUF file: prefill and batch-1 decode.

Runs in the benchmark environment (bench/setup_llamacpp.sh), prints one JSON line.

    .bench-venv/bin/python bench/llamacpp_probe.py MODEL.gguf [--threads 2] [--prompt 128] [--new 64]
"""

import argparse
import json
import random
import time

import llama_cpp


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    args = ap.parse_args()
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(args.model, n_threads=args.threads, n_threads_batch=args.threads, n_ctx=1024,
                          n_batch=512, verbose=False)
    load_s = time.perf_counter() - t0
    rnd = random.Random(0)
    n_vocab = llm.n_vocab()
    prompt = [rnd.randrange(300, min(n_vocab, 30000)) for _ in range(args.prompt)]
    llm.eval(prompt[:8])  # warm-up
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    t1 = time.perf_counter()
    for i in range(args.new):
        llm.eval([prompt[i % len(prompt)]])
    t2 = time.perf_counter()
    print(json.dumps({"model": args.model, "load_s": load_s, "prefill_tok_s": args.prompt / (t1 - t0),
                      "decode_ms_per_token": 1000 * (t2 - t1) / args.new, "decode_tok_s": args.new / (t2 - t1),
                      "llama_cpp_python": llama_cpp.__version__, "threads": args.threads}))


if __name__ == "__main__":
    main()
