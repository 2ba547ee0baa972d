"""Python client for the lateserve.v1 gRPC services: LateserveClient (blocking) and AsyncLateserveClient.

>>> from lateserve.client import LateserveClient
>>> with LateserveClient("localhost:50051", timeout=30) as client:  # doctest: +SKIP
...     ranking = client.rerank("what is late interaction?", ["ColBERT ...", "BM25 ..."], top_n=1)
"""

from lateserve.client.aio import AsyncLateserveClient
from lateserve.client.errors import (
    InvalidArgumentError,
    LateserveError,
    NotFoundError,
    OverloadedError,
    ProtocolError,
    UnauthenticatedError,
    UnavailableError,
    UnsupportedTaskError,
)
from lateserve.client.sync import LateserveClient
from lateserve.client.types import (
    InputLike,
    LexicalWeight,
    Limits,
    ModelInfo,
    Pooled,
    Ranking,
    RerankResult,
    Scores,
    ServerInfo,
    Timings,
    TokenizeResult,
    Usage,
)

__all__ = [
    "AsyncLateserveClient",
    "InputLike",
    "InvalidArgumentError",
    "LateserveClient",
    "LateserveError",
    "LexicalWeight",
    "Limits",
    "ModelInfo",
    "NotFoundError",
    "OverloadedError",
    "Pooled",
    "ProtocolError",
    "Ranking",
    "RerankResult",
    "Scores",
    "ServerInfo",
    "Timings",
    "TokenizeResult",
    "UnauthenticatedError",
    "UnavailableError",
    "UnsupportedTaskError",
    "Usage",
]
