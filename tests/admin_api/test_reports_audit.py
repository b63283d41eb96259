"""Reconciliation numbers, streamed CSV exports and the audit log, each scoped to the caller."""

from __future__ import annotations

import csv
import io

import pytest
from sqlalchemy import update

from core.models import Payment
from tests.admin_api.conftest import complete_payment, idem, make_payment


async def _scenario(admin, rt, demo):
    rent, water = demo["payment_types"]["Monthly Rent"], demo["payment_types"]["Water"]
    done = await make_payment(admin, rent)
    await complete_payment(rt, done["id"], fee=500)
    await make_payment(
        admin,
        water,
        amount=5000,
        paymentMethod="MOBILE_MONEY_AIRTEL",
        paymentAccount="+250733000001",
        description='=HYPERLINK("x")',
    )
    await admin.json(
        "POST", f"/v1/payments/{done['id']}/refunds", 201, json={"amount": 1000, "idempotencyKey": idem()}
    )
    await admin.json("POST", "/v1/disputes", 201, json={"paymentId": done["id"], "reason": "OTHER"})
    async with rt.sessionmaker.begin() as s:
        await s.execute(
            update(Payment)
            .where(Payment.id == done["id"])
            .values(mismatch=True, mismatch_detail="expected 50000, received 49000")
        )
    return done


async def test_reconciliation_summary(admin, rt, demo, coop_b):
    done = await _scenario(admin, rt, demo)
    await make_payment(coop_b["admin"], coop_b["payment_type_id"], amount=1000)
    r = await admin.json("GET", "/v1/reports/reconciliation", 200)
    by_status = {s["status"]: (s["count"], s["amount"]) for s in r["payments"]["byStatus"]}
    assert by_status == {"COMPLETED": (1, 50000), "PENDING": (1, 5000)}
    by_method = {m["paymentMethod"]: m for m in r["payments"]["byMethod"]}
    assert by_method["MOBILE_MONEY_MTN"]["completedAmount"] == 50000
    assert by_method["MOBILE_MONEY_AIRTEL"]["completedCount"] == 0
    by_type = {t["name"]: t for t in r["payments"]["byPaymentType"]}
    assert by_type["Monthly Rent"]["completedAmount"] == 50000 and by_type["Water"]["count"] == 1
    assert r["totals"] == [
        {"currency": "RWF", "collectedCount": 1, "collected": 50000, "fees": 500, "refunded": 0, "net": 49500}
    ]
    assert r["refunds"] == [{"status": "PENDING", "currency": "RWF", "count": 1, "amount": 1000}]
    assert r["openDisputes"] == 1
    assert [f["id"] for f in r["flagged"]] == [done["id"]] and r["flagged"][0]["mismatch"] is True
    empty = await admin.json("GET", "/v1/reports/reconciliation?from=2999-01-01T00:00:00Z", 200)
    assert empty["payments"]["byStatus"] == [] and empty["period"]["from"] == "2999-01-01T00:00:00Z"
    bad = await admin.json(
        "GET", "/v1/reports/reconciliation?from=2025-02-01T00:00:00Z&to=2025-01-01T00:00:00Z", 400
    )
    assert bad["message"] == ["from must be before to"]
    b = await coop_b["admin"].json("GET", "/v1/reports/reconciliation", 200)
    assert [s["count"] for s in b["payments"]["byStatus"]] == [1] and b["openDisputes"] == 0


async def test_payments_csv_is_streamed_and_scoped(admin, rt, demo, coop_b):
    await _scenario(admin, rt, demo)
    await make_payment(coop_b["admin"], coop_b["payment_type_id"], amount=1000)
    resp = await admin.req("GET", "/v1/reports/payments.csv")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/csv")
    assert resp.headers.get("Transfer-Encoding") == "chunked"  # streamed, no Content-Length built up front
    assert "X-RateLimit-Limit" in resp.headers
    rows = list(csv.DictReader(io.StringIO(await resp.text())))
    assert len(rows) == 2
    assert {r["paymentType"] for r in rows} == {"Monthly Rent", "Water"}
    water = next(r for r in rows if r["paymentType"] == "Water")
    assert water["description"].startswith("'=")  # formula neutralised
    assert all("****" in r["paymentAccount"] for r in rows)
    only_done = await admin.req("GET", "/v1/reports/payments.csv?status=COMPLETED")
    assert len(list(csv.DictReader(io.StringIO(await only_done.text())))) == 1


