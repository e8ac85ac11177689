"""glmkit's own quantized checkpoint: a directory that loads in seconds with no re-quantization.

    glmkit-quant.json     format name and version, bits, group size, source model, glmkit version
    model.safetensors     float tensors under glmkit's parameter names, and for each quantized
                          Linear `<name>.qweight` (int8 [N, K], or int4 as uint8 [N, K/2], two
                          values per byte, low nibble first) with `<name>.scales` (float32: [N] for
                          int8, [K/group, N, 2] scale and zero for int4)
    config.json and the tokenizer's files (tokenizer.model, or tokenizer.json,
    tokenizer_config.json, chat_template.jinja, generation_config.json)
                          copied from the source, so the directory is self-contained

The kernels' packed int4 layout is device-specific, so the file keeps a portable layout and the
(cheap) packing happens at load time.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import torch

from ..version import __version__
from ..errors import CheckpointError, GlmkitError
from . import directory, hf_chatglm
from .quantize import QTensor, QuantConfig, int4_fits, quantizable, quantize_int4, quantize_int8
from .transformer import Transformer

MARKER = "glmkit-quant.json"
FORMAT = "glmkit-quantized"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
COPIED = ("config.json", "tokenizer.model", "tokenizer_config.json",           # ChatGLM
          "tokenizer.json", "chat_template.jinja", "generation_config.json")     # transformers families


def is_quantized_dir(path: Path) -> bool:
    return path.is_dir() and (path / MARKER).is_file()


def read_marker(path: Path) -> dict:
    f = path / MARKER
    try:
        meta = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f}: not valid JSON ({e})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{f}: not a glmkit quantized checkpoint (format={meta.get('format')!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{f}: quantized checkpoint format version {meta.get('format_version')!r}; this glmkit "
                              f"({__version__}) reads version {FORMAT_VERSION}. Re-create it with `glmkit quantize`")
    return meta


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(p: torch.Tensor) -> torch.Tensor:
    return torch.stack([p & 15, p >> 4], dim=-1).reshape(p.shape[0], -1)


def write(src: Path, dst: Path, qc: QuantConfig, progress: bool = False) -> dict:
    """Quantize a model directory of any family (models/directory.py) tensor by tensor
    into a glmkit quantized checkpoint."""
    from safetensors.torch import save_file
    if qc.bits not in (4, 8):
        raise GlmkitError("glmkit quantize needs --bits 4 or 8")
    src, dst = Path(src), Path(dst)
    if not hf_chatglm.is_chatglm_dir(src):
        raise CheckpointError(f"{src}: glmkit quantize reads model directories (a GGUF file is already "
                              "quantized: load it as it is, or with --quantize)")
    if is_quantized_dir(src):
        raise CheckpointError(f"{src}: already a glmkit quantized checkpoint")
    if dst.exists() and any(dst.iterdir()):
        raise GlmkitError(f"{dst}: exists and is not empty; choose a new directory")
    cfg, state = read_source(src)
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and quantizable(n, qc)}
    tensors: dict[str, torch.Tensor] = {}
    fallback = []
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(expected), desc="quantizing", unit="tensor", leave=False)
    for file, name, t in state:
        if name not in expected or tuple(t.shape) != tuple(expected[name]):
            raise CheckpointError(f"{file}: tensor for {name} has shape {tuple(t.shape)}, "
                                  f"config.json implies {tuple(expected.get(name, ()))}")
        module = name.rpartition(".")[0]
        if name.endswith(".weight") and module in linears:
            N, K = t.shape
            if qc.bits == 4 and int4_fits(N, K, qc.group_size):
                q, sz = quantize_int4(t, qc.group_size)
                tensors[module + ".qweight"], tensors[module + ".scales"] = pack_nibbles(q), sz
            else:
                if qc.bits == 4:
                    fallback.append(module)
                q, s = quantize_int8(t)
                tensors[module + ".qweight"], tensors[module + ".scales"] = q, s
        else:
            tensors[name] = t.contiguous().clone()
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    shared = {"output.weight"} if cfg.tied_embeddings else set()       # the embedding, loaded once
    missing = sorted(n for n in expected if n not in tensors and n.rpartition(".")[0] + ".qweight" not in tensors
                     and n not in shared)
    if missing:
        raise CheckpointError(f"{src}: missing tensors {', '.join(missing[:5])}")
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "bits": qc.bits,
            "group_size": qc.group_size if qc.bits == 4 else None, "output_layer": qc.output_layer,
            "int8_fallback_layers": fallback, "source_model": str(src.resolve()), "family": cfg.family,
            "glmkit_version": __version__, "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    dst.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dst / WEIGHTS), metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
    # safetensors writes 0600 (through a private temporary file); a checkpoint is shared like any other file
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(dst / WEIGHTS, 0o666 & ~umask)
    for name in COPIED:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    (dst / MARKER).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


def read_source(path: Path):
    """(config, tensors) of a model directory, whichever family it is."""
    cfg = directory.read_config(path)
    from .ptuning import is_ptuning_dir
    if is_ptuning_dir(path):
        raise CheckpointError(f"{path} is a P-tuning v2 checkpoint (pre_seq_len in its config.json), whose prefix "
                              f"a quantized copy would lose: quantize the base model, then serve it with "
                              f"--adapter {path}")
    return cfg, directory.iter_state(path, cfg)


def iter_state(path: Path, meta: dict) -> Iterator[tuple[Path, str, object]]:
    """(file, parameter name, float tensor or QTensor) from a quantized checkpoint (mmap)."""
    from safetensors import safe_open
    f = path / WEIGHTS
    if not f.is_file():
        raise CheckpointError(f"{path}: {WEIGHTS} is missing")
    try:
        with safe_open(str(f), framework="pt") as st:
            names = list(st.keys())
            keys = set(names)
            for name in names:
                if name.endswith(".scales"):
                    if name.removesuffix(".scales") + ".qweight" not in keys:
                        raise CheckpointError(f"{f}: {name} has no matching .qweight")
                    continue
                if name.endswith(".qweight"):
                    module = name.removesuffix(".qweight")
                    if module + ".scales" not in keys:
                        raise CheckpointError(f"{f}: {name} has no matching .scales")
                    q, s = st.get_tensor(name), st.get_tensor(module + ".scales")
                    if q.dtype == torch.int8:
                        yield f, module + ".weight", QTensor(8, q, s)
                    elif q.dtype == torch.uint8 and s.ndim == 3:
                        group = q.shape[1] * 2 // s.shape[0]
                        yield f, module + ".weight", QTensor(4, unpack_nibbles(q), s, group)
                    else:
                        raise CheckpointError(f"{f}: {name} has unexpected dtype {q.dtype}")
                else:
                    yield f, name, st.get_tensor(name)
    except CheckpointError:
        raise
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{f}: cannot read weights: {msg}") from None
