"""The support desk's view of a payment's and a member's SMS (GET /v1/payments/{id}/messages,
GET /v1/members/{id}/messages) and its resend of a receipt (POST /v1/payments/{id}/receipt), through the HTTP API
with the real worker sending to the Africa's Talking simulator, whose delivery reports come back to the gateway."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import delete, func, select, update
from sqlalchemy import text as sql

from admin_api import messages
from core.db import utcnow
from core.models import AuditEvent, OutboxJob, Refund, SmsMessage
from core.ports import EventKind, ProviderEvent, ProviderOutcome
from core.provider_events import handle_provider_event
from tests.admin_api.conftest import Caller, bearer
from tests.channels.sms.helpers import make_payment, start_simulator
from tests.channels.sms.test_routes import inbound
from tests.conftest import drain, requires_pg

ALINE = "+250788000001"  # a demo member (rw), the tenant's
JEAN = "+250788000002"  # another (en)
STRANGER = "+250788777666"  # no member's


@pytest.fixture
async def sim(rt: Any, client: Any, aiohttp_server: Any) -> Any:
    """The simulator behind rt.sms, posting its delivery reports to the gateway under test."""
    _, state = await start_simulator(aiohttp_server, rt,
                                     delivery_url=str(client.server.make_url("/sms/africastalking/delivery")))
    return state


async def _settled(rt: Any, payment: Any, outcome: ProviderOutcome = ProviderOutcome.SUCCEEDED, **fields: Any) -> None:
    """The provider's callback for the payment, as it arrives: the move queues its receipt (or update) SMS."""
    event = ProviderEvent(provider=payment.provider, kind=EventKind.COLLECTION, event_id=f"cb-{payment.id}",
                          reference=payment.provider_reference, outcome=outcome, **fields)
    assert await handle_provider_event(rt, event) in ("completed", "failed")


async def _paid(rt: Any, demo: dict[str, Any], phone: str = ALINE, *, member: bool = True) -> Any:
    payment = await make_payment(rt, demo["cooperative_id"], account=phone, status="PENDING", created_at=utcnow(),
                                 member_id=demo["members"][phone] if member else None)
    await _settled(rt, payment, provider_transaction_id="TX-1")
    return payment


async def _reports(sim: Any, count: int) -> None:
    """Wait for the simulator's delivery reports to have been taken by the gateway (30 s at most, patience for a
    loaded machine: it waited 4 s)."""
    for _ in range(1500):
        if len(sim.reports_posted) >= count:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(sim.reports_posted)


async def _sms_jobs(rt: Any) -> list[OutboxJob]:
    async with rt.sessionmaker() as s:
        return list((await s.execute(select(OutboxJob).where(OutboxJob.kind == "sms.send")
                                     .order_by(OutboxJob.id))).scalars())


async def _resend_audits(rt: Any, payment_id: str) -> list[AuditEvent]:
    async with rt.sessionmaker() as s:
        return list((await s.execute(select(AuditEvent).where(
            AuditEvent.entity_id == payment_id, AuditEvent.action == messages.RESENT_ACTION)
            .order_by(AuditEvent.id))).scalars())


async def test_a_payments_receipt_is_listed_with_its_delivery_status(
    rt: Any, demo: dict[str, Any], admin: Caller, sim: Any, worker: Any
) -> None:
    payment = await _paid(rt, demo)
    queued = await admin.json("GET", f"/v1/payments/{payment.id}/messages", 200)
    assert queued["data"] == []  # the job is queued; the message row is made when the worker takes it
    await drain(worker)
    await _reports(sim, 1)

    page = await admin.json("GET", f"/v1/payments/{payment.id}/messages", 200)
    [message] = page["data"]
    assert page["meta"]["total"] == 1
    assert message["template"] == "payment_receipt" and message["language"] == "rw"
    assert (message["status"], message["providerStatus"], message["failureReason"]) == ("DELIVERED", "Success", None)
    assert message["phone"] == "+25078****001" and message["segments"] >= 1
    assert message["paymentId"] == payment.id and message["memberId"] == demo["members"][ALINE]
    assert message["sentAt"] is not None and message["deliveredAt"] is not None
    assert message["body"] is None  # not unless asked for
    raw = await (await admin.req("GET", f"/v1/payments/{payment.id}/messages")).text()
    assert ALINE not in raw and ALINE[1:] not in raw  # the masked number only

    # Her own list has it too; with includeBody, the text the simulator received.
    mine = await admin.json("GET", f"/v1/members/{demo['members'][ALINE]}/messages?includeBody=true", 200)
    assert [m["id"] for m in mine["data"]] == [message["id"]]
    assert mine["data"][0]["body"] == sim.messages(ALINE)[0]["message"]
    assert payment.reference in mine["data"][0]["body"]


