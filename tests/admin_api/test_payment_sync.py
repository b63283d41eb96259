"""Syncing payments (GET /v1/payments?updatedFrom=...&after=...): oldest change first by an opaque cursor, so a
poller sees every payment's latest state and skips none while payments are made and change status; page/limit
(newest first) stays as the seed has it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from core.audit import Actor
from core.models import Payment
from core.state import transition
from core.state.payment import PAYMENT, PaymentStatus
from tests.admin_api.conftest import Caller, complete_payment, make_payment
from tests.conftest import requires_pg

START = "/v1/payments?updatedFrom=2000-01-01T00:00:00Z"


@pytest.fixture
def no_lag(monkeypatch: Any) -> None:
    """Changes listed as soon as they are committed: these tests make them one after another, never in parallel
    (the lag itself, and a writer still in flight, have tests of their own)."""
    monkeypatch.setattr("admin_api.common.SYNC_LAG", timedelta(0))


async def _fail(rt: Any, payment_id: str) -> None:
    async with rt.sessionmaker.begin() as s:
        await transition(s, PAYMENT, payment_id, PaymentStatus.PENDING, PaymentStatus.FAILED,
                         actor=Actor("provider:test", "provider"), values={"failure_reason": "declined"})


async def _sync_key(admin: Caller, client: Any) -> Caller:
    key = await admin.json("POST", "/v1/api-keys", 201, json={"name": "ERP sync", "scopes": ["payments:read"]})
    return Caller(client, {"X-API-Key": key["key"]})


async def _states(rt: Any) -> dict[str, str]:
    async with rt.sessionmaker() as s:
        return {payment_id: status for payment_id, status in await s.execute(select(Payment.id, Payment.status))}


async def test_a_poller_sees_every_payments_latest_state_while_payments_are_made_and_change(
        admin, client, rt, demo, no_lag):
    """Two rows a page. Between pages the desk completes a payment already listed, fails one not listed yet and
    members make new ones: with page/limit these shift the pages (a row listed twice, another never). The cursor
    lists each changed payment again at the end, in its new state, and never passes one by."""
    rent = demo["payment_types"]["Monthly Rent"]
    sync = await _sync_key(admin, client)
    made = [(await make_payment(admin, rent))["id"] for _ in range(5)]
    first = await sync.json("GET", f"{START}&limit=2", 200)
    assert [p["id"] for p in first["data"]] == made[:2]  # oldest change first
    assert first["meta"] == {"page": 1, "limit": 2, "total": 5, "totalPages": 3, "hasNext": True,
                             "hasPrevious": False}

    async def new_payment() -> None:
        made.append((await make_payment(admin, rent))["id"])

    meanwhile = [  # one step between each two pages
        lambda: complete_payment(rt, made[0]),  # listed on page 1 as PENDING
        lambda: _fail(rt, made[4]),  # not listed yet
        new_payment,
        lambda: complete_payment(rt, made[2]),
        new_payment,
    ]
    listed = [(p["id"], p["status"]) for p in first["data"]]
    cursor = first["nextCursor"]
    while True:
        if meanwhile:
            await meanwhile.pop(0)()
        page = await sync.json("GET", f"/v1/payments?after={cursor}&limit=2", 200)
        listed += [(p["id"], p["status"]) for p in page["data"]]
        if page["nextCursor"] is None:
            assert page["data"] == [] and page["meta"]["total"] == 0 and not meanwhile
            break
        cursor = page["nextCursor"]

    latest = {payment_id: status for payment_id, status in listed}  # the last state listed of each
    assert latest == await _states(rt)
    assert len(latest) == 7
    assert len(listed) == len(set(listed)), "a payment was listed twice in the same state"
    assert latest[made[0]] == "COMPLETED" and latest[made[4]] == "FAILED"


async def test_a_poller_resumes_from_its_last_cursor_and_gets_only_what_changed(admin, client, rt, demo, no_lag):
    rent = demo["payment_types"]["Monthly Rent"]
    sync = await _sync_key(admin, client)
    first, second = (await make_payment(admin, rent))["id"], (await make_payment(admin, rent))["id"]
    run = await sync.json("GET", f"{START}&limit=100", 200)
    assert [p["id"] for p in run["data"]] == [first, second]
    cursor = run["nextCursor"]
    assert (await sync.json("GET", f"/v1/payments?after={cursor}", 200))["nextCursor"] is None  # nothing new

    await complete_payment(rt, first)
    third = (await make_payment(admin, rent))["id"]
    run = await sync.json("GET", f"/v1/payments?after={cursor}&limit=100", 200)
    assert [(p["id"], p["status"]) for p in run["data"]] == [(first, "COMPLETED"), (third, "PENDING")]
    assert run["meta"]["hasPrevious"] is True and run["meta"]["total"] == 2
    # Filters still apply, and the cursor is only a position: the same one serves a narrower sync.
    done = await sync.json("GET", f"/v1/payments?after={cursor}&status=COMPLETED", 200)
    assert [p["id"] for p in done["data"]] == [first]


async def test_a_change_is_listed_only_once_it_is_older_than_the_lag(admin, client, rt, demo, monkeypatch):
    """A change just committed may have a neighbour stamped before it and not committed yet: it waits SYNC_LAG,
    and the cursor stays where it was (nothing listed: nextCursor null, the poller keeps its own)."""
    paid = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    fresh = await admin.json("GET", START, 200)
    assert fresh["data"] == [] and fresh["nextCursor"] is None and fresh["meta"]["total"] == 0
    async with rt.sessionmaker.begin() as s:  # the same payment, as it will be 6 seconds on
        row = await s.get(Payment, paid["id"])
        await s.execute(update(Payment).values(updated_at=row.updated_at - timedelta(seconds=6)))
    aged = await admin.json("GET", START, 200)
    assert [p["id"] for p in aged["data"]] == [paid["id"]] and aged["nextCursor"]


@requires_pg
async def test_a_change_stamped_earlier_but_committed_later_is_not_passed_by(admin, client, rt, demo, no_lag):
    """Commit order is not updated_at order: a transaction stamps payment A, then B's change is stamped and
    committed, then A's transaction commits. A reader that moved its cursor past B before A committed would
    never list A's change; while A's transaction is open the sync lists nothing stamped after it began."""
    rent = demo["payment_types"]["Monthly Rent"]
    sync = await _sync_key(admin, client)
    a, b = (await make_payment(admin, rent))["id"], (await make_payment(admin, rent))["id"]
    async with rt.sessionmaker() as slow:
        await slow.execute(update(Payment).where(Payment.id == a).values(description="edited by a slow writer"))
        await complete_payment(rt, b)  # stamped after A's, committed first
        during = await sync.json("GET", f"{START}&limit=100", 200)
        # A as it was committed; B's committed row is its completion, stamped after A's writer began: held back.
        assert [(p["id"], p["status"]) for p in during["data"]] == [(a, "PENDING")]
        await slow.commit()
    after = await sync.json("GET", f"/v1/payments?after={during['nextCursor']}&limit=100", 200)
    assert [(p["id"], p["description"], p["status"]) for p in after["data"]] == [
        (a, "edited by a slow writer", "PENDING"), (b, "Rent", "COMPLETED")]


@requires_pg
async def test_a_change_waiting_for_a_pooled_connection_is_stamped_when_it_has_one(admin, client, rt, demo,
                                                                                   no_lag):
    """A worker's pool is exhausted: its move of A waits for a connection while B's change commits and a poller
    moves its cursor past B. Stamped before the wait (as it was), A's change committed with a time behind the
    cursor and was never listed; stamped once the connection is held, it is listed on the next page."""
    import asyncio
    import os

    from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

    rent = demo["payment_types"]["Monthly Rent"]
    sync = await _sync_key(admin, client)
    a, b = (await make_payment(admin, rent))["id"], (await make_payment(admin, rent))["id"]
    first = await sync.json("GET", f"{START}&limit=10", 200)
    engine = create_async_engine(os.environ["DATABASE_URL"], pool_size=1, max_overflow=0, pool_timeout=30)
    try:
        busy = await engine.connect()  # the pool's only connection, held by another job
        await busy.exec_driver_sql("SELECT 1")
        maker = async_sessionmaker(engine, expire_on_commit=False)

        async def fail_a() -> None:
            async with maker.begin() as s:
                await transition(s, PAYMENT, a, PaymentStatus.PENDING, PaymentStatus.FAILED,
                                 actor=Actor("provider:test", "provider"), values={"failure_reason": "declined"})

        pool, waiting = engine.sync_engine.pool, asyncio.Event()
        checkout = pool.connect

        def connect() -> Any:
            # Set before the checkout waits: the writer yields to the test only once it waits in the pool's queue
            # (nothing in between goes to the database), so its move is waiting for the connection, however slow
            # the host (a fixed pause let a stalled loop start the move after B's change: no test of the stamp).
            waiting.set()
            return checkout()

        pool.connect = connect  # type: ignore[method-assign]
        writer = asyncio.create_task(fail_a())
        await asyncio.wait_for(waiting.wait(), 30)  # A's move is waiting for the connection
        await complete_payment(rt, b)
        page = await sync.json("GET", f"/v1/payments?after={first['nextCursor']}&limit=10", 200)
        assert [(p["id"], p["status"]) for p in page["data"]] == [(b, "COMPLETED")]
        await busy.close()
        await writer
        after = await sync.json("GET", f"/v1/payments?after={page['nextCursor']}&limit=10", 200)
        assert [(p["id"], p["status"]) for p in after["data"]] == [(a, "FAILED")]
    finally:
        await engine.dispose()


@requires_pg
async def test_a_sync_held_back_by_an_open_transaction_says_so(admin, client, rt, demo, no_lag, monkeypatch, caplog):
    """A transaction left open on payments (an operator's psql session) holds every sync page back: the gauge
    gateway_payment_sync_held_back_seconds and a warning (at most one a minute) say how long."""
    import asyncio
    import logging

    from core.metrics import SYNC_HELD_BACK

    monkeypatch.setattr("admin_api.common.SYNC_HELD_WARNING", 0.5)
    monkeypatch.setattr("admin_api.common._last_held_warning", float("-inf"))
    sync = await _sync_key(admin, client)
    a = (await make_payment(admin, demo["payment_types"]["Monthly Rent"]))["id"]
    async with rt.sessionmaker() as left_open:
        await left_open.execute(update(Payment).where(Payment.id == a).values(description="left open"))
        await asyncio.sleep(1.0)
        with caplog.at_level(logging.WARNING, logger="gateway.api"):
            await sync.json("GET", f"{START}&limit=10", 200)
            await sync.json("GET", f"{START}&limit=10", 200)
        assert SYNC_HELD_BACK._value.get() >= 1.0
        held = [r for r in caplog.records if r.getMessage() == "payment sync held back by an open transaction "
                                                                "writing payments"]
        assert len(held) == 1 and held[0].held_back_seconds >= 1
        await left_open.rollback()
    await sync.json("GET", f"{START}&limit=10", 200)
    assert SYNC_HELD_BACK._value.get() < 1.0


async def test_a_cursor_not_returned_by_the_list_is_a_400(admin):
    import base64

    made = [f"{version}:{micros}:{row_id}" for version, micros, row_id in (
        ("2", "1000", "6f1c3a52-2b7e-4c1a-9d3e-0a1b2c3d4e5f"),  # another version
        ("1", "-1000", "6f1c3a52-2b7e-4c1a-9d3e-0a1b2c3d4e5f"),  # not a count of microseconds
        ("1", "1000", "not-a-payment-id"))]
    forged = [base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=") for raw in made]
    for bad in ("nonsense", "MTox", "eyJpZCI6MX0", "MTpub3Q6YS11dWlk", "%00", *forged):
        body = await admin.json("GET", f"/v1/payments?after={bad}", 400)
        assert body["message"] in (["after must be a nextCursor returned by this list, passed back unchanged"],
                                   ["after contains characters that are not allowed"]), (bad, body)
    body = await admin.json("GET", "/v1/payments?updatedFrom=yesterday", 400)
    assert body["message"] == ["updatedFrom must be a date (YYYY-MM-DD) or a date-time (YYYY-MM-DDThh:mm:ssZ)"]
    body = await admin.json("GET", f"{START}&page=2", 400)
    assert body["message"] == ["page cannot be combined with updatedFrom or after: a sync pages by cursor (after)"]


async def test_page_and_limit_callers_get_the_seeds_answer_unchanged(admin, rt, demo, no_lag):
    """No cursor, no new field: newest first, data and meta only."""
    rent = demo["payment_types"]["Monthly Rent"]
    made = [(await make_payment(admin, rent))["id"] for _ in range(3)]
    page = await admin.json("GET", "/v1/payments?page=1&limit=2", 200)
    assert set(page) == {"data", "meta"}
    assert [p["id"] for p in page["data"]] == made[:0:-1]
    assert page["meta"] == {"page": 1, "limit": 2, "total": 3, "totalPages": 2, "hasNext": True,
                            "hasPrevious": False}
    synced = await admin.json("GET", f"{START}&limit=2", 200)
    assert set(synced) == {"data", "meta", "nextCursor"} and [p["id"] for p in synced["data"]] == made[:2]


async def test_updated_from_is_read_as_from_is(admin, rt, demo, no_lag):
    """A bare date is midnight in the cooperative's zone (Kigali, UTC+2), as for `from` and `to`."""
    paid = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Payment).values(updated_at=datetime(2025, 10, 31, 22, 30, tzinfo=UTC)))
    # 1 November, 00:30 in Kigali
    assert [p["id"] for p in (await admin.json("GET", "/v1/payments?updatedFrom=2025-11-01", 200))["data"]] == [
        paid["id"]]
    assert (await admin.json("GET", "/v1/payments?updatedFrom=2025-10-31T23:00:00Z", 200))["data"] == []
    # Inclusive, as `from` is: a change made at the very instant asked from is listed.
    assert [p["id"] for p in (await admin.json("GET", "/v1/payments?updatedFrom=2025-10-31T22:30:00Z", 200))[
        "data"]] == [paid["id"]]


