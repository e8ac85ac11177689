"""LoRA (and QLoRA) fine-tuning of ChatGLM3 on glmkit's own Transformer, through peft.

The base model is loaded by glmkit's loader (frozen; int4 for QLoRA), peft's LoRA layers are put
on its query_key_value / dense / dense_h_to_4h / dense_4h_to_h matrices (glmkit's wqkv, wo, w13,
w2: the same matrices, row for row), and the training pass is the model's own causal forward
without a KV cache (Transformer.forward_train).  Loss: the mean cross entropy over the learned
tokens of a whole optimizer step (all its micro-batches), so batch size x accumulation trade
freely.  AdamW, linear warmup then cosine decay to zero, gradient clipping.  The adapter is
written in peft's layout (models/adapters.py): at the end to OUT, every `save_steps` to
OUT/checkpoint-STEP with the optimizer's state, from which `resume` carries on exactly.

Reproducible: the seed fixes the LoRA initialisation, the data order (a permutation per epoch)
and dropout; a resumed run restores the random state it saved.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import GlmkitError
from ..models.adapters import ADAPTER_WEIGHTS, DEFAULT_TARGETS, TARGETS, check_targets, hf_module, save_adapter
from .data import IGNORE, read_conversations, tokenize_conversation
from .export import DEV, TRAIN

STATE = "trainer_state.pt"           # optimizer, schedule and random state (plain tensors: weights_only)
STATE_JSON = "trainer_state.json"    # step, losses, the run's settings


@dataclass
class TrainConfig:
    method: str = "lora"                 # "lora"; with quantize="int4", QLoRA
    targets: tuple = DEFAULT_TARGETS     # HF ChatGLM3 module names
    r: int = 8
    alpha: float = 32.0
    dropout: float = 0.05
    lr: float = 2e-4
    weight_decay: float = 0.0
    epochs: float = 3.0
    max_steps: int | None = None         # overrides epochs
    batch_size: int = 1
    grad_accum: int = 1
    warmup_steps: int = 0
    max_length: int = 1024
    max_grad_norm: float = 1.0
    eval_steps: int = 0                  # 0: evaluate at the end only
    save_steps: int = 0                  # 0: no intermediate checkpoints
    seed: int = 0
    device: str = "cpu"
    dtype: str | None = None             # default: bfloat16 on CUDA (and for int4), float32 on CPU
    quantize: str | None = None          # "int4": QLoRA
    group_size: int = 128
    gradient_checkpointing: bool | None = None   # default: on for CUDA
    extra: dict = field(default_factory=dict)

    def check(self):
        if self.method != "lora":
            raise GlmkitError(f"unknown fine-tuning method {self.method!r}; this version trains LoRA (--method lora)")
        self.targets = check_targets(self.targets)
        for name in ("r", "batch_size", "grad_accum", "max_length"):
            if getattr(self, name) < 1:
                raise GlmkitError(f"{name.replace('_', '-')} must be at least 1")
        if self.lr <= 0 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise GlmkitError("learning rate and alpha must be positive, dropout in [0, 1)")
        if self.max_steps is not None and self.max_steps < 1:
            raise GlmkitError("max-steps must be at least 1")
        if self.quantize not in (None, "none", "int4"):
            raise GlmkitError(f"--quantize {self.quantize}: training takes a float base or an int4 one (QLoRA)")
        return self

    def same_run(self) -> dict:
        """The settings a resumed run must share with the one that saved the checkpoint."""
        d = asdict(self)
        d["targets"] = list(d["targets"])
        for k in ("device", "eval_steps", "save_steps", "extra", "gradient_checkpointing"):
            d.pop(k)
        return d


# -- data ---------------------------------------------------------------------------------------
def data_files(data: str | Path) -> tuple[Path, Path | None]:
    """(train, dev or None): a directory with train.jsonl (and dev.jsonl), as `glmkit export`
    writes, or one JSON Lines file (no dev split)."""
    data = Path(data)
    if data.is_dir():
        if not (data / TRAIN).is_file():
            raise GlmkitError(f"{data}: no {TRAIN} (a data directory holds {TRAIN} and optionally {DEV}, "
                              f"as `glmkit export` writes them)")
        return data / TRAIN, (data / DEV if (data / DEV).is_file() else None)
    if data.is_file():
        return data, None
    raise GlmkitError(f"{data}: no such data directory or file")


def encode(path: Path, chat_format, max_length: int) -> tuple[list[tuple[list[int], list[int]]], int]:
    """(examples, how many were left out because nothing learned fits in max_length)."""
    examples, dropped = [], 0
    for record in read_conversations(path, all_errors=True):
        ids, labels = tokenize_conversation(record, chat_format, max_length)
        if len(ids) < 2 or all(x == IGNORE for x in labels[1:]):
            dropped += 1
            continue
        examples.append((ids, labels))
    return examples, dropped


def batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Epoch `epoch`'s batches of example indices: a permutation fixed by (seed, epoch)."""
    import torch
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def collate(examples, idx, pad_id: int, device):
    import torch
    rows = [examples[i] for i in idx]
    T = max(len(ids) for ids, _ in rows)
    tokens = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    for b, (ids, lab) in enumerate(rows):
        tokens[b, :len(ids)] = torch.tensor(ids)
        labels[b, :len(lab)] = torch.tensor(lab)
    return tokens.to(device), labels.to(device)


