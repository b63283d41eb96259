"""A member who left asks to be erased (Rwanda law 058/2021, Kenya DPA s.40): POST /v1/members/{id}/erase takes her
name, unit and number off her record, her payments' account off her payments, her number and texts off her SMS rows
and her e-mail off her tenant login, while the money records (amounts, references, provider transaction ids) stay;
and nothing written from now on puts her name or login in the append-only audit log."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp import web
from sqlalchemy import Update, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from channels.ussd.sessions import phone_keys
from core.audit import Actor
from core.members import erase_member
from core.models import (
    AdminUser,
    AuditEvent,
    Dispute,
    Member,
    OutboxJob,
    Payment,
    PhoneOptOut,
    Refund,
    SmsMessage,
    UssdSession,
    WebhookDelivery,
)
from core.notify import SMS_PHONE_CONTEXT, emit_event
from core.provider_events import event_data
from core.retention import RetentionPolicy, prune
from tests.admin_api.conftest import Caller, idem
from tests.channels.sms.helpers import make_payment, start_simulator
from tests.conftest import drain, is_postgres, waiting_for_locks
from tests.core.test_webhooks import approved_endpoint

NAME, PHONE, UNIT, EMAIL = "Jeanne Mukeshimana", "+250788777111", "D-707", "jeanne.m@example.rw"


async def _audits(rt: Any, member_id: str, action: str) -> list[AuditEvent]:
    async with rt.sessionmaker() as s:
        return list((await s.execute(select(AuditEvent).where(
            AuditEvent.entity_id == member_id, AuditEvent.action == action).order_by(AuditEvent.id))).scalars())


async def _jeanne(admin: Caller) -> dict[str, Any]:
    return await admin.json("POST", "/v1/members", 201, json={"name": NAME, "phone": PHONE, "unit": UNIT,
                                                               "status": "PENDING"})


async def test_erasure_removes_her_name_number_and_login_and_keeps_the_money(
        rt: Any, client: Any, admin: Caller, demo: Any, worker: Any, aiohttp_server: Any) -> None:
    _, sim = await start_simulator(aiohttp_server, rt)
    jeanne = await _jeanne(admin)
    await admin.json("POST", f"/v1/members/{jeanne['id']}/approve", 200)  # the "you are now a member" SMS
    await drain(worker)
    assert [r["to"] for r in sim.requests] == [PHONE]
    paid = await make_payment(rt, demo["cooperative_id"], account=PHONE, member_id=jeanne["id"])
    login = await admin.json("POST", "/v1/users", 201, json={"username": EMAIL, "password": "tenant-password-1",
                                                              "role": "TENANT", "memberId": jeanne["id"]})
    async with rt.sessionmaker() as s:
        index = (await s.get(Member, jeanne["id"])).phone_index
    for key in phone_keys(index):
        await rt.redis.set(key, "rw")
    await admin.json("DELETE", f"/v1/members/{jeanne['id']}", 200)

    erased = await admin.json("POST", f"/v1/members/{jeanne['id']}/erase", 200)
    assert (erased["name"], erased["unit"], erased["phone"], erased["phoneReleased"], erased["status"]) == (
        "Erased member", None, "erased", True, "SUSPENDED")

    # Her record: no name, unit or number; the number can be registered again, and is no longer hers.
    async with rt.sessionmaker() as s:
        row = await s.get(Member, jeanne["id"])
        assert (row.name, row.unit, row.phone_enc, row.phone_index, row.phone_masked) == (
            "Erased member", None, None, None, "erased")
    assert await rt.redis.exists(*phone_keys(index)) == 0
    assert (await admin.json("GET", f"/v1/members?phone={PHONE.replace('+', '%2B')}", 200))["data"] == []
    # Her payment: the money record stays, nothing in it reaches her number.
    assert (await admin.json("GET", f"/v1/payments?paymentAccount={PHONE.replace('+', '%2B')}", 200))["data"] == []
    kept = await admin.json("GET", f"/v1/payments/{paid.id}", 200)
    assert (kept["reference"], kept["amount"], kept["status"], kept["paymentAccount"]) == (
        paid.reference, 50000, "COMPLETED", "erased")
    async with rt.sessionmaker() as s:
        pay = await s.get(Payment, paid.id)
        assert (pay.payment_account_enc, pay.payment_account_index, pay.request_hash) == ("", "", "")
        assert (pay.member_id, pay.provider_transaction_id, pay.amount_minor) == (jeanne["id"], "MTN-TX-778899", 50000)
        [sms] = (await s.execute(select(SmsMessage).where(SmsMessage.member_id == jeanne["id"]))).scalars().all()
    assert (sms.phone_enc, sms.phone_index, sms.phone_masked, sms.body) == ("", "", "erased", "")
    assert (sms.status, sms.template) == ("SENT", "member_approved")  # what was sent, and when, stays
    # Her tenant login: off, and named by its id only; her e-mail no longer signs in.
    users = await admin.json("GET", "/v1/users?limit=100", 200)
    [account] = [u for u in users["data"] if u["id"] == login["id"]]
    assert (account["username"], account["isActive"]) == (f"erased-{login['id']}", False)
    assert EMAIL not in json.dumps(users)
    signin = await client.post("/v1/auth/token", json={"username": EMAIL, "password": "tenant-password-1"})
    assert signin.status == 401
    # The audit log names her by id only: not her name, unit, number or e-mail.
    audit = json.dumps(await admin.json("GET", "/v1/audit-events?limit=100", 200))
    for personal in (NAME, UNIT, PHONE, PHONE[1:], EMAIL):
        assert personal not in audit
    [event] = await _audits(rt, jeanne["id"], "member.erased")
    assert event.after == {"erased": True, "payments": 1, "smsMessages": 1, "ussdSessions": 0,
                           "users": [login["id"]]}
    assert event.before is None
    # The number is free: its next holder registers.
    await admin.json("POST", "/v1/members", 201, json={"name": "Next Holder", "phone": PHONE})


async def test_only_a_suspended_member_with_no_open_payment_is_erased_and_only_once(
        rt: Any, admin: Caller, superadmin: Caller, demo: Any) -> None:
    jeanne = await _jeanne(admin)
    active = await admin.json("POST", f"/v1/members/{jeanne['id']}/erase", 409)
    assert active["message"] == "member is PENDING: suspend the member before erasing it"
    open_payment = await make_payment(rt, demo["cooperative_id"], account=PHONE, member_id=jeanne["id"],
                                      status="PROCESSING")
    await admin.json("DELETE", f"/v1/members/{jeanne['id']}", 200)
    refused = await admin.json("POST", f"/v1/members/{jeanne['id']}/erase", 409)
    assert refused["message"] == ("the member has 1 payment(s) still open (PENDING or PROCESSING): erase the "
                                  "member once they have settled")
    # Nothing changed.
    member = await admin.json("GET", f"/v1/members/{jeanne['id']}", 200)
    assert (member["name"], member["unit"], member["phoneReleased"]) == (NAME, UNIT, False)
    async with rt.sessionmaker() as s:
        assert (await s.get(Payment, open_payment.id)).payment_account_index == rt.cipher.blind_index(PHONE)
    assert await _audits(rt, jeanne["id"], "member.erased") == []

    async with rt.sessionmaker.begin() as s:  # it settles
        (await s.get(Payment, open_payment.id)).status = "FAILED"
    await superadmin.json("POST", f"/v1/members/{jeanne['id']}/erase", 200)
    again = await admin.json("POST", f"/v1/members/{jeanne['id']}/erase", 200)  # a retry changes nothing
    assert (again["name"], again["phone"]) == ("Erased member", "erased")
    assert len(await _audits(rt, jeanne["id"], "member.erased")) == 1
    # Erased means released: she cannot come back with no number.
    back = await admin.json("PATCH", f"/v1/members/{jeanne['id']}", 409, json={"status": "ACTIVE"})
    assert "released" in back["message"]


async def test_no_login_is_made_or_turned_on_for_an_erased_or_departed_member(
        client: Any, admin: Caller, demo: Any) -> None:
    """Her membership can never be active again (released: REGISTER_AGAIN), so a login of hers could never sign in:
    one made for her answered 201 and tied her e-mail to her erased record again; one turned on, isActive true."""
    jeanne = await _jeanne(admin)
    login = await admin.json("POST", "/v1/users", 201, json={"username": EMAIL, "password": "tenant-password-1",
                                                              "role": "TENANT", "memberId": jeanne["id"]})
    await admin.json("DELETE", f"/v1/members/{jeanne['id']}", 200)
    await admin.json("POST", f"/v1/members/{jeanne['id']}/erase", 200)

    made = await admin.json("POST", "/v1/users", 409, json={"username": EMAIL, "password": "tenant-password-1",
                                                             "role": "TENANT", "memberId": jeanne["id"]})
    assert (made["code"], made["field"]) == ("INVALID_STATE", "memberId")
    assert made["message"].startswith("the member's phone number was released (the member left, or was erased)")
    on = await admin.json("PATCH", f"/v1/users/{login['id']}", 409, json={"isActive": True})
    assert (on["code"], on["field"]) == ("INVALID_STATE", "isActive")
    users = await admin.json("GET", "/v1/users?limit=100", 200)
    assert EMAIL not in json.dumps(users)
    assert [u["isActive"] for u in users["data"] if u["memberId"] == jeanne["id"]] == [False]
    # A member who left with her number released (not erased) likewise; one merely suspended still gets one.
    bosco = demo["members"]["+250788000002"]
    await admin.json("DELETE", f"/v1/members/{bosco}", 200)
    await admin.json("POST", "/v1/users", 201, json={"username": "bosco@kh.rw", "password": "bosco-password-1",
                                                      "role": "TENANT", "memberId": bosco})
    await admin.json("POST", f"/v1/members/{bosco}/release-phone", 200)
    await admin.json("POST", "/v1/users", 409, json={"username": "bosco2@kh.rw", "password": "bosco-password-1",
                                                      "role": "TENANT", "memberId": bosco})


async def test_a_login_made_or_turned_on_while_she_is_erased_waits_for_the_erasure_and_is_refused(
        rt: Any, admin: Caller, demo: Any) -> None:
    """The member's row is read under her lock, which an erasure holds to its commit (on SQLite the write lock:
    serialise_on_sqlite). Read without it on SQLite, the number an erasure under way had not yet committed was
    there: the login was made (201, her e-mail tied to her erased record) or turned on (isActive true) once it had."""
    jeanne = await _jeanne(admin)
    login = await admin.json("POST", "/v1/users", 201, json={"username": EMAIL, "password": "tenant-password-1",
                                                              "role": "TENANT", "memberId": jeanne["id"]})
    await admin.json("DELETE", f"/v1/users/{login['id']}", 200)
    await admin.json("DELETE", f"/v1/members/{jeanne['id']}", 200)
    erasing = rt.sessionmaker()
    try:
        await erasing.begin()
        await erase_member(erasing, await erasing.get(Member, jeanne["id"]), actor=Actor("admin:test", "admin"))
        made = asyncio.create_task(admin.req("POST", "/v1/users", json={
            "username": "jeanne.new@example.rw", "password": "tenant-password-1", "role": "TENANT",
            "memberId": jeanne["id"]}))
        on = asyncio.create_task(admin.req("PATCH", f"/v1/users/{login['id']}", json={"isActive": True}))
        if is_postgres():
            await waiting_for_locks(rt, 2)
        else:
            await asyncio.sleep(1)
        await erasing.commit()
        answers = await asyncio.gather(made, on)
    finally:
        await erasing.close()
    bodies = [(a.status, await a.json()) for a in answers]
    assert [(status, body.get("code"), body.get("field")) for status, body in bodies] == [
        (409, "INVALID_STATE", "memberId"), (409, "INVALID_STATE", "isActive")], bodies
    async with rt.sessionmaker() as s:
        logins = (await s.execute(select(AdminUser).where(AdminUser.member_id == jeanne["id"]))).scalars().all()
    assert [(u.username, u.is_active) for u in logins] == [(f"erased-{login['id']}", False)]


async def test_a_message_still_queued_is_not_sent_and_her_numbers_stop_goes(
        rt: Any, admin: Caller, demo: Any, worker: Any, aiohttp_server: Any) -> None:
    _, sim = await start_simulator(aiohttp_server, rt)
    jeanne = await _jeanne(admin)
    await admin.json("POST", f"/v1/members/{jeanne['id']}/approve", 200)  # queued, not sent yet
    async with rt.sessionmaker.begin() as s:
        parked = str((await s.execute(insert(SmsMessage).values(
            cooperative_id=demo["cooperative_id"], member_id=jeanne["id"],
            phone_enc=rt.cipher.encrypt(PHONE, context=SMS_PHONE_CONTEXT), phone_index=rt.cipher.blind_index(PHONE),
            phone_masked="+25078****111", template="help", language="en", body=f"Hello {NAME}", encoding="GSM-7",
            length=20, segments=1, status="QUEUED", idempotency_key="parked-help-1").returning(SmsMessage.id)
        )).scalar_one())
        s.add(PhoneOptOut(phone_index=rt.cipher.blind_index(PHONE), created_at=datetime.now(UTC)))
    await admin.json("DELETE", f"/v1/members/{jeanne['id']}", 200)
    await admin.json("POST", f"/v1/members/{jeanne['id']}/erase", 200)
    await drain(worker)
    assert sim.requests == []  # neither the welcome nor the parked message left
    async with rt.sessionmaker() as s:
        row = await s.get(SmsMessage, parked)
        assert (row.status, row.failure_reason, row.body, row.phone_enc) == (
            "FAILED", "not sent: member_erased", "", "")
        # Its audit row says which text it was and whose, and neither her number nor the text it held.
        [held] = (await s.execute(select(AuditEvent).where(AuditEvent.entity_id == parked))).scalars().all()
        assert (held.action, held.after["template"], held.after["memberId"]) == ("sms.failed", "help", jeanne["id"])
        assert NAME not in str(held.after) and PHONE[-9:] not in str(held.after)
        # Her STOP was hers: the number's next holder does not inherit it.
        assert await s.get(PhoneOptOut, rt.cipher.blind_index(PHONE)) is None
        forget = (await s.execute(select(OutboxJob).where(OutboxJob.kind == "ussd.forget_phone"))).scalars().all()
    assert [j.payload["blind_index"] for j in forget] == [rt.cipher.blind_index(PHONE)]


async def test_a_refund_of_an_erased_members_payment_is_recorded_not_sent(rt: Any, admin: Caller, demo: Any) -> None:
    jeanne = await _jeanne(admin)
    paid = await make_payment(rt, demo["cooperative_id"], account=PHONE, member_id=jeanne["id"])
    await admin.json("DELETE", f"/v1/members/{jeanne['id']}", 200)
    await admin.json("POST", f"/v1/members/{jeanne['id']}/erase", 200)
    refused = await admin.json("POST", f"/v1/payments/{paid.id}/refunds", 409, json={"idempotencyKey": idem()})
    assert refused["message"] == ("the payment's member was erased: the account to refund is no longer known; "
                                  "record a refund the provider made with returnedByProvider")
    assert refused["code"] == "MEMBER_ERASED"  # not CONFLICT: nothing to send again, a recording to make
    recorded = await admin.json("POST", f"/v1/payments/{paid.id}/refunds", 201, json={
        "idempotencyKey": idem(), "returnedByProvider": {"providerTransactionId": "MTN-REV-1"}})
    assert recorded["status"] == "COMPLETED"


async def test_audit_rows_say_which_personal_fields_changed_not_their_values(rt: Any, admin: Caller) -> None:
    jeanne = await _jeanne(admin)
    await admin.json("PATCH", f"/v1/members/{jeanne['id']}", 200,
                     json={"name": "Jeanne M. Uwera", "unit": "E-1", "language": "rw"})
    [event] = await _audits(rt, jeanne["id"], "member.updated")
    assert event.before == {"language": "en", "status": "PENDING"}
    assert event.after == {"language": "rw", "status": "PENDING", "name": "changed", "unit": "changed"}
    login = await admin.json("POST", "/v1/users", 201, json={"username": EMAIL, "password": "tenant-password-1",
                                                              "role": "TENANT", "memberId": jeanne["id"]})
    [created] = await _audits(rt, login["id"], "user.created")
    assert created.after == {"role": "TENANT", "memberId": jeanne["id"]}  # a tenant's username is often her e-mail


async def test_prune_empties_an_old_messages_number_with_its_text(rt: Any) -> None:
    old = datetime.now(UTC) - timedelta(days=200)
    async with rt.sessionmaker.begin() as s:
        sent = str((await s.execute(insert(SmsMessage).values(
            phone_enc=rt.cipher.encrypt(PHONE, context=SMS_PHONE_CONTEXT), phone_index=rt.cipher.blind_index(PHONE),
            phone_masked="+25078****111", template="receipt", language="en", body="Paid 50,000 RWF", encoding="GSM-7",
            length=15, segments=1, status="SENT", idempotency_key="old-receipt", created_at=old, updated_at=old)
            .returning(SmsMessage.id))).scalar_one())
    report = {p.table: p.count for p in await prune(rt.engine, RetentionPolicy())}
    assert report["sms_messages"] == 1
    async with rt.sessionmaker() as s:
        row = await s.get(SmsMessage, sent)
    assert (row.body, row.phone_enc, row.phone_index, row.phone_masked) == ("", "", "", "+25078****111")


async def test_erase_of_another_cooperatives_member_is_not_found(admin: Caller, demo: Any, coop_b: Any) -> None:
    await coop_b["admin"].json("DELETE", f"/v1/members/{coop_b['member_id']}", 200)
    await admin.json("POST", f"/v1/members/{coop_b['member_id']}/erase", 404)
    assert (await coop_b["admin"].json("GET", f"/v1/members/{coop_b['member_id']}", 200))["name"] == "Bea Other"


async def test_a_retry_of_the_request_that_made_an_erased_members_payment_gets_the_payment(
        rt: Any, admin: Caller, demo: Any) -> None:
    """Her request's hash is cleared with her number: an integrator's retry of the same key and body gets the
    payment (marked replayed), not a 409 calling it "a different request"."""
    from tests.admin_api.conftest import complete_payment, payment_body

    member = await admin.json("POST", "/v1/members", 201, json={"name": "Jeanne M", "phone": "+250788777222"})
    if member["status"] != "ACTIVE":
        await admin.json("POST", f"/v1/members/{member['id']}/approve", 200)
    ptype = next(iter(demo["payment_types"].values()))
    body = payment_body(ptype, paymentAccount="+250788777222", memberId=member["id"],
                        idempotencyKey="int-retry-000001")
    body["amount"] = (await admin.json("GET", f"/v1/payment-types/{ptype}", 200))["amount"]
    first = await admin.json("POST", "/v1/payments", 201, json=body)
    await complete_payment(rt, first["id"])
    await admin.json("DELETE", f"/v1/members/{member['id']}", 200)
    await admin.json("POST", f"/v1/members/{member['id']}/erase", 200)
    again = await admin.req("POST", "/v1/payments", json=body)
    assert again.status == 201 and again.headers["Idempotent-Replayed"] == "true"
    assert (await again.json())["id"] == first["id"]


async def _memberless_sms(rt: Any, cooperative_id: str | None, key: str, status: str = "SENT") -> str:
    async with rt.sessionmaker.begin() as s:
        return str((await s.execute(insert(SmsMessage).values(
            cooperative_id=cooperative_id, member_id=None,
            phone_enc=rt.cipher.encrypt(PHONE, context=SMS_PHONE_CONTEXT), phone_index=rt.cipher.blind_index(PHONE),
            phone_masked="+25078****111", template="help", language="en", body="Reply PAY to pay", encoding="GSM-7",
            length=16, segments=1, status=status, idempotency_key=key).returning(SmsMessage.id))).scalar_one())


async def _ussd_session(rt: Any, session_id: str, cooperative_id: str | None, member_id: str | None) -> str:
    async with rt.sessionmaker.begin() as s:
        return str((await s.execute(insert(UssdSession).values(
            aggregator="africastalking", session_id=session_id, cooperative_id=cooperative_id, member_id=member_id,
            phone_index=rt.cipher.blind_index(PHONE), phone_masked="+25078****111", service_code="*384*123#",
            status="Success", hops=4, last_screen="paid").returning(UssdSession.id))).scalar_one())


async def test_what_her_number_left_as_she_registered_is_erased_too_in_her_cooperative_only(
        rt: Any, admin: Caller, demo: Any, coop_b: Any) -> None:
    """A payment she made and the texts she got as she registered, and the USSD sessions of her dials, carry
    her number with no member attached: an erasure that cleared only rows naming her left her number in them
    (found by her number in the payments list). Another cooperative's rows of the same number are not touched."""
    coop = demo["cooperative_id"]
    just_before = datetime.now(UTC) - timedelta(minutes=20)  # the payment she made, then registered
    before = await make_payment(rt, coop, account=PHONE, member_id=None, reference="RENT-PRE-1",
                                created_at=just_before)
    elsewhere = await make_payment(rt, coop_b["cooperative_id"], account=PHONE, member_id=None, reference="B-PRE-1")
    texts = [await _memberless_sms(rt, coop, "pre-help-1"), await _memberless_sms(rt, None, "pre-unknown-1")]
    queued = await _memberless_sms(rt, coop, "pre-help-2", status="QUEUED")
    their_text = await _memberless_sms(rt, coop_b["cooperative_id"], "b-help-1")
    jeanne = await _jeanne(admin)
    dials = [await _ussd_session(rt, "ATUid_pre", None, None), await _ussd_session(rt, "ATUid_her", coop, jeanne["id"])]
    their_dial = await _ussd_session(rt, "ATUid_b", coop_b["cooperative_id"], None)
    await admin.json("DELETE", f"/v1/members/{jeanne['id']}", 200)

    await admin.json("POST", f"/v1/members/{jeanne['id']}/erase", 200)

    assert (await admin.json("GET", f"/v1/payments?paymentAccount={PHONE.replace('+', '%2B')}", 200))["data"] == []
    index = rt.cipher.blind_index(PHONE)
    async with rt.sessionmaker() as s:
        mine = await s.get(Payment, before.id)
        assert (mine.payment_account_enc, mine.payment_account_index, mine.payment_account_masked) == ("", "", "erased")
        assert (mine.reference, mine.amount_minor, mine.status) == ("RENT-PRE-1", 50000, "COMPLETED")
        for text in [*texts, queued]:
            row = await s.get(SmsMessage, text)
            assert (row.phone_enc, row.phone_index, row.phone_masked, row.body) == ("", "", "erased", "")
        assert (await s.get(SmsMessage, queued)).status == "FAILED"  # never sent to her number
        for dial in dials:
            row = await s.get(UssdSession, dial)
            assert (row.phone_index, row.phone_masked, row.last_screen) == ("", "erased", "paid")
        # The other cooperative's records of the number are its own.
        assert (await s.get(Payment, elsewhere.id)).payment_account_index == index
        assert (await s.get(SmsMessage, their_text)).phone_index == index
        assert (await s.get(UssdSession, their_dial)).phone_index == index
    [event] = await _audits(rt, jeanne["id"], "member.erased")
    assert event.after is not None
    assert (event.after["payments"], event.after["smsMessages"], event.after["ussdSessions"]) == (1, 3, 2)


