"""Prometheus text exposition of the schedulers' counters (and the server's fallbacks) (no client library needed for this); with
several models, each series per model (a `model` label).

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


def _hist(name: str, help_: str, hists: dict) -> list[str]:
    """A histogram's series, one set per model label ({"": h}: unlabelled)."""
    lines = [f"# HELP {name} {help_}", f"# TYPE {name} histogram"]
    for labels, h in hists.items():
        for b, c in zip(h.buckets, h.counts):
            lines.append(f'{name}_bucket{{{labels}le="{b}"}} {c}')
        tail = f"{{{labels[:-1]}}}" if labels else ""
        lines += [f'{name}_bucket{{{labels}le="+Inf"}} {h.count}', f"{name}_sum{tail} {h.sum:.6f}",
                  f"{name}_count{tail} {h.count}"]
    return lines


# (name, type, help, the value from a scheduler)
SERIES = [
    ("glmkit_requests_total", "counter", "Generation requests accepted.", lambda s: s.stats.requests),
    ("glmkit_prompt_tokens_total", "counter", "Prompt tokens of accepted requests.", lambda s: s.stats.prompt_tokens),
    ("glmkit_generated_tokens_total", "counter", "Tokens generated.", lambda s: s.stats.generated_tokens),
    ("glmkit_cancelled_total", "counter", "Sequences cancelled (client gone or stop string).",
     lambda s: s.stats.cancelled),
    ("glmkit_prefix_cache_hit_tokens_total", "counter",
     "Prompt tokens not prefilled: their keys and values were kept.", lambda s: s.stats.prefix_hit_tokens),
    ("glmkit_queue_length", "gauge", "Requests waiting for a batch slot.", lambda s: s.queue_length),
    ("glmkit_running", "gauge", "Sequences in the running batch.", lambda s: s.running),
    ("glmkit_batch_slots", "gauge", "Batch slots (--max-batch).", lambda s: s.max_batch),
]


def render_metrics(schedulers, http_requests: dict, fallbacks: dict | None = None) -> str:
    """`schedulers`: the one model's scheduler (its series unlabelled, as a single-model server has
    always shown them), or {model name: scheduler} for several (each series with a `model` label,
    as vLLM labels its series `model_name`)."""
    if isinstance(schedulers, dict):
        by_label = {f'model="{_label(name)}",': s for name, s in schedulers.items()}
    else:
        by_label = {"": schedulers}
    lines = []
    for name, kind, help_, value in SERIES:
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
        for labels, s in by_label.items():
            lines.append(f"{name}{{{labels[:-1]}}} {value(s)}" if labels else f"{name} {value(s)}")
    lines += _hist("glmkit_time_to_first_token_seconds", "From request to first token.",
                   {labels: s.stats.ttft for labels, s in by_label.items()})
    lines += _hist("glmkit_inter_token_latency_seconds", "Between consecutive tokens of a sequence.",
                   {labels: s.stats.token_latency for labels, s in by_label.items()})
    for s in by_label.values():       # a scheduler's own series (a Ray deployment's, per replica)
        if hasattr(s, "metric_lines"):
            lines += s.metric_lines()
    lines += ["# HELP glmkit_http_requests_total HTTP requests by route and status.",
              "# TYPE glmkit_http_requests_total counter"]
    for (path, status), n in sorted(http_requests.items()):
        lines.append(f'glmkit_http_requests_total{{path="{_label(path)}",status="{status}"}} {n}')
    lines += ["# HELP glmkit_fallbacks_total Requests answered by a fallback model (routes.fallback).",
              "# TYPE glmkit_fallbacks_total counter"]
    for (source, target, reason), n in sorted((fallbacks or {}).items()):
        lines.append(f'glmkit_fallbacks_total{{from="{_label(source)}",to="{_label(target)}",'
                     f'reason="{_label(reason)}"}} {n}')
    return "\n".join(lines) + "\n"
