"""What a loaded model can be expected to do, as one rule that every edge (the terminal chat now,
the web console later) shows the same way.

Torch-free: it reads only the model's config and its protocol, so the chat layer stays importable
without torch (tests/test_architecture.py)."""

from __future__ import annotations

# Below this many parameters a model without a tool protocol of its own was, in our tries (the
# embedded SmolLM2-135M), rarely able to follow the <tool_call> JSON convention it is asked for.
SMALL_MODEL_PARAMETERS = 1_000_000_000


def parameter_count(config) -> int:
    """The decoder's weights, estimated from its shape (a ModelConfig): attention, the SwiGLU MLP
    and the embedding (twice unless the output layer reuses it).  Norms and biases are left out:
    they are a rounding error next to the matrices, and only the order of magnitude matters here."""
    attention = config.dim * config.qkv_dim + config.n_head * config.head_dim * config.dim
    mlp = 3 * config.dim * config.ffn_dim
    embedding = config.vocab_size * config.dim * (1 if config.tied_embeddings else 2)
    return config.n_layer * (attention + mlp) + embedding


def small_model_note(model) -> str | None:
    """A plain sentence for a person starting tools or code with a model that will rarely call
    them: fewer than 1B parameters and no native tool protocol.  None when the model is fine."""
    if getattr(model.protocol, "native", False):
        return None
    n = parameter_count(model.config)
    if n >= SMALL_MODEL_PARAMETERS:
        return None
    return (f"{model.name} is a small model (about {n / 1e6:.0f}M parameters) with no native tool protocol, "
            "so it will rarely call tools or write code to run. "
            "`glmkit chat -m PATH/TO/chatglm3-6b --tools builtin` loads ChatGLM3, which was trained to.")
