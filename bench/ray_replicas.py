"""Aggregate decode throughput of `glmkit serve --ray` with 1 replica and with 2, in one run.

For each replica count: the gateway starts a local Ray cluster with that many replicas of the
tiny fixture model (one PyTorch thread each), then, after a warm-up round, `--rounds` times opens
`--streams` streaming /v1/completions requests at once (ignore_eos, so every stream makes exactly
`--max-tokens` tokens) and measures tokens received per second, all streams together; the median
round counts.  Prints each figure and the ratio 2 replicas / 1 replica.

    .venv/bin/python bench/ray_replicas.py [--streams 16] [--max-tokens 256] [--rounds 3]
"""

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import httpx
from _server import serve

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "fixtures" / "chatglm3-tiny-32k"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def one_stream(client, url, i, max_tokens) -> int:
    body = {"model": "default", "prompt": f"Story number {i}:", "max_tokens": max_tokens, "temperature": 0.8,
            "seed": i, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    tokens = 0
    async with client.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                usage = json.loads(line[6:]).get("usage")
                if usage:
                    tokens = usage["completion_tokens"]
    return tokens


async def round_(url, streams, max_tokens) -> float:
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=streams + 4)) as client:
        t0 = time.perf_counter()
        tokens = await asyncio.gather(*(one_stream(client, url, i, max_tokens) for i in range(streams)))
        wall = time.perf_counter() - t0
    assert all(t == max_tokens for t in tokens), tokens
    return sum(tokens) / wall


def measure(replicas: int, args) -> float:
    port = free_port()
    cmd = ["--ray", "--replicas", str(replicas), "--threads", "1", "--model", str(args.model),
           "--max-batch", str(args.streams), "--no-console", "--no-embeddings", "--max-tokens", "30000",
           "--log-level", "warning", "--ray-chunk-ms", str(args.chunk_ms)]
    with serve(cmd, port, timeout=300) as (url, _):
        asyncio.run(round_(url, args.streams, 32))               # warm-up: every replica's first steps
        rates = [asyncio.run(round_(url, args.streams, args.max_tokens)) for _ in range(args.rounds)]
    rate = statistics.median(rates)
    print(f"{replicas} replica(s): {rate:.0f} tokens/s at {args.streams} streams "
          f"(rounds: {', '.join(f'{r:.0f}' for r in rates)})", flush=True)
    return rate


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--chunk-ms", type=float, default=50)
    ap.add_argument("--model", default=str(TINY))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "ray_replicas.json"))
    args = ap.parse_args()
    os.environ.setdefault("GLMKIT_NO_COMPILE", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    one = measure(1, args)
    two = measure(2, args)
    print(f"ratio 2 replicas / 1 replica: {two / one:.2f}x ({os.cpu_count()} CPUs)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"streams": args.streams, "max_tokens": args.max_tokens,
                                          "chunk_ms": args.chunk_ms, "cpus": os.cpu_count(),
                                          "one_replica_tok_s": one, "two_replicas_tok_s": two,
                                          "ratio": two / one}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
