"""Where each quantized matmul path wins, by row count: the one-row CPU kernels
(`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`), a kept dense copy (F.linear on bf16
weights), and int8 dequantized on the fly (`q.to(bf16)` then F.linear, scales on the output).

Shapes: one ChatGLM3-6B layer (QKV, attention output, gate+up, down) and one SmolLM2-135M layer;
random weights; bf16 activations; the best of `--repeat` timings per cell.  models/quantize.py's
DENSE_MIN_ROWS and DEQUANT_MIN_ROWS come from this table.

    .venv/bin/python bench/quant_rows.py [--rows 1,2,3,4,8,16,32,64,128,256] [--json FILE]
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from glmkit.models.quantize import QTensor, pack_int4, quantize_int4, quantize_int8  # noqa: E402

SHAPES = {"chatglm3-6b": [(4608, 4096), (4096, 4096), (27392, 4096), (4096, 13696)],
          "smollm2-135m": [(960, 576), (576, 576), (3072, 576), (576, 1536)]}


def best(f, repeat):
    f()
    out = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        f()
        out = min(out, time.perf_counter() - t0)
    return out * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,2,3,4,8,16,32,64,128,256")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--models", default="chatglm3-6b,smollm2-135m")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = [int(r) for r in args.rows.split(",")]
    results = []
    for model in args.models.split(","):
        shapes = SHAPES[model]
        g = args.group_size if model == "chatglm3-6b" else 32
        layers = []
        for n, k in shapes:
            w = torch.randn(n, k) * 0.02
            q8, s8 = quantize_int8(w)
            q4 = QTensor(4, *quantize_int4(w, g), g)
            layers.append(dict(q8=q8, s8=s8.bfloat16(), p4=pack_int4(q4.q, torch.device("cpu")),
                               sz=q4.scales.bfloat16(), dense=q4.dequantize().bfloat16()))
        for m in rows:
            xs = [torch.randn(m, k).bfloat16() for _, k in shapes]
            paths = {
                "int8 kernel": lambda: [torch.ops.aten._weight_int8pack_mm(x, L["q8"], L["s8"]) for x, L in zip(xs, layers)],
                "int8 dequant": lambda: [F.linear(x, L["q8"].to(x.dtype)) * L["s8"] for x, L in zip(xs, layers)],
                "int4 kernel": lambda: [torch.ops.aten._weight_int4pack_mm_for_cpu(x, L["p4"], g, L["sz"]) for x, L in zip(xs, layers)],
                "dense bf16": lambda: [F.linear(x, L["dense"]) for x, L in zip(xs, layers)],
            }
            row = {"model": model, "rows": m, **{p: best(f, args.repeat) for p, f in paths.items()}}
            results.append(row)
            print(f"{model:13s} rows {m:4d}  " + "  ".join(f"{p} {row[p]:8.2f} ms" for p in paths), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                                               "results": results}, indent=1))


if __name__ == "__main__":
    main()
