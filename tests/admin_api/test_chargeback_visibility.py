"""A refund recorded today can be dated into a month already reconciled: a chargeback (`returnedByProvider`, dated by
the provider's statement) or a refund's outcome recorded with its `completedAt`. That month's `settled` figures change
after the treasurer signed them off; its reconciliation names the refunds that changed them (`refundsRecordedLater`),
and the refund's JSON and refunds.csv carry the provider's id for it and whether it was recorded rather than sent.
Migration 0012 adds the column that says so."""

from __future__ import annotations

import asyncio
import csv
import io
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import update

from core.db import utcnow
from core.models import OutboxJob, Payment, Refund
from tests.admin_api.conftest import complete_payment, idem, make_payment
from tests.conftest import make_settings, requires_pg


def _z(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _last_month() -> tuple[datetime, datetime]:
    now = utcnow()
    end = datetime(now.year, now.month, 1, tzinfo=UTC)
    return (end - timedelta(days=1)).replace(day=1), end


async def _paid_last_month(admin: Any, rt: Any, demo: dict[str, Any], start: datetime) -> dict[str, Any]:
    """A 50,000 RWF MTN payment collected on the 10th of last month."""
    paid = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    await complete_payment(rt, paid["id"])
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Payment).where(Payment.id == paid["id"]).values(
            created_at=start + timedelta(days=9), completed_at=start + timedelta(days=9, minutes=1)))
    return paid


async def _csv(admin: Any, url: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(await (await admin.req("GET", url)).text())))


async def test_a_chargeback_recorded_into_a_closed_month_is_named_in_its_reconciliation(
        admin: Any, rt: Any, demo: dict[str, Any]) -> None:
    start, end = _last_month()
    paid = await _paid_last_month(admin, rt, demo, start)
    period = f"from={_z(start)}&to={_z(end)}"
    closed = await admin.json("GET", f"/v1/reports/reconciliation?{period}", 200)
    assert [line["net"] for line in closed["settled"]] == [50000]  # what the treasurer signed off
    assert (closed["refundsRecordedLater"], closed["refundsRecordedLaterCount"]) == ([], 0)

    when = start + timedelta(days=20)
    refund = await admin.json("POST", f"/v1/payments/{paid['id']}/refunds", 201, json={
        "idempotencyKey": idem(), "amount": 20000,
        "returnedByProvider": {"providerTransactionId": "MTN-REV-881", "completedAt": when.isoformat()}})
    reread = await admin.json("GET", f"/v1/reports/reconciliation?{period}", 200)
    assert [line["net"] for line in reread["settled"]] == [30000]  # the signed-off month changed...
    assert reread["refundsRecordedLater"] == [{  # ...and says which refund changed it
        "id": refund["id"], "reference": refund["reference"], "paymentId": paid["id"], "amount": 20000,
        "currency": "RWF", "completedAt": _z(when), "createdAt": refund["createdAt"],
        "updatedAt": refund["updatedAt"], "returnedByProvider": True, "providerTransactionId": "MTN-REV-881"}]
    assert reread["refundsRecordedLaterCount"] == 1
    assert refund["createdAt"] >= _z(end)

    # A refund sent now is this month's money and recorded in it: nothing to explain in either month.
    sent = await admin.json("POST", f"/v1/payments/{paid['id']}/refunds", 201,
                            json={"idempotencyKey": idem(), "amount": 10000})
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Refund).where(Refund.id == sent["id"]).values(status="COMPLETED",
                                                                             completed_at=utcnow()))
    this_month = await admin.json("GET", f"/v1/reports/reconciliation?from={_z(end)}", 200)
    assert (this_month["refundsRecordedLater"], this_month["refundsRecordedLaterCount"]) == ([], 0)
    again = await admin.json("GET", f"/v1/reports/reconciliation?{period}", 200)
    assert [r["id"] for r in again["refundsRecordedLater"]] == [refund["id"]]


async def test_an_outcome_dated_back_into_a_closed_month_is_named_in_its_reconciliation(
        admin: Any, rt: Any, demo: dict[str, Any]) -> None:
    """A refund asked for on the 15th of last month that the provider never settled; its outcome is recorded today,
    dated the 16th as the statement shows: last month's `settled` changes, and its report says so."""
    start, end = _last_month()
    paid = await _paid_last_month(admin, rt, demo, start)
    refund = await admin.json("POST", f"/v1/payments/{paid['id']}/refunds", 201, json={"idempotencyKey": idem()})
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Refund).where(Refund.id == refund["id"]).values(
            status="PROCESSING", created_at=start + timedelta(days=14), updated_at=start + timedelta(days=14)))
        await s.execute(update(OutboxJob).where(OutboxJob.dedupe_key == f"refund:{refund['id']}")
                        .values(status="DONE", done_at=utcnow()))
    period = f"from={_z(start)}&to={_z(end)}"
    assert (await admin.json("GET", f"/v1/reports/reconciliation?{period}", 200))["refundsRecordedLater"] == []

    when = start + timedelta(days=15)
    done = await admin.json("POST", f"/v1/refunds/{refund['id']}/outcome", 200, json={
        "status": "COMPLETED", "providerTransactionId": "MTN-RF-5521", "note": "MTN statement line 5521",
        "completedAt": when.isoformat()})
    report = await admin.json("GET", f"/v1/reports/reconciliation?{period}", 200)
    assert [line["refunded"] for line in report["settled"]] == [50000]
    assert [(r["id"], r["completedAt"], r["createdAt"], r["updatedAt"], r["returnedByProvider"],
             r["providerTransactionId"]) for r in report["refundsRecordedLater"]] == [
        (refund["id"], _z(when), _z(start + timedelta(days=14)), done["updatedAt"], False, "MTN-RF-5521")]
    assert done["updatedAt"] >= _z(end)