async def test_the_document_declares_the_sync(client):
    doc = await (await client.get("/v1/openapi.json")).json()
    op = doc["paths"]["/v1/payments"]["get"]
    params = {p["name"]: p for p in op["parameters"]}
    assert params["updatedFrom"]["schema"] == {"type": "string", "format": "date-time"}
    assert params["after"]["schema"] == {"type": "string"}
    schema = op["responses"]["200"]["content"]["application/json"]["schema"]
    assert schema["properties"]["nextCursor"]["type"] == ["string", "null"]
    assert schema["required"] == ["data", "meta"]


async def test_a_sync_of_completed_payments_misses_none_when_one_is_refunded_meanwhile(
        admin, client, rt, demo, no_lag):
    """The integrator's nightly credit run, one row a page: between pages the desk refunds part of a payment
    already listed (it leaves COMPLETED). With page/limit every later row moved up one place and one was never
    listed; by cursor each completed payment is listed."""
    from core.models import Refund
    from core.ports import ProviderOutcome
    from core.refunds import apply_refund_outcome
    from tests.admin_api.conftest import idem

    sync = await _sync_key(admin, client)
    made = []
    for _ in range(3):
        paid = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
        await complete_payment(rt, paid["id"])
        made.append(paid["id"])
    page = await sync.json("GET", f"{START}&status=COMPLETED&limit=1", 200)
    seen = [p["id"] for p in page["data"]]
    await admin.json("POST", f"/v1/payments/{seen[0]}/refunds", 201,
                     json={"amount": 1000, "reason": "overcharged", "idempotencyKey": idem()})
    async with rt.sessionmaker.begin() as s:
        refund = (await s.execute(select(Refund))).scalar_one()
        await apply_refund_outcome(s, rt, refund, ProviderOutcome.SUCCEEDED,
                                   actor=Actor("provider:test", "provider"), provider_transaction_id="R1")
    while page["nextCursor"] is not None:
        page = await sync.json("GET", f"/v1/payments?after={page['nextCursor']}&status=COMPLETED&limit=1", 200)
        seen += [p["id"] for p in page["data"]]
    assert seen == made
