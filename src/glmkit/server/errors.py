"""Every refusal the server sends is one OpenAI-shaped error body: {"error": {message, type, param, code}},
except on the Anthropic Messages API's paths (server.anthropic_api), whose clients read Anthropic's
{"type": "error", "error": {type, message}}: `for_path` reshapes a refusal there.

Here are APIError (what a route raises), the exception handlers that turn everything else a
request can cause (a pydantic validation error, a full queue, a prompt too long, a GlmkitError
from the chat or engine layers) into that body, and the one strict JSON decoding that every
route with a JSON body uses, the API's and the console's alike."""

from __future__ import annotations

import json
import logging
import math

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.requests import QueueFull
from ..engine.remote import EngineUnavailable
from ..errors import ContextLengthError, GlmkitError
from .openai_responses import ErrorDetail, ErrorResponse
from .store_sql import StoreUnavailable


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.param, self.code, self.headers)


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return ErrorResponse(error=ErrorDetail(message=message, type=type_, param=param, code=code)).model_dump()


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


class BodyTooLarge(StarletteHTTPException):
    """Raised from `receive` once a body is over its limit (FastAPI passes HTTPExceptions on
    from body reading, so it becomes a 413 wherever the body is read)."""
    code = "body_too_large"

    def __init__(self, limit: int):
        super().__init__(413, f"request body is larger than {limit} bytes")


# Anthropic's error types by status (https://docs.anthropic.com/en/api/errors)
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
                    529: "overloaded_error"}


def anthropic_error_body(status: int, message: str) -> dict:
    kind = _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def for_path(path: str, response: JSONResponse) -> JSONResponse:
    """An error response as the client of `path` reads it: Anthropic's shape under /v1/messages,
    the response itself elsewhere (its status and headers, Retry-After included, are kept)."""
    if path != "/v1/messages" and not path.startswith("/v1/messages/"):
        return response
    message = json.loads(response.body)["error"]["message"]
    headers = {k: v for k, v in response.headers.items() if k not in ("content-length", "content-type")}
    return JSONResponse(anthropic_error_body(response.status_code, message), response.status_code, headers)


# -- request bodies: strict JSON -----------------------------------------------------------------
class NotStrictJSON(ValueError):
    """Why a body is not JSON as RFC 8259 has it (one readable line)."""


def _constant(name: str):
    raise NotStrictJSON(f"{name} is not a JSON number (send a finite number)")


def _finite(text: str) -> float:
    if not math.isfinite(value := float(text)):
        raise NotStrictJSON(f"the number {text[:40]} is out of range")
    return value


