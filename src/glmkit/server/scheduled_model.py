"""ChatModel's `reply()` contract with one request's settings, for the server's agent runs.

The chat layer's Agent drives a model through `reply()`.  In the server it runs in a worker
thread with this adapter: each generation goes through the same ReplyStream as ChatModel.reply,
over the model's backend (the server's scheduler, shared with API requests), with the request's
seed, stop strings and token limit as defaults, a Stop/disconnect event, and usage totalled over
every generation of the run."""

from __future__ import annotations

import threading

from ..chat.reply_stream import Reply


class ScheduledModel:
    def __init__(self, chat_model, cancel: threading.Event, max_new_tokens: int, seed: int | None = None,
                 stop: list[str] | None = None):
        self.chat_model = chat_model
        self.format = chat_model.format
        self.cancel = cancel
        self.max_new_tokens = max_new_tokens
        self.seed = seed
        self.stop = stop or []    # a request's stop strings: each generation ends at one, as in the API
        # totals over every generation of a run (API usage), and how the last one ended
        self.prompt_tokens = self.completion_tokens = 0
        self.finish_reason: str | None = None

    def reply(self, messages: list[dict], reply: Reply | None = None, max_new_tokens: int | None = None, max_length: int | None = None, stop: list[str] | None = None,
              **sampling):
        reply = reply if reply is not None else Reply()
        sampling.setdefault("seed", self.seed)
        try:
            yield from self.chat_model.reply(messages, max_new_tokens or self.max_new_tokens, max_length,
                                             self.stop if stop is None else stop, reply, self.cancel,
                                             **sampling)
        finally:
            self.prompt_tokens += reply.prompt_tokens
            self.completion_tokens += reply.completion_tokens
            self.finish_reason = reply.finish_reason