async def test_the_refund_json_and_export_tell_a_recorded_chargeback_from_a_refund_sent(
        admin: Any, rt: Any, demo: dict[str, Any]) -> None:
    start, end = _last_month()
    paid = await _paid_last_month(admin, rt, demo, start)
    when = start + timedelta(days=20)
    chargeback = await admin.json("POST", f"/v1/payments/{paid['id']}/refunds", 201, json={
        "idempotencyKey": idem(), "amount": 20000,
        "returnedByProvider": {"providerTransactionId": "MTN-REV-FAKE", "completedAt": when.isoformat()}})
    sent = await admin.json("POST", f"/v1/payments/{paid['id']}/refunds", 201,
                            json={"idempotencyKey": idem(), "amount": 10000})
    assert (chargeback["providerTransactionId"], chargeback["returnedByProvider"]) == ("MTN-REV-FAKE", True)
    assert (sent["providerTransactionId"], sent["returnedByProvider"]) == (None, False)
    listed = (await admin.json("GET", f"/v1/payments/{paid['id']}/refunds", 200))["data"]
    assert {r["id"]: (r["providerTransactionId"], r["returnedByProvider"]) for r in listed} == {
        chargeback["id"]: ("MTN-REV-FAKE", True), sent["id"]: (None, False)}
    async with rt.sessionmaker() as s:
        assert (await s.get(Refund, chargeback["id"])).returned_by_provider is True
        assert (await s.get(Refund, sent["id"])).returned_by_provider is False

    # Last month's refunds paid back: the chargeback, with the id on MTN's statement, marked as recorded.
    rows = await _csv(admin, f"/v1/reports/refunds.csv?from={_z(start)}&to={_z(end)}&basis=completed")
    assert [(r["id"], r["providerTransactionId"], r["returnedByProvider"]) for r in rows] == [
        (chargeback["id"], "MTN-REV-FAKE", "true")]
    rows = await _csv(admin, "/v1/reports/refunds.csv")
    assert {r["id"]: (r["providerTransactionId"], r["returnedByProvider"]) for r in rows} == {
        chargeback["id"]: ("MTN-REV-FAKE", "true"), sent["id"]: ("", "false")}
    header = (await (await admin.req("GET", "/v1/reports/refunds.csv")).text()).splitlines()[0].split(",")
    # After the others, which keep their places (then memberName and cooperativeShortCode: test_reports_payer).
    assert header[15:17] == ["providerTransactionId", "returnedByProvider"]
    assert header[:15] == ["id", "reference", "paymentId", "paymentReference", "createdAt", "completedAt", "status",
                           "amount", "currency", "reason", "failureReason", "disputeId", "provider",
                           "createdLocalDate", "completedLocalDate"]


async def _refund_column(conn: Any) -> tuple[str, str | None, int] | None:
    row = await conn.fetchrow(
        "SELECT is_nullable, column_default FROM information_schema.columns "
        "WHERE table_name = 'refunds' AND column_name = 'returned_by_provider'")
    filenode = await conn.fetchval("SELECT relfilenode FROM pg_class WHERE relname = 'refunds'")
    return None if row is None else (row["is_nullable"], row["column_default"], filenode)


@requires_pg
async def test_0012_adds_the_column_without_rewriting_refunds_and_downgrades(migrated_database: str) -> None:
    import asyncpg
    from alembic import command

    from main import _alembic_config, migrate

    conn = await asyncpg.connect(migrated_database.replace("postgresql+asyncpg://", "postgresql://"))
    cfg = _alembic_config(make_settings())
    try:
        assert (await _refund_column(conn) or ())[:2] == ("NO", "false")
        await asyncio.to_thread(command.downgrade, cfg, "0011")
        assert await _refund_column(conn) is None
        before = await conn.fetchval("SELECT relfilenode FROM pg_class WHERE relname = 'refunds'")
        await asyncio.to_thread(migrate, make_settings())
        # The same file: a constant default is kept in the catalogue, the table is not rewritten.
        assert await _refund_column(conn) == ("NO", "false", before)
    finally:
        await asyncio.to_thread(migrate, make_settings())  # at head again, whatever happened
        await conn.close()


def test_0012_downgrades_and_upgrades_again_on_sqlite(tmp_path: Any) -> None:
    import sqlalchemy as sa
    from alembic import command

    from main import _alembic_config, migrate

    settings = make_settings(DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path}/gw.db")
    migrate(settings)
    engine = sa.create_engine(f"sqlite:///{tmp_path}/gw.db")

    def column() -> list[tuple[int, str]]:
        """(NOT NULL, default) of refunds.returned_by_provider; [] without it."""
        with engine.connect() as c:
            return [(r[3], r[4]) for r in c.execute(sa.text("PRAGMA table_info(refunds)"))
                    if r[1] == "returned_by_provider"]

    assert column() == [(1, "0")]
    command.downgrade(_alembic_config(settings), "0011")
    assert column() == []
    migrate(settings)
    assert column() == [(1, "0")]
    engine.dispose()
