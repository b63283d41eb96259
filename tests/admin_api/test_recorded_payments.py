"""Money a provider's statement shows taken that no payment holds (a payment lost when PostgreSQL was restored from a
backup, its receipt with the member and its payment.completed webhook with the cooperative's system) is recorded by an
admin with `POST /v1/payments/recorded`: a COMPLETED payment at once, with the lost payment's reference and id when
given, dated at the statement's time in the reconciliation's `settled`, audited with the admin's note, told to the
cooperative's system, and resolving the callback that matched no payment when named. Before, no route could: `POST
/v1/payments` prompts the member again and `POST /v1/payments/{id}/outcome` needs an existing payment."""

from __future__ import annotations

import dataclasses
import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import func, select, text

from core.db import utcnow
from core.models import AuditEvent, OutboxJob, Payment, ProviderEvent, ReferenceCounter
from tests.admin_api.conftest import Caller, idem, make_payment
from tests.admin_api.test_chargeback_visibility import _last_month, _z
from tests.admin_api.test_unmatched_callbacks import _lost_payment_reference, _mtn_callback

LOST_ID = "5b0f3c1e-8d2a-4f6b-9c7e-1a2b3c4d5e6f"
LOST_REFERENCE = "PAY_20261130_4821"


@pytest.fixture(autouse=True)
async def _restored(rt: Any) -> None:
    """As after a restore's first step (`main.py advance-references`): the sequence is past the lost references, so
    LOST_REFERENCE is one it handed out (a reference it never did is refused: test_recorded_after_changes). SQLite
    numbers each day on its own: that day's counter is past it."""
    async with rt.sessionmaker.begin() as s:
        if s.get_bind().dialect.name == "postgresql":
            await s.execute(text("SELECT setval('human_reference_seq', 1000000)"))
        else:
            s.add(ReferenceCounter(key=LOST_REFERENCE.rsplit("_", 1)[0], value=1000000))


def _line(demo: dict[str, Any], **over: Any) -> dict[str, Any]:
    body = {"paymentTypeId": demo["payment_types"]["Monthly Rent"], "amount": 50000,
            "paymentMethod": "MOBILE_MONEY_MTN", "memberId": demo["members"]["+250788000001"],
            "providerTransactionId": "MTN-STMT-4821", "completedAt": _z(utcnow() - timedelta(hours=3)),
            "note": "MTN statement of the restore's gap, line 12", "idempotencyKey": idem()}
    body.update(over)
    return {k: v for k, v in body.items() if v is not None}  # None: left out


async def _jobs(rt: Any, kind: str) -> list[OutboxJob]:
    async with rt.sessionmaker() as s:
        return list((await s.execute(select(OutboxJob).where(OutboxJob.kind == kind).order_by(OutboxJob.id)))
                    .scalars())


async def _payment_count(rt: Any) -> int:
    async with rt.sessionmaker() as s:
        return int((await s.execute(select(func.count(Payment.id)))).scalar_one())


