"""--api-key and TLS against live servers, with certificates made in the test (openssl CLI):
HTTP Bearer keys (401 in vLLM's envelope, public probes open), gRPC `authorization` metadata
(UNAUTHENTICATED; health and reflection open), the Python clients' api_key (sync and asyncio, unary and
streaming, plain and mutual TLS), the sidecar gateway forwarding the caller's key, HTTPS
(plain HTTP refused on that port), gRPC TLS, and mutual TLS refusing a client without a certificate."""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from lateserve.client import AsyncLateserveClient, LateserveClient, UnauthenticatedError
from lateserve.gateway.app import start_gateway
from lateserve.gateway.config import GatewayConfig
from lateserve.server.config import ServerConfig
from lateserve.v1 import common_pb2, rerank_service_pb2, rerank_service_pb2_grpc
from tests.live import LiveServer

KEY = "sk-test-0123456789"
RERANK = {"query": "What is machine learning?", "documents": ["Machine learning is AI.", "The weather is sunny."]}

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


def _ca(folder: Path, name: str) -> tuple[Path, Path]:
    key, cert = folder / f"{name}.key", folder / f"{name}.pem"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
             "-subj", f"/CN={name}", "-keyout", key, "-out", cert)  # fmt: skip
    return cert, key


def _leaf(folder: Path, name: str, ca: tuple[Path, Path], extensions: str) -> tuple[Path, Path]:
    key, csr, cert, ext = (folder / f"{name}.{suffix}" for suffix in ("key", "csr", "pem", "ext"))
    ext.write_text(extensions)
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-subj", f"/CN={name}",
             "-keyout", key, "-out", csr)  # fmt: skip
    _openssl("x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial", "-days", "2",
             "-out", cert, "-extfile", ext)  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca = _ca(folder, "test-ca")
    server = _leaf(folder, "localhost", ca, "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    client = _leaf(folder, "client", ca, "extendedKeyUsage=clientAuth\n")
    other, _ = _ca(folder, "other-ca")
    return Pki(ca[0], server[0], server[1], client[0], client[1], other)


def _config(colbert_dir: Path, **extra: Any) -> ServerConfig:
    return ServerConfig(
        model=str(colbert_dir), workers=1, threads_per_worker=1, max_model_len=64, max_queued_requests=64, **extra
    )


@pytest.fixture(scope="module")
def secure(colbert_dir: Path, pki: Pki) -> Iterator[LiveServer]:
    """--api-key, HTTPS and gRPC mutual TLS at once."""
    config = _config(
        colbert_dir,
        api_key=KEY,
        ssl_certfile=str(pki.server_cert),
        ssl_keyfile=str(pki.server_key),
        grpc_ssl_certfile=str(pki.server_cert),
        grpc_ssl_keyfile=str(pki.server_key),
        grpc_ssl_ca_certfile=str(pki.ca),
    )
    with LiveServer(config) as live:
        yield live


@pytest.fixture(scope="module")
def keyed(colbert_dir: Path) -> Iterator[LiveServer]:
    """--api-key with plain HTTP and gRPC (the sidecar case), and a sidecar gateway without a key."""
    with LiveServer(_config(colbert_dir, api_key=KEY)) as live:
        yield live


class Reply:
    def __init__(self, status: int, headers: Any, raw: bytes) -> None:
        self.status, self.headers, self.raw = status, headers, raw

    def json(self) -> Any:
        return json.loads(self.raw)


def http(url: str, body: Any = None, *, context: ssl.SSLContext | None = None, **headers: str) -> Reply:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="POST" if data else "GET")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    for key, value in headers.items():
        request.add_header(key, value)
    try:
        with urllib.request.urlopen(request, timeout=60, context=context) as response:
            return Reply(response.status, response.headers, response.read())
    except urllib.error.HTTPError as error:
        return Reply(error.code, error.headers, error.read())


def unauthorized() -> dict[str, Any]:
    return {"error": {"message": "Unauthorized", "type": "UnauthorizedError", "param": None, "code": 401}}


def rerank_request() -> rerank_service_pb2.RerankRequest:
    return rerank_service_pb2.RerankRequest(
        query=common_pb2.Input(text="q"), documents=[common_pb2.Input(text="a"), common_pb2.Input(text="b")]
    )


# ---------------------------------------------------------------- API key over HTTP and gRPC


def test_http_needs_the_bearer_key(keyed: LiveServer) -> None:
    base = keyed.http_url
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}):
        reply = http(base + "/rerank", RERANK, **headers)
        assert reply.status == 401, headers
        assert reply.json() == unauthorized()
        assert reply.headers["WWW-Authenticate"] == "Bearer"
    ok = http(base + "/rerank", RERANK, Authorization=f"Bearer {KEY}")
    assert ok.status == 200 and len(ok.json()["results"]) == 2
    for path in ("/v1/models", "/openapi.json", "/docs", "/tokenize", "/nope"):
        assert http(base + path).status == 401, path
    assert http(base + "/v1/models", Authorization=f"Bearer {KEY}").status == 200
    for path in ("/health", "/ping", "/version", "/metrics"):
        assert http(base + path).status == 200, path
    document = http(base + "/openapi.json", Authorization=f"bearer {KEY}").json()
    assert document["paths"]["/rerank"]["post"]["security"] == [{"bearer": []}]


