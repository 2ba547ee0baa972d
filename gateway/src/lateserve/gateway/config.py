"""The gateway's configuration: one frozen dataclass, built by the CLI or by `lateserve serve`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """Where the gateway listens and which gRPC server it translates for.

    Attributes:
        grpc_target: The lateserve gRPC server, "HOST:PORT" (any grpc target string works).
        host: Interface the HTTP server binds.
        port: HTTP port; 0 picks a free one (read it back from the runner's addresses).
        max_body_bytes: Largest accepted request body; larger ones get 413.
        grpc_max_message_bytes: Send and receive limit of the gRPC channel (match the server's).
        max_input_chars: Characters (or token ids) in one input string or list.
        max_request_chars: Characters in all strings of one request body together.
        max_items_per_request: Elements of any list in the body (documents, inputs, messages, parts);
            token-id lists are bounded by max_input_chars instead.
        max_request_id_chars: Longest request_id (body) or x-request-id (header); longer ones are 400.
        header_timeout_s: Seconds a connection has to complete a request head once its first byte came.
        body_timeout_s: Seconds a handler waits for the whole body (408, connection closed).
        keepalive_timeout_s: Seconds an idle connection is kept open.
        api_key: When set, every route but /health, /ping, /version and /metrics needs
            `Authorization: Bearer <api_key>` (401 otherwise); None: no key (vLLM's --api-key).
        ssl_certfile / ssl_keyfile: HTTPS with this certificate chain and key (vLLM's names); unset: HTTP.
        grpc_ssl_ca_certfile: Sidecar only: verify the gRPC server against this CA (TLS channel);
            with grpc_ssl_certfile / grpc_ssl_keyfile also present a client certificate (mutual TLS).
        forward_authorization: Sidecar only: send the caller's Authorization header on as gRPC
            `authorization` metadata (the gRPC server checks the key).
        otlp_traces_endpoint: Sidecar only: export a span per HTTP request to this OTLP endpoint (gateway
            tracing.py); the gRPC call carries it as the server span's parent. None: no tracing.
    """

    grpc_target: str
    host: str = "0.0.0.0"
    port: int = 8000
    max_body_bytes: int = 32 << 20
    grpc_max_message_bytes: int = 64 << 20
    max_input_chars: int = 1_000_000
    max_request_chars: int = 8_000_000
    max_items_per_request: int = 4096
    max_request_id_chars: int = 256
    header_timeout_s: float = 15.0
    body_timeout_s: float = 60.0
    keepalive_timeout_s: float = 75.0
    api_key: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    grpc_ssl_ca_certfile: str | None = None
    grpc_ssl_certfile: str | None = None
    grpc_ssl_keyfile: str | None = None
    forward_authorization: bool = True
    otlp_traces_endpoint: str | None = None