@pytest.mark.parametrize(("failure", "status", "reason"), [
    ("DeliveryFailure", "FAILED", "DeliveryFailure"),  # the delivery report says so, later
    ("InvalidPhoneNumber", "REJECTED", "InvalidPhoneNumber"),  # refused when sent
])
async def test_a_failed_message_is_listed_with_its_reason(
    rt: Any, demo: dict[str, Any], admin: Caller, sim: Any, worker: Any, failure: str, status: str, reason: str
) -> None:
    sim.set_failure(failure, number=JEAN)
    payment = await _paid(rt, demo, JEAN)
    await drain(worker)
    if status == "FAILED":
        await _reports(sim, 1)
    [message] = (await admin.json("GET", f"/v1/payments/{payment.id}/messages", 200))["data"]
    assert (message["status"], message["failureReason"], message["phone"]) == (status, reason, "+25078****002")
    assert message["template"] == "payment_receipt" and message["language"] == "en"


async def test_a_failed_payments_update_and_the_keyword_replies_are_the_payments_messages_newest_first(
    rt: Any, demo: dict[str, Any], admin: Caller, client: Any, sim: Any, worker: Any
) -> None:
    """Its payment_failed update, then a STATUS and a RECEIPT she texted about it (keyed by the payment since this
    release), listed newest first; another payment's messages and her reminder are not."""
    payment = await make_payment(rt, demo["cooperative_id"], account=JEAN, status="PENDING", created_at=utcnow(),
                                 member_id=demo["members"][JEAN])
    await _settled(rt, payment, ProviderOutcome.FAILED, reason="INSUFFICIENT_FUNDS")
    other = await _paid(rt, demo, ALINE)
    await drain(worker)
    for number, text in enumerate((f"STATUS {payment.reference}", f"RECEIPT {payment.reference}")):
        await inbound(client, JEAN, text, f"in-{number}")
        await drain(worker)
    page = await admin.json("GET", f"/v1/payments/{payment.id}/messages", 200)
    # The RECEIPT of a payment that holds no money is answered with its status, as the keyword always did.
    assert [m["template"] for m in page["data"]] == ["payment_status", "payment_status", "payment_failed"]
    assert {m["paymentId"] for m in page["data"]} == {payment.id}
    assert [m["memberId"] for m in page["data"]] == [demo["members"][JEAN]] * 3  # to the texter: his membership
    assert page["data"][0]["createdAt"] >= page["data"][1]["createdAt"] >= page["data"][2]["createdAt"]
    assert len(sim.messages(JEAN)) == 3
    paged = await admin.json("GET", f"/v1/payments/{payment.id}/messages?limit=2&page=2", 200)
    assert [m["id"] for m in paged["data"]] == [page["data"][2]["id"]]
    assert paged["meta"] == {"page": 2, "limit": 2, "total": 3, "totalPages": 2, "hasNext": False,
                             "hasPrevious": True}
    assert [m["paymentId"] for m in (await admin.json("GET", f"/v1/payments/{other.id}/messages", 200))["data"]] \
        == [other.id]


async def _until_sms(rt: Any, worker: Any, idempotency_key: str) -> None:
    """Drain the worker until the SMS with this key has been made (fails the test if it never is)."""
    for _ in range(100):
        await drain(worker)
        async with rt.sessionmaker() as s:
            if (await s.execute(select(SmsMessage.id).where(
                    SmsMessage.idempotency_key == idempotency_key))).first() is not None:
                return
        await asyncio.sleep(0.05)
    raise AssertionError(f"no SMS {idempotency_key} after 100 drains")


