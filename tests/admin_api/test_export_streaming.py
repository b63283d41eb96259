"""CSV exports read in keyset-paged batches: complete and in order across batches, and never a transaction (or
a pooled connection) held while the rows are written to a client that may read slowly."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp import web
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncSession

from core import reports
from core.db import autocommit, new_id
from core.models import Payment, Refund
from tests.conftest import count_calls

T0 = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)


def _payment(demo: dict[str, Any], n: int, created_at: datetime, completed_at: datetime | None = None) -> Payment:
    return Payment(
        id=new_id(),
        reference=f"PAY_S_{n:05d}",
        provider_reference=new_id(),
        idempotency_key=f"stream-{n:05d}",
        cooperative_id=demo["cooperative_id"],
        payment_type_id=demo["payment_types"]["Water"],
        amount_minor=5000 + n,
        currency="RWF",
        status="COMPLETED" if completed_at else "PENDING",
        method="MOBILE_MONEY_MTN",
        provider="mtn_momo",
        payment_account_enc="x",
        payment_account_index="x",
        payment_account_masked="+25078****001",
        request_hash="h",
        channel="api",
        expires_at=created_at,
        created_at=created_at,
        updated_at=completed_at or created_at,
        completed_at=completed_at,
    )


def _refund(payment: Payment, n: int, created_at: datetime, completed_at: datetime) -> Refund:
    return Refund(
        id=new_id(),
        cooperative_id=payment.cooperative_id,
        payment_id=payment.id,
        reference=f"REF_S_{n:05d}",
        provider_reference=new_id(),
        idempotency_key=f"stream-refund-{n:05d}",
        amount_minor=100 + n,
        currency="RWF",
        status="COMPLETED",
        created_at=created_at,
        updated_at=completed_at,
        completed_at=completed_at,
    )


async def _seed(rt: Any, demo: dict[str, Any], count: int) -> None:
    """`count` completed payments and a completed refund of each, their moments in a few groups of equal
    instants (a batch ends inside a group: the id orders rows of the same moment)."""
    async with rt.sessionmaker.begin() as s:
        for n in range(count):
            created = T0 + timedelta(minutes=n % 3)
            payment = _payment(demo, n, created, completed_at=T0 + timedelta(hours=1, seconds=(n * 7) % 4))
            s.add(payment)
            await s.flush()
            s.add(_refund(payment, n, T0 + timedelta(days=1, minutes=n % 2), T0 + timedelta(days=2, seconds=n % 5)))


async def _ids_in_order(rt: Any, model: Any, moment: str, where: Any = None) -> list[str]:
    """What the export must list: the rows in the database's own order of (moment, id)."""
    column = getattr(model, moment)
    query = select(model.id).where(column.is_not(None)).order_by(column, model.id)
    async with rt.sessionmaker() as s:
        return list((await s.execute(query if where is None else query.where(where))).scalars())


def _count_batches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Each batch's read (its query goes through AsyncSession.stream)."""
    return count_calls(monkeypatch, AsyncSession, "stream")


@pytest.mark.parametrize(("path", "model", "moment"), [
    ("/v1/reports/payments.csv", Payment, "created_at"),
    ("/v1/reports/payments.csv?basis=completed", Payment, "completed_at"),
    ("/v1/reports/refunds.csv?bom=true", Refund, "created_at"),
    ("/v1/reports/refunds.csv?basis=completed&from=2026-03-01&to=2026-04-01", Refund, "completed_at"),
])
async def test_an_export_larger_than_a_batch_is_complete_in_order_and_repeats_nothing(
        admin, rt, demo, monkeypatch, path, model, moment):
    await _seed(rt, demo, 23)
    monkeypatch.setattr(reports, "CHUNK_ROWS", 10_000)
    whole = await admin.req("GET", path)
    assert whole.status == 200
    in_one_read = await whole.read()

    reads = _count_batches(monkeypatch)
    monkeypatch.setattr(reports, "CHUNK_ROWS", 4)
    paged = await admin.req("GET", path)
    assert paged.status == 200
    body = await paged.read()
    assert len(reads) == 6  # 23 rows, 4 at a time: five full batches and one of three, each its own read
    assert body == in_one_read  # byte for byte (the BOM, the columns, the local dates)
    ids = [r["id"] for r in csv.DictReader(io.StringIO(body.decode("utf-8-sig")))]
    assert ids == await _ids_in_order(rt, model, moment)
    assert len(set(ids)) == 23


async def test_no_transaction_is_open_while_the_export_is_written(admin, rt, demo, monkeypatch):
    """A client reading slowly is waited for in StreamResponse.write: at each write no pooled connection is
    checked out (not the request's, not a batch's), and PostgreSQL sees no session idle in a transaction."""
    await _seed(rt, demo, 23)
    monkeypatch.setattr(reports, "CHUNK_ROWS", 5)
    seen: list[tuple[int, list[Any]]] = []
    write = web.StreamResponse.write

    async def slow_client(self: web.StreamResponse, data: bytes) -> None:
        checked_out = rt.engine.pool.checkedout()
        waiting: list[Any] = []
        if rt.engine.dialect.name == "postgresql":
            async with autocommit(rt.engine) as conn:
                waiting = list((await conn.execute(text(
                    "SELECT state, query FROM pg_stat_activity WHERE datname = current_database() "
                    "AND pid <> pg_backend_pid() AND xact_start IS NOT NULL"))).all())
        seen.append((checked_out, waiting))
        await write(self, data)

    monkeypatch.setattr(web.StreamResponse, "write", slow_client)
    for path in ("/v1/reports/payments.csv", "/v1/reports/refunds.csv?basis=completed"):
        resp = await admin.req("GET", path)
        assert resp.status == 200
        assert len(list(csv.DictReader(io.StringIO(await resp.text())))) == 23
    assert len(seen) == 2 * 5  # five batches each (and the last, of three, ends the file)
    assert seen == [(0, [])] * len(seen)


async def test_a_row_committed_mid_export_comes_after_the_rest_and_repeats_nothing(admin, rt, demo, monkeypatch):
    """Not one snapshot: a payment created during the download is in the file if it sorts after the rows already
    sent (here: asked for later than all), not if before; none of the others is repeated or left out."""
    async with rt.sessionmaker.begin() as s:
        s.add_all([_payment(demo, n, T0 + timedelta(minutes=n)) for n in range(12)])
    before = await _ids_in_order(rt, Payment, "created_at")
    monkeypatch.setattr(reports, "CHUNK_ROWS", 5)
    added: dict[str, str] = {}
    write = web.StreamResponse.write

    async def meanwhile(self: web.StreamResponse, data: bytes) -> None:
        if not added:  # while the first batch is written
            async with rt.sessionmaker.begin() as s:
                for n, name, at in ((100, "earlier", T0 - timedelta(minutes=1)),
                                    (101, "same moment as one sent", T0 + timedelta(minutes=2)),
                                    (102, "later", T0 + timedelta(hours=1))):
                    payment = _payment(demo, n, at)
                    s.add(payment)
                    added[name] = payment.id
        await write(self, data)

    monkeypatch.setattr(web.StreamResponse, "write", meanwhile)
    resp = await admin.req("GET", "/v1/reports/payments.csv")
    assert resp.status == 200
    ids = [r["id"] for r in csv.DictReader(io.StringIO(await resp.text()))]
    assert ids == [*before, added["later"]]
