"""Checkpoints as transformers saves them: Llama 2 / 3.x, Mistral, Qwen2 / Qwen2.5, and GLM-4's
transformers-native layout (`GlmForCausalLM`, model_type glm).

A directory with config.json, safetensors (or pickle) shards, tokenizer.json and
tokenizer_config.json (or chat_template.jinja) for the chat template.  The families differ only
in what their config says, which becomes ModelConfig switches: QKV bias (Qwen2, GLM), tied
embeddings, rope base and scaling, rotary on part of each head (GLM), grouped KV heads, a
sliding window.

Weights stream one tensor at a time into glmkit's blocks: Q/K/V and gate/up are fused (GLM
ships gate/up fused already).  Llama-family rows of Q and K (and Q/K biases) are permuted from
transformers' rotary layout (each head's first half rotates with its second half) into ours
(adjacent pairs), as llama.cpp's converter does; GLM rotates adjacent pairs already, as ChatGLM does.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path

import torch

from ..errors import CheckpointError
from .config import ModelConfig
from .hf_chatglm import iter_tensors, weight_files

FAMILIES = ("llama", "mistral", "qwen2", "glm")
GLM = "glm"      # GlmForCausalLM: ChatGLM's blocks under transformers' names

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_LAYER_KEYS = {
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
}
# (our fused tensor, its slot, slots in all)
_FUSED = {"self_attn.q_proj.weight": ("attention.wqkv.weight", 0, 3), "self_attn.k_proj.weight": ("attention.wqkv.weight", 1, 3),
          "self_attn.v_proj.weight": ("attention.wqkv.weight", 2, 3), "self_attn.q_proj.bias": ("attention.wqkv.bias", 0, 3),
          "self_attn.k_proj.bias": ("attention.wqkv.bias", 1, 3), "self_attn.v_proj.bias": ("attention.wqkv.bias", 2, 3),
          "mlp.gate_proj.weight": ("feed_forward.w13.weight", 0, 2), "mlp.up_proj.weight": ("feed_forward.w13.weight", 1, 2),
          "mlp.gate_up_proj.weight": ("feed_forward.w13.weight", 0, 1)}       # GLM: fused as ours
_TOP_KEYS = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
             "lm_head.weight": "output.weight"}
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def model_type(path: Path) -> str | None:
    """config.json's model_type, or None when there is no readable config.json."""
    try:
        return json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def read_config(path: Path) -> ModelConfig:
    cfg_file = path / "config.json"
    raw = json.loads(cfg_file.read_text(encoding="utf-8"))
    kind = raw.get("model_type")

    def bad(field, why):
        return CheckpointError(f"{cfg_file}: {field} {why}")
    if raw.get("hidden_act", "silu") != "silu":
        raise bad("hidden_act", f"{raw['hidden_act']!r} is not supported (glmkit's blocks use SiLU)")
    if raw.get("mlp_bias"):
        raise bad("mlp_bias", "true is not supported")
    try:
        heads = int(raw["num_attention_heads"])
        dim = int(raw["hidden_size"])
        head_dim = int(raw.get("head_dim") or dim // heads)
        rope = dict(raw.get("rope_parameters") or {})         # transformers 5 keeps theta and scaling here
        rope.update(raw.get("rope_scaling") or {})
        theta = float(raw.get("rope_theta") or rope.get("rope_theta") or 10000.0)
        context = int(raw.get("max_position_embeddings", 4096))
        window = raw.get("sliding_window") if kind == "mistral" or raw.get("use_sliding_window") else None
        if window and int(window) < context:
            # attention over a sliding window is not implemented: the context ends at the window, so a
            # longer prompt gets the usual "longer than the context" error rather than wrong attention
            context = int(window)
        glm = kind == GLM
        # GLM rotates a part of each head (half, in GLM-4), in adjacent pairs as ChatGLM does
        rotary = float(raw.get("partial_rotary_factor") or rope.get("partial_rotary_factor") or (0.5 if glm else 1.0))
        return ModelConfig(
            family="chatglm" if glm else "llama", n_layer=int(raw["num_hidden_layers"]), dim=dim, n_head=heads,
            n_kv_head=int(raw.get("num_key_value_heads") or heads), head_dim=head_dim,
            ffn_dim=int(raw["intermediate_size"]), vocab_size=int(raw["vocab_size"]), context_length=context,
            norm_eps=float(raw.get("rms_norm_eps", 1e-6)), rope_base=theta, rope_dims=int(head_dim * rotary),
            rope_scaling=_rope_scaling(rope, cfg_file),
            qkv_bias=kind == "qwen2" or bool(raw.get("attention_bias", glm)),
            tied_embeddings=bool(raw.get("tie_word_embeddings", False)),
            name=Path(raw.get("_name_or_path") or path.name).name or path.name)
    except KeyError as e:
        raise bad(f"field {e.args[0]!r}", "is missing") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{cfg_file}: inconsistent sizes ({e})") from None


def _rope_scaling(rope: dict, cfg_file: Path) -> dict | None:
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind == "default":
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(rope["factor"])}
    if kind == "llama3":
        return {"rope_type": "llama3", **{k: float(rope[k]) for k in
                ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}}
    raise CheckpointError(f"{cfg_file}: rope_scaling type {kind!r} is not supported yet (supported: default, linear, llama3)")


