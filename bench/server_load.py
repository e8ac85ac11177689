"""Aggregate decode throughput and time to first token of `glmkit serve` under concurrent streams.

Starts the server on loopback (embedded default model unless --model), then for each concurrency
level opens that many streaming chat requests at once and measures tokens received per second
(all streams together) and TTFT p50/p99.  Bounded: every request has max_tokens, every level runs once.

    .venv/bin/python bench/server_load.py [--levels 1,4,16,64] [--max-tokens 64] [--threads 2]
"""

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import httpx
from _server import serve

ROOT = Path(__file__).resolve().parent.parent
TOPICS = ["a dragon", "the sea", "a city at night", "a robot", "winter", "a lighthouse", "trains", "the moon"]


async def one_stream(client, url, i, max_tokens):
    body = {"model": "default", "stream": True, "max_tokens": max_tokens, "temperature": 0.7, "seed": i,
            "messages": [{"role": "user", "content": f"Write a long story about {TOPICS[i % len(TOPICS)]}."}]}
    t0 = time.perf_counter()
    first, n = None, 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            delta = json.loads(line[6:])["choices"][0]["delta"]
            if delta.get("content"):
                n += 1
                if first is None:
                    first = time.perf_counter() - t0
    return first or float("nan"), n, time.perf_counter() - t0


async def level(url, conc, max_tokens):
    async with httpx.AsyncClient() as client:
        t0 = time.perf_counter()
        res = await asyncio.gather(*(one_stream(client, url, i, max_tokens) for i in range(conc)))
        wall = time.perf_counter() - t0
    ttfts = sorted(r[0] for r in res)
    tokens = sum(r[1] for r in res)
    return {"streams": conc, "tokens": tokens, "wall_s": wall, "aggregate_tok_s": tokens / wall,
            "ttft_p50_s": statistics.median(ttfts), "ttft_p99_s": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--levels", default="1,4,16,64")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model")
    ap.add_argument("--port", type=int, default=8931)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "server_load.json"))
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    server_args = ["--threads", str(args.threads), "--max-batch", str(max(levels)), "--max-queue",
                   str(4 * max(levels)), "--kv-cache-mb", "2048", "--no-embeddings", "--log-level", "warning"]
    if args.model:
        server_args += ["--model", args.model]
    with serve(server_args, args.port) as (url, _):
        asyncio.run(level(url, 1, 8))  # warm-up
        rows = [asyncio.run(level(url, c, args.max_tokens)) for c in levels]
    base = rows[0]["aggregate_tok_s"]
    print("| streams | tokens | aggregate tok/s | × 1 stream | TTFT p50 s | TTFT p99 s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['streams']} | {r['tokens']} | {r['aggregate_tok_s']:.1f} | {r['aggregate_tok_s'] / base:.2f} "
              f"| {r['ttft_p50_s']:.2f} | {r['ttft_p99_s']:.2f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"threads": args.threads, "max_tokens": args.max_tokens, "rows": rows}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
