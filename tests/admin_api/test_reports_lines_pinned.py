"""Reconciliation figures no other test held: a cooperative's report counts its own refunds only, and the lines by
method and by type count what was collected and refunded of the payments whose money is held, so that they add
up to `totals` (a voided recording whose failed refund went through after all holds nothing)."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import update

from core.models import Dispute, OutboxJob, Refund
from tests.admin_api.conftest import Caller, complete_payment, idem, make_payment
from tests.admin_api.test_payment_void import NOTE, _line
from tests.admin_api.test_reports_settled import _at, _dated, _refund


async def test_a_cooperatives_reconciliation_counts_only_its_own_refunds(admin: Caller, rt: Any,
                                                                         demo: dict[str, Any],
                                                                         coop_b: dict[str, Any]) -> None:
    payment = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    await complete_payment(rt, payment["id"])
    await admin.json("POST", f"/v1/payments/{payment['id']}/refunds", 201,
                     json={"amount": 5000, "idempotencyKey": idem()})
    mine = await admin.json("GET", "/v1/reports/reconciliation", 200)
    assert [(r["status"], r["currency"], r["count"], r["amount"]) for r in mine["refunds"]] == [
        ("PENDING", "RWF", 1, 5000)]
    other = await coop_b["admin"].json("GET", "/v1/reports/reconciliation", 200)
    assert other["refunds"] == [] and other["totals"] == [] and other["settled"] == []


async def test_the_lines_count_only_money_held_and_add_up_to_the_totals(rt: Any, admin: Caller,
                                                                       demo: dict[str, Any]) -> None:
    """A recording voided once its refund had failed; the refund then went through after all (10,000 RWF left the
    account: `settled` says so). The voided payment holds nothing: by method and by type it counts neither
    collected nor refunded, as `totals` (empty) does not."""
    payment = await admin.json("POST", "/v1/payments/recorded", 201, json=_line(
        demo, gatewayReference=str(uuid.uuid4())))
    url = f"/v1/payments/{payment['id']}"
    refund = await admin.json("POST", f"{url}/refunds", 201, json={"amount": 10000, "idempotencyKey": idem()})
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Refund).where(Refund.id == refund["id"]).values(status="FAILED"))
        await s.execute(update(OutboxJob).where(OutboxJob.kind == "refund.submit").values(status="DONE"))
    await admin.json("POST", f"{url}/void", 200, json={"note": NOTE})
    await admin.json("POST", f"/v1/refunds/{refund['id']}/outcome", 200, json={
        "status": "COMPLETED", "note": "MTN statement: sent back on 2 Dec after all"})

    report = await admin.json("GET", "/v1/reports/reconciliation", 200)
    assert report["totals"] == []
    lines = [*report["payments"]["byMethod"], *report["payments"]["byPaymentType"]]
    assert [(line["count"], line["completedCount"], line["completedAmount"], line["refundedAmount"])
            for line in lines] == [(1, 0, 0, 0), (1, 0, 0, 0)]
    assert [(s["collected"], s["refunded"]) for s in report["settled"]] == [(0, 10000)]


async def test_the_instant_a_period_ends_is_the_next_periods_only(admin: Caller, rt: Any,
                                                                  demo: dict[str, Any]) -> None:
    """Midnight on 1 December in Kigali (2026-11-30T22:00:00Z) ends November and begins December: a payment asked
    for and paid at that instant, a refund of it and a dispute opened then are counted in December's reconciliation,
    never in November's as well (the treasurer would count the money twice, once per month)."""
    edge = "2026-11-30T22:00:00"
    payment = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    await complete_payment(rt, payment["id"])
    await _dated(rt, payment["id"], edge, edge)
    await _refund(admin, rt, payment["id"], 10000, completed=edge)
    dispute = await admin.json("POST", "/v1/disputes", 201, json={"paymentId": payment["id"], "reason": "OTHER"})
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Dispute).where(Dispute.id == dispute["id"]).values(created_at=_at(edge)))

    november = await admin.json("GET", "/v1/reports/reconciliation?from=2026-11-01&to=2026-12-01", 200)
    assert (november["payments"]["byStatus"], november["totals"], november["settled"], november["refunds"],
            november["disputesOpened"]) == ([], [], [], [], 0)
    december = await admin.json("GET", "/v1/reports/reconciliation?from=2026-12-01&to=2027-01-01", 200)
    assert [(s["status"], s["count"]) for s in december["payments"]["byStatus"]] == [("PARTIALLY_REFUNDED", 1)]
    assert [(s["collected"], s["refunded"]) for s in december["settled"]] == [(50000, 10000)]
    assert [(r["status"], r["amount"]) for r in december["refunds"]] == [("COMPLETED", 10000)]
    assert december["disputesOpened"] == 1
