"""Prometheus metrics of the HTTP edge, one CollectorRegistry per app so tests can build several."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest

_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class GatewayMetrics:
    """The gateway's counters and histograms, registered on their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "lateserve_http_requests",
            "HTTP requests answered, by route template and status code.",
            ["route", "status"],
            registry=self.registry,
        )
        self.errors = Counter(
            "lateserve_http_request_errors",
            "HTTP requests answered with an error envelope, by route template and error type.",
            ["route", "type"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "lateserve_http_request_duration_seconds",
            "Time from request arrival to response, by route template.",
            ["route"],
            buckets=_DURATION_BUCKETS,
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "lateserve_http_prompt_tokens",
            "Prompt tokens reported in usage, by route template.",
            ["route"],
            registry=self.registry,
        )

        self.response_bytes = Counter(
            "lateserve_http_response_bytes",
            "Response body bytes sent, by route template.",
            ["route"],
            registry=self.registry,
        )

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its Content-Type: this app's HTTP metrics, then the process-wide
        default registry (the server's lateserve_* metrics when `lateserve serve` runs the gateway
        in-process; process and GC collectors otherwise)."""
        return generate_latest(self.registry) + generate_latest(REGISTRY), CONTENT_TYPE_LATEST
