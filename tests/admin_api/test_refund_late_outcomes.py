"""A provider's word on a refund that arrives after the refund is final: money it reports sent back after the
refund FAILED (its late answer, or a person recorded FAILED too soon) completes the refund, flagged and audited,
and says plainly if the member has now been paid back twice; a failure reported after the refund COMPLETED is
never applied on that word alone, but flagged for a person. Both were dropped without a trace."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from sqlalchemy import select, update

from core.models import AuditEvent, OutboxJob, Payment, Refund
from core.outbox import CALL_SENT, WORKER_LOST
from core.ports import EventKind, ProviderOutcome
from core.ports import ProviderEvent as Event
from core.provider_events import handle_provider_event
from tests.admin_api.conftest import complete_payment, idem, make_payment


async def _parked_refund(admin: Any, rt: Any, demo: dict[str, Any], paid: dict[str, Any] | None = None,
                         amount: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """A completed 50,000 RWF MTN payment (or `paid`) and a refund of `amount` (default: all that is left) sent
    whose answer never came (PROCESSING)."""
    if paid is None:
        paid = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
        await complete_payment(rt, paid["id"])
    body = {"idempotencyKey": idem(), **({} if amount is None else {"amount": amount})}
    refund = await admin.json("POST", f"/v1/payments/{paid['id']}/refunds", 201, json=body)
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Refund).where(Refund.id == refund["id"]).values(status="PROCESSING"))
        await s.execute(update(OutboxJob).where(OutboxJob.kind == "refund.submit").values(status="DONE"))
    return paid, refund


async def _provider_says(rt: Any, refund_id: str, outcome: ProviderOutcome) -> str:
    async with rt.sessionmaker() as s:
        ours = (await s.get(Refund, refund_id)).provider_reference
    return await handle_provider_event(rt, Event(
        provider="mtn_momo", kind=EventKind.REFUND, event_id=uuid.uuid4().hex, reference=ours, outcome=outcome,
        provider_transaction_id="MTN-RF-LATE" if outcome is ProviderOutcome.SUCCEEDED else None,
        reason=None if outcome is ProviderOutcome.SUCCEEDED else "reversal declined"))


async def _audit(rt: Any, action: str) -> list[AuditEvent]:
    async with rt.sessionmaker() as s:
        return list((await s.execute(select(AuditEvent).where(AuditEvent.action == action))).scalars())


async def test_money_sent_back_after_the_refund_was_recorded_failed_completes_it(admin: Any, rt: Any,
                                                                                demo: dict[str, Any]) -> None:
    paid, refund = await _parked_refund(admin, rt, demo)
    await admin.json("POST", f"/v1/refunds/{refund['id']}/outcome", 200,
                     json={"status": "FAILED", "note": "not on the statement yet"})
    assert await _provider_says(rt, refund["id"], ProviderOutcome.SUCCEEDED) == "completed"
    done = await admin.json("GET", f"/v1/refunds/{refund['id']}", 200)
    payment = await admin.json("GET", f"/v1/payments/{paid['id']}", 200)
    assert done["status"] == "COMPLETED"
    assert (payment["status"], payment["mismatch"]) == ("REFUNDED", True)
    assert payment["mismatchDetail"] == f"refund {refund['reference']} reported sent back after it had failed"
    [entry] = await _audit(rt, "refund.sent_after_failure")
    assert entry.after == {"status": "COMPLETED", "refunded": 50_000, "overRefunded": 0}
    # Nothing left to refund: the same money cannot go back a second time.
    await admin.json("POST", f"/v1/payments/{paid['id']}/refunds", 422, json={"idempotencyKey": idem()})
    report = await admin.json("GET", "/v1/reports/reconciliation", 200)
    assert [(line["paymentMethod"], line["refunded"]) for line in report["settled"]] == [("MOBILE_MONEY_MTN", 50000)]


async def test_a_failed_refund_that_went_through_after_a_second_one_says_the_member_was_paid_twice(
        admin: Any, rt: Any, demo: dict[str, Any]) -> None:
    paid, first = await _parked_refund(admin, rt, demo)
    await admin.json("POST", f"/v1/refunds/{first['id']}/outcome", 200, json={"status": "FAILED", "note": "failed"})
    _paid, second = await _parked_refund(admin, rt, demo, paid)
    await admin.json("POST", f"/v1/refunds/{second['id']}/outcome", 200,
                     json={"status": "COMPLETED", "note": "sent again", "providerTransactionId": "MTN-RF-2"})
    assert await _provider_says(rt, first["id"], ProviderOutcome.SUCCEEDED) == "completed"
    async with rt.sessionmaker() as s:
        payment = await s.get(Payment, paid["id"])
    assert (payment.status, payment.refunded_minor, payment.mismatch) == ("REFUNDED", 100_000, True)
    assert payment.mismatch_detail == (
        f"refund {first['reference']} reported sent back after it had failed; refund {first['reference']} completed: "
        "50,000 RWF more than collected has gone back to the payer: recover it from the member")
    [entry] = await _audit(rt, "refund.sent_after_failure")
    assert entry.after["overRefunded"] == 50_000


async def test_a_failure_reported_after_the_refund_completed_is_flagged_not_applied(admin: Any, rt: Any,
                                                                                    demo: dict[str, Any]) -> None:
    paid, refund = await _parked_refund(admin, rt, demo)
    await admin.json("POST", f"/v1/refunds/{refund['id']}/outcome", 200,
                     json={"status": "COMPLETED", "note": "looks sent", "providerTransactionId": "MTN-RF-1"})
    assert await _provider_says(rt, refund["id"], ProviderOutcome.FAILED) == "flagged_failed_after_completion"
    assert (await admin.json("GET", f"/v1/refunds/{refund['id']}", 200))["status"] == "COMPLETED"
    payment = await admin.json("GET", f"/v1/payments/{paid['id']}", 200)
    assert (payment["status"], payment["mismatch"]) == ("REFUNDED", True)
    assert payment["mismatchDetail"] == (f"refund {refund['reference']} reported failed after it was completed: "
                                         "reversal declined")
    [entry] = await _audit(rt, "refund.failed_after_completion")
    assert entry.after == {"reported": "reversal declined"}
    # The same word again changes nothing more; a duplicate success is still ignored.
    assert await _provider_says(rt, refund["id"], ProviderOutcome.SUCCEEDED) == "ignored"


async def test_the_same_failure_delivered_again_is_a_duplicate_flagged_once(admin: Any, rt: Any,
                                                                          demo: dict[str, Any]) -> None:
    """A provider's retry of one refund callback (the same event id; a signed one, applied without a status query)
    is stored once: the failure reported after completion is audited and flagged once, not once per delivery."""
    paid, refund = await _parked_refund(admin, rt, demo)
    await admin.json("POST", f"/v1/refunds/{refund['id']}/outcome", 200,
                     json={"status": "COMPLETED", "note": "looks sent", "providerTransactionId": "MTN-RF-1"})
    async with rt.sessionmaker() as s:
        ours = (await s.get(Refund, refund["id"])).provider_reference
    failed = Event(provider="mtn_momo", kind=EventKind.REFUND, event_id=f"{ours}:FAILED", reference=ours,
                   outcome=ProviderOutcome.FAILED, reason="reversal declined")
    assert await handle_provider_event(rt, failed) == "flagged_failed_after_completion"
    assert await handle_provider_event(rt, failed) == "duplicate"
    payment = await admin.json("GET", f"/v1/payments/{paid['id']}", 200)
    assert payment["mismatchDetail"] == (f"refund {refund['reference']} reported failed after it was completed: "
                                         "reversal declined")
    [entry] = await _audit(rt, "refund.failed_after_completion")
    assert entry.after == {"reported": "reversal declined"}


async def test_paid_twice_is_flagged_when_the_second_refund_completes_after_the_first_came_back(
        admin: Any, rt: Any, demo: dict[str, Any]) -> None:
    """Refund A recorded FAILED, refund B asked for at once; A is reported sent back while B is with the provider,
    then B completes: the member has 100,000 of a 50,000 payment, and the flag says so when B completes."""
    paid, first = await _parked_refund(admin, rt, demo)
    await admin.json("POST", f"/v1/refunds/{first['id']}/outcome", 200, json={"status": "FAILED", "note": "failed"})
    _paid, second = await _parked_refund(admin, rt, demo, paid)
    assert await _provider_says(rt, first["id"], ProviderOutcome.SUCCEEDED) == "completed"
    assert await _provider_says(rt, second["id"], ProviderOutcome.SUCCEEDED) == "completed"
    async with rt.sessionmaker() as s:
        payment = await s.get(Payment, paid["id"])
    assert (payment.status, payment.refunded_minor) == ("REFUNDED", 100_000)
    assert payment.mismatch_detail == (
        f"refund {first['reference']} reported sent back after it had failed; refund {second['reference']} "
        "completed: 50,000 RWF more than collected has gone back to the payer: recover it from the member")
    [entry] = await _audit(rt, "payment.refunded_beyond_collected")
    assert entry.after == {"refundId": second["id"], "refunded": 100_000}


async def test_a_later_flag_keeps_what_earlier_ones_said_and_a_late_completion_clears_the_failure_reason(
        admin: Any, rt: Any, demo: dict[str, Any]) -> None:
    paid, first = await _parked_refund(admin, rt, demo)
    await admin.json("POST", f"/v1/refunds/{first['id']}/outcome", 200, json={"status": "FAILED", "note": "nope"})
    _paid, second = await _parked_refund(admin, rt, demo, paid)
    await admin.json("POST", f"/v1/refunds/{second['id']}/outcome", 200,
                     json={"status": "COMPLETED", "note": "sent again", "providerTransactionId": "MTN-RF-2"})
    assert await _provider_says(rt, first["id"], ProviderOutcome.SUCCEEDED) == "completed"
    done = await admin.json("GET", f"/v1/refunds/{first['id']}", 200)
    assert (done["status"], done["failureReason"]) == ("COMPLETED", None)
    async with rt.sessionmaker() as s:
        [event] = [j.payload for j in (await s.execute(select(OutboxJob).where(OutboxJob.kind == "webhook.event")))
                   .scalars() if j.payload.get("event_type") == "refund.completed"
                   and (j.payload.get("data") or {}).get("id") == first["id"]]
    assert event["data"]["failureReason"] is None
    before = (await admin.json("GET", f"/v1/payments/{paid['id']}", 200))["mismatchDetail"]
    assert await _provider_says(rt, second["id"], ProviderOutcome.FAILED) == "flagged_failed_after_completion"
    after = (await admin.json("GET", f"/v1/payments/{paid['id']}", 200))["mismatchDetail"]
    assert after == f"{before}; refund {second['reference']} reported failed after it was completed: reversal declined"


async def test_an_admin_records_a_failed_refund_the_statement_shows_sent_back(admin: Any, rt: Any,
                                                                             demo: dict[str, Any]) -> None:
    """The provider's late word never came through (it reached a process of an earlier release during a deploy,
    which dropped it): the statement shows the money sent back, so the admin records the FAILED refund
    COMPLETED, flagged as the provider's late word would be."""
    paid, refund = await _parked_refund(admin, rt, demo)
    await admin.json("POST", f"/v1/refunds/{refund['id']}/outcome", 200, json={"status": "FAILED", "note": "failed"})
    again = await admin.json("POST", f"/v1/refunds/{refund['id']}/outcome", 409,
                             json={"status": "FAILED", "note": "failed again"})
    assert again["message"] == "refund is already FAILED"
    done = await admin.json("POST", f"/v1/refunds/{refund['id']}/outcome", 200, json={
        "status": "COMPLETED", "note": "on the statement of 3 Dec after all", "providerTransactionId": "MTN-RF-77"})
    assert (done["status"], done["failureReason"]) == ("COMPLETED", None)
    payment = await admin.json("GET", f"/v1/payments/{paid['id']}", 200)
    assert (payment["status"], payment["mismatch"]) == ("REFUNDED", True)
    [entry] = await _audit(rt, "refund.sent_after_failure")
    assert entry.after["refunded"] == 50_000
    await admin.json("POST", f"/v1/refunds/{refund['id']}/outcome", 409,
                     json={"status": "COMPLETED", "note": "twice", "providerTransactionId": "MTN-RF-77"})