def scale_inv_freq(inv_freq: torch.Tensor, scaling: dict | None) -> torch.Tensor:
    """Rotary frequencies as the config's rope_scaling defines them (transformers' formulas)."""
    if not scaling:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return inv_freq / scaling["factor"]
    factor, low, high, old = (scaling[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                                    "original_max_position_embeddings"))
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old / high) & (wavelen <= old / low)
    return torch.where(medium, smoothed, scaled)


def _interleave(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of one head: [first half; second half] -> pairs (i, i + d/2) adjacent."""
    rows = t.shape[0]
    return t.reshape(heads, 2, rows // heads // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def iter_state(path: Path, cfg: ModelConfig) -> Iterator[tuple[Path, str, torch.Tensor]]:
    pending: dict[str, list] = {}
    for file, name, tensor in iter_tensors(weight_files(path)):
        if _IGNORED.search(name):
            continue
        if name in _TOP_KEYS:
            yield file, _TOP_KEYS[name], tensor
            continue
        m = _LAYER.match(name)
        if not m or (m.group(2) not in _LAYER_KEYS and m.group(2) not in _FUSED):
            raise CheckpointError(f"{file}: unexpected tensor {name!r} for a {cfg.family}-family model")
        layer, key = m.groups()
        if key in _LAYER_KEYS:
            yield file, f"layers.{layer}.{_LAYER_KEYS[key]}", tensor
            continue
        ours, slot, n = _FUSED[key]
        if n == 1:
            yield file, f"layers.{layer}.{ours}", tensor
            continue
        if cfg.family == "llama" and key.startswith("self_attn.q_proj"):
            tensor = _interleave(tensor, cfg.n_head)
        elif cfg.family == "llama" and key.startswith("self_attn.k_proj"):
            tensor = _interleave(tensor, cfg.n_kv_head)
        full = f"layers.{layer}.{ours}"
        parts = pending.setdefault(full, [None] * n)
        parts[slot] = tensor
        if all(p is not None for p in parts):
            yield file, full, torch.cat(pending.pop(full), dim=0)
    if pending:
        raise CheckpointError(f"{path}: incomplete layers, missing parts of {', '.join(sorted(pending))}")


def _token(value) -> str | None:
    """tokenizer_config.json writes a token as a string or as {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


def tokenizer_and_template(path: Path):
    """(tokenizer, chat template) from tokenizer.json, tokenizer_config.json, chat_template.jinja
    and generation_config.json (whose eos_token_id lists the ids that end a turn)."""
    from ..tokenizers.hf_json import HFJsonTokenizer
    tc_file = path / "tokenizer_config.json"
    try:
        tc = json.loads(tc_file.read_text(encoding="utf-8")) if tc_file.is_file() else {}
    except ValueError as e:
        raise CheckpointError(f"{tc_file}: not valid JSON ({e})") from None
    template = tc.get("chat_template")
    if isinstance(template, list):           # named templates: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text(encoding="utf-8")
    tok = HFJsonTokenizer(path / "tokenizer.json", eos_token=_token(tc.get("eos_token")), bos_token=_token(tc.get("bos_token")))
    stops = set()
    gen = path / "generation_config.json"
    if gen.is_file():
        try:
            eos = json.loads(gen.read_text(encoding="utf-8")).get("eos_token_id")
        except ValueError as e:
            raise CheckpointError(f"{gen}: not valid JSON ({e})") from None
        stops = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tok.eos_id is None:
        if not stops:
            raise CheckpointError(f"{path}: no eos_token in tokenizer_config.json and no eos_token_id in "
                                  "generation_config.json: glmkit would not know where a reply ends")
        tok.eos_id = min(stops)
    tok.stop_ids = frozenset(stops | {tok.eos_id})
    return tok, template
