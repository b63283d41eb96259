"""A Kigali treasurer closing November 2026 (UTC+2) in December: payments at 23:30 on the 30th and 00:30 on the 1st
fall on either side of the month in the list, the reconciliation and the export; refunds and a dispute made in
December on November's payments; a failed and a pending payment at month-end; an export of one payment type or one
member that adds up to the report's line for it; and the interactive document saying what each export column is."""

from __future__ import annotations

import csv
import io
from typing import Any

from core import auth
from core.ports import ProviderOutcome
from tests.admin_api.conftest import bearer, complete_payment, idem, make_payment
from tests.admin_api.test_reports_recorded_later import _provider_says
from tests.admin_api.test_reports_settled import _dated, _refund

NOVEMBER = "from=2026-11-01&to=2026-12-01"  # Kigali days: 2026-10-31T22:00Z to 2026-11-30T22:00Z
DECEMBER = "from=2026-12-01&to=2027-01-01"


async def _rows(caller: Any, path: str) -> tuple[list[str], list[dict[str, str]]]:
    resp = await caller.req("GET", path)
    assert resp.status == 200, await resp.text()
    reader = csv.DictReader(io.StringIO((await resp.read()).decode()))
    rows = list(reader)
    return list(reader.fieldnames or []), rows


async def _november(admin: Any, rt: Any, demo: dict[str, Any]) -> dict[str, dict[str, Any]]:
    rent, water = demo["payment_types"]["Monthly Rent"], demo["payment_types"]["Water"]
    made: dict[str, dict[str, Any]] = {}
    # 23:30 on 30 November in Kigali (21:30Z): November's. 00:30 on 1 December (22:30Z on the 30th): December's.
    for name, at in (("last", "2026-11-30T21:30:00"), ("first", "2026-11-30T22:30:00"),
                     ("mid", "2026-11-15T08:00:00")):
        made[name] = await make_payment(admin, rent)
        await complete_payment(rt, made[name]["id"])
        await _dated(rt, made[name]["id"], at, at.replace(":00:00", ":01:00").replace(":30:00", ":31:00"))
    # Aline's water: failed at 23:00 on the 30th; Airtel, still waiting for its PIN at 23:50.
    made["failed"] = await make_payment(admin, water, amount=5000)
    await _provider_says(rt, made["failed"]["id"], ProviderOutcome.FAILED, provider="mtn_momo")
    await _dated(rt, made["failed"]["id"], "2026-11-30T21:00:00", None)
    made["pending"] = await make_payment(admin, water, amount=5000, paymentMethod="MOBILE_MONEY_AIRTEL",
                                         paymentAccount="+250733000001")
    await _dated(rt, made["pending"]["id"], "2026-11-30T21:50:00", None)
    # In December: part of two November payments paid back, and a dispute on one of them.
    await _refund(admin, rt, made["mid"]["id"], 10000, completed="2026-12-02T09:00:00")
    await _refund(admin, rt, made["last"]["id"], 5000, completed="2026-12-03T09:00:00")
    await admin.json("POST", "/v1/disputes", 201, json={"paymentId": made["mid"]["id"], "reason": "OTHER"})
    return made


async def test_novembers_edges_refunds_and_dispute_in_the_list_report_and_export(admin: Any, rt: Any,
                                                                                 demo: dict[str, Any]) -> None:
    made = await _november(admin, rt, demo)
    names = {p["id"]: name for name, p in made.items()}
    _, asked = await _rows(admin, f"/v1/reports/payments.csv?{NOVEMBER}")
    assert sorted(names[r["id"]] for r in asked) == ["failed", "last", "mid", "pending"]
    listed = (await admin.json("GET", f"/v1/payments?{NOVEMBER}&limit=100", 200))["data"]
    assert {p["id"] for p in listed} == {r["id"] for r in asked}
    _, december = await _rows(admin, f"/v1/reports/payments.csv?{DECEMBER}")
    assert [(names[r["id"]], r["createdAt"], r["createdLocalDate"]) for r in december] == [
        ("first", "2026-11-30T22:30:00Z", "2026-12-01")]
    # A date-time with Kigali's offset: `to` exclusive, so 00:30 on the 1st is not in it.
    edge = await admin.json("GET", "/v1/payments?from=2026-11-30T23:30:00%2B02:00&to=2026-12-01T00:30:00%2B02:00",
                            200)
    assert sorted(names[p["id"]] for p in edge["data"]) == ["last", "pending"]

    report = await admin.json("GET", f"/v1/reports/reconciliation?{NOVEMBER}", 200)
    assert report["totals"] == [{"currency": "RWF", "collectedCount": 2, "collected": 100000, "fees": 0,
                                 "refunded": 15000, "net": 85000}]
    assert sum(int(r["collectedAmount"]) - int(r["refundedAmount"]) for r in asked) == 85000
    assert {(x["status"], x["count"], x["amount"]) for x in report["payments"]["byStatus"]} == {
        ("PARTIALLY_REFUNDED", 2, 100000), ("FAILED", 1, 5000), ("PENDING", 1, 5000)}
    # The refunds and the dispute were asked for in December: December's, not November's.
    assert report["refunds"] == [] and report["disputesOpened"] == 0 and report["disputesOpenAtEnd"] == 0
    later = await admin.json("GET", f"/v1/reports/reconciliation?{DECEMBER}", 200)
    assert later["refunds"] == [{"status": "COMPLETED", "currency": "RWF", "count": 2, "amount": 15000}]
    assert later["disputesOpened"] == 1
    assert [(s["collected"], s["refunded"], s["net"]) for s in later["settled"]] == [(50000, 15000, 35000)]


