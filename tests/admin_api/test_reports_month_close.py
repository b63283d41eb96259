"""A cooperative's accountant closing October (Africa/Kigali, UTC+2): the reconciliation's figures, its lines, the
payments list and both CSV exports (either basis, with and without a byte-order mark) must tell one story, the
month's edges are Kigali's midnights, and a partially refunded or disputed payment is counted once."""

from __future__ import annotations

import csv
import io
from collections import Counter, defaultdict
from typing import Any

from sqlalchemy import update

from core.models import Payment
from core.ports import ProviderOutcome
from tests.admin_api.conftest import complete_payment, idem, make_payment
from tests.admin_api.test_reports_recorded_later import _provider_says
from tests.admin_api.test_reports_settled import _at, _dated, _refund

OCTOBER = "from=2026-10-01&to=2026-11-01"  # Kigali days: 2026-09-30T22:00Z to 2026-10-31T22:00Z


async def _rows(admin: Any, path: str, *, bom: bool = False) -> list[dict[str, str]]:
    resp = await admin.req("GET", path + ("&bom=true" if bom else ""))
    assert resp.status == 200, await resp.text()
    raw = await resp.read()
    if bom:
        assert raw.startswith(b"\xef\xbb\xbf")
        raw = raw[3:]
    else:
        assert not raw.startswith(b"\xef\xbb\xbf")
    return list(csv.DictReader(io.StringIO(raw.decode())))


async def _october(admin: Any, rt: Any, demo: dict[str, Any]) -> dict[str, Any]:
    rent, water = demo["payment_types"]["Monthly Rent"], demo["payment_types"]["Water"]
    made: dict[str, Any] = {}

    async def paid(name: str, created: str, completed: str | None, *, fee: int = 0, **over: Any) -> dict[str, Any]:
        p = await make_payment(admin, over.pop("ptype", rent), **over)
        if completed is not None:
            await complete_payment(rt, p["id"], fee=fee)
        await _dated(rt, p["id"], created, completed)
        made[name] = p
        return p

    # 00:00:30 on 1 October in Kigali (still 30 September in UTC): October's.
    await paid("first_minute", "2026-09-30T22:00:30", "2026-09-30T22:01:00", fee=100)
    # 23:59:30 on 30 September in Kigali: September's, though it is 21:59 UTC on the 30th.
    await paid("before", "2026-09-30T21:59:30", "2026-09-30T21:59:50")
    full = await paid("full", "2026-10-05T08:00:00", "2026-10-05T08:01:00", ptype=water, amount=5000, fee=50)
    part = await paid("part", "2026-10-06T08:00:00", "2026-10-06T08:01:00")
    disputed = await paid("disputed", "2026-10-07T08:00:00", "2026-10-07T08:01:00",
                          paymentMethod="MOBILE_MONEY_AIRTEL", paymentAccount="+250733000001")
    # Asked for at 23:59 on 31 October in Kigali (21:59Z), approved after midnight: October's request,
    # November's money.
    await paid("late", "2026-10-31T21:59:00", "2026-10-31T22:00:10")
    # 23:30 UTC on 31 October is already 1 November in Kigali: November's.
    await paid("utc_edge", "2026-10-31T23:30:00", "2026-10-31T23:31:00")
    failed = await paid("failed", "2026-10-08T08:00:00", None)
    await _provider_says(rt, failed["id"], ProviderOutcome.FAILED, provider="mtn_momo")
    await _dated(rt, failed["id"], "2026-10-08T08:00:00", None)

    await _refund(admin, rt, full["id"], 5000, completed="2026-10-09T09:00:00")
    made["part_back"] = await _refund(admin, rt, part["id"], 10000, completed="2026-10-10T09:00:00")
    await _refund(admin, rt, part["id"], 3000, completed="2026-10-11T09:00:00", ok=False)
    # A dispute on the Airtel payment, resolved by Airtel's own reversal of part of it.
    dispute = await admin.json("POST", "/v1/disputes", 201, json={"paymentId": disputed["id"], "reason": "OTHER"})
    await admin.json("POST", f"/v1/disputes/{dispute['id']}/transitions", 200, json={
        "status": "RESOLVED", "note": "Airtel reversed 20,000", "refundAmount": 20000,
        "returnedByProvider": {"providerTransactionId": "AIR-REV-9", "completedAt": "2026-10-12T10:00:00Z"}})
    # A statement line recorded today, dated 20 October, and another recorded and then voided.
    line = {"paymentTypeId": rent, "amount": 50000, "paymentMethod": "MOBILE_MONEY_MTN",
            "memberId": demo["members"]["+250788000001"], "note": "MTN statement, October"}
    made["recorded"] = await admin.json("POST", "/v1/payments/recorded", 201, json={
        **line, "providerTransactionId": "MTN-OCT-20", "completedAt": "2026-10-20T10:00:00Z",
        "idempotencyKey": idem()})
    made["voided"] = await admin.json("POST", "/v1/payments/recorded", 201, json={
        **line, "providerTransactionId": "MTN-OCT-21", "completedAt": "2026-10-21T10:00:00Z",
        "idempotencyKey": idem()})
    await admin.json("POST", f"/v1/payments/{made['voided']['id']}/void", 200, json={"note": "wrong line"})
    for name in ("recorded", "voided"):
        async with rt.sessionmaker.begin() as s:
            await s.execute(update(Payment).where(Payment.id == made[name]["id"]).values(
                created_at=_at("2026-10-22T10:00:00")))
    return made