def token_losses(model, tokens, labels, checkpoint: bool = False):
    """(sum of the cross entropy over learned tokens, their count); labels[i] is the target at
    position i, predicted from position i-1 (the Hugging Face convention data.py follows)."""
    import torch.nn.functional as F
    logits = model.forward_train(tokens, checkpoint=checkpoint)[:, :-1].float()
    target = labels[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE,
                           reduction="sum")
    return loss, int((target != IGNORE).sum())


def evaluate(model, examples, batch_size: int, pad_id: int, device) -> float:
    """Mean loss per learned token over `examples` (dropout off)."""
    import torch
    was = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            tokens, labels = collate(examples, list(range(i, min(i + batch_size, len(examples)))), pad_id, device)
            loss, n = token_losses(model, tokens, labels)
            total, count = total + float(loss), count + n
    model.train(was)
    return total / max(count, 1)


# -- the model ----------------------------------------------------------------------------------
def lora_model(model, cfg: TrainConfig):
    """Put peft's LoRA layers on `model`'s target matrices (in place); only they train.  Under
    QLoRA every int4 layer is made differentiable with respect to its input (qlora.py)."""
    import torch
    from peft import LoraConfig, inject_adapter_in_model
    from ..models.quantize import Int4Linear
    leaves = [TARGETS[t][1].rpartition(".")[2] for t in cfg.targets]      # wqkv, wo, w13, w2
    lc = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=leaves, bias="none")
    if any(isinstance(m, Int4Linear) for m in model.modules()):
        from .qlora import Int4LoraLinear, make_differentiable
        make_differentiable(model)
        lc._register_custom_module({Int4Linear: Int4LoraLinear})
    torch.manual_seed(cfg.seed)
    inject_adapter_in_model(lc, model)
    trainable = []
    for name, p in model.named_parameters():
        if ".lora_" in name:
            p.data = p.data.float()      # fp32 adapter weights whatever the base's dtype
            p.requires_grad_(True)
            trainable.append(p)
        else:
            p.requires_grad_(False)
    if not trainable:
        raise GlmkitError("no LoRA layer was placed (the model has none of the target modules)")
    return trainable


