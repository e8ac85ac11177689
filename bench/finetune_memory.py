"""Fine-tuning memory and speed at ChatGLM3-6B's shapes: LoRA (bf16 base) and QLoRA (int4 base).

    PYTHONPATH=src .venv/bin/python bench/finetune_memory.py [--layers 1 2 3] [--seq 1024] [--device cpu]

Issue 17's goals are on one GPU: LoRA at sequence 1024, batch 1, peak memory <= 16 GB; QLoRA
<= 8 GB.  Where no GPU is lent, this measures the same training step on the CPU and extrapolates:
a ChatGLM3 checkpoint with ChatGLM3-6B's config (hidden 4096, FFN 13696, 32 heads, 2 KV groups,
vocabulary 65024) but only --layers layers, random bf16 weights, is written to a temporary
directory and loaded through glmkit's own loader (the path `glmkit finetune` takes); each run,
in a fresh process, puts the LoRA layers on (finetune/train.py's `lora_model`: r=8, all four
targets), runs one forward and backward over --seq tokens with gradient checkpointing, and one
AdamW step.  Peak memory is the process's peak resident set during that step, weights
included (on CUDA: torch's peak allocated);
peak(layers) is fitted as a line and read off at 28 layers, ChatGLM3-6B's count.  tokens/s is
the step's (forward + backward + optimizer).

On a CPU the resident set also holds the Python interpreter and torch's libraries (~0.4 GB),
which a GPU's memory does not; the per-layer slope is the comparable part.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

SIX_B = {"hidden_size": 4096, "ffn_hidden_size": 13696, "num_attention_heads": 32, "kv_channels": 128,
         "multi_query_group_num": 2, "padded_vocab_size": 65024, "seq_length": 8192, "layers": 28}


# glibc keeps freed blocks for reuse (below 32 MiB they come from its heap, and its trim threshold
# grows), so a CPU process's resident set rises with every layer's freed activations: measured 0.53
# GB a layer for LoRA where the weights are 0.41.  Large blocks through mmap, and trimming at once,
# give the memory back as a GPU's allocator would count it (0.42 GB a layer measured).
CHILD_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20), "MALLOC_TRIM_THRESHOLD_": "0"}


def write_checkpoint(where: Path, layers: int) -> None:
    import torch
    from safetensors.torch import save_file
    tiny = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "chatglm3-tiny"
    cfg = json.loads((tiny / "config.json").read_text())
    d, f, kv = SIX_B["hidden_size"], SIX_B["ffn_hidden_size"], SIX_B["kv_channels"]
    qkv = d + 2 * SIX_B["multi_query_group_num"] * kv
    cfg.update({k: v for k, v in SIX_B.items() if k != "layers"}, num_layers=layers, _name_or_path="chatglm3-6b-shapes",
               torch_dtype="bfloat16")
    where.mkdir(parents=True)
    (where / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(0)

    def w(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)
    sd = {"transformer.embedding.word_embeddings.weight": w(SIX_B["padded_vocab_size"], d),
          "transformer.encoder.final_layernorm.weight": torch.ones(d, dtype=torch.bfloat16),
          "transformer.output_layer.weight": w(SIX_B["padded_vocab_size"], d)}
    for i in range(layers):
        p = f"transformer.encoder.layers.{i}."
        sd.update({p + "input_layernorm.weight": torch.ones(d, dtype=torch.bfloat16),
                   p + "post_attention_layernorm.weight": torch.ones(d, dtype=torch.bfloat16),
                   p + "self_attention.query_key_value.weight": w(qkv, d),
                   p + "self_attention.query_key_value.bias": w(qkv),
                   p + "self_attention.dense.weight": w(d, d),
                   p + "mlp.dense_h_to_4h.weight": w(2 * f, d),
                   p + "mlp.dense_4h_to_h.weight": w(d, f)})
    save_file(sd, str(where / "model.safetensors"))
    for name in ("tokenizer.model", "tokenizer_config.json"):
        (where / name).write_bytes((tiny / name).read_bytes())


class RssPeak:
    """The process's peak resident set while a step runs, sampled every 2 ms (ru_maxrss would
    also count the load, whose memory-mapped file pages a GPU run never holds)."""

    def __init__(self):
        self.peak, self.running = rss(), True

    def start(self):
        import threading
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while self.running:
            self.peak = max(self.peak, rss())
            time.sleep(0.002)

    def stop(self) -> int:
        self.running = False
        self.thread.join()
        return max(self.peak, rss())


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def one_step(model_dir: str, quantize: str | None, seq: int, device: str) -> dict:
    """In this process: load, put LoRA on, one training step; the peak memory and the step's time."""
    import torch
    from glmkit.finetune.train import TrainConfig, lora_model, token_losses
    from glmkit.models.loader import load_checkpoint
    from glmkit.models.quantize import QuantConfig
    cfg = TrainConfig(quantize=quantize, device=device).check()
    quant = QuantConfig.parse("int4", cfg.group_size) if quantize == "int4" else None
    model = load_checkpoint(Path(model_dir), device=device, dtype="bfloat16", quant=quant, training=True).model
    # every tensor into memory of its own: the loader hands out views of the memory-mapped file,
    # whose pages (and those read only to be quantized) would otherwise count while they stay
    # mapped, as they never would on a GPU
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.data = t.data.clone()
    import gc
    gc.collect()
    loaded = rss()
    params = lora_model(model, cfg)
    model.train()
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(5, 60000, (1, seq), generator=g).to(device)
    labels = tokens.clone()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    sampler = RssPeak().start()
    t0 = time.perf_counter()
    loss, n = token_losses(model, tokens, labels, checkpoint=True)
    (loss / n).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    took = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else sampler.stop()
    return {"peak_gb": peak / 1e9, "loaded_gb": loaded / 1e9, "step_s": took, "tokens_per_s": seq / took, "loss": float(loss / n),
            "trainable": sum(p.numel() for p in params)}


def fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least squares a + b*x."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    b = sum((x - mx) * (y - my) for x, y in points) / max(sum((x - mx) ** 2 for x, _ in points), 1e-12)
    return my - b * mx, b


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--methods", nargs="+", default=["lora", "qlora"])
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        model_dir, quantize, seq = args.child
        print(json.dumps(one_step(model_dir, None if quantize == "none" else quantize, int(seq), args.device)))
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="glmkit-ft-mem-") as tmp:
        for n in args.layers:
            ckpt = Path(tmp) / f"layers{n}"
            write_checkpoint(ckpt, n)
            for method in args.methods:
                q = "int4" if method == "qlora" else "none"
                out = subprocess.run([sys.executable, __file__, "--device", args.device, "--child", str(ckpt), q,
                                      str(args.seq)], capture_output=True, text=True, env=CHILD_ENV)
                if out.returncode:
                    sys.exit(out.stderr)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append((method, n, r))
                print(f"{method:6} layers={n}: peak {r['peak_gb']:.2f} GB (loaded {r['loaded_gb']:.2f}), step {r['step_s']:.1f} s "
                      f"({r['tokens_per_s']:.0f} tokens/s), loss {r['loss']:.3f}, trainable {r['trainable']:,}",
                      flush=True)
            import shutil
            shutil.rmtree(ckpt)
    print(f"\n| method | peak at 28 layers (fitted) | per layer | at 0 layers | tokens/s at {args.layers[0]} layer(s) |")
    print("|---|---|---|---|---|")
    for method in args.methods:
        pts = [(n, r["peak_gb"]) for m, n, r in rows if m == method]
        a, b = fit(pts)
        first = next(r for m, n, r in rows if m == method)
        print(f"| {method} | {a + b * SIX_B['layers']:.2f} GB | {b:.3f} GB | {a:.2f} GB | {first['tokens_per_s']:.0f} |")


if __name__ == "__main__":
    main()
