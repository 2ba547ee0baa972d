"""http(s) image URLs against a real HTTP server on 127.0.0.1: SSRF refusals, pinning, limits, timeouts.

The server records every request it sees; refused URLs must leave it at zero, and a spy on DNS and
`socket.connect` shows refused URLs open no connection at all. Timeouts are 0.5 s, so a hang fails
the test quickly instead of stalling the suite.
"""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import pytest
from PIL import Image

from lateserve.server.domain import InvalidArgument
from lateserve.server.media import MediaPolicy, load_image
from lateserve.server.media.addresses import refused_address_kind
from lateserve.wire import reasons

FIELD = "documents[0].content[1].image_url"
PIXELS = np.random.default_rng(3).integers(0, 256, (6, 9, 3), dtype=np.uint8)


def png(pixels: np.ndarray[Any, Any]) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="PNG")
    return buf.getvalue()


PNG = png(PIXELS)


class Server:
    """A ThreadingHTTPServer with a few routes and a log of (path, Host header) per request."""

    def __init__(self, family: socket.AddressFamily, host: str) -> None:
        self.requests: list[tuple[str, str]] = []
        self.stop = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                server.requests.append((self.path, self.headers.get("Host", "")))
                if self.path == "/x.png":
                    self.send_body(PNG)
                elif self.path == "/big":  # declared too big
                    self.send_body(b"\0" * 5000)
                elif self.path == "/stream":  # too big, no Content-Length: read until close
                    self.protocol_version = "HTTP/1.0"
                    self.send_response(200)
                    self.end_headers()
                    self.wfile.write(b"\0" * 5000)
                    self.close_connection = True
                elif self.path == "/redirect":
                    self.send_response(302)
                    self.send_header("Location", "http://127.0.0.1:1/x.png")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif self.path.startswith("/dribble"):  # a byte at a time: each read is quick, the whole is not
                    self.send_response(200)
                    if self.path == "/dribble-close":  # body delimited by the close, not a length
                        self.send_header("Connection", "close")
                    else:
                        self.send_header("Content-Length", "100000")
                    self.end_headers()
                    try:
                        while not server.stop.wait(0.05):
                            self.wfile.write(b"\0")
                            self.wfile.flush()
                    except OSError:
                        pass
                else:
                    self.send_error(404)

            def send_body(self, body: bytes) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        class HTTPServer(ThreadingHTTPServer):
            address_family = family
            daemon_threads = True

        self.httpd = HTTPServer((host, 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server(socket.AF_INET, "127.0.0.1")
    yield s
    s.close()


@pytest.fixture
def server6() -> Iterator[Server | None]:
    try:
        s = Server(socket.AF_INET6, "::1")
    except OSError:  # no IPv6 loopback here
        yield None
        return
    yield s
    s.close()


class NetSpy:
    """Counts DNS lookups and outgoing connects made by the code under test."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.lookups: list[str] = []
        self.connects: list[Any] = []
        real_getaddrinfo = socket.getaddrinfo
        real_connect = socket.socket.connect

        def getaddrinfo(host: str, *args: Any, **kwargs: Any) -> Any:
            self.lookups.append(host)
            return real_getaddrinfo(host, *args, **kwargs)

        def connect(sock: socket.socket, address: Any) -> None:
            self.connects.append(address)
            real_connect(sock, address)

        monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
        monkeypatch.setattr(socket.socket, "connect", connect)


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> NetSpy:
    return NetSpy(monkeypatch)


def refused(reason: str, url: str, policy: MediaPolicy) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as info:
        load_image(url, policy, FIELD)
    assert info.value.reason == reason, info.value.message
    assert info.value.field == FIELD
    return info.value


LOCAL = MediaPolicy(allowed_media_domains=("localhost",), fetch_timeout_s=0.5)
PRIVATE_OK = MediaPolicy(allowed_media_domains=("localhost",), allow_private_addresses=True, fetch_timeout_s=2)


# --- SSRF ---------------------------------------------------------------------------------------------


def test_loopback_and_metadata_urls_are_refused_without_a_connection(
    server: Server, server6: Server | None, spy: NetSpy
) -> None:
    port = server.port
    urls = [
        f"http://localhost:{port}/x.png",
        f"http://127.0.0.1:{port}/",
        f"http://[::1]:{server6.port if server6 else port}/",
        "http://169.254.169.254/latest/meta-data/",
    ]
    # Only "localhost" allowed: the other hosts fail the domain check before any DNS.
    error = refused(reasons.MEDIA_NOT_ALLOWED, urls[0], LOCAL)
    assert "resolves to" in error.message and "loopback" in error.message
    for url in urls[1:]:
        error = refused(reasons.MEDIA_NOT_ALLOWED, url, LOCAL)
        assert "is not in --allowed-media-domains" in error.message
    assert spy.lookups == ["localhost"]  # resolved once, then refused
    # Every host allowed by name: each address is refused by the address rule instead.
    everything = MediaPolicy(allowed_media_domains=("localhost", "127.0.0.1", "::1", "169.254.169.254"))
    kinds = ["loopback", "loopback", "loopback", "cloud metadata"]
    for url, kind in zip(urls, kinds, strict=True):
        error = refused(reasons.MEDIA_NOT_ALLOWED, url, everything)
        assert f"a {kind} address" in error.message, url
    assert spy.connects == []
    assert server.requests == []
    assert server6 is None or server6.requests == []


def test_metadata_stays_refused_with_private_addresses_allowed(spy: NetSpy) -> None:
    policy = MediaPolicy(allowed_media_domains=("169.254.169.254",), allow_private_addresses=True)
    error = refused(reasons.MEDIA_NOT_ALLOWED, "http://169.254.169.254/latest/meta-data/", policy)
    assert "cloud metadata" in error.message
    assert spy.connects == []


def test_a_host_not_listed_is_refused_before_dns(spy: NetSpy) -> None:
    error = refused(reasons.MEDIA_NOT_ALLOWED, "http://evil.example/x.png", LOCAL)
    assert error.message == "image_url host 'evil.example' is not in --allowed-media-domains"
    error = refused(reasons.MEDIA_NOT_ALLOWED, "https://images.example.com/x.png", MediaPolicy())
    assert "--allowed-media-domains is empty" in error.message
    # Userinfo cannot smuggle another host past the check.
    refused(reasons.MEDIA_NOT_ALLOWED, "http://localhost@evil.example/x.png", LOCAL)
    assert spy.lookups == [] and spy.connects == []


def test_any_private_address_among_the_answers_refuses_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    answers = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, 80)) for ip in ("93.184.216.34", "10.1.2.3")]
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: answers)
    connects: list[Any] = []
    monkeypatch.setattr(socket.socket, "connect", lambda s, a: connects.append(a))
    error = refused(
        reasons.MEDIA_NOT_ALLOWED, "http://mixed.test/x.png", MediaPolicy(allowed_media_domains=("mixed.test",))
    )
    assert "10.1.2.3, a private address" in error.message
    assert connects == []


def test_the_checked_address_is_the_one_connected_to(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """DNS rebinding: later lookups answer 10.0.0.1, but only the first answer is ever used."""
    calls: list[str] = []

    def rebinding(host: str, port: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(host)
        ip = "127.0.0.1" if len(calls) == 1 else "10.0.0.1"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    policy = MediaPolicy(allowed_media_domains=("images.rebind.test",), allow_private_addresses=True, fetch_timeout_s=2)
    image = load_image(f"http://images.rebind.test:{server.port}/x.png", policy, FIELD)
    assert np.array_equal(np.asarray(image), PIXELS)
    assert calls == ["images.rebind.test"]
    assert server.requests == [("/x.png", f"images.rebind.test:{server.port}")]  # Host carries the name


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("10.1.2.3", "private"),
        ("172.16.5.4", "private"),
        ("192.168.1.1", "private"),
        ("fc00::1", "private"),
        ("169.254.1.1", "link-local"),
        ("fe80::1", "link-local"),
        ("224.0.0.251", "multicast"),
        ("ff02::1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("100.64.0.1", "non-global"),
        ("2002:7f00:1::", "loopback"),  # 6to4 around 127.0.0.1
        ("64:ff9b::a01:203", "private"),  # NAT64 around 10.1.2.3
        ("169.254.169.254", "cloud metadata"),
        ("fd00:ec2::254", "cloud metadata"),
        ("100.100.100.200", "cloud metadata"),
        ("93.184.216.34", None),
        ("2606:4700:4700::1111", None),
    ],
)
def test_address_rule(address: str, kind: str | None) -> None:
    import ipaddress

    ip = ipaddress.ip_address(address)
    assert refused_address_kind(ip) == kind
    relaxed = refused_address_kind(ip, allow_private=True)
    assert relaxed == ("cloud metadata" if kind == "cloud metadata" else None)


# --- fetching ------------------------------------------------------------------------------------------


def test_fetch_works_when_private_addresses_are_allowed(server: Server, server6: Server | None) -> None:
    image = load_image(f"http://localhost:{server.port}/x.png", PRIVATE_OK, FIELD)
    assert image.mode == "RGB" and np.array_equal(np.asarray(image), PIXELS)
    assert server.requests == [("/x.png", f"localhost:{server.port}")]
    if server6 is not None:  # an IPv6 literal: connected as given, Host in brackets
        image = load_image(f"http://[::1]:{server6.port}/x.png", _private("::1", timeout=2), FIELD)
        assert np.array_equal(np.asarray(image), PIXELS)
        assert server6.requests == [("/x.png", f"[::1]:{server6.port}")]


def test_oversize_responses_are_refused(server: Server) -> None:
    small = MediaPolicy(allowed_media_domains=("localhost",), allow_private_addresses=True, max_image_bytes=1000)
    error = refused(reasons.MEDIA_LIMIT, f"http://localhost:{server.port}/big", small)
    assert error.message == "image is 5000 bytes, over the limit of 1000 (--max-image-bytes)"
    error = refused(reasons.MEDIA_LIMIT, f"http://localhost:{server.port}/stream", small)
    assert "more than 1000 bytes" in error.message


def test_redirects_are_not_followed_and_errors_are_invalid(server: Server) -> None:
    error = refused(reasons.MEDIA_NOT_ALLOWED, f"http://localhost:{server.port}/redirect", PRIVATE_OK)
    assert "redirects are not followed" in error.message
    assert [path for path, _ in server.requests] == ["/redirect"]
    error = refused(reasons.IMAGE_INVALID, f"http://localhost:{server.port}/missing.png", PRIVATE_OK)
    assert "HTTP 404" in error.message


def test_https_to_a_plain_http_server_is_an_error_not_a_crash(server: Server) -> None:
    error = refused(reasons.IMAGE_INVALID, f"https://localhost:{server.port}/x.png", PRIVATE_OK)
    assert "could not be fetched" in error.message


def test_connection_refused_is_invalid() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens once closed
    refused(reasons.IMAGE_INVALID, f"http://127.0.0.1:{port}/x.png", _private("127.0.0.1"))


def _private(host: str, timeout: float = 0.5) -> MediaPolicy:
    return MediaPolicy(allowed_media_domains=(host,), allow_private_addresses=True, fetch_timeout_s=timeout)


def test_a_server_that_never_answers_hits_the_timeout() -> None:
    with socket.socket() as listener:  # the kernel completes the handshake; nobody ever reads or writes
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        start = time.monotonic()
        error = refused(
            reasons.MEDIA_LIMIT, f"http://127.0.0.1:{listener.getsockname()[1]}/x.png", _private("127.0.0.1")
        )
        elapsed = time.monotonic() - start
    assert "did not finish within 0.5 s" in error.message
    assert 0.4 < elapsed < 2.0


@pytest.mark.parametrize("path", ["/dribble", "/dribble-close"])
def test_a_dribbling_server_hits_the_total_timeout(server: Server, path: str) -> None:
    start = time.monotonic()
    error = refused(reasons.MEDIA_LIMIT, f"http://localhost:{server.port}{path}", _private("localhost"))
    elapsed = time.monotonic() - start
    assert "did not finish within 0.5 s" in error.message
    assert 0.4 < elapsed < 2.0
