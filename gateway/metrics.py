"""Prometheus metrics: requests, images, latencies, provider errors and budget refusals counted as requests end;
circuit states read from the shared state at scrape time.

Under gunicorn every worker is its own process: with PROMETHEUS_MULTIPROC_DIR set (gunicorn.conf.py sets it), each
writes its samples there and a scrape of any worker sums them all.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from channels.adapters import REFUSAL_CODES
from gateway.models import UsageLog

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)
_registry = CollectorRegistry()

REQUESTS = Counter("openopen8_requests", "Client requests by endpoint, model, final channel and HTTP status.",
                   ["endpoint", "model", "channel", "status"], registry=_registry)
IMAGES = Counter("openopen8_images", "Images delivered to clients.", ["endpoint", "model", "channel"],
                 registry=_registry)
REQUEST_SECONDS = Histogram("openopen8_request_duration_seconds", "Total time of a client request.", ["endpoint"],
                            buckets=LATENCY_BUCKETS, registry=_registry)
PROVIDER_SECONDS = Histogram("openopen8_provider_duration_seconds", "Time the answering provider took.",
                             ["channel"], buckets=LATENCY_BUCKETS, registry=_registry)
PROVIDER_ERRORS = Counter("openopen8_provider_errors", "Failed provider attempts by channel and error code.",
                          ["channel", "code"], registry=_registry)
FIRST_EVENT_SECONDS = Histogram("openopen8_stream_first_event_seconds",
                                "Time from a streamed request's arrival to its first image event.", ["endpoint"],
                                buckets=LATENCY_BUCKETS, registry=_registry)
BUDGET_REFUSALS = Counter("openopen8_budget_refusals", "Requests refused because the key's budget was spent.",
                          registry=_registry)
AUTH_FAILURES = Counter("openopen8_auth_failures", "Requests refused for their API key, by why.", ["reason"],
                        registry=_registry)
CIRCUIT_STATES = {"closed": 0, "half_open": 1, "open": 2}
# Provider error codes counted by name; any other code (a provider may put anything there, a key included) counts
# as "other", which also keeps the label set bounded.
KNOWN_CODES = frozenset({
    "upstream_error", "upstream_timeout", "rate_limit_exceeded", "invalid_api_key", "insufficient_quota",
    "content_policy_violation", "moderation_blocked", "model_not_found", "invalid_value", "invalid_request_error",
    "billing_hard_limit_reached", "request_too_large", "service_unavailable", "server_error", "unsupported_value",
    "invalid_image", "image_too_large", "organization_verification_required",
}) | REFUSAL_CODES


def record_auth_failure(reason: str) -> None:
    AUTH_FAILURES.labels(reason).inc()


def record_first_event(endpoint: str, seconds: float) -> None:
    FIRST_EVENT_SECONDS.labels(endpoint).observe(seconds)


def record_request(log: UsageLog) -> None:
    """Count a finished request from its usage row."""
    served = bool(log.attempts)
    model = log.model if served else "unserved"  # clients' arbitrary model names would explode the label set
    final = log.attempts[-1]["name"] if served else ""
    REQUESTS.labels(log.endpoint, model, final, str(log.http_status or 500)).inc()
    REQUEST_SECONDS.labels(log.endpoint).observe(log.latency_ms / 1000 if log.latency_ms is not None else 0)
    if log.images_returned:
        IMAGES.labels(log.endpoint, model, final).inc(log.images_returned)
    if log.provider_latency_ms is not None and served:
        PROVIDER_SECONDS.labels(final).observe(log.provider_latency_ms / 1000)
    for attempt in log.attempts:
        if attempt["outcome"] == "error":
            code = attempt.get("code") or "error"
            PROVIDER_ERRORS.labels(attempt["name"], code if code in KNOWN_CODES or code == "error" else "other").inc()
    if log.error_code == "insufficient_quota":
        BUDGET_REFUSALS.inc()


class CircuitCollector(Collector):
    def collect(self) -> Iterator[GaugeMetricFamily]:
        from channels.models import Channel
        from gateway.state import CircuitView, shared_state

        family = GaugeMetricFamily("openopen8_circuit_state",
                                   "Circuit breaker per enabled channel: 0 closed, 1 half-open, 2 open.",
                                   labels=["channel"])
        channels = list(Channel.objects.filter(enabled=True).values_list("pk", "name"))
        views, now = shared_state().circuits([pk for pk, _ in channels]), time.time()
        for pk, name in channels:
            family.add_metric([name], CIRCUIT_STATES[views.get(pk, CircuitView()).state(now)])
        yield family


_registry.register(CircuitCollector())


def metrics_text() -> bytes:
    """The Prometheus text exposition of every metric, summed over all worker processes when there are several."""
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        return generate_latest(_registry)
    registry = CollectorRegistry()
    MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    registry.register(CircuitCollector())
    return generate_latest(registry)
