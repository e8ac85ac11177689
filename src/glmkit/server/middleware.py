"""Guard: the pure ASGI middleware around every request.

It gives each request an id (X-Request-Id, taken from the client's header if sent), refuses a
request without a valid API key (server.auth) and a body over the limit, counting the bytes
actually received (a chunked body has no Content-Length to trust), counts requests per route for
/metrics, and answers any fault a handler did not turn into an error with a logged JSON 500."""

from __future__ import annotations

import logging
import uuid

from starlette.requests import Request

from .auth import authorized, needs_key
from .errors import BodyTooLarge, error_response, for_path
from .metrics import route_label

log = logging.getLogger("glmkit.server")


class Guard:
    def __init__(self, app, config, counts: dict, routes: list):
        """`counts`: {(route template, status): requests}, filled in here; `routes`: the app's."""
        self.app, self.config, self.counts, self.routes = app, config, counts, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        cfg, request = self.config, Request(scope)
        rid = request.headers.get("x-request-id") or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        path, status, received, started = scope["path"], 500, 0, False
        limit = cfg.max_upload_bytes if scope["method"] == "PUT" and "/files/" in path else cfg.max_body_bytes

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tagged_send(message):
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                message = {**message, "headers": [*message.get("headers", ()), (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            declared = int(request.headers.get("content-length") or 0)
        except ValueError:
            declared = 0
        resp = None
        if declared > limit:
            resp = error_response(413, f"request body is larger than {limit} bytes", code="body_too_large")
        elif needs_key(path, cfg) and not authorized(request, cfg.api_keys):
            resp = error_response(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                                  code="invalid_api_key")
        try:
            if resp is None:
                try:
                    await self.app(scope, counted_receive, tagged_send)
                except BodyTooLarge as e:   # read outside FastAPI's body handling
                    resp = error_response(413, e.detail, code=e.code)
                except Exception:
                    log.exception("internal error in request %s", rid)
                    resp = error_response(500, f"internal error (request id {rid})", "server_error")
                if started:
                    return                  # a response already began: nothing more can be said
            if resp is not None:
                await for_path(path, resp)(scope, receive, tagged_send)
        finally:
            key = (route_label(scope, self.routes), status)
            self.counts[key] = self.counts.get(key, 0) + 1