def _anomalies(kind: str) -> float:
    from core.metrics import REFUND_ANOMALIES

    return REFUND_ANOMALIES.labels(kind=kind)._value.get()


async def test_where_a_person_finds_a_member_paid_back_twice(admin: Any, rt: Any, demo: dict[str, Any],
                                                              caplog: Any) -> None:
    """The flagged payment is found by GET /v1/payments?mismatch=true, counted in
    gateway_refund_anomalies_total, and the moment the member has more back than collected is logged ERROR with
    the references; an admin's correction that pays nobody twice is a WARNING, not a page."""
    import logging

    other = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    await complete_payment(rt, other["id"])
    paid, first = await _parked_refund(admin, rt, demo)
    await admin.json("POST", f"/v1/refunds/{first['id']}/outcome", 200, json={"status": "FAILED", "note": "failed"})
    _paid, second = await _parked_refund(admin, rt, demo, paid)
    before = (_anomalies("sent_after_failure"), _anomalies("beyond_collected"))
    with caplog.at_level(logging.WARNING, logger="gateway.refunds"):
        await admin.json("POST", f"/v1/refunds/{first['id']}/outcome", 200, json={
            "status": "COMPLETED", "note": "on the statement after all", "providerTransactionId": "MTN-RF-1"})
        assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
            ("WARNING", "refund reported sent back after it had failed")]
        caplog.clear()
        assert await _provider_says(rt, second["id"], ProviderOutcome.SUCCEEDED) == "completed"
        [record] = caplog.records
    assert (record.levelname, record.getMessage()) == ("ERROR", "member paid back more than was collected")
    assert (record.refund, record.payment, record.over_refunded_minor) == (second["reference"], paid["reference"],
                                                                          50_000)
    assert (_anomalies("sent_after_failure"), _anomalies("beyond_collected")) == (before[0] + 1, before[1] + 1)
    flagged = await admin.json("GET", "/v1/payments?mismatch=true", 200)
    assert [p["id"] for p in flagged["data"]] == [paid["id"]]
    clean = await admin.json("GET", "/v1/payments?mismatch=false", 200)
    assert paid["id"] not in [p["id"] for p in clean["data"]] and other["id"] in [p["id"] for p in clean["data"]]
    assert (await admin.json("GET", "/v1/payments?mismatch=maybe", 400))["message"] == [
        "mismatch must be true or false"]


