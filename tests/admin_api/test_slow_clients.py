"""Callers that send their body slowly: they must not hold a database connection, nor keep a request open
for good.

A request's body used to be read after its API key was looked up in the request's session: a pooled
connection stayed checked out, in an open transaction, while the body trickled in, and a few such requests
locked every other caller (the API, USSD, provider callbacks, /readyz) out of the pool.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from sqlalchemy import select, text

from admin_api import routing
from core import auth
from core.audit import Actor
from core.crypto import hash_api_key
from core.models import ApiKey
from tests.conftest import requires_pg

DECLARED = 400  # the Content-Length the slow callers announce; they send far less
PARTIAL = b'{"amount": 50000, '


@pytest.fixture
def settings(migrated_database: str, settings_factory: Any) -> Any:
    # One connection in the pool and one in overflow: two requests holding one each lock everyone out.
    return settings_factory(DB_POOL_SIZE="1", DB_POOL_TIMEOUT_SECONDS="2")


@pytest.fixture
async def api_key(rt: Any, demo: dict[str, Any]) -> str:
    async with rt.sessionmaker.begin() as s:
        _, clear = await auth.create_api_key(s, cooperative_id=demo["cooperative_id"], name="ERP",
                                             scopes=["payments:write", "payments:read"],
                                             actor=Actor("system", "test"))
    return clear


async def _slow_post(client: Any, key: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A payment request whose headers and the first bytes of its body are sent, and no more."""
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    writer.write(f"POST /v1/payments HTTP/1.1\r\nHost: test\r\nX-API-Key: {key}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {DECLARED}\r\n\r\n".encode() + PARTIAL)
    await writer.drain()
    return reader, writer


async def _response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines if line)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(status_line.split()[1]), headers, body


async def _idle_in_transaction(rt: Any) -> int:
    """The gateway's connections to this test's database left idle inside a transaction."""
    async with rt.engine.connect() as conn:
        return int((await conn.execute(text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name = 'coop-gateway' AND state LIKE 'idle in transaction%'"))).scalar_one())


@requires_pg
async def test_slow_api_key_bodies_hold_no_connection(rt: Any, client: Any, admin: Any, api_key: str) -> None:
    held = [await _slow_post(client, api_key) for _ in range(3)]
    try:
        await asyncio.sleep(0.5)  # the server has their headers and part of their bodies, and is waiting
        assert rt.engine.pool.checkedout() == 0
        assert await _idle_in_transaction(rt) == 0
        # Everyone else still gets a connection: a signed-in admin, an API-key caller, the readiness probe.
        listed = await asyncio.wait_for(admin.req("GET", "/v1/payments?limit=1"), timeout=10)
        assert listed.status == 200, await listed.text()
        by_key = await asyncio.wait_for(client.get("/v1/payments?limit=1", headers={"X-API-Key": api_key}),
                                        timeout=10)
        assert by_key.status == 200, await by_key.text()
        ready = await asyncio.wait_for(client.get("/readyz"), timeout=10)
        assert ready.status == 200, await ready.json()
    finally:
        for _, writer in held:
            writer.close()


async def test_a_body_not_delivered_in_time_is_408(client: Any, api_key: str, monkeypatch: Any) -> None:
    monkeypatch.setattr(routing, "BODY_READ_SECONDS", 0.5)
    reader, writer = await _slow_post(client, api_key)
    try:
        status, headers, raw = await asyncio.wait_for(_response(reader), timeout=10)
    finally:
        writer.close()
    body = json.loads(raw)
    assert status == 408 and body["statusCode"] == 408 and body["error"] == "Request Timeout", body
    assert body["code"] == "REQUEST_TIMEOUT"
    assert "did not arrive within 0.5 seconds" in body["message"]
    assert headers["content-type"].startswith("application/json")


async def test_a_body_delivered_in_pieces_within_the_deadline_is_taken(client: Any, demo: dict[str, Any],
                                                                      api_key: str) -> None:
    """A slow link is not refused: only a body that is still incomplete at the deadline is."""
    body = json.dumps({"paymentTypeId": demo["payment_types"]["Monthly Rent"], "amount": 50000,
                       "paymentMethod": "MOBILE_MONEY_MTN", "paymentAccount": "+250788000001",
                       "description": "Rent", "idempotencyKey": "slow-link-0001"}).encode()
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    try:
        writer.write(f"POST /v1/payments HTTP/1.1\r\nHost: test\r\nX-API-Key: {api_key}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode())
        for start in range(0, len(body), 40):
            writer.write(body[start:start + 40])
            await writer.drain()
            await asyncio.sleep(0.1)
        status, _, raw = await asyncio.wait_for(_response(reader), timeout=10)
    finally:
        writer.close()
    assert status == 201, raw


@requires_pg
async def test_the_last_used_stamp_does_not_wait_on_a_locked_key(rt: Any, client: Any, api_key: str) -> None:
    """Stamping last_used_at never waits for the key's row: with it locked (a revocation being written, another
    request's stamp) a request goes on without the stamp instead of waiting for the lock."""
    async with rt.sessionmaker() as locker:
        await locker.execute(select(ApiKey).where(ApiKey.key_hash == hash_api_key(api_key)).with_for_update())
        resp = await asyncio.wait_for(client.get("/v1/payments?limit=1", headers={"X-API-Key": api_key}),
                                      timeout=10)
        assert resp.status == 200, await resp.text()
        await locker.rollback()
    async with rt.sessionmaker() as s:
        assert (await s.scalar(select(ApiKey.last_used_at))) is None  # skipped, not waited for
    resp = await client.get("/v1/payments?limit=1", headers={"X-API-Key": api_key})
    assert resp.status == 200
    async with rt.sessionmaker() as s:
        assert (await s.scalar(select(ApiKey.last_used_at))) is not None  # the next request stamps it
