"""What media a request may use: the server's flags, frozen into one value every loader reads.

The flag names and meanings follow vLLM (`--allowed-media-domains`, `--allowed-local-media-path`,
`--limit-mm-per-prompt`) so a deployment moves over without re-learning them. One deliberate
difference: vLLM fetches from *any* domain when `--allowed-media-domains` is unset; here an empty
list means no http(s) fetch at all, because a retrieval server that fetches arbitrary URLs is an
SSRF hole by default. The remaining limits (bytes, pixels, aspect ratio, timeout) bound the work
and memory one untrusted image can cost before it is refused.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

MIB = 1024 * 1024

# Flag names quoted in error messages, so a client learns which setting refused it. The first three
# are vLLM's; the others are lateserve's names for limits vLLM hard-codes or lacks.
FLAG_DOMAINS = "--allowed-media-domains"
FLAG_LOCAL_PATH = "--allowed-local-media-path"
FLAG_LIMIT_MM = "--limit-mm-per-prompt"
FLAG_MAX_IMAGE_BYTES = "--max-image-bytes"
FLAG_MAX_IMAGE_PIXELS = "--max-image-pixels"
FLAG_MAX_ASPECT_RATIO = "--max-image-aspect-ratio"
FLAG_FETCH_TIMEOUT = "--media-fetch-timeout"

# vLLM's modalities. Only images are served here; the others are accepted in
# --limit-mm-per-prompt when set to 0 (a config copied from vLLM that disables them still works).
IMAGE = "image"
_OTHER_VLLM_MODALITIES = frozenset({"video", "audio"})


@dataclass(frozen=True)
class MediaPolicy:
    """Limits and permissions for image inputs; immutable so one instance is shared by every thread.

    allowed_media_domains: host names http(s) image URLs may name, matched exactly (no subdomains,
        as in vLLM). Empty: every http(s) URL is refused.
    allowed_local_media_path: file:// URLs must resolve (symlinks followed) under this directory.
        None: every file:// URL is refused.
    max_image_bytes: encoded size, for data:, http(s) and file:// alike.
    max_image_pixels: width*height from the header, checked before any pixel is decoded.
    max_images_per_prompt: vLLM's --limit-mm-per-prompt '{"image": N}'.
    max_aspect_ratio: long side / short side; extreme strips break vision encoders' resizers.
    fetch_timeout_s: total wall time of one http(s) fetch (connect, headers and body).
    allow_private_addresses: let http(s) fetches reach loopback/private/link-local addresses.
        For tests and private deployments whose image store sits on an internal network only;
        cloud metadata addresses stay refused even then.
    """

    allowed_media_domains: tuple[str, ...] = ()
    allowed_local_media_path: Path | None = None
    max_image_bytes: int = 20 * MIB
    max_image_pixels: int = 50_000_000
    max_images_per_prompt: int = 8
    max_aspect_ratio: float = 200.0
    fetch_timeout_s: float = 10.0
    allow_private_addresses: bool = field(default=False)

    def __post_init__(self) -> None:
        # Normalise here so matching is a plain comparison with urllib's (lower-cased) hostname.
        domains = tuple(_normalise_domain(d) for d in self.allowed_media_domains)
        object.__setattr__(self, "allowed_media_domains", tuple(d for d in domains if d))
        if self.allowed_local_media_path is not None:
            # Resolved once, so containment checks compare real paths on both sides.
            object.__setattr__(self, "allowed_local_media_path", Path(self.allowed_local_media_path).resolve())
        for name in ("max_image_bytes", "max_image_pixels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if (
            isinstance(self.max_images_per_prompt, bool)
            or not isinstance(self.max_images_per_prompt, int)
            or self.max_images_per_prompt < 0
        ):
            raise ValueError(f"max_images_per_prompt must be an integer >= 0, got {self.max_images_per_prompt!r}")
        if not self.max_aspect_ratio >= 1:
            raise ValueError(f"max_aspect_ratio must be >= 1, got {self.max_aspect_ratio!r}")
        if not self.fetch_timeout_s > 0:
            raise ValueError(f"fetch_timeout_s must be > 0, got {self.fetch_timeout_s!r}")

    @classmethod
    def from_flags(
        cls,
        *,
        allowed_media_domains: Iterable[str] | str | None = None,
        allowed_local_media_path: str | os.PathLike[str] | None = None,
        limit_mm_per_prompt: str | Mapping[str, object] | None = None,
        max_image_bytes: int | None = None,
        max_image_pixels: int | None = None,
        max_aspect_ratio: float | None = None,
        fetch_timeout_s: float | None = None,
        allow_private_addresses: bool = False,
    ) -> MediaPolicy:
        """Build a policy from command-line values as vLLM spells them; None keeps the default.

        `allowed_media_domains` may be a list (argparse nargs) or one comma/space separated string.
        `allowed_local_media_path` "" means unset (vLLM's default); otherwise it must be an existing
        directory, checked now so a typo fails at startup rather than on the first request.
        Raises ValueError with the flag's name on any bad value.
        """
        if isinstance(allowed_media_domains, str):
            domains: tuple[str, ...] = tuple(allowed_media_domains.replace(",", " ").split())
        else:
            domains = tuple(allowed_media_domains or ())

        local: Path | None = None
        if allowed_local_media_path is not None and os.fspath(allowed_local_media_path) != "":
            local = Path(allowed_local_media_path)
            if not local.is_dir():
                raise ValueError(f"--allowed-local-media-path {os.fspath(local)!r} is not an existing directory")

        overrides: dict[str, object] = {}
        if limit_mm_per_prompt is not None:
            overrides["max_images_per_prompt"] = parse_limit_mm_per_prompt(limit_mm_per_prompt)
        for name, value in (
            ("max_image_bytes", max_image_bytes),
            ("max_image_pixels", max_image_pixels),
            ("max_aspect_ratio", max_aspect_ratio),
            ("fetch_timeout_s", fetch_timeout_s),
        ):
            if value is not None:
                overrides[name] = value
        return cls(
            allowed_media_domains=domains,
            allowed_local_media_path=local,
            allow_private_addresses=allow_private_addresses,
            **overrides,  # type: ignore[arg-type]
        )


def parse_limit_mm_per_prompt(value: str | Mapping[str, object]) -> int:
    """The image count from `--limit-mm-per-prompt` ('{"image": 4}'); ValueError on anything else.

    Unknown modality keys are refused rather than ignored: a typo ("images") would otherwise leave
    the default limit in force silently. "video"/"audio" are accepted only as 0, since this server
    takes neither. A missing "image" key keeps the default of 8.
    """
    flag = "--limit-mm-per-prompt"
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{flag} must be a JSON object such as '{{\"image\": 4}}', got {value!r}: {exc}") from None
    else:
        parsed = dict(value)
    if not isinstance(parsed, dict):
        raise ValueError(f"{flag} must be a JSON object such as '{{\"image\": 4}}', got {value!r}")
    limit = MediaPolicy.__dataclass_fields__["max_images_per_prompt"].default
    for key, count in parsed.items():
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"{flag}: the limit for {key!r} must be an integer >= 0, got {count!r}")
        if key == IMAGE:
            limit = count
        elif key in _OTHER_VLLM_MODALITIES:
            if count != 0:
                raise ValueError(f"{flag}: this server takes no {key} inputs; {key!r} may only be 0, got {count}")
        else:
            raise ValueError(f"{flag}: unknown modality {key!r} (this server accepts 'image')")
    assert isinstance(limit, int)
    return limit


def _normalise_domain(domain: str) -> str:
    """Lower-case and drop a trailing dot, as urllib reports hostnames ("Example.COM." -> "example.com")."""
    if not isinstance(domain, str):
        raise ValueError(f"--allowed-media-domains entries must be strings, got {domain!r}")
    return domain.strip().lower().rstrip(".")