async def test_a_lost_paid_payment_is_recorded_completed_audited_and_told(admin: Caller, rt: Any,
                                                                         demo: dict[str, Any]) -> None:
    completed = utcnow().replace(microsecond=0) - timedelta(hours=3)
    body = _line(demo, id=LOST_ID, reference=LOST_REFERENCE.lower(), completedAt=_z(completed))
    done = await admin.json("POST", "/v1/payments/recorded", 201, json=body)
    assert (done["id"], done["reference"], done["status"], done["collectedAmount"], done["channel"]) == (
        LOST_ID, LOST_REFERENCE, "COMPLETED", 50000, "recorded")
    assert (done["completedAt"], done["gatewayTransactionId"], done["memberId"], done["paymentAccount"]) == (
        _z(completed), "MTN-STMT-4821", demo["members"]["+250788000001"], "+25078****001")
    async with rt.sessionmaker() as s:
        row = await s.get(Payment, LOST_ID)
        audit = {e.action: e for e in (await s.execute(select(AuditEvent).where(AuditEvent.entity_id == LOST_ID)))
                 .scalars()}
    assert (row.provider, row.collected_minor, row.completed_at, row.created_by, row.next_poll_at) == (
        "mtn_momo", 50000, completed, audit["payment.recorded"].actor, None)
    assert audit["payment.recorded"].actor.startswith("admin:")
    assert audit["payment.recorded"].after["note"] == body["note"]
    assert audit["payment.completed"].actor == audit["payment.recorded"].actor
    # Nothing is asked of the provider, the member is not texted (she holds the lost payment's receipt), and the
    # cooperative's system is told, under the lost payment's id.
    assert await _jobs(rt, "payment.collect") == [] and await _jobs(rt, "payment.poll") == []
    assert await _jobs(rt, "sms.send") == []
    [event] = await _jobs(rt, "webhook.event")
    assert (event.payload["event_type"], event.payload["data"]["id"], event.payload["data"]["status"]) == (
        "payment.completed", LOST_ID, "COMPLETED")
    # Her receipt's reference finds it again (as her STATUS SMS does).
    found = await admin.json("GET", f"/v1/payments?reference={LOST_REFERENCE}", 200)
    assert [p["id"] for p in found["data"]] == [LOST_ID]

    # The same request again answers the same payment; another one under the key is refused, and writes nothing.
    again = await admin.req("POST", "/v1/payments/recorded", json=body)
    assert (again.status, again.headers.get("Idempotent-Replayed"), (await again.json())["id"]) == (
        201, "true", LOST_ID)
    changed = await admin.json("POST", "/v1/payments/recorded", 409, json={**body, "note": "another line"})
    assert "idempotency key" in changed["message"]
    assert await _payment_count(rt) == 1
    # And a payment's key is not a recorded one's: POST /v1/payments under it is another request.
    await admin.json("POST", "/v1/payments", 409, json={
        "paymentTypeId": body["paymentTypeId"], "amount": 50000, "paymentMethod": "MOBILE_MONEY_MTN",
        "paymentAccount": "+250788000001", "idempotencyKey": body["idempotencyKey"]})


async def test_by_paying_number_with_a_receipt_sms(admin: Caller, rt: Any, demo: dict[str, Any]) -> None:
    done = await admin.json("POST", "/v1/payments/recorded", 201, json=_line(
        demo, memberId=None, paymentAccount="0733000001", paymentMethod="MOBILE_MONEY_AIRTEL", sendReceipt=True,
        providerTransactionId="AIRTEL-88231"))
    # The member whose registered number paid, as POST /v1/payments finds her; a new reference.
    assert done["memberId"] == demo["members"]["+250733000001"] and done["reference"].startswith("PAY_")
    assert [j.dedupe_key for j in await _jobs(rt, "sms.send")] == [f"sms:payment_receipt:{done['id']}"]


async def test_the_period_of_the_statement_time_settles_it(admin: Caller, rt: Any, demo: dict[str, Any]) -> None:
    """Counted in the `settled` figures of the month the statement dates it in (a month the treasurer may have
    signed off: named in its paymentsRecordedLater, by the admin), not in this month's."""
    start, end = _last_month()
    when = start + timedelta(days=9, hours=14)
    before = await admin.json("GET", f"/v1/reports/reconciliation?from={_z(start)}&to={_z(end)}", 200)
    assert before["settled"] == []
    done = await admin.json("POST", "/v1/payments/recorded", 201, json=_line(demo, completedAt=_z(when)))
    report = await admin.json("GET", f"/v1/reports/reconciliation?from={_z(start)}&to={_z(end)}", 200)
    assert [(line["provider"], line["paymentMethod"], line["collectedCount"], line["collected"])
            for line in report["settled"]] == [("mtn_momo", "MOBILE_MONEY_MTN", 1, 50000)]
    [later] = report["paymentsRecordedLater"]
    assert (later["id"], later["completedAt"], later["recordedBy"].startswith("admin:")) == (
        done["id"], _z(when), True)
    this_month = await admin.json("GET", f"/v1/reports/reconciliation?from={_z(end)}", 200)
    assert this_month["settled"] == []


def _said(answer: dict[str, Any]) -> str:
    """An error answer's message: one text, or the list a 400 gives."""
    message = answer["message"]
    return " ".join(message) if isinstance(message, list) else str(message)