async def test_csv_export_of_many_rows_arrives_complete(admin, rt, demo):
    from core.db import new_id, utcnow

    async with rt.sessionmaker.begin() as s:
        base = {
            "cooperative_id": demo["cooperative_id"],
            "payment_type_id": demo["payment_types"]["Water"],
            "amount_minor": 5000,
            "currency": "RWF",
            "status": "PENDING",
            "method": "MOBILE_MONEY_MTN",
            "provider": "mtn_momo",
            "payment_account_enc": "x",
            "payment_account_index": "x",
            "payment_account_masked": "+25078****001",
            "request_hash": "h",
            "channel": "api",
            "expires_at": utcnow(),
        }
        s.add_all(
            [
                Payment(
                    id=new_id(),
                    reference=f"PAY_T_{i:05d}",
                    provider_reference=new_id(),
                    idempotency_key=f"bulk-{i:05d}",
                    **base,
                )
                for i in range(1234)
            ]
        )
    resp = await admin.req("GET", "/v1/reports/payments.csv")
    lines = (await resp.text()).strip().splitlines()
    assert len(lines) == 1235


async def test_refunds_csv(admin, rt, demo, coop_b):
    await _scenario(admin, rt, demo)
    resp = await admin.req("GET", "/v1/reports/refunds.csv")
    rows = list(csv.DictReader(io.StringIO(await resp.text())))
    assert len(rows) == 1 and rows[0]["amount"] == "1000" and rows[0]["paymentReference"].startswith("PAY_")
    # status= keeps the refunds in that status only.
    for status, expected in ((rows[0]["status"], [rows[0]["id"]]), ("FAILED" if rows[0]["status"] != "FAILED"
                                                                      else "COMPLETED", [])):
        resp = await admin.req("GET", f"/v1/reports/refunds.csv?status={status}")
        assert resp.status == 200
        assert [r["id"] for r in csv.DictReader(io.StringIO(await resp.text()))] == expected, status
    b = await coop_b["admin"].req("GET", "/v1/reports/refunds.csv")
    assert (await b.text()).strip().splitlines() == [
        "id,reference,paymentId,paymentReference,createdAt,completedAt,status,amount,currency,reason,"
        "failureReason,disputeId,provider,createdLocalDate,completedLocalDate,providerTransactionId,returnedByProvider,"
        "memberName,cooperativeShortCode"
    ]


async def test_audit_events_filtered_and_scoped(admin, rt, demo, coop_b):
    done = await _scenario(admin, rt, demo)
    events = await admin.json("GET", f"/v1/audit-events?entityType=payment&entityId={done['id']}", 200)
    actions = [e["action"] for e in events["data"]]
    assert actions == ["payment.completed", "payment.created"]  # newest first
    by_actor = await admin.json("GET", "/v1/audit-events?actor=provider:test", 200)
    assert by_actor["meta"]["total"] == 1
    future = await admin.json("GET", "/v1/audit-events?from=2999-01-01T00:00:00Z", 200)
    assert future["meta"]["total"] == 0
    b = await coop_b["admin"].json("GET", f"/v1/audit-events?entityId={done['id']}", 200)
    assert b["meta"]["total"] == 0
    await admin.json("GET", "/v1/audit-events?limit=500", 400)


