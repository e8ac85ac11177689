"""API keys: which requests need one, the key a request carries, and the check.

With keys configured, everything under /v1 and /api needs one, and /metrics too unless the
server was started with --metrics-public; /health and the console's page and static files stay
open (probes and the login screen need them)."""

from __future__ import annotations

import hmac

from starlette.requests import Request


def request_key(request: Request) -> str:
    """The API key a request carries: `Authorization: Bearer KEY` or `X-API-Key: KEY`."""
    auth = request.headers.get("authorization", "")
    return auth[7:].strip() if auth.lower().startswith("bearer ") else request.headers.get("x-api-key", "")


def needs_key(path: str, config) -> bool:
    return bool(config.api_keys) and (path.startswith(("/v1", "/api")) or path == "/metrics"
                                      and not config.metrics_public)


def authorized(request: Request, keys: list[str]) -> bool:
    token = request_key(request).encode()
    ok = False
    for k in keys:  # compared with every key, in constant time: no timing tells which one nearly matched
        ok |= hmac.compare_digest(token, k.encode())
    return ok
