"""Token ids in, token ids out: sampling, the decode loop and (later) the batch scheduler.

The engine knows nothing of roles, tools or text beyond stop strings."""

from .generate import Finished, GenerationRequest, generate_batch
from .sampling import SamplingParams
from .text import StopStrings

__all__ = ["SamplingParams", "GenerationRequest", "Finished", "generate_batch", "StopStrings"]
