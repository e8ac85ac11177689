"""P-tuning v2 checkpoints of the official ChatGLM3 fine-tuning demo, served as a KV-cache prefix.

What the demo writes (`--adapter DIR` takes either layout):

    config.json        the model's ChatGLMConfig with "pre_seq_len": P (and "prefix_projection")
    pytorch_model.bin  only transformer.prefix_encoder.* (the older finetune_chatmodel_demo, whose
                       trainer saves the trainable parameters), or the whole model in
                       model-0000N-of-0000M.safetensors / pytorch_model-*.bin shards with an index
                       (finetune_demo/finetune_hf.py, Trainer.save_model); only the prefix tensors
                       are read from it, the base weights come from --model

The prefix encoder is `transformer.prefix_encoder.embedding.weight` [P, L * 2 * G * D] (L layers,
G key/value groups, D = kv_channels); with prefix_projection an MLP, trans.0 (Linear to hidden,
tanh) then trans.2 (Linear back to L * 2 * G * D), is applied to it.  The original's get_prompt
views that output as [batch, P, L * 2, G, D], permutes it to [L * 2, P, batch, G, D] and splits it in
pairs: layer i's past keys are row 2i, its past values row 2i + 1.  Its attention then concatenates
those before the new keys and values, untouched (the prefix keys are not rotated: they have no
position), and the mask lets every token see all P of them; position ids, and so the rotary
positions of the prompt, still start at 0.  Nothing depends on the input, and dropout is off at
inference, so the prefix is a constant: computed once here, float32, per layer [G, P, D].

How glmkit runs it (models/transformer.py `set_prefix`): every row of the model's KV cache holds the
prefix keys and values in its first P slots, written when the cache is allocated, and a token at
position p lives at slot P + p.  The scheduler, the prefix cache and the compiled step keep
counting positions as before; only the Transformer adds the offset, and without a prefix the offset
is 0 and nothing else changes.  A generation's budget is its positions (the model's context), as in
the original, whose rotary table is sized by seq_length whatever pre_seq_len is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError
from .hf_chatglm import iter_tensors
from .shard_index import read_shard_index

PREFIX = "transformer.prefix_encoder."
EMBEDDING = PREFIX + "embedding.weight"
PROJECTION = tuple(PREFIX + k for k in ("trans.0.weight", "trans.0.bias", "trans.2.weight", "trans.2.bias"))
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass
class Prefix:
    """A P-tuning v2 prefix ready for the cache: per layer (keys, values), each [G, P, D] float32."""
    path: Path
    pre_seq_len: int
    projection: bool
    layers: list[tuple[torch.Tensor, torch.Tensor]]

    @property
    def name(self) -> str:
        return self.path.name


def read_config(path: Path) -> dict | None:
    """The directory's config.json as a dict, None if it has none (or it is not a JSON object)."""
    try:
        raw = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return raw if isinstance(raw, dict) else None


def is_ptuning_dir(path: str | Path) -> bool:
    """A directory whose config.json sets pre_seq_len (the official demo's P-tuning v2 output), and
    no peft adapter_config.json."""
    path = Path(path).expanduser()
    if not path.is_dir() or (path / "adapter_config.json").is_file():
        return False
    raw = read_config(path)
    return raw is not None and raw.get("pre_seq_len") not in (None, 0)


