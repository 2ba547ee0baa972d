"""http(s):// image URLs, fetched so that only a checked, public address is ever contacted.

The host must be in --allowed-media-domains (exact match, as vLLM). It is resolved once; every
address is judged by `addresses.refused_address_kind`; the connection then goes to that checked
address while the Host header and TLS SNI/certificate check carry the name, so a second DNS answer
cannot swap in an internal address (DNS rebinding). A refused URL opens no connection.

Redirects are not followed: a 3xx is refused (MEDIA_NOT_ALLOWED). Following one would need every
check again for its target, and image stores rarely redirect. Environment proxies are ignored
(connecting through one would defeat the address pinning). DNS, connect, headers and body share one
deadline (fetch_timeout_s), and at most max_image_bytes+1 bytes of body are read.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import socket
import ssl
import threading
import time
from typing import Any
from urllib.parse import SplitResult

from lateserve.server.domain import InvalidArgument
from lateserve.server.media.addresses import refused_address_kind
from lateserve.server.media.errors import fail, fail_timeout, fail_too_big
from lateserve.server.media.policy import FLAG_DOMAINS, MediaPolicy
from lateserve.wire import reasons

SockAddr = tuple[Any, ...]
_CHUNK = 64 * 1024
_USER_AGENT = "lateserve-media/1"


def fetch_http(parts: SplitResult, policy: MediaPolicy, field: str) -> bytes:
    """Check the host and its addresses, then GET from the checked address under one deadline."""
    deadline = time.monotonic() + policy.fetch_timeout_s
    host = (parts.hostname or "").rstrip(".")
    if not host:
        fail("image_url has no host", reasons.IMAGE_INVALID, field)
    try:
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    except ValueError:
        fail("image_url has an invalid port", reasons.IMAGE_INVALID, field)
    if not policy.allowed_media_domains:
        fail(f"http(s) image URLs are disabled ({FLAG_DOMAINS} is empty)", reasons.MEDIA_NOT_ALLOWED, field)
    if host not in policy.allowed_media_domains:
        fail(f"image_url host '{host}' is not in {FLAG_DOMAINS}", reasons.MEDIA_NOT_ALLOWED, field)

    sockaddrs = _resolve(host, port, deadline, field)
    for _family, sockaddr in sockaddrs:
        ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        kind = refused_address_kind(ip, allow_private=policy.allow_private_addresses)
        if kind is not None:
            fail(
                f"image_url host '{host}' resolves to {ip}, a {kind} address; fetching from it is refused",
                reasons.MEDIA_NOT_ALLOWED,
                field,
            )

    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    conn: _PinnedConnection
    if parts.scheme.lower() == "https":
        conn = _PinnedHTTPSConnection(host, port, sockaddrs, _remaining(deadline), ssl.create_default_context())
    else:
        conn = _PinnedConnection(host, port, sockaddrs, _remaining(deadline))
    watchdog = _Watchdog(conn, _remaining(deadline))
    try:
        data = _get(conn, target, policy, field)
    except InvalidArgument:
        raise
    except (TimeoutError, OSError, http.client.HTTPException, ValueError) as exc:
        if watchdog.fired.is_set() or isinstance(exc, TimeoutError) or time.monotonic() >= deadline:
            fail_timeout(policy, field)
        fail(f"image_url could not be fetched: {type(exc).__name__}: {exc}", reasons.IMAGE_INVALID, field)
    finally:
        watchdog.cancel()
        conn.close()
    if watchdog.fired.is_set():  # the shutdown cut the body short; it reads as a clean EOF
        fail_timeout(policy, field)
    return data


def _get(conn: _PinnedConnection, target: str, policy: MediaPolicy, field: str) -> bytes:
    """Send the GET and read at most max_image_bytes+1 bytes of a 200 answer."""
    conn.request("GET", target, headers={"User-Agent": _USER_AGENT, "Accept": "image/*", "Connection": "close"})
    with conn.getresponse() as response:  # closing it releases the socket on every early refusal
        return _read_body(response, policy, field)


def _read_body(response: http.client.HTTPResponse, policy: MediaPolicy, field: str) -> bytes:
    """The body of a 200 answer, at most max_image_bytes; 3xx and other statuses refused."""
    if 300 <= response.status < 400:
        fail(
            f"image_url answered HTTP {response.status} (redirect to '{response.getheader('Location', '')}');"
            " redirects are not followed",
            reasons.MEDIA_NOT_ALLOWED,
            field,
        )
    if response.status != 200:
        fail(f"image_url answered HTTP {response.status} {response.reason}", reasons.IMAGE_INVALID, field)
    declared = response.getheader("Content-Length")
    if declared is not None and declared.strip().isdigit() and int(declared) > policy.max_image_bytes:
        fail_too_big(int(declared), policy, field)
    limit = policy.max_image_bytes + 1
    chunks: list[bytes] = []
    total = 0
    while total < limit:
        chunk = response.read(min(_CHUNK, limit - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    if total > policy.max_image_bytes:
        fail_too_big(total, policy, field, more_than=True)
    return b"".join(chunks)


def _resolve(host: str, port: int, deadline: float, field: str) -> list[tuple[int, SockAddr]]:
    """(family, sockaddr) of every address of `host`, resolved once and within the deadline.

    getaddrinfo cannot be interrupted, so it runs in a daemon thread that is abandoned (and finishes
    on its own) when the deadline passes first.
    """
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        if isinstance(literal, ipaddress.IPv6Address):
            return [(socket.AF_INET6, (host, port, 0, 0))]
        return [(socket.AF_INET, (host, port))]

    result: list[Any] = []
    errors: list[BaseException] = []

    def lookup() -> None:
        try:
            result.extend(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=lookup, name="media-dns", daemon=True)
    thread.start()
    thread.join(_remaining(deadline))
    if thread.is_alive():
        fail(f"image_url host '{host}' did not resolve within the fetch timeout", reasons.MEDIA_LIMIT, field)
    if errors or not result:
        fail(f"image_url host '{host}' could not be resolved", reasons.IMAGE_INVALID, field)
    addrs: list[tuple[int, SockAddr]] = []
    for family, _type, _proto, _name, sockaddr in result:
        if family in (socket.AF_INET, socket.AF_INET6) and (family, sockaddr) not in addrs:
            addrs.append((family, tuple(sockaddr)))
    if not addrs:
        fail(f"image_url host '{host}' has no IP address", reasons.IMAGE_INVALID, field)
    return addrs


class _PinnedConnection(http.client.HTTPConnection):
    """HTTP to already-checked addresses: `host` goes in the Host header only, never to DNS."""

    def __init__(self, host: str, port: int, sockaddrs: list[tuple[int, SockAddr]], timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._sockaddrs = sockaddrs
        # The connected socket, kept for the watchdog: http.client drops `sock` once a response
        # that closes the connection arrives, while the response goes on reading from it.
        self.opened: socket.socket | None = None

    def connect(self) -> None:
        self.sock = self.opened = self._open_socket()

    def _open_socket(self) -> socket.socket:
        last: OSError | None = None
        for family, sockaddr in self._sockaddrs:
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.settimeout(self.timeout)
                sock.connect(sockaddr)
            except OSError as exc:
                sock.close()
                last = exc
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        assert last is not None
        raise last


class _PinnedHTTPSConnection(_PinnedConnection):
    """HTTPS to a checked address; SNI and certificate verification use the host name."""

    default_port = http.client.HTTPS_PORT

    def __init__(
        self,
        host: str,
        port: int,
        sockaddrs: list[tuple[int, SockAddr]],
        timeout: float,
        context: ssl.SSLContext,
    ) -> None:
        super().__init__(host, port, sockaddrs, timeout)
        self._tls = context

    def connect(self) -> None:
        self.sock = self.opened = self._tls.wrap_socket(self._open_socket(), server_hostname=self.host)


class _Watchdog:
    """Shuts the connection's socket at the deadline, so a server dribbling bytes cannot stretch a fetch.

    Socket timeouts bound each read, not their sum; this bounds the whole fetch.
    """

    def __init__(self, conn: _PinnedConnection, seconds: float) -> None:
        self.fired = threading.Event()
        self._conn = conn
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        self.fired.set()
        sock = self._conn.opened
        if sock is not None:
            # The plain socket's shutdown, also for TLS sockets: it only unblocks the reader.
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)

    def cancel(self) -> None:
        self._timer.cancel()


def _remaining(deadline: float) -> float:
    return max(0.001, deadline - time.monotonic())
