"""file:// image URLs: read only under --allowed-local-media-path, symlinks resolved first.

As vLLM, a file:// URL must resolve inside the allowed directory after following every symlink, so
a link inside it that points outside is refused. The opened descriptor is checked again (through
/proc/self/fd where it exists), so a path swapped for a symlink between check and open fails too.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from urllib.parse import SplitResult, unquote

from lateserve.server.media.errors import fail, fail_too_big
from lateserve.server.media.policy import FLAG_LOCAL_PATH, MediaPolicy
from lateserve.wire import reasons


def read_file_url(parts: SplitResult, policy: MediaPolicy, field: str) -> bytes:
    """Read a local file that lies under --allowed-local-media-path once every symlink is resolved."""
    root = policy.allowed_local_media_path
    if root is None:
        fail(f"file:// image URLs are disabled ({FLAG_LOCAL_PATH} is not set)", reasons.MEDIA_NOT_ALLOWED, field)
    if parts.netloc not in ("", "localhost"):
        fail(f"file:// URL names host '{parts.netloc}'; only local files are read", reasons.MEDIA_NOT_ALLOWED, field)
    raw = unquote(parts.path)
    if not raw.startswith("/") or "\x00" in raw:
        fail("file:// URL must name an absolute path", reasons.IMAGE_INVALID, field)
    try:
        real = Path(raw).resolve()
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop on older Pythons
        fail(f"file:// path '{raw}' cannot be resolved", reasons.IMAGE_INVALID, field)
    if not real.is_relative_to(root):
        fail(f"file:// path '{raw}' is outside {FLAG_LOCAL_PATH}", reasons.MEDIA_NOT_ALLOWED, field)
    # O_NOFOLLOW: the resolved path has no symlink left, so one appearing now is a swap; refuse it.
    # O_NONBLOCK: a FIFO placed under the root must not block the open.
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(real, flags)
    except FileNotFoundError:
        fail(f"file:// path '{raw}' does not exist", reasons.IMAGE_INVALID, field)
    except OSError as exc:
        fail(f"file:// path '{raw}' cannot be opened: {exc.strerror}", reasons.IMAGE_INVALID, field)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            fail(f"file:// path '{raw}' is not a regular file", reasons.IMAGE_INVALID, field)
        opened = Path(f"/proc/self/fd/{fd}")
        if opened.is_symlink() and not Path(os.readlink(opened)).is_relative_to(root):
            fail(f"file:// path '{raw}' is outside {FLAG_LOCAL_PATH}", reasons.MEDIA_NOT_ALLOWED, field)
        if info.st_size > policy.max_image_bytes:
            fail_too_big(info.st_size, policy, field)
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(policy.max_image_bytes + 1)
    except OSError as exc:
        fail(f"file:// path '{raw}' cannot be read: {exc.strerror}", reasons.IMAGE_INVALID, field)
    finally:
        os.close(fd)
    if len(data) > policy.max_image_bytes:  # the file grew after fstat
        fail_too_big(len(data), policy, field)
    return data