async def test_a_period_given_as_dates_is_the_cooperatives_local_days(admin, rt, demo):
    """October in Kigali (UTC+2) is 30 September 22:00 UTC to 31 October 22:00 UTC, as the receipts date them:
    a payment at 00:30 on 1 November local time belongs to November, one at 00:30 on 1 October to October."""
    from datetime import UTC, datetime

    rent = demo["payment_types"]["Monthly Rent"]
    made = {}
    for label, at in (("oct-first", datetime(2025, 9, 30, 22, 30, tzinfo=UTC)),
                      ("oct-last", datetime(2025, 10, 31, 21, 59, tzinfo=UTC)),
                      ("nov-first", datetime(2025, 10, 31, 22, 30, tzinfo=UTC))):
        payment = await make_payment(admin, rent)
        made[payment["id"]] = label
        async with rt.sessionmaker.begin() as s:
            await s.execute(update(Payment).where(Payment.id == payment["id"]).values(created_at=at))

    async def labels(query: str) -> list[str]:
        resp = await admin.req("GET", f"/v1/reports/payments.csv?{query}")
        assert resp.status == 200, await resp.text()
        return sorted(made[r["id"]] for r in csv.DictReader(io.StringIO(await resp.text())))

    assert await labels("from=2025-10-01&to=2025-11-01") == ["oct-first", "oct-last"]
    assert await labels("from=2025-11-01&to=2025-12-01") == ["nov-first"]
    # A date-time without an offset stays UTC (as everywhere in the API); with one, as given.
    assert await labels("from=2025-10-01T00:00:00&to=2025-11-01T00:00:00") == ["nov-first", "oct-last"]
    assert await labels("from=2025-10-01T00:00:00%2B02:00&to=2025-11-01T00:00:00%2B02:00") == ["oct-first",
                                                                                                "oct-last"]
    summary = await admin.json("GET", "/v1/reports/reconciliation?from=2025-10-01&to=2025-11-01", 200)
    assert sum(row["count"] for row in summary["payments"]["byStatus"]) == 2


async def test_an_export_whose_query_fails_is_an_error_not_an_empty_file(admin, rt, demo, monkeypatch):
    """The status line goes out with the first rows: a database failing at once answers 503, not a 200 with
    a header line and nothing else (which reads as "no payments")."""
    from sqlalchemy.exc import DBAPIError
    from sqlalchemy.ext.asyncio import AsyncSession

    async def down(self, *args, **kwargs):
        raise DBAPIError("SELECT", None, ConnectionError("server closed the connection"))

    await _scenario(admin, rt, demo)
    monkeypatch.setattr(AsyncSession, "stream", down)
    resp = await admin.req("GET", "/v1/reports/payments.csv")
    assert resp.status == 503 and resp.content_type == "application/json", await resp.text()
    monkeypatch.undo()
    empty = await admin.req("GET", "/v1/reports/refunds.csv?status=FAILED")  # no rows: the header alone
    assert empty.status == 200 and (await empty.text()).strip().startswith("id,")


@pytest.mark.parametrize(("value", "exported"), [
    ('=HYPERLINK("x")', '\'=HYPERLINK("x")'),
    ("\n=1+1", "'\n=1+1"),  # a line break first: some spreadsheets trim it
    (" @SUM(A1)", "' @SUM(A1)"),
    ("\uff1d1+1", "'\uff1d1+1"),  # full-width equals sign
    ("\u00a0=1+1", "'\u00a0=1+1"),  # a no-break space first
    ("\u200b=1+1", "'\u200b=1+1"),  # a zero-width space: nothing shows before the '='
    ("\ufeff\u3000@SUM(A1)", "'\ufeff\u3000@SUM(A1)"),  # a byte-order mark, an ideographic space
    ("\u00a0Rent", "\u00a0Rent"),  # blanks before plain text change nothing
    ("|cmd /c calc", "'|cmd /c calc"),
    ("+25078****001", "+25078****001"),  # a masked phone: nothing to run, left as scripts expect it
    ("-5.00", "-5.00"),
    ("Monthly Rent - Building A", "Monthly Rent - Building A"),
])
def test_csv_cells_that_a_spreadsheet_could_run_are_quoted(value, exported):
    from core.reports import _cell

    assert _cell(value) == exported


async def test_an_export_carries_the_request_id_as_every_answer_does(admin, rt, demo):
    """A streamed export sends its headers itself, before the middleware that names the request saw the answer:
    it went without X-Request-Id, the one answer most likely to be cut short and asked about."""
    resp = await admin.req("GET", "/v1/reports/payments.csv", headers={"X-Request-Id": "desk-ticket-0042"})
    assert resp.status == 200 and resp.content_type == "text/csv"
    await resp.read()
    assert resp.headers["X-Request-Id"] == "desk-ticket-0042"
    resp = await admin.req("GET", "/v1/reports/refunds.csv")
    await resp.read()
    assert resp.status == 200 and len(resp.headers["X-Request-Id"]) == 32
    listed = await admin.req("GET", "/v1/payments", headers={"X-Request-Id": "desk-ticket-0043"})
    assert listed.status == 200 and listed.headers.getall("X-Request-Id") == ["desk-ticket-0043"]
