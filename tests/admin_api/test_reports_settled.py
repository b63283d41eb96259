"""The reconciliation's `settled` section and the exports with `basis=completed` count money when it moved (a
payment collected, a refund paid back), per provider account, so a month matches the provider's statement and
stays the same after it ended; `flaggedCount` says how many flagged payments there are when the list stops."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime

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


async def _dated(rt, payment_id: str, created: str, completed: str | None) -> None:
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Payment).where(Payment.id == payment_id).values(
            created_at=_at(created), completed_at=_at(completed) if completed else None))


async def _refund(admin, rt, payment_id: str, amount: int, *, completed: str, ok: bool = True) -> dict:
    refund = await admin.json("POST", f"/v1/payments/{payment_id}/refunds", 201,
                              json={"amount": amount, "idempotencyKey": idem()})
    async with rt.sessionmaker.begin() as s:
        row = await s.get(Refund, refund["id"])
        assert row is not None
        outcome = ProviderOutcome.SUCCEEDED if ok else ProviderOutcome.FAILED
        await apply_refund_outcome(s, rt, row, outcome, actor=Actor("provider:t", "provider"),
                                   reason=None if ok else "rejected")
        await s.execute(update(Refund).where(Refund.id == refund["id"]).values(
            created_at=_at(completed), completed_at=_at(completed) if ok else None))
    return refund


async def _month(admin, rt, demo) -> dict:
    rent, water = demo["payment_types"]["Monthly Rent"], demo["payment_types"]["Water"]
    # Asked for at 23:59 on 31 October in Kigali, approved at 00:01 on 1 November: October's request, November's money.
    rent_paid = await make_payment(admin, rent)
    await complete_payment(rt, rent_paid["id"], fee=500)
    await _dated(rt, rent_paid["id"], "2026-10-31T21:59:00", "2026-10-31T22:01:00")
    water_paid = await make_payment(admin, water, amount=5000)
    await complete_payment(rt, water_paid["id"], fee=50)
    await _dated(rt, water_paid["id"], "2026-10-15T08:00:00", "2026-10-15T08:01:00")
    airtel_paid = await make_payment(admin, water, amount=5000, paymentMethod="MOBILE_MONEY_AIRTEL",
                                     paymentAccount="+250733000001")
    await complete_payment(rt, airtel_paid["id"], fee=40)
    await _dated(rt, airtel_paid["id"], "2026-10-16T08:00:00", "2026-10-16T08:01:00")
    waiting = await make_payment(admin, water, amount=5000)
    await _dated(rt, waiting["id"], "2026-10-20T08:00:00", None)
    water_back = await _refund(admin, rt, water_paid["id"], 1000, completed="2026-10-20T09:00:00")
    await _refund(admin, rt, water_paid["id"], 2000, completed="2026-10-21T09:00:00", ok=False)
    await _refund(admin, rt, rent_paid["id"], 10000, completed="2026-11-20T09:00:00")
    return {"rent": rent_paid, "water": water_paid, "airtel": airtel_paid, "waiting": waiting,
            "water_back": water_back}


async def test_settled_counts_money_when_it_moved_per_provider_account(admin, rt, demo):
    await _month(admin, rt, demo)
    october = await admin.json("GET", f"/v1/reports/reconciliation?{OCTOBER}", 200)
    assert october["settled"] == [
        {"provider": "airtel", "paymentMethod": "MOBILE_MONEY_AIRTEL", "currency": "RWF", "collectedCount": 1,
         "collected": 5000, "fees": 40, "refundedCount": 0, "refunded": 0, "net": 4960},
        {"provider": "mtn_momo", "paymentMethod": "MOBILE_MONEY_MTN", "currency": "RWF", "collectedCount": 1,
         "collected": 5000, "fees": 50, "refundedCount": 1, "refunded": 1000, "net": 3950},
    ]
    # The requests of October, as before: all three collected payments were asked for in October.
    assert {t["currency"]: t["collectedCount"] for t in october["totals"]} == {"RWF": 3}
    november = await admin.json("GET", f"/v1/reports/reconciliation?{NOVEMBER}", 200)
    assert november["settled"] == [{
        "provider": "mtn_momo", "paymentMethod": "MOBILE_MONEY_MTN", "currency": "RWF", "collectedCount": 1,
        "collected": 50000, "fees": 500, "refundedCount": 1, "refunded": 10000, "net": 39500,
    }]
    assert november["payments"]["byStatus"] == [] and november["totals"] == []


async def test_a_month_that_ended_keeps_its_settled_figures(admin, rt, demo):
    month = await _month(admin, rt, demo)
    before = await admin.json("GET", f"/v1/reports/reconciliation?{OCTOBER}", 200)
    await _refund(admin, rt, month["water"]["id"], 500, completed="2026-12-02T09:00:00")
    after = await admin.json("GET", f"/v1/reports/reconciliation?{OCTOBER}", 200)
    assert after["settled"] == before["settled"]
    # What the refund-of-the-period's-payments totals do instead (documented): October's `refunded` grew.
    assert [t["refunded"] for t in before["totals"]] == [11000]
    assert [t["refunded"] for t in after["totals"]] == [11500]
    december = await admin.json("GET", "/v1/reports/reconciliation?from=2026-12-01&to=2027-01-01", 200)
    assert [(s["paymentMethod"], s["collectedCount"], s["refunded"], s["net"]) for s in december["settled"]] == [
        ("MOBILE_MONEY_MTN", 0, 500, -500)]


async def test_exports_by_completion_list_the_settled_lines(admin, rt, demo):
    month = await _month(admin, rt, demo)

    async def rows(path: str) -> list[dict]:
        resp = await admin.req("GET", path)
        assert resp.status == 200, await resp.text()
        return list(csv.DictReader(io.StringIO(await resp.text())))

    paid = await rows(f"/v1/reports/payments.csv?{OCTOBER}&basis=completed")
    assert [r["id"] for r in paid] == [month["water"]["id"], month["airtel"]["id"]]
    asked = await rows(f"/v1/reports/payments.csv?{OCTOBER}")
    assert {r["id"] for r in asked} == {month[k]["id"] for k in ("rent", "water", "airtel", "waiting")}
    paid_nov = await rows(f"/v1/reports/payments.csv?{NOVEMBER}&basis=completed")
    assert [r["id"] for r in paid_nov] == [month["rent"]["id"]]
    back = await rows(f"/v1/reports/refunds.csv?{OCTOBER}&basis=completed")
    assert [(r["id"], r["status"], r["amount"]) for r in back] == [(month["water_back"]["id"], "COMPLETED", "1000")]
    assert len(await rows(f"/v1/reports/refunds.csv?{OCTOBER}")) == 2  # the failed one was asked for too
    bad = await admin.json("GET", "/v1/reports/payments.csv?basis=paid", 400)
    assert bad["statusCode"] == 400 and any("basis" in m for m in bad["message"]), bad


async def test_flagged_count_says_how_many_when_the_list_stops(admin, rt, demo, monkeypatch):
    from core import reports

    monkeypatch.setattr(reports, "FLAGGED_LIMIT", 2)
    ids = []
    for _ in range(3):
        p = await make_payment(admin, demo["payment_types"]["Water"], amount=5000)
        ids.append(p["id"])
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Payment).where(Payment.id.in_(ids)).values(late=True))
    report = await admin.json("GET", "/v1/reports/reconciliation", 200)
    assert len(report["flagged"]) == 2 and report["flaggedCount"] == 3
    monkeypatch.setattr(reports, "FLAGGED_LIMIT", 5)
    report = await admin.json("GET", "/v1/reports/reconciliation", 200)
    assert len(report["flagged"]) == 3 and report["flaggedCount"] == 3


async def test_the_document_describes_every_figure_of_the_reconciliations_lines(admin, rt, demo, client):
    """A client generated from the OpenAPI document reads each line's counts and amounts with their types: the
    lines were objects of no known fields (`settled` listed its figures as required without describing them)."""
    await _month(admin, rt, demo)
    october = await admin.json("GET", f"/v1/reports/reconciliation?{OCTOBER}", 200)  # validated against it
    doc = await (await client.get("/v1/openapi.json")).json()
    schema = doc["paths"]["/v1/reports/reconciliation"]["get"]["responses"]["200"]["content"]["application/json"][
        "schema"]
    sections = {"settled": schema["properties"]["settled"], "totals": schema["properties"]["totals"],
                "refunds": schema["properties"]["refunds"],
                **{f"payments.{k}": v for k, v in schema["properties"]["payments"]["properties"].items()}}
    for name, section in sections.items():
        lines = october["settled"] if name == "settled" else (
            october[name] if "." not in name else october["payments"][name.split(".")[1]])
        assert lines, name
        described = section["items"]["properties"]
        assert set(section["items"]["required"]) == set(described), name
        for line in lines:
            assert set(line) == set(described), name
        assert all("type" in p or "enum" in p for p in described.values()), name
    amounts = schema["properties"]["settled"]["items"]["properties"]
    assert {k for k, p in amounts.items() if p.get("type") == ["integer", "string"]} == {
        "collected", "fees", "refunded", "net"}
    assert set(schema["properties"]["period"]["properties"]) == {"from", "to"}