async def test_an_open_payment_from_her_number_as_she_registered_holds_the_erasure(
        rt: Any, admin: Caller, demo: Any) -> None:
    pending = await make_payment(rt, demo["cooperative_id"], account=PHONE, member_id=None, status="PENDING",
                                 created_at=datetime.now(UTC) - timedelta(minutes=10))
    jeanne = await _jeanne(admin)
    await admin.json("DELETE", f"/v1/members/{jeanne['id']}", 200)
    refused = await admin.json("POST", f"/v1/members/{jeanne['id']}/erase", 409)
    assert refused["message"].startswith("the member has 1 payment(s) still open")
    async with rt.sessionmaker() as s:
        assert (await s.get(Payment, pending.id)).payment_account_index == rt.cipher.blind_index(PHONE)


async def test_a_number_she_released_earlier_keeps_its_memberless_rows(rt: Any, admin: Caller, demo: Any) -> None:
    """Once released her number may be another person's: rows it left with no member attached are not hers to erase."""
    jeanne = await _jeanne(admin)
    await admin.json("DELETE", f"/v1/members/{jeanne['id']}", 200)
    await admin.json("POST", f"/v1/members/{jeanne['id']}/release-phone", 200)
    later = await make_payment(rt, demo["cooperative_id"], account=PHONE, member_id=None)
    await admin.json("POST", f"/v1/members/{jeanne['id']}/erase", 200)
    async with rt.sessionmaker() as s:
        assert (await s.get(Payment, later.id)).payment_account_index == rt.cipher.blind_index(PHONE)