@pytest.mark.parametrize(("change", "status", "said"), [
    ({"completedAt": "2099-01-01T00:00:00Z"}, 400, "completedAt"),
    ({"amount": 0}, 400, "amount"),
    ({"amount": -50000}, 400, "amount"),
    ({"paymentAccount": "0733000001"}, 400, "paymentAccount"),  # an Airtel number for MTN
    ({"memberId": None}, 400, "paymentAccount"),  # nobody paying
    ({"memberId": None, "paymentAccount": "+254708000001"}, 400, "paymentAccount"),  # a Kenyan number
    ({"memberId": str(uuid.uuid4())}, 404, "memberId"),
    ({"reference": "PAY-2026-11"}, 400, "reference"),
    ({"reference": "RFD_20261130_001"}, 400, "reference"),
    ({"reference": "PAY_20261331_001"}, 400, "reference"),  # no such day: no receipt carries it
    ({"reference": "PAY_00000000_001"}, 400, "reference"),
    ({"reference": "PAY_20261130_000"}, 400, "reference"),  # numbers start at 001
    ({"completedAt": "1970-01-01T00:00:00Z"}, 400, "completedAt"),
    ({"providerTransactionId": "   "}, 400, "providerTransactionId"),
    ({"note": " x "}, 400, "note"),
    ({"paymentTypeId": str(uuid.uuid4())}, 404, "paymentTypeId"),
])
async def test_refused_with_the_field_named_and_nothing_written(admin: Caller, rt: Any, demo: dict[str, Any],
                                                               change: dict[str, Any], status: int,
                                                               said: str) -> None:
    refused = await admin.json("POST", "/v1/payments/recorded", status, json=_line(demo, **change))
    assert said in _said(refused)
    assert await _payment_count(rt) == 0
    assert await _jobs(rt, "webhook.event") == []


async def test_refused_what_a_payment_holds(admin: Caller, rt: Any, demo: dict[str, Any],
                                           coop_b: dict[str, Any]) -> None:
    held = await admin.json("POST", "/v1/payments/recorded", 201, json=_line(demo, id=LOST_ID,
                                                                            reference=LOST_REFERENCE))
    for change, said in (
            ({}, f"providerTransactionId MTN-STMT-4821 is held already by payment {LOST_REFERENCE}"),  # again
            ({"providerTransactionId": "MTN-2", "id": LOST_ID}, "id is taken"),
            ({"providerTransactionId": "MTN-3", "reference": LOST_REFERENCE}, f"reference {LOST_REFERENCE} is taken")):
        refused = await admin.json("POST", "/v1/payments/recorded", 409, json=_line(demo, **change))
        assert _said(refused).startswith(said)
    # The same line recorded by another cooperative: refused too, without naming this cooperative's payment.
    theirs = await coop_b["admin"].json("POST", "/v1/payments/recorded", 409, json=_line(
        demo, paymentTypeId=coop_b["payment_type_id"], memberId=coop_b["member_id"], amount=1000))
    assert "held already by another cooperative's payment" in _said(theirs) and LOST_REFERENCE not in _said(theirs)
    # Another cooperative's member (the admin's own cooperative's payment, someone else's member): not found.
    other = await admin.json("POST", "/v1/payments/recorded", 404, json=_line(
        demo, memberId=coop_b["member_id"], providerTransactionId="MTN-4"))
    assert "memberId" in _said(other)
    # POST /v1/payments/{id}/outcome refuses that statement line too: it is on a payment already.
    open_one = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    async with rt.sessionmaker.begin() as s:
        row = await s.get(Payment, open_one["id"])
        row.expires_at = utcnow() - timedelta(hours=1)
    refused = await admin.json("POST", f"/v1/payments/{open_one['id']}/outcome", 409, json={
        "status": "COMPLETED", "providerTransactionId": "MTN-STMT-4821", "note": "on the statement"})
    assert held["reference"] in _said(refused)
    assert await _payment_count(rt) == 2


async def test_access(admin: Caller, tenant: Caller, superadmin: Caller, coop_b: dict[str, Any], rt: Any,
                      demo: dict[str, Any]) -> None:
    await tenant.json("POST", "/v1/payments/recorded", 403, json=_line(demo))
    # A super admin names the cooperative; a cooperative's admin cannot write into another's.
    await superadmin.json("POST", "/v1/payments/recorded", 400, json=_line(demo))
    await coop_b["admin"].json("POST", "/v1/payments/recorded", 404, json=_line(
        demo, cooperativeId=demo["cooperative_id"]))
    # Callbacks that matched no payment name no cooperative: only a super admin's to resolve.
    await admin.json("POST", "/v1/payments/recorded", 404, json=_line(demo, callbackId=str(uuid.uuid4())))
    assert await _payment_count(rt) == 0
    done = await superadmin.json("POST", "/v1/payments/recorded", 201, json=_line(
        demo, cooperativeId=demo["cooperative_id"]))
    assert done["cooperativeId"] == demo["cooperative_id"]


