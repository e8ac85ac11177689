"""glmkit next to llama.cpp and transformers, measured in one run on this machine.

1. ChatGLM3-6B shapes with random weights: llama.cpp on GGUF F16 / Q8_0 / Q4_0 (written by
   bench/random_gguf.py, quantized by llama.cpp itself) against `glmkit bench --random-like
   chatglm3-6b` in bf16 / int8 / int4 (group 128), batch 1 and 8.
2. The embedded default model (SmolLM2-135M-Instruct Q4_1): llama.cpp on the file itself, glmkit
   on the same file, transformers on the same (dequantized) weights.

Needs the benchmark environment (bench/setup_llamacpp.sh) and ~25 GB of free disk in --workdir.

    .venv/bin/python bench/vs_llamacpp.py [--workdir /tmp/glmkit-bench] [--threads 2]
"""

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv" / "bin"
BENCH_VENV = ROOT / ".bench-venv" / "bin"


def sh(cmd, **kw) -> str:
    print("$", " ".join(map(str, cmd)), file=sys.stderr, flush=True)
    return subprocess.run(list(map(str, cmd)), check=True, capture_output=True, text=True, **kw).stdout


def last_json(text: str) -> dict:
    return json.loads([line for line in text.splitlines() if line.startswith("{")][-1])


QUANTIZE = r"""
import sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = {"Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "Q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0}[sys.argv[3]]
p.nthread = int(sys.argv[4])
assert llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p) == 0
"""


def copy_bandwidth(threads: int) -> float:
    """Memory bandwidth as a 1 GiB tensor copy sees it (bytes read + written per second)."""
    out = sh([VENV / "python", "-c", f"""
import time, torch
torch.set_num_threads({threads})
a, b = torch.empty(2**28), torch.ones(2**28)
a.copy_(b); t = time.perf_counter()
for _ in range(5): a.copy_(b)
print(2 * 2**30 * 5 / (time.perf_counter() - t) / 1e9)"""])
    return float(out.strip())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/glmkit-bench")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new", type=int, default=32, help="decode steps per measurement")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "vs_llamacpp.json"))
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    t = str(args.threads)
    results = {"bandwidth_gbs": copy_bandwidth(args.threads), "machine": platform.machine(), "threads": args.threads, "date": time.strftime("%Y-%m-%d"),
               "chatglm3_6b": {"llama.cpp": {}, "glmkit": {}}, "smollm2": {}}

    f16 = work / "chatglm3-6b-random-F16.gguf"
    if not f16.exists():
        sh([VENV / "python", ROOT / "bench" / "random_gguf.py", f16, "--like", "chatglm3-6b"])
    for q in ("Q8_0", "Q4_0"):
        out = work / f"chatglm3-6b-random-{q}.gguf"
        if not out.exists():
            sh([BENCH_VENV / "python", "-c", QUANTIZE, f16, out, q, t])
    for q in ("F16", "Q8_0", "Q4_0"):
        r = last_json(sh([BENCH_VENV / "python", ROOT / "bench" / "llamacpp_probe.py",
                          work / f"chatglm3-6b-random-{q}.gguf", "--threads", t, "--new", args.new]))
        results["chatglm3_6b"]["llama.cpp"][q] = r
        print(q, r, file=sys.stderr, flush=True)
    for label, extra in (("bf16", ["--quantize", "none", "--dtype", "bfloat16"]), ("int8", ["--quantize", "int8"]),
                         ("int4", ["--quantize", "int4", "--group-size", "128"]),
                         ("int4+out", ["--quantize", "int4", "--group-size", "128", "--quantize-output"])):
        js = work / f"glmkit-{label}.json"
        sh([VENV / "glmkit", "bench", "--random-like", "chatglm3-6b", *extra, "--batch", "1,8",
            "--prompt-tokens", "128", "--new-tokens", args.new, "--threads", t, "--json", js])
        results["chatglm3_6b"]["glmkit"][label] = json.loads(js.read_text())
        print(label, results["chatglm3_6b"]["glmkit"][label]["runs"], file=sys.stderr, flush=True)

    default = sh([VENV / "python", "-c", "from glmkit.models.loader import default_model_path as d; print(d())"]).strip()
    results["smollm2"]["llama.cpp"] = last_json(sh([BENCH_VENV / "python", ROOT / "bench" / "llamacpp_probe.py", default,
                                                    "--threads", t, "--new", "128", "--prompt", "512"]))
    js = work / "glmkit-smollm2.json"
    sh([VENV / "glmkit", "bench", "--batch", "1", "--prompt-tokens", "512", "--new-tokens", "128", "--threads", t, "--json", js])
    results["smollm2"]["glmkit"] = json.loads(js.read_text())
    for dtype in ("bfloat16", "float32"):
        results["smollm2"][f"transformers-{dtype}"] = last_json(sh([VENV / "python", ROOT / "bench" / "transformers_probe.py",
                                                                    "--dtype", dtype, "--threads", t]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
