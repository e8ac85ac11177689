"""What a glmkit gateway in front of a remote engine adds to a streamed reply (issue 16's goal: at most
1 ms per streamed token and 10 ms to the first token), measured against asking the engine itself.

    .venv/bin/python bench/gateway_overhead.py [--model PATH] [--rounds 12] [--tokens 64] [--pin]

Two real servers on loopback: the engine (`glmkit serve --model M`) and the gateway (`glmkit serve
--engine <engine> --model M`, which renders the prompt to ids and parses the reply itself).  The
same streamed greedy chat completion goes to the engine directly and through the gateway,
alternated, one at a time; each run's time to first content and mean gap between content chunks
(from the client's clock) is recorded; the medians and their differences are printed.  Both servers
share this machine's cores, so the gateway's own CPU time is in the figure too (an engine on
another machine would only leave the network hop)."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import httpx

from _server import serve

PROMPT = [{"role": "user", "content": "Write a long story about a lighthouse keeper and the sea."}]


def one_run(url: str, tokens: int) -> tuple[float, float, int]:
    """(seconds to the first content, mean seconds between content chunks, chunks)."""
    body = {"model": "default", "messages": PROMPT, "max_tokens": tokens, "temperature": 0, "stream": True}
    start = time.perf_counter()
    stamps = []
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                stamps.append(time.perf_counter())
    if len(stamps) < 2:
        raise SystemExit(f"{url}: the reply had {len(stamps)} content chunks; ask for more tokens")
    return stamps[0] - start, (stamps[-1] - stamps[0]) / (len(stamps) - 1), len(stamps)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="checkpoint (default: the embedded default model)")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--port", type=int, default=8931)
    ap.add_argument("--pin", action="store_true",
                    help="engine on CPU 0 with one thread, gateway and client on CPU 1 (as when the engine "
                         "runs elsewhere: the gateway's work then takes nothing from the engine's cores)")
    args = ap.parse_args()
    model = ["--model", args.model] if args.model else []
    common = ["--no-console", "--no-embeddings", "--log-level", "warning"]
    engine_wrap, gateway_wrap = (["taskset", "-c", "0"], ["taskset", "-c", "1"]) if args.pin else ([], [])
    threads = ["--threads", "1"] if args.pin else []
    if args.pin:
        os.sched_setaffinity(0, {1})
    with serve([*model, *common, *threads, "--max-batch", "4"], args.port, wrap=engine_wrap) as (engine, _):
        gateway_model = model or ["--model", _default_model()]
        with serve(["--engine", engine, *gateway_model, *common], args.port + 1, wrap=gateway_wrap) as (gateway, _):
            sides = {"engine directly": engine, "through the gateway": gateway}
            for url in sides.values():
                one_run(url, args.tokens)          # warm-up: not counted
            runs = {name: [] for name in sides}
            for _ in range(args.rounds):
                for name, url in sides.items():
                    runs[name].append(one_run(url, args.tokens))
    print(f"{args.rounds} streamed greedy replies each, {args.tokens} tokens asked; medians (min-max)")
    print("| | time to first token (ms) | between tokens (ms) | chunks |")
    print("|---|---|---|---|")
    med = {}
    for name, rs in runs.items():
        ttft, gap = [r[0] * 1e3 for r in rs], [r[1] * 1e3 for r in rs]
        med[name] = (statistics.median(ttft), statistics.median(gap))
        print(f"| {name} | {med[name][0]:.1f} ({min(ttft):.1f}-{max(ttft):.1f}) "
              f"| {med[name][1]:.2f} ({min(gap):.2f}-{max(gap):.2f}) | {statistics.median(r[2] for r in rs):.0f} |")
    (d_ttft, d_gap) = (med["through the gateway"][0] - med["engine directly"][0],
                       med["through the gateway"][1] - med["engine directly"][1])
    print(f"gateway adds {d_ttft:+.1f} ms to the first token (goal <= +10) and {d_gap:+.2f} ms per token "
          f"(goal <= 1); ratio of gaps {med['through the gateway'][1] / med['engine directly'][1]:.3f}")


def _default_model() -> str:
    from glmkit.models.loader import default_model_path
    return str(default_model_path())


if __name__ == "__main__":
    main()
