"""User-facing errors.

Anything raised as a GlmkitError carries one readable sentence meant for the person at the
keyboard; the CLI prints it without a traceback and exits non-zero, the server turns it into a
4xx body.  Everything else is a bug and keeps its traceback.
"""


class GlmkitError(Exception):
    """A problem with the user's input or files, explained in one message."""


class CheckpointError(GlmkitError):
    """A model directory or file that cannot be loaded (missing shard, bad shapes, ...)."""


class ContextLengthError(GlmkitError):
    """A prompt that does not fit in the model's context window."""

    def __init__(self, message: str, prompt_tokens: int, limit: int):
        super().__init__(message)
        self.prompt_tokens = prompt_tokens
        self.limit = limit


class GrammarError(GlmkitError):
    """A schema or grammar that cannot constrain decoding; the message says why (HTTP 400)."""