async def test_what_her_number_left_before_she_had_it_is_its_previous_holders(
        rt: Any, admin: Caller, demo: Any) -> None:
    """Operators give a number out again: a payment made from it months before she registered was its previous
    holder's, and erasing her wiped his record (his payment's account, a refund of it refused for good)."""
    his = await make_payment(rt, demo["cooperative_id"], account=PHONE, member_id=None, reference="RENT-HIS-1",
                             created_at=datetime.now(UTC) - timedelta(days=200))
    his_text = await _memberless_sms(rt, demo["cooperative_id"], "his-help-1")
    async with rt.sessionmaker.begin() as s:
        (await s.get(SmsMessage, his_text)).created_at = datetime.now(UTC) - timedelta(days=200)
    jeanne = await _jeanne(admin)
    await admin.json("DELETE", f"/v1/members/{jeanne['id']}", 200)
    await admin.json("POST", f"/v1/members/{jeanne['id']}/erase", 200)
    async with rt.sessionmaker() as s:
        kept = await s.get(Payment, his.id)
        assert (kept.payment_account_index, kept.payment_account_masked) == (
            rt.cipher.blind_index(PHONE), his.payment_account_masked)
        assert (await s.get(SmsMessage, his_text)).body == "Reply PAY to pay"
    refund = await admin.json("POST", f"/v1/payments/{his.id}/refunds", 201, json={"idempotencyKey": idem()})
    assert refund["status"] == "PENDING"