def _by_currency(rows: list[dict[str, str]], column: str, keep: Any = lambda r: True) -> dict[str, int]:
    sums: dict[str, int] = defaultdict(int)
    for r in rows:
        if keep(r):
            sums[r["currency"]] += int(r[column])
    return dict(sums)


async def test_the_months_report_its_lines_the_list_and_the_exports_agree(admin: Any, rt: Any,
                                                                           demo: dict[str, Any]) -> None:
    made = await _october(admin, rt, demo)
    report = await admin.json("GET", f"/v1/reports/reconciliation?{OCTOBER}", 200)
    asked = await _rows(admin, f"/v1/reports/payments.csv?{OCTOBER}")
    assert asked == await _rows(admin, f"/v1/reports/payments.csv?{OCTOBER}&basis=created", bom=True)
    ids = {r["id"] for r in asked}
    names = {v["id"]: k for k, v in made.items() if "id" in v}
    assert {names.get(i, i) for i in ids} == {
        "first_minute", "full", "part", "disputed", "late", "failed", "recorded", "voided"}
    assert {r["createdLocalDate"] for r in asked} <= {f"2026-10-{d:02d}" for d in range(1, 32)}

    # The payments list, filtered the same way, holds the same payments and amounts.
    listed = (await admin.json("GET", f"/v1/payments?{OCTOBER}&limit=100", 200))["data"]
    assert {p["id"]: (p["amount"], p["status"], p["refundedAmount"]) for p in listed} == {
        r["id"]: (int(r["amount"]), r["status"], int(r["refundedAmount"])) for r in asked}

    # byStatus sums to the export's rows, and byMethod and byPaymentType to byStatus.
    by_status: Counter[tuple[str, str]] = Counter()
    for line in report["payments"]["byStatus"]:
        by_status[(line["status"], line["currency"])] += line["amount"]
    exported: Counter[tuple[str, str]] = Counter()
    for r in asked:
        exported[(r["status"], r["currency"])] += int(r["amount"])
    assert by_status == exported
    for section in ("byMethod", "byPaymentType"):
        grouped = report["payments"][section]
        assert sum(x["amount"] for x in grouped) == sum(exported.values())
        assert sum(x["count"] for x in grouped) == len(asked)
        assert sum(x["completedAmount"] for x in grouped) == sum(int(r["collectedAmount"]) for r in asked)

    # totals: the period's payments collected, what was refunded of them, fees, net; each from the export's rows.
    held = [r for r in asked if int(r["collectedAmount"]) > 0]
    [totals] = report["totals"]
    assert totals == {
        "currency": "RWF",
        "collectedCount": len(held),
        "collected": sum(int(r["collectedAmount"]) for r in held),
        "fees": sum(int(r["fee"]) for r in held),
        "refunded": sum(int(r["refundedAmount"]) for r in held),
        "net": sum(int(r["collectedAmount"]) - int(r["fee"]) - int(r["refundedAmount"]) for r in held),
    }
    # The partly refunded one counts its one completed refund once, the disputed one its reversal once.
    by_id = {r["id"]: r for r in asked}
    assert by_id[made["part"]["id"]]["refundedAmount"] == "10000"
    assert by_id[made["disputed"]["id"]]["refundedAmount"] == "20000"
    assert by_id[made["voided"]["id"]]["collectedAmount"] == "0"

    # refunds: by status, as refunds.csv lists them.
    refunds = await _rows(admin, f"/v1/reports/refunds.csv?{OCTOBER}")
    assert refunds == await _rows(admin, f"/v1/reports/refunds.csv?{OCTOBER}&basis=created", bom=True)
    per_status: Counter[tuple[str, str]] = Counter()
    for r in refunds:
        per_status[(r["status"], r["currency"])] += int(r["amount"])
    assert {(x["status"], x["currency"]): x["amount"] for x in report["refunds"]} == dict(per_status)
    # Airtel's reversal was recorded in December (asked for then): not one of October's requests.
    assert sum(x["count"] for x in report["refunds"]) == len(refunds) == 3
    # The refunds list, filtered the same way.
    listed_refunds = (await admin.json("GET", f"/v1/refunds?{OCTOBER}&limit=100", 200))["data"]
    assert {r["id"]: r["amount"] for r in listed_refunds} == {r["id"]: int(r["amount"]) for r in refunds}

    # settled: the lines behind it are the exports by completion.
    paid = await _rows(admin, f"/v1/reports/payments.csv?{OCTOBER}&basis=completed")
    assert paid == await _rows(admin, f"/v1/reports/payments.csv?{OCTOBER}&basis=completed", bom=True)
    assert {names.get(r["id"]) for r in paid} == {"first_minute", "full", "part", "disputed", "recorded"}
    back = await _rows(admin, f"/v1/reports/refunds.csv?{OCTOBER}&basis=completed")
    assert back == await _rows(admin, f"/v1/reports/refunds.csv?{OCTOBER}&basis=completed", bom=True)
    lines: dict[tuple[str, str, str], list[int]] = defaultdict(lambda: [0, 0, 0, 0, 0])
    for r in paid:
        line = lines[(r["provider"], r["paymentMethod"], r["currency"])]
        line[0] += 1
        line[1] += int(r["collectedAmount"])
        line[2] += int(r["fee"])
    methods = {r["id"]: r["paymentMethod"] for r in asked}
    for r in back:
        line = lines[(r["provider"], methods[r["paymentId"]], r["currency"])]
        line[3] += 1
        line[4] += int(r["amount"])
    assert {(s["provider"], s["paymentMethod"], s["currency"]): [
        s["collectedCount"], s["collected"], s["fees"], s["refundedCount"], s["refunded"]]
        for s in report["settled"]} == dict(lines)
    for s in report["settled"]:
        assert s["net"] == s["collected"] - s["fees"] - s["refunded"]
    for r in paid + back:
        assert r["completedLocalDate"].startswith("2026-10-"), r

    # Every amount is an integer (RWF has no minor unit): in the JSON as numbers, in the CSV as digits.
    for s in report["settled"] + report["totals"]:
        assert all(isinstance(s[k], int) for k in ("collected", "fees", "refunded", "net"))


