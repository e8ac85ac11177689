"""Prometheus text exposition of the scheduler's counters (no client library needed for this)."""

from __future__ import annotations


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
        "# HELP glmkit_queue_length Requests waiting for a batch slot.", "# TYPE glmkit_queue_length gauge",
        f"glmkit_queue_length {scheduler.queue_length}",
        "# HELP glmkit_running Sequences in the running batch.", "# TYPE glmkit_running gauge",
        f"glmkit_running {scheduler.running}",
        "# HELP glmkit_batch_slots Batch slots (--max-batch).", "# TYPE glmkit_batch_slots gauge",
        f"glmkit_batch_slots {scheduler.max_batch}",
    ]
    lines += _hist("glmkit_time_to_first_token_seconds", "From request to first token.", st.ttft)
    lines += _hist("glmkit_inter_token_latency_seconds", "Between consecutive tokens of a sequence.", st.token_latency)
    lines += ["# HELP glmkit_http_requests_total HTTP requests by path and status.",
              "# TYPE glmkit_http_requests_total counter"]
    for (path, status), n in sorted(http_requests.items()):
        lines.append(f'glmkit_http_requests_total{{path="{path}",status="{status}"}} {n}')
    return "\n".join(lines) + "\n"
