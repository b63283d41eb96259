"""A Nairobi SACCO (KES, UTC+3) closing October beside a Kigali cooperative (RWF, UTC+2): its local midnights, an
overpayment, a reversal M-Pesa made in November, and amounts with cents (KES) and without (RWF) alike in the JSON,
the payments list and both exports; a super admin's report keeps the two currencies apart."""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from decimal import Decimal
from typing import Any

from core import auth
from core.audit import Actor
from core.models import Payment
from core.money import Money
from core.ports import ProviderOutcome
from core.provider_events import apply_collection_outcome
from tests.admin_api.conftest import bearer, complete_payment, idem, make_payment
from tests.admin_api.test_reports_settled import _dated

OCTOBER = "from=2026-10-01&to=2026-11-01"  # Nairobi days: 2026-09-30T21:00Z to 2026-10-31T21:00Z


async def _csv(caller: Any, path: str) -> list[dict[str, str]]:
    resp = await caller.req("GET", path + "&bom=true")
    assert resp.status == 200, await resp.text()
    return list(csv.DictReader(io.StringIO((await resp.read()).decode("utf-8-sig"), newline="")))


async def test_a_nairobi_month_in_shillings_beside_a_kigali_one(superadmin: Any, admin: Any, rt: Any, client: Any,
                                                                demo: dict[str, Any]) -> None:
    coop = await superadmin.json("POST", "/v1/cooperatives", 201, json={
        "name": 'Umoja, "Nairobi" SACCO', "shortCode": "NRB", "country": "KE"})
    ptype = await superadmin.json("POST", "/v1/payment-types", 201, json={
        "name": "Ada ya mwezi", "amount": "1500.00", "cooperativeId": coop["id"], "allowCustomAmount": True})
    async with rt.sessionmaker.begin() as s:
        await auth.create_user(s, username="admin@nrb.test", password="nairobi-admin-pw", role="COOP_ADMIN",
                               cooperative_id=coop["id"])
    ke = await bearer(client, "admin@nrb.test", "nairobi-admin-pw")

    async def pay(amount: str, account: str) -> dict[str, Any]:
        return await ke.json("POST", "/v1/payments", 201, json={
            "paymentTypeId": ptype["id"], "amount": amount, "paymentMethod": "MPESA", "paymentAccount": account,
            "idempotencyKey": idem()})

    # 23:30 on 31 October in Nairobi (20:30Z): October's.
    last = await pay("1500.00", "0712345678")
    await complete_payment(rt, last["id"])
    await _dated(rt, last["id"], "2026-10-31T20:30:00", "2026-10-31T20:31:00")
    # 00:10 on 1 October in Nairobi (21:10Z on 30 September), and M-Pesa took 1,300 of 1,234 asked: October's.
    over = await pay("1234.00", "0712345670")
    async with rt.sessionmaker.begin() as s:
        await apply_collection_outcome(s, rt, await s.get(Payment, over["id"]), ProviderOutcome.SUCCEEDED,
                                       actor=Actor("provider:mpesa", "provider"), amount=Money(130000, "KES"),
                                       provider_transaction_id="SKE1300OVR")
    await _dated(rt, over["id"], "2026-09-30T21:10:00", "2026-09-30T21:11:00")
    # 00:10 on 1 November in Nairobi (21:10Z on 31 October): November's.
    november = await pay("250.00", "0712345679")
    await complete_payment(rt, november["id"])
    await _dated(rt, november["id"], "2026-10-31T21:10:00", "2026-10-31T21:11:00")
    # M-Pesa reversed 100 shillings of the last one on 2 November: November's money, October's payment.
    await ke.json("POST", f"/v1/payments/{last['id']}/refunds", 201, json={
        "amount": "100.00", "idempotencyKey": idem(),
        "returnedByProvider": {"providerTransactionId": "SKE-REV-1", "completedAt": "2026-11-02T10:00:00Z"}})
    rwf = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    await complete_payment(rt, rwf["id"])
    await _dated(rt, rwf["id"], "2026-10-15T08:00:00", "2026-10-15T08:01:00")

    report = await ke.json("GET", f"/v1/reports/reconciliation?{OCTOBER}", 200)
    assert report["period"] == {"from": "2026-09-30T21:00:00Z", "to": "2026-10-31T21:00:00Z"}
    assert report["totals"] == [{"currency": "KES", "collectedCount": 2, "collected": "2800.00", "fees": "0.00",
                                 "refunded": "100.00", "net": "2700.00"}]
    assert report["settled"] == [{"provider": "mpesa", "paymentMethod": "MPESA", "currency": "KES",
                                  "collectedCount": 2, "collected": "2800.00", "fees": "0.00", "refundedCount": 0,
                                  "refunded": "0.00", "net": "2800.00"}]
    assert [(f["id"], f["mismatchDetail"]) for f in report["flagged"]] == [
        (over["id"], "provider reported 1,300.00 KES, expected 1,234.00 KES")]

    asked = await _csv(ke, f"/v1/reports/payments.csv?{OCTOBER}")
    shown = [(r["id"], r["amount"], r["collectedAmount"], r["refundedAmount"], r["createdLocalDate"]) for r in asked]
    assert shown == [(over["id"], "1234.00", "1300.00", "0.00", "2026-10-01"),
                     (last["id"], "1500.00", "1500.00", "100.00", "2026-10-31")]
    listed = (await ke.json("GET", f"/v1/payments?{OCTOBER}", 200))["data"]
    assert {p["id"]: (p["amount"], p["collectedAmount"], p["refundedAmount"]) for p in listed} == {
        r["id"]: (r["amount"], r["collectedAmount"], r["refundedAmount"]) for r in asked}
    assert sum(Decimal(r["collectedAmount"]) for r in asked) == Decimal(report["totals"][0]["collected"])
    paid = await _csv(ke, f"/v1/reports/payments.csv?{OCTOBER}&basis=completed")
    assert sum(Decimal(r["collectedAmount"]) for r in paid) == Decimal(report["settled"][0]["collected"])

    later = await ke.json("GET", "/v1/reports/reconciliation?from=2026-11-01&to=2026-12-01", 200)
    assert [(s["collected"], s["refundedCount"], s["refunded"], s["net"]) for s in later["settled"]] == [
        ("250.00", 1, "100.00", "150.00")]
    back = await _csv(ke, "/v1/reports/refunds.csv?from=2026-11-01&to=2026-12-01&basis=completed")
    assert [(r["amount"], r["completedLocalDate"], r["providerTransactionId"], r["returnedByProvider"])
            for r in back] == [("100.00", "2026-11-02", "SKE-REV-1", "true")]

    # A super admin's report of both cooperatives (UTC days: the 00:10 payments fall on the other side), one line
    # per currency, each formatted as its currency is.
    both = await superadmin.json("GET", "/v1/reports/reconciliation?from=2026-10-01T00:00:00Z&to=2026-11-01T00:00:00Z",
                                 200)
    assert [(t["currency"], t["collected"]) for t in both["totals"]] == [("KES", "1750.00"), ("RWF", 50000)]
    rows = await _csv(superadmin, "/v1/reports/payments.csv?from=2026-10-01T00:00:00Z&to=2026-11-01T00:00:00Z")
    sums: dict[str, Decimal] = defaultdict(Decimal)
    for r in rows:
        sums[r["currency"]] += Decimal(r["collectedAmount"])
    assert {c: str(v) for c, v in sums.items()} == {"KES": "1750.00", "RWF": "50000"}
    assert {r["cooperativeShortCode"] for r in rows} == {"NRB", "KHHC"}