async def test_a_statement_id_already_recorded_is_not_attached_to_another_refund(admin: Any, rt: Any,
                                                                                 demo: dict[str, Any]) -> None:
    """A chargeback of 20,000 recorded under MTN-REV-777; the parked refund of the rest cannot be recorded
    COMPLETED under the same statement line (one line would cover two refunds)."""
    paid = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    await complete_payment(rt, paid["id"])
    chargeback = await admin.json("POST", f"/v1/payments/{paid['id']}/refunds", 201, json={
        "amount": 20000, "idempotencyKey": idem(), "returnedByProvider": {"providerTransactionId": "MTN-REV-777"}})
    _paid, rest = await _parked_refund(admin, rt, demo, paid)
    refused = await admin.json("POST", f"/v1/refunds/{rest['id']}/outcome", 409, json={
        "status": "COMPLETED", "note": "on the statement", "providerTransactionId": "MTN-REV-777"})
    assert refused["message"] == (f"the provider's transaction MTN-REV-777 is already recorded, by refund "
                                  f"{chargeback['reference']}")
    done = await admin.json("POST", f"/v1/refunds/{rest['id']}/outcome", 200, json={
        "status": "COMPLETED", "note": "on the statement", "providerTransactionId": "MTN-RF-778"})
    assert done["status"] == "COMPLETED"


