"""Refund and dispute SMS for a payment made without a member go to the phone that paid, as its receipt did;
a bank payment without a member has no phone to tell, and its changes still reach the cooperative's webhook."""

from __future__ import annotations

import dataclasses
from datetime import timedelta

from sqlalchemy import select, update

from core.audit import Actor
from core.db import utcnow
from core.models import AuditEvent, OutboxJob, Payment, Refund
from core.ports import ProviderOutcome
from core.refunds import apply_refund_outcome
from tests.admin_api.conftest import complete_payment, idem, make_payment

# A number no member has: from a member's own number an admin's payment is hers (test_seed_member_and_replay).
PAYER = "+250788555001"


async def _jobs(rt, kind):
    async with rt.sessionmaker() as s:
        return (await s.execute(select(OutboxJob).where(OutboxJob.kind == kind).order_by(OutboxJob.id))).scalars().all()


async def _sms_to(rt, template):
    """The phone each queued SMS of `template` goes to (None: to a member)."""
    found = []
    for job in await _jobs(rt, "sms.send"):
        if job.payload["template"] == template:
            enc = job.payload["phone_enc"]
            found.append((job.payload["member_id"], rt.cipher.decrypt(enc, context="sms") if enc else None))
    return found


async def _settle_refund(rt, refund_id, outcome):
    async with rt.sessionmaker.begin() as s:
        refund = await s.get(Refund, refund_id)
        assert refund is not None
        await apply_refund_outcome(s, rt, refund, outcome, actor=Actor("provider:test", "provider"))


async def test_refund_sms_goes_to_the_paying_phone(admin, rt, demo):
    paid = await make_payment(admin, demo["payment_types"]["Monthly Rent"], paymentAccount=PAYER)
    assert paid["memberId"] is None
    await complete_payment(rt, paid["id"])
    part = await admin.json("POST", f"/v1/payments/{paid['id']}/refunds", 201,
                            json={"amount": 1000, "idempotencyKey": idem()})
    await _settle_refund(rt, part["id"], ProviderOutcome.SUCCEEDED)
    assert await _sms_to(rt, "refund_completed") == [(None, PAYER)]
    failed = await admin.json("POST", f"/v1/payments/{paid['id']}/refunds", 201,
                              json={"amount": 1000, "idempotencyKey": idem()})
    await _settle_refund(rt, failed["id"], ProviderOutcome.FAILED)
    assert await _sms_to(rt, "refund_failed") == [(None, PAYER)]


async def test_dispute_sms_go_to_the_paying_phone(admin, rt, demo):
    paid = await make_payment(admin, demo["payment_types"]["Monthly Rent"], paymentAccount=PAYER)
    dispute = await admin.json("POST", "/v1/disputes", 201, json={"paymentId": paid["id"], "reason": "OTHER"})
    assert await _sms_to(rt, "dispute_opened") == [(None, PAYER)]
    await admin.json("POST", f"/v1/disputes/{dispute['id']}/transitions", 200, json={"status": "UNDER_REVIEW"})
    assert await _sms_to(rt, "dispute_updated") == [(None, PAYER)]
    await admin.json("POST", f"/v1/disputes/{dispute['id']}/transitions", 200,
                     json={"status": "REJECTED", "note": "paid as asked"})
    assert await _sms_to(rt, "dispute_resolved") == [(None, PAYER)]


async def test_a_members_notices_still_go_to_the_member(admin, rt, demo):
    member = demo["members"]["+250788000002"]
    paid = await make_payment(admin, demo["payment_types"]["Monthly Rent"], memberId=member)
    await admin.json("POST", "/v1/disputes", 201, json={"paymentId": paid["id"], "reason": "OTHER"})
    assert await _sms_to(rt, "dispute_opened") == [(member, None)]


async def test_a_bank_payment_without_a_member_has_no_sms_but_its_webhook_event(admin, rt, demo):
    paid = await make_payment(admin, demo["payment_types"]["Monthly Rent"], paymentMethod="BANK_BK",
                              paymentAccount="00040-0123456-78")
    await admin.json("POST", "/v1/disputes", 201, json={"paymentId": paid["id"], "reason": "OTHER"})
    assert await _sms_to(rt, "dispute_opened") == []
    events = [j.payload["event_type"] for j in await _jobs(rt, "webhook.event")]
    assert events == ["dispute.opened"]


