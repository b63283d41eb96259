"""The payments and refunds lists by `basis=completed`, as the CSV exports take it: the period (from/to) is the one
the money moved in (completedAt), only rows whose money moved are listed, newest completion first; a payment asked
for in October and paid in November is November's."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import update

from core.audit import Actor
from core.models import Payment, Refund
from core.ports import ProviderOutcome
from core.refunds import apply_refund_outcome
from tests.admin_api.conftest import complete_payment, idem, make_payment

OCTOBER = "from=2026-10-01&to=2026-11-01"  # Kigali days: 2026-09-30T22:00Z to 2026-10-31T22:00Z
NOVEMBER = "from=2026-11-01&to=2026-12-01"


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


async def _paid(admin: Any, rt: Any, demo: Any, created: str, completed: str | None) -> str:
    payment = await make_payment(admin, demo["payment_types"]["Water"], amount=5000)
    if completed is not None:
        await complete_payment(rt, payment["id"])
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Payment).where(Payment.id == payment["id"]).values(
            created_at=_at(created), completed_at=_at(completed) if completed else None))
    return str(payment["id"])


async def _refunded(admin: Any, rt: Any, payment_id: str, created: str, completed: str | None) -> str:
    refund = await admin.json("POST", f"/v1/payments/{payment_id}/refunds", 201,
                              json={"amount": 1000, "idempotencyKey": idem()})
    async with rt.sessionmaker.begin() as s:
        row = await s.get(Refund, refund["id"])
        assert row is not None
        ok = completed is not None
        await apply_refund_outcome(s, rt, row, ProviderOutcome.SUCCEEDED if ok else ProviderOutcome.FAILED,
                                   actor=Actor("provider:t", "provider"), reason=None if ok else "rejected")
        await s.execute(update(Refund).where(Refund.id == refund["id"]).values(
            created_at=_at(created), completed_at=_at(completed) if completed else None))
    return str(refund["id"])


async def _ids(admin: Any, path: str) -> list[str]:
    return [p["id"] for p in (await admin.json("GET", path, 200))["data"]]


@pytest.fixture
async def month(admin: Any, rt: Any, demo: Any) -> dict[str, Any]:
    """Four payments asked for in October (Kigali) and paid in November, two of them at the same instant; one asked
    for and paid in October; one asked for in November and never paid."""
    late = [await _paid(admin, rt, demo, f"2026-10-2{i}T08:00:00", completed) for i, completed in enumerate(
        ("2026-11-03T10:00:00", "2026-11-02T10:00:00", "2026-11-02T10:00:00", "2026-10-31T22:30:00"))]
    early = await _paid(admin, rt, demo, "2026-10-15T08:00:00", "2026-10-15T08:01:00")
    waiting = await _paid(admin, rt, demo, "2026-11-05T08:00:00", None)
    # Newest completion first, the payments of one instant by id (descending), as the list by creation orders them.
    tied = sorted(late[1:3], reverse=True)
    return {"late": late, "early": early, "waiting": waiting, "november_paid": [late[0], *tied, late[3]]}


async def test_payments_by_completion_are_in_the_period_their_money_moved(admin, month):
    assert await _ids(admin, f"/v1/payments?{NOVEMBER}&basis=completed") == month["november_paid"]
    assert await _ids(admin, f"/v1/payments?{OCTOBER}&basis=completed") == [month["early"]]
    # By creation (the default, or said): October's requests, November's unpaid one.
    asked = await _ids(admin, f"/v1/payments?{OCTOBER}")
    assert set(asked) == {*month["late"], month["early"]}
    assert await _ids(admin, f"/v1/payments?{OCTOBER}&basis=created") == asked
    assert await _ids(admin, f"/v1/payments?{NOVEMBER}") == [month["waiting"]]
    # With no period, only the payments whose money moved: the unpaid one is left out.
    paid = await _ids(admin, "/v1/payments?basis=completed&limit=100")
    assert month["waiting"] not in paid and paid[:5] == [*month["november_paid"], month["early"]]
    # Filters combine with it as with a creation period.
    assert await _ids(admin, f"/v1/payments?{NOVEMBER}&basis=completed&status=PENDING") == []


async def test_pages_by_completion_list_each_payment_once(admin, month):
    seen = []
    for page in range(1, 4):
        body = await admin.json("GET", f"/v1/payments?{NOVEMBER}&basis=completed&limit=2&page={page}", 200)
        assert body["meta"]["total"] == 4
        seen += [p["id"] for p in body["data"]]
    assert seen == month["november_paid"]
    for page in range(1, 6):  # one a page: the two of one instant too
        body = await admin.json("GET", f"/v1/payments?{NOVEMBER}&basis=completed&limit=1&page={page}", 200)
        assert [p["id"] for p in body["data"]] == month["november_paid"][page - 1:page]


async def test_a_sync_by_completion_lists_each_payment_once(admin, month, monkeypatch):
    """A sync still pages by its cursor, in the order payments changed: the basis only says which of them the
    period holds."""
    monkeypatch.setattr("admin_api.common.SYNC_LAG", timedelta(0))
    path = f"/v1/payments?updatedFrom=2000-01-01T00:00:00Z&{NOVEMBER}&basis=completed&limit=3"
    first = await admin.json("GET", path, 200)
    second = await admin.json("GET", f"{path}&after={first['nextCursor']}", 200)
    listed = [p["id"] for p in first["data"] + second["data"]]
    assert sorted(listed) == sorted(month["november_paid"])


async def test_refunds_by_completion_are_in_the_period_their_money_moved(admin, rt, month):
    back = await _refunded(admin, rt, month["early"], "2026-10-20T08:00:00", "2026-11-02T09:00:00")
    refused = await _refunded(admin, rt, month["early"], "2026-11-03T08:00:00", None)
    assert await _ids(admin, f"/v1/refunds?{NOVEMBER}&basis=completed") == [back]
    assert await _ids(admin, f"/v1/refunds?{OCTOBER}&basis=completed") == []
    assert await _ids(admin, f"/v1/refunds?{OCTOBER}") == [back]
    assert await _ids(admin, f"/v1/refunds?{NOVEMBER}") == [refused]
    assert await _ids(admin, "/v1/refunds?basis=completed") == [back]
    assert await _ids(admin, f"/v1/payments/{month['early']}/refunds?{NOVEMBER}&basis=completed") == [back]


@pytest.mark.parametrize("path", ["/v1/payments", "/v1/refunds"])
async def test_a_basis_the_list_does_not_know_is_a_400(admin, demo, path):
    for value in ("paid", "COMPLETED", ""):
        bad = await admin.json("GET", f"{path}?basis={value}", 400)
        assert {k: bad[k] for k in ("statusCode", "error", "code", "message", "path")} == {
            "statusCode": 400, "error": "Bad Request", "code": "VALIDATION_FAILED",
            "message": ["basis must be one of: created, completed"], "path": f"{path}?basis={value}"}, bad


async def test_the_list_by_completion_holds_the_payments_the_export_holds(admin, superadmin, rt, demo):
    """Only money held, as payments.csv?basis=completed (the reconciliation's `settled`) lists it: a recording voided
    since, and a payment that failed and was then reported taken in another currency or for nothing, keep their
    completedAt but hold nothing, and are in neither; money taken after a failure is in both."""
    from core.money import Money
    from core.ports import ProviderOutcome
    from core.provider_events import apply_collection_outcome
    from tests.admin_api.test_payment_void import _line

    async def failed_then_taken(taken: Money) -> str:
        payment = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
        provider = Actor("provider:test", "provider")
        for outcome in (ProviderOutcome.FAILED, ProviderOutcome.SUCCEEDED):
            async with rt.sessionmaker.begin() as s:
                await apply_collection_outcome(s, rt, await s.get(Payment, payment["id"]), outcome, actor=provider,
                                               reason="payer declined", amount=taken,
                                               provider_transaction_id=f"MTN-{taken.minor}-{taken.currency}")
        return str(payment["id"])

    paid = await _paid(admin, rt, demo, "2026-10-15T08:00:00", "2026-10-15T08:01:00")
    held = await failed_then_taken(Money(50_000, "RWF"))
    other_currency = await failed_then_taken(Money(40_00, "USD"))
    nothing = await failed_then_taken(Money(0, "RWF"))
    voided = (await admin.json("POST", "/v1/payments/recorded", 201, json=_line(demo)))["id"]
    await admin.json("POST", f"/v1/payments/{voided}/void", 200, json={"note": "wrong statement line"})
    async with rt.sessionmaker() as s:
        assert all([(await s.get(Payment, p)).completed_at for p in (other_currency, nothing, voided)])

    for caller in (admin, superadmin):
        exported = [row["id"] for row in csv.DictReader(io.StringIO(
            await (await caller.req("GET", "/v1/reports/payments.csv?basis=completed")).text()))]
        assert sorted(exported) == sorted([paid, held])
        listed = await caller.json("GET", "/v1/payments?basis=completed&limit=100", 200)
        assert sorted(p["id"] for p in listed["data"]) == sorted(exported) and listed["meta"]["total"] == 2
        assert await _ids(caller, "/v1/payments?basis=completed&status=VOIDED") == []
        assert await _ids(caller, "/v1/payments?status=VOIDED") == [voided]  # still listed by creation


async def test_a_sync_by_completion_lists_a_recording_voided_since(admin, demo, monkeypatch):
    """An ERP syncing by completion credited the recording: its void is a change it must be given, though the pages
    by completion (the export's rows) no longer hold it."""
    from tests.admin_api.test_payment_void import _line

    monkeypatch.setattr("admin_api.common.SYNC_LAG", timedelta(0))
    path = "/v1/payments?updatedFrom=2000-01-01T00:00:00Z&basis=completed"
    recorded = (await admin.json("POST", "/v1/payments/recorded", 201, json=_line(demo)))["id"]
    first = await admin.json("GET", path, 200)
    assert [(p["id"], p["status"]) for p in first["data"]] == [(recorded, "COMPLETED")]
    await admin.json("POST", f"/v1/payments/{recorded}/void", 200, json={"note": "wrong statement line"})
    then = await admin.json("GET", f"{path}&after={first['nextCursor']}", 200)
    assert [(p["id"], p["status"]) for p in then["data"]] == [(recorded, "VOIDED")]
    assert await _ids(admin, "/v1/payments?basis=completed") == []