async def _refund_failed_by_mtn(rt: Any, admin: Caller, payment_id: str, amount: int) -> dict[str, Any]:
    """A refund sent to MTN (its submission taken), whose callback then says it failed."""
    refund = await admin.json("POST", f"/v1/payments/{payment_id}/refunds", 201,
                              json={"amount": amount, "idempotencyKey": f"refund-{uuid.uuid4().hex}"})
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Refund).where(Refund.id == refund["id"]).values(status="PROCESSING"))
        await s.execute(update(OutboxJob).where(OutboxJob.kind == "refund.submit").values(status="DONE"))
        ours = (await s.get(Refund, refund["id"])).provider_reference
    assert await handle_provider_event(rt, ProviderEvent(
        provider="mtn_momo", kind=EventKind.REFUND, event_id=f"rf-{refund['id']}", reference=ours,
        outcome=ProviderOutcome.FAILED, reason="reversal declined")) == "failed"
    return refund


async def test_a_payments_refund_notices_are_its_messages_and_name_it(
    rt: Any, demo: dict[str, Any], admin: Caller, sim: Any, worker: Any
) -> None:
    """The member told her refund went through, or failed, is seen from the payment (the notices are keyed by the
    refund's id, not the payment's); another payment's refund notice is not its."""
    payment = await _paid(rt, demo)
    # Its receipt made before the other's (one worker round sends the two in parallel, in either order).
    await _until_sms(rt, worker, f"payment_receipt:{payment.id}")
    other = await make_payment(rt, demo["cooperative_id"], account=ALINE, status="PENDING", created_at=utcnow(),
                               member_id=demo["members"][ALINE])
    await _settled(rt, other, provider_transaction_id="TX-2")
    await drain(worker)
    back = await admin.json("POST", f"/v1/payments/{payment.id}/refunds", 201, json={
        "amount": 20000, "idempotencyKey": f"refund-{uuid.uuid4().hex}",
        "returnedByProvider": {"providerTransactionId": "MTN-REV-1"}})
    assert back["status"] == "COMPLETED"
    # Each notice is made before the next refund's (a loaded machine's SMS pacing may defer it), so the order is known.
    await _until_sms(rt, worker, f"refund_completed:{back['id']}")
    failed = await _refund_failed_by_mtn(rt, admin, payment.id, 10000)
    await _until_sms(rt, worker, f"refund_failed:{failed['id']}")
    await admin.json("POST", f"/v1/payments/{other.id}/refunds", 201, json={
        "amount": 5000, "idempotencyKey": f"refund-{uuid.uuid4().hex}",
        "returnedByProvider": {"providerTransactionId": "MTN-REV-2"}})
    await drain(worker)
    await _reports(sim, 5)

    page = await admin.json("GET", f"/v1/payments/{payment.id}/messages?includeBody=true", 200)
    assert [m["template"] for m in page["data"]] == ["refund_failed", "refund_completed", "payment_receipt"]
    assert [m["paymentId"] for m in page["data"]] == [payment.id] * 3
    assert page["data"][0]["createdAt"] >= page["data"][1]["createdAt"] >= page["data"][2]["createdAt"]
    assert {m["body"] for m in page["data"]} <= {m["message"] for m in sim.messages(ALINE)}
    assert "10,000 RWF" in page["data"][0]["body"] and "20,000 RWF" in page["data"][1]["body"]
    assert page["meta"]["total"] == 3
    second = await admin.json("GET", f"/v1/payments/{payment.id}/messages?limit=2&page=2", 200)
    assert [m["id"] for m in second["data"]] == [page["data"][2]["id"]] and second["meta"]["total"] == 3
    async with rt.sessionmaker() as s:
        keys = (await s.execute(select(SmsMessage.idempotency_key).where(
            SmsMessage.id.in_([m["id"] for m in page["data"][:2]])))).scalars().all()
    assert sorted(keys) == sorted([f"refund_failed:{failed['id']}", f"refund_completed:{back['id']}"])
    theirs = await admin.json("GET", f"/v1/payments/{other.id}/messages", 200)
    assert [(m["template"], m["paymentId"]) for m in theirs["data"]] == \
        [("refund_completed", other.id), ("payment_receipt", other.id)]

    # Her own list names the payment of each of her refunds' notices too.
    mine = await admin.json("GET", f"/v1/members/{demo['members'][ALINE]}/messages", 200)
    assert [(m["template"], m["paymentId"]) for m in mine["data"]] == [
        ("refund_completed", other.id), ("refund_failed", payment.id), ("refund_completed", payment.id),
        ("payment_receipt", other.id), ("payment_receipt", payment.id)]


