"""Time to first token of a conversation's next turn, with and without prefix caching.

A chat with a long history (system prompt + earlier turns, about --history tokens) on the embedded
default model: the first turn prefills everything; the next turn's prompt is the same history plus
the reply and one new message.  Measured in one run: the next turn on a scheduler with prefix
caching (it reuses the kept history) and on one without (the baseline: it prefills it all again).
Goal (speed issue): next-turn TTFT <= 20% of the first turn's.

    .venv/bin/python bench/prefix_cache.py [--threads N] [--history 1000] [--repeat 5]
"""

import argparse
import statistics
import time

import torch

import glmkit
from glmkit.engine import GenerationRequest, SamplingParams, Scheduler

FILLER = ("The quarterly report lists revenue by region, the cost of each product line, and the "
          "hiring plan for the next two quarters. ")


def history(model, tokens: int) -> list[dict]:
    messages = [{"role": "system", "content": "You are a careful analyst. Answer briefly."}]
    while len(model.encode_chat(messages)) < tokens:
        messages += [{"role": "user", "content": FILLER * 3}, {"role": "assistant", "content": FILLER}]
    return messages


def ttft(sched, model, messages) -> tuple[float, list[int]]:
    t0 = time.perf_counter()
    h = sched.submit(GenerationRequest(model.encode_chat(messages), SamplingParams(temperature=0), 16,
                                       model.format.stop_ids))
    first = h.get()
    t1 = time.perf_counter()
    return t1 - t0, [first.token] + [e.token for e in h if e.finish != "stop"]


def turns(sched, model, base):
    first_messages = base + [{"role": "user", "content": "Summarize the report."}]
    t_first, reply = ttft(sched, model, first_messages)
    next_messages = first_messages + [{"role": "assistant", "content": model.tokenizer.decode(reply)},
                                      {"role": "user", "content": "And the hiring plan?"}]
    t_next, _ = ttft(sched, model, next_messages)
    return t_first, t_next, len(model.encode_chat(first_messages)), len(model.encode_chat(next_messages))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--history", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = glmkit.load(None)
    base = history(model, args.history)
    results = {True: [], False: []}
    for i in range(args.repeat + 1):                 # the first round warms up
        for cached in (True, False):
            sched = Scheduler(model.model, max_batch=4, max_queue=None, prefix_cache=cached)
            r = turns(sched, model, base)
            if i:
                results[cached].append(r)
    med = {c: (statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs)) for c, rs in results.items()}
    n_first, n_next = results[True][0][2], results[True][0][3]
    print(f"model {model.name}, {args.threads} threads, torch {torch.__version__}, median of {args.repeat}")
    print(f"first turn: {n_first} prompt tokens, TTFT {med[True][0] * 1000:.0f} ms (cache on), "
          f"{med[False][0] * 1000:.0f} ms (cache off)")
    print(f"next turn:  {n_next} prompt tokens, TTFT {med[True][1] * 1000:.0f} ms (cache on), "
          f"{med[False][1] * 1000:.0f} ms (cache off, baseline)")
    print(f"next/first with the cache: {med[True][1] / med[True][0]:.2f} (goal <= 0.20); "
          f"next turn speed-up over the baseline: {med[False][1] / med[True][1]:.1f}x")


if __name__ == "__main__":
    main()
