"""ChatGLM checkpoints exactly as downloaded (ChatGLM2-6B, ChatGLM3-6B, GLM-4-9B's original
layout: one block design, one set of tensor names): config.json, tokenizer.model and weights in
safetensors or PyTorch pickle shards.

Nothing of the directory's Python code is imported.  Pickles are read with
`torch.load(weights_only=True)`, which refuses anything but tensors and plain containers.
Tensors are streamed one at a time (safetensors mmap / lazily loaded zip pickles), converted
and placed, so the full-precision checkpoint is never held next to the model.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch

from ..errors import CheckpointError
from .config import ModelConfig
from .shard_index import read_shard_index

_LAYER_KEYS = {
    "input_layernorm.weight": "attention_norm.weight",
    "self_attention.query_key_value.weight": "attention.wqkv.weight",
    "self_attention.query_key_value.bias": "attention.wqkv.bias",
    "self_attention.dense.weight": "attention.wo.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.dense_h_to_4h.weight": "feed_forward.w13.weight",
    "mlp.dense_4h_to_h.weight": "feed_forward.w2.weight",
}
_TOP_KEYS = {
    "transformer.embedding.word_embeddings.weight": "tok_embeddings.weight",
    "transformer.encoder.final_layernorm.weight": "norm.weight",
    "transformer.output_layer.weight": "output.weight",
}
# a saved buffer, never read; a P-tuning v2 prefix encoder (a whole-model save of the official demo):
# read apart by models/ptuning.py when config.json sets pre_seq_len, unused otherwise, as in the original
_IGNORED = re.compile(r"^transformer\.(rotary_pos_emb\.inv_freq|prefix_encoder\..+)$")
_LAYER = re.compile(r"^transformer\.encoder\.layers\.(\d+)\.(.+)$")


def is_chatglm_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


CHATGLM2_NAMES = re.compile(r"chatglm2|codegeex2", re.IGNORECASE)


def is_chatglm2(path: Path) -> bool:
    """ChatGLM2-6B / -32k and CodeGeeX2-6B share ChatGLM3's config and tokenizer files field for
    field; only their names tell them apart (the `_name_or_path` / `name_or_path` the release
    wrote, or the directory's own name)."""
    names = [path.name]
    for file, key in (("config.json", "_name_or_path"), ("tokenizer_config.json", "name_or_path")):
        try:
            names.append(str(json.loads((path / file).read_text(encoding="utf-8")).get(key) or ""))
        except (OSError, ValueError, AttributeError):
            pass
    return any(CHATGLM2_NAMES.search(n) for n in names)


def read_config(path: Path) -> ModelConfig:
    cfg_file = path / "config.json"
    try:
        raw = json.loads(cfg_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no config.json (is this a model directory?)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None
    arch = raw.get("model_type") or ""
    if arch != "chatglm":
        archs = ", ".join(raw.get("architectures") or []) or "none given"
        raise CheckpointError(f"{cfg_file}: unsupported architecture model_type={arch!r} "
                              f"(architectures: {archs}); glmkit loads ChatGLM2/3, GLM-4, Llama, Mistral and Qwen2 directories and GGUF files")
    for flag, want in (("rmsnorm", True), ("post_layer_norm", True), ("add_bias_linear", False),
                       ("apply_residual_connection_post_layernorm", False)):
        if raw.get(flag, want) != want:
            raise CheckpointError(f"{cfg_file}: {flag}={raw[flag]!r} is not a ChatGLM3 layout (expected {want})")
    try:
        heads = raw["num_attention_heads"]
        groups = raw["multi_query_group_num"] if raw.get("multi_query_attention") else heads
        head_dim = raw.get("kv_channels") or raw["hidden_size"] // heads
        return ModelConfig(
            family="chatglm", n_layer=raw["num_layers"], dim=raw["hidden_size"], n_head=heads,
            n_kv_head=groups, head_dim=head_dim, ffn_dim=raw["ffn_hidden_size"],
            vocab_size=raw.get("padded_vocab_size", raw.get("vocab_size")),
            context_length=raw.get("seq_length", 8192), norm_eps=raw.get("layernorm_epsilon", 1e-5),
            rope_base=10000.0 * float(raw.get("rope_ratio", 1)), rope_dims=head_dim // 2,
            qkv_bias=bool(raw.get("add_qkv_bias", True)), tied_embeddings=False,
            name=Path(raw.get("_name_or_path") or path.name).name,
        )
    except KeyError as e:
        raise CheckpointError(f"{cfg_file}: missing field {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{cfg_file}: inconsistent sizes ({e})") from None


def weight_files(path: Path) -> list[Path]:
    """The shard files that hold the weights, checked to exist."""
    shards = read_shard_index(path)
    if shards is not None:
        index_name, weight_map = shards
        files = [path / f for f in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{path}: shard(s) named in {index_name} are missing: {', '.join(missing)}")
        return files
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (path / single).is_file():
            return [path / single]
    raise CheckpointError(f"{path}: no weights found (expected model.safetensors, "
                          "model.safetensors.index.json, pytorch_model.bin or pytorch_model.bin.index.json)")


def iter_tensors(files: list[Path], names: set[str] | None = None,
                 what: str = "weights") -> Iterator[tuple[Path, str, torch.Tensor]]:
    """(file, name, tensor) for every tensor in the shards, one at a time; with `names`, only those
    (safetensors read by name; pickles memory-mapped, so the rest of a shard is never read).
    `what` names the tensors in the error a damaged file gives."""
    for f in files:
        try:
            if f.suffix == ".safetensors":
                from safetensors import safe_open
                with safe_open(str(f), framework="pt") as st:
                    for name in st.keys():
                        if names is None or name in names:
                            yield f, name, st.get_tensor(name)
            else:
                try:
                    sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as e:
                    if "mmap" not in str(e):
                        raise
                    sd = torch.load(f, map_location="cpu", weights_only=True)  # legacy, non-zip pickle
                if not isinstance(sd, dict):
                    raise CheckpointError(f"{f}: expected a dict of tensors, found {type(sd).__name__}")
                for name in sd if names is None else names & set(sd):
                    if not isinstance(sd[name], torch.Tensor):
                        raise CheckpointError(f"{f}: entry {name!r} is not a tensor")
                    yield f, name, sd[name]
                del sd
        except CheckpointError:
            raise
        except Exception as e:  # truncated/corrupt files surface as many exception types
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            if any(k in msg.lower() for k in ("weights_only", "weights only", "unpickl")):
                msg = "it contains objects other than tensors, refused for safety (loaded with weights_only=True)"
            raise CheckpointError(f"{f}: cannot read {what}: {msg}") from None


def map_name(name: str) -> str | None:
    """Checkpoint key -> our parameter name; None for ignorable buffers; KeyError if unknown."""
    if name in _TOP_KEYS:
        return _TOP_KEYS[name]
    if _IGNORED.match(name):
        return None
    m = _LAYER.match(name)
    if m and m.group(2) in _LAYER_KEYS:
        return f"layers.{m.group(1)}.{_LAYER_KEYS[m.group(2)]}"
    raise KeyError(name)


def iter_state(path: Path) -> Iterator[tuple[Path, str, torch.Tensor]]:
    """(file, our parameter name, tensor) in checkpoint order."""
    for f, name, t in iter_tensors(weight_files(path)):
        try:
            ours = map_name(name)
        except KeyError:
            raise CheckpointError(f"{f}: unexpected tensor {name!r} (not part of a ChatGLM3 checkpoint)") from None
        if ours is not None:
            yield f, ours, t
