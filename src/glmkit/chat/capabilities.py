"""What a loaded model can be expected to do, as one rule that every edge (the terminal chat, the
web console) shows the same way.

Torch-free: it reads only the model's config and its protocol, so the chat layer stays importable
without torch (tests/test_architecture.py)."""

from __future__ import annotations

# Below this many parameters a model without a tool protocol of its own was, in our tries (the
# embedded SmolLM2-135M), rarely able to follow the <tool_call> JSON convention it is asked for.
SMALL_MODEL_PARAMETERS = 1_000_000_000


def small_model_note(model, loads_chatglm3: str = "glmkit chat -m PATH/TO/chatglm3-6b --tools builtin") -> str | None:
    """A plain sentence for a person starting tools or code with a model that will rarely call
    them: fewer than 1B parameters and no native tool protocol; None when the model is fine.
    `loads_chatglm3`: the command that would load ChatGLM3 where the note is shown."""
    if getattr(model.protocol, "native", False):
        return None
    n = model.config.parameter_count
    if n >= SMALL_MODEL_PARAMETERS:
        return None
    return (f"{model.name} is a small model (about {n / 1e6:.0f}M parameters) with no native tool protocol, "
            "so it will rarely call tools or write code to run. "
            f"`{loads_chatglm3}` loads ChatGLM3, which was trained to do both.")
