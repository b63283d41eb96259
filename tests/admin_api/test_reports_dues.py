"""The treasurer's "who has not paid November's rent yet?": GET /v1/reports/dues (and dues.csv) lists each active
member's money of one period of a recurring type, counted as the reminders, the USSD and the BALANCE SMS count it
(core.reminders): paid in full, partly, awaiting her PIN, not at all, paid in two payments, or paid and refunded."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from core.audit import Actor
from core.cooperatives import zone_of
from core.db import utcnow
from core.models import Member, Payment, PaymentType, Refund
from core.money import Money
from core.payments import open_window
from core.ports import ProviderOutcome
from core.provider_events import apply_collection_outcome
from core.refunds import apply_refund_outcome
from tests.admin_api.conftest import Caller, complete_payment, idem, make_payment
from tests.conftest import make_settings

PROVIDER = Actor("provider:t", "provider")
NOVEMBER = "2026-11-01"
LONG_AGO = datetime(2026, 1, 5, tzinfo=UTC)
AIRTEL = "MOBILE_MONEY_AIRTEL"


@pytest.fixture
def settings(migrated_database):
    # A month of a cooperative's payments, more than one admin may create in a minute: the limiter is not under test.
    return make_settings(RATE_LIMIT_MULTIPLIER="100")


async def _registered(rt: Any, cooperative_id: str, when: datetime = LONG_AGO) -> None:
    """The cooperative's types and members as made long before November (rows are stamped when the test makes
    them: a monthly type's due dates start in the month it was made, and a member registered in December was
    never asked for November)."""
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(PaymentType).where(PaymentType.cooperative_id == cooperative_id)
                        .values(created_at=when))
        await s.execute(update(Member).where(Member.cooperative_id == cooperative_id).values(created_at=when))


async def _pay(admin: Any, rt: Any, type_id: str, account: str, *, method: str = "MOBILE_MONEY_MTN",
               due: str | None = NOVEMBER, taken: int | None = None, amount: int = 50000) -> dict[str, Any]:
    """A payment of the member whose number is `account`, naming the due date `due`, completed by the provider
    (having taken `taken` of it: a mismatch), or left PENDING (`taken` 0: her PIN still awaited)."""
    extra = {"dueDate": due} if due else {}
    made = await make_payment(admin, type_id, amount=amount, paymentAccount=account, paymentMethod=method, **extra)
    if taken == 0:
        return made
    if taken is None:
        await complete_payment(rt, made["id"])
    else:
        async with rt.sessionmaker.begin() as s:
            await apply_collection_outcome(s, rt, await s.get(Payment, made["id"]), ProviderOutcome.SUCCEEDED,
                                           actor=PROVIDER, amount=Money(taken, "RWF"),
                                           provider_transaction_id=f"MTN-{made['id'][:8]}")
    return made


async def _refund(admin: Any, rt: Any, payment_id: str, amount: int) -> None:
    refund = await admin.json("POST", f"/v1/payments/{payment_id}/refunds", 201,
                              json={"amount": amount, "idempotencyKey": idem()})
    async with rt.sessionmaker.begin() as s:
        await apply_refund_outcome(s, rt, await s.get(Refund, refund["id"]), ProviderOutcome.SUCCEEDED,
                                   actor=PROVIDER)


async def _november(admin: Any, rt: Any, demo: dict[str, Any]) -> dict[str, str]:
    """Monthly Rent (50,000 RWF, due the 1st) for November, member by member; returns their ids by name."""
    rent, water, m = demo["payment_types"]["Monthly Rent"], demo["payment_types"]["Water"], demo["members"]
    refunded = await admin.json("POST", "/v1/members", 201, json={"name": "Fidele Refunded", "phone": "+250788000111",
                                                                  "unit": "0012"})
    suspended = await admin.json("POST", "/v1/members", 201, json={"name": "Suzan Suspended",
                                                                   "phone": "+250788000112"})
    await _registered(rt, demo["cooperative_id"])
    late = await admin.json("POST", "/v1/members", 201, json={"name": "Lea Late", "phone": "+250788000113"})
    late_payer = await admin.json("POST", "/v1/members", 201, json={"name": "Paul Late", "phone": "+250788000114"})

    await _pay(admin, rt, rent, "+250788000001")  # Aline: paid in full
    await _pay(admin, rt, rent, "+250788000002", taken=30000)  # Jean: the provider took 30,000 of 50,000
    # ... and she paid rent now (December or later) naming no due date, as the USSD pays: a later period's, not
    # November's.
    await _pay(admin, rt, rent, "+250788000002", due=None)
    await _pay(admin, rt, rent, "+250733000001", method=AIRTEL, taken=0)  # Claudine: her PIN awaited
    # Eric: October's rent and November's water, nothing of November's rent.
    await _pay(admin, rt, rent, "+250733000002", method=AIRTEL, due="2026-10-01")
    await _pay(admin, rt, water, "+250733000002", method=AIRTEL, amount=5000, due="2026-11-10")  # due the 10th
    # Grace: two payments, 30,000 taken of one, 50,000 of the other of which 30,000 went back: 50,000 kept.
    await _pay(admin, rt, rent, "+250788000003", taken=30000)
    second = await _pay(admin, rt, rent, "+250788000003")
    await _refund(admin, rt, second["id"], 30000)
    # Fidele: paid, then all of it refunded (REFUNDED: nothing kept).
    back = await _pay(admin, rt, rent, "+250788000111")
    await _refund(admin, rt, back["id"], 50000)
    # Suzan paid, then was suspended: not listed. Lea registered in December owes nothing of November; Paul,
    # registered in December too, paid it: listed.
    await _pay(admin, rt, rent, "+250788000112")
    await admin.json("DELETE", f"/v1/members/{suspended['id']}", 200)
    await _pay(admin, rt, rent, "+250788000114")
    return {"Aline": m["+250788000001"], "Jean": m["+250788000002"], "Claudine": m["+250733000001"],
            "Eric": m["+250733000002"], "Grace": m["+250788000003"], "Fidele": refunded["id"],
            "Suzan": suspended["id"], "Lea": late["id"], "Paul": late_payer["id"]}


def _short(line: dict[str, Any]) -> tuple[Any, ...]:
    return (line["name"], line["status"], line["amountDue"], line["amountPaid"], line["amountAwaitingApproval"],
            line["amountOutstanding"])


async def test_who_has_not_paid_novembers_rent(admin, rt, demo, coop_b):
    ids = await _november(admin, rt, demo)
    rent = demo["payment_types"]["Monthly Rent"]
    # Another cooperative's member has paid its own recurring type for November: never in this report.
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(PaymentType).where(PaymentType.id == coop_b["payment_type_id"]).values(
            is_recurring=True, recurring_interval="MONTHLY", due_day=1))
    await _registered(rt, coop_b["cooperative_id"])

    report = await admin.json("GET", f"/v1/reports/dues?paymentTypeId={rent}&period={NOVEMBER}&limit=100", 200)
    assert [_short(line) for line in report["data"]] == [
        ("Aline Uwase", "PAID", 50000, 50000, 0, 0),
        ("Claudine Mukamana", "AWAITING_APPROVAL", 50000, 0, 50000, 50000),
        ("Eric Niyonzima", "UNPAID", 50000, 0, 0, 50000),
        ("Fidele Refunded", "UNPAID", 50000, 0, 0, 50000),
        ("Grace Ingabire", "PAID", 50000, 50000, 0, 0),
        ("Jean Bosco Habimana", "PARTIAL", 50000, 30000, 0, 20000),
        ("Paul Late", "PAID", 50000, 50000, 0, 0),
    ]
    assert {line["memberId"] for line in report["data"]} == set(ids.values()) - {ids["Suzan"], ids["Lea"]}
    assert coop_b["member_id"] not in {line["memberId"] for line in report["data"]}
    by_name = {line["name"]: line for line in report["data"]}
    assert by_name["Fidele Refunded"]["unit"] == "0012" and by_name["Aline Uwase"]["unit"] == "A-101"
    assert by_name["Aline Uwase"]["lastPaymentAt"] is not None and by_name["Eric Niyonzima"]["lastPaymentAt"] is None
    assert by_name["Fidele Refunded"]["lastPaymentAt"] is None  # a refunded payment paid nothing
    assert report["totals"] == {
        "members": 7, "currency": "RWF", "amountDue": 350000, "amountPaid": 180000, "amountAwaitingApproval": 50000,
        "amountOutstanding": 170000, "byStatus": {"PAID": 3, "AWAITING_APPROVAL": 1, "PARTIAL": 1, "UNPAID": 2}}
    assert report["period"] == {
        "dueDate": NOVEMBER, "previousDueDate": "2026-10-01", "timezone": "Africa/Kigali",
        "paidFrom": "2026-10-16T22:00:00Z", "paidUntil": "2026-11-15T22:00:00Z",
        "dueDayStart": "2026-10-31T22:00:00Z", "dueDayEnd": "2026-11-01T22:00:00Z"}
    assert report["paymentType"]["amount"] == 50000 and report["paymentType"]["id"] == rent

    # What the treasurer asked: who has not paid yet.
    unpaid = await admin.json("GET", f"/v1/reports/dues?paymentTypeId={rent}&period={NOVEMBER}&status=UNPAID", 200)
    assert [line["name"] for line in unpaid["data"]] == ["Eric Niyonzima", "Fidele Refunded"]
    assert unpaid["totals"]["members"] == 2 and unpaid["totals"]["amountOutstanding"] == 100000
    assert unpaid["meta"]["total"] == 2

    # Pages, as the other lists page; the totals are every page's.
    second = await admin.json("GET", f"/v1/reports/dues?paymentTypeId={rent}&period={NOVEMBER}&limit=3&page=2", 200)
    assert [line["name"] for line in second["data"]] == ["Fidele Refunded", "Grace Ingabire", "Jean Bosco Habimana"]
    assert second["meta"] == {"page": 2, "limit": 3, "total": 7, "totalPages": 3, "hasNext": True,
                              "hasPrevious": True}
    assert second["totals"] == report["totals"]

    # The other cooperative sees its own member only, and not this one's type.
    b_report = await coop_b["admin"].json(
        "GET", f"/v1/reports/dues?paymentTypeId={coop_b['payment_type_id']}&period={NOVEMBER}", 200)
    assert [line["memberId"] for line in b_report["data"]] == [coop_b["member_id"]]
    refused = await coop_b["admin"].json("GET", f"/v1/reports/dues?paymentTypeId={rent}&period={NOVEMBER}", 404)
    assert refused["field"] == "paymentTypeId"
    resp = await coop_b["admin"].req("GET", f"/v1/reports/dues.csv?paymentTypeId={rent}&period={NOVEMBER}")
    assert resp.status == 404


async def test_the_csv_has_the_lines_of_the_json(admin, superadmin, rt, demo):
    await _november(admin, rt, demo)
    rent = demo["payment_types"]["Monthly Rent"]
    query = f"paymentTypeId={rent}&period={NOVEMBER}"
    report = await admin.json("GET", f"/v1/reports/dues?{query}&limit=100", 200)
    resp = await admin.req("GET", f"/v1/reports/dues.csv?{query}")
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/csv")
    assert 'filename="dues-2026-11-01.csv"' in resp.headers["Content-Disposition"]
    rows = list(csv.DictReader(io.StringIO(await resp.text())))
    as_json = [{k: "" if v is None else str(v) for k, v in line.items()} | {"dueDate": NOVEMBER}
               for line in report["data"]]
    assert rows == as_json

    # The exports' options: a French Excel's file, a unit of digits kept as text.
    resp = await admin.req("GET", f"/v1/reports/dues.csv?{query}&excel=true&delimiter=semicolon&status=UNPAID")
    body = await resp.read()
    assert body.startswith(b"\xef\xbb\xbf")
    lines = body.decode("utf-8-sig").splitlines()
    assert lines[0].startswith("memberId;name;unit;status;currency;amountDue")
    assert [line.split(";")[1:3] for line in lines[1:]] == [["Eric Niyonzima", "B-202"],
                                                            ["Fidele Refunded", '"=""0012"""']]

    # A super admin reads any cooperative's, the same lines.
    as_super = await superadmin.json("GET", f"/v1/reports/dues?{query}&limit=100", 200)
    assert as_super["data"] == report["data"]