async def test_later_activity_changes_the_month_only_as_its_later_lists_say(admin: Any, rt: Any,
                                                                            demo: dict[str, Any]) -> None:
    made = await _october(admin, rt, demo)
    closed = await admin.json("GET", f"/v1/reports/reconciliation?{OCTOBER}", 200)
    # In November: the partly refunded payment is refunded the rest, a new dispute on it opens.
    await _refund(admin, rt, made["part"]["id"], 40000, completed="2026-11-05T09:00:00")
    await admin.json("POST", "/v1/disputes", 201, json={"paymentId": made["full"]["id"], "reason": "OTHER"})
    later = await admin.json("GET", f"/v1/reports/reconciliation?{OCTOBER}", 200)
    assert later["settled"] == closed["settled"]
    for key in ("refundsRecordedLater", "paymentsRecordedLater", "paymentsVoidedLater"):
        # Each names a payment with its status now (the partly refunded one is REFUNDED since): the rest stays.
        assert [{**x, "status": None} for x in later[key]] == [{**x, "status": None} for x in closed[key]], key
    def but_refunded(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{**x, "refundedAmount": None} for x in lines]

    assert {k: but_refunded(v) for k, v in later["payments"].items() if k != "byStatus"} == {
        k: but_refunded(v) for k, v in closed["payments"].items() if k != "byStatus"}
    # Documented: `totals.refunded` is what has been refunded of the month's payments so far, and each line's
    # `refundedAmount` too (the rent's line and MTN's grow by the rest paid back in November).
    assert later["totals"][0]["refunded"] == closed["totals"][0]["refunded"] + 40000
    for section, key, grown in (("byPaymentType", "name", "Monthly Rent"), ("byMethod", "paymentMethod",
                                                                            "MOBILE_MONEY_MTN")):
        before = {x[key]: x["refundedAmount"] for x in closed["payments"][section]}
        assert {x[key]: x["refundedAmount"] for x in later["payments"][section]} == {
            **before, grown: before[grown] + 40000}, section
    # Recorded today and dated into October: named (this test's provider completions are recorded today too, so
    # every October collection is), the voided one with what it counted until its void, which is named too.
    named = {p["id"]: p for p in closed["paymentsRecordedLater"]}
    assert (named[made["recorded"]["id"]]["collected"], named[made["voided"]["id"]]["collected"]) == (50000, 50000)
    assert named[made["voided"]["id"]]["status"] == "VOIDED"
    assert [p["id"] for p in closed["paymentsVoidedLater"]] == [made["voided"]["id"]]
    assert closed["paymentsVoidedLater"][0]["collected"] == 50000
    assert {r["paymentId"] for r in closed["refundsRecordedLater"]} >= {made["disputed"]["id"]}


async def test_a_super_admins_month_without_a_cooperative_is_utc_days(superadmin: Any, admin: Any, rt: Any,
                                                                       demo: dict[str, Any]) -> None:
    made = await _october(admin, rt, demo)
    utc = await _rows(superadmin, f"/v1/reports/payments.csv?{OCTOBER}")
    # UTC days: the payment made at 23:30Z on the 31st is October's, and the one at 00:00:30 Kigali time on
    # 1 October (22:00:30Z on 30 September) is not.
    ids = {r["id"] for r in utc}
    assert made["utc_edge"]["id"] in ids and made["first_minute"]["id"] not in ids
    coop = demo.get("cooperative_id") or made["full"]["cooperativeId"]
    local = await _rows(superadmin, f"/v1/reports/payments.csv?{OCTOBER}&cooperativeId={coop}")
    ids = {r["id"] for r in local}
    assert made["utc_edge"]["id"] not in ids and made["first_minute"]["id"] in ids
    assert {r["createdLocalDate"] for r in local} <= {f"2026-10-{d:02d}" for d in range(1, 32)}