async def test_a_payments_dispute_sms_are_its_messages_and_name_it(
    rt: Any, demo: dict[str, Any], admin: Caller, sim: Any, worker: Any
) -> None:
    """The member told her dispute was registered, reviewed and closed is seen from the payment (those SMS are
    keyed by the dispute's id and the step, not the payment's), a second dispute's too; another payment's dispute
    SMS is not its."""
    payment = await _paid(rt, demo)
    await _until_sms(rt, worker, f"payment_receipt:{payment.id}")  # before the other's (see the refunds' test)
    other = await make_payment(rt, demo["cooperative_id"], account=ALINE, status="PENDING", created_at=utcnow(),
                               member_id=demo["members"][ALINE])
    await _settled(rt, other, provider_transaction_id="TX-2")
    await drain(worker)
    first = await admin.json("POST", "/v1/disputes", 201, json={"paymentId": payment.id, "reason": "WRONG_AMOUNT"})
    await drain(worker)  # each change's SMS sent before the next is made (else it waits its turn: SMS_SPACING)
    for status in ("UNDER_REVIEW", "REJECTED"):
        await admin.json("POST", f"/v1/disputes/{first['id']}/transitions", 200, json={"status": status})
        await drain(worker)
    second = await admin.json("POST", "/v1/disputes", 201, json={"paymentId": payment.id, "reason": "OTHER"})
    await drain(worker)
    theirs_opened = await admin.json("POST", "/v1/disputes", 201, json={"paymentId": other.id, "reason": "OTHER"})
    await drain(worker)
    await _reports(sim, 7)

    page = await admin.json("GET", f"/v1/payments/{payment.id}/messages?includeBody=true", 200)
    assert [m["template"] for m in page["data"]] == [
        "dispute_opened", "dispute_resolved", "dispute_updated", "dispute_opened", "payment_receipt"]
    assert [m["paymentId"] for m in page["data"]] == [payment.id] * 5
    assert page["meta"]["total"] == 5
    assert {m["body"] for m in page["data"]} <= {m["message"] for m in sim.messages(ALINE)}
    assert second["reference"] in page["data"][0]["body"]
    assert all(first["reference"] in m["body"] for m in page["data"][1:4])
    async with rt.sessionmaker() as s:
        keys = (await s.execute(select(SmsMessage.idempotency_key).where(
            SmsMessage.id.in_([m["id"] for m in page["data"][:4]])))).scalars().all()
    assert sorted(keys) == sorted([
        f"dispute_opened:{second['id']}:opened", f"dispute_resolved:{first['id']}:rejected",
        f"dispute_updated:{first['id']}:under_review", f"dispute_opened:{first['id']}:opened"])
    theirs = await admin.json("GET", f"/v1/payments/{other.id}/messages?includeBody=true", 200)
    assert [(m["template"], m["paymentId"]) for m in theirs["data"]] == \
        [("dispute_opened", other.id), ("payment_receipt", other.id)]
    assert theirs_opened["reference"] in theirs["data"][0]["body"]

    # Her own list names the payment of each of her disputes' SMS too.
    mine = await admin.json("GET", f"/v1/members/{demo['members'][ALINE]}/messages", 200)
    assert [(m["template"], m["paymentId"]) for m in mine["data"]] == [
        ("dispute_opened", other.id), ("dispute_opened", payment.id), ("dispute_resolved", payment.id),
        ("dispute_updated", payment.id), ("dispute_opened", payment.id), ("payment_receipt", other.id),
        ("payment_receipt", payment.id)]


