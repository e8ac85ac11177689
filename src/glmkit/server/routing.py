"""Fallback routes (`routes: {fallback: {A: B}}` in `serve --models FILE`): B answers a request for A
when A cannot begin to: its engine is down or timed out, or it is busy (its queue full, a 429).

Explicit and visible, as the operator would want it: only where configured; only before anything
of the reply has reached the client (a local model's first token is awaited before the response
starts, a cloud's answer before it is passed on), never halfway through; one hop (B's own fallback
is not followed); never to a model outside the machine for a private_only request.  Each fallback
is logged, counted in /metrics (glmkit_fallbacks_total{from,to,reason}), and the response names
what answered (`x-glmkit-served-by` and its `model`)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from ..engine.remote import EngineUnavailable
from ..engine.requests import QueueFull
from .cloud_chat import Unavailable
from .errors import APIError
from .state import ServerState

log = logging.getLogger("glmkit.server")

CANNOT_START = (QueueFull, EngineUnavailable, Unavailable)


def reason_of(e: BaseException) -> str:
    if isinstance(e, Unavailable):
        return e.reason
    return "busy" if isinstance(e, QueueFull) else "down"


async def with_fallback(server: ServerState, name: str, start: Callable[[str], Awaitable]) -> tuple[str, object]:
    """(the model that answered, what `start(model)` returned): `name`'s, or its fallback's when
    `name` cannot start.  Without a fallback the failure is the client's answer as it is."""
    try:
        return name, await start(name)
    except CANNOT_START as e:
        target = server.fallback_for(name)
        if target is None:
            _raise(e)
        reason = reason_of(e)
        log.warning("fallback: %s could not answer (%s: %s); %s answers instead", name, reason, e, target)
    try:
        reply = await start(target)
    except CANNOT_START as e:
        _raise(e)
    key = (name, target, reason)       # counted once the fallback has begun to answer
    server.fallbacks_done[key] = server.fallbacks_done.get(key, 0) + 1
    return target, reply


def _raise(e: BaseException):
    if isinstance(e, Unavailable):       # a cloud model's: its status (502, 504, or the service's 429)
        raise APIError(e.status, str(e), "rate_limit_error" if e.status == 429 else "engine_error",
                       code="upstream_busy" if e.status == 429 else "engine_unavailable",
                       headers={"Retry-After": e.retry_after} if e.retry_after else None) from None
    raise e      # QueueFull (429) and EngineUnavailable (502): server.errors shapes them
