"""google.rpc.Status details for lateserve errors: reason constants, packing and unpacking.

Every non-OK status the server sends carries exactly one ErrorInfo (domain lateserve.ai), with
BadRequest.field_violations when a field is at fault and RetryInfo when retrying can help.
The gateway and the client read them back with `unpack_details`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from lateserve.wire.reasons import (  # noqa: F401 - re-exported: clients read reasons here
    DEADLINE_EXCEEDED,
    DOMAIN,
    EMPTY_INPUT,
    IMAGE_INVALID,
    INPUT_TOO_LONG,
    INTERNAL,
    INVALID_ARGUMENT,
    MEDIA_LIMIT,
    MEDIA_NOT_ALLOWED,
    MODEL_NOT_FOUND,
    PAIRING_MISMATCH,
    QUEUE_FULL,
    REQUEST_TOO_LARGE,
    SHUTTING_DOWN,
    TEMPLATE_ERROR,
    TRUNCATION_TOO_LARGE,
    UNSUPPORTED_INPUT,
    UNSUPPORTED_TASK,
    WORKER_UNAVAILABLE,
)

_CODE_TO_RPC: dict[grpc.StatusCode, int] = {c: c.value[0] for c in grpc.StatusCode}


@dataclass(frozen=True, slots=True)
class ErrorDetails:
    """What a client needs from a failed call, independent of transport."""

    code: grpc.StatusCode
    message: str
    reason: str = INTERNAL
    metadata: dict[str, str] = field(default_factory=dict)
    field: str | None = None
    retry_after_s: float | None = None


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def pack_status(details: ErrorDetails) -> status_pb2.Status:
    """A google.rpc.Status carrying ErrorInfo, and BadRequest/RetryInfo where they apply."""
    parts = [_pack(error_details_pb2.ErrorInfo(reason=details.reason, domain=DOMAIN, metadata=details.metadata))]
    if details.field is not None:
        violation = error_details_pb2.BadRequest.FieldViolation(field=details.field, description=details.message)
        parts.append(_pack(error_details_pb2.BadRequest(field_violations=[violation])))
    if details.retry_after_s is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(details.retry_after_s * 1e9))
        parts.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    return status_pb2.Status(code=_CODE_TO_RPC[details.code], message=details.message, details=parts)


def unpack_details(code: grpc.StatusCode, message: str, status: status_pb2.Status | None) -> ErrorDetails:
    """Reads ErrorInfo/BadRequest/RetryInfo back out of a status (None: no rich details)."""
    reason = INTERNAL if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN) else code.name
    metadata: dict[str, str] = {}
    field_path: str | None = None
    retry: float | None = None
    for detail in status.details if status is not None else []:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, metadata = info.reason, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            if bad.field_violations:
                field_path = bad.field_violations[0].field
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info_retry = error_details_pb2.RetryInfo()
            detail.Unpack(info_retry)
            retry = info_retry.retry_delay.ToNanoseconds() / 1e9
    return ErrorDetails(
        code=code, message=message, reason=reason, metadata=metadata, field=field_path, retry_after_s=retry
    )


__all__ = ["DOMAIN", "ErrorDetails", "code_pb2", "pack_status", "unpack_details"]