async def test_the_csv_is_read_in_batches_without_losing_a_line(admin, rt, demo, monkeypatch):
    from core import reports

    await _november(admin, rt, demo)
    monkeypatch.setattr(reports, "CHUNK_ROWS", 2)
    rent = demo["payment_types"]["Monthly Rent"]
    resp = await admin.req("GET", f"/v1/reports/dues.csv?paymentTypeId={rent}&period={NOVEMBER}")
    names = [row["name"] for row in csv.DictReader(io.StringIO(await resp.text()))]
    assert names == ["Aline Uwase", "Claudine Mukamana", "Eric Niyonzima", "Fidele Refunded", "Grace Ingabire",
                     "Jean Bosco Habimana", "Paul Late"]


async def test_what_cannot_be_reported_is_refused(admin, tenant, rt, demo):
    rent = demo["payment_types"]["Monthly Rent"]
    await _registered(rt, demo["cooperative_id"])
    one_off = await admin.json("POST", "/v1/payment-types", 201, json={"name": "Joining fee", "amount": 10000})
    free = await admin.json("POST", "/v1/payment-types", 201, json={
        "name": "Savings", "amount": 1000, "allowCustomAmount": True, "isRecurring": True,
        "recurringInterval": "MONTHLY", "dueDay": 5})

    refused = await admin.json("GET", f"/v1/reports/dues?paymentTypeId={one_off['id']}", 400)
    assert refused["field"] == "paymentTypeId" and "not recurring" in refused["message"][0]
    refused = await admin.json("GET", f"/v1/reports/dues?paymentTypeId={free['id']}", 400)
    assert refused["field"] == "paymentTypeId" and "amount the member chooses" in refused["message"][0]
    refused = await admin.json("GET", f"/v1/reports/dues?paymentTypeId={rent}&period=2026-11-15", 400)
    assert refused["field"] == "period"
    assert refused["message"][0] == "period must be a due date of 'Monthly Rent': 2026-11-01 or 2026-12-01"
    # Before the type's first period (made on 5 January 2026, due the 1st: February's is its first, January's had
    # fallen due before it was made), the message names that period only: 1 December 2025 and 1 January 2026,
    # before it, are refused too.
    for before in ("2025-12-20", "2025-12-01", "2026-01-01", "2026-01-20"):
        refused = await admin.json("GET", f"/v1/reports/dues?paymentTypeId={rent}&period={before}", 400)
        assert refused["message"][0] == "period must be a due date of 'Monthly Rent': 2026-02-01"
    refused = await admin.json("GET", f"/v1/reports/dues?paymentTypeId={rent}&period=2026-11-31", 400)
    assert "period must be a date (YYYY-MM-DD)" in refused["message"][0]
    # A period at the calendar's end (its next due date would be in year 10000): refused, not a 500.
    for far in ("9999-12-01", "9999-12-31"):
        refused = await admin.json("GET", f"/v1/reports/dues?paymentTypeId={rent}&period={far}", 400)
        assert refused["field"] == "period"
    refused = await admin.json("GET", "/v1/reports/dues", 400)
    assert "query parameter paymentTypeId is required" in refused["message"][0]
    resp = await admin.req("GET", f"/v1/reports/dues.csv?paymentTypeId={rent}&period=2026-11-15")
    assert resp.status == 400
    # A member (tenant) reads her own payments, not her neighbours' dues.
    await tenant.json("GET", f"/v1/reports/dues?paymentTypeId={rent}&period={NOVEMBER}", 403)


