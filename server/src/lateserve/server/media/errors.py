"""The one way this package fails: InvalidArgument with a stable reason and the caller's field path.

Kept in one place so every module words the shared limits (bytes, timeout) the same way.
"""

from __future__ import annotations

from typing import NoReturn

from lateserve.server.domain import InvalidArgument
from lateserve.server.media.policy import FLAG_FETCH_TIMEOUT, FLAG_MAX_IMAGE_BYTES, MediaPolicy
from lateserve.wire import reasons


def fail(message: str, reason: str, field: str) -> NoReturn:
    """Raise the request error; `field` is the caller's path, e.g. "documents[2].content[0].image_url"."""
    raise InvalidArgument(message, reason=reason, field=field)


def fail_too_big(size: int, policy: MediaPolicy, field: str, *, more_than: bool = False) -> NoReturn:
    """MEDIA_LIMIT for encoded bytes; `more_than`: reading stopped at limit+1, only a lower bound is known."""
    shown = f"more than {policy.max_image_bytes}" if more_than else str(size)
    fail(
        f"image is {shown} bytes, over the limit of {policy.max_image_bytes} ({FLAG_MAX_IMAGE_BYTES})",
        reasons.MEDIA_LIMIT,
        field,
    )


def fail_timeout(policy: MediaPolicy, field: str) -> NoReturn:
    """MEDIA_LIMIT for a fetch that outlived --media-fetch-timeout (time is a limit like bytes)."""
    fail(
        f"image_url fetch did not finish within {policy.fetch_timeout_s:g} s ({FLAG_FETCH_TIMEOUT})",
        reasons.MEDIA_LIMIT,
        field,
    )
