"""Prometheus metrics of one server (its own CollectorRegistry, so several apps in one process do not clash).

Served at GET /metrics in the text exposition format. Names follow vLLM's where one exists.
"""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """Counters, gauges and histograms the services update."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("mosaicjax_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.errors = Counter("mosaicjax_errors", "Error responses by status", ["status"], registry=r)
        self.ttft = Histogram("mosaicjax_time_to_first_token_seconds", "Arrival to first generated token",
                              ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("mosaicjax_request_latency_seconds", "Arrival to completion", ["model"],
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("mosaicjax_prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.generation_tokens = Counter("mosaicjax_generation_tokens", "Tokens generated", ["model"], registry=r)
        self.tokens_per_second = Gauge("mosaicjax_generation_tokens_per_second",
                                       "Generated tokens/s over the last decode step", ["model"], registry=r)
        self.queue_depth = Gauge("mosaicjax_queue_depth", "Requests waiting for a slot (or an image batch)",
                                 ["model"], registry=r)
        self.slots_used = Gauge("mosaicjax_slots_used", "KV-cache slots occupied", ["model"], registry=r)
        self.slots_total = Gauge("mosaicjax_slots_total", "KV-cache slots", ["model"], registry=r)
        self.images = Counter("mosaicjax_images_generated", "Images generated", ["model"], registry=r)
        self.image_batch = Histogram("mosaicjax_image_batch_size", "Images per pipeline call", ["model"],
                                     buckets=(1, 2, 4, 8, 16, 32), registry=r)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