async def test_the_period_before_the_calendars_last_due_date_is_refused_not_a_500(admin, rt, demo):
    """A type due the 31st: its due date of November 9999 is one, but the period after it, due 31 December 9999,
    ends on a day in year 10000. Refused naming `period`, as a period whose next due date is in year 10000 is."""
    await _registered(rt, demo["cooperative_id"])
    monthly = await admin.json("POST", "/v1/payment-types", 201, json={
        "name": "Levy", "amount": 1000, "isRecurring": True, "recurringInterval": "MONTHLY", "dueDay": 31})
    yearly = await admin.json("POST", "/v1/payment-types", 201, json={
        "name": "Annual", "amount": 1000, "isRecurring": True, "recurringInterval": "YEARLY", "dueDay": 31})
    for type_id, far in ((monthly["id"], "9999-11-30"), (yearly["id"], "9998-12-31")):
        for path in ("/v1/reports/dues", "/v1/reports/dues.csv"):
            refused = await admin.json("GET", f"{path}?paymentTypeId={type_id}&period={far}", 400)
            assert refused["field"] == "period" and "before the last of year 9999" in refused["message"][0]
    # The period before it still reads.
    report = await admin.json("GET", f"/v1/reports/dues?paymentTypeId={monthly['id']}&period=9999-10-31", 200)
    assert report["period"]["dueDate"] == "9999-10-31"


async def test_the_default_period_is_the_one_a_payment_made_now_pays(admin, rt, demo):
    """As the USSD and the BALANCE SMS read it (core.reminders.owed_now): a payment made now naming no due date pays
    it, and the member's line says what owed_now says."""
    from core.reminders import owed_now

    rent = demo["payment_types"]["Monthly Rent"]
    await _registered(rt, demo["cooperative_id"])
    await _pay(admin, rt, rent, "+250788000002", due=None, taken=20000)
    report = await admin.json("GET", f"/v1/reports/dues?paymentTypeId={rent}&limit=100", 200)
    async with rt.sessionmaker() as s:
        ptype = await s.get(PaymentType, rent)
        due, left = await owed_now(s, demo["members"]["+250788000002"], ptype, "Africa/Kigali")
    assert report["period"]["dueDate"] == due.isoformat()
    assert due >= utcnow().astimezone(zone_of("Africa/Kigali")).date().replace(day=1)
    jean = next(line for line in report["data"] if line["name"] == "Jean Bosco Habimana")
    assert (jean["status"], jean["amountPaid"], jean["amountOutstanding"]) == ("PARTIAL", 20000, left) == (
        "PARTIAL", 20000, 30000)
    assert len(report["data"]) == 5  # every demo member, none paid but Jean


