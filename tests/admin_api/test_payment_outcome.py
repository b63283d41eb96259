"""A payment the gateway gave up on (TIMEOUT, CANCELLED) whose money the provider's statement shows taken is
recorded by an admin (`POST /v1/payments/{id}/outcome`): it completes as a late provider answer would (flagged
late, receipt SMS, webhook event), keeps the admin's note in the audit log, and can then be refunded. So is one
still open past its approval window (its status queries failing). Open payments inside their window, failed and
collected payments are refused."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from core.audit import Actor
from core.db import utcnow
from core.jobs import job_handlers
from core.models import AuditEvent, OutboxJob, Payment
from core.outbox import Job
from core.ports import ProviderOutcome
from core.provider_events import UNCONFIRMED_FLAG, apply_collection_outcome
from core.state.payment import UNCONFIRMED
from tests.admin_api.conftest import complete_payment, idem, kenyan_mpesa_payment, make_payment

PROVIDER = Actor("provider:test", "provider")
RECORD = {"status": "COMPLETED", "providerTransactionId": "MP-7781", "note": "on MTN's statement of 30 November"}


async def _given_up(admin: Any, rt: Any, demo: dict[str, Any], outcome: ProviderOutcome = ProviderOutcome.EXPIRED,
                    reason: str | None = UNCONFIRMED) -> dict[str, Any]:
    payment = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    async with rt.sessionmaker.begin() as s:
        row = await s.get(Payment, payment["id"])
        await apply_collection_outcome(s, rt, row, outcome, actor=PROVIDER, reason=reason)
    return payment


async def _jobs(rt: Any, kind: str) -> list[str]:
    async with rt.sessionmaker() as s:
        return list((await s.execute(select(OutboxJob.dedupe_key).where(OutboxJob.kind == kind)
                                     .order_by(OutboxJob.id))).scalars())


async def test_money_taken_after_the_gateway_gave_up_is_recorded_then_refundable(admin, rt, demo):
    payment = await _given_up(admin, rt, demo)
    flagged = await admin.json("GET", f"/v1/payments/{payment['id']}", 200)
    assert (flagged["status"], flagged["mismatch"]) == ("TIMEOUT", True)
    assert flagged["failureReason"] is not None
    done = await admin.json("POST", f"/v1/payments/{payment['id']}/outcome", 200, json=RECORD)
    assert (done["status"], done["late"], done["mismatch"], done["failureReason"]) == ("COMPLETED", True, False, None)
    async with rt.sessionmaker() as s:
        row = await s.get(Payment, payment["id"])
        assert (row.provider_transaction_id, row.mismatch_detail, row.completed_at is not None) == (
            "MP-7781", None, True)
        audit = (await s.execute(select(AuditEvent).where(
            AuditEvent.entity_id == payment["id"], AuditEvent.action == "payment.outcome_recorded"))).scalar_one()
    assert audit.after["note"] == RECORD["note"] and audit.actor.startswith("admin:")
    assert await _jobs(rt, "sms.send") == [f"sms:payment_unconfirmed:{payment['id']}",
                                           f"sms:payment_late_receipt:{payment['id']}"]
    # Now it is money the cooperative holds: an ordinary refund goes through.
    refund = await admin.json("POST", f"/v1/payments/{payment['id']}/refunds", 201,
                              json={"amount": 10000, "idempotencyKey": idem()})
    assert refund["amount"] == 10000
    # Recorded once: a second time is refused.
    again = await admin.json("POST", f"/v1/payments/{payment['id']}/outcome", 409, json=RECORD)
    assert "its money is recorded already" in again["message"]


async def test_less_taken_is_collected_at_what_was_taken(admin, rt, demo):
    payment = await _given_up(admin, rt, demo, ProviderOutcome.CANCELLED, reason="cancelled by payer")
    done = await admin.json("POST", f"/v1/payments/{payment['id']}/outcome", 200, json={**RECORD, "amount": 40000})
    assert (done["status"], done["mismatch"]) == ("COMPLETED", True)
    refused = await admin.json("POST", f"/v1/payments/{payment['id']}/refunds", 422,
                               json={"amount": 50000, "idempotencyKey": idem()})
    assert "exceeds the refundable 40,000 RWF" in refused["message"]


@pytest.mark.parametrize("state", ["PENDING", "FAILED", "COMPLETED"])
async def test_open_failed_and_collected_payments_are_refused(admin, rt, demo, state):
    payment = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    if state == "FAILED":
        async with rt.sessionmaker.begin() as s:
            await apply_collection_outcome(s, rt, await s.get(Payment, payment["id"]), ProviderOutcome.FAILED,
                                           actor=PROVIDER, reason="payer declined")
    elif state == "COMPLETED":
        await complete_payment(rt, payment["id"])
    body = await admin.json("POST", f"/v1/payments/{payment['id']}/outcome", 409, json=RECORD)
    assert body["message"].startswith("payment is still open inside its approval window" if state == "PENDING"
                                      else f"payment is {state}")
    async with rt.sessionmaker() as s:
        assert (await s.get(Payment, payment["id"])).status == state


async def test_input_and_access(admin, tenant, rt, demo):
    payment = await _given_up(admin, rt, demo)
    url = f"/v1/payments/{payment['id']}/outcome"
    for body in ({**RECORD, "note": "x"}, {**RECORD, "providerTransactionId": ""}, {**RECORD, "status": "FAILED"},
                 {"status": "COMPLETED", "note": "on the statement"}, {**RECORD, "amount": -5}):
        await admin.json("POST", url, 400, json=body)
    await tenant.json("POST", url, 403, json=RECORD)
    async with rt.sessionmaker() as s:
        row = await s.get(Payment, payment["id"])
    assert (row.status, row.mismatch_detail) == ("TIMEOUT", UNCONFIRMED_FLAG)


@pytest.mark.parametrize("state", ["PENDING", "PROCESSING"])
async def test_an_open_payment_past_its_window_is_recorded_and_its_polls_stop(admin, rt, demo, state):
    """The provider's status query keeps failing, so the poll keeps the payment open for the settling grace (24 h)
    while the member who paid waits for her receipt: the admin records what the statement shows. Its next poll
    finds it closed and asks the provider nothing."""
    payment = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Payment).where(Payment.id == payment["id"]).values(
            status=state, expires_at=utcnow() - timedelta(hours=1)))
    done = await admin.json("POST", f"/v1/payments/{payment['id']}/outcome", 200, json=RECORD)
    # Not `late`: the gateway never gave it up (the statement's time, or now, dates the money).
    assert (done["status"], done["late"], done["failureReason"]) == ("COMPLETED", False, None)
    async with rt.sessionmaker() as s:
        provider = rt.providers[(await s.get(Payment, payment["id"])).provider]
        audit = (await s.execute(select(AuditEvent).where(
            AuditEvent.entity_id == payment["id"], AuditEvent.action == "payment.outcome_recorded"))).scalar_one()
    assert (audit.before, audit.after["providerTransactionId"]) == ({"status": state}, "MP-7781")
    assert await _jobs(rt, "sms.send") == [f"sms:payment_receipt:{payment['id']}"]

    def no_call(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("the provider was asked about a closed payment")

    original = provider.collection_status
    provider.collection_status = no_call
    try:
        await job_handlers(rt)["payment.poll"](Job(1, "payment.poll", {"payment_id": payment["id"]}, 1, 30, utcnow()))
    finally:
        provider.collection_status = original
    async with rt.sessionmaker() as s:
        assert (await s.get(Payment, payment["id"])).status == "COMPLETED"


async def test_a_report_whose_flag_was_cut_from_a_long_detail_is_not_flagged_again(admin, rt, demo):
    """Three reports of other transaction ids fill mismatch_detail past its 300 characters: fit_detail keeps the
    first flag's start and the last's end, so the first two were no longer whole in it. Each retry of those was
    taken for a new report: flagged, audited and logged again, and after a person's review the payment was flagged
    once more for what she had just reviewed."""
    payment = await _given_up(admin, rt, demo)
    await admin.json("POST", f"/v1/payments/{payment['id']}/outcome", 200, json=RECORD)

    async def report(transaction_id: str) -> None:
        async with rt.sessionmaker.begin() as s:
            row = await s.get(Payment, payment["id"])
            await apply_collection_outcome(s, rt, row, ProviderOutcome.SUCCEEDED, actor=PROVIDER,
                                           provider_transaction_id=transaction_id)

    async def audited() -> list[str]:
        async with rt.sessionmaker() as s:
            return [a.after["reportedTransactionId"] for a in (await s.execute(select(AuditEvent).where(
                AuditEvent.entity_id == payment["id"], AuditEvent.action == "payment.transaction_id_differs")
                .order_by(AuditEvent.id))).scalars()]

    for transaction_id in ("MP-9001", "MP-9002", "MP-9003"):
        await report(transaction_id)
    detail = (await admin.json("GET", f"/v1/payments/{payment['id']}", 200))["mismatchDetail"]
    said = ("provider reported this payment's money under transaction {}, not MP-7781, the one it holds: check the "
            "provider's statement")
    # The premise: the first two flags cut, the last one whole.
    assert (len(detail), said.format("MP-9001") in detail, said.format("MP-9002") in detail,
            said.format("MP-9003") in detail) == (300, False, False, True), detail
    for transaction_id in ("MP-9001", "MP-9002", "MP-9003"):  # the provider's retries
        await report(transaction_id)
    assert await audited() == ["MP-9001", "MP-9002", "MP-9003"]
    assert (await admin.json("GET", f"/v1/payments/{payment['id']}", 200))["mismatchDetail"] == detail
    # Reviewed by a person, then retried again: nothing to review anew.
    await admin.json("POST", f"/v1/payments/{payment['id']}/review", 200, json={"note": "MP-7781 is ours"})
    await report("MP-9001")
    shown = await admin.json("GET", f"/v1/payments/{payment['id']}", 200)
    assert shown["mismatch"] is False and await audited() == ["MP-9001", "MP-9002", "MP-9003"]


async def test_the_providers_late_word_naming_another_transaction_than_the_one_recorded_is_flagged(admin, rt, demo):
    """The treasurer recorded a TIMEOUT payment's money with a line of the statement (MP-7781); the provider's late
    success then named the payment's money under another transaction (its own line). It was dropped as "already
    completed": the payment kept a transaction id the provider never gave it (a refund naming it goes to that line),
    the provider's line matched nothing, and no one was told. Now it is flagged for a person and audited; nothing
    else changes."""
    payment = await _given_up(admin, rt, demo)
    await admin.json("POST", f"/v1/payments/{payment['id']}/outcome", 200, json=RECORD)
    for _report in range(2):  # the same report again flags nothing more
        async with rt.sessionmaker.begin() as s:
            row = await s.get(Payment, payment["id"])
            result = await apply_collection_outcome(s, rt, row, ProviderOutcome.SUCCEEDED, actor=PROVIDER,
                                                    provider_transaction_id="MP-9001")
        assert result == "already_completed"
    shown = await admin.json("GET", f"/v1/payments/{payment['id']}", 200)
    assert (shown["status"], shown["gatewayTransactionId"], shown["collectedAmount"]) == ("COMPLETED", "MP-7781", 50000)
    assert shown["mismatch"] is True
    assert "transaction MP-9001, not MP-7781" in shown["mismatchDetail"], shown["mismatchDetail"]
    async with rt.sessionmaker() as s:
        audits = (await s.execute(select(AuditEvent).where(
            AuditEvent.entity_id == payment["id"],
            AuditEvent.action == "payment.transaction_id_differs"))).scalars().all()
    assert [(a.before, a.after["reportedTransactionId"]) for a in audits] == [
        ({"providerTransactionId": "MP-7781"}, "MP-9001")]
    # The report of the id it holds says nothing new.
    async with rt.sessionmaker.begin() as s:
        row = await s.get(Payment, payment["id"])
        await apply_collection_outcome(s, rt, row, ProviderOutcome.SUCCEEDED, actor=PROVIDER,
                                       provider_transaction_id="MP-7781")
    async with rt.sessionmaker() as s:
        assert len((await s.execute(select(AuditEvent).where(
            AuditEvent.entity_id == payment["id"],
            AuditEvent.action == "payment.transaction_id_differs"))).scalars().all()) == 1


async def test_an_amount_the_providers_statement_cannot_show_is_refused(superadmin, rt):
    """M-Pesa takes whole shillings: a statement line of 1,300.50 KES is a typo. Recorded, the payment held cents no
    reversal can send back (the full refund it allows was accepted, then failed in the worker: "M-Pesa takes whole
    shillings"), as POST /v1/payments/recorded already refuses."""
    payment = await kenyan_mpesa_payment(superadmin, "1300.00")
    async with rt.sessionmaker.begin() as s:
        await apply_collection_outcome(s, rt, await s.get(Payment, payment["id"]), ProviderOutcome.EXPIRED,
                                       actor=PROVIDER, reason=UNCONFIRMED)
    url = f"/v1/payments/{payment['id']}/outcome"
    refused = await superadmin.json("POST", url, 400, json={**RECORD, "providerTransactionId": "SKA1B2C3D4",
                                                            "amount": "1300.50"})
    assert refused["message"] == ["M-Pesa takes whole shillings; 1,300.50 KES has cents"]
    assert (refused["field"], refused["code"]) == ("amount", "PROVIDER_REFUSED")
    async with rt.sessionmaker() as s:
        row = await s.get(Payment, payment["id"])
        assert (row.status, row.collected_minor, row.provider_transaction_id) == ("TIMEOUT", None, None)
        assert (await s.execute(select(AuditEvent).where(
            AuditEvent.entity_id == payment["id"], AuditEvent.action == "payment.outcome_recorded"))).first() is None
    done = await superadmin.json("POST", url, 200, json={**RECORD, "providerTransactionId": "SKA1B2C3D4",
                                                         "amount": "1300"})
    assert (done["status"], done["collectedAmount"]) == ("COMPLETED", "1300.00")