async def test_another_cooperatives_payment_and_member_are_not_found(
    rt: Any, demo: dict[str, Any], admin: Caller, superadmin: Caller, coop_b: dict[str, Any], sim: Any,
    worker: Any, tenant: Caller,
) -> None:
    payment = await _paid(rt, demo)
    await drain(worker)
    other: Caller = coop_b["admin"]
    for path in (f"/v1/payments/{payment.id}/messages", f"/v1/members/{demo['members'][ALINE]}/messages"):
        assert (await other.json("GET", path, 404))["message"] in ("payment not found", "member not found")
        assert len((await superadmin.json("GET", path, 200))["data"]) == 1
        await tenant.json("GET", path, 403)
    await other.json("POST", f"/v1/payments/{payment.id}/receipt", 404, json={})
    await tenant.json("POST", f"/v1/payments/{payment.id}/receipt", 403, json={})
    await admin.json("GET", "/v1/payments/not-an-id/messages", 404)
    assert len(await _sms_jobs(rt)) == 1 and await _resend_audits(rt, payment.id) == []


async def test_a_resend_queues_one_job_and_one_more_sms_and_is_audited(
    rt: Any, demo: dict[str, Any], admin: Caller, sim: Any, worker: Any
) -> None:
    payment = await _paid(rt, demo)
    await drain(worker)
    before = await _sms_jobs(rt)
    assert len(sim.messages(ALINE)) == 1

    resent = await admin.json("POST", f"/v1/payments/{payment.id}/receipt", 202,
                              json={"note": "member called: no SMS received"})
    after = await _sms_jobs(rt)
    [job] = [j for j in after if j.id not in {b.id for b in before}]
    assert resent == {"jobId": job.id, "paymentId": payment.id, "template": "payment_receipt",
                      "phone": "+25078****001", "remaining": 2}
    assert job.payload["member_id"] == demo["members"][ALINE] and job.payload["phone_enc"] is None
    assert job.payload["context"] == {"payment_id": payment.id}  # in her own language, as her receipt was
    waiting = await admin.json("GET", f"/v1/jobs?paymentId={payment.id}", 200)
    assert [(j["id"], j["kind"], j["status"]) for j in waiting["data"]] == [(job.id, "sms.send", "PENDING")]
    await drain(worker)
    received = sim.messages(ALINE)
    assert len(received) == 2 and received[1]["message"] == received[0]["message"]  # the same receipt, once more
    await _reports(sim, 2)
    listed = (await admin.json("GET", f"/v1/payments/{payment.id}/messages", 200))["data"]
    assert [(m["template"], m["status"]) for m in listed] == [("payment_receipt", "DELIVERED")] * 2
    assert listed[0]["paymentId"] == payment.id
    async with rt.sessionmaker() as s:
        keys = (await s.execute(select(SmsMessage.idempotency_key).order_by(SmsMessage.created_at))).scalars().all()
    assert keys[0] == f"payment_receipt:{payment.id}" and keys[1].startswith(f"reply:{payment.id}:desk:1@")

    [audit] = await _resend_audits(rt, payment.id)
    assert (audit.actor.startswith("admin:"), audit.channel, audit.entity_type) == (True, "api", "payment")
    assert audit.cooperative_id == demo["cooperative_id"]
    assert audit.after == {"template": "payment_receipt", "jobId": job.id, "phone": "+25078****001", "resend": 1,
                           "note": "member called: no SMS received"}
    assert ALINE not in json.dumps(audit.after)


async def test_a_resend_of_a_refunded_payments_receipt_says_what_was_refunded(
    rt: Any, demo: dict[str, Any], admin: Caller, sim: Any, worker: Any
) -> None:
    """The desk's resend of a payment refunded in part sent the plain receipt, proof of money the cooperative no
    longer holds: it is the receipt that says the refund (payment_receipt_refunded), in her language."""
    from core.models import Payment

    payment = await _paid(rt, demo)
    await drain(worker)
    async with rt.sessionmaker.begin() as s:  # as a refund's completion leaves it (core.refunds)
        await s.execute(update(Payment).where(Payment.id == payment.id).values(status="PARTIALLY_REFUNDED",
                                                                               refunded_minor=20_000))
    resent = await admin.json("POST", f"/v1/payments/{payment.id}/receipt", 202, json={})
    assert resent["template"] == "payment_receipt_refunded"
    await drain(worker)
    [_receipt, again] = sim.messages(ALINE)
    assert again["message"].startswith("Twakiriye 50,000 RWF ya ") and "Byasubijwe nyuma: 20,000 RWF." in \
        again["message"], again["message"]
    [audit] = await _resend_audits(rt, payment.id)
    assert audit.after["template"] == "payment_receipt_refunded"


