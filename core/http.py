"""The outbound HTTP client: httpx's API over an aiohttp connection pool.

Every provider adapter and the SMS sender speak httpx (requests, auth, JSON, and `httpx.MockTransport`
in unit tests). Underneath, httpx's own transport (httpcore over anyio, h11) cost 1.3-2.8 ms of CPU per
request on this project's 2-CPU bench machine, and its pool checks every pooled connection's socket
on each request; aiohttp's client, already a dependency for the server, does the same exchange for about
a fifth of that (bench/README.md). `AiohttpTransport` is httpx's documented transport interface over an
`aiohttp.ClientSession`.

Its one job besides moving bytes is to keep httpx's error classes honest, because the providers'
retry rules depend on them (providers/calls.py): only a failure *before* the request could reach the
server may say so.
- connection refused, DNS, TLS handshake (`ClientConnectorError`) -> `httpx.ConnectError`
- no connection within the connect or pool timeout (`ConnectionTimeoutError`) -> `httpx.ConnectTimeout`
- no answer within the read timeout -> `httpx.ReadTimeout`
- anything after the request may have been written (the server closed the connection, a reset, a broken
  body) -> `httpx.ReadError` or `httpx.RemoteProtocolError`: ambiguous, never "not sent".
- aiohttp's second try of a request of an idempotent method after its connection broke is turned off: a
  `ConnectError` never follows a request written once already.
- a header aiohttp would refuse (a control character) -> refused as the request is built
  (`GatewayClient.build_request`), before anything connects: a request that could not be made.
(The `httpx-aiohttp` package maps a server that disconnects after the request to `ConnectTimeout`, which
would let a payment request be sent twice; hence this module.)
"""

from __future__ import annotations

import errno
import ipaddress
import re
import socket
import ssl
from typing import Any

import aiohttp
import certifi
import httpx
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

MAX_RESPONSE_BYTES = 8 * 1024 * 1024  # providers answer a few KB; anything near this is not an answer
# A request extension (`client.post(..., extensions={STATUS_ONLY: True})`): the caller acts on the status line
# alone, so the answer's body is not read (its connection is closed rather than drained), and the Response
# carries no content. A cooperative's webhook receiver is told "2xx counts": one that answers 200 and then
# sends its body slowly (or a large one) has answered, and reading that body held the delivery until the
# worker cut it off, unrecorded, and sent the event again.
STATUS_ONLY = "gateway.status_only"


def not_public(text: str) -> bool:
    """True for an address nothing outbound to a customer's system may reach: loopback, private, link-local
    (169.254.169.254, the cloud metadata service), carrier-grade NAT, multicast, reserved."""
    address = ipaddress.ip_address(text.split("%", 1)[0])  # an IPv6 scope (fe80::1%eth0) is not part of it
    if isinstance(address, ipaddress.IPv6Address):
        # An IPv4 address carried inside an IPv6 one reaches that IPv4 host: judge it by the IPv4 address
        # (mapped ::ffff:a.b.c.d, 6to4 2002:aabb:ccdd::, NAT64 64:ff9b::a.b.c.d, deprecated ::a.b.c.d).
        packed = address.packed
        inner = address.ipv4_mapped or address.sixtofour
        if inner is None and address in _NAT64:
            inner = ipaddress.IPv4Address(packed[12:])
        if inner is None and packed[:12] == bytes(12) and int(address) > 1:  # not :: or ::1
            inner = ipaddress.IPv4Address(packed[12:])
        if inner is not None and not_public(str(inner)):
            return True
    return not address.is_global or address.is_multicast


_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def refused_address(text: str, allowed: tuple[str, ...] = ()) -> bool:
    """True for an address a webhook may not reach: one not public (not_public), unless it lies in one of the
    operator's `allowed` networks (WEBHOOK_PRIVATE_NETWORKS: a cooperative's own LAN). Only what is listed
    passes: listing 10.0.0.0/8 lets no loopback, link-local (metadata) or other private address through."""
    return not_public(text) and not in_networks(text, allowed)


