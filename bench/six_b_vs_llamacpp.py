"""ChatGLM3-6B shapes (random weights) in glmkit and in a native llama.cpp build, alternated in one run.

llama.cpp: `llama-bench` and `llama-quantize` from bench/setup_llamacpp_native.sh (the current
source as a user who builds it gets it, `-DGGML_NATIVE=ON`; `cmake --build .llamacpp/build --target
llama-quantize` adds the second tool), on GGUF F16 / Q8_0 / Q4_0 files written by
bench/random_gguf.py and quantized by llama.cpp itself.  glmkit: `glmkit bench --random-like
chatglm3-6b` in bf16 / int8 / int4 (group 128) at batch 1 and 8.  Each round runs every pair once,
llama.cpp first; the JSON has every figure, the median ratios and the host's copy bandwidth.

    .venv/bin/python bench/six_b_vs_llamacpp.py [--rounds 2] [--pairs Q4_0,Q8_0,F16] [--workdir /tmp/glmkit-bench]

glmkit runs with --no-compile here: at 6B a decode step is ~0.1-1 s of matmuls, and compiling
removes per-op overhead worth well under 1% of it (docs/BENCHMARKS.md); the compile itself would
cost minutes per size.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from vs_llamacpp import copy_bandwidth  # noqa: E402

GLMKIT = ROOT / ".venv" / "bin" / "glmkit"
BIN = ROOT / ".llamacpp" / "build" / "bin"
OURS = {"Q4_0": ["--quantize", "int4", "--group-size", "128"], "Q8_0": ["--quantize", "int8"],
        "F16": ["--quantize", "none", "--dtype", "bfloat16"]}


def sh(cmd) -> str:
    print("$", " ".join(map(str, cmd)), file=sys.stderr, flush=True)
    return subprocess.run(list(map(str, cmd)), check=True, capture_output=True, text=True).stdout


def llama_bench(model: Path, threads: int, prompt: int, new: int) -> dict:
    # --repack 0: see bench/default_vs_llamacpp.py (the native build's AMX path crashes on these hosts)
    rows = json.loads(sh([BIN / "llama-bench", "-m", model, "-t", threads, "-p", prompt, "-n", new, "-r", "2",
                          "--repack", "0", "-o", "json"]))
    out = {"build": rows[0].get("build_commit")}
    for r in rows:
        key = "prefill_tok_s" if r["n_prompt"] else "decode_tok_s"
        out[key] = r["avg_ts"]
    out["decode_ms"] = 1000 / out["decode_tok_s"]
    return out


def glmkit_bench(q: str, threads: int, prompt: int, new: int, work: Path) -> dict:
    js = work / f"glmkit-{q}.json"
    sh([GLMKIT, "bench", "--random-like", "chatglm3-6b", *OURS[q], "--batch", "1,8", "--no-compile",
        "--prompt-tokens", prompt, "--new-tokens", new, "--threads", threads, "--json", js])
    r = json.loads(js.read_text())
    b1, b8 = r["runs"]
    return {"decode_ms": b1["decode_ms_per_step"], "prefill_tok_s": b1["prefill_tok_s"],
            "batch8_ms": b8["decode_ms_per_step"], "batch8_over_batch1": b8["decode_ms_per_step"] / b1["decode_ms_per_step"],
            "load_s": r["load_s"], "peak_rss_mib": r["peak_rss_mib"], "model_bytes": r["model_bytes"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--pairs", default="Q4_0,Q8_0,F16")
    ap.add_argument("--workdir", default="/tmp/glmkit-bench")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "six_b_vs_llamacpp.json"))
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    pairs = args.pairs.split(",")
    f16 = work / "chatglm3-6b-random-F16.gguf"
    if not f16.exists():
        sh([ROOT / ".venv" / "bin" / "python", ROOT / "bench" / "random_gguf.py", f16, "--like", "chatglm3-6b"])
    for q in pairs:
        out = work / f"chatglm3-6b-random-{q}.gguf"
        if q != "F16" and not out.exists():
            sh([BIN / "llama-quantize", f16, out, q, args.threads])
    res = {"date": time.strftime("%Y-%m-%d"), "threads": args.threads, "prompt": args.prompt, "new": args.new,
           "bandwidth_gbs": copy_bandwidth(args.threads), "rounds": []}
    for _ in range(args.rounds):
        rnd = {}
        for q in pairs:
            theirs = llama_bench(work / f"chatglm3-6b-random-{q}.gguf", args.threads, args.prompt, args.new)
            ours = glmkit_bench(q, args.threads, args.prompt, args.new, work)
            rnd[q] = {"llama.cpp": theirs, "glmkit": ours,
                      "decode_ratio": theirs["decode_ms"] / ours["decode_ms"],
                      "prefill_ratio": ours["prefill_tok_s"] / theirs["prefill_tok_s"]}
            print(q, json.dumps(rnd[q]), file=sys.stderr, flush=True)
        res["rounds"].append(rnd)
    res["median"] = {q: {k: statistics.median(r[q][k] for r in res["rounds"]) for k in ("decode_ratio", "prefill_ratio")}
                     for q in pairs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res["median"], indent=1))


if __name__ == "__main__":
    main()