async def test_the_fourth_resend_in_24_hours_is_refused_until_the_first_leaves_the_window(
    rt: Any, demo: dict[str, Any], admin: Caller, sim: Any, monkeypatch: Any
) -> None:
    payment = await _paid(rt, demo)
    path = f"/v1/payments/{payment.id}/receipt"
    left = [(await admin.json("POST", path, 202))["remaining"] for _ in range(3)]  # no body: the note is optional
    assert left == [2, 1, 0]
    jobs = await _sms_jobs(rt)
    first = (await _resend_audits(rt, payment.id))[0].at

    refused = await admin.req("POST", path, json={"note": "again"})
    body = await refused.json()
    assert refused.status == 429, body
    again = (first.replace(microsecond=0) + messages.RESEND_WINDOW + timedelta(seconds=1 if first.microsecond else 0))
    again_text = again.isoformat().replace("+00:00", "Z")  # the whole second at or after the first's day
    assert f"it can be sent again from {again_text}" in body["message"] and "3 times" in body["message"]
    assert 0 < int(refused.headers["Retry-After"]) <= 24 * 3600 + 1
    assert len(await _sms_jobs(rt)) == len(jobs) and len(await _resend_audits(rt, payment.id)) == 3

    # A day later (the three were sent within a second) they have left the window; the next key is numbered on
    # from the three before (an SMS row's key is never used again).
    monkeypatch.setattr(messages, "utcnow", lambda: utcnow() + messages.RESEND_WINDOW + timedelta(seconds=2))
    assert (await admin.json("POST", path, 202))["remaining"] == 2
    assert (await _sms_jobs(rt))[-1].dedupe_key.startswith(f"sms:reply:{payment.id}:desk:4@")


async def test_two_resends_at_once_beyond_the_bound_queue_one(
    rt: Any, demo: dict[str, Any], client: Any, sim: Any, monkeypatch: Any
) -> None:
    """The payment row is locked while the resends are counted: two requests for the third resend at once do not
    both see two (each holds on after counting, so without the lock both counted before either wrote)."""
    payment = await _paid(rt, demo)
    callers = [await bearer(client, *demo["admin"]) for _ in range(2)]
    path = f"/v1/payments/{payment.id}/receipt"
    for _ in range(2):
        assert (await callers[0].req("POST", path)).status == 202
    counted = messages._resent_at

    async def slow(session: Any, payment_id: str) -> Any:
        found = await counted(session, payment_id)
        await asyncio.sleep(0.3)
        return found

    monkeypatch.setattr(messages, "_resent_at", slow)
    answers = await asyncio.gather(*(caller.req("POST", path) for caller in callers))
    assert sorted(a.status for a in answers) == [202, 429]
    assert len(await _resend_audits(rt, payment.id)) == 3
    assert len(await _sms_jobs(rt)) == 1 + 3


async def test_a_number_that_texted_stop_still_gets_the_receipt_it_asked_for(
    rt: Any, demo: dict[str, Any], admin: Caller, client: Any, sim: Any, worker: Any
) -> None:
    """STOP stops reminders; receipts still come (the STOP confirmation says so), the desk's resend too."""
    payment = await _paid(rt, demo)
    await inbound(client, ALINE, "STOP", "stop-1")
    await drain(worker)
    received = len(sim.messages(ALINE))
    await admin.json("POST", f"/v1/payments/{payment.id}/receipt", 202)
    await drain(worker)
    assert len(sim.messages(ALINE)) == received + 1
    assert len(await _resend_audits(rt, payment.id)) == 1