async def test_flags_that_outgrow_the_column_keep_the_first_and_the_newest(admin: Any, rt: Any,
                                                                           demo: dict[str, Any]) -> None:
    """Four failures reported after completion on one payment: every flag is stored (the column holds 300
    characters: the first flag's start and the newest flags are kept), none fails the callback."""
    paid = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    await complete_payment(rt, paid["id"])
    refunds = []
    for n in range(4):
        _paid, refund = await _parked_refund(admin, rt, demo, paid, 10_000)
        await admin.json("POST", f"/v1/refunds/{refund['id']}/outcome", 200, json={
            "status": "COMPLETED", "note": "looks sent", "providerTransactionId": f"MTN-RF-{n}"})
        refunds.append(refund)
    for refund in refunds:
        assert await _provider_says(rt, refund["id"], ProviderOutcome.FAILED) == "flagged_failed_after_completion"
    async with rt.sessionmaker() as s:
        detail = (await s.get(Payment, paid["id"])).mismatch_detail
    assert len(detail) <= 300
    assert detail.startswith(f"refund {refunds[0]['reference']} reported failed after it was completed")
    assert " … " in detail and detail.endswith(f"refund {refunds[3]['reference']} reported failed after it was "
                                               "completed: reversal declined")



async def test_a_repeated_success_after_failure_keeps_the_flags_added_since(admin: Any, rt: Any,
                                                                          demo: dict[str, Any]) -> None:
    """Money taken after the payment failed, then flagged again (its member paid back twice): the provider's success
    reported once more, under another event id, does not write over what the payment's flags say."""
    paid = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Payment).where(Payment.id == paid["id"]).values(status="FAILED",
                                                                               failure_reason="payer declined"))
        ours = (await s.get(Payment, paid["id"])).provider_reference

    async def success() -> str:
        return await handle_provider_event(rt, Event(
            provider="mtn_momo", kind=EventKind.COLLECTION, event_id=uuid.uuid4().hex, reference=ours,
            outcome=ProviderOutcome.SUCCEEDED, provider_transaction_id="MTN-TAKEN-1"))

    assert await success() == "flagged_success_after_failure"
    async with rt.sessionmaker.begin() as s:
        payment = await s.get(Payment, paid["id"])
        payment.mismatch_detail += "; refund RFD_X completed: 50,000 RWF more than collected has gone back to the payer"
    assert await success() == "flagged_success_after_failure"
    async with rt.sessionmaker() as s:
        detail = (await s.get(Payment, paid["id"])).mismatch_detail
    assert detail == ("provider reported success after the payment had failed; refund RFD_X completed: 50,000 RWF "
                      "more than collected has gone back to the payer")


