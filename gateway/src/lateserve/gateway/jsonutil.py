"""JSON encoding shared by every response: compact, UTF-8, like vLLM's JSONResponse."""

from __future__ import annotations

import json
from typing import Any

_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def dumps(data: Any) -> str:
    """Compact JSON text (no spaces, non-ASCII kept), keys in insertion order."""
    return _ENCODER.encode(data)