def test_grpc_needs_the_authorization_metadata(keyed: LiveServer) -> None:
    with grpc.insecure_channel(keyed.grpc_target) as channel:
        rerank = rerank_service_pb2_grpc.RerankServiceStub(channel).Rerank
        for metadata in ((), (("authorization", "Bearer nope"),), (("authorization", KEY),)):
            with pytest.raises(grpc.RpcError) as info:
                rerank(rerank_request(), metadata=metadata)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, metadata
        assert len(rerank(rerank_request(), metadata=(("authorization", f"Bearer {KEY}"),)).results) == 2
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        assert any(s.name == "lateserve.v1.RerankService" for s in answers[0].list_services_response.service)


def test_python_client_sends_its_api_key(keyed: LiveServer) -> None:
    documents = RERANK["documents"]
    with LateserveClient(keyed.grpc_target, timeout=30, api_key=KEY) as client:
        assert len(client.rerank(RERANK["query"], documents).results) == 2
        assert len(client.score(RERANK["query"], documents).scores) == 2
        assert [i for i, _ in client.pool_stream(documents)] == [0, 1]  # streams carry the key too
        assert client.info().models
    for key in (None, "wrong"):
        with LateserveClient(keyed.grpc_target, timeout=30, api_key=key) as client:
            with pytest.raises(UnauthenticatedError) as info:
                client.rerank(RERANK["query"], documents)
            assert info.value.code == grpc.StatusCode.UNAUTHENTICATED, key
            with pytest.raises(UnauthenticatedError):
                list(client.pool_stream(documents))


async def test_async_python_client_sends_its_api_key(keyed: LiveServer) -> None:
    async with AsyncLateserveClient(keyed.grpc_target, timeout=30, api_key=KEY) as client:
        ranking = await client.rerank(RERANK["query"], RERANK["documents"], max_tokens_per_doc=2)
        assert len(ranking.results) == 2
        assert [i async for i, _ in client.pool_stream(RERANK["documents"])] == [0, 1]
    async with AsyncLateserveClient(keyed.grpc_target, timeout=30) as client:
        with pytest.raises(UnauthenticatedError):
            await client.score(RERANK["query"], RERANK["documents"])


def test_sidecar_forwards_the_callers_key(keyed: LiveServer) -> None:
    runner = keyed.call(start_gateway(GatewayConfig(grpc_target=keyed.grpc_target, host="127.0.0.1", port=0)))
    try:
        base = f"http://127.0.0.1:{runner.addresses[0][1]}"
        ok = http(base + "/rerank", RERANK, Authorization=f"Bearer {KEY}")
        assert ok.status == 200, ok.raw
        refused = http(base + "/rerank", RERANK, Authorization="Bearer wrong")
        assert refused.status == 401 and refused.json()["error"]["type"] == "UnauthorizedError"
        assert http(base + "/rerank", RERANK).status == 401
        assert http(base + "/health").status == 200  # gRPC health is open
    finally:
        keyed.call(runner.cleanup())
    # A sidecar holding the key itself checks callers and keeps /version open.
    config = GatewayConfig(grpc_target=keyed.grpc_target, host="127.0.0.1", port=0, api_key=KEY)
    runner = keyed.call(start_gateway(config))
    try:
        base = f"http://127.0.0.1:{runner.addresses[0][1]}"
        assert http(base + "/rerank", RERANK).status == 401
        assert http(base + "/rerank", RERANK, Authorization=f"Bearer {KEY}").status == 200
        assert http(base + "/version").status == 200
    finally:
        keyed.call(runner.cleanup())


# ---------------------------------------------------------------- TLS


def test_https_works_and_plain_http_fails(secure: LiveServer, pki: Pki) -> None:
    port = secure.server.http_port
    context = ssl.create_default_context(cafile=str(pki.ca))
    reply = http(f"https://localhost:{port}/rerank", RERANK, context=context, Authorization=f"Bearer {KEY}")
    assert reply.status == 200 and len(reply.json()["results"]) == 2
    assert http(f"https://127.0.0.1:{port}/health", context=context).status == 200
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        http(f"http://127.0.0.1:{port}/health")
    untrusted = ssl.create_default_context(cafile=str(pki.other_ca))
    with pytest.raises(urllib.error.URLError):
        http(f"https://localhost:{port}/health", context=untrusted)


def _tls_channel(target: str, ca: Path, cert: Path | None = None, key: Path | None = None) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None,
    )
    return grpc.secure_channel(target, credentials, options=[("grpc.ssl_target_name_override", "localhost")])


