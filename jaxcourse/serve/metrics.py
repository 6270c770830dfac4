"""Prometheus metrics of the engine and server (GET /metrics, text exposition format).

Each server owns a CollectorRegistry, so two servers in one process (tests) do not clash.
Names follow Prometheus conventions: `_total` counters, `_seconds` histograms.
"""
from __future__ import annotations

import prometheus_client as prom

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0)


class ServeMetrics:
    def __init__(self, registry: prom.CollectorRegistry | None = None):
        self.registry = registry or prom.CollectorRegistry()
        r = self.registry
        self.requests = prom.Counter("jaxcourse_requests", "Completion requests by outcome",
                                     ["status"], registry=r)
        self.prompt_tokens = prom.Counter("jaxcourse_prompt_tokens", "Prompt tokens prefilled",
                                          registry=r)
        self.generated_tokens = prom.Counter("jaxcourse_generation_tokens",
                                             "Tokens generated", registry=r)
        self.ttft = prom.Histogram("jaxcourse_time_to_first_token_seconds",
                                   "Arrival to first token", buckets=_LATENCY_BUCKETS,
                                   registry=r)
        self.itl = prom.Histogram("jaxcourse_inter_token_latency_seconds",
                                  "Time between a request's consecutive tokens",
                                  buckets=_LATENCY_BUCKETS, registry=r)
        self.blocks_in_use = prom.Gauge("jaxcourse_kv_blocks_in_use",
                                        "KV cache blocks holding tokens", registry=r)
        self.blocks_total = prom.Gauge("jaxcourse_kv_blocks_total",
                                       "KV cache blocks in the pool (scratch excluded)",
                                       registry=r)
        self.queue = prom.Gauge("jaxcourse_queue_length", "Requests waiting for a slot",
                                registry=r)
        self.running = prom.Gauge("jaxcourse_running_requests", "Requests in decode slots",
                                  registry=r)

    # Hooks the engine calls.
    def prompt(self, n_tokens: int) -> None:
        self.prompt_tokens.inc(n_tokens)

    def token(self, seconds: float, first: bool) -> None:
        self.generated_tokens.inc()
        (self.ttft if first else self.itl).observe(seconds)

    def finished(self, reason: str) -> None:
        self.requests.labels(status=reason).inc()

    def state(self, blocks_in_use: int, queue_length: int, running: int) -> None:
        self.blocks_in_use.set(blocks_in_use)
        self.queue.set(queue_length)
        self.running.set(running)

    def exposition(self) -> bytes:
        return prom.generate_latest(self.registry)
