"""The server's error tree. Each class fixes a gRPC status code and a default reason; the one
mapping to google.rpc.Status is `lateserve.server.rpc.to_rpc_status`. No grpc import here, so
families and the engine raise these without knowing about transports.
"""

from __future__ import annotations

from lateserve.wire import status as reasons


class LateserveError(Exception):
    """Base of every error the server reports on purpose (anything else becomes INTERNAL)."""

    code_name = "INTERNAL"
    default_reason = reasons.INTERNAL

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: dict[str, str] | None = None,
        field: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata = metadata or {}
        self.field = field
        self.retry_after_s = retry_after_s


class InvalidArgument(LateserveError):
    """The request is malformed or asks for something impossible (HTTP 400)."""

    code_name = "INVALID_ARGUMENT"
    default_reason = reasons.INVALID_ARGUMENT


class InputTooLong(InvalidArgument):
    """An input has more tokens than max_model_len and no truncation was asked for."""

    default_reason = reasons.INPUT_TOO_LONG


class UnsupportedTask(InvalidArgument):
    """The loaded model lacks the task (vLLM answers 400 "Unsupported task: ...")."""

    default_reason = reasons.UNSUPPORTED_TASK


class Unimplemented(LateserveError):
    """A capability the server or model does not have (HTTP 501)."""

    code_name = "UNIMPLEMENTED"
    default_reason = reasons.UNSUPPORTED_INPUT


class ModelNotFound(LateserveError):
    """The request names a model this server does not serve (HTTP 404)."""

    code_name = "NOT_FOUND"
    default_reason = reasons.MODEL_NOT_FOUND


class Overloaded(LateserveError):
    """The queue is full; retry later (HTTP 429 with Retry-After)."""

    code_name = "RESOURCE_EXHAUSTED"
    default_reason = reasons.QUEUE_FULL


class WorkerUnavailable(LateserveError):
    """No worker can run the work now (a worker died, or none is ready) (HTTP 503)."""

    code_name = "UNAVAILABLE"
    default_reason = reasons.WORKER_UNAVAILABLE


class ShuttingDown(WorkerUnavailable):
    """The server is draining after SIGTERM and takes no new work."""

    default_reason = reasons.SHUTTING_DOWN


class DeadlineExceeded(LateserveError):
    """The caller's deadline passed before the work finished."""

    code_name = "DEADLINE_EXCEEDED"
    default_reason = reasons.DEADLINE_EXCEEDED


class ModelLoadError(Exception):
    """A checkpoint cannot be loaded (missing/unexpected weights, unknown architecture).

    Raised at startup, never per request, so it is not a LateserveError.
    """