async def test_the_callback_it_accounts_for_is_resolved_with_it(admin: Caller, superadmin: Caller, client: Any,
                                                                 rt: Any, demo: dict[str, Any]) -> None:
    reference = await _lost_payment_reference(rt, admin, demo)
    assert (await _mtn_callback(client, reference, txn="MTN-9911"))["result"] == "unknown_payment"
    [callback] = (await superadmin.json("GET", "/v1/provider-callbacks?unmatched=true&resolved=false", 200))["data"]
    line = _line(demo, cooperativeId=demo["cooperative_id"], providerTransactionId="MTN-9911",
                 callbackId=callback["id"])
    # Refused whole when the callback does not fit (another provider's method): nothing written, nothing resolved.
    wrong = await superadmin.json("POST", "/v1/payments/recorded", 409, json={
        **line, "paymentMethod": "MOBILE_MONEY_AIRTEL", "memberId": demo["members"]["+250733000001"],
        "idempotencyKey": idem()})
    assert "callback is mtn_momo's" in _said(wrong)
    assert await _payment_count(rt) == 0

    done = await superadmin.json("POST", "/v1/payments/recorded", 201, json=line)
    [resolved] = (await superadmin.json("GET", "/v1/provider-callbacks?unmatched=true&resolved=true", 200))["data"]
    assert (resolved["id"], resolved["outcome"]) == (callback["id"], "unknown_payment_resolved")
    assert (resolved["resolution"]["note"], resolved["resolution"]["paymentId"]) == (line["note"], done["id"])
    assert (await superadmin.json("GET", "/v1/provider-callbacks?unmatched=true&resolved=false", 200))["data"] == []
    async with rt.sessionmaker() as s:
        audited = (await s.execute(select(AuditEvent).where(AuditEvent.action == "provider_callback.resolved")))\
            .scalar_one()
        assert (await s.get(ProviderEvent, callback["id"])).payment_id is None  # still listed among the unmatched
    assert audited.after["paymentId"] == done["id"]
    # Accounted for once: another recording naming it is refused.
    again = await superadmin.json("POST", "/v1/payments/recorded", 409, json={
        **line, "providerTransactionId": "MTN-9912", "idempotencyKey": idem()})
    assert "resolved already" in _said(again)
    assert await _payment_count(rt) == 1


async def test_a_statement_time_older_than_the_limit_is_refused_naming_the_bound(admin: Caller, rt: Any,
                                                                               demo: dict[str, Any],
                                                                               monkeypatch: Any) -> None:
    """Nothing but the future bounded completedAt: 1970 (or a wrong year) was recorded, dated into a month reported
    on long ago. Refused past RECORDED_PAYMENT_MAX_AGE_DAYS (400 by default), the bound named; an operator raises
    it for a genuinely older line."""
    for old in ("1970-01-01T00:00:00Z", "2025-10-01T09:00:00", _z(utcnow() - timedelta(days=401))):
        before = utcnow()
        refused = await admin.json("POST", "/v1/payments/recorded", 400, json=_line(demo, completedAt=old))
        after = utcnow()
        said = _said(refused)
        found = re.fullmatch(r"completedAt is before (\S+), 400 days ago: money is not recorded from an older "
                             r"statement line \(check the year; an operator sets the limit with "
                             r"RECORDED_PAYMENT_MAX_AGE_DAYS\)", said)
        assert found is not None, said
        bound = datetime.fromisoformat(found[1].replace("Z", "+00:00"))
        assert before - timedelta(days=400, seconds=1) <= bound <= after - timedelta(days=400)
    assert await _payment_count(rt) == 0
    assert await _jobs(rt, "webhook.event") == []

    # Within it: recorded, dated as the statement says (last year's closing, a year on).
    when = utcnow().replace(microsecond=0) - timedelta(days=399)
    body = _line(demo, completedAt=_z(when))
    done = await admin.json("POST", "/v1/payments/recorded", 201, json=body)
    assert done["completedAt"] == _z(when)
    # Sent again once the line is past the limit (here: the limit lowered), it still answers the payment it made.
    monkeypatch.setattr(rt, "settings", dataclasses.replace(rt.settings, recorded_payment_max_age_days=30))
    again = await admin.req("POST", "/v1/payments/recorded", json=body)
    assert (again.status, again.headers.get("Idempotent-Replayed"), (await again.json())["id"]) == (
        201, "true", done["id"])
    refused = await admin.json("POST", "/v1/payments/recorded", 400, json={**body, "idempotencyKey": idem()})
    assert ", 30 days ago: money is not recorded" in _said(refused)

    monkeypatch.setattr(rt, "settings", dataclasses.replace(rt.settings, recorded_payment_max_age_days=3650))
    older = utcnow().replace(microsecond=0) - timedelta(days=2000)
    done = await admin.json("POST", "/v1/payments/recorded", 201, json=_line(
        demo, completedAt=_z(older), providerTransactionId="MTN-STMT-OLD"))
    async with rt.sessionmaker() as s:
        assert (await s.get(Payment, done["id"])).completed_at == older


