"""The scheduler's counters and latency histograms, which the server exposes at /metrics."""

from __future__ import annotations

from dataclasses import dataclass, field


class Histogram:
    """Cumulative buckets in the Prometheus sense (seconds)."""

    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float):
        self.count += 1
        self.sum += value
        for i, b in enumerate(self.buckets):
            if value <= b:
                self.counts[i] += 1


@dataclass
class Stats:
    """Counters the server exposes at /metrics."""
    requests: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    cancelled: int = 0
    prefix_hits: int = 0               # sequences that began from a kept prefix
    prefix_hit_tokens: int = 0         # prompt tokens they did not prefill
    ttft: Histogram = field(default_factory=lambda: Histogram((0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)))
    token_latency: Histogram = field(default_factory=lambda: Histogram((0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)))
