"""`glmkit bench`: its options, and running glmkit.benchmark (speed, memory, or perplexity)."""

from __future__ import annotations

import argparse
import sys

from .options import add_model_options, positive


def add_parser(sub) -> None:
    b = sub.add_parser("bench", help="measure load time, memory, prefill/decode speed or perplexity",
                       description="Measure a model as the engine runs it: model bytes, load time, peak RSS, "
                                   "time to first token, prefill tokens/s and decode ms per step at each batch "
                                   "size; or perplexity of a text with --perplexity.")
    b.set_defaults(run=cmd_bench)
    add_model_options(b)
    b.add_argument("--random-like", metavar="NAME", help="random weights with a real model's shapes "
                   "(chatglm3-6b, smollm2-135m): no download needed")
    b.add_argument("--quantize-output", action="store_true", help="quantize the output layer too")
    b.add_argument("--batch", type=int_list, default=[1], help="batch sizes, comma-separated (default 1)")
    b.add_argument("--prompt-tokens", type=positive, default=128, help="prompt length per row (default 128)")
    b.add_argument("--new-tokens", type=positive, default=128, help="tokens decoded per row (default 128)")
    b.add_argument("--perplexity", metavar="FILE", help="compute perplexity of this text instead of speed")
    b.add_argument("--window", type=positive, default=512, help="perplexity context window (default 512)")
    b.add_argument("--stride", type=positive, default=256, help="perplexity window stride (default 256)")
    b.add_argument("--json", metavar="FILE", help="also write the results as JSON")


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("batch sizes must be positive")
    return values


def cmd_bench(args) -> int:
    from .. import benchmark       # imports torch: only when benchmarking
    from .options import split_adapters
    args.adapter = split_adapters(getattr(args, "adapter", None), named_ok=False)[0]
    args.progress = sys.stderr.isatty()
    result = benchmark.run(args)
    benchmark.print_table(result)
    if args.json:
        benchmark.write_json(result, args.json)
    return 0
