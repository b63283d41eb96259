"""Inbound requests: the body read whole up to a size limit, and the caller's address behind our own proxies."""

from __future__ import annotations

import ipaddress
import logging
from functools import lru_cache
from typing import Any

from aiohttp import web

log = logging.getLogger("gateway.inbound")

# What json.loads raises on a body that is no JSON: ValueError (UnicodeDecodeError is one) and RecursionError
# ("[[[[..." a few thousand deep, past Python's parser; no request nests so). Both are the sender's 400.
JSON_ERRORS = (ValueError, RecursionError)

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@lru_cache(maxsize=16)
def _networks(entries: tuple[str, ...]) -> tuple[Any, ...]:
    return tuple(ipaddress.ip_network(entry, strict=False) for entry in entries)


def client_address(request: web.Request, trusted_proxies: tuple[str, ...]) -> Address | None:
    """The caller's address: the connection's peer, or, when that peer is one of our own load balancers
    (`TRUSTED_PROXIES`), the nearest X-Forwarded-For hop that is not. None when it cannot be known (a broken
    or forged header behind a proxy, a peer that is not an IP address): trust nothing then."""
    try:
        source = ipaddress.ip_address(request.remote or "")
    except ValueError:
        return None
    proxies = _networks(trusted_proxies)
    if not proxies or not any(source in net for net in proxies):
        return source
    hops = [h.strip() for h in ",".join(request.headers.getall("X-Forwarded-For", [])).split(",") if h.strip()]
    for hop in reversed(hops):
        try:
            address = ipaddress.ip_address(hop)
        except ValueError:
            return None
        if not any(address in net for net in proxies):
            return address
    return source


def limit_key(address: Address | None) -> str:
    """What a per-address limit counts a caller by: an IPv4 address as it is (an IPv4-mapped IPv6 one as its
    IPv4), an IPv6 one by its /64. One subscriber line, host or cloud instance gets a whole /64: counted per
    /128, every per-address limit (sign-in guesses, callbacks, unauthenticated calls) was no limit at all."""
    if address is None:
        return "unknown"
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class UnreadableBody(web.HTTPBadRequest):
    """The body could not be decoded (Content-Encoding: gzip on bytes that are not gzip, a broken chunked
    encoding): the sender's mistake, answered 400 by any route that lets it through."""


def unreadable(request: web.Request, error: Exception) -> str:
    """What to answer (400) for a body aiohttp could not decode, logged as the sender's mistake (no traceback).

    aiohttp raises RequestPayloadError for it, which nothing expected: a bare 500 and an ERROR traceback, even
    before any credential or rate limit is checked."""
    # aiohttp's text is "400, message:\n  Can not decode content-encoding: gzip": its last line says what broke.
    reason = (str(error).strip().splitlines() or ["malformed"])[-1].strip()
    log.warning("request body could not be read", extra={"method": request.method, "path": request.path,
                                                         "reason": reason[:200]})
    return f"the request body could not be read: {reason[:200]}"


def close_after_unreadable_body(request: web.Request, response: web.StreamResponse) -> None:
    """After a body aiohttp could not decode: answer with Connection: close, and mark the body finished.

    The parser stopped in the middle of the body, so nothing more can be read on this connection; left as it
    is, aiohttp would try to drain the rest after the answer and log the decoding error at ERROR with a
    traceback ("Unhandled exception"), or keep a dead connection open."""
    if isinstance(request.content.exception(), web.RequestPayloadError):  # aiohttp gave up decoding it
        request.content.feed_eof()
        response.force_close()


async def read_capped(request: web.Request, limit: int) -> bytes | None:
    """The whole body, or None as soon as its declared or actual size is over `limit`; UnreadableBody (a 400)
    when it cannot be decoded.

    `request.content.read(n)` alone is not enough: it returns what has arrived so far, and a body that
    comes in more than one TCP segment (a proxy, a slow link, a large callback) would be cut short.
    """
    declared = request.content_length
    if declared is not None and declared > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    while True:
        try:
            chunk = await request.content.read(limit + 1 - size)
        except web.RequestPayloadError as exc:
            raise UnreadableBody(text=unreadable(request, exc)) from None
        if not chunk:  # end of the body
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
