"""POST /v1/payments cancelled mid-request, at each point where it waits (a server's graceful stop past its timeout,
an asyncio.timeout around it, aiohttp's handler_cancellation): never half a payment (a payment without its audit row
or its jobs), its pooled connection never handed on broken or inside a transaction (the next request works and its
writes are committed), and the same request sent again makes one payment, or finds the one made."""

from __future__ import annotations

import asyncio
import gc
import warnings
from typing import Any

import aiohttp
import pytest
from sqlalchemy import func, select, text

from admin_api import routing
from core import db
from core.models import AuditEvent, OutboxJob, Payment
from tests.admin_api.conftest import Caller, payment_body
from tests.conftest import cancelled_at, make_settings

# On PostgreSQL an API payment runs on a Core connection in autocommit (core.db.autocommit, core.pgraw); on SQLite
# (embedded) in a session, where a request cut while aiosqlite ran one of its writes with RETURNING had left the
# database's write lock held for 30 to 60 seconds (the retry waited busy_timeout, then 503: core.db.make_engine's
# rollback before an invalidated connection's close).


@pytest.fixture
def settings(migrated_database: str) -> Any:
    # Three requests for each point cut, past the per-caller limit otherwise.
    return make_settings(RATE_LIMIT_MULTIPLIER="1000")


class _Requests:
    """The server-side task of each request, as the route starts it (core.db.Held is made at its start)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.tasks: list[asyncio.Task[Any]] = []
        self.started = asyncio.Event()
        held = routing.Held

        def made(maker: Any) -> Any:
            task = asyncio.current_task()
            assert task is not None
            self.tasks.append(task)
            self.started.set()
            return held(maker)

        monkeypatch.setattr(routing, "Held", made)


async def _pool_idle(rt: Any) -> None:
    """The pool has every connection back (a shielded close finishes after the cancelled request)."""
    pool = rt.engine.sync_engine.pool
    for _ in range(200):
        if pool.checkedout() == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{pool.checkedout()} connection(s) never came back to the pool")


async def _pool_begins(rt: Any) -> None:
    """Every connection in the pool begins a transaction for a session (PostgreSQL): none was handed back with its
    adapter still in autocommit (core.db.autocommit's flag), whose sessions would commit each statement alone (a
    multi-statement transaction not atomic, its rollback undoing nothing). The idle ones all checked out at once."""
    if rt.engine.dialect.name != "postgresql":
        return
    from core import pgraw

    sessions = [rt.sessionmaker() for _ in range(rt.engine.sync_engine.pool.checkedin())]
    try:
        for s in sessions:
            await s.execute(select(func.now()))
            assert await pgraw.in_transaction(s), "a pooled connection's session ran outside a transaction"
    finally:
        for s in sessions:
            await s.close()


async def _rows(rt: Any, key: str) -> list[tuple[str, int, list[str]]]:
    """The payments made with `key`: each with its audit rows' count and its jobs' kinds."""
    async with rt.sessionmaker() as s:
        ids = (await s.scalars(select(Payment.id).where(Payment.idempotency_key == key))).all()
        out = []
        for payment_id in ids:
            audits = await s.scalar(select(func.count()).select_from(AuditEvent).where(
                AuditEvent.entity_type == "payment", AuditEvent.entity_id == payment_id))
            jobs = (await s.scalars(select(OutboxJob.kind).where(
                OutboxJob.payload["payment_id"].as_string() == payment_id))).all()
            out.append((payment_id, int(audits or 0), sorted(jobs)))
        return out


async def _idle_in_transaction(rt: Any) -> int:
    """Server sessions of this database left inside a transaction (PostgreSQL; 0 elsewhere)."""
    if rt.engine.dialect.name != "postgresql":
        return 0
    async with rt.sessionmaker() as s:
        return int((await s.execute(text(
            "select count(*) from pg_stat_activity where datname = current_database() and pid <> pg_backend_pid() "
            "and state like 'idle in transaction%'"))).scalar_one())


@pytest.mark.parametrize("variant", ["plain", "due-date", "api-key"])
async def test_a_payment_cancelled_at_any_wait_is_whole_or_absent_and_its_retry_makes_one(
    admin: Any, rt: Any, demo: dict[str, Any], monkeypatch: pytest.MonkeyPatch, variant: str
) -> None:
    """Variants. "due-date": create_payment reads the type's due date through an ORM session on the request's connection
    (core.pgraw.orm on PostgreSQL), SQLAlchemy's own transaction record on it, beside the raw statements. "api-key":
    the caller's key is looked up first, on a connection of its own (admin_api.routing.authenticate). Every checkout
    pings its connection (as one idle for a while does), a wait of its own to be cut at."""
    rent = demo["payment_types"]["Monthly Rent"]
    extra = {"dueDate": "2025-11-01T00:00:00Z"} if variant == "due-date" else {}
    if variant == "api-key":
        created = await admin.json("POST", "/v1/api-keys", 201, json={"name": "POS", "scopes": ["payments:write"]})
        admin = Caller(admin.client, {"X-API-Key": created["key"]})
    monkeypatch.setattr(db, "PING_AFTER_IDLE_SECONDS", 0.0)
    requests = _Requests(monkeypatch)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        points = await _cut_everywhere(admin, rt, rent, extra, requests)
        gc.collect()
    assert points >= 3  # it was cut at several points, each once
    # Each connection given back by the request itself, none left for the garbage collector to hand back (the pool
    # would look idle all the same).
    assert not [w for w in seen if "garbage collector" in str(w.message)]


async def _cut_everywhere(admin: Any, rt: Any, rent: str, extra: dict[str, Any], requests: _Requests) -> int:
    """The request cut at its first wait, then its second, ... until it ran to its end: how many cuts."""
    points = 0
    for point in range(1, 200):
        body = payment_body(rent, **extra)
        requests.started.clear()
        sent = asyncio.create_task(admin.req("POST", "/v1/payments", json=body))
        await requests.started.wait()
        cancelled = await cancelled_at(requests.tasks[-1], point)
        try:
            answer = await sent
            status = answer.status
            await answer.read()
        except aiohttp.ClientError:  # the server dropped the connection of the cancelled request
            status = None
        await _pool_idle(rt)
        await _pool_begins(rt)
        made = await _rows(rt, body["idempotencyKey"])
        assert len(made) <= 1, (point, made)
        for payment_id, audits, jobs in made:  # all of it or nothing
            assert audits == 1 and jobs == ["payment.collect", "payment.poll"], (point, payment_id, audits, jobs)
        assert await _idle_in_transaction(rt) == 0, point
        if not cancelled:
            assert status == 201 and len(made) == 1
            break
        points += 1
        # The same request again: the payment made, or one made now; one either way.
        again = await admin.json("POST", "/v1/payments", 201, json=body)
        after = await _rows(rt, body["idempotencyKey"])
        assert [row[0] for row in after] == [again["id"]], point
        assert after[0][1:] == (1, ["payment.collect", "payment.poll"])
        if made:
            assert made[0][0] == again["id"]
        # Another request on the pool's connections: made, and committed (read from another connection).
        other = await admin.json("POST", "/v1/payments", 201, json=payment_body(rent, **extra))
        async with rt.sessionmaker() as s:
            assert await s.get(Payment, other["id"]) is not None, point
    else:
        raise AssertionError("the request never ran to its end")
    return points
