"""N streaming chat requests at once against a running `glmkit serve`; prints the tokens received
per second, all streams together.  (bench/server_load.py starts its own server and sweeps levels;
this one measures a server you started, e.g. with or without --no-compile.)

    glmkit serve --port 8942 --no-console --no-embeddings --max-batch 16 --threads 2 [--no-compile] &
    .venv/bin/python bench/stream_burst.py 1 http://127.0.0.1:8942 128
    .venv/bin/python bench/stream_burst.py 16 http://127.0.0.1:8942 128
"""

import asyncio
import sys
import time

import httpx


async def one(client, url, i, max_tokens):
    body = {"model": "default", "stream": True, "max_tokens": max_tokens, "temperature": 0.7, "seed": i,
            "messages": [{"role": "user", "content": f"Write a long story about topic {i}."}]}
    n = 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {") and '"content"' in line:
                n += 1
    return n


async def main(streams: int, url: str, max_tokens: int):
    async with httpx.AsyncClient() as client:
        t0 = time.perf_counter()
        counts = await asyncio.gather(*(one(client, url, i, max_tokens) for i in range(streams)))
        wall = time.perf_counter() - t0
    print(f"streams {streams} tokens {sum(counts)} wall {wall:.1f}s agg {sum(counts) / wall:.1f} tok/s")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 128))
