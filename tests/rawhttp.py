"""A request whose body arrives in two TCP segments, as through a proxy or over a slow link."""

from __future__ import annotations

import asyncio


async def post_in_two_parts(host: str, port: int, path: str, body: bytes, *, content_type: str,
                            split_at: int, pause: float = 0.2) -> tuple[int, bytes]:
    """POST `body` with its first `split_at` bytes sent with the head and the rest `pause` seconds later.
    Returns the status and the response body."""
    reader, writer = await asyncio.open_connection(host, port)
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    try:
        writer.write(head + body[:split_at])
        await writer.drain()
        await asyncio.sleep(pause)
        writer.write(body[split_at:])
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]
