"""Encoded bytes -> one RGB image, refusing bombs and odd shapes before paying for their pixels.

Pillow's `Image.open` reads only the header, so the size is checked against --max-image-pixels
before any pixel is decoded; a 30000x30000 PNG of a few hundred bytes costs microseconds. Pillow's
own decompression-bomb guard (`Image.MAX_IMAGE_PIXELS`, process-global) is left untouched: its
DecompressionBombError (above 2x its limit) becomes MEDIA_LIMIT here, and its warning (between 1x
and 2x) can only fire for images that the policy's lower default limit refuses anyway. An operator
raising --max-image-pixels above 2 x Image.MAX_IMAGE_PIXELS (~179 M) is still capped by Pillow.

Conversion follows vLLM's loader: transparent images are composited onto white, everything else is
`convert("RGB")`. vLLM composites only RGBA; here LA, PA and palette/grey/RGB images with a
`transparency` entry are composited too, so a transparent pixel is white whatever its mode (for
RGBA inputs the result is identical to vLLM's). EXIF orientation is NOT applied, as in vLLM: the
pixels are used as stored, so embeddings match a vLLM server given the same file.
"""

from __future__ import annotations

import io
import re
from typing import Final

from PIL import Image, UnidentifiedImageError

from lateserve.server.media.errors import fail
from lateserve.server.media.policy import FLAG_MAX_ASPECT_RATIO, FLAG_MAX_IMAGE_PIXELS, MediaPolicy
from lateserve.wire import reasons

FORMATS: Final = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
"""Pillow format names accepted; Image.open tries no other plugin (smaller attack surface)."""

_ALPHA_MODES: Final = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_WHITE: Final = (255, 255, 255)
_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


def decode_image(data: bytes, policy: MediaPolicy, field: str) -> Image.Image:
    """The first frame of `data` as a fully loaded RGB image; InvalidArgument on anything refused."""
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as exc:
        found = _BOMB_PIXELS.search(str(exc))
        size = f"{found.group(1)} pixels" if found else "over Pillow's decompression-bomb limit"
        fail(
            f"image is {size}, over the limit of {policy.max_image_pixels} ({FLAG_MAX_IMAGE_PIXELS})",
            reasons.MEDIA_LIMIT,
            field,
        )
    except UnidentifiedImageError:
        fail("image is not a PNG, JPEG, WebP, GIF or BMP file", reasons.IMAGE_INVALID, field)
    except Exception as exc:  # Pillow raises many types (SyntaxError, struct.error, ...) on bad headers
        fail(f"image header cannot be read: {_describe(exc)}", reasons.IMAGE_INVALID, field)

    with image:
        check_dimensions(image.size, policy, field)
        try:
            image.load()  # the first frame only, for GIF and animated WebP
            return to_rgb(image)
        except Image.DecompressionBombError:
            fail(
                f"image is {image.width}x{image.height}, over Pillow's decompression-bomb limit",
                reasons.MEDIA_LIMIT,
                field,
            )
        except MemoryError:
            fail("image needs more memory to decode than is available", reasons.MEDIA_LIMIT, field)
        except Exception as exc:  # truncated data ("image file is truncated"), corrupt streams, ...
            fail(f"image cannot be decoded: {_describe(exc)}", reasons.IMAGE_INVALID, field)


def check_dimensions(size: tuple[int, int], policy: MediaPolicy, field: str) -> None:
    """Refuse empty images, too many pixels and extreme aspect ratios, from the header's size alone."""
    width, height = size
    if width <= 0 or height <= 0:
        fail(f"image is {width}x{height}, it has no pixels", reasons.IMAGE_INVALID, field)
    pixels = width * height
    if pixels > policy.max_image_pixels:
        fail(
            f"image is {width}x{height} = {pixels} pixels, over the limit of {policy.max_image_pixels}"
            f" ({FLAG_MAX_IMAGE_PIXELS})",
            reasons.MEDIA_LIMIT,
            field,
        )
    ratio = max(width, height) / min(width, height)
    if ratio > policy.max_aspect_ratio:
        fail(
            f"image is {width}x{height}, aspect ratio {ratio:.4g} over the limit of {policy.max_aspect_ratio:g}"
            f" ({FLAG_MAX_ASPECT_RATIO})",
            reasons.MEDIA_LIMIT,
            field,
        )


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB pixels: transparency composited onto white, other modes (L, CMYK, P, I;16, ...) converted.

    Always a new image, detached from the source file and from any further GIF/WebP frames.
    """
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, _WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if image.mode == "RGB":
        return image.copy()
    # 16/32-bit grey (I;16, I, F) clips at 255 here rather than scaling; vLLM does the same, and
    # matching its pixels matters more than rescuing a mode photos do not use.
    return image.convert("RGB")


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