def load_lora_weights(model, adapter_dir: Path) -> None:
    """Copy a saved adapter's weights (models/adapters.py keys) into `model`'s LoRA layers."""
    import torch
    from safetensors.torch import load_file
    saved = load_file(str(adapter_dir / ADAPTER_WEIGHTS))
    params = dict(model.named_parameters())
    for layer in range(model.cfg.n_layer):
        for target, (_, ours) in TARGETS.items():
            for ab in "AB":
                key = f"base_model.model.{hf_module(layer, target)}.lora_{ab}.weight"
                name = f"layers.{layer}.{ours}.lora_{ab}.default.weight"
                if (key in saved) != (name in params):
                    raise GlmkitError(f"{adapter_dir}: does not match this run's LoRA layers ({key})")
                if key in saved:
                    with torch.no_grad():
                        params[name].copy_(saved[key])


def schedule(step: int, warmup: int, total: int) -> float:
    """The learning rate's multiplier at optimizer step `step` (0-based): linear warmup, then cosine to 0."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# -- the run ------------------------------------------------------------------------------------
def finetune(model_path, data, out, cfg: TrainConfig | None = None, resume: str | Path | bool | None = None,
             progress: bool = False, log=print) -> dict:
    """Train a LoRA adapter on `data` (finetune/data.py's format) for the ChatGLM3 model at
    `model_path`; write it to `out`.  `resume`: True (the latest OUT/checkpoint-*) or a checkpoint
    directory.  Returns a summary: steps, last train loss, dev loss (or None), tokens/s, out."""
    import torch
    from ..chat import chat_format_for
    from ..models.loader import load_checkpoint, resolve_model_path
    from ..models.quantize import QuantConfig
    cfg = (cfg or TrainConfig()).check()
    out = Path(out)
    train_file, dev_file = data_files(data)
    base = resolve_model_path(model_path)
    if not base.is_dir():
        raise GlmkitError(f"{base}: fine-tuning needs a ChatGLM3 model directory (config.json + weights)")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise GlmkitError("--device cuda was asked for but no CUDA GPU is available to PyTorch")
    quant = QuantConfig.parse(cfg.quantize, cfg.group_size) if cfg.quantize == "int4" else None
    dtype = cfg.dtype or ("bfloat16" if cfg.device.startswith("cuda") or quant else "float32")
    start_from = _checkpoint_to_resume(out, resume)

    ckpt = load_checkpoint(base, device=cfg.device, dtype=dtype, quant=quant, training=True)
    model = ckpt.model
    fmt = chat_format_for(ckpt)
    train, dropped = encode(train_file, fmt, cfg.max_length)
    dev, _ = encode(dev_file, fmt, cfg.max_length) if dev_file else ([], 0)
    if not train:
        raise GlmkitError(f"{train_file}: no conversation has anything to learn within --max-length {cfg.max_length}")
    if dropped:
        log(f"left out {dropped} conversation(s) whose learned turns start beyond --max-length {cfg.max_length}")
    pad_id = getattr(ckpt.tokenizer, "pad_id", 0) or 0

    params = lora_model(model, cfg)
    model.train()
    per_epoch = math.ceil(len(train) / cfg.batch_size)
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * per_epoch / cfg.grad_accum))
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: schedule(s, cfg.warmup_steps, total))
    checkpointing = cfg.device.startswith("cuda") if cfg.gradient_checkpointing is None else cfg.gradient_checkpointing
    step, history = 0, []
    if start_from is not None:
        step, history = _restore(start_from, model, opt, sched, cfg)
        log(f"resuming from {start_from} at step {step}")

    def micro_batches(first: int):
        """Micro-batches (index lists) from number `first` on, epoch after epoch."""
        epoch, k = divmod(first, per_epoch)
        while True:
            for idx in batches(len(train), cfg.batch_size, cfg.seed, epoch)[k:]:
                yield idx
            epoch, k = epoch + 1, 0

    stream = micro_batches(step * cfg.grad_accum)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=total, initial=step, desc="finetune", unit="step")
    dev_loss = None
    tokens_seen, t0 = 0, time.perf_counter()
    while step < total:
        group = [collate(train, next(stream), pad_id, cfg.device) for _ in range(cfg.grad_accum)]
        learned = sum(int((lab[:, 1:] != IGNORE).sum()) for _, lab in group)
        step_loss = 0.0
        for tokens, labels in group:
            loss, _ = token_losses(model, tokens, labels, checkpoint=checkpointing)
            (loss / learned).backward()
            step_loss += float(loss.detach()) / learned
            tokens_seen += int(tokens.numel())
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        history.append(step_loss)
        rate = tokens_seen / max(time.perf_counter() - t0, 1e-9)
        if bar is not None:
            bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{rate:.0f}", lr=f"{sched.get_last_lr()[0]:.2e}")
            bar.update(1)
        if dev and cfg.eval_steps and step % cfg.eval_steps == 0 and step < total:
            dev_loss = evaluate(model, dev, cfg.batch_size, pad_id, cfg.device)
            _say(bar, log, f"step {step}: train loss {step_loss:.4f}, dev loss {dev_loss:.4f}")
        if cfg.save_steps and step % cfg.save_steps == 0 and step < total:
            _save_checkpoint(out / f"checkpoint-{step}", model, opt, sched, cfg, base, step, history)
    if bar is not None:
        bar.close()
    if dev:
        dev_loss = evaluate(model, dev, cfg.batch_size, pad_id, cfg.device)
    summary = {"steps": step, "train_loss": history[-1] if history else None, "dev_loss": dev_loss,
               "tokens_per_s": tokens_seen / max(time.perf_counter() - t0, 1e-9), "out": str(out),
               "train_examples": len(train), "dev_examples": len(dev)}
    save_adapter(model, out, targets=cfg.targets, r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, base=base,
                 extra={"method": "qlora" if quant else "lora", "steps": step, "seed": cfg.seed,
                        "train_loss": summary["train_loss"], "dev_loss": dev_loss, **cfg.extra})
    return summary


def _say(bar, log, line: str):
    if bar is not None:
        bar.write(line)
    else:
        log(line)


def _save_checkpoint(where: Path, model, opt, sched, cfg: TrainConfig, base: Path, step: int, history: list):
    import torch
    save_adapter(model, where, targets=cfg.targets, r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, base=base,
                 extra={"steps": step, "seed": cfg.seed})
    state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": torch.get_rng_state(),
             "history": torch.tensor(history, dtype=torch.float64)}
    if torch.cuda.is_available() and cfg.device.startswith("cuda"):
        state["cuda_rng"] = torch.cuda.get_rng_state()
    torch.save(state, where / STATE)
    (where / STATE_JSON).write_text(json.dumps({"step": step, "config": cfg.same_run()}, indent=2) + "\n",
                                    encoding="utf-8")


def _checkpoint_to_resume(out: Path, resume) -> Path | None:
    if not resume:
        return None
    if resume is True:
        found = sorted((p for p in out.glob("checkpoint-*") if (p / STATE).is_file() and p.name[11:].isdigit()),
                       key=lambda p: int(p.name[11:]))
        if not found:
            raise GlmkitError(f"--resume: no checkpoint in {out} (checkpoints are written every --save-steps)")
        return found[-1]
    path = Path(resume)
    if not (path / STATE).is_file():
        raise GlmkitError(f"--resume {path}: not a training checkpoint (no {STATE})")
    return path


def _restore(where: Path, model, opt, sched, cfg: TrainConfig) -> tuple[int, list]:
    import torch
    saved = json.loads((where / STATE_JSON).read_text(encoding="utf-8"))
    differs = [k for k, v in cfg.same_run().items() if saved["config"].get(k) != v]
    if differs:
        raise GlmkitError(f"--resume {where}: that run had different settings ({', '.join(differs)}); "
                          f"resume with the same ones")
    load_lora_weights(model, where)
    state = torch.load(where / STATE, map_location="cpu", weights_only=True)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng"])
    return int(saved["step"]), state["history"].tolist()
