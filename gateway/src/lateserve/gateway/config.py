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
    """

    grpc_target: str
    host: str = "0.0.0.0"
    port: int = 8000
    max_body_bytes: int = 32 << 20
    grpc_max_message_bytes: int = 64 << 20
