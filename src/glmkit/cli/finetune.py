"""`glmkit finetune`: a LoRA adapter (QLoRA with --quantize int4) trained on ChatGLM3 fine-tuning
data (`glmkit export`'s train.jsonl / dev.jsonl), written in peft's layout for `--adapter`."""

from __future__ import annotations

import argparse
import sys

from .options import positive


def add_parser(sub) -> None:
    ft = sub.add_parser("finetune", help="train a LoRA adapter on your conversations",
                        description="Train a LoRA adapter for a ChatGLM3 model directory on ChatGLM3 fine-tuning data "
                                    "(DATA/train.jsonl, and DATA/dev.jsonl for evaluation, as `glmkit export` writes "
                                    "them; or one .jsonl file).  The adapter is written in peft's layout "
                                    "(adapter_config.json + adapter_model.safetensors); serve it with "
                                    "`glmkit chat --model DIR --adapter OUT`.")
    ft.set_defaults(run=cmd_finetune)
    ft.add_argument("-m", "--model", metavar="DIR", required=True, help="the base ChatGLM3 model directory")
    ft.add_argument("--data", metavar="PATH", required=True, help="a directory with train.jsonl (and dev.jsonl), or a .jsonl file")
    ft.add_argument("--out", metavar="DIR", required=True, help="where the adapter (and checkpoint-N/) are written")
    ft.add_argument("--method", choices=["lora"], default="lora", help="lora (QLoRA with --quantize int4)")
    ft.add_argument("--targets", default=",".join(("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")),
                    metavar="NAMES", help="comma-separated modules to adapt, named as in the HF checkpoint "
                                          "(default %(default)s)")
    ft.add_argument("--rank", type=positive, default=8, help="LoRA rank r (default %(default)s)")
    ft.add_argument("--alpha", type=float, default=32.0, help="LoRA alpha: the update is scaled by alpha/r (default %(default)s)")
    ft.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout (default %(default)s)")
    ft.add_argument("--lr", type=float, default=2e-4, help="peak learning rate of AdamW (default %(default)s)")
    ft.add_argument("--weight-decay", type=float, default=0.0)
    ft.add_argument("--epochs", type=float, default=3.0, help="passes over the training data (default %(default)s)")
    ft.add_argument("--max-steps", type=positive, default=None, help="optimizer steps (overrides --epochs)")
    ft.add_argument("--batch-size", type=positive, default=1, help="conversations per micro-batch (default %(default)s)")
    ft.add_argument("--grad-accum", type=positive, default=1, help="micro-batches per optimizer step (default %(default)s)")
    ft.add_argument("--warmup-steps", type=int, default=0, help="linear warmup before the cosine decay (default %(default)s)")
    ft.add_argument("--max-length", type=positive, default=1024, help="tokens per conversation, longer ones cut (default %(default)s)")
    ft.add_argument("--eval-steps", type=int, default=0, help="evaluate on dev.jsonl every N steps (default: at the end)")
    ft.add_argument("--save-steps", type=int, default=0, help="write OUT/checkpoint-N every N steps (default: none)")
    ft.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                    help="carry on from the latest OUT/checkpoint-N (or the one named)")
    ft.add_argument("--seed", type=int, default=0, help="seeds initialisation, data order and dropout (default %(default)s)")
    ft.add_argument("--device", default="cpu", help="cpu or cuda (or cuda:N); default cpu")
    ft.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="the base model's weights; auto = bfloat16 on CUDA and for int4, float32 on CPU")
    ft.add_argument("--quantize", choices=["none", "int4"], default="none", help="int4: QLoRA (an int4 base)")
    ft.add_argument("--group-size", type=int, default=128, choices=[32, 64, 128, 256], help="int4 group size")
    ft.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                    help="recompute activations in the backward pass (default: on for CUDA)")
    ft.add_argument("--threads", type=positive, metavar="N", help="CPU threads for PyTorch")


def cmd_finetune(args) -> int:
    from ..finetune.train import TrainConfig, finetune
    cfg = TrainConfig(method=args.method, targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()),
                      r=args.rank, alpha=args.alpha, dropout=args.dropout, lr=args.lr, weight_decay=args.weight_decay,
                      epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
                      grad_accum=args.grad_accum, warmup_steps=args.warmup_steps, max_length=args.max_length,
                      eval_steps=args.eval_steps, save_steps=args.save_steps, seed=args.seed, device=args.device,
                      dtype=None if args.dtype == "auto" else args.dtype,
                      quantize=None if args.quantize == "none" else args.quantize, group_size=args.group_size,
                      gradient_checkpointing=args.gradient_checkpointing).check()
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    s = finetune(args.model, args.data, args.out, cfg, resume=args.resume, progress=sys.stderr.isatty(),
                 log=lambda m: print(f"glmkit: {m}", file=sys.stderr, flush=True))
    dev = f", dev loss {s['dev_loss']:.4f}" if s["dev_loss"] is not None else ""
    print(f"trained {s['steps']} steps on {s['train_examples']} conversations: train loss {s['train_loss']:.4f}{dev}, "
          f"{s['tokens_per_s']:.0f} tokens/s; adapter in {s['out']} (use it with --adapter {s['out']})")
    return 0
