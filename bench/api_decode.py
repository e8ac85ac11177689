"""Decode and prefill speed through the Python API (`ChatModel.generate`), for comparing two
checkouts of glmkit in one sitting: the same script runs against whichever `glmkit` is imported.

    .venv/bin/python bench/api_decode.py [QUANTIZE]                          # this checkout
    PYTHONPATH=/path/to/other/checkout/src .venv/bin/python bench/api_decode.py [QUANTIZE]

Embedded default model, 2 threads, a 128-token prompt never seen before (no prefix to reuse),
128 greedy tokens; best of 3.  QUANTIZE: omitted = the file's own Q4_1 blocks, "none" = float."""

import sys
import time

import torch

import glmkit

torch.set_num_threads(2)
q = sys.argv[1] if len(sys.argv) > 1 else None
m = glmkit.load(None, quantize=q)
g = torch.Generator().manual_seed(0)


def t(n):
    p = torch.randint(100, 30000, (128,), generator=g).tolist()    # a prompt never seen before: no prefix to reuse
    t0 = time.perf_counter()
    out = m.generate(p, max_new_tokens=n, temperature=0, stop_ids=())
    return time.perf_counter() - t0, len(out)


t(8)
dec, pre = [], []
for _ in range(3):
    a, _ = t(1); b, n = t(129)
    dec.append(1000 * (b - a) / (n - 1)); pre.append(128 / a)
print(f"{glmkit.__file__.rsplit('/src/', 1)[0]} {q or 'auto'} decode {min(dec):.2f} ms/token (best of 3), prefill {max(pre):.0f} tok/s")