# --- Refunds asked for since, not yet sent, when a FAILED one goes through after all: withdrawn, not sent ------

async def _jobs(rt: Any, **where: Any) -> list[OutboxJob]:
    async with rt.sessionmaker() as s:
        query = select(OutboxJob).filter_by(**where).order_by(OutboxJob.id)
        return list((await s.execute(query)).scalars())


async def test_a_refund_not_yet_sent_is_withdrawn_when_the_failed_one_went_through_after_all(
        admin: Any, rt: Any, demo: dict[str, Any]) -> None:
    """A recorded FAILED, B asked for again, its submission still queued: A is reported sent back. Sending B would
    pay the member twice: B is withdrawn (FAILED, never sent), the cooperative's system told, the member not."""
    paid, first = await _parked_refund(admin, rt, demo)
    await admin.json("POST", f"/v1/refunds/{first['id']}/outcome", 200, json={"status": "FAILED", "note": "failed"})
    second = await admin.json("POST", f"/v1/payments/{paid['id']}/refunds", 201, json={"idempotencyKey": idem()})
    assert await _provider_says(rt, first["id"], ProviderOutcome.SUCCEEDED) == "completed"
    withdrawn = await admin.json("GET", f"/v1/refunds/{second['id']}", 200)
    assert (withdrawn["status"], withdrawn["failureReason"]) == (
        "FAILED", f"not sent: refund {first['reference']} went through after all")
    [submit] = await _jobs(rt, kind="refund.submit", dedupe_key=f"refund:{second['id']}")
    assert (submit.status, submit.last_error) == (
        "DONE", f"withdrawn: not sent: refund {first['reference']} went through after all")
    payment = await admin.json("GET", f"/v1/payments/{paid['id']}", 200)
    assert (payment["status"], payment["refundedAmount"]) == ("REFUNDED", 50_000)
    # The member was paid back once, so the only refund SMS is the one saying so; the webhook tells of both.
    sms = {j.payload["key"] for j in await _jobs(rt, kind="sms.send") if "refund" in j.payload["key"]}
    assert f"refund_completed:{first['id']}" in sms and not any(second["id"] in key for key in sms)
    events = [(j.payload["event_type"], j.payload["data"]["id"]) for j in await _jobs(rt, kind="webhook.event")
              if j.payload["event_type"].startswith("refund.")]
    assert ("refund.failed", second["id"]) in events and ("refund.completed", first["id"]) in events
    [entry] = await _audit(rt, "refund.withdrawn")
    assert (entry.entity_id, entry.after) == (second["id"], {"status": "FAILED", "sentRefundId": first["id"]})
    # The money is all back: nothing more can be refunded, and nothing was flagged "more than collected".
    await admin.json("POST", f"/v1/payments/{paid['id']}/refunds", 422, json={"idempotencyKey": idem()})
    assert "more than collected" not in (payment["mismatchDetail"] or "")