async def test_a_member_renamed_during_the_download_is_in_the_csv_once(admin, rt, demo, monkeypatch):
    """The file is read in batches: a member renamed between two of them (Aline, already sent, now sorts last; Paul,
    not sent yet, now sorts first) is still in it exactly once, not repeated or skipped."""
    from core import reports

    ids = await _november(admin, rt, demo)
    monkeypatch.setattr(reports, "CHUNK_ROWS", 2)
    rent = demo["payment_types"]["Monthly Rent"]
    async with rt.sessionmaker() as s:
        ptype = await s.get(PaymentType, rent)
    dues = reports.dues_of(ptype, "Africa/Kigali", datetime(2026, 11, 1).date(), utcnow(),
                           grace=open_window(rt.settings)[1])
    chunks = reports.dues_csv(rt.sessionmaker, dues)
    body = [await anext(chunks)]
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Member).where(Member.id == ids["Aline"]).values(name="Zaina Uwase"))
        await s.execute(update(Member).where(Member.id == ids["Paul"]).values(name="Aaron Late"))
    body += [chunk async for chunk in chunks]
    rows = list(csv.DictReader(io.StringIO(b"".join(body).decode())))
    assert sorted(row["memberId"] for row in rows) == sorted(set(ids.values()) - {ids["Suzan"], ids["Lea"]})
    # In the order of the names when the download began; each line as its batch read it.
    assert [row["name"] for row in rows] == ["Aline Uwase", "Claudine Mukamana", "Eric Niyonzima", "Fidele Refunded",
                                             "Grace Ingabire", "Jean Bosco Habimana", "Aaron Late"]


async def _paid_lines(admin: Any, type_id: str, period: str) -> set[str]:
    report = await admin.json("GET", f"/v1/reports/dues?paymentTypeId={type_id}&period={period}&limit=100", 200)
    return {line["name"] for line in report["data"] if line["status"] == "PAID"}


async def test_a_payment_at_a_periods_bound_pays_one_period_the_one_the_ussd_asked_for(admin, rt, demo):
    """Undated payments (the USSD's) made exactly at November's bounds (paidFrom, paidUntil) and a microsecond after:
    each is in one period's dues only, the period current_period gave a payment made at that instant."""
    from core.reminders import current_period

    rent, m = demo["payment_types"]["Monthly Rent"], demo["members"]
    await _registered(rt, demo["cooperative_id"])
    since, until = datetime(2026, 10, 16, 22, tzinfo=UTC), datetime(2026, 11, 15, 22, tzinfo=UTC)
    tick = timedelta(microseconds=1)
    made = {"+250788000001": since, "+250788000002": since + tick, "+250733000001": until,
            "+250733000002": until + tick}
    async with rt.sessionmaker() as s:
        ptype = await s.get(PaymentType, rent)
    expected: dict[str, set[str]] = {"2026-10-01": set(), NOVEMBER: set(), "2026-12-01": set()}
    for account, at in made.items():
        method = AIRTEL if account.startswith("+25073") else "MOBILE_MONEY_MTN"
        payment = await _pay(admin, rt, rent, account, due=None, method=method)
        async with rt.sessionmaker.begin() as s:
            await s.execute(update(Payment).where(Payment.id == payment["id"]).values(created_at=at))
            name = (await s.get(Member, m[account])).name
        period = current_period(ptype, at, zone_of("Africa/Kigali"))
        assert period is not None
        expected[period[0].isoformat()].add(name)
    assert expected == {"2026-10-01": {"Aline Uwase"}, NOVEMBER: {"Jean Bosco Habimana", "Claudine Mukamana"},
                        "2026-12-01": {"Eric Niyonzima"}}
    for day, names in expected.items():
        assert await _paid_lines(admin, rent, day) == names


async def test_a_quarterly_type_due_the_31st_in_nairobi(admin, rt, demo):
    """Quarterly from January, due the 31st: April's falls on the 30th. In Nairobi (UTC+3) a dueDate naming the local
    day (or the bare date) pays it, one naming the day before is refused; periods are its due dates only."""
    from core.models import Cooperative

    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Cooperative).where(Cooperative.id == demo["cooperative_id"])
                        .values(timezone="Africa/Nairobi"))
    made = await admin.json("POST", "/v1/payment-types", 201, json={
        "name": "Levy", "amount": 50000, "isRecurring": True, "recurringInterval": "QUARTERLY", "dueDay": 31})
    await _registered(rt, demo["cooperative_id"])
    levy = made["id"]
    await _pay(admin, rt, levy, "+250788000001", due="2026-04-30")
    await _pay(admin, rt, levy, "+250788000002", due="2026-04-30T00:30:00+03:00")  # 2026-04-29T21:30Z
    # The day before, local: no due date of the levy, refused (it would pay no period).
    refused = await admin.json("POST", "/v1/payments", 400, json={
        "paymentTypeId": levy, "amount": 50000, "paymentMethod": AIRTEL, "paymentAccount": "+250733000001",
        "dueDate": "2026-04-29T23:30:00+03:00", "idempotencyKey": idem()})
    assert refused["field"] == "dueDate" and refused["message"][0].endswith(": 2026-01-31 or 2026-04-30")
    report = await admin.json("GET", f"/v1/reports/dues?paymentTypeId={levy}&period=2026-04-30&limit=100", 200)
    assert report["period"] == {
        "dueDate": "2026-04-30", "previousDueDate": "2026-01-31", "timezone": "Africa/Nairobi",
        "paidFrom": "2026-03-16T21:00:00Z", "paidUntil": "2026-06-14T21:00:00Z",
        "dueDayStart": "2026-04-29T21:00:00Z", "dueDayEnd": "2026-04-30T21:00:00Z"}
    assert {line["name"] for line in report["data"] if line["status"] == "PAID"} == {"Aline Uwase",
                                                                                     "Jean Bosco Habimana"}
    refused = await admin.json("GET", f"/v1/reports/dues?paymentTypeId={levy}&period=2026-05-31", 400)
    assert refused["message"][0] == "period must be a due date of 'Levy': 2026-04-30 or 2026-07-31"
    assert (await admin.json("GET", f"/v1/reports/dues?paymentTypeId={levy}&period=2026-07-31", 200)
            )["period"]["previousDueDate"] == "2026-04-30"


