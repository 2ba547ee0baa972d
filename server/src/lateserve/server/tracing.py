"""Opt-in OpenTelemetry traces: `--otlp-traces-endpoint URL` (vLLM's flag).

One span per RPC (every HTTP route reaches one, in process or through the sidecar), with child spans
per engine call and stage: `prepare` (tokenization, chat templates, images), `queue` (waiting for a
worker) and `forward` (the forward passes). The stage spans are written after the fact from the
engine's measured durations, so nothing on the hot path waits on the tracer.

Without the flag nothing here imports opentelemetry and every call is a check of one global.
The exporter speaks OTLP over gRPC unless OTEL_EXPORTER_OTLP_TRACES_PROTOCOL (or
OTEL_EXPORTER_OTLP_PROTOCOL) says `http/protobuf`, as vLLM; the packages come with the `otel` extra
(`pip install 'lateserve-server[otel]'`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from typing import Any
from urllib.parse import urlsplit

_provider: Any = None
_tracer: Any = None
_trace: Any = None  # the opentelemetry.trace module, once set up
_propagator: Any = None
_current: ContextVar[Any] = ContextVar("lateserve_current_span", default=None)

TRACER_NAME = "lateserve.server"


def enabled() -> bool:
    """True once `setup` configured an exporter."""
    return _tracer is not None


def otlp_exporter(endpoint: str) -> Any:
    """An OTLP span exporter for `endpoint`: gRPC by default, HTTP/protobuf when the standard variable
    says so (then a bare http://host:port gets the /v1/traces path)."""
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


def setup(endpoint: str | None = None, *, exporter: Any = None, service_name: str = "lateserve") -> bool:
    """Start exporting spans to `endpoint` (or to `exporter`, a SpanExporter: the tests' hook).
    Neither given: tracing stays off and opentelemetry is not imported. Returns whether it is on."""
    global _provider, _tracer, _trace, _propagator
    if not endpoint and exporter is None:
        return False
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    except ImportError as exc:
        raise RuntimeError(
            "--otlp-traces-endpoint needs OpenTelemetry: pip install 'lateserve-server[otel]' "
            "(opentelemetry-sdk, opentelemetry-exporter-otlp)"
        ) from exc
    shutdown()
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(exporter if exporter is not None else otlp_exporter(str(endpoint))))
    _provider, _trace, _propagator = provider, trace, TraceContextTextMapPropagator()
    _tracer = provider.get_tracer(TRACER_NAME)
    return True


def force_flush(timeout_ms: int = 5000) -> None:
    """Send the spans still buffered (tests, shutdown)."""
    if _provider is not None:
        _provider.force_flush(timeout_ms)


def shutdown() -> None:
    """Flush and stop the exporter; tracing is off afterwards."""
    global _provider, _tracer
    provider, _provider, _tracer = _provider, None, None
    if provider is not None:
        provider.shutdown()


@contextmanager
def request_span(name: str, carrier: Mapping[str, str] | None = None, **attributes: Any) -> Iterator[Any]:
    """The span of one RPC, current for the engine's stage spans while the block runs (None when
    tracing is off). `carrier` holds incoming metadata: a W3C `traceparent` there becomes the parent."""
    if _tracer is None:
        yield None
        return
    parent = _propagator.extract(carrier) if carrier and "traceparent" in carrier else None
    span = _tracer.start_span(name, context=parent, kind=_trace.SpanKind.SERVER, attributes=_clean(attributes))
    token = _current.set(span)
    try:
        yield span
    except BaseException as exc:
        span.record_exception(exc)
        span.set_status(_trace.Status(_trace.StatusCode.ERROR, type(exc).__name__))
        raise
    finally:
        with suppress(ValueError):  # an async generator finalized in another context
            _current.reset(token)
        span.end()


def set_attributes(span: Any, **attributes: Any) -> None:
    """Add attributes to a span from `request_span` (None: nothing)."""
    if span is not None:
        span.set_attributes(_clean(attributes))


def stages(start_wall_ns: int, spans: list[tuple[str, int, int]], **attributes: Any) -> None:
    """Child spans of the current request span, one per (name, offset_ns, duration_ns) from
    `start_wall_ns` (time.time_ns()). Zero durations are left out; nothing without a current span."""
    parent = _current.get()
    if _tracer is None or parent is None:
        return
    context = _trace.set_span_in_context(parent)
    attrs = _clean(attributes)
    for name, offset, duration in spans:
        if duration <= 0:
            continue
        span = _tracer.start_span(name, context=context, start_time=start_wall_ns + offset, attributes=attrs)
        span.end(end_time=start_wall_ns + offset + duration)


def _clean(attributes: Mapping[str, Any]) -> dict[str, Any]:
    """OpenTelemetry attribute names (`request_id` -> `lateserve.request_id`), None values dropped."""
    return {k if "." in k else f"lateserve.{k}": v for k, v in attributes.items() if v is not None}
