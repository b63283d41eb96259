"""Reading an inbound request's body whole, up to a size limit."""

from __future__ import annotations

from aiohttp import web


async def read_capped(request: web.Request, limit: int) -> bytes | None:
    """The whole body, or None as soon as its declared or actual size is over `limit`.

    `request.content.read(n)` alone is not enough: it returns what has arrived so far, and a body that
    comes in more than one TCP segment (a proxy, a slow link, a large callback) would be cut short.
    """
    declared = request.content_length
    if declared is not None and declared > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await request.content.read(limit + 1 - size)
        if not chunk:  # end of the body
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
