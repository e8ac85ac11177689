"""Token ids in, token ids out: sampling, the continuous-batching scheduler (the one decode loop)
and the Backend seam the chat layer generates through.

The engine knows nothing of roles, tools or text beyond stop strings."""

from .backend import Backend, LocalBackend, TokenStream
from .sampling import SamplingParams
from .scheduler import GenerationRequest, Handle, QueueFull, Scheduler, TokenEvent, budget
from .text import StopStrings

__all__ = ["Backend", "LocalBackend", "TokenStream", "SamplingParams", "GenerationRequest", "Handle", "QueueFull",
           "Scheduler", "TokenEvent", "budget", "StopStrings"]