async def test_a_corrected_number_counts_from_its_correction(rt: Any, admin: Caller, demo: Any) -> None:
    """She registered long ago with another number and was given this one by a correction: what this number
    left before the correction (less the margin) was someone else's."""
    jeanne = await admin.json("POST", "/v1/members", 201, json={"name": NAME, "phone": "+250788777999"})
    async with rt.sessionmaker.begin() as s:
        (await s.get(Member, jeanne["id"])).created_at = datetime.now(UTC) - timedelta(days=400)
    earlier = await make_payment(rt, demo["cooperative_id"], account=PHONE, member_id=None,
                                 created_at=datetime.now(UTC) - timedelta(days=30))
    await admin.json("PATCH", f"/v1/members/{jeanne['id']}", 200, json={"phone": PHONE})
    await admin.json("DELETE", f"/v1/members/{jeanne['id']}", 200)
    await admin.json("POST", f"/v1/members/{jeanne['id']}/erase", 200)
    async with rt.sessionmaker() as s:
        assert (await s.get(Payment, earlier.id)).payment_account_index == rt.cipher.blind_index(PHONE)


async def test_free_text_on_her_payments_and_refunds_goes_with_the_erasure(rt: Any, admin: Caller, demo: Any) -> None:
    """The cooperative's system wrote her name and unit in her payment's description (her PIN prompt showed it), and
    its desk her name and number in a review's note, a cancellation's note and a refund's reason: all of it was left
    on the money records, read by the API, the payment sync and the CSV export. What the gateway itself wrote (the
    flag a review cleared, who reviewed it and when), the amounts and the references stay."""
    jeanne = await _jeanne(admin)
    about = f"{NAME} {UNIT} {PHONE}"
    paid = await make_payment(rt, demo["cooperative_id"], account=PHONE, member_id=jeanne["id"])
    cancelled = await make_payment(rt, demo["cooperative_id"], account=PHONE, member_id=jeanne["id"],
                                   status="CANCELLED", failure_reason=f"cancelled by the cooperative: {about}")
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Payment).where(Payment.id == paid.id).values(
            description=f"Rent {about}", mismatch=True, mismatch_detail="provider reported 60000, expected 50000"))
    await admin.json("POST", f"/v1/payments/{paid.id}/review", 200, json={"note": f"called {about}"})
    refund_key = idem()
    refund = await admin.json("POST", f"/v1/payments/{paid.id}/refunds", 201, json={
        "idempotencyKey": refund_key, "amount": 1000, "reason": f"overpaid by {about}",
        "returnedByProvider": {"providerTransactionId": "MTN-REV-9"}})
    await admin.json("DELETE", f"/v1/members/{jeanne['id']}", 200)

    await admin.json("POST", f"/v1/members/{jeanne['id']}/erase", 200)

    seen = json.dumps([await admin.json("GET", f"/v1/payments/{paid.id}", 200),
                       await admin.json("GET", f"/v1/payments/{cancelled.id}", 200),
                       await admin.json("GET", f"/v1/refunds/{refund['id']}", 200)])
    for personal in (NAME, UNIT, PHONE, PHONE[1:]):
        assert personal not in seen, seen
    async with rt.sessionmaker() as s:
        kept = await s.get(Payment, paid.id)
        assert (kept.description, kept.review_note) == (None, "[note erased]")
        assert (kept.reviewed_detail, kept.reviewed_by is not None, kept.reviewed_at is not None) == (
            "provider reported 60000, expected 50000", True, True)
        assert (kept.amount_minor, kept.refunded_minor, kept.reference) == (50000, 1000, paid.reference)
        gone = await s.get(Payment, cancelled.id)
        assert (gone.status, gone.failure_reason) == ("CANCELLED", "cancelled by the cooperative: [note erased]")
        back = await s.get(Refund, refund["id"])
        assert (back.reason, back.status, back.amount_minor) == (None, "COMPLETED", 1000)
        # Its request's hash (which covers the reason) goes as a payment's does: the key alone answers with it.
        assert back.request_hash is None
    again = await admin.json("POST", f"/v1/payments/{paid.id}/refunds", 201, json={
        "idempotencyKey": refund_key, "amount": 1000, "reason": "overpaid",
        "returnedByProvider": {"providerTransactionId": "MTN-REV-9"}})
    assert again["id"] == refund["id"]


