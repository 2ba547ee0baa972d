"""Media inputs without a network: policy flags, data: URLs, decoding limits, file://, digests, counts.

Every image is generated with Pillow here; the bomb is a hand-made PNG header that claims a huge
size, so refusing it must not decode (checked by time and traced memory).
"""

from __future__ import annotations

import base64
import dataclasses
import io
import os
import struct
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lateserve.server.domain import InvalidArgument
from lateserve.server.media import (
    MediaPolicy,
    check_image_count,
    decode_image,
    fetch_image_bytes,
    image_digest,
    load_image,
    parse_limit_mm_per_prompt,
)
from lateserve.wire import reasons

FIELD = "documents[2].content[0].image_url"
POLICY = MediaPolicy()


def encode(image: Image.Image, fmt: str, **save: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save)
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def png_header(width: int, height: int) -> bytes:
    """A tiny PNG that claims width x height RGB pixels (its IDAT holds almost nothing)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def refused(reason: str, fn: object, *args: object) -> InvalidArgument:
    assert callable(fn)
    with pytest.raises(InvalidArgument) as info:
        fn(*args)
    assert info.value.reason == reason, info.value.message
    assert info.value.field == FIELD
    return info.value


# --- policy -------------------------------------------------------------------------------------


def test_policy_defaults_follow_the_brief_and_vllm() -> None:
    p = MediaPolicy()
    assert p.allowed_media_domains == ()
    assert p.allowed_local_media_path is None
    assert p.max_image_bytes == 20 * 1024 * 1024
    assert p.max_image_pixels == 50_000_000
    assert p.max_images_per_prompt == 8
    assert p.max_aspect_ratio == 200
    assert p.fetch_timeout_s == 10
    assert p.allow_private_addresses is False
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.max_image_bytes = 1  # type: ignore[misc]


def test_from_flags_parses_vllm_spellings(tmp_path: Path) -> None:
    p = MediaPolicy.from_flags(
        allowed_media_domains="Images.Example.COM., cdn.example.org",
        allowed_local_media_path=str(tmp_path),
        limit_mm_per_prompt='{"image": 4}',
        fetch_timeout_s=2.5,
    )
    assert p.allowed_media_domains == ("images.example.com", "cdn.example.org")
    assert p.allowed_local_media_path == tmp_path.resolve()
    assert p.max_images_per_prompt == 4
    assert p.fetch_timeout_s == 2.5
    assert (
        MediaPolicy.from_flags(allowed_media_domains=["a.test"], allowed_local_media_path="").allowed_local_media_path
        is None
    )
    assert MediaPolicy.from_flags(limit_mm_per_prompt={"image": 0, "video": 0}).max_images_per_prompt == 0
    assert MediaPolicy.from_flags(limit_mm_per_prompt="{}").max_images_per_prompt == 8


@pytest.mark.parametrize(
    ("flag", "words"),
    [
        ('{"images": 4}', "unknown modality 'images'"),
        ('{"image": "4"}', "must be an integer"),
        ('{"image": 2.5}', "must be an integer"),
        ('{"image": true}', "must be an integer"),
        ('{"image": -1}', "must be an integer >= 0"),
        ('{"image": {"count": 4}}', "must be an integer"),
        ('{"video": 2}', "no video inputs"),
        ("[4]", "must be a JSON object"),
        ("image=4", "must be a JSON object"),
    ],
)
def test_limit_mm_per_prompt_refuses_bad_values_clearly(flag: str, words: str) -> None:
    with pytest.raises(ValueError, match="--limit-mm-per-prompt") as info:
        parse_limit_mm_per_prompt(flag)
    assert words in str(info.value)


def test_from_flags_refuses_a_missing_local_media_directory(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--allowed-local-media-path"):
        MediaPolicy.from_flags(allowed_local_media_path=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="max_image_pixels"):
        MediaPolicy(max_image_pixels=0)


# --- data: URLs and formats ------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "mime"), [("PNG", "png"), ("WEBP", "webp"), ("BMP", "bmp")])
def test_lossless_formats_round_trip_exactly(fmt: str, mime: str) -> None:
    source = noise(17, 11)
    save: dict[str, object] = {"lossless": True} if fmt == "WEBP" else {}
    image = load_image(data_url(encode(source, fmt, **save), f"image/{mime}"), POLICY, FIELD)
    assert image.mode == "RGB" and image.size == (17, 11)
    assert np.array_equal(np.asarray(image), np.asarray(source))


def test_jpeg_decodes_to_rgb_close_to_the_source() -> None:
    source = Image.new("RGB", (32, 24), (200, 40, 90))
    image = load_image(data_url(encode(source, "JPEG", quality=95), "image/jpeg"), POLICY, FIELD)
    assert image.mode == "RGB" and image.size == (32, 24)
    assert np.abs(np.asarray(image, dtype=int) - np.array([200, 40, 90])).max() <= 4


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animated_images_give_their_first_frame(fmt: str) -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    save: dict[str, object] = {"save_all": True, "append_images": frames[1:], "duration": 50, "loop": 0}
    if fmt == "WEBP":
        save["lossless"] = True
    image = load_image(data_url(encode(frames[0], fmt, **save), f"image/{fmt.lower()}"), POLICY, FIELD)
    assert image.mode == "RGB"
    assert image.getpixel((4, 4)) == (255, 0, 0)


def test_rgba_is_composited_on_white() -> None:
    rgba = Image.new("RGBA", (3, 1))
    rgba.putpixel((0, 0), (10, 20, 30, 0))  # fully transparent -> white, whatever its colour
    rgba.putpixel((1, 0), (10, 20, 30, 255))  # opaque -> unchanged
    rgba.putpixel((2, 0), (200, 0, 0, 128))  # half -> half way to white
    image = load_image(data_url(encode(rgba, "PNG")), POLICY, FIELD)
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == (255, 255, 255)
    assert image.getpixel((1, 0)) == (10, 20, 30)
    r, g, b = image.getpixel((2, 0))  # type: ignore[misc]
    assert r >= 226 and 126 <= g <= 128 and 126 <= b <= 128


def test_palette_with_transparency_and_la_are_composited_on_white() -> None:
    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 0, 128, 0] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.putpixel((1, 0), 1)
    for fmt in ("PNG", "GIF"):
        image = load_image(data_url(encode(pal, fmt, transparency=0), f"image/{fmt.lower()}"), POLICY, FIELD)
        assert image.getpixel((0, 0)) == (255, 255, 255), fmt  # index 0 is transparent black
        assert image.getpixel((1, 0)) == (0, 128, 0), fmt
    la = Image.new("LA", (2, 1))
    la.putpixel((0, 0), (0, 0))
    la.putpixel((1, 0), (50, 255))
    image = load_image(data_url(encode(la, "PNG")), POLICY, FIELD)
    assert image.getpixel((0, 0)) == (255, 255, 255)
    assert image.getpixel((1, 0)) == (50, 50, 50)


def test_grayscale_and_cmyk_become_rgb() -> None:
    grey = Image.new("L", (4, 4), 77)
    image = load_image(data_url(encode(grey, "PNG")), POLICY, FIELD)
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (77, 77, 77)
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # red
    image = load_image(data_url(encode(cmyk, "JPEG", quality=95), "image/jpeg"), POLICY, FIELD)
    r, g, b = image.getpixel((4, 4))  # type: ignore[misc]
    assert image.mode == "RGB" and r > 240 and g < 15 and b < 15


def test_exif_orientation_is_not_applied_as_in_vllm() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = encode(Image.new("RGB", (40, 20), (0, 0, 0)), "JPEG", exif=exif.tobytes())
    assert load_image(data_url(data, "image/jpeg"), POLICY, FIELD).size == (40, 20)


def test_data_url_mime_is_not_checked_against_the_content() -> None:
    # vLLM decodes by content too; the media type only has to be image/*.
    image = load_image(data_url(encode(noise(4, 4), "PNG"), "image/jpeg"), POLICY, FIELD)
    assert image.size == (4, 4)


def test_line_wrapped_base64_is_accepted() -> None:
    b64 = base64.encodebytes(encode(noise(30, 30), "PNG")).decode()  # newline every 76 characters
    assert "\n" in b64
    assert load_image(f"data:image/png;base64,{b64}", POLICY, FIELD).size == (30, 30)


@pytest.mark.parametrize(
    ("url", "reason", "words"),
    [
        ("data:image/png;base64,@@@notbase64@@@", reasons.IMAGE_INVALID, "not valid base64"),
        ("data:image/png;base64,iVBORw0KGgo", reasons.IMAGE_INVALID, "not valid base64"),  # bad padding
        ("data:text/plain;base64,aGVsbG8=", reasons.IMAGE_INVALID, "'text/plain', not image/*"),
        ("data:;base64,aGVsbG8=", reasons.IMAGE_INVALID, "'text/plain', not image/*"),
        ("data:image/png,rawbytes", reasons.IMAGE_INVALID, "base64"),
        ("data:image/png;base64", reasons.IMAGE_INVALID, "no ','"),
        ("data:image/png;base64,", reasons.IMAGE_INVALID, "no data"),
        ("data:image/png;base64,aGVsbG8gd29ybGQ=", reasons.IMAGE_INVALID, "not a PNG, JPEG, WebP, GIF or BMP"),
        ("ftp://example.com/x.png", reasons.MEDIA_NOT_ALLOWED, "scheme 'ftp'"),
        ("gopher://127.0.0.1:70/", reasons.MEDIA_NOT_ALLOWED, "scheme 'gopher'"),
        ("/etc/passwd", reasons.MEDIA_NOT_ALLOWED, "scheme (none)"),
        ("", reasons.IMAGE_INVALID, "empty"),
    ],
)
def test_bad_urls_are_refused_with_their_reason(url: str, reason: str, words: str) -> None:
    error = refused(reason, load_image, url, POLICY, FIELD)
    assert words in error.message


def test_other_formats_are_refused() -> None:
    image = noise(8, 8)
    for fmt in ("TIFF", "ICO", "PPM"):
        error = refused(reasons.IMAGE_INVALID, load_image, data_url(encode(image, fmt)), POLICY, FIELD)
        assert "not a PNG, JPEG, WebP, GIF or BMP" in error.message


@pytest.mark.parametrize(("fmt", "mime"), [("PNG", "png"), ("JPEG", "jpeg"), ("GIF", "gif"), ("WEBP", "webp")])
def test_truncated_files_are_invalid_not_crashes(fmt: str, mime: str) -> None:
    data = encode(noise(64, 64), fmt)
    error = refused(reasons.IMAGE_INVALID, load_image, data_url(data[: len(data) // 2], f"image/{mime}"), POLICY, FIELD)
    assert error.message.startswith("image")


# --- limits -----------------------------------------------------------------------------------------


def test_byte_limit_is_checked_before_base64_decoding() -> None:
    data = encode(noise(64, 64), "PNG")
    policy = MediaPolicy(max_image_bytes=len(data) - 1)
    error = refused(reasons.MEDIA_LIMIT, load_image, data_url(data), policy, FIELD)
    assert f"over the limit of {len(data) - 1} (--max-image-bytes)" in error.message
    assert load_image(data_url(data), MediaPolicy(max_image_bytes=len(data)), FIELD).size == (64, 64)


def test_a_huge_header_is_refused_without_decoding() -> None:
    bomb = png_header(30000, 30000)
    assert len(bomb) < 200
    tracemalloc.start()
    start = time.perf_counter()
    try:
        error = refused(reasons.MEDIA_LIMIT, load_image, data_url(bomb), POLICY, FIELD)
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "900000000 pixels, over the limit of 50000000 (--max-image-pixels)" in error.message
    assert elapsed < 0.5 and peak < 5_000_000  # decoding would need 2.7 GB


def test_pixel_limit_names_the_size_below_pillows_own_guard() -> None:
    # 8000x8000 = 64 M: over the policy's 50 M, under Pillow's 89 M warning threshold.
    error = refused(reasons.MEDIA_LIMIT, decode_image, png_header(8000, 8000), POLICY, FIELD)
    assert error.message == "image is 8000x8000 = 64000000 pixels, over the limit of 50000000 (--max-image-pixels)"
    error = refused(
        reasons.MEDIA_LIMIT, decode_image, encode(noise(20, 10), "PNG"), MediaPolicy(max_image_pixels=199), FIELD
    )
    assert "20x10 = 200 pixels, over the limit of 199" in error.message


def test_aspect_ratio_limit() -> None:
    assert load_image(data_url(encode(noise(200, 1), "PNG")), POLICY, FIELD).size == (200, 1)
    error = refused(reasons.MEDIA_LIMIT, load_image, data_url(encode(noise(1, 201), "PNG")), POLICY, FIELD)
    assert "aspect ratio 201 over the limit of 200" in error.message
    refused(reasons.MEDIA_LIMIT, decode_image, png_header(4, 3), MediaPolicy(max_aspect_ratio=1.2), FIELD)


def test_image_count_limit() -> None:
    check_image_count(8, POLICY, FIELD)
    error = refused(reasons.MEDIA_LIMIT, check_image_count, 9, POLICY, FIELD)
    assert error.message == "9 images in one prompt, over the limit of 8 (--limit-mm-per-prompt)"
    check_image_count(0, MediaPolicy(max_images_per_prompt=0), FIELD)
    error = refused(reasons.MEDIA_LIMIT, check_image_count, 1, MediaPolicy(max_images_per_prompt=0), FIELD)
    assert "images are disabled" in error.message


# --- file:// -----------------------------------------------------------------------------------------


@pytest.fixture
def media_root(tmp_path: Path) -> Path:
    root = tmp_path / "allowed"
    (root / "sub dir").mkdir(parents=True)
    (root / "sub dir" / "a.png").write_bytes(encode(noise(5, 4, seed=1), "PNG"))
    (tmp_path / "secret.png").write_bytes(encode(noise(5, 4, seed=2), "PNG"))
    return root


def test_file_url_inside_the_allowed_path_works(media_root: Path) -> None:
    policy = MediaPolicy(allowed_local_media_path=media_root)
    path = media_root / "sub dir" / "a.png"
    expected = np.asarray(noise(5, 4, seed=1))
    for url in (f"file://{path.as_posix().replace(' ', '%20')}", f"file://localhost{path.as_posix()}"):
        assert np.array_equal(np.asarray(load_image(url, policy, FIELD)), expected)
    os.symlink(path, media_root / "inner-link.png")  # a link that stays inside is fine
    assert load_image(f"file://{media_root}/inner-link.png", policy, FIELD).size == (5, 4)


def test_file_url_outside_the_allowed_path_is_refused(media_root: Path) -> None:
    policy = MediaPolicy(allowed_local_media_path=media_root)
    secret = media_root.parent / "secret.png"
    os.symlink(secret, media_root / "escape.png")
    os.symlink(media_root.parent, media_root / "up")
    for url in (
        f"file://{secret}",
        f"file://{media_root}/../secret.png",
        f"file://{media_root}/escape.png",  # a symlink inside pointing outside
        f"file://{media_root}/up/secret.png",  # a directory symlink pointing outside
        "file:///etc/passwd",
    ):
        error = refused(reasons.MEDIA_NOT_ALLOWED, load_image, url, policy, FIELD)
        assert "outside --allowed-local-media-path" in error.message, url
    error = refused(reasons.MEDIA_NOT_ALLOWED, load_image, f"file://{media_root}/sub%20dir/a.png", POLICY, FIELD)
    assert "--allowed-local-media-path is not set" in error.message
    refused(reasons.MEDIA_NOT_ALLOWED, load_image, f"file://otherhost{media_root}/sub%20dir/a.png", policy, FIELD)


def test_file_url_odd_targets_are_invalid_without_blocking(media_root: Path) -> None:
    policy = MediaPolicy(allowed_local_media_path=media_root)
    os.mkfifo(media_root / "pipe.png")  # opening a FIFO for reading would block without O_NONBLOCK
    for name, words in (
        ("missing.png", "does not exist"),
        ("sub%20dir", "not a regular file"),
        ("pipe.png", "not a regular file"),
    ):
        error = refused(reasons.IMAGE_INVALID, load_image, f"file://{media_root}/{name}", policy, FIELD)
        assert words in error.message
    small = MediaPolicy(allowed_local_media_path=media_root, max_image_bytes=10)
    refused(reasons.MEDIA_LIMIT, load_image, f"file://{media_root}/sub%20dir/a.png", small, FIELD)


# --- digests -----------------------------------------------------------------------------------------


def test_image_digest_follows_the_pixels() -> None:
    a, b = noise(8, 8, seed=1), noise(8, 8, seed=2)
    assert image_digest(a) != image_digest(b)
    assert image_digest(a) == image_digest(a.copy())
    assert len(image_digest(a)) == 32
    # The same picture through two encodings shares a digest; the same bytes in another shape do not.
    from_png = load_image(data_url(encode(a, "PNG")), POLICY, FIELD)
    from_bmp = load_image(data_url(encode(a, "BMP"), "image/bmp"), POLICY, FIELD)
    assert image_digest(from_png) == image_digest(from_bmp) == image_digest(a)
    raw = bytes(range(48))
    assert image_digest(Image.frombytes("RGB", (2, 8), raw)) != image_digest(Image.frombytes("RGB", (8, 2), raw))
    assert image_digest(Image.new("L", (3, 1), 7)) != image_digest(Image.new("RGB", (1, 1), (7, 7, 7)))


def test_fetch_image_bytes_returns_the_encoded_bytes() -> None:
    data = encode(noise(3, 3), "PNG")
    assert fetch_image_bytes(data_url(data), POLICY, FIELD) == data
