"""The encoded bytes an image URL names: data:, http(s):// or file://, each only as the policy allows.

This module dispatches on the scheme and handles data: URLs itself (base64 with an image/* media
type, size checked before the base64 is decoded); `remote` fetches http(s) under the SSRF rules and
`local` reads file:// under --allowed-local-media-path. Any other scheme is refused.
"""

from __future__ import annotations

import base64
import binascii
from urllib.parse import urlsplit

from lateserve.server.media.errors import fail, fail_too_big
from lateserve.server.media.local import read_file_url
from lateserve.server.media.policy import MediaPolicy
from lateserve.server.media.remote import fetch_http
from lateserve.wire import reasons


def fetch_image_bytes(url: str, policy: MediaPolicy, field: str) -> bytes:
    """The encoded image a URL names, or InvalidArgument (reason and `field` set) explaining the refusal."""
    if not isinstance(url, str) or not url.strip():
        fail("image_url is empty", reasons.IMAGE_INVALID, field)
    url = url.strip()
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return _read_data_url(url, policy, field)
    if scheme in ("http", "https", "file"):
        try:
            parts = urlsplit(url)
        except ValueError as exc:
            fail(f"image_url is not a valid URL: {exc}", reasons.IMAGE_INVALID, field)
        if scheme == "file":
            return read_file_url(parts, policy, field)
        return fetch_http(parts, policy, field)
    shown = f"'{scheme}'" if scheme else "(none)"
    fail(
        f"image_url scheme {shown} is not supported (use data:, http://, https:// or file://)",
        reasons.MEDIA_NOT_ALLOWED,
        field,
    )


# --- data: ----------------------------------------------------------------------------------------


def _read_data_url(url: str, policy: MediaPolicy, field: str) -> bytes:
    """Decode `data:image/...;base64,...`, refusing oversize payloads before decoding them."""
    header, comma, payload = url[len("data:") :].partition(",")
    if not comma:
        fail("image_url data: URL has no ',' before its data", reasons.IMAGE_INVALID, field)
    params = [p.strip().lower() for p in header.split(";")]
    mime = params[0] or "text/plain"  # RFC 2397's default media type
    if not mime.startswith("image/"):
        fail(f"image_url data: URL has media type '{mime}', not image/*", reasons.IMAGE_INVALID, field)
    if "base64" not in params[1:]:
        fail("image_url data: URL must be base64-encoded (';base64,')", reasons.IMAGE_INVALID, field)
    payload = "".join(payload.split())  # line-wrapped base64 (e.g. from `base64`) is common
    # 4 base64 characters carry 3 bytes; refuse before allocating the decoded copy.
    estimated = len(payload) // 4 * 3 - payload[-2:].count("=")
    if estimated > policy.max_image_bytes:
        fail_too_big(estimated, policy, field)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        fail("image_url data: URL is not valid base64", reasons.IMAGE_INVALID, field)
    if len(data) > policy.max_image_bytes:
        fail_too_big(len(data), policy, field)
    if not data:
        fail("image_url data: URL holds no data", reasons.IMAGE_INVALID, field)
    return data