def test_grpc_mutual_tls(secure: LiveServer, pki: Pki) -> None:
    auth = (("authorization", f"Bearer {KEY}"),)
    with _tls_channel(secure.grpc_target, pki.ca, pki.client_cert, pki.client_key) as channel:
        rerank = rerank_service_pb2_grpc.RerankServiceStub(channel).Rerank
        assert len(rerank(rerank_request(), metadata=auth, timeout=30).results) == 2
        with pytest.raises(grpc.RpcError) as info:
            rerank(rerank_request(), timeout=30)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with _tls_channel(secure.grpc_target, pki.ca) as channel:  # no client certificate
        with pytest.raises(grpc.RpcError) as info:
            rerank_service_pb2_grpc.RerankServiceStub(channel).Rerank(rerank_request(), metadata=auth, timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    with grpc.insecure_channel(secure.grpc_target) as channel:  # plaintext to a TLS port
        with pytest.raises(grpc.RpcError) as info:
            rerank_service_pb2_grpc.RerankServiceStub(channel).Rerank(rerank_request(), metadata=auth, timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_python_client_over_mutual_tls_with_a_key(secure: LiveServer, pki: Pki) -> None:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.read_bytes(),
        private_key=pki.client_key.read_bytes(),
        certificate_chain=pki.client_cert.read_bytes(),
    )
    target = f"localhost:{secure.server.grpc_port}"
    with LateserveClient(target, timeout=30, credentials=credentials, api_key=KEY) as client:
        assert len(client.rerank(RERANK["query"], RERANK["documents"]).results) == 2
    with LateserveClient(target, timeout=30, credentials=credentials) as client, pytest.raises(UnauthenticatedError):
        client.rerank(RERANK["query"], RERANK["documents"])


def test_sidecar_over_mutual_tls(secure: LiveServer, pki: Pki) -> None:
    config = GatewayConfig(
        grpc_target=f"localhost:{secure.server.grpc_port}",
        host="127.0.0.1",
        port=0,
        grpc_ssl_ca_certfile=str(pki.ca),
        grpc_ssl_certfile=str(pki.client_cert),
        grpc_ssl_keyfile=str(pki.client_key),
    )
    runner = secure.call(start_gateway(config))
    try:
        base = f"http://127.0.0.1:{runner.addresses[0][1]}"
        reply = http(base + "/rerank", RERANK, Authorization=f"Bearer {KEY}")
        assert reply.status == 200, reply.raw
    finally:
        secure.call(runner.cleanup())


def test_grpc_server_tls_without_client_certificates(colbert_dir: Path, pki: Pki) -> None:
    config = _config(
        colbert_dir, gateway=False, grpc_ssl_certfile=str(pki.server_cert), grpc_ssl_keyfile=str(pki.server_key)
    )
    with LiveServer(config) as live:
        with _tls_channel(live.grpc_target, pki.ca) as channel:
            reply = rerank_service_pb2_grpc.RerankServiceStub(channel).Rerank(rerank_request(), timeout=30)
            assert len(reply.results) == 2
        with _tls_channel(live.grpc_target, pki.other_ca) as channel:  # a server we do not trust
            with pytest.raises(grpc.RpcError) as info:
                rerank_service_pb2_grpc.RerankServiceStub(channel).Rerank(rerank_request(), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_tls_flags_that_cannot_work_are_refused(pki: Pki) -> None:
    with pytest.raises(ValueError, match="go together"):
        ServerConfig(grpc_ssl_certfile=str(pki.server_cert)).check_tls()
    with pytest.raises(ValueError, match="mutual TLS"):
        ServerConfig(grpc_ssl_ca_certfile=str(pki.ca)).check_tls()
    with pytest.raises(ValueError, match="no such file"):
        ServerConfig(ssl_certfile="/nonexistent.pem").check_tls()


def test_cli_flags_and_environment(monkeypatch: pytest.MonkeyPatch, pki: Pki) -> None:
    from lateserve.gateway import cli as gateway_cli
    from lateserve.server import cli

    monkeypatch.setenv("LATESERVE_API_KEY", "from-env")
    config = cli.config_from_args(cli.build_parser().parse_args(["serve"]))
    assert config.api_key == "from-env"
    args = ["serve", "--api-key", "flag", "--ssl-certfile", str(pki.server_cert), "--ssl-keyfile", str(pki.server_key),
            "--grpc-ssl-certfile", str(pki.server_cert), "--grpc-ssl-keyfile", str(pki.server_key),
            "--grpc-ssl-ca-certfile", str(pki.ca)]  # fmt: skip
    config = cli.config_from_args(cli.build_parser().parse_args(args))
    assert (config.api_key, config.ssl_certfile, config.grpc_ssl_ca_certfile) == (
        "flag",
        str(pki.server_cert),
        str(pki.ca),
    )
    with pytest.raises(SystemExit):
        cli.config_from_args(cli.build_parser().parse_args(["serve", "--grpc-ssl-ca-certfile", str(pki.ca)]))
    gateway = gateway_cli.config_from_args(
        gateway_cli.build_parser().parse_args(
            [
                "--grpc-target",
                "h:1",
                "--grpc-ssl-ca-certfile",
                str(pki.ca),
                "--grpc-ssl-certfile",
                "c",
                "--grpc-ssl-keyfile",
                "k",
            ]
        )
    )
    assert (gateway.api_key, gateway.grpc_ssl_ca_certfile, gateway.grpc_ssl_keyfile) == ("from-env", str(pki.ca), "k")