def in_networks(text: str, networks: tuple[str, ...]) -> bool:
    """Whether the address lies in one of `networks` (addresses or CIDR networks, as the settings list them)."""
    address = ipaddress.ip_address(text.split("%", 1)[0])
    return any(address in ipaddress.ip_network(network, strict=False) for network in networks)


class PublicOnlyResolver(AbstractResolver):
    """The system resolver, refusing a name that resolves to any address that is not public.

    Checking a name before the request and letting the client resolve it again to connect leaves a window
    in which the name can be repointed inward (DNS rebinding); here the addresses checked are the ones the
    connection uses. A refusal is an OSError, which aiohttp reports as a DNS failure: nothing is sent.
    IP literals never reach a resolver (aiohttp connects to them as they are). `allowed`: the networks
    WEBHOOK_PRIVATE_NETWORKS lets through (refused_address).
    """

    def __init__(self, inner: AbstractResolver | None = None, allowed: tuple[str, ...] = ()) -> None:
        self._inner = inner if inner is not None else DefaultResolver()
        self._allowed = allowed

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        for result in results:
            if refused_address(result["host"], self._allowed):
                # With an errno, so aiohttp's error text carries the reason (it shows the strerror).
                raise OSError(errno.EACCES, f"{host} resolves to {result['host']}, which is not a public address")
        return results

    async def close(self) -> None:
        await self._inner.close()


