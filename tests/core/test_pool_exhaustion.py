"""Every pooled connection busy: the API answers a prompt 503 with Retry-After (an outage, nothing changed),
not a 500 after SQLAlchemy's 30-second default wait; and a failure once a streamed answer has begun cuts that
answer short instead of writing a second response into its body."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from sqlalchemy import select

from admin_api.errors import error_middleware
from tests.admin_api.conftest import bearer
from tests.conftest import requires_pg

pytestmark = requires_pg

FIRST_ROWS = b"id,amount\r\n1,100\r\n"


@pytest.fixture
def settings(migrated_database: str, settings_factory: Any) -> Any:
    # One connection and one in overflow, and a short wait for one: the test holds both.
    return settings_factory(DB_POOL_SIZE="1", DB_POOL_TIMEOUT_SECONDS="0.5")


@contextlib.asynccontextmanager
async def exhausted(rt: Any) -> AsyncIterator[None]:
    """Every connection the pool may open, checked out (as requests stuck on them would hold them)."""
    held = [await rt.engine.connect() for _ in range(2)]
    try:
        yield
    finally:
        for conn in held:
            await conn.close()


def test_the_pool_waits_as_long_as_configured(rt: Any) -> None:
    assert rt.engine.pool.timeout() == 0.5


async def test_an_exhausted_pool_is_a_prompt_503_with_retry_after(rt: Any, client: Any, demo: Any,
                                                                 caplog: Any) -> None:
    admin = await bearer(client, *demo["admin"])  # signed in first: the sign-in needs a connection
    caplog.set_level(logging.WARNING, logger="gateway.api")
    async with exhausted(rt):
        started = time.monotonic()
        resp = await admin.req("GET", "/v1/payments?limit=1")
        body = await resp.json()
    assert resp.status == 503, body
    assert resp.headers["Retry-After"] == "1"
    assert body["statusCode"] == 503 and "nothing was changed, send it again" in body["message"]
    assert body["code"] == "SERVICE_UNAVAILABLE"
    assert time.monotonic() - started < 20  # the pool's 0.5 s, not SQLAlchemy's default 30 s (a loaded machine)
    # One warning line that says what happened, no traceback: an outage, not a bug.
    api = [r for r in caplog.records if r.name == "gateway.api"]
    assert [(r.levelno, r.exc_info) for r in api] == [(logging.WARNING, None)], [r.getMessage() for r in api]
    assert "no database connection free" in api[0].getMessage()


async def _everything_sent(reader: asyncio.StreamReader) -> bytes:
    """The bytes the server sends until it closes the connection, or falls silent for 3 seconds."""
    seen = b""
    while True:
        try:
            chunk = await asyncio.wait_for(reader.read(65536), timeout=3)
        except TimeoutError:
            return seen
        if not chunk:
            return seen
        seen += chunk


async def test_an_outage_mid_stream_ends_the_body_without_a_second_response(rt: Any, aiohttp_client: Any,
                                                                            caplog: Any) -> None:
    """An export whose next rows cannot be read once its first rows are sent: the client gets a truncated
    chunked body (no final chunk), never an "HTTP/1.1 503" written into the middle of the CSV."""

    async def export(req: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/csv"})
        await response.prepare(req)
        await response.write(FIRST_ROWS)
        async with exhausted(rt), rt.sessionmaker() as s:  # the pool runs dry between two batches of rows
            await s.execute(select(1))
        await response.write(b"2,200\r\n")
        return response

    app = web.Application(middlewares=[error_middleware])
    app.router.add_get("/export", export)
    client = await aiohttp_client(app)
    caplog.set_level(logging.WARNING, logger="gateway.api")
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    try:
        writer.write(b"GET /export HTTP/1.1\r\nHost: test\r\n\r\n")
        await writer.drain()
        seen = await _everything_sent(reader)
    finally:
        writer.close()
    assert seen.startswith(b"HTTP/1.1 200 OK\r\n"), seen
    assert seen.count(b"HTTP/1.1") == 1 and b"503" not in seen, seen
    head, _, chunked = seen.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower()
    assert chunked == f"{len(FIRST_ROWS):x}\r\n".encode() + FIRST_ROWS + b"\r\n"  # no last chunk (0\r\n\r\n)
    api = [r for r in caplog.records if r.name == "gateway.api"]
    assert [(r.levelno, r.exc_info) for r in api] == [(logging.WARNING, None)], [r.getMessage() for r in api]
    assert "after the response began" in api[0].getMessage()


@pytest.mark.parametrize(("raw", "said"), [
    ("nan", "must be a finite number"), ("inf", "must be a finite number"), ("1e308", "must be at most 30"),
    ("31", "must be at most 30"), ("0", "must be positive"),
])
def test_a_pool_timeout_that_would_turn_the_bound_off_is_refused_at_start(raw: str, said: str) -> None:
    """nan passed every check (it compares false) and, like inf or 1e308, let a request wait for a connection
    until its caller gave up: the outage this bound exists to end."""
    from core.config import ConfigError, load_settings

    with pytest.raises(ConfigError) as refused:
        load_settings({"DB_POOL_TIMEOUT_SECONDS": raw})
    assert "DB_POOL_TIMEOUT_SECONDS" in str(refused.value) and said in str(refused.value)
    assert load_settings({"DB_POOL_TIMEOUT_SECONDS": "30"}).db_pool_timeout_seconds == 30.0
