"""The blocking and asyncio clients expose one API: the methods written once in _core.ClientCore.

Checked by introspection only (no server): same names, parameters, defaults and docstrings; unary
methods are plain functions in one client and coroutine functions in the other; pool_stream is a
plain function in both (it builds the request at call time and returns an iterator).
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import AsyncIterator, Iterator

import pytest

from lateserve.client import AsyncLateserveClient, LateserveClient, Ranking, ServerInfo, TokenizeResult

UNARY = ["rerank", "score", "pool", "embed", "tokenize", "detokenize", "info"]


def _public(cls: type) -> set[str]:
    return {name for name in dir(cls) if not name.startswith("_")}


def test_both_clients_have_the_same_public_methods() -> None:
    assert _public(LateserveClient) - {"close"} == _public(AsyncLateserveClient) - {"close"}
    assert set(UNARY) | {"pool_stream", "close"} == _public(LateserveClient)


@pytest.mark.parametrize("name", [*UNARY, "pool_stream", "__init__"])
def test_signatures_and_docstrings_match(name: str) -> None:
    sync, aio = getattr(LateserveClient, name), getattr(AsyncLateserveClient, name)
    assert list(inspect.signature(sync).parameters.values()) == list(inspect.signature(aio).parameters.values())
    assert sync.__doc__ == aio.__doc__
    assert sync.__name__ == name
    if name != "__init__":
        assert sync.__doc__
        assert sync.__qualname__ == f"LateserveClient.{name}"
        assert aio.__qualname__ == f"AsyncLateserveClient.{name}"


@pytest.mark.parametrize("name", UNARY)
def test_unary_methods_block_or_are_awaited(name: str) -> None:
    assert not inspect.iscoroutinefunction(getattr(LateserveClient, name))
    assert inspect.iscoroutinefunction(getattr(AsyncLateserveClient, name))
    sync_hints = typing.get_type_hints(getattr(LateserveClient, name))
    assert sync_hints == typing.get_type_hints(getattr(AsyncLateserveClient, name))


def test_return_types() -> None:
    assert typing.get_type_hints(LateserveClient.rerank)["return"] is Ranking
    assert typing.get_type_hints(AsyncLateserveClient.info)["return"] is ServerInfo
    assert typing.get_type_hints(LateserveClient.tokenize)["return"] is TokenizeResult
    assert typing.get_type_hints(LateserveClient.detokenize)["return"] is str
    sync_stream = typing.get_type_hints(LateserveClient.pool_stream)["return"]
    aio_stream = typing.get_type_hints(AsyncLateserveClient.pool_stream)["return"]
    assert typing.get_origin(sync_stream) is Iterator and typing.get_origin(aio_stream) is AsyncIterator
    assert not inspect.iscoroutinefunction(AsyncLateserveClient.pool_stream)


def test_a_subclass_inherits_the_methods() -> None:
    class Client(LateserveClient):
        pass

    assert Client.rerank is LateserveClient.rerank


async def test_async_arguments_are_checked_when_awaited() -> None:
    async with AsyncLateserveClient("127.0.0.1:1", timeout=1) as client:
        call = client.tokenize(3)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            await call
        with pytest.raises(ValueError):
            client.pool_stream(["x"], task="bogus")  # type: ignore[arg-type]