async def _receiver_down(rt: Any, demo: Any, aiohttp_server: Any) -> tuple[list[dict[str, Any]], dict[str, bool]]:
    """The cooperative's endpoint on a receiver answering 503 until `up["now"]` is set (its deliveries wait, to be
    sent by a retry after her erasure), then keeping each event it is sent in `received`."""
    received: list[dict[str, Any]] = []
    up = {"now": False}

    async def hook(request: web.Request) -> web.Response:
        if not up["now"]:
            return web.Response(status=503)
        received.append(await request.json())
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", hook)
    server = await aiohttp_server(app)
    await approved_endpoint(rt, demo["cooperative_id"], f"http://127.0.0.1:{server.port}/hook")
    return received, up


async def test_her_payments_stored_webhook_events_are_scrubbed_and_a_waiting_one_is_sent_scrubbed(
        rt: Any, admin: Caller, demo: Any, worker: Any, aiohttp_server: Any) -> None:
    """The events told of her payments and refunds stay stored after they are sent (delivery rows and webhook.event
    jobs, until retention prunes them) and a waiting one is sent from its row: her number's mask on each payment's
    event, her name and number in the notes the desk wrote (a cancellation's, a review's, a refund's reason) stayed
    readable in them after her erasure, and a delivery retried after it sent them to the receiver."""
    received, up = await _receiver_down(rt, demo, aiohttp_server)
    jeanne = await _jeanne(admin)
    about = f"{NAME} {UNIT} {PHONE}"
    paid = await make_payment(rt, demo["cooperative_id"], account=PHONE, member_id=jeanne["id"])
    cancelled = await make_payment(rt, demo["cooperative_id"], account=PHONE, member_id=jeanne["id"],
                                   status="CANCELLED", failure_reason=f"cancelled by the cooperative: {about}")
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Payment).where(Payment.id == paid.id).values(
            mismatch=True, mismatch_detail="provider reported 60000, expected 50000"))
    await admin.json("POST", f"/v1/payments/{paid.id}/review", 200, json={"note": f"called {about}"})
    refund = await admin.json("POST", f"/v1/payments/{paid.id}/refunds", 201, json={
        "idempotencyKey": idem(), "amount": 1000, "reason": f"overpaid by {about}",
        "returnedByProvider": {"providerTransactionId": "MTN-REV-9"}})
    await drain(worker)  # fanned out; each delivery's first try refused (503): waiting for its retry
    async with rt.sessionmaker.begin() as s:  # and one event not fanned out yet (the worker behind)
        await emit_event(s, cooperative_id=demo["cooperative_id"], event_type="payment.failed",
                         event_id=f"evt_payment_failed_{cancelled.id}",
                         data=event_data(await s.get(Payment, cancelled.id)))

    async def stored() -> str:
        async with rt.sessionmaker() as s:
            return json.dumps([*(await s.execute(select(WebhookDelivery.payload))).scalars(),
                               *(await s.execute(select(OutboxJob.payload).where(
                                   OutboxJob.kind == "webhook.event"))).scalars()], ensure_ascii=False)

    before = await stored()
    assert NAME in before and paid.payment_account_masked in before
    await admin.json("DELETE", f"/v1/members/{jeanne['id']}", 200)

    await admin.json("POST", f"/v1/members/{jeanne['id']}/erase", 200)

    after = await stored()
    for personal in (NAME, UNIT, PHONE, PHONE[1:], paid.payment_account_masked):
        assert personal not in after, after
    # Sent scrubbed, under the same event ids: the waiting deliveries' retries and the event fanned out late.
    up["now"] = True
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(OutboxJob).where(OutboxJob.kind.like("webhook.%"), OutboxJob.status == "PENDING")
                        .values(run_at=datetime.now(UTC)))
    await drain(worker)
    sent = {body["type"]: body for body in received}
    assert set(sent) == {"payment.flag_cleared", "refund.completed", "payment.failed"}, sent
    for personal in (NAME, UNIT, PHONE, PHONE[1:], paid.payment_account_masked):
        assert personal not in json.dumps(received, ensure_ascii=False)
    cleared, back, failed = sent["payment.flag_cleared"]["data"], sent["refund.completed"]["data"], \
        sent["payment.failed"]["data"]
    assert (cleared["id"], cleared["paymentAccount"], cleared["review"]["note"]) == (paid.id, "erased",
                                                                                      "[note erased]")
    assert cleared["review"]["mismatchDetail"] == "provider reported 60000, expected 50000"  # the gateway's words
    assert (back["id"], back["reason"], back["amount"]) == (refund["id"], None, 1000)
    assert (failed["id"], failed["paymentAccount"], failed["failureReason"]) == (
        cancelled.id, "erased", "cancelled by the cooperative: [note erased]")
    async with rt.sessionmaker() as s:
        assert set((await s.execute(select(WebhookDelivery.status))).scalars()) == {"DELIVERED"}