async def test_a_new_reference_carries_the_statement_day_in_the_cooperatives_zone(admin: Caller, rt: Any,
                                                                                   demo: dict[str, Any]) -> None:
    """A recorded payment is made when its money was taken (its createdAt): its receipt, STATUS SMS and "My
    payments" show that day, in Kigali time, as every reference's, not the day an admin recorded it. 01:30 in
    Kigali is 23:30 UTC the day before."""
    kigali = ZoneInfo("Africa/Kigali")
    day = (utcnow().astimezone(kigali) - timedelta(days=10)).date()
    local = datetime(day.year, day.month, day.day, 1, 30, tzinfo=kigali)
    prefix = f"PAY_{day:%Y%m%d}_"
    # Written as the statement shows it, without an offset: the cooperative's local time.
    done = await admin.json("POST", "/v1/payments/recorded", 201, json=_line(
        demo, completedAt=local.strftime("%Y-%m-%dT%H:%M:%S")))
    assert done["completedAt"] == f"{day - timedelta(days=1):%Y-%m-%d}T23:30:00Z"
    assert done["reference"].startswith(prefix), done["reference"]
    found = await admin.json("GET", f"/v1/payments?reference={done['reference']}", 200)
    assert [p["id"] for p in found["data"]] == [done["id"]]

    # More lines of that day: that day's references, each its own (SQLite numbers each day from its counter).
    more = [await admin.json("POST", "/v1/payments/recorded", 201, json=_line(
        demo, completedAt=_z((local + timedelta(hours=3)).astimezone(UTC)), providerTransactionId=f"MTN-STMT-{n}"))
        for n in (3, 4)]
    references = [done["reference"], *(p["reference"] for p in more)]
    assert len(set(references)) == 3 and all(r.startswith(prefix) for r in references)
    # A reference of that day is checked against that day's numbers: the next one was never handed out (on
    # PostgreSQL the sequence's, one across days).
    head, _, number = more[-1]["reference"].rpartition("_")
    ahead = f"{head}_{int(number) + 1:03d}"
    refused = await admin.json("POST", "/v1/payments/recorded", 400, json=_line(
        demo, reference=ahead, providerTransactionId="MTN-STMT-5"))
    assert _said(refused).startswith(f"reference {ahead} was never handed out")
    # A payment asked for today is dated today, as before (its day as it began or ended: the day may turn between).
    before = utcnow()
    today = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    days = {f"PAY_{at.astimezone(kigali):%Y%m%d}_" for at in (before, utcnow())}
    assert today["reference"][:13] in days, today["reference"]


async def test_a_reference_typed_with_other_zeros_is_the_receipts(admin: Caller, rt: Any,
                                                                   demo: dict[str, Any]) -> None:
    """PAY_20261130_04821 (or _4821 with leading zeros dropped, as a member reads it out) typed from a receipt
    showing PAY_20261130_4821 is that reference: kept as receipts write it, so her receipt finds it, and taken once
    (before, each spelling was recorded as another payment's reference)."""
    done = await admin.json("POST", "/v1/payments/recorded", 201, json=_line(demo, reference="pay_20261130_04821"))
    assert done["reference"] == LOST_REFERENCE
    refused = await admin.json("POST", "/v1/payments/recorded", 409, json=_line(
        demo, reference=LOST_REFERENCE, providerTransactionId="MTN-STMT-2"))
    assert _said(refused) == f"reference {LOST_REFERENCE} is taken: a payment has it"
    short = await admin.json("POST", "/v1/payments/recorded", 201, json=_line(
        demo, reference="PAY_20261130_7", providerTransactionId="MTN-STMT-3"))
    assert short["reference"] == "PAY_20261130_007"
    assert await _payment_count(rt) == 2
