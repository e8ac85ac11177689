"""`glmkit quantize`: its options, and writing a quantized checkpoint that loads without
re-quantizing."""

from __future__ import annotations

import sys
from pathlib import Path


def add_parser(sub) -> None:
    q = sub.add_parser("quantize", help="write a quantized checkpoint once, load it in seconds afterwards",
                       description="Quantize a model directory (ChatGLM3/ChatGLM2, Llama, Mistral, Qwen2) tensor by tensor (the float model is never "
                                   "held in memory) into a self-contained directory that glmkit loads with "
                                   "--model and no re-quantization.")
    q.set_defaults(run=cmd_quantize)
    q.add_argument("source", help="model directory (config.json, tokenizer files, weights)")
    q.add_argument("dest", help="new directory to write")
    q.add_argument("--bits", type=int, choices=[4, 8], default=4, help="4 (group-wise) or 8 (per channel); default 4")
    q.add_argument("--group-size", type=int, choices=[32, 64, 128, 256], default=128, help="int4 group size")
    q.add_argument("--output-layer", action="store_true", help="quantize the output layer too")


def cmd_quantize(args) -> int:
    import time

    from ..models import quantized_checkpoint
    from ..models.quantize import QuantConfig
    t0 = time.perf_counter()
    meta = quantized_checkpoint.write(args.source, args.dest, QuantConfig(args.bits, args.group_size, args.output_layer),
                                      progress=sys.stderr.isatty())
    size = sum(f.stat().st_size for f in Path(args.dest).iterdir())
    print(f"wrote {args.dest}: int{meta['bits']}"
          + (f" group {meta['group_size']}" if meta["group_size"] else "")
          + f", {size / 2**20:.1f} MiB, in {time.perf_counter() - t0:.1f} s")
    if meta["int8_fallback_layers"]:
        print(f"{len(meta['int8_fallback_layers'])} layer(s) kept in int8: their width is not a multiple of the group size")
    return 0