async def test_an_event_a_worker_claimed_before_her_erasure_is_fanned_out_scrubbed(
        rt: Any, admin: Caller, demo: Any, worker: Any) -> None:
    """A webhook.event job a worker claimed before her erasure (its payload in the worker's memory; a claimed job
    can wait for a slot) and fanned out after it: its delivery rows were written from the copy claimed, her account's
    mask and the desk's note naming her in them, where no erasure reached them, and they were sent so."""
    await approved_endpoint(rt, demo["cooperative_id"], "http://127.0.0.1:9/hook")
    jeanne = await _jeanne(admin)
    cancelled = await make_payment(rt, demo["cooperative_id"], account=PHONE, member_id=jeanne["id"],
                                   status="CANCELLED", failure_reason=f"cancelled by the cooperative: {NAME}")
    await drain(worker)
    async with rt.sessionmaker.begin() as s:
        await emit_event(s, cooperative_id=demo["cooperative_id"], event_type="payment.failed",
                         event_id=f"evt_payment_failed_{cancelled.id}",
                         data=event_data(await s.get(Payment, cancelled.id)))
    [job] = await worker.claim()
    assert job.kind == "webhook.event" and job.payload["data"]["paymentAccount"] == cancelled.payment_account_masked
    await admin.json("DELETE", f"/v1/members/{jeanne['id']}", 200)
    await admin.json("POST", f"/v1/members/{jeanne['id']}/erase", 200)

    await worker.run_job(job)

    async with rt.sessionmaker() as s:
        [delivery] = (await s.execute(select(WebhookDelivery))).scalars().all()
        stored = json.dumps([delivery.payload, *(await s.execute(select(OutboxJob.payload).where(
            OutboxJob.kind == "webhook.event"))).scalars()], ensure_ascii=False)
    assert (delivery.event_id, delivery.payload["data"]["paymentAccount"], delivery.payload["data"]["failureReason"]) \
        == (f"evt_payment_failed_{cancelled.id}", "erased", "cancelled by the cooperative: [note erased]")
    for personal in (NAME, cancelled.payment_account_masked):
        assert personal not in stored, stored


