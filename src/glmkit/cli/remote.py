"""`glmkit chat --server URL`: the plain chat talking to a running `glmkit serve` (or any
OpenAI-compatible server) through /v1/chat/completions, streamed, instead of loading a model:
an instant start, the model already warm in the server.

RemoteModel stands in for the ChatModel where the plain chat uses it (name, context_length,
params, fit, stream_chat).  urllib only: no new dependency, and no torch is imported."""

from __future__ import annotations

import http.client
import json
import os
import queue
import threading
import urllib.error
import urllib.request
from types import SimpleNamespace

from ..errors import GlmkitError
from .slash import SAMPLING



class RemoteModel:
    def __init__(self, url: str, api_key: str | None = None, timeout: float = 600):
        base = url.rstrip("/")
        self.base = base if base.endswith("/v1") else base + "/v1"
        self.api_key = api_key if api_key is not None else os.environ.get("GLMKIT_API_KEY")
        self.timeout = timeout
        listing = self._request("GET", "/models")
        data = listing.get("data") if isinstance(listing, dict) else None
        card = data[0] if isinstance(data, list) and data else None
        if not isinstance(card, dict) or not isinstance(card.get("id"), str):
            raise GlmkitError(f"{self.base}/models names no model; is this a glmkit (or OpenAI-compatible) server?")
        self.name = card["id"]
        self.context_length = card.get("context_length") or card.get("max_model_len") or 0

    def start_compiling(self) -> None:
        pass        # the server's business

    def params(self, **overrides):
        """The sampling sent with each request; None leaves a value to the server's defaults.  The
        values are checked here as a local model checks them, so /set refuses a bad one at once."""
        from ..engine.requests import SamplingParams
        given = {k: v for k, v in overrides.items() if v is not None}
        SamplingParams(**given)         # GlmkitError for a bad value
        return SimpleNamespace(**{k: overrides.get(k) for k in SAMPLING})

    def fit(self, messages: list[dict], reserve: int, max_length: int | None = None):
        """No tokenizer here: the server refuses a conversation that outgrows its context."""
        return list(messages), 0

    def stream_chat(self, messages: list[dict], params=None, max_new_tokens: int | None = None,
                    max_length: int | None = None, stop: list[str] | None = None, reply=None, cancel=None):
        from ..chat.reply_stream import Cancelled
        body = {"model": self.name, "stream": True, "stream_options": {"include_usage": True},
                "messages": [{"role": m["role"], "content": m["content"]} for m in messages]}
        if max_new_tokens:
            body["max_tokens"] = max_new_tokens
        if stop:
            body["stop"] = stop
        for k in SAMPLING:
            if params is not None and getattr(params, k, None) is not None:
                body[k] = getattr(params, k)
        text: list[str] = []
        with self._open("POST", "/chat/completions", body) as response:
            for raw in self._lines(response, cancel, Cancelled):
                line = raw.decode("utf-8", "replace").strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                try:
                    chunk = json.loads(data)
                except ValueError:
                    raise GlmkitError(f"the server sent something that is not JSON: {data[:200]!r}") from None
                if "error" in chunk:
                    raise GlmkitError(f"the server: {_message(chunk)}")
                if reply is not None and chunk.get("usage"):
                    reply.prompt_tokens = chunk["usage"].get("prompt_tokens", 0)
                    reply.completion_tokens = chunk["usage"].get("completion_tokens", 0)
                for choice in chunk.get("choices") or []:
                    piece = (choice.get("delta") or {}).get("content")
                    if isinstance(piece, str) and piece:
                        text.append(piece)
                        yield piece
                    if choice.get("finish_reason") and reply is not None:
                        reply.finish_reason = choice["finish_reason"]
        if reply is not None:
            reply.messages = [{"role": "assistant", "content": "".join(text)}]

    # -- HTTP ------------------------------------------------------------------------------
    def _lines(self, response, cancel, cancelled: type[Exception]):
        """The response's lines, read in a thread of their own so that Ctrl-C (`cancel`) ends the
        wait at once even while the server sends nothing (a long prefill, a queue); a connection
        that breaks mid-stream is one GlmkitError.  Leaving early closes the response (the
        caller's `with`), which ends the reading thread too."""
        lines: queue.Queue = queue.Queue()

        def read():
            try:
                for raw in response:
                    lines.put(raw)
            except Exception as e:          # a reset, a truncated chunk, the read timeout, our close
                lines.put(e)
            lines.put(None)
        threading.Thread(target=read, name="glmkit-server-reader", daemon=True).start()
        while True:
            if cancel is not None and cancel.is_set():
                raise cancelled()
            try:
                item = lines.get(timeout=0.1)
            except queue.Empty:
                continue
            if item is None:
                return
            if isinstance(item, Exception):
                raise GlmkitError(f"the connection to {self.base} broke: {item or type(item).__name__}")
            yield item

    def _open(self, method: str, path: str, body: dict | None = None):
        headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data, headers=headers, method=method)
        try:
            return _OPENER.open(request, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            try:
                detail = _message(json.loads(e.read().decode("utf-8", "replace")))
            except ValueError:
                detail = e.reason
            raise GlmkitError(f"{self.base}{path}: HTTP {e.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as e:
            raise GlmkitError(f"cannot reach {self.base}: {getattr(e, 'reason', e)}") from None

    def _request(self, method: str, path: str) -> dict:
        with self._open(method, path) as response:
            try:
                return json.loads(response.read().decode("utf-8", "replace"))
            except ValueError:
                raise GlmkitError(f"{self.base}{path} did not answer JSON; is this a glmkit server?") from None
            except (OSError, http.client.HTTPException) as e:
                raise GlmkitError(f"the connection to {self.base} broke: {e or type(e).__name__}") from None


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is an error here, not followed: urllib would carry the Authorization header
    (the API key) to wherever it points."""

    def redirect_request(self, *args, **kwargs):
        return None


_OPENER = urllib.request.build_opener(_NoRedirects)


def _message(body) -> str:
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        return str(err.get("message", err))
    return str(err or body)