async def test_an_api_key_reads_the_dues_with_the_admin_scope_only(admin, client, rt, demo, coop_b):
    rent = demo["payment_types"]["Monthly Rent"]
    await _registered(rt, demo["cooperative_id"])
    query = f"paymentTypeId={rent}&period={NOVEMBER}"
    reader = await admin.json("POST", "/v1/api-keys", 201, json={"name": "BI", "scopes": ["payments:read"]})
    bi = Caller(client, {"X-API-Key": reader["key"]})
    assert (await bi.json("GET", f"/v1/reports/dues?{query}", 403))["code"] == "SCOPE_MISSING"
    assert (await bi.req("GET", f"/v1/reports/dues.csv?{query}")).status == 403
    erp = await admin.json("POST", "/v1/api-keys", 201, json={"name": "ERP", "scopes": ["admin"]})
    books = Caller(client, {"X-API-Key": erp["key"]})
    assert len((await books.json("GET", f"/v1/reports/dues?{query}", 200))["data"]) == 5
    # Another cooperative's type: not found, as for its admin.
    other = f"paymentTypeId={coop_b['payment_type_id']}&period={NOVEMBER}"
    assert (await books.json("GET", f"/v1/reports/dues?{other}", 404))["field"] == "paymentTypeId"


async def test_last_payment_at_is_that_of_a_payment_counted_in_amount_paid(admin, rt, demo):
    """lastPaymentAt is read from the payments amountPaid counts: one the provider completed in another currency (it
    keeps nothing in the type's) is not her last payment of the period, and alone it leaves the line UNPAID with no
    lastPaymentAt, as amountPaid is 0."""
    rent = demo["payment_types"]["Monthly Rent"]
    await _registered(rt, demo["cooperative_id"])
    counted = await _pay(admin, rt, rent, "+250788000001")
    paid_at = datetime(2026, 10, 30, 9, tzinfo=UTC)
    elsewhere: list[str] = []
    for account in ("+250788000001", "+250788000002"):  # Aline's second payment; Jean's only one
        made = await _pay(admin, rt, rent, account, taken=0)
        async with rt.sessionmaker.begin() as s:
            await apply_collection_outcome(s, rt, await s.get(Payment, made["id"]), ProviderOutcome.SUCCEEDED,
                                           actor=PROVIDER, amount=Money(40_00, "USD"),
                                           provider_transaction_id=f"MTN-{made['id'][:8]}")
        elsewhere.append(made["id"])
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Payment).where(Payment.id == counted["id"]).values(completed_at=paid_at))
        await s.execute(update(Payment).where(Payment.id.in_(elsewhere))
                        .values(completed_at=datetime(2026, 10, 31, 9, tzinfo=UTC)))
        taken = (await s.execute(select(Payment.status, Payment.collected_minor)
                                 .where(Payment.id.in_(elsewhere)))).all()
        assert set(taken) == {("COMPLETED", 0)}
    query = f"paymentTypeId={rent}&period={NOVEMBER}"
    report = await admin.json("GET", f"/v1/reports/dues?{query}&limit=100", 200)
    by_name = {line["name"]: line for line in report["data"]}
    aline, jean = by_name["Aline Uwase"], by_name["Jean Bosco Habimana"]
    assert (aline["status"], aline["amountPaid"], aline["lastPaymentAt"]) == ("PAID", 50000, "2026-10-30T09:00:00Z")
    assert (jean["status"], jean["amountPaid"], jean["lastPaymentAt"]) == ("UNPAID", 0, None)
    rows = {row["name"]: row for row in csv.DictReader(io.StringIO(
        await (await admin.req("GET", f"/v1/reports/dues.csv?{query}")).text()))}
    assert rows["Aline Uwase"]["lastPaymentAt"] == "2026-10-30T09:00:00Z"
    assert rows["Jean Bosco Habimana"]["lastPaymentAt"] == ""


async def test_a_member_who_paid_twice_owes_nothing_and_offsets_no_one_elses_debt(admin, rt, demo):
    """Aline paid November's rent twice (100,000 kept of 50,000): PAID, nothing outstanding (not -50,000), and the
    totals' outstanding is what the others owe, not lowered by her overpayment."""
    rent = demo["payment_types"]["Monthly Rent"]
    await _registered(rt, demo["cooperative_id"])
    await _pay(admin, rt, rent, "+250788000001")
    await _pay(admin, rt, rent, "+250788000001")
    query = f"paymentTypeId={rent}&period={NOVEMBER}"
    report = await admin.json("GET", f"/v1/reports/dues?{query}&limit=100", 200)
    by_name = {line["name"]: line for line in report["data"]}
    assert _short(by_name["Aline Uwase"]) == ("Aline Uwase", "PAID", 50000, 100000, 0, 0)
    others = [line for line in report["data"] if line["name"] != "Aline Uwase"]
    assert others and all(line["amountOutstanding"] == 50000 for line in others)
    assert report["totals"]["amountOutstanding"] == 50000 * len(others)
    rows = {row["name"]: row for row in csv.DictReader(io.StringIO(
        await (await admin.req("GET", f"/v1/reports/dues.csv?{query}")).text()))}
    assert rows["Aline Uwase"]["amountOutstanding"] == "0"