@pytest.mark.skipif(not is_postgres(), reason="a worker's write between the erasure's read and its own: row locks")
async def test_a_delivery_attempt_recorded_while_she_is_erased_keeps_its_time(
        rt: Any, admin: Caller, demo: Any, worker: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker recording a delivery's attempt (core.webhooks._finish) after the erasure read the delivery and
    before it wrote it back: the erasure's write set updated_at back to what it had read, before the attempt
    (retention counts a delivery's days from it), as if the attempt's change had not happened."""
    from core import webhooks

    endpoint, _ = await approved_endpoint(rt, demo["cooperative_id"], "http://127.0.0.1:9/hook")
    jeanne = await _jeanne(admin)
    paid = await make_payment(rt, demo["cooperative_id"], account=PHONE, member_id=jeanne["id"])
    async with rt.sessionmaker() as s:
        data = event_data(await s.get(Payment, paid.id))
    await webhooks.fan_out(rt, {"event_type": "payment.completed", "cooperative_id": demo["cooperative_id"],
                                "event_id": f"evt_payment_completed_{paid.id}", "data": data})
    async with rt.sessionmaker() as s:
        [delivery] = (await s.execute(select(WebhookDelivery))).scalars().all()
    execute, recorded = AsyncSession.execute, []

    async def meanwhile(session: AsyncSession, statement: Any, *args: Any, **kwargs: Any) -> Any:
        # The erasure's write of the delivery, after its read: the worker records its attempt first.
        if isinstance(statement, Update) and statement.table.name == "webhook_deliveries" and not recorded:
            recorded.append(True)
            await webhooks._finish(rt, delivery.id, status="DELIVERED", endpoint_id=endpoint.id, success=True,
                                   attempt={"at": datetime.now(UTC).isoformat(), "status_code": 200,
                                            "latency_ms": 5, "error": None})
        return await execute(session, statement, *args, **kwargs)

    monkeypatch.setattr(AsyncSession, "execute", meanwhile)
    await admin.json("DELETE", f"/v1/members/{jeanne['id']}", 200)

    await admin.json("POST", f"/v1/members/{jeanne['id']}/erase", 200)

    async with rt.sessionmaker() as s:
        after = (await s.execute(select(WebhookDelivery))).scalar_one()
    assert (after.status, len(after.attempts), after.payload["data"]["paymentAccount"]) == ("DELIVERED", 1, "erased")
    assert after.delivered_at is not None and after.updated_at >= after.delivered_at > delivery.updated_at


@pytest.mark.skipif(not is_postgres(), reason="a fan-out and the erasure at once: row locks")
async def test_an_event_fanned_out_while_she_is_erased_is_scrubbed_in_its_deliveries(
        rt: Any, admin: Caller, demo: Any, worker: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker fanning out an event about her payment (its delivery rows written, not yet committed) while the
    erasure runs: the erasure read the deliveries before them, found none, and the rows committed after it kept
    her account's mask; now it waits for the fan-out (the job's row lock) and scrubs them."""
    from core import webhooks

    await approved_endpoint(rt, demo["cooperative_id"], "http://127.0.0.1:9/hook")
    jeanne = await _jeanne(admin)
    paid = await make_payment(rt, demo["cooperative_id"], account=PHONE, member_id=jeanne["id"])
    await drain(worker)
    async with rt.sessionmaker.begin() as s:
        await emit_event(s, cooperative_id=demo["cooperative_id"], event_type="payment.completed",
                         event_id=f"evt_payment_completed_{paid.id}", data=event_data(await s.get(Payment, paid.id)))
    [job] = await worker.claim()
    written, go_on = asyncio.Event(), asyncio.Event()
    enqueue, execute = webhooks.enqueue, AsyncSession.execute

    async def held(*args: Any, **kwargs: Any) -> Any:  # the fan-out, its delivery row written, not committed
        written.set()
        await go_on.wait()
        return await enqueue(*args, **kwargs)

    async def erasing(session: AsyncSession, statement: Any, *args: Any, **kwargs: Any) -> Any:
        # The erasure's write of the event's job: the fan-out goes on (and commits) from here.
        if (isinstance(statement, Update) and statement.table.name == "outbox_jobs"
                and "webhook.event" in str(statement)):
            go_on.set()
        return await execute(session, statement, *args, **kwargs)

    monkeypatch.setattr(webhooks, "enqueue", held)
    monkeypatch.setattr(AsyncSession, "execute", erasing)
    await admin.json("DELETE", f"/v1/members/{jeanne['id']}", 200)
    fanning = asyncio.create_task(worker.run_job(job))
    await asyncio.wait_for(written.wait(), 10)

    await asyncio.wait_for(admin.json("POST", f"/v1/members/{jeanne['id']}/erase", 200), 20)
    await asyncio.wait_for(fanning, 10)

    async with rt.sessionmaker() as s:
        [delivery] = (await s.execute(select(WebhookDelivery))).scalars().all()
    assert (delivery.event_id, delivery.payload["data"]["paymentAccount"]) == (f"evt_payment_completed_{paid.id}",
                                                                               "erased")


async def test_her_disputes_notes_and_resolution_go_with_the_erasure_and_their_events_are_sent_scrubbed(
        rt: Any, admin: Caller, demo: Any, worker: Any, aiohttp_server: Any) -> None:
    """The officers handling a dispute of her payment wrote her name and number in its notes (she was called back),
    in the evidence's file name and in the resolution, as a review's note does: all of it stayed on the dispute
    (GET /v1/disputes/{id}) after her erasure, and the resolution in its stored dispute.updated event, sent so by a
    retry after it. Now the text goes ([note erased]) and what the gateway wrote stays (each note's time, writer
    and status; a resolution that is the gateway's own word); another member's dispute keeps its text."""
    received, up = await _receiver_down(rt, demo, aiohttp_server)
    jeanne = await _jeanne(admin)
    other_name = "Aline Uwase"
    aline = await admin.json("POST", "/v1/members", 201, json={"name": other_name, "phone": "+250788777222"})
    about = f"{NAME} {UNIT} {PHONE}"
    paid = await make_payment(rt, demo["cooperative_id"], account=PHONE, member_id=jeanne["id"])
    also = await make_payment(rt, demo["cooperative_id"], account=PHONE, member_id=jeanne["id"])
    hers = await admin.json("POST", "/v1/disputes", 201, json={"paymentId": paid.id, "reason": "WRONG_AMOUNT",
                                                                "note": f"opened for {about}"})
    await admin.json("POST", f"/v1/disputes/{hers['id']}/transitions", 200, json={
        "status": "UNDER_REVIEW", "note": f"called {about}", "evidence": f"statement {NAME}.pdf"})
    await admin.json("POST", f"/v1/payments/{paid.id}/refunds", 201, json={  # the gateway's note on the dispute
        "idempotencyKey": idem(), "amount": 1000, "reason": "overpaid",
        "returnedByProvider": {"providerTransactionId": "MTN-REV-9"}})
    await admin.json("POST", f"/v1/disputes/{hers['id']}/transitions", 200, json={
        "status": "RESOLVED", "note": f"paid back to {about}"})
    plain = await admin.json("POST", "/v1/disputes", 201, json={"paymentId": also.id, "reason": "OTHER"})
    await admin.json("POST", f"/v1/disputes/{plain['id']}/transitions", 200, json={"status": "REJECTED"})
    theirs_paid = await make_payment(rt, demo["cooperative_id"], account="+250788777222", member_id=aline["id"])
    theirs = await admin.json("POST", "/v1/disputes", 201, json={"paymentId": theirs_paid.id, "reason": "OTHER",
                                                                  "note": f"opened for {other_name}"})
    theirs = await admin.json("POST", f"/v1/disputes/{theirs['id']}/transitions", 200, json={
        "status": "REJECTED", "note": f"{other_name} paid it", "evidence": f"{other_name}.pdf"})
    await drain(worker)  # fanned out; each delivery's first try refused (503): waiting for its retry
    async with rt.sessionmaker() as s:
        before = {d.id: (d.notes, d.updated_at, d.resolved_at) for d in (await s.execute(select(Dispute))).scalars()}
    await admin.json("DELETE", f"/v1/members/{jeanne['id']}", 200)

    await admin.json("POST", f"/v1/members/{jeanne['id']}/erase", 200)

    seen = await admin.json("GET", f"/v1/disputes/{hers['id']}", 200)
    for personal in (NAME, UNIT, PHONE, PHONE[1:]):
        assert personal not in json.dumps(seen, ensure_ascii=False), seen
    assert (seen["status"], seen["reason"], seen["resolution"]) == ("RESOLVED", "WRONG_AMOUNT", "[note erased]")
    async with rt.sessionmaker() as s:
        rows = {d.id: d for d in (await s.execute(select(Dispute))).scalars()}
    notes, updated_at, resolved_at = before[hers["id"]]
    assert [{key: value for key, value in note.items() if key not in ("text", "evidence")} for note in notes] == [
        {key: value for key, value in note.items() if key not in ("text", "evidence")}
        for note in rows[hers["id"]].notes]  # each note's time, writer and status as written
    assert [(note.get("text"), note.get("evidence")) for note in rows[hers["id"]].notes] == [
        ("[note erased]", None), ("[note erased]", "[note erased]"), ("[note erased]", None),
        ("[note erased]", None)]
    assert (rows[hers["id"]].updated_at, rows[hers["id"]].resolved_at) == (updated_at, resolved_at)
    assert (rows[plain["id"]].status, rows[plain["id"]].resolution, rows[plain["id"]].notes) == (
        "REJECTED", "rejected", [])  # the gateway's own word
    assert (rows[theirs["id"]].notes, rows[theirs["id"]].resolution) == (
        before[theirs["id"]][0], f"{other_name} paid it")

    # Sent scrubbed, under the same event ids: the waiting deliveries' retries.
    up["now"] = True
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(OutboxJob).where(OutboxJob.kind.like("webhook.%"), OutboxJob.status == "PENDING")
                        .values(run_at=datetime.now(UTC)))
    await drain(worker)
    for personal in (NAME, UNIT, PHONE, PHONE[1:]):
        assert personal not in json.dumps(received, ensure_ascii=False)
    closed = {body["data"]["id"]: body["data"] for body in received
              if body["type"] == "dispute.updated" and body["data"]["status"] in ("RESOLVED", "REJECTED")}
    assert {key: closed[key]["resolution"] for key in closed} == {
        hers["id"]: "[note erased]", plain["id"]: "rejected", theirs["id"]: f"{other_name} paid it"}
    async with rt.sessionmaker() as s:
        assert set((await s.execute(select(WebhookDelivery.status))).scalars()) == {"DELIVERED"}
