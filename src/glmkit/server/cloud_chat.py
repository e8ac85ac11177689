"""CloudChat: a chat model that another service answers through its OpenAI-compatible
/v1/chat/completions (a cloud model service, or any such endpoint): the `openai:` entries of
`glmkit serve --models FILE`.

Chat-level, not token-level: the request passes through as the client sent it (messages, tools,
sampling, stream), with `model` set to the service's name for the model, and the reply comes back
as the service shaped it, with `model` set to this server's name for the entry (what answered, as
the client can name it again).  glmkit's chat layer does not run (the service has its own template
and tool parser), so what needs a token-level model (/v1/completions, the other APIs, the console,
glmkit_run_tools) is refused by name (ServerState.pick).

The key comes from the environment variable the entry names, read when a request is sent; it is
never written to a log or into an error.  A service that cannot be reached, times out, fails (5xx)
or is busy (429) raises Unavailable before anything has reached the client: what a fallback route
acts on (server/routing.py).  Once a streamed reply has begun it is never replaced: a failure then
is an error event at the end of the stream.

httpx is imported on first use."""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

from .errors import APIError, error_body



class Unavailable(Exception):
    """The model could not answer now (down, timed out, busy): `reason` is one of "down",
    "timeout", "busy"; `status` the HTTP status the client gets when nothing else answers."""

    def __init__(self, message: str, reason: str, status: int = 502, retry_after: str | None = None):
        super().__init__(message)
        self.reason, self.status, self.retry_after = reason, status, retry_after


def on_this_machine(url: str) -> bool:
    """Whether `url`'s host is a loopback address (a name other than localhost is not: it could
    resolve anywhere)."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_of(url: str) -> str:
    """host[:port] of `url`, without any user:password@ it may carry (it is shown to clients)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{parts.port}" if parts.port else host


class CloudChat:
    def __init__(self, name: str, url: str, model: str, key_env: str | None = None, timeout: float = 60.0):
        self.name = name
        self.url = url.rstrip("/")             # the base URL as OpenAI's clients take it (.../v1)
        self.model = model                     # the service's name for the model
        self.key_env = key_env
        self.timeout = timeout
        self._client = None

    @property
    def host(self) -> str:
        return host_of(self.url)

    def _http(self):
        if self._client is None:       # made in the server's event loop, on the first request
            import httpx
            self._client = httpx.AsyncClient(timeout=httpx.Timeout(self.timeout), follow_redirects=False)
        return self._client

    async def aclose(self):
        if self._client is not None:
            await self._client.aclose()

    def request_body(self, sent: dict) -> dict:
        """The client's request as the service gets it: its own model name; glmkit's extension
        fields (glmkit_*) left out, since they mean nothing there."""
        if sent.get("glmkit_run_tools"):
            raise APIError(400, f"model {self.name!r} is answered by {self.host}: the server cannot run "
                                "tools for it (glmkit_run_tools needs a model glmkit runs)", param="glmkit_run_tools")
        return {**{k: v for k, v in sent.items() if not k.startswith("glmkit_")}, "model": self.model}

    async def start(self, sent: dict):
        """Send the chat request and return the reply: a dict, or for stream=true an async iterator
        of SSE text once the service has accepted the request.  Raises Unavailable while nothing
        has been given to the client yet; the service's refusal of the request itself (a 4xx other
        than 429) is an APIError with the service's message, as the client would have seen it."""
        import httpx
        body = self.request_body(sent)
        headers = {"Authorization": f"Bearer {os.environ.get(self.key_env, '')}"} if self.key_env else {}
        client = self._http()
        try:
            request = client.build_request("POST", self.url + "/chat/completions", json=body, headers=headers)
            response = await client.send(request, stream=True)
        except httpx.TimeoutException:
            raise Unavailable(f"{self.name}: {self.host} did not answer within {self.timeout:g} s", "timeout",
                              504) from None
        except httpx.HTTPError as e:
            raise Unavailable(f"{self.name}: cannot reach {self.host} ({type(e).__name__})", "down") from None
        if response.status_code != 200:
            await self._refused(response)
        if body.get("stream"):
            return self._sse(response)
        try:
            data = json.loads(await response.aread())
        except httpx.TimeoutException:
            raise Unavailable(f"{self.name}: {self.host} did not finish its reply within {self.timeout:g} s",
                              "timeout", 504) from None
        except (httpx.HTTPError, ValueError) as e:
            raise Unavailable(f"{self.name}: {self.host} sent an unreadable reply ({type(e).__name__})",
                              "down") from None
        finally:
            await response.aclose()
        if not isinstance(data, dict):
            raise Unavailable(f"{self.name}: {self.host} sent something that is not a chat completion", "down")
        return {**data, "model": self.name}

    async def _refused(self, response) -> None:
        import httpx
        status = response.status_code
        try:
            text = (await response.aread()).decode("utf-8", "replace")
        except httpx.HTTPError:        # the status is what counts; its body may never come
            text = ""
        finally:
            await response.aclose()
        try:
            message = json.loads(text)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = text[:300] or response.reason_phrase
        said = f"{self.name}: {self.host} answered {status}: {message}"
        if status == 429:
            raise Unavailable(said, "busy", 429, response.headers.get("retry-after"))
        if status >= 500:
            raise Unavailable(said, "down")
        if status in (401, 403):      # the server's key for the service, not the client's fault
            raise APIError(502, f"{self.name}: {self.host} refused the API key in ${self.key_env}"
                           if self.key_env else said, "upstream_error", code="upstream_auth")
        raise APIError(status if status in (400, 404, 413, 422) else 502, said, code="upstream_refused")

    async def _sse(self, response) -> AsyncIterator[str]:
        """The service's events, each chunk's `model` renamed; a failure mid-stream is an error event."""
        try:
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    yield "data: [DONE]\n\n"
                    return
                try:
                    chunk = json.loads(data)
                except ValueError:
                    continue
                if isinstance(chunk, dict) and "model" in chunk:
                    chunk["model"] = self.name
                yield "data: " + json.dumps(chunk, ensure_ascii=False) + "\n\n"
            yield "data: [DONE]\n\n"
        except Exception as e:      # the service went away mid-reply: said, then ended
            yield "data: " + json.dumps(error_body(f"{self.name}: {self.host} failed mid-reply "
                                                   f"({type(e).__name__})", "engine_error",
                                                   code="engine_unavailable")) + "\n\n"
            yield "data: [DONE]\n\n"
        finally:
            await response.aclose()     # a client gone closes the service's request too