class AiohttpTransport(httpx.AsyncBaseTransport):
    """httpx requests sent by one aiohttp.ClientSession (opened on first use, inside the running loop)."""

    def __init__(self, *, max_connections: int = 200, keepalive_seconds: float = 5.0,
                 verify: ssl.SSLContext | None = None, public_only: bool = False,
                 allowed: tuple[str, ...] = ()) -> None:
        self._max_connections = max_connections
        self._public_only = public_only
        self._allowed = allowed
        self._keepalive = keepalive_seconds
        self._ssl = verify if verify is not None else ssl.create_default_context(cafile=certifi.where())
        self._session: aiohttp.ClientSession | None = None
        self._resolver: PublicOnlyResolver | None = None
        self._closed = False

    def _open(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RuntimeError("the HTTP client has been closed")
        # aiohttp does not close a resolver it was given: aclose() does.
        self._resolver = PublicOnlyResolver(allowed=self._allowed) if self._public_only else None
        connector = aiohttp.TCPConnector(limit=self._max_connections, keepalive_timeout=self._keepalive,
                                         ssl=self._ssl, resolver=self._resolver)
        # httpx owns cookies, redirects, decompression and auth; aiohttp only moves the bytes.
        self._session = aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar(),
                                              auto_decompress=False, trust_env=False)
        # Each request is sent once, as httpx's own transport sends it. aiohttp sends a request of a method it deems
        # idempotent (GET, PUT, DELETE, ...) again, on a new connection, when the first one broke mid-request (the
        # server read it and hung up): that second try's failure to connect came out as a ConnectError ("nothing was
        # sent", providers.calls.send) for a request the server had. No public setting; its own test client sets it.
        self._session._retry_connection = False
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        session = self._session or self._open()
        body = await request.aread()
        # As written by the caller (httpx's own transport keeps the names' case too).
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw]
        if "transfer-encoding" in request.headers:  # the body is read whole: send its length instead
            headers = [(k, v) for k, v in headers if k.lower() != "transfer-encoding"]
            headers.append(("Content-Length", str(len(body))))
        timeouts = request.extensions.get("timeout", {})
        timeout = aiohttp.ClientTimeout(total=None, connect=timeouts.get("pool"),
                                        sock_connect=timeouts.get("connect"), sock_read=timeouts.get("read"))
        try:
            async with session.request(request.method, URL(str(request.url), encoded=True), headers=headers,
                                       data=body or None, timeout=timeout, allow_redirects=False) as answer:
                content = b"" if request.extensions.get(STATUS_ONLY) else await _read(answer)
                status, raw_headers, reason = answer.status, answer.raw_headers, answer.reason
        except aiohttp.ClientError as exc:
            raise _translate(exc, request) from exc
        except TimeoutError as exc:  # a bare timeout of the stream: the request may have gone out
            raise httpx.ReadTimeout(str(exc) or "timed out", request=request) from exc
        extensions: dict[str, Any] = {"http_version": b"HTTP/1.1"}
        if reason:
            extensions["reason_phrase"] = reason.encode("latin-1", "replace")
        return httpx.Response(status, headers=list(raw_headers), content=content, request=request,
                              extensions=extensions)

    async def aclose(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._resolver is not None:
            await self._resolver.close()
            self._resolver = None


async def _read(answer: aiohttp.ClientResponse) -> bytes:
    if answer.content_length is not None and answer.content_length > MAX_RESPONSE_BYTES:
        raise httpx.RemoteProtocolError(f"answer of {answer.content_length} bytes is over the limit")
    chunks: list[bytes] = []
    size = 0
    async for chunk in answer.content.iter_any():
        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
            raise httpx.RemoteProtocolError(f"answer over {MAX_RESPONSE_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _translate(exc: aiohttp.ClientError, request: httpx.Request) -> httpx.TransportError:
    """aiohttp's failure as the httpx error with the same meaning for "did the request go out"."""
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return httpx.ConnectTimeout(text, request=request)
    if isinstance(exc, aiohttp.ServerTimeoutError):  # SocketTimeoutError and any other read timeout
        return httpx.ReadTimeout(text, request=request)
    if isinstance(exc, aiohttp.ClientConnectorError):  # refused, DNS, TLS: nothing was sent
        return httpx.ConnectError(text, request=request)
    if isinstance(exc, (aiohttp.InvalidURL, aiohttp.NonHttpUrlClientError)):
        return httpx.UnsupportedProtocol(text, request=request)
    if isinstance(exc, aiohttp.ClientResponseError):  # a malformed answer
        return httpx.RemoteProtocolError(text, request=request)
    return httpx.ReadError(text, request=request)  # disconnected, reset, broken body: ambiguous


class _NoCookies(httpx.Cookies):
    """A jar that keeps nothing. No provider API here is cookie-based, and a cookie one provider set must
    not ride along on later calls; httpx also parsed every answer through http.cookiejar (building a
    urllib Request per response), about a tenth of an SMS send's client CPU."""

    def extract_cookies(self, response: httpx.Response) -> None:
        return None


# What aiohttp refuses in a header's name or value (aiohttp.http_writer): a control character other than a tab. httpx
# builds such a request; aiohttp raises ValueError only as it serialises it, once connected.
_FORBIDDEN_IN_HEADER = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


class GatewayClient(httpx.AsyncClient):
    """httpx.AsyncClient over AiohttpTransport, keeping no cookies between calls."""

    _NO_COOKIES = _NoCookies()

    def build_request(self, *args: Any, **kwargs: Any) -> httpx.Request:
        """httpx's request, refused here if its transport would refuse it (a header carrying a control character: a
        credential read from a file with its line break). Refused as it is built, it is a request that could not be
        made (providers.calls.send, channels.sms.sender: "nothing was sent", sent later); refused by aiohttp inside
        the call, once a payment's request counts as gone (core.ports.departing), it was taken for one that may have
        arrived, and an SMS send failed with an error of no known kind. Neither the name nor the value is in the
        message (it may be a secret)."""
        request = super().build_request(*args, **kwargs)
        for name, value in request.headers.raw:
            if _FORBIDDEN_IN_HEADER.search(name) or _FORBIDDEN_IN_HEADER.search(value):
                raise ValueError("a header carries a control character (a line break?): the request cannot be sent")
        return request

    @property  # type: ignore[override]
    def cookies(self) -> httpx.Cookies:
        return self._NO_COOKIES

    @cookies.setter
    def cookies(self, cookies: Any) -> None:
        if cookies:
            raise ValueError("this client keeps no cookies")


def make_client(*, max_connections: int = 200, public_only: bool = False,
                allowed: tuple[str, ...] = ()) -> httpx.AsyncClient:
    """`public_only`: connect only to public addresses (the client that calls customers' webhook URLs), and to
    those of the `allowed` networks (WEBHOOK_PRIVATE_NETWORKS)."""
    return GatewayClient(timeout=httpx.Timeout(10.0, connect=3.0),
                         transport=AiohttpTransport(max_connections=max_connections, public_only=public_only,
                                                    allowed=allowed))