def strict_json(raw: bytes):
    """UTF-8 JSON with finite numbers only (no NaN, Infinity or 1e999, which Python's json
    accepts), no integer past Python's digit limit, and no unpaired UTF-16 surrogate (text that
    nothing downstream could encode, SQLite included).  NotStrictJSON otherwise."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise NotStrictJSON(f"it is not valid UTF-8 (byte {e.start})") from None
    try:
        value = json.loads(text.removeprefix("\ufeff"), parse_constant=_constant, parse_float=_finite)
    except NotStrictJSON:
        raise
    except json.JSONDecodeError as e:
        raise NotStrictJSON(f"{e.msg} (line {e.lineno}, column {e.colno})") from None
    except RecursionError:
        raise NotStrictJSON("it is nested too deeply") from None
    except ValueError:      # an integer with thousands of digits
        raise NotStrictJSON("a number has too many digits") from None
    if "\\u" in text:       # only an escape can make a lone surrogate: check that they all paired up
        stack = [value]
        while stack:
            item = stack.pop()
            if isinstance(item, dict):
                stack += [*item.keys(), *item.values()]
            elif isinstance(item, list):
                stack += item
            elif isinstance(item, str):
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError as e:
                    raise NotStrictJSON(f"text holds an unpaired UTF-16 surrogate (\\u{ord(item[e.start]):04x}); "
                                        "send the text as UTF-8") from None
    return value


class _StrictJSONRequest(Request):
    async def json(self):
        if not hasattr(self, "_json"):
            try:
                value = strict_json(await self.body())
            except NotStrictJSON as e:
                raise APIError(400, f"the request body is not valid JSON: {e}") from None
            if not isinstance(value, dict):     # every body this server reads is an object
                raise APIError(400, "the request body must be a JSON object")
            self._json = value
        return self._json


class StrictJSONRoute(APIRoute):
    """A route whose JSON body is declared as JSON and decoded strictly, each failure one
    readable 4xx, before FastAPI validates it against the route's model.  The body's size is
    bounded by the middleware (server.middleware), which counts the bytes actually received."""

    def get_route_handler(self):
        handler = super().get_route_handler()
        if self.body_field is None:       # no JSON body (a file upload streams its own)
            return handler

        async def strict(request: Request):
            request = _StrictJSONRequest(request.scope, request.receive)
            if await request.body():
                ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
                if ctype != "application/json" and not ctype.endswith("+json"):
                    raise APIError(415, "send the request body as JSON (Content-Type: application/json)")
                # decoded here, so that a refusal is ours; FastAPI would call it "an error parsing the body"
                await request.json()
            return await handler(request)
        return strict


# -- exception handlers --------------------------------------------------------------------------
def add_error_handlers(app) -> None:
    for exc, handler in ((APIError, _api_error), (QueueFull, _queue_full), (EngineUnavailable, _engine_down),
                         (StoreUnavailable, _store_down), (GlmkitError, _request_error),
                         (RequestValidationError, _validation_error), (StarletteHTTPException, _http_error)):
        app.add_exception_handler(exc, _shaped(handler))


def _shaped(handler):
    async def shaped(request: Request, exc: Exception):
        return for_path(request.url.path, await handler(request, exc))
    return shaped


async def _api_error(request: Request, exc: APIError):
    return exc.response()


async def _queue_full(request: Request, exc: QueueFull):
    return error_response(429, str(exc), "rate_limit_exceeded", code="queue_full", headers={"Retry-After": "2"})


async def _engine_down(request: Request, exc: EngineUnavailable):
    # a remote engine (serve --engine) that failed or went away: the gateway's upstream, so a 502 on
    # every API and the console alike, not a 400 that would blame the request
    return error_response(502, str(exc), "engine_error", code="engine_unavailable")


STORE_DOWN = "the conversation store is unavailable; try again shortly"


async def _store_down(request: Request, exc: StoreUnavailable):
    # the conversation store's PostgreSQL (serve --database) cannot be reached: the server's
    # trouble, for a while, not the request's.  Where the database is, and why, goes to the log,
    # not to clients.
    logging.getLogger("glmkit.server").error("%s", exc)
    return error_response(503, STORE_DOWN, "server_error",
                          code="store_unavailable", headers={"Retry-After": "5"})


async def _request_error(request: Request, exc: GlmkitError):
    # anything the request did wrong that the chat/engine layers caught: a 400, never a 500
    code = "context_length_exceeded" if isinstance(exc, ContextLengthError) else None
    return error_response(400, str(exc), code=code)


async def _validation_error(request: Request, exc: RequestValidationError):
    """The first thing wrong with a body, as `field.path: why` with the path as `param`."""
    errs = exc.errors()
    first = errs[0] if errs else {}
    loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in _field_path(first.get("loc", ()))).lstrip(".")
    msg = first.get("msg", "invalid request").removeprefix("Value error, ")
    return error_response(400, f"{loc + ': ' if loc else ''}{msg}", param=loc or None)


async def _http_error(request: Request, exc: StarletteHTTPException):
    return error_response(exc.status_code, str(exc.detail), code=getattr(exc, "code", None), headers=exc.headers)


def _field_path(loc) -> list:
    """A pydantic error location as the request's field path (body and union member tags dropped)."""
    out = []
    for p in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(p, str) and not p.isidentifier() or p in ("str", "int", "float", "bool", "list", "dict") \
                or isinstance(p, str) and p[:1].isupper():
            break
        out.append(p)
    return out