def read_prefix(path: str | Path, cfg, base: Path | str = "the model") -> Prefix:
    """The prefix of the P-tuning v2 checkpoint at `path`, checked against the base model's config
    `cfg` (models/config.py): CheckpointError, saying what differs, when it does not fit."""
    path = Path(path).expanduser()
    raw = read_config(path)
    cfg_file = path / "config.json"
    if raw is None:
        raise CheckpointError(f"{cfg_file}: missing or not a JSON object (a P-tuning v2 checkpoint has config.json "
                              f"with pre_seq_len)")
    if cfg.family != "chatglm":
        raise CheckpointError(f"P-tuning v2 checkpoint {path}: applies to ChatGLM3 model directories; {base} is a "
                              f"{cfg.family} model")
    pre_seq_len = raw.get("pre_seq_len")
    if isinstance(pre_seq_len, bool) or not isinstance(pre_seq_len, int) or pre_seq_len <= 0:
        raise CheckpointError(f"{cfg_file}: pre_seq_len={pre_seq_len!r}; expected a positive integer")
    projection = bool(raw.get("prefix_projection", False))
    # the checkpoint's own architecture fields, where it has them, against the base model's
    for field, ours in (("num_layers", cfg.n_layer), ("multi_query_group_num", cfg.n_kv_head),
                        ("kv_channels", cfg.head_dim), ("hidden_size", cfg.dim)):
        theirs = raw.get(field)
        if theirs is not None and theirs != ours:
            raise CheckpointError(f"P-tuning v2 checkpoint {path} was trained on a model with {field}={theirs}, but "
                                  f"{base} has {field}={ours}: load it onto the model it was trained on")
    tensors = _read_tensors(path, projection)
    emb = tensors[EMBEDDING]
    width = cfg.n_layer * 2 * cfg.n_kv_head * cfg.head_dim
    if emb.dim() != 2:
        raise CheckpointError(f"{path}: {EMBEDDING} has shape {tuple(emb.shape)}; expected [pre_seq_len, width]")
    if emb.shape[0] != pre_seq_len:
        raise CheckpointError(f"{path}: config.json says pre_seq_len={pre_seq_len}, but {EMBEDDING} holds "
                              f"{emb.shape[0]} prefix positions: the config and the weights come from different "
                              f"runs (fix pre_seq_len in {cfg_file} to the value the run was trained with)")
    emb = emb.float()
    if projection:
        w0, b0, w2, b2 = (tensors[k].float() for k in PROJECTION)
        if emb.shape[1] != width or w0.shape != (cfg.dim, width) or b0.shape != (cfg.dim,) or \
                w2.shape != (width, cfg.dim) or b2.shape != (width,):
            raise CheckpointError(_misfit(path, emb.shape[1], width, cfg, base) if emb.shape[1] != width else
                                  f"{path}: the prefix projection's shapes ({tuple(w0.shape)}, {tuple(w2.shape)}) do "
                                  f"not fit {base} (hidden size {cfg.dim}, prefix width {width})")
        with torch.no_grad():
            kv = torch.tanh(emb @ w0.T + b0) @ w2.T + b2
    else:
        if emb.shape[1] != width:
            raise CheckpointError(_misfit(path, emb.shape[1], width, cfg, base))
        kv = emb
    # get_prompt: [P, L*2, G, D] -> [L*2, G, P, D]; layer i = (row 2i, row 2i+1)
    kv = kv.view(pre_seq_len, cfg.n_layer * 2, cfg.n_kv_head, cfg.head_dim).permute(1, 2, 0, 3).contiguous()
    layers = [(kv[2 * i], kv[2 * i + 1]) for i in range(cfg.n_layer)]
    return Prefix(path, pre_seq_len, projection, layers)


def _misfit(path: Path, got: int, width: int, cfg, base) -> str:
    per_layer = 2 * cfg.n_kv_head * cfg.head_dim
    why = (f"it was trained on a model with {got // per_layer} layers; {base} has {cfg.n_layer}"
           if got % per_layer == 0 else
           f"{base} needs {cfg.n_layer} layers x 2 x {cfg.n_kv_head} groups x {cfg.head_dim} = {width}")
    return (f"P-tuning v2 checkpoint {path}: {EMBEDDING} is {got} wide, but {why}. Load it onto the model it "
            f"was trained on")


def _weight_files(path: Path) -> list[Path]:
    """The files that may hold the prefix: those an index names for it, else the single-file weights."""
    shards = read_shard_index(path)
    if shards is not None:
        name, weight_map = shards
        files = [path / f for k, f in weight_map.items() if k.startswith(PREFIX)]
        if not files:
            raise CheckpointError(f"{path}: {name} names no {PREFIX}* tensor: not a P-tuning v2 checkpoint "
                                  f"(config.json sets pre_seq_len, but the weights have no prefix encoder)")
        return list(dict.fromkeys(files))
    files = [path / f for f in WEIGHT_FILES if (path / f).is_file()]
    if not files:
        raise CheckpointError(f"{path}: no weights (expected pytorch_model.bin or model.safetensors holding "
                              f"{EMBEDDING}, or a shard index)")
    return files


def _read_tensors(path: Path, projection: bool) -> dict:
    """The prefix encoder's tensors, read alone (safetensors by name; pickles with weights_only=True,
    memory-mapped, so a whole-model shard is not read into memory)."""
    want = {EMBEDDING, *(PROJECTION if projection else ())}
    # cloned: a pickle's tensors are views of its memory-mapped file, which would otherwise stay mapped
    found = {name: t.clone() for _, name, t in iter_tensors(_weight_files(path), want, "the prefix encoder")}
    missing = sorted(want - set(found))
    if missing:
        hint = (" (config.json says prefix_projection=true: the checkpoint should hold the projection MLP too)"
                if projection and EMBEDDING in found else "")
        raise CheckpointError(f"{path}: no {missing[0]} in its weights{hint}")
    return found
