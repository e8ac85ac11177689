"""How soon `glmkit chat -p` shows its first reply byte (issue 15's goal: at most 2.0 s on the
default model, second and later runs) next to a baseline checkout, runs alternated.

    .venv/bin/python bench/first_token.py --baseline /path/to/older/checkout [--rounds 7]

Each run is a fresh process (`python -m glmkit.cli chat -p PROMPT --temperature 0`), timed from
just before its start to the first byte on its stdout, and to its exit.  One unmeasured run of
each side comes first: it fills the GGUF start cache (a fresh directory for this call, as a
second run of a user's would find it) and the page cache.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "What is the capital of France?"


def one_run(src: Path, env: dict) -> tuple[float, float]:
    cmd = [sys.executable, "-m", "glmkit.cli", "chat", "-p", PROMPT, "--temperature", "0", "--max-new-tokens", "16"]
    env = dict(env, PYTHONPATH=str(src))
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    first = proc.stdout.read(1)
    t_first = time.monotonic() - start
    proc.stdout.read()
    proc.wait()
    if proc.returncode or not first:
        raise SystemExit(f"{src}: the run failed (exit {proc.returncode})")
    return t_first, time.monotonic() - start


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", type=Path, required=True, help="a checkout whose src/ is the yardstick")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    env = {k: v for k, v in os.environ.items() if k not in ("MODEL_PATH", "PYTHONPATH")}
    env["GLMKIT_CACHE_DIR"] = tempfile.mkdtemp(prefix="glmkit-bench-cache-")
    sides = {"now": ROOT / "src", "baseline": args.baseline / "src"}
    for src in sides.values():
        one_run(src, env)                       # fills the caches; not counted
    runs = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, src in sides.items():
            runs[name].append(one_run(src, env))
    print(f"{args.rounds} rounds, medians (min-max), seconds from the command's start")
    print("| | first reply byte | exit |")
    print("|---|---|---|")
    for name, rs in runs.items():
        firsts, totals = [r[0] for r in rs], [r[1] for r in rs]
        print(f"| {name} | {statistics.median(firsts):.2f} ({min(firsts):.2f}-{max(firsts):.2f}) "
              f"| {statistics.median(totals):.2f} ({min(totals):.2f}-{max(totals):.2f}) |")
    ratio = statistics.median(a[0] / b[0] for a, b in zip(runs["now"], runs["baseline"]))
    print(f"first byte, now / baseline (median of paired ratios): {ratio:.2f}")


if __name__ == "__main__":
    main()