async def test_dispute_sms_are_not_sent_to_the_paying_phone_once_a_member_got_it(admin, rt, demo):
    """Jean was moved to the number that paid since the payment (a new SIM: the operator gave it to him). The
    dispute's SMS ("your dispute about payment ...", its resolution) would tell him of another's payment: not sent,
    as a refund's is not (core.refunds.payer_to_tell); the cooperative's system is still told, and the audit
    log says why the payer was not. A dispute opened before the move told the payer then."""
    paid = await make_payment(admin, demo["payment_types"]["Monthly Rent"], paymentAccount=PAYER)
    dispute = await admin.json("POST", "/v1/disputes", 201, json={"paymentId": paid["id"], "reason": "OTHER"})
    assert await _sms_to(rt, "dispute_opened") == [(None, PAYER)]
    await admin.json("PATCH", f"/v1/members/{demo['members']['+250788000002']}", 200,
                     json={"phone": PAYER, "phoneChange": "NEW_SIM"})
    await admin.json("POST", f"/v1/disputes/{dispute['id']}/transitions", 200, json={"status": "UNDER_REVIEW"})
    await admin.json("POST", f"/v1/disputes/{dispute['id']}/transitions", 200,
                     json={"status": "REJECTED", "note": "paid as asked"})
    assert await _sms_to(rt, "dispute_updated") == [] == await _sms_to(rt, "dispute_resolved")
    events = [j.payload["event_type"] for j in await _jobs(rt, "webhook.event")]
    assert events.count("dispute.updated") == 2
    async with rt.sessionmaker() as s:
        told = (await s.execute(select(AuditEvent.after).where(
            AuditEvent.entity_id == dispute["id"], AuditEvent.action == "dispute.payer_not_told")
            .order_by(AuditEvent.id))).scalars().all()
    assert told == [{"template": "dispute_updated", "paymentAccount": "+25078****001", "reason": "went_to_another"},
                    {"template": "dispute_resolved", "paymentAccount": "+25078****001", "reason": "went_to_another"}]


async def _made_days_ago(rt, payment_id, days):
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Payment).where(Payment.id == payment_id)
                        .values(created_at=utcnow() - timedelta(days=days)))


async def _not_told(rt, entity_id, action):
    async with rt.sessionmaker() as s:
        return (await s.execute(select(AuditEvent.after).where(
            AuditEvent.entity_id == entity_id, AuditEvent.action == action).order_by(AuditEvent.id))).scalars().all()


async def test_the_paying_phone_is_not_texted_about_a_payment_older_than_sms_payer_answer_days(admin, rt, demo):
    """As the RECEIPT keyword and the support desk's resend judge it: past SMS_PAYER_ANSWER_DAYS (90) the number
    that paid a payment of no member may have been recycled to a stranger (an operator reissues a number left
    unused for months), so its refund's and dispute's SMS are not sent there; the cooperative's system is still
    told, and the audit log says why the payer was not. 89 days old, the payer is texted; with
    SMS_PAYER_ANSWER_DAYS=0, always."""
    rent = demo["payment_types"]["Monthly Rent"]
    made = {}
    for days in (91, 89, 900):
        paid = await make_payment(admin, rent, paymentAccount=PAYER)
        await complete_payment(rt, paid["id"])
        await _made_days_ago(rt, paid["id"], days)
        made[days] = paid["id"]
    refunds = {days: (await admin.json("POST", f"/v1/payments/{made[days]}/refunds", 201,
                                       json={"amount": 1000, "idempotencyKey": idem()}))["id"] for days in made}
    always = dataclasses.replace(rt, settings=dataclasses.replace(rt.settings, sms_payer_answer_days=0))
    await _settle_refund(rt, refunds[91], ProviderOutcome.SUCCEEDED)
    assert await _sms_to(rt, "refund_completed") == []
    await _settle_refund(rt, refunds[89], ProviderOutcome.SUCCEEDED)
    await _settle_refund(always, refunds[900], ProviderOutcome.SUCCEEDED)
    assert await _sms_to(rt, "refund_completed") == [(None, PAYER), (None, PAYER)]
    events = [j.payload["event_type"] for j in await _jobs(rt, "webhook.event")]
    assert events.count("refund.completed") == 3
    assert await _not_told(rt, refunds[91], "refund.payer_not_told") == [
        {"template": "refund_completed", "paymentAccount": "+25078****001", "reason": "older_than_answer_days"}]
    assert await _not_told(rt, refunds[89], "refund.payer_not_told") == []

    old = await admin.json("POST", "/v1/disputes", 201, json={"paymentId": made[91], "reason": "OTHER"})
    assert await _sms_to(rt, "dispute_opened") == []
    await admin.json("POST", "/v1/disputes", 201, json={"paymentId": made[89], "reason": "OTHER"})
    assert await _sms_to(rt, "dispute_opened") == [(None, PAYER)]
    assert await _not_told(rt, old["id"], "dispute.payer_not_told") == [
        {"template": "dispute_opened", "paymentAccount": "+25078****001", "reason": "older_than_answer_days"}]