@pytest.mark.parametrize(("status", "outcome"), [("PENDING", None), ("FAILED", ProviderOutcome.FAILED)])
async def test_a_payment_that_holds_no_money_has_no_receipt_to_send(
    rt: Any, demo: dict[str, Any], admin: Caller, status: str, outcome: ProviderOutcome | None
) -> None:
    payment = await make_payment(rt, demo["cooperative_id"], account=ALINE, status="PENDING", created_at=utcnow(),
                                 member_id=demo["members"][ALINE])
    if outcome is not None:
        await _settled(rt, payment, outcome, reason="INSUFFICIENT_FUNDS")
    jobs = len(await _sms_jobs(rt))
    refused = await admin.json("POST", f"/v1/payments/{payment.id}/receipt", 409)
    assert refused["message"] == (f"payment {payment.reference} is {status}: only a payment whose money was "
                                  "collected (COMPLETED, PARTIALLY_REFUNDED, REFUNDED) has a receipt to send")
    assert len(await _sms_jobs(rt)) == jobs


async def test_a_suspended_members_receipt_is_not_resent(rt: Any, demo: dict[str, Any], admin: Caller) -> None:
    payment = await _paid(rt, demo, JEAN)
    await admin.json("DELETE", f"/v1/members/{demo['members'][JEAN]}", 200)
    refused = await admin.json("POST", f"/v1/payments/{payment.id}/receipt", 409)
    assert refused["message"].startswith("the member is suspended")
    await admin.json("POST", f"/v1/members/{demo['members'][JEAN]}/release-phone", 200)
    refused = await admin.json("POST", f"/v1/payments/{payment.id}/receipt", 409)
    assert refused["message"].startswith("the member's number was released")


async def test_a_payment_of_no_member_is_resent_to_the_number_that_paid_while_it_is_recent(
    rt: Any, demo: dict[str, Any], admin: Caller, sim: Any, worker: Any
) -> None:
    payment = await _paid(rt, demo, STRANGER, member=False)
    resent = await admin.json("POST", f"/v1/payments/{payment.id}/receipt", 202)
    assert resent["phone"] == payment.payment_account_masked
    await drain(worker)
    assert len(sim.messages(STRANGER)) == 2  # the receipt and its resend
    listed = (await admin.json("GET", f"/v1/payments/{payment.id}/messages", 200))["data"]
    assert [(m["memberId"], m["paymentId"]) for m in listed] == [(None, payment.id)] * 2

    old = await make_payment(rt, demo["cooperative_id"], account=STRANGER, status="COMPLETED",
                             created_at=utcnow() - timedelta(days=91))
    refused = await admin.json("POST", f"/v1/payments/{old.id}/receipt", 409)
    assert "more than 90 days ago" in refused["message"]


@pytest.mark.parametrize("change", ["NEW_SIM", "TYPO"])
async def test_a_payment_of_no_member_is_not_resent_to_its_number_once_a_member_got_it(
    rt: Any, demo: dict[str, Any], admin: Caller, sim: Any, worker: Any, change: str
) -> None:
    """Paid from a number no member had; Jean was then moved to that number (a new SIM, a swap: the operator gave
    it to him). The receipt resent to the number that paid would tell him of another's payment (its amount, its
    reference): refused, as the RECEIPT keyword from that number is not answered (channels.sms.routes._owns) and a
    refund's SMS is not sent there (core.refunds.payer_to_tell). A TYPO correction (the number was his all
    along: he paid it) resends as before."""
    payment = await _paid(rt, demo, STRANGER, member=False)
    await drain(worker)
    received = len(sim.messages(STRANGER))
    await admin.json("PATCH", f"/v1/members/{demo['members'][JEAN]}", 200,
                     json={"phone": STRANGER, "phoneChange": change})
    jobs = len(await _sms_jobs(rt))
    if change == "TYPO":
        await admin.json("POST", f"/v1/payments/{payment.id}/receipt", 202)
        await drain(worker)
        assert len(sim.messages(STRANGER)) == received + 1
        return
    refused = await admin.json("POST", f"/v1/payments/{payment.id}/receipt", 409)
    assert refused["message"] == ("the payment has no member and the number that paid it went to a member since (a "
                                  "swap, a new SIM): the receipt would tell that member of another's payment")
    assert len(await _sms_jobs(rt)) == jobs
    assert await _resend_audits(rt, payment.id) == []
    await drain(worker)
    assert len(sim.messages(STRANGER)) == received