async def test_money_taken_after_the_payment_failed_pays_its_period(admin, rt, demo):
    """Jean's rent FAILED, then the provider reported the money taken after all: the payment stays FAILED but the money
    is held (the reconciliation counts it, payments.csv?member= lists it collected) and she is texted not to pay
    again. It pays its period as a completed payment does: November's dues list her PAID, and for the period a
    payment made now pays, the USSD and the BALANCE SMS (owed_now) ask her for nothing; part of it refunded, the
    rest is owed."""
    from core.reminders import owed_now

    rent = demo["payment_types"]["Monthly Rent"]
    await _registered(rt, demo["cooperative_id"])
    jean = demo["members"]["+250788000002"]
    november = await _pay(admin, rt, rent, "+250788000002", taken=0)
    now = await _pay(admin, rt, rent, "+250788000002", due=None, taken=0)
    for made in (november, now):
        async with rt.sessionmaker.begin() as s:
            await apply_collection_outcome(s, rt, await s.get(Payment, made["id"]), ProviderOutcome.FAILED,
                                           actor=PROVIDER, reason="payer declined")
        async with rt.sessionmaker.begin() as s:
            assert await apply_collection_outcome(
                s, rt, await s.get(Payment, made["id"]), ProviderOutcome.SUCCEEDED, actor=PROVIDER,
                amount=Money(50000, "RWF"), provider_transaction_id=f"MTN-LATE-{made['id'][:8]}",
            ) == "flagged_success_after_failure"
    shown = await admin.json("GET", f"/v1/payments/{november['id']}", 200)
    assert (shown["status"], shown["collectedAmount"]) == ("FAILED", 50000)
    totals = (await admin.json("GET", "/v1/reports/reconciliation", 200))["totals"]
    assert totals[0]["collected"] == 100000

    report = await admin.json("GET", f"/v1/reports/dues?paymentTypeId={rent}&period={NOVEMBER}&limit=100", 200)
    line = next(line for line in report["data"] if line["memberId"] == jean)
    assert _short(line) == ("Jean Bosco Habimana", "PAID", 50000, 50000, 0, 0)
    assert line["lastPaymentAt"] == shown["completedAt"]
    async with rt.sessionmaker() as s:
        ptype = await s.get(PaymentType, rent)
        _due, left = await owed_now(s, jean, ptype, "Africa/Kigali")
    assert left == 0

    await _refund(admin, rt, november["id"], 20000)  # part of it given back: the rest is what she kept
    report = await admin.json("GET", f"/v1/reports/dues?paymentTypeId={rent}&period={NOVEMBER}&limit=100", 200)
    line = next(line for line in report["data"] if line["memberId"] == jean)
    assert _short(line) == ("Jean Bosco Habimana", "PARTIAL", 50000, 30000, 0, 20000)


async def test_a_part_paid_member_with_a_payment_awaiting_her_pin_is_awaiting_approval(admin, rt, demo):
    """Jean's provider took 30,000 of the rent, and another payment of November's awaits her PIN: AWAITING_APPROVAL
    (DUES_STATUSES: before PARTIAL), with the 30,000 paid and the 20,000 still outstanding."""
    rent = demo["payment_types"]["Monthly Rent"]
    await _registered(rt, demo["cooperative_id"])
    await _pay(admin, rt, rent, "+250788000002", taken=30000)
    await _pay(admin, rt, rent, "+250788000002", taken=0)
    report = await admin.json("GET", f"/v1/reports/dues?paymentTypeId={rent}&period={NOVEMBER}&limit=100", 200)
    by_name = {line["name"]: line for line in report["data"]}
    assert _short(by_name["Jean Bosco Habimana"]) == (
        "Jean Bosco Habimana", "AWAITING_APPROVAL", 50000, 30000, 50000, 20000)
    assert report["totals"]["byStatus"]["AWAITING_APPROVAL"] == 1 and report["totals"]["byStatus"]["PARTIAL"] == 0


async def test_a_due_date_that_is_none_of_the_types_is_refused_not_counted_nowhere(admin, rt, demo):
    """An API payment's dueDate names the period it pays by its due date. One that is no due date of a recurring type
    (the 15th of rent due the 1st; the day before the due day in the cooperative's zone) paid no period: the member
    who paid showed UNPAID in every dues report, was reminded and asked again by the USSD. It is refused (400, field
    dueDate, the due dates either side named), nothing made; a due date (as the bare date or the local day) is
    taken and pays its period. A type that is not recurring has no periods: any dueDate is taken."""
    from sqlalchemy import func

    rent = demo["payment_types"]["Monthly Rent"]
    await _registered(rt, demo["cooperative_id"])

    async def count() -> int:
        async with rt.sessionmaker() as s:
            return int(await s.scalar(select(func.count()).select_from(Payment)) or 0)

    before = await count()
    for due, around in (("2026-11-15T00:00:00Z", "2026-11-01 or 2026-12-01"),
                        ("2026-11-15", "2026-11-01 or 2026-12-01"),
                        ("2026-10-31T23:30:00+02:00", "2026-10-01 or 2026-11-01"),  # 31 October in Kigali
                        ("0999-12-31T00:00:00Z", "0999-12-01 or 1000-01-01"),
                        ("9999-12-31T23:59:59Z", "9999-12-01")):  # (its next due date would be in year 10000)
        refused = await admin.json("POST", "/v1/payments", 400, json={
            "paymentTypeId": rent, "amount": 50000, "paymentMethod": "MOBILE_MONEY_MTN",
            "paymentAccount": "+250788000001", "dueDate": due, "idempotencyKey": idem()})
        assert (refused["code"], refused["field"]) == ("VALIDATION_FAILED", "dueDate"), due
        assert refused["message"] == [f"dueDate must be a due date of 'Monthly Rent', the day its period ends (the "
                                      f"cooperative's local day, or the bare date YYYY-MM-DD): {around}"], due
    assert await count() == before

    # A due date: the bare date, the local day (00:30 on 1 November in Kigali is 31 October in UTC), one before the
    # type was made (seed 001's example): taken, and those of November pay November.
    await _pay(admin, rt, rent, "+250788000001", due="2026-11-01")
    await _pay(admin, rt, rent, "+250788000002", due="2026-11-01T00:30:00+02:00")
    await _pay(admin, rt, rent, "+250733000001", due="2025-11-01T00:00:00Z", method=AIRTEL)
    assert await _paid_lines(admin, rent, NOVEMBER) == {"Aline Uwase", "Jean Bosco Habimana"}

    one_off = await admin.json("POST", "/v1/payment-types", 201, json={"name": "Joining fee", "amount": 10000})
    made = await admin.json("POST", "/v1/payments", 201, json={
        "paymentTypeId": one_off["id"], "amount": 10000, "paymentMethod": "MOBILE_MONEY_MTN",
        "paymentAccount": "+250788000003", "dueDate": "2026-11-15T00:00:00Z", "idempotencyKey": idem()})
    assert made["dueDate"] == "2026-11-15T00:00:00Z"


