"""Token ids in, token ids out: sampling, the continuous-batching scheduler (the one decode loop)
and LocalBackend, the chat layer's Backend over it.

The engine knows nothing of roles, tools or text beyond stop strings.  requests.py and text.py
are torch-free, so layers above the seam import them without loading torch; the rest is loaded
on first use."""

from .requests import GenerationRequest, QueueFull, SamplingParams, TokenEvent, budget
from .text import StopStrings

_LAZY = {"Scheduler": ".scheduler", "Handle": ".scheduler", "LocalBackend": ".backend"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["GenerationRequest", "QueueFull", "SamplingParams", "TokenEvent", "budget", "StopStrings",
           "Scheduler", "Handle", "LocalBackend"]