async def test_the_key_shapes_a_payments_messages_are_found_by(rt: Any, demo: dict[str, Any], admin: Caller) -> None:
    """Every key shape of a message about the payment is found (a USSD receipt's as channels.ussd.flows writes it,
    a long inbound id digested), and none of a payment whose id only begins the same, nor a keyword reply queued
    before its key named the payment."""
    from channels.sms.routes import reply_key

    payment = await _paid(rt, demo)
    other = payment.id[:-1] + ("0" if payment.id[-1] != "0" else "1")
    keys = {
        f"payment_receipt:{payment.id}": True,
        f"ussd-receipt:{payment.id}:ATUid_1@1768500000000": True,
        reply_key(payment.id, "in:" + "x" * 128): True,
        f"payment_receipt:{other}": False,
        f"reply:{payment.id}:desk:1@1768500000000": True,
        f"reply:{other}:desk:1@1768500000000": False,
        f"ussd-receipt:{payment.id}": False,  # no origin: not a shape any code writes
        "inbound:ATXid_1": False,
    }
    assert all(len(key) <= 160 for key in keys)
    async with rt.sessionmaker.begin() as s:
        for n, key in enumerate(keys):
            s.add(SmsMessage(cooperative_id=demo["cooperative_id"], phone_enc="x", phone_index="i", phone_masked="m",
                             template="payment_receipt", language="en", body="b", encoding="GSM-7", length=1,
                             segments=1, status="SENT", idempotency_key=key,
                             created_at=utcnow() - timedelta(minutes=n), updated_at=utcnow()))
    listed = (await admin.json("GET", f"/v1/payments/{payment.id}/messages", 200))["data"]
    async with rt.sessionmaker() as s:
        found = set((await s.execute(select(SmsMessage.idempotency_key)
                                     .where(SmsMessage.id.in_([m["id"] for m in listed])))).scalars())
    assert found == {key for key, ours in keys.items() if ours}
    assert all(m["paymentId"] == payment.id for m in listed)
    async with rt.sessionmaker() as s:
        assert (await s.execute(select(func.count()).select_from(SmsMessage))).scalar_one() == len(keys)


@requires_pg  # the restore is played with PostgreSQL's session_replication_role (the audit log refuses deletes)
async def test_a_resend_after_a_restore_lost_the_previous_one_is_sent(
    rt: Any, demo: dict[str, Any], admin: Caller, sim: Any, worker: Any
) -> None:
    """PostgreSQL restored to before the desk's first resend: its audit row, job and SMS row are gone, while the SMS
    service's answer to its send is still kept in Redis (channels.sms.jobs.ANSWER_SECONDS). The next resend is
    numbered 1 again; keyed by the number alone it met that answer and was stored SENT, sending nothing, while the
    desk told the member it was on its way."""
    payment = await _paid(rt, demo)
    await drain(worker)
    path = f"/v1/payments/{payment.id}/receipt"
    first = await admin.json("POST", path, 202)
    await drain(worker)
    assert len(sim.messages(ALINE)) == 2
    async with rt.sessionmaker.begin() as s:  # the restore: what the first resend wrote is gone
        await s.execute(sql("SET LOCAL session_replication_role = replica"))  # the audit log refuses deletes
        await s.execute(delete(AuditEvent).where(AuditEvent.action == messages.RESENT_ACTION))
        await s.execute(delete(OutboxJob).where(OutboxJob.id == first["jobId"]))
        await s.execute(delete(SmsMessage).where(SmsMessage.idempotency_key.like(f"reply:{payment.id}:desk:%")))

    again = await admin.json("POST", path, 202)
    assert again["remaining"] == 2  # counted from the audit rows the database has
    await drain(worker)
    received = sim.messages(ALINE)
    assert len(received) == 3 and received[2]["message"] == received[0]["message"]
    async with rt.sessionmaker() as s:
        [row] = (await s.execute(select(SmsMessage).where(
            SmsMessage.idempotency_key.like(f"reply:{payment.id}:desk:%")))).scalars().all()
    assert row.status in ("SENT", "DELIVERED") and row.provider_message_id is not None
