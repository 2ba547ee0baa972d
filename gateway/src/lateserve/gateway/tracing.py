"""Opt-in OpenTelemetry traces of the sidecar gateway: `lateserve-gateway --otlp-traces-endpoint URL`.

A gateway in front of a separate gRPC server (the sidecar) is a hop of its own: time spent reading and
validating the JSON body, translating it and writing the answer is not in the server's spans. With the flag,
every HTTP request gets a SERVER span ("POST /rerank": method, route, path, status, request id), child of
the caller's W3C `traceparent` when one came, and the gRPC call carries this span's `traceparent`, so the
server's RPC span (and its prepare / queue / forward stages) hangs under it in one trace.

The in-process gateway of `lateserve serve` never sets this up: its handlers call the servicers directly and
the server's own span per RPC already covers them.

Without the flag nothing here imports opentelemetry. The exporter speaks OTLP over gRPC unless
OTEL_EXPORTER_OTLP_TRACES_PROTOCOL (or OTEL_EXPORTER_OTLP_PROTOCOL) says `http/protobuf`, as the server's
flag and vLLM's; the packages come with the `otel` extra (`pip install 'lateserve-gateway[otel]'`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

TRACER_NAME = "lateserve.gateway"
_TRACE_HEADERS = ("traceparent", "tracestate")


def otlp_exporter(endpoint: str) -> Any:
    """An OTLP span exporter for `endpoint`: gRPC by default, HTTP/protobuf when the standard variable says
    so (then a bare http://host:port gets the /v1/traces path)."""
    protocol = (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
    )
    if protocol.strip().lower() in ("http/protobuf", "http"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        if urlsplit(endpoint).path in ("", "/"):
            endpoint = endpoint.rstrip("/") + "/v1/traces"
        return HttpExporter(endpoint=endpoint)
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

    return GrpcExporter(endpoint=endpoint)


class GatewayTracer:
    """The gateway's tracer provider (its own, not OpenTelemetry's global one, so a server in the same
    process keeps its provider) and the W3C propagator that reads and writes `traceparent`."""

    def __init__(self, endpoint: str, service_name: str = "lateserve-gateway") -> None:
        try:
            from opentelemetry import trace
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
            from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
        except ImportError as exc:
            raise RuntimeError(
                "--otlp-traces-endpoint needs OpenTelemetry: pip install 'lateserve-gateway[otel]' "
                "(opentelemetry-sdk, opentelemetry-exporter-otlp)"
            ) from exc
        self._trace = trace
        self._provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        self._provider.add_span_processor(BatchSpanProcessor(otlp_exporter(endpoint)))
        self._tracer = self._provider.get_tracer(TRACER_NAME)
        self._propagator = TraceContextTextMapPropagator()

    def start(self, name: str, headers: Mapping[str, str], attributes: Mapping[str, Any]) -> Any:
        """A SERVER span for one HTTP request, child of the caller's `traceparent` when `headers` hold one."""
        carrier = {key: headers[key] for key in _TRACE_HEADERS if key in headers}
        parent = self._propagator.extract(carrier) if "traceparent" in carrier else None
        return self._tracer.start_span(name, context=parent, kind=self._trace.SpanKind.SERVER, attributes=attributes)

    def finish(self, span: Any, status: int, attributes: Mapping[str, Any]) -> None:
        """End `span` with the HTTP status; 5xx marks it an error (4xx is the caller's, as OTel's HTTP rules)."""
        span.set_attributes({"http.response.status_code": status, **attributes})
        if status >= 500:
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, f"HTTP {status}"))
        span.end()

    def headers(self, span: Any) -> list[tuple[str, str]]:
        """`traceparent` (and `tracestate`) naming `span`, for the gRPC call it makes."""
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier, context=self._trace.set_span_in_context(span))
        return [(key, carrier[key]) for key in _TRACE_HEADERS if key in carrier]

    def force_flush(self, timeout_ms: int = 5000) -> None:
        """Send the spans still buffered."""
        self._provider.force_flush(timeout_ms)

    def shutdown(self) -> None:
        """Flush and stop the exporter."""
        self._provider.shutdown()
