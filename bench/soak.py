"""Soak: many concurrent streams against `glmkit serve` for minutes; nothing may fail or leak.

Starts the server on loopback (embedded default model unless --model), then keeps --streams
clients busy until --minutes have passed: each client loops over streaming chat requests
(max_tokens 16-64, usage included); every 8th request is abandoned after a few chunks, as a
client that goes away would.  Bounded: a fixed deadline, loopback only, every request bounded.

Asserts, and records in bench/results/soak.json:
  - no failed request (a non-200, a broken stream, a stream without [DONE] or usage);
  - the server's RSS after the run within --max-growth of its RSS after the warm-up minute;
  - /metrics agrees with the clients: HTTP 200s on /v1/chat/completions = requests made,
    generated tokens = the completed requests' usage plus at most max_tokens per abandoned one.

    .venv/bin/python bench/soak.py [--streams 64] [--minutes 10] [--threads 2]
"""

import argparse
import asyncio
import json
import random
import re
import sys
import time
from pathlib import Path

import httpx
from _server import serve

ROOT = Path(__file__).resolve().parent.parent
KEY = "soak-key"
TOPICS = ["a dragon", "the sea", "a city at night", "a robot", "winter", "a lighthouse", "trains", "the moon"]


class Tally:
    def __init__(self):
        self.completed = self.abandoned = self.failed = self.completion_tokens = self.chunks = 0
        self.failures: list[str] = []


async def one_request(client, url, rng, tally, n, deadline_s):
    abandon = n % 8 == 7
    max_tokens = rng.randint(16, 64)
    body = {"model": "default", "stream": True, "max_tokens": max_tokens, "temperature": 0.8, "seed": n,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": f"Tell me about {rng.choice(TOPICS)}."}]}
    done, usage, chunks = False, None, 0
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body, timeout=deadline_s) as r:
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                if chunk.get("choices"):
                    chunks += 1
                if abandon and chunks >= 3:
                    break
        tally.chunks += chunks
        if abandon:
            tally.abandoned += 1
        elif done and usage:
            tally.completed += 1
            tally.completion_tokens += usage["completion_tokens"]
        else:
            raise RuntimeError(f"stream ended without {'[DONE]' if not done else 'usage'}")
    except Exception as e:  # every failure is counted and kept, the soak goes on
        tally.failed += 1
        if len(tally.failures) < 20:
            tally.failures.append(f"{type(e).__name__}: {e}"[:300])


async def client_loop(url, i, deadline, tally, counter):
    rng = random.Random(i)
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {KEY}"}) as client:
        while time.monotonic() < deadline:
            counter[0] += 1
            await one_request(client, url, rng, tally, counter[0], deadline - time.monotonic() + 120)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def metric(text: str, name: str, labels: str = "") -> float:
    pattern = re.escape(name) + (r"\{" + labels + r"\}" if labels else "") + r" ([0-9.e+]+)$"
    found = re.search(pattern, text, re.M)
    return float(found.group(1)) if found else 0.0


async def soak(url, pid, streams, minutes, warmup_s):
    tally, counter, samples = Tally(), [0], []
    t0 = time.monotonic()
    deadline = t0 + minutes * 60
    tasks = [asyncio.create_task(client_loop(url, i, deadline, tally, counter)) for i in range(streams)]
    while any(not t.done() for t in tasks):
        await asyncio.sleep(10)
        samples.append((round(time.monotonic() - t0, 1), rss_mib(pid)))
        print(f"  {samples[-1][0]:6.0f} s  RSS {samples[-1][1]:7.1f} MiB  completed {tally.completed}  "
              f"abandoned {tally.abandoned}  failed {tally.failed}", file=sys.stderr, flush=True)
    await asyncio.gather(*tasks)
    await asyncio.sleep(2)    # abandoned streams are cancelled server-side before the counters are read
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {KEY}"}) as client:
        metrics = (await client.get(url + "/metrics")).text
    after_warmup = [rss for t, rss in samples if t >= warmup_s]
    return tally, counter[0], samples, after_warmup, metrics


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--warmup", type=float, default=60, help="seconds before the RSS baseline is taken")
    ap.add_argument("--max-growth", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model")
    ap.add_argument("--port", type=int, default=8937)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "soak.json"))
    args = ap.parse_args()
    server_args = ["--threads", str(args.threads), "--max-batch", str(args.streams), "--max-queue",
                   str(4 * args.streams), "--kv-cache-mb", "2048", "--no-embeddings", "--log-level", "warning",
                   "--api-key", KEY]
    if args.model:
        server_args += ["--model", args.model]
    with serve(server_args, args.port) as (url, proc):
        start_rss = rss_mib(proc.pid)
        tally, made, samples, after_warmup, metrics = asyncio.run(
            soak(url, proc.pid, args.streams, args.minutes, args.warmup))
        alive = proc.poll() is None
    base, end = after_warmup[0], after_warmup[-1]
    growth = (end - base) / base
    http_200 = metric(metrics, "glmkit_http_requests_total", r'path="/v1/chat/completions",status="200"')
    generated = metric(metrics, "glmkit_generated_tokens_total")
    accepted = metric(metrics, "glmkit_requests_total")
    checks = {
        "no failed request": tally.failed == 0,
        "server alive at the end": alive,
        f"RSS growth < {args.max_growth:.0%}": growth < args.max_growth,
        "HTTP 200 count = requests made": http_200 == made,
        "requests accepted = requests made": accepted == made,
        "generated tokens = completed usage + abandoned remainder":
            tally.completion_tokens <= generated <= tally.completion_tokens + 64 * tally.abandoned,
    }
    result = {"streams": args.streams, "minutes": args.minutes, "threads": args.threads, "requests": made,
              "completed": tally.completed, "abandoned": tally.abandoned, "failed": tally.failed,
              "failures": tally.failures, "completion_tokens": tally.completion_tokens,
              "tokens_per_s": tally.completion_tokens / (args.minutes * 60),
              "rss_mib": {"start": start_rss, "after_warmup": base, "end": end, "max": max(s[1] for s in samples),
                          "growth": growth},
              "metrics": {"http_200_chat": http_200, "requests_total": accepted, "generated_tokens_total": generated},
              "checks": checks, "rss_samples": samples}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"| streams | minutes | requests | completed | abandoned | failed | tokens/s | RSS after warm-up -> end "
          f"(max) MiB | growth |\n|---|---|---|---|---|---|---|---|---|\n"
          f"| {args.streams} | {args.minutes:g} | {made} | {tally.completed} | {tally.abandoned} | {tally.failed} | "
          f"{result['tokens_per_s']:.1f} | {base:.0f} -> {end:.0f} ({result['rss_mib']['max']:.0f}) | {growth:+.1%} |")
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
