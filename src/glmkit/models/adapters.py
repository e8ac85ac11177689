"""LoRA adapters in peft's own layout, for ChatGLM3, on glmkit's model blocks.

An adapter directory is what peft's `save_pretrained` writes for the Hugging Face ChatGLM3 model
(`ChatGLMForConditionalGeneration` wrapped in a `PeftModelForCausalLM`):

    adapter_config.json          peft's LoraConfig (target_modules named as in the HF checkpoint)
    adapter_model.safetensors    base_model.model.transformer.encoder.layers.N.self_attention.query_key_value.lora_A.weight, ...
    glmkit_adapter.json          glmkit's manifest: the base model's config hash (absent in adapters made elsewhere)

so the official stack loads glmkit's adapters (`PeftModel.from_pretrained`) and glmkit loads
adapters trained there.  glmkit's blocks hold the same matrices as the checkpoint, row for row
(models/hf_chatglm.py maps the names only): `attention.wqkv` is `query_key_value` ([Q; K; V]),
`attention.wo` is `dense`, `feed_forward.w13` is `dense_h_to_4h` ([gate; up]) and `feed_forward.w2`
is `dense_4h_to_h`, so an adapter's A and B apply unchanged.

Serving (`glmkit.load(..., adapter=DIR)`, `--adapter`): the adapter is merged into the weights as
they stream in, W + (alpha/r)·B·A, before any quantization; that needs neither peft nor torch's
autograd.  Training (finetune/train.py) puts peft's LoRA layers into glmkit's Transformer.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CheckpointError, GlmkitError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_BIN = "adapter_model.bin"      # older peft releases (a pickle: read with weights_only=True)
MANIFEST = "glmkit_adapter.json"
PEFT_PREFIX = "base_model.model."

# HF ChatGLM3 module name -> (its parent in the HF layer, glmkit's module in a Block)
TARGETS = {
    "query_key_value": ("self_attention", "attention.wqkv"),
    "dense": ("self_attention", "attention.wo"),
    "dense_h_to_4h": ("mlp", "feed_forward.w13"),
    "dense_4h_to_h": ("mlp", "feed_forward.w2"),
}
DEFAULT_TARGETS = tuple(TARGETS)
_OURS = {ours: hf for hf, (_, ours) in TARGETS.items()}
_OUR_MODULE = re.compile(r"^layers\.(\d+)\.(attention\.wqkv|attention\.wo|feed_forward\.w13|feed_forward\.w2)$")
_HF_KEY = re.compile(r"^(?:base_model\.model\.)?transformer\.encoder\.layers\.(\d+)\.(self_attention|mlp)\."
                     r"(query_key_value|dense|dense_h_to_4h|dense_4h_to_h)\.lora_([AB])(?:\.default)?\.weight$")
# config.json fields that name or describe a copy of a model rather than its architecture
_NOT_ARCHITECTURE = {"_name_or_path", "name_or_path", "transformers_version", "torch_dtype", "auto_map", "use_cache"}


def hf_module(layer: int, target: str) -> str:
    """The HF ChatGLM3 module path of `target` (query_key_value, ...) in layer `layer`."""
    return f"transformer.encoder.layers.{layer}.{TARGETS[target][0]}.{target}"


def our_module(layer: int, target: str) -> str:
    return f"layers.{layer}.{TARGETS[target][1]}"


def check_targets(targets) -> tuple[str, ...]:
    targets = tuple(dict.fromkeys(targets))
    bad = [t for t in targets if t not in TARGETS]
    if bad or not targets:
        raise GlmkitError(f"LoRA target module {bad[0] if bad else '(none)'!r} is not one of ChatGLM3's "
                          f"{', '.join(TARGETS)}")
    return targets


def base_config_hash(model_dir: str | Path) -> str:
    """sha256 of the base model's config.json, its architecture fields only (not its name, dtype
    or the transformers version that wrote it), as canonical JSON."""
    path = Path(model_dir) / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read the base model's config ({e})") from None
    canon = {k: v for k, v in raw.items() if k not in _NOT_ARCHITECTURE}
    return hashlib.sha256(json.dumps(canon, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# -- saving (training) --------------------------------------------------------------------------
def lora_state(model) -> dict:
    """The LoRA weights of a Transformer with peft's layers in it, under the keys peft writes for
    the HF ChatGLM3 model (float32, contiguous, on the CPU)."""
    import torch
    out = {}
    for name, p in model.named_parameters():
        m = re.match(r"^(.+)\.lora_([AB])\.default\.weight$", name)
        if not m:
            continue
        mm = _OUR_MODULE.match(m.group(1))
        if not mm:
            raise GlmkitError(f"a LoRA layer on {m.group(1)}, which has no ChatGLM3 checkpoint name")
        key = f"{PEFT_PREFIX}{hf_module(int(mm.group(1)), _OURS[mm.group(2)])}.lora_{m.group(2)}.weight"
        out[key] = p.detach().to("cpu", torch.float32).contiguous()
    return out


def save_adapter(model, out: str | Path, *, targets, r: int, alpha: float, dropout: float,
                 base: str | Path, extra: dict | None = None) -> Path:
    """Write `model`'s LoRA weights as a peft adapter directory (see the module docstring)."""
    from peft import LoraConfig
    from safetensors.torch import save_file
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=sorted(check_targets(targets)),
                        bias="none", task_type="CAUSAL_LM", base_model_name_or_path=str(base))
    config.save_pretrained(str(out))
    save_file(lora_state(model), str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    manifest = {"format": "peft-lora", "base_model": Path(base).name, "base_config_sha256": base_config_hash(base),
                **(extra or {})}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return out


# -- loading (serving) --------------------------------------------------------------------------
@dataclass
class Adapter:
    """A LoRA adapter read from its directory: per glmkit module, (A [r, in], B [out, r]) and the
    scale alpha/r (alpha/sqrt(r) for rsLoRA)."""
    path: Path
    config: dict
    weights: dict = field(default_factory=dict)   # our module name -> (A, B, scale)
    manifest: dict | None = None

    @property
    def name(self) -> str:
        return self.path.name


def read_adapter(path: str | Path) -> Adapter:
    """The adapter at `path`, checked: a peft LoRA adapter for ChatGLM3 (CheckpointError otherwise)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such adapter directory (expected {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    cfg_file = path / ADAPTER_CONFIG
    try:
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no {ADAPTER_CONFIG} (is this a peft adapter directory?), and no config.json "
                              f"with pre_seq_len (a P-tuning v2 checkpoint)") from None
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{cfg_file}: expected a JSON object")
    kind = config.get("peft_type")
    if kind != "LORA":
        raise CheckpointError(f"{cfg_file}: peft_type {kind!r}; glmkit applies LoRA adapters only")
    unsupported = [(k, config.get(k)) for k in ("use_dora", "fan_in_fan_out", "modules_to_save", "alpha_pattern",
                                                "lora_bias", "layers_to_transform")
                   if config.get(k) not in (None, False, {}, [])]
    if config.get("bias", "none") != "none":
        unsupported.append(("bias", config["bias"]))
    if unsupported:
        k, v = unsupported[0]
        raise CheckpointError(f"{cfg_file}: {k}={v!r} is not supported (glmkit merges plain LoRA: "
                              f"W + (alpha/r)·B·A on query_key_value, dense, dense_h_to_4h, dense_4h_to_h)")
    try:
        alpha = float(config["lora_alpha"])
        int(config["r"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{cfg_file}: needs numeric \"r\" and \"lora_alpha\"") from None
    tensors = _read_weights(path)
    pairs: dict[str, dict] = {}
    for key, t in tensors.items():
        m = _HF_KEY.match(key)
        if not m:
            raise CheckpointError(f"{path}: unexpected tensor {key!r} (glmkit applies LoRA to ChatGLM3's "
                                  f"{', '.join(TARGETS)} layers only)")
        layer, parent, target, ab = int(m.group(1)), m.group(2), m.group(3), m.group(4)
        if TARGETS[target][0] != parent:
            raise CheckpointError(f"{path}: unexpected tensor {key!r} ({target} belongs to {TARGETS[target][0]})")
        pairs.setdefault(our_module(layer, target), {})[ab] = t
    if not pairs:
        raise CheckpointError(f"{path}: the adapter holds no LoRA weights")
    weights = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise CheckpointError(f"{path}: {module}: lora_{'A' if 'A' not in ab else 'B'} is missing")
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise CheckpointError(f"{path}: {module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not "
                                  f"make a rank-r product")
        rank = a.shape[0]                       # the rank of this module (peft's rank_pattern may vary it)
        scale = alpha / (rank ** 0.5) if config.get("use_rslora") else alpha / rank
        weights[module] = (a, b, scale)
    manifest = None
    if (path / MANIFEST).is_file():
        try:
            manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        except (ValueError, OSError) as e:
            raise CheckpointError(f"{path / MANIFEST}: not valid JSON ({e})") from None
    return Adapter(path, config, weights, manifest)


def _read_weights(path: Path) -> dict:
    import torch
    if (path / ADAPTER_WEIGHTS).is_file():
        from safetensors.torch import load_file
        try:
            return load_file(str(path / ADAPTER_WEIGHTS))
        except Exception as e:
            raise CheckpointError(f"{path / ADAPTER_WEIGHTS}: cannot read it ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if (path / ADAPTER_WEIGHTS_BIN).is_file():
        try:
            sd = torch.load(path / ADAPTER_WEIGHTS_BIN, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{path / ADAPTER_WEIGHTS_BIN}: cannot read it as plain tensors "
                                  f"(loaded with weights_only=True: {str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        if not isinstance(sd, dict) or not all(isinstance(t, torch.Tensor) for t in sd.values()):
            raise CheckpointError(f"{path / ADAPTER_WEIGHTS_BIN}: expected a dict of tensors")
        return sd
    raise CheckpointError(f"{path}: no {ADAPTER_WEIGHTS} (or {ADAPTER_WEIGHTS_BIN})")


def check_base(adapter: Adapter, base: Path, cfg) -> None:
    """Refuse an adapter made for another base model: its manifest's config hash (glmkit adapters),
    else its layer count (adapters made elsewhere; shapes are checked as weights are merged)."""
    if cfg.family != "chatglm":
        raise CheckpointError(f"adapter {adapter.path}: LoRA adapters apply to ChatGLM3 model directories; "
                              f"{base} is a {cfg.family} model")
    want = (adapter.manifest or {}).get("base_config_sha256")
    if want:
        have = base_config_hash(base)
        if want != have:
            made_on = (adapter.manifest or {}).get("base_model") or "another model"
            raise CheckpointError(f"adapter {adapter.path} was trained on a different base model ({made_on}, config "
                                  f"sha256 {want[:12]}); {base} has config sha256 {have[:12]}. Load it onto the "
                                  f"model it was trained on")
    too_deep = sorted({int(m.split(".")[1]) for m in adapter.weights if int(m.split(".")[1]) >= cfg.n_layer})
    if too_deep:
        raise CheckpointError(f"adapter {adapter.path} adapts layer {too_deep[0]}, but {base} has {cfg.n_layer} "
                              f"layers: it was trained on a different base model")


def merge_state(state: Iterator, adapter: Adapter) -> Iterator:
    """The checkpoint's (file, name, tensor) stream with W + scale·B·A in place of each adapted W
    (computed in float32; the loader then casts, and quantizes if asked)."""
    from ..models.quantize import QTensor
    done = set()
    for file, name, tensor in state:
        module = name[:-len(".weight")] if name.endswith(".weight") else None
        if module in adapter.weights:
            if isinstance(tensor, QTensor):
                raise CheckpointError(f"{file}: {name} is already quantized; an adapter is merged into float weights "
                                      f"(load the float checkpoint, with --quantize to quantize after merging)")
            a, b, scale = adapter.weights[module]
            if b.shape[0] != tensor.shape[0] or a.shape[1] != tensor.shape[1]:
                raise CheckpointError(f"adapter {adapter.path}: {_hf_name(module)} is {b.shape[0]}x{a.shape[1]} "
                                      f"but the model's is {tensor.shape[0]}x{tensor.shape[1]}: it was trained on a "
                                      f"different base model")
            tensor = tensor.float() + scale * (b.float() @ a.float())
            done.add(module)
        yield file, name, tensor
    missing = sorted(set(adapter.weights) - done)
    if missing:
        raise CheckpointError(f"adapter {adapter.path}: the model has no {_hf_name(missing[0])}")


def _hf_name(module: str) -> str:
    m = _OUR_MODULE.match(module)
    return hf_module(int(m.group(1)), _OURS[m.group(2)]) if m else module
