"""Media inputs (images) for every family: fetch under policy, decode with limits, normalise.

One entry point per job, called from input preparation's thread pool (blocking I/O, no asyncio):

* `check_image_count(n, policy, field)` before fetching anything, so an over-long list costs nothing;
* `load_image(url, policy, field)` -> a loaded RGB `PIL.Image.Image` (data:, http(s)://, file://);
* `image_digest(image)` -> bytes for cache keys.

Every refusal is `InvalidArgument` with reason IMAGE_INVALID, MEDIA_NOT_ALLOWED or MEDIA_LIMIT and
`field` set to the caller's path (e.g. "documents[2].content[0].image_url"); no Pillow, socket or
urllib exception escapes.
"""

from __future__ import annotations

import hashlib

from PIL import Image

from lateserve.server.media.decode import decode_image
from lateserve.server.media.errors import fail
from lateserve.server.media.fetch import fetch_image_bytes
from lateserve.server.media.policy import FLAG_LIMIT_MM, MediaPolicy, parse_limit_mm_per_prompt
from lateserve.wire import reasons

__all__ = [
    "MediaPolicy",
    "check_image_count",
    "decode_image",
    "fetch_image_bytes",
    "image_digest",
    "load_image",
    "parse_limit_mm_per_prompt",
]


def load_image(url: str, policy: MediaPolicy, field: str) -> Image.Image:
    """The image `url` names, fetched as `policy` allows and decoded to RGB within its limits."""
    return decode_image(fetch_image_bytes(url, policy, field), policy, field)


def image_digest(image: Image.Image) -> bytes:
    """A 32-byte blake2b of mode, size and raw pixels: equal exactly when the decoded pixels are equal.

    Hashing decoded pixels (not the encoded bytes) lets the same picture sent as PNG, as a data: URL
    or from a file share one cache entry; mode and size are hashed too, so a 2x8 and an 8x2 image
    with the same bytes differ.
    """
    digest = hashlib.blake2b(digest_size=32, person=b"lateserve-img")
    digest.update(f"{image.mode}\0{image.width}x{image.height}\0".encode())
    digest.update(image.tobytes())
    return digest.digest()


def check_image_count(n: int, policy: MediaPolicy, field: str) -> None:
    """Refuse more images in one prompt than --limit-mm-per-prompt allows (vLLM's per-prompt limit)."""
    limit = policy.max_images_per_prompt
    if n <= limit:
        return
    if limit == 0:
        message = f"images are disabled for this server ({FLAG_LIMIT_MM} sets 'image' to 0); got {n}"
    else:
        message = f"{n} images in one prompt, over the limit of {limit} ({FLAG_LIMIT_MM})"
    fail(message, reasons.MEDIA_LIMIT, field)
