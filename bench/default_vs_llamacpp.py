"""The embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF) in glmkit and in llama.cpp's own
`llama-bench` (built natively by bench/setup_llamacpp_native.sh), alternated in one run.

Each round runs llama-bench once (-p PROMPT -n NEW, its own repetitions) and `glmkit bench` once
per glmkit variant (e.g. eager and compiled); the table gives each round's figures and the median
ratio.  Also the host's copy bandwidth, since hosts of this kind vary.

    .venv/bin/python bench/default_vs_llamacpp.py [--rounds 3] [--threads 2] [--variants eager,compiled]
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from vs_llamacpp import copy_bandwidth  # noqa: E402

GLMKIT = ROOT / ".venv" / "bin" / "glmkit"
VARIANTS = {"eager": ["--no-compile"], "compiled": []}


def model_file() -> Path:
    out = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "-c",
                          "from glmkit.models.loader import default_model_path; print(default_model_path())"],
                         check=True, capture_output=True, text=True).stdout
    return Path(out.strip())


def llama_bench(exe: Path, model: Path, threads: int, prompt: int, new: int) -> dict:
    # --repack 0: a native build on these hosts has llama.cpp's AMX path, which dies with SIGSEGV at
    # its first tile instruction (ldtilecfg) here; repacking is what routes Q4_1 weights to it
    out = subprocess.run([str(exe), "-m", str(model), "-t", str(threads), "-p", str(prompt), "-n", str(new),
                          "-r", "3", "--repack", "0", "-o", "json"], check=True, capture_output=True, text=True).stdout
    rows = json.loads(out)
    pp = next(r for r in rows if r["n_prompt"] and not r["n_gen"])
    tg = next(r for r in rows if r["n_gen"] and not r["n_prompt"])
    return {"prefill_tok_s": pp["avg_ts"], "decode_tok_s": tg["avg_ts"], "build": rows[0].get("build_commit")}


def glmkit_bench(threads: int, prompt: int, new: int, extra: list[str]) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        subprocess.run([str(GLMKIT), "bench", "--threads", str(threads), "--prompt-tokens", str(prompt),
                        "--new-tokens", str(new), "--json", f.name, *extra], check=True, capture_output=True, text=True)
        r = json.loads(Path(f.name).read_text())
    run = r["runs"][0]
    return {"prefill_tok_s": run["prefill_tok_s"], "decode_tok_s": 1000 / run["decode_ms_per_step"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--variants", default="eager,compiled")
    ap.add_argument("--llama-bench", default=str(ROOT / ".llamacpp" / "build" / "bin" / "llama-bench"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "default_vs_llamacpp.json"))
    args = ap.parse_args()
    model = model_file()
    variants = args.variants.split(",")
    rounds = []
    for i in range(args.rounds):
        rnd = {"llama.cpp": llama_bench(Path(args.llama_bench), model, args.threads, args.prompt, args.new)}
        for v in variants:
            rnd[v] = glmkit_bench(args.threads, args.prompt, args.new, VARIANTS[v])
        rounds.append(rnd)
        print(json.dumps(rnd), flush=True)
    summary = {v: {k: statistics.median(r[v][k] / r["llama.cpp"][k] for r in rounds)
                   for k in ("decode_tok_s", "prefill_tok_s")} for v in variants}
    result = {"date": time.strftime("%Y-%m-%d"), "threads": args.threads, "prompt": args.prompt, "new": args.new,
              "bandwidth_gbs": copy_bandwidth(args.threads), "rounds": rounds, "median_ratio_vs_llamacpp": summary}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