async def test_a_key_accepted_before_the_types_due_day_changed_still_answers_its_payment(admin, rt, demo):
    """A payment naming the 1st, due date of rent then; rent then falls due the 5th. The same request sent again (a
    client's retry after a lost answer) answers the payment made (201, replayed), not the 400 a new one would get;
    a new key with that body is refused."""
    from core.models import Cooperative

    async with rt.sessionmaker.begin() as s:
        coop = await s.get(Cooperative, demo["cooperative_id"])
        coop.timezone = "Africa/Nairobi"
    rent = demo["payment_types"]["Monthly Rent"]
    body = {"paymentTypeId": rent, "amount": 50000, "paymentMethod": "MOBILE_MONEY_MTN",
            "paymentAccount": "+250788000001", "dueDate": "2026-11-01T00:00:00+03:00", "idempotencyKey": idem()}
    made = await admin.json("POST", "/v1/payments", 201, json=body)
    await admin.json("PATCH", f"/v1/payment-types/{rent}", 200, json={"dueDay": 5})
    again = await admin.req("POST", "/v1/payments", json=body)
    assert again.status == 201 and again.headers["Idempotent-Replayed"] == "true"
    assert (await again.json())["id"] == made["id"]
    refused = await admin.json("POST", "/v1/payments", 400, json={**body, "idempotencyKey": idem()})
    assert refused["field"] == "dueDate" and refused["message"][0].endswith(": 2026-10-05 or 2026-11-05")


async def test_a_payment_past_its_approval_window_is_not_awaiting_approval(admin, rt, demo):
    """Open as the USSD and the BALANCE SMS read it (core.payments.still_open): PENDING inside its approval window,
    PROCESSING up to PAYMENT_PENDING_GRACE_SECONDS past it (the provider's prompt may still be answered). Past that
    the prompt can no longer be approved and the USSD asks her to pay again: the report does not list her as
    awaiting approval, nor its money, whether or not the worker has closed it yet; a member registered after the
    period with only such a payment of it is not listed."""
    rent, m = demo["payment_types"]["Monthly Rent"], demo["members"]
    await _registered(rt, demo["cooperative_id"])
    late = await admin.json("POST", "/v1/members", 201, json={"name": "Paul Late", "phone": "+250788000114"})
    grace = timedelta(seconds=rt.settings.payment_pending_grace_seconds)
    now = utcnow()

    async def prompt(account: str, status: str, ended: timedelta | None, method: str = "MOBILE_MONEY_MTN") -> None:
        """A payment of hers left `status`, its window ended `ended` ago (None: still running)."""
        made = await _pay(admin, rt, rent, account, method=method, taken=0)
        async with rt.sessionmaker.begin() as s:
            values: dict[str, Any] = {"status": status}
            if ended is not None:
                values["expires_at"] = now - ended
            await s.execute(update(Payment).where(Payment.id == made["id"]).values(**values))

    await prompt("+250788000001", "PENDING", None)  # Aline: her PIN awaited, inside the window
    await prompt("+250788000002", "PENDING", timedelta(minutes=1))  # Jean: the window ended a minute ago
    await prompt("+250733000001", "PROCESSING", grace - timedelta(minutes=1), AIRTEL)  # Claudine: within the grace
    await prompt("+250733000002", "PROCESSING", grace + timedelta(minutes=1), AIRTEL)  # Eric: past it
    await _pay(admin, rt, rent, "+250788000003", taken=30000)  # Grace: 30,000 kept, and a prompt past its window
    await prompt("+250788000003", "PENDING", timedelta(minutes=1))
    await prompt("+250788000114", "PROCESSING", grace + timedelta(minutes=1))  # Paul: registered since, past it

    report = await admin.json("GET", f"/v1/reports/dues?paymentTypeId={rent}&period={NOVEMBER}&limit=100", 200)
    assert [_short(line) for line in report["data"]] == [
        ("Aline Uwase", "AWAITING_APPROVAL", 50000, 0, 50000, 50000),
        ("Claudine Mukamana", "AWAITING_APPROVAL", 50000, 0, 50000, 50000),
        ("Eric Niyonzima", "UNPAID", 50000, 0, 0, 50000),
        ("Grace Ingabire", "PARTIAL", 50000, 30000, 0, 20000),
        ("Jean Bosco Habimana", "UNPAID", 50000, 0, 0, 50000),
    ]
    assert late["id"] not in {line["memberId"] for line in report["data"]}
    assert report["totals"]["amountAwaitingApproval"] == 100000
    assert report["totals"]["byStatus"] == {"PAID": 0, "AWAITING_APPROVAL": 2, "PARTIAL": 1, "UNPAID": 2}
    resp = await admin.req("GET", f"/v1/reports/dues.csv?paymentTypeId={rent}&period={NOVEMBER}")
    assert resp.status == 200
    rows = {row["memberId"]: row for row in csv.DictReader(io.StringIO(await resp.text()))}
    assert (rows[m["+250788000002"]]["status"], rows[m["+250788000002"]]["amountAwaitingApproval"]) == ("UNPAID", "0")
    assert rows[m["+250788000001"]]["status"] == "AWAITING_APPROVAL"


