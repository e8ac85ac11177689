"""What models are here: `glmkit models` (checkpoints, and PEFT adapters for them).

A checkpoint is described from its metadata alone (config.json, the quantized marker, a GGUF
header, file sizes), never by loading weights, so listing a folder of 6B checkpoints is instant.
Parameter counts follow from the config's shapes (ModelConfig), the same shapes the loader checks
every tensor against.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import CheckpointError
from . import directory, hf_chatglm, quantized_checkpoint
from .config import ModelConfig

ENV_DIRS = "GLMKIT_MODELS_DIR"


@dataclass
class ModelInfo:
    path: str
    found: str           # how it was found: "default", "$MODEL_PATH", or the models folder
    name: str
    family: str
    layout: str          # "ChatGLM (HF directory)", "GGUF", "glmkit quantized", ...
    parameters: int
    context: int
    precision: str
    bytes: int
    base: str = ""       # an adapter's base model, as its adapter_config.json names it

    def as_dict(self) -> dict:
        return asdict(self)


def parameter_count(cfg: ModelConfig) -> int:
    return cfg.parameter_count


def _size(paths) -> int:
    return sum(p.stat().st_size for p in paths if p.is_file())


def describe(path: Path, found: str = "") -> ModelInfo:
    """A checkpoint's description; CheckpointError with the reason when `path` is not one."""
    path = Path(path)
    if path.is_file():
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise CheckpointError(f"{path}: not a GGUF file")
        return _describe_gguf(path, found)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such file or directory")
    if (path / ADAPTER_CONFIG).is_file():
        return _describe_adapter(path, found)
    if quantized_checkpoint.is_quantized_dir(path):
        meta = quantized_checkpoint.read_marker(path)
        cfg, family = _config(path)
        precision = f"int{meta['bits']}" + (f" g{meta['group_size']}" if meta.get("group_size") else "")
        return ModelInfo(str(path), found, cfg.name, family, "glmkit quantized", parameter_count(cfg),
                         cfg.context_length, precision, _size(path.iterdir()))
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _describe_gguf(ggufs[0], found)
        raise CheckpointError(f"{path}: no config.json" + (f" and {len(ggufs)} .gguf files (pass one)" if ggufs else
                                                             " or .gguf file"))
    cfg, family = _config(path)
    layout = directory.layout(path)
    files = hf_chatglm.weight_files(path)
    try:
        dtype = json.loads((path / "config.json").read_text(encoding="utf-8")).get("torch_dtype") or "?"
    except ValueError:
        dtype = "?"
    return ModelInfo(str(path), found, cfg.name, family, layout, parameter_count(cfg), cfg.context_length,
                     str(dtype).replace("float", "fp").replace("bfp", "bf"), _size(files))


def _config(path: Path) -> tuple[ModelConfig, str]:
    """A directory's config and family name, whichever family it is."""
    return directory.read_config(path), directory.family(path)


ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def _describe_adapter(path: Path, found: str) -> ModelInfo:
    """A PEFT adapter directory (LoRA and kin): its kind and rank, its base model, and what its
    weights hold, read from the safetensors header (a pickle's shapes would need loading it)."""
    cfg_file = path / ADAPTER_CONFIG
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
        if not isinstance(cfg, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None
    weights = next((path / w for w in ADAPTER_WEIGHTS if (path / w).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{path}: an adapter with no weights (expected {' or '.join(ADAPTER_WEIGHTS)})")
    params, precision = 0, "?"
    if weights.suffix == ".safetensors":
        header = _safetensors_header(weights)
        tensors = [t for k, t in header.items() if k != "__metadata__"]
        params = sum(math.prod(t["shape"]) for t in tensors)
        dtypes = Counter(t["dtype"] for t in tensors)
        precision = dtypes.most_common(1)[0][0].lower().replace("f", "fp").replace("bfp", "bf") if dtypes else "?"
    base = str(cfg.get("base_model_name_or_path") or "")
    family = "?"
    if base and Path(base).expanduser().is_dir():
        try:
            family = directory.family(Path(base).expanduser())
        except (OSError, ValueError):
            pass
    kind = str(cfg.get("peft_type") or "adapter").replace("_", "-")
    layout = f"{kind} adapter" + (f" r={cfg['r']}" if isinstance(cfg.get("r"), int) else "")
    return ModelInfo(str(path), found, path.name, family, layout, params, 0, precision,
                     _size([cfg_file, weights]), base)


def _safetensors_header(f: Path) -> dict:
    """The JSON header of a safetensors file: tensor names, dtypes and shapes, without the data."""
    try:
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if not 2 <= n <= 100_000_000:
                raise ValueError("header length out of range")
            header = json.loads(fh.read(n))
        if not isinstance(header, dict) or not all(isinstance(t, dict) and isinstance(t.get("shape"), list)
                                                   for k, t in header.items() if k != "__metadata__"):
            raise ValueError("unexpected header")
        return header
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from None


def _describe_gguf(path: Path, found: str) -> ModelInfo:
    from .gguf_llama import GGUFFile
    gf = GGUFFile(path)
    cfg = gf.config()
    types = Counter(t.tensor_type.name for t in gf.reader.tensors if t.name.startswith("blk.") and len(t.shape) > 1)
    params = sum(int(t.n_elements) for t in gf.reader.tensors)
    return ModelInfo(str(path), found, cfg.name, cfg.family, "GGUF", params, cfg.context_length,
                     types.most_common(1)[0][0] if types else "?", path.stat().st_size)


def models_dirs(given: list[str] | None) -> list[Path]:
    """--models-dir folders, then those in $GLMKIT_MODELS_DIR (os.pathsep-separated)."""
    dirs = [Path(d).expanduser() for d in given or []]
    dirs += [Path(d).expanduser() for d in os.environ.get(ENV_DIRS, "").split(os.pathsep) if d]
    return list(dict.fromkeys(dirs))


def discover(dirs: list[Path], include_default: bool = True) -> tuple[list[ModelInfo], list[tuple[str, str]]]:
    """(models found, [(path, why it was skipped)])."""
    from .loader import default_model_path
    found: list[ModelInfo] = []
    skipped: list[tuple[str, str]] = []
    candidates: list[tuple[Path, str]] = []
    if include_default:
        try:
            candidates.append((default_model_path(), "default"))
        except CheckpointError as e:
            skipped.append(("(embedded default)", str(e)))
    if os.environ.get("MODEL_PATH"):
        candidates.append((Path(os.environ["MODEL_PATH"]).expanduser(), "$MODEL_PATH"))
    for d in dirs:
        if not d.is_dir():
            skipped.append((str(d), "not a directory"))
            continue
        for child in sorted(d.iterdir()):
            if child.name.startswith("."):
                continue
            if child.is_dir() or child.suffix == ".gguf":
                candidates.append((child, str(d)))
    seen = set()
    for path, how in candidates:
        key = path.resolve()
        if key in seen:
            continue
        seen.add(key)
        try:
            found.append(describe(path, how))
        except CheckpointError as e:
            skipped.append((str(path), str(e).removeprefix(f"{path}: ")))
        except (OSError, ValueError) as e:
            skipped.append((str(path), f"cannot be read ({e})"))
    return found, skipped
