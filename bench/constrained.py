"""Constrained decoding's cost: the default model decoding with and without a JSON schema, in one run.

    .venv/bin/python bench/constrained.py [--rounds 3] [--batch 1,8] [--new-tokens 96]

Both sides run the same Scheduler and compiled decode step, greedy, from the same prompt; the
constrained rows follow a schema whose one field is a long string, so no row stops early.  Decode
ms/step is compared (issue 14's goal: at most 10% slower at batch 1 and batch 8).
"""

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

import glmkit
from glmkit.benchmark import decode_speed
from glmkit.engine.compiled_step import CompiledDecode

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = {"type": "object", "properties": {"title": {"type": "string", "maxLength": 40},
                                          "body": {"type": "string", "minLength": 2000}},
          "required": ["title", "body"], "additionalProperties": False}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "constrained.json")
    args = ap.parse_args()
    m = glmkit.load()
    model = m.model
    prompt = m.encode_chat([{"role": "user", "content": "Write a short article as JSON with a title and a body."}])
    free = m.params(temperature=0)
    constrained = replace(free, grammar=m.json_grammar(SCHEMA))
    batches = [int(b) for b in args.batch.split(",")]
    compiled = {b: CompiledDecode(model, b, background=False) for b in batches}
    for b in batches:                           # warm-up and compile
        decode_speed(model, [prompt] * b, 8, compiled[b], free)
        compiled[b].compile([b])
        decode_speed(model, [prompt] * b, 8, compiled[b], constrained)
    runs = {b: {"free": [], "constrained": []} for b in batches}
    for r in range(args.rounds):
        for b in batches:
            order = ["free", "constrained"] if r % 2 == 0 else ["constrained", "free"]
            for kind in order:
                p = free if kind == "free" else constrained
                runs[b][kind].append(decode_speed(model, [prompt] * b, args.new_tokens, compiled[b], p)["decode_ms_per_step"])
    summary = {b: {k: statistics.median(v) for k, v in r.items()} for b, r in runs.items()}
    for b, s in summary.items():
        s["ratio"] = s["constrained"] / s["free"]
        print(f"batch {b}: free {s['free']:.2f} ms/step, constrained {s['constrained']:.2f} ms/step, "
              f"ratio {s['ratio']:.3f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(sys.argv),
                                     "threads": torch.get_num_threads(), "runs": runs, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