async def test_only_as_many_unsent_refunds_as_needed_are_withdrawn_newest_first(
        admin: Any, rt: Any, demo: dict[str, Any]) -> None:
    """30,000 FAILED, then 20,000 and 20,000 asked for (all 50,000 held): the 30,000 goes through after all, so
    70,000 would go back. The newest 20,000 is withdrawn; the older one still fits and is sent."""
    paid, first = await _parked_refund(admin, rt, demo, amount=30_000)
    await admin.json("POST", f"/v1/refunds/{first['id']}/outcome", 200, json={"status": "FAILED", "note": "failed"})
    older = await admin.json("POST", f"/v1/payments/{paid['id']}/refunds", 201,
                             json={"idempotencyKey": idem(), "amount": 20_000})
    newer = await admin.json("POST", f"/v1/payments/{paid['id']}/refunds", 201,
                             json={"idempotencyKey": idem(), "amount": 20_000})
    assert await _provider_says(rt, first["id"], ProviderOutcome.SUCCEEDED) == "completed"
    assert (await admin.json("GET", f"/v1/refunds/{newer['id']}", 200))["status"] == "FAILED"
    assert (await admin.json("GET", f"/v1/refunds/{older['id']}", 200))["status"] == "PENDING"
    [submit] = await _jobs(rt, kind="refund.submit", dedupe_key=f"refund:{older['id']}")
    assert submit.status == "PENDING"