async def test_a_dispute_of_a_payment_whose_payer_was_erased_moves_without_an_sms(admin, rt, demo):
    """The payer registered just after paying with no member (her number's payment is hers: core.members._Hers),
    then left and was erased while her dispute of it was open: the payment's account is cleared (no ciphertext to
    decrypt), so the dispute's later SMS have no number to go to. Its moves still go through (they raised
    CryptoError: a 500, the dispute stuck OPEN), as does a chargeback recorded of it, and the cooperative's system
    is still told."""
    paid = await make_payment(admin, demo["payment_types"]["Monthly Rent"], paymentAccount=PAYER)
    await complete_payment(rt, paid["id"])
    dispute = await admin.json("POST", "/v1/disputes", 201, json={"paymentId": paid["id"], "reason": "OTHER"})
    assert await _sms_to(rt, "dispute_opened") == [(None, PAYER)]
    her = await admin.json("POST", "/v1/members", 201, json={"name": "Ange Payer", "phone": PAYER})
    await admin.json("DELETE", f"/v1/members/{her['id']}", 200)
    await admin.json("POST", f"/v1/members/{her['id']}/erase", 200)
    async with rt.sessionmaker() as s:
        assert (await s.get(Payment, paid["id"])).payment_account_enc == ""
    await admin.json("POST", f"/v1/disputes/{dispute['id']}/transitions", 200,
                     json={"status": "REJECTED", "note": "paid as asked"})
    assert await _sms_to(rt, "dispute_resolved") == []
    # A chargeback of it (the provider gave her the money back: recorded with returnedByProvider, the one refund an
    # erased account takes) completes as recorded, with nobody to text either.
    when = utcnow().isoformat()
    refund = await admin.json("POST", f"/v1/payments/{paid['id']}/refunds", 201, json={
        "amount": 1000, "idempotencyKey": idem(),
        "returnedByProvider": {"providerTransactionId": "MTN-REV-ERASED", "completedAt": when}})
    assert refund["status"] == "COMPLETED"
    assert await _sms_to(rt, "refund_completed") == []
    events = [j.payload["event_type"] for j in await _jobs(rt, "webhook.event")]
    assert (events.count("dispute.updated"), events.count("refund.completed")) == (1, 1)


async def test_money_taken_after_failure_from_an_erased_payer_is_told_to_the_cooperative_only(admin, rt, demo):
    """Her payment with no member failed, she registered, left and was erased (its account cleared); then the
    provider says it took the money after all. The payment is flagged as holding it and the cooperative's system
    told (payment.taken_after_failure), with no SMS: there is no number left to text (it raised CryptoError, the
    provider's report failed for good)."""
    from core.models import Payment as P
    from core.money import Money
    from core.provider_events import apply_collection_outcome

    provider = Actor("provider:test", "provider")
    paid = await make_payment(admin, demo["payment_types"]["Monthly Rent"], paymentAccount=PAYER)
    async with rt.sessionmaker.begin() as s:
        await apply_collection_outcome(s, rt, await s.get(P, paid["id"]), ProviderOutcome.FAILED, actor=provider,
                                       reason="payer declined")
    her = await admin.json("POST", "/v1/members", 201, json={"name": "Ange Payer", "phone": PAYER})
    await admin.json("DELETE", f"/v1/members/{her['id']}", 200)
    await admin.json("POST", f"/v1/members/{her['id']}/erase", 200)
    async with rt.sessionmaker.begin() as s:
        result = await apply_collection_outcome(s, rt, await s.get(P, paid["id"]), ProviderOutcome.SUCCEEDED,
                                                actor=provider, amount=Money(50_000, "RWF"),
                                                provider_transaction_id="MTN-LATE-ERASED")
    assert result == "flagged_success_after_failure"
    assert await _sms_to(rt, "payment_taken_after_failure") == []
    events = [j.payload["event_type"] for j in await _jobs(rt, "webhook.event")]
    assert events.count("payment.taken_after_failure") == 1
