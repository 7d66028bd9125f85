"""Prometheus metrics of one server (prometheus_client, a registry per app): requests, tokens, queue
depth, batch occupancy, time to first token and inter-token latency histograms."""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST as CONTENT_TYPE

__all__ = ["CONTENT_TYPE", "Metrics"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """Counters fed by the engine's observer hook; gauges read the engine when scraped."""

    def __init__(self, engine):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("pdx_requests", "requests accepted", ["endpoint"], registry=r)
        self.rejected = Counter("pdx_requests_rejected", "requests answered 429 (queue full)", registry=r)
        self.finished = Counter("pdx_requests_finished", "requests finished", ["reason"], registry=r)
        self.prompt_tokens = Counter("pdx_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.tokens = Counter("pdx_generated_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("pdx_time_to_first_token_seconds", "arrival to first token", buckets=_LATENCY_BUCKETS,
                              registry=r)
        self.itl = Histogram("pdx_inter_token_latency_seconds", "time between a request's tokens",
                             buckets=_LATENCY_BUCKETS, registry=r)
        Gauge("pdx_queue_depth", "requests waiting for a slot", registry=r).set_function(lambda: engine.load()[0])
        Gauge("pdx_batch_occupancy", "slots in use", registry=r).set_function(lambda: engine.load()[1])
        Gauge("pdx_batch_slots", "slots in all", registry=r).set(engine.max_batch)
        self._last: dict = {}  # request -> time of its last token
        self._lock = threading.Lock()
        engine.observers.append(self.observe)

    def observe(self, event: str, req, value: float) -> None:
        """The engine's hook: ("first_token", req, seconds since arrival), ("token", req, now),
        ("finish", req, seconds since arrival)."""
        with self._lock:
            if event == "first_token":
                self.ttft.observe(value)
            elif event == "token":
                self.tokens.inc()
                if req in self._last:
                    self.itl.observe(value - self._last[req])
                self._last[req] = value
            elif event == "finish":
                self._last.pop(req, None)
                self.finished.labels(req.finish_reason).inc()
                self.prompt_tokens.inc(len(req.prompt))

    def render(self) -> bytes:
        return generate_latest(self.registry)
