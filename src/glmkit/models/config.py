"""One config for every decoder we run.

GLM (ChatGLM3) and Llama differ only in a few switches, so a single Transformer with these
fields covers both: fused QKV with or without bias, rotary on all or part of each head, and
whether the output layer reuses the embedding.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ModelConfig:
    family: str            # "chatglm" or "llama": which checkpoint/tokenizer/chat format
    n_layer: int
    dim: int
    n_head: int
    n_kv_head: int
    head_dim: int
    ffn_dim: int           # width of each SwiGLU half
    vocab_size: int        # rows of the embedding / logits (may be padded beyond the tokenizer)
    context_length: int
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    rope_dims: int = 0     # dims of each head that rotate (interleaved pairs); 0 = all
    rope_scaling: dict | None = None   # rotary frequency scaling (Llama 3's, linear): models/hf_transformers.py
    qkv_bias: bool = False
    tied_embeddings: bool = False
    name: str = "model"

    def __post_init__(self):
        if self.rope_dims == 0:
            self.rope_dims = self.head_dim
        if self.n_head % self.n_kv_head:
            raise ValueError(f"{self.n_head} heads do not divide into {self.n_kv_head} key/value groups")

    @property
    def qkv_dim(self) -> int:
        return (self.n_head + 2 * self.n_kv_head) * self.head_dim

    @property
    def parameter_count(self) -> int:
        """The decoder's weights, from its shape alone (`glmkit models` shows it; the chat layer's
        small-model rule reads it)."""
        per_layer = (self.qkv_dim * self.dim + (self.qkv_dim if self.qkv_bias else 0)   # fused Q/K/V (+ bias)
                     + self.n_head * self.head_dim * self.dim                          # attention output
                     + 3 * self.ffn_dim * self.dim                                     # SwiGLU: gate, up, down
                     + 2 * self.dim)                                                   # two norms
        embeddings = self.vocab_size * self.dim * (1 if self.tied_embeddings else 2)
        return self.n_layer * per_layer + embeddings + self.dim
