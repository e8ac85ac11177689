"""What a loaded model can be expected to do, said plainly to the person using it."""

from __future__ import annotations

SMALL_PARAMETERS = 1_000_000_000     # below this a model without a native tool protocol rarely calls one


def parameter_count(model) -> int:
    """The number of weights of a ChatModel's network (parameters and buffers: quantized weights
    are kept as buffers); 0 when it has none to count."""
    net = getattr(model, "model", None)
    total = 0
    for get in ("parameters", "buffers"):
        try:
            total += sum(t.numel() for t in getattr(net, get)())
        except (AttributeError, TypeError):
            pass
    return total


def small_model_note(model) -> str | None:
    """A note for Tool and Code modes when the model is small (< 1B parameters) and was not
    trained on the tool protocol it is prompted with; None otherwise."""
    protocol = getattr(model, "protocol", None)
    if protocol is None or getattr(protocol, "native", False):
        return None
    count = parameter_count(model)
    if not 0 < count < SMALL_PARAMETERS:
        return None
    return (f"{getattr(model, 'name', 'This model')} is a small model ({count / 1e6:.0f}M parameters) with no native "
            "tool protocol, so it will rarely call tools or write code. "
            "`glmkit serve -m PATH/TO/chatglm3-6b` loads ChatGLM3, which was trained to do both.")