async def test_a_months_export_of_one_payment_type_or_one_member_adds_up_to_its_report_line(
        admin: Any, rt: Any, demo: dict[str, Any]) -> None:
    made = await _november(admin, rt, demo)
    report = await admin.json("GET", f"/v1/reports/reconciliation?{NOVEMBER}", 200)
    for line in report["payments"]["byPaymentType"]:
        _, rows = await _rows(admin, f"/v1/reports/payments.csv?{NOVEMBER}&paymentTypeId={line['paymentTypeId']}")
        assert {r["paymentTypeId"] for r in rows} == {line["paymentTypeId"]}
        assert (len(rows), sum(int(r["amount"]) for r in rows), sum(int(r["collectedAmount"]) for r in rows),
                sum(int(r["refundedAmount"]) for r in rows)) == (
            line["count"], line["amount"], line["completedAmount"], line["refundedAmount"])
    # Per payment type and per method: collected, refunded so far, and so the net, adding up to the month's totals.
    [totals] = report["totals"]
    for section in ("byPaymentType", "byMethod"):
        lines = report["payments"][section]
        assert (sum(x["completedAmount"] for x in lines), sum(x["refundedAmount"] for x in lines)) == (
            totals["collected"], totals["refunded"]) == (100000, 15000), section
    _, asked = await _rows(admin, f"/v1/reports/payments.csv?{NOVEMBER}")
    for line in report["payments"]["byMethod"]:
        assert line["refundedAmount"] == sum(
            int(r["refundedAmount"]) for r in asked if r["paymentMethod"] == line["paymentMethod"])
    # Aline's November (the demo's +250788000001 paid every one but the Airtel one): as the list filters her.
    aline = demo["members"]["+250788000001"]
    _, hers = await _rows(admin, f"/v1/reports/payments.csv?{NOVEMBER}&member={aline}")
    listed = (await admin.json("GET", f"/v1/payments?{NOVEMBER}&member={aline}&limit=100", 200))["data"]
    assert {r["id"] for r in hers} == {p["id"] for p in listed} == {
        made[n]["id"] for n in ("last", "mid", "failed")}
    _, paid = await _rows(admin, f"/v1/reports/payments.csv?{NOVEMBER}&member={aline}&basis=completed")
    assert {r["id"] for r in paid} == {made[n]["id"] for n in ("last", "mid")}
    # A paymentTypeId that is no id is refused, as the list refuses it.
    resp = await admin.req("GET", f"/v1/reports/payments.csv?{NOVEMBER}&paymentTypeId=not-an-id")
    assert resp.status == 400


async def test_the_document_names_every_export_column_and_its_time_zone(admin: Any, client: Any,
                                                                        demo: dict[str, Any]) -> None:
    doc = await (await client.get("/v1/openapi.json")).json()
    for name in ("payments", "refunds"):
        header, _ = await _rows(admin, f"/v1/reports/{name}.csv?{NOVEMBER}")
        described = doc["paths"][f"/v1/reports/{name}.csv"]["get"]["description"]
        assert [c for c in header if f"`{c}`" not in described] == [], name
        assert "UTC" in described and "time zone" in described