@pytest.mark.parametrize("tried", ["504", "worker lost"])
async def test_a_refund_whose_submission_was_tried_is_not_withdrawn(admin: Any, rt: Any, demo: dict[str, Any],
                                                                    tried: str) -> None:
    """A submission tried once in a way that may have reached the provider (MTN answered 504: it may still carry the
    refund out; its worker lost mid-call) is left to go, as one being sent is: if it completes, the member has more
    back than collected, and that is flagged then. (Its marks say so, core.refunds._untried_or_refused: its attempts
    alone do not, see the test after this one.)"""
    paid, first = await _parked_refund(admin, rt, demo)
    await admin.json("POST", f"/v1/refunds/{first['id']}/outcome", 200, json={"status": "FAILED", "note": "failed"})
    second = await admin.json("POST", f"/v1/payments/{paid['id']}/refunds", 201, json={"idempotencyKey": idem()})
    mark = (f"{CALL_SENT}: ProviderError: mtn_momo refund failed on the provider's side (HTTP 504): timeout"
            if tried == "504" else WORKER_LOST)
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(OutboxJob).where(OutboxJob.dedupe_key == f"refund:{second['id']}").values(
            attempts=1, last_error=mark))
    assert await _provider_says(rt, first["id"], ProviderOutcome.SUCCEEDED) == "completed"
    assert (await admin.json("GET", f"/v1/refunds/{second['id']}", 200))["status"] == "PENDING"
    [submit] = await _jobs(rt, kind="refund.submit", dedupe_key=f"refund:{second['id']}")
    assert (submit.status, submit.attempts, submit.last_error) == ("PENDING", 1, mark)
    assert await _audit(rt, "refund.withdrawn") == []


@pytest.mark.parametrize("refused", ["429", "token failed"])
async def test_a_refund_whose_tries_were_refused_unprocessed_is_withdrawn(admin: Any, rt: Any, demo: dict[str, Any],
                                                                          refused: str) -> None:
    """A submission tried once, that try refused before anything was processed (MTN's rate limit, HTTP 429) or
    failed before its call (its token): nothing reached MTN, as for one never tried. It was left to go (only a
    submission at 0 attempts was withdrawn), and sent at its next try: the member was paid back twice. Withdrawn
    now, as an admin's withdrawal (POST /v1/refunds/{id}/cancel) withdraws it."""
    paid, first = await _parked_refund(admin, rt, demo)
    await admin.json("POST", f"/v1/refunds/{first['id']}/outcome", 200, json={"status": "FAILED", "note": "failed"})
    second = await admin.json("POST", f"/v1/payments/{paid['id']}/refunds", 201, json={"idempotencyKey": idem()})
    error = ("ProviderBusy: mtn_momo is rate limiting refund (HTTP 429): too many requests" if refused == "429"
             else "ProviderError: mtn_momo token failed on the provider's side (HTTP 503): unavailable")
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(OutboxJob).where(OutboxJob.dedupe_key == f"refund:{second['id']}").values(
            attempts=1, last_error=error))
    assert await _provider_says(rt, first["id"], ProviderOutcome.SUCCEEDED) == "completed"
    withdrawn = await admin.json("GET", f"/v1/refunds/{second['id']}", 200)
    assert (withdrawn["status"], withdrawn["failureReason"]) == (
        "FAILED", f"not sent: refund {first['reference']} went through after all")
    [submit] = await _jobs(rt, kind="refund.submit", dedupe_key=f"refund:{second['id']}")
    assert (submit.status, submit.last_error) == (
        "DONE", f"withdrawn: not sent: refund {first['reference']} went through after all")
    [entry] = await _audit(rt, "refund.withdrawn")
    assert entry.entity_id == second["id"]
    payment = await admin.json("GET", f"/v1/payments/{paid['id']}", 200)
    assert (payment["status"], payment["refundedAmount"]) == ("REFUNDED", 50_000)
    assert "more than collected" not in (payment["mismatchDetail"] or "")