async def test_a_prompt_left_on_a_lost_sim_is_not_awaiting_approval(admin, rt, demo):
    """Open as the USSD and the BALANCE SMS judge it, also by number (core.payments.approvable_by): Aline's rent
    prompt went to her old SIM, then she lost it and the office put her new number on (NEW_SIM). The prompt waits on
    a SIM she no longer has: the USSD lets her pay from her new number and the BALANCE SMS does not say it is under
    way, so the report neither lists her as awaiting approval nor counts its money (nor lists a member registered
    after the period with only such a prompt). Jean's prompt, his number unchanged, is awaiting approval."""
    rent, m = demo["payment_types"]["Monthly Rent"], demo["members"]
    await _registered(rt, demo["cooperative_id"])
    late = await admin.json("POST", "/v1/members", 201, json={"name": "Paul Late", "phone": "+250788000114"})
    await _pay(admin, rt, rent, "+250788000001", taken=0)  # Aline: her PIN awaited on the SIM she then lost
    await admin.json("PATCH", f"/v1/members/{m['+250788000001']}", 200,
                     json={"phone": "+250788000901", "phoneChange": "NEW_SIM"})
    await _pay(admin, rt, rent, "+250788000114", taken=0)  # Paul, registered since: the same
    await admin.json("PATCH", f"/v1/members/{late['id']}", 200,
                     json={"phone": "+250788000914", "phoneChange": "NEW_SIM"})
    await _pay(admin, rt, rent, "+250788000002", taken=0)  # Jean: his PIN awaited, his number unchanged

    report = await admin.json("GET", f"/v1/reports/dues?paymentTypeId={rent}&period={NOVEMBER}&limit=100", 200)
    lines = {line["memberId"]: _short(line) for line in report["data"]}
    assert lines[m["+250788000001"]] == ("Aline Uwase", "UNPAID", 50000, 0, 0, 50000)
    assert lines[m["+250788000002"]] == ("Jean Bosco Habimana", "AWAITING_APPROVAL", 50000, 0, 50000, 50000)
    assert late["id"] not in lines
    assert report["totals"]["amountAwaitingApproval"] == 50000
    assert report["totals"]["byStatus"]["AWAITING_APPROVAL"] == 1
    waiting = await admin.json("GET", f"/v1/reports/dues?paymentTypeId={rent}&period={NOVEMBER}"
                                      "&status=AWAITING_APPROVAL", 200)
    assert [line["memberId"] for line in waiting["data"]] == [m["+250788000002"]]
    resp = await admin.req("GET", f"/v1/reports/dues.csv?paymentTypeId={rent}&period={NOVEMBER}")
    assert resp.status == 200
    rows = {row["memberId"]: row for row in csv.DictReader(io.StringIO(await resp.text()))}
    assert (rows[m["+250788000001"]]["status"], rows[m["+250788000001"]]["amountAwaitingApproval"]) == ("UNPAID", "0")
    assert rows[m["+250788000002"]]["status"] == "AWAITING_APPROVAL"


async def test_a_period_that_fell_due_before_the_type_was_made_is_refused(admin, rt, demo):
    """A levy made on 5 November 2026 (Kigali), due the 1st, in a cooperative whose members are older: its periods
    start with December's, the one paid from the day it was made (README: "A type's first period is paid from the
    day it was created"). 1 November, the due date of its creation month, had passed when it was made: the USSD
    never asked for it, no reminder went out, nothing made since pays it. The report took it, every member UNPAID
    for a period the levy never had; it is refused naming the first period, as a day before it is. A type made on
    its due day has that day's period: payments made that day pay it."""
    await _registered(rt, demo["cooperative_id"])
    levy = await admin.json("POST", "/v1/payment-types", 201, json={
        "name": "Security levy", "amount": 5000, "isRecurring": True, "recurringInterval": "MONTHLY", "dueDay": 1})
    on_due_day = await admin.json("POST", "/v1/payment-types", 201, json={
        "name": "Garden levy", "amount": 5000, "isRecurring": True, "recurringInterval": "MONTHLY", "dueDay": 1})
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(PaymentType).where(PaymentType.id == levy["id"]).values(
            created_at=datetime(2026, 11, 5, 8, tzinfo=UTC)))
        await s.execute(update(PaymentType).where(PaymentType.id == on_due_day["id"]).values(
            created_at=datetime(2026, 10, 31, 22, 30, tzinfo=UTC)))  # 00:30 on 1 November in Kigali

    for path in ("/v1/reports/dues", "/v1/reports/dues.csv"):
        for before in ("2026-11-01", "2026-10-01", "2026-11-20"):
            refused = await admin.json("GET", f"{path}?paymentTypeId={levy['id']}&period={before}", 400)
            assert refused["field"] == "period", before
            assert refused["message"][0] == "period must be a due date of 'Security levy': 2026-12-01", before
    december = await admin.json("GET", f"/v1/reports/dues?paymentTypeId={levy['id']}&period=2026-12-01&limit=100",
                                200)
    assert december["period"]["paidFrom"] == "2026-11-04T22:00:00Z"  # from the day it was made
    assert len(december["data"]) == 5 and {line["status"] for line in december["data"]} == {"UNPAID"}

    november = await admin.json(
        "GET", f"/v1/reports/dues?paymentTypeId={on_due_day['id']}&period={NOVEMBER}&limit=100", 200)
    assert november["period"]["dueDate"] == NOVEMBER and len(november["data"]) == 5
    refused = await admin.json("GET", f"/v1/reports/dues?paymentTypeId={on_due_day['id']}&period=2026-10-01", 400)
    assert refused["message"][0] == "period must be a due date of 'Garden levy': 2026-11-01"