async def test_paging_a_month_while_payments_arrive_lists_each_once(admin: Any, rt: Any, demo: dict[str, Any]) -> None:
    rent = demo["payment_types"]["Monthly Rent"]
    made = await _november(admin, rt, demo)
    # November, read in December: payments made meanwhile are December's, and the pages hold every one once.
    seen: list[str] = []
    for page in (1, 2):
        body = await admin.json("GET", f"/v1/payments?{NOVEMBER}&limit=2&page={page}", 200)
        seen += [p["id"] for p in body["data"]]
        await make_payment(admin, rent, paymentAccount=f"+25078800011{page}")
    assert (await admin.json("GET", f"/v1/payments?{NOVEMBER}&limit=2&page=3", 200))["data"] == []
    assert sorted(seen) == sorted(made[n]["id"] for n in ("last", "mid", "failed", "pending"))
    # December, still open: a `to` fixed when the first page was read (as the list's document says) keeps
    # the payments made since off the later pages, so none is listed twice.
    for n, at in enumerate(("2026-12-01T08:00:00", "2026-12-02T08:00:00")):
        p = await make_payment(admin, rent, paymentAccount=f"+25078800012{n}")
        await _dated(rt, p["id"], at, None)
    to = "2026-12-03T00:00:00Z"
    first = (await admin.json("GET", f"/v1/payments?from=2026-12-01&to={to}&limit=2&page=1", 200))["data"]
    await make_payment(admin, rent, paymentAccount="+250788000130")
    second = (await admin.json("GET", f"/v1/payments?from=2026-12-01&to={to}&limit=2&page=2", 200))["data"]
    ids = [p["id"] for p in first + second]
    assert len(ids) == len(set(ids)) == 3  # made["first"] and the two above
    doc = (await admin.json("GET", "/v1/openapi.json", 200))["paths"]["/v1/payments"]["get"]["description"]
    assert "newest first" in doc and "`to`" in doc


async def test_a_nairobi_november_in_shillings(superadmin: Any, rt: Any, client: Any) -> None:
    coop = await superadmin.json("POST", "/v1/cooperatives", 201, json={
        "name": "Umoja SACCO", "shortCode": "UMJ", "country": "KE"})
    ptype = await superadmin.json("POST", "/v1/payment-types", 201, json={
        "name": "Ada ya mwezi", "amount": "1500.00", "cooperativeId": coop["id"]})
    async with rt.sessionmaker.begin() as s:
        await auth.create_user(s, username="admin@umj.test", password="umoja-admin-pw", role="COOP_ADMIN",
                               cooperative_id=coop["id"])
    ke = await bearer(client, "admin@umj.test", "umoja-admin-pw")
    made: dict[str, dict[str, Any]] = {}
    # 23:30 on 30 November in Nairobi (20:30Z): November's; 00:30 on 1 December (21:30Z on the 30th): December's.
    for name, account, at in (("last", "0712345678", "2026-11-30T20:30:00"),
                              ("first", "0712345679", "2026-11-30T21:30:00")):
        made[name] = await ke.json("POST", "/v1/payments", 201, json={
            "paymentTypeId": ptype["id"], "amount": "1500.00", "paymentMethod": "MPESA", "paymentAccount": account,
            "idempotencyKey": idem()})
        await complete_payment(rt, made[name]["id"])
        await _dated(rt, made[name]["id"], at, at.replace(":30:00", ":31:00"))
    await ke.json("POST", f"/v1/payments/{made['last']['id']}/refunds", 201, json={
        "amount": "100.00", "idempotencyKey": idem(),  # M-Pesa moves whole shillings only
        "returnedByProvider": {"providerTransactionId": "SKE-REV-2", "completedAt": "2026-12-02T10:00:00Z"}})
    report = await ke.json("GET", f"/v1/reports/reconciliation?{NOVEMBER}", 200)
    assert report["period"] == {"from": "2026-10-31T21:00:00Z", "to": "2026-11-30T21:00:00Z"}
    assert [(t["collected"], t["refunded"], t["net"]) for t in report["totals"]] == [("1500.00", "100.00", "1400.00")]
    [line] = report["payments"]["byPaymentType"]
    assert (line["completedAmount"], line["refundedAmount"]) == ("1500.00", "100.00")
    _, rows = await _rows(ke, f"/v1/reports/payments.csv?{NOVEMBER}&paymentTypeId={ptype['id']}")
    assert [(r["id"], r["createdAt"], r["createdLocalDate"], r["amount"], r["refundedAmount"], r["currency"])
            for r in rows] == [(made["last"]["id"], "2026-11-30T20:30:00Z", "2026-11-30", "1500.00", "100.00", "KES")]
    _, december = await _rows(ke, f"/v1/reports/payments.csv?{DECEMBER}")
    assert [(r["id"], r["createdLocalDate"]) for r in december] == [(made["first"]["id"], "2026-12-01")]
