"""Prometheus text exposition of the scheduler's counters (no client library needed for this).

HTTP requests are counted per route template (`/api/conversations/{cid}`), never per raw path:
paths carry conversation ids and file names, and every distinct path would be a new series."""

from __future__ import annotations

from starlette.routing import Match


def route_label(scope, routes) -> str:
    """The template of the route that handled (or would handle) a request; 'other' if none."""
    route = scope.get("route")
    if route is None:      # answered before routing (401, 413): match it here
        route = next((r for r in routes if r.matches(scope)[0] is not Match.NONE), None)
    return getattr(route, "path", None) or "other"


def _label(value) -> str:
    """A label value escaped as the text format requires."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _hist(name: str, help_: str, h) -> list[str]:
    lines = [f"# HELP {name} {help_}", f"# TYPE {name} histogram"]
    for b, c in zip(h.buckets, h.counts):
        lines.append(f'{name}_bucket{{le="{b}"}} {c}')
    lines += [f'{name}_bucket{{le="+Inf"}} {h.count}', f"{name}_sum {h.sum:.6f}", f"{name}_count {h.count}"]
    return lines


def render_metrics(scheduler, http_requests: dict) -> str:
    st = scheduler.stats
    lines = [
        "# HELP glmkit_requests_total Generation requests accepted.", "# TYPE glmkit_requests_total counter",
        f"glmkit_requests_total {st.requests}",
        "# HELP glmkit_prompt_tokens_total Prompt tokens of accepted requests.", "# TYPE glmkit_prompt_tokens_total counter",
        f"glmkit_prompt_tokens_total {st.prompt_tokens}",
        "# HELP glmkit_generated_tokens_total Tokens generated.", "# TYPE glmkit_generated_tokens_total counter",
        f"glmkit_generated_tokens_total {st.generated_tokens}",
        "# HELP glmkit_cancelled_total Sequences cancelled (client gone or stop string).",
        "# TYPE glmkit_cancelled_total counter", f"glmkit_cancelled_total {st.cancelled}",
        "# HELP glmkit_prefix_cache_hit_tokens_total Prompt tokens not prefilled: their keys and values were kept.",
        "# TYPE glmkit_prefix_cache_hit_tokens_total counter",
        f"glmkit_prefix_cache_hit_tokens_total {st.prefix_hit_tokens}",
        "# HELP glmkit_queue_length Requests waiting for a batch slot.", "# TYPE glmkit_queue_length gauge",
        f"glmkit_queue_length {scheduler.queue_length}",
        "# HELP glmkit_running Sequences in the running batch.", "# TYPE glmkit_running gauge",
        f"glmkit_running {scheduler.running}",
        "# HELP glmkit_batch_slots Batch slots (--max-batch).", "# TYPE glmkit_batch_slots gauge",
        f"glmkit_batch_slots {scheduler.max_batch}",
    ]
    lines += _hist("glmkit_time_to_first_token_seconds", "From request to first token.", st.ttft)
    lines += _hist("glmkit_inter_token_latency_seconds", "Between consecutive tokens of a sequence.", st.token_latency)
    lines += ["# HELP glmkit_http_requests_total HTTP requests by route and status.",
              "# TYPE glmkit_http_requests_total counter"]
    for (path, status), n in sorted(http_requests.items()):
        lines.append(f'glmkit_http_requests_total{{path="{_label(path)}",status="{status}"}} {n}')
    return "\n".join(lines) + "\n"
