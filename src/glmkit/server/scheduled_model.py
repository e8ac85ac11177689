"""ChatModel's `reply()` contract with one request's settings, for the server's agent runs.

The chat layer's Agent drives a model through `reply()`.  In the server it runs in a worker
thread with this adapter: each generation goes through the same ReplyStream as ChatModel.reply,
over the model's backend (the server's scheduler, shared with API requests), with the request's
SamplingParams (built once, where the request was checked), stop strings and token limit, a
Stop/disconnect event, and usage totalled over every generation of the run."""

from __future__ import annotations

import threading
from dataclasses import replace

from ..chat.reply_stream import Reply
from ..engine.requests import SamplingParams


class ScheduledModel:
    def __init__(self, chat_model, cancel: threading.Event, max_new_tokens: int,
                 stop: list[str] | None = None, params: SamplingParams | None = None):
        """`params`: the run's sampling (the server passes the one it built); without it, the
        model's defaults."""
        self.chat_model = chat_model
        self.format = chat_model.format
        self.cancel = cancel
        self.max_new_tokens = max_new_tokens
        self.params = params if params is not None else chat_model.params()
        self.stop = stop or []    # a request's stop strings: each generation ends at one, as in the API
        # totals over every generation of a run (API usage), and how the last one ended
        self.prompt_tokens = self.completion_tokens = 0
        self.finish_reason: str | None = None

    def reply(self, messages: list[dict], reply: Reply | None = None, max_new_tokens: int | None = None,
              max_length: int | None = None, stop: list[str] | None = None, params: SamplingParams | None = None,
              **sampling):
        """As ChatModel.reply, with this run's settings as defaults; sampling keywords (a Python
        caller's) change the run's SamplingParams for this generation."""
        reply = reply if reply is not None else Reply()
        sampling = {k: v for k, v in sampling.items() if v is not None}     # None: the run's own, as in ChatModel
        if params is None:
            params = replace(self.params, **sampling) if sampling else self.params    # checked again if changed
        elif sampling:
            raise TypeError(f"pass either params= or sampling keywords, not both ({', '.join(sampling)})")
        try:
            yield from self.chat_model.reply(messages, max_new_tokens or self.max_new_tokens, max_length,
                                             self.stop if stop is None else stop, reply, self.cancel, params=params)
        finally:
            self.prompt_tokens += reply.prompt_tokens
            self.completion_tokens += reply.completion_tokens
            self.finish_reason = reply.finish_reason
