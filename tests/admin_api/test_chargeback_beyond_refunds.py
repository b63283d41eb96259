"""A chargeback is the provider's statement, not a request: recorded even while a refund of the payment is at the
provider, or beyond what a refund made already left.

Found walking refunds and chargebacks: a full refund sent to MTN (PROCESSING, no longer withdrawable), then MTN
reversed the payment itself. Recording that reversal (returnedByProvider) was refused, "exceeds the refundable 0":
the refund at the provider held the amount. Once the refund completed, the reversal could never be recorded: the
money had left twice (the member got the refund AND the provider clawed the payment back) and the books could not
match the statement. Now it is recorded, up to what the provider collected, and what goes back beyond that is
flagged once for the cooperative to recover from the member."""

from __future__ import annotations

import csv
import io
import uuid
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from core.db import utcnow
from core.models import AuditEvent, Dispute, OutboxJob, Payment, Refund
from core.payments import fit_detail
from core.ports import EventKind, ProviderOutcome
from core.ports import ProviderEvent as Event
from core.provider_events import handle_provider_event
from core.refunds import refundable
from tests.admin_api.conftest import complete_payment, idem, make_payment


def _anomalies(kind: str) -> float:
    from core.metrics import REFUND_ANOMALIES

    return REFUND_ANOMALIES.labels(kind=kind)._value.get()


async def _collected(admin: Any, rt: Any, demo: dict[str, Any]) -> dict[str, Any]:
    """A 50,000 RWF MTN payment collected an hour ago."""
    paid = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    await complete_payment(rt, paid["id"])
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Payment).where(Payment.id == paid["id"]).values(
            created_at=utcnow() - timedelta(hours=1, minutes=1), completed_at=utcnow() - timedelta(hours=1)))
    return paid


async def _at_the_provider(admin: Any, rt: Any, paid: dict[str, Any], amount: int = 50_000) -> dict[str, Any]:
    """A refund sent to MTN whose outcome has not come (PROCESSING: it can no longer be withdrawn)."""
    refund = await admin.json("POST", f"/v1/payments/{paid['id']}/refunds", 201,
                              json={"idempotencyKey": idem(), "amount": amount})
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Refund).where(Refund.id == refund["id"]).values(status="PROCESSING"))
        await s.execute(update(OutboxJob).where(OutboxJob.dedupe_key == f"refund:{refund['id']}")
                        .values(status="DONE"))
    await admin.json("POST", f"/v1/refunds/{refund['id']}/cancel", 409, json={"note": "MTN reversed it"})
    return refund


async def _mtn_says_sent(rt: Any, refund_id: str, outcome: ProviderOutcome = ProviderOutcome.SUCCEEDED) -> str:
    async with rt.sessionmaker() as s:
        ours = (await s.get(Refund, refund_id)).provider_reference
    sent = outcome is ProviderOutcome.SUCCEEDED
    return await handle_provider_event(rt, Event(
        provider="mtn_momo", kind=EventKind.REFUND, event_id=uuid.uuid4().hex, reference=ours, outcome=outcome,
        provider_transaction_id=f"MTN-RF-{refund_id[:8]}" if sent else None,
        reason=None if sent else "reversal declined"))


async def _chargeback(admin: Any, paid: dict[str, Any], amount: int, txn: str, status: int = 201) -> dict[str, Any]:
    return await admin.json("POST", f"/v1/payments/{paid['id']}/refunds", status, json={
        "amount": amount, "idempotencyKey": idem(), "returnedByProvider": {"providerTransactionId": txn}})


async def _audit(rt: Any, action: str) -> list[AuditEvent]:
    async with rt.sessionmaker() as s:
        return list((await s.execute(select(AuditEvent).where(AuditEvent.action == action))).scalars())


async def test_a_chargeback_while_a_refund_is_at_the_provider_is_recorded_and_flagged(
        admin: Any, rt: Any, demo: dict[str, Any]) -> None:
    paid = await _collected(admin, rt, demo)
    sent = await _at_the_provider(admin, rt, paid)
    before = _anomalies("beyond_collected")
    recorded = await _chargeback(admin, paid, 50_000, "MTN-REV-1")
    assert (recorded["status"], recorded["amount"], recorded["returnedByProvider"]) == ("COMPLETED", 50_000, True)
    assert (await admin.json("GET", f"/v1/refunds/{sent['id']}", 200))["status"] == "PROCESSING"  # left to go
    payment = await admin.json("GET", f"/v1/payments/{paid['id']}", 200)
    assert (payment["status"], payment["refundedAmount"], payment["mismatch"]) == ("REFUNDED", 50_000, True)
    assert payment["mismatchDetail"] == (
        f"chargeback {recorded['reference']} of 50,000 RWF: 50,000 RWF more than collected goes back if refund "
        f"{sent['reference']} completes: recover it from the member")
    assert _anomalies("beyond_collected") == before + 1
    [entry] = await _audit(rt, "refund.returned_beyond_collected")
    assert (entry.entity_id, entry.after) == (recorded["id"], {
        "paymentId": paid["id"], "overReturned": 50_000, "alreadyReturned": 0, "inFlight": [sent["id"]],
        "chargebacks": [recorded["id"]], "refunds": [], "flag": payment["mismatchDetail"],
        "detail": payment["mismatchDetail"], "replaced": None, "updated": None})
    flagged = await admin.json("GET", "/v1/payments?mismatch=true", 200)
    assert [p["id"] for p in flagged["data"]] == [paid["id"]]
    # Ordinary refunds keep their limits: nothing is left to send.
    refused = await admin.json("POST", f"/v1/payments/{paid['id']}/refunds", 422,
                               json={"amount": 1, "idempotencyKey": idem()})
    assert refused["message"] == (
        "the payment has been refunded in full: nothing is left to refund (50,000 RWF back of 50,000 RWF collected: "
        f"chargeback {recorded['reference']}); refunds not settled yet hold 50,000 RWF ({sent['reference']}): "
        "sent to the provider, none can be withdrawn: wait for its outcome (one that fails frees its amount)")


async def test_a_dispute_resolved_by_a_chargeback_while_a_refund_is_at_the_provider(
        admin: Any, rt: Any, demo: dict[str, Any]) -> None:
    paid = await _collected(admin, rt, demo)
    sent = await _at_the_provider(admin, rt, paid, amount=30_000)
    dispute = await admin.json("POST", "/v1/disputes", 201, json={"paymentId": paid["id"], "reason": "OTHER"})
    resolved = await admin.json("POST", f"/v1/disputes/{dispute['id']}/transitions", 200, json={
        "status": "RESOLVED", "note": "MTN reversed it", "refundAmount": 50000,
        "returnedByProvider": {"providerTransactionId": "MTN-REV-2"}})
    assert resolved["status"] == "RESOLVED"
    refund = await admin.json("GET", f"/v1/refunds/{resolved['refundId']}", 200)
    assert (refund["status"], refund["amount"]) == ("COMPLETED", 50_000)
    payment = await admin.json("GET", f"/v1/payments/{paid['id']}", 200)
    assert payment["mismatch"] and (f"30,000 RWF more than collected goes back if refund {sent['reference']} "
                                    "completes" in payment["mismatchDetail"])


async def test_the_refund_at_the_provider_then_completes_both_stand_flagged_once(
        admin: Any, rt: Any, demo: dict[str, Any]) -> None:
    paid = await _collected(admin, rt, demo)
    sent = await _at_the_provider(admin, rt, paid)
    before = _anomalies("beyond_collected")
    recorded = await _chargeback(admin, paid, 50_000, "MTN-REV-3")
    assert await _mtn_says_sent(rt, sent["id"]) == "completed"
    assert (await admin.json("GET", f"/v1/refunds/{sent['id']}", 200))["status"] == "COMPLETED"
    assert (await admin.json("GET", f"/v1/refunds/{recorded['id']}", 200))["status"] == "COMPLETED"
    payment = await admin.json("GET", f"/v1/payments/{paid['id']}", 200)
    assert (payment["status"], payment["refundedAmount"], payment["collectedAmount"]) == ("REFUNDED", 100_000, 50_000)
    assert payment["mismatchDetail"].count("more than collected") == 1  # the same money, flagged once
    assert _anomalies("beyond_collected") == before + 1
    async with rt.sessionmaker() as s:
        stored = await s.get(Payment, paid["id"])
        assert (await refundable(s, stored)).minor == 0  # never negative
    nothing = await admin.json("POST", f"/v1/payments/{paid['id']}/refunds", 422, json={"idempotencyKey": idem()})
    assert nothing["message"] == (
        "the payment has been refunded in full: nothing is left to refund (100,000 RWF back of 50,000 RWF collected: "
        f"chargeback {recorded['reference']}, refund {sent['reference']})")
    # The reconciliation shows both as the statement does: 100,000 back on 50,000 collected.
    report = await admin.json("GET", "/v1/reports/reconciliation", 200)
    assert [(line["collected"], line["refundedCount"], line["refunded"], line["net"])
            for line in report["settled"]] == [(50_000, 2, 100_000, -50_000)]
    [total] = report["totals"]
    assert (total["collected"], total["refunded"], total["net"]) == (50_000, 100_000, -50_000)
    assert [f["id"] for f in report["flagged"]] == [paid["id"]]
    rows = list(csv.DictReader(io.StringIO(await (await admin.req("GET", "/v1/reports/refunds.csv")).text())))
    assert sorted((r["reference"], r["status"], r["returnedByProvider"]) for r in rows) == sorted(
        [(sent["reference"], "COMPLETED", "false"), (recorded["reference"], "COMPLETED", "true")])
    payments = list(csv.DictReader(io.StringIO(await (await admin.req("GET", "/v1/reports/payments.csv")).text())))
    assert [r["refundedAmount"] for r in payments if r["reference"] == paid["reference"]] == ["100000"]


async def test_the_refund_at_the_provider_failing_says_there_is_nothing_to_recover(
        admin: Any, rt: Any, demo: dict[str, Any]) -> None:
    paid = await _collected(admin, rt, demo)
    sent = await _at_the_provider(admin, rt, paid)
    await _chargeback(admin, paid, 50_000, "MTN-REV-11")
    assert await _mtn_says_sent(rt, sent["id"], ProviderOutcome.FAILED) == "failed"
    payment = await admin.json("GET", f"/v1/payments/{paid['id']}", 200)
    assert (payment["status"], payment["refundedAmount"], payment["mismatch"]) == ("REFUNDED", 50_000, True)
    assert payment["mismatchDetail"].endswith(
        f"recover it from the member; refund {sent['reference']} failed: nothing to recover")
    # Its failure alone flags nothing: a payment with no chargeback is left as it was.
    other = await _collected(admin, rt, demo)
    failed = await _at_the_provider(admin, rt, other)
    assert await _mtn_says_sent(rt, failed["id"], ProviderOutcome.FAILED) == "failed"
    assert (await admin.json("GET", f"/v1/payments/{other['id']}", 200))["mismatch"] is False


async def test_a_chargeback_beyond_what_a_completed_refund_left_is_recorded_and_flagged(
        admin: Any, rt: Any, demo: dict[str, Any]) -> None:
    paid = await _collected(admin, rt, demo)
    sent = await _at_the_provider(admin, rt, paid, amount=30_000)
    assert await _mtn_says_sent(rt, sent["id"]) == "completed"
    before = _anomalies("beyond_collected")
    recorded = await _chargeback(admin, paid, 50_000, "MTN-REV-4")
    payment = await admin.json("GET", f"/v1/payments/{paid['id']}", 200)
    assert (payment["status"], payment["refundedAmount"]) == ("REFUNDED", 80_000)
    assert payment["mismatchDetail"] == (
        f"chargeback {recorded['reference']} of 50,000 RWF: 30,000 RWF more than collected has gone back to the "
        "payer: recover it from the member")
    assert _anomalies("beyond_collected") == before + 1
    # The ordinary refund's limit is unchanged.
    await admin.json("POST", f"/v1/payments/{paid['id']}/refunds", 422, json={"amount": 1, "idempotencyKey": idem()})


async def test_chargebacks_never_take_back_more_than_was_collected(admin: Any, rt: Any,
                                                                   demo: dict[str, Any]) -> None:
    paid = await _collected(admin, rt, demo)
    sent = await _at_the_provider(admin, rt, paid)
    assert await _mtn_says_sent(rt, sent["id"]) == "completed"
    first = await _chargeback(admin, paid, 30_000, "MTN-REV-5")
    second = await _chargeback(admin, paid, 20_000, "MTN-REV-6")
    over = await _chargeback(admin, paid, 1, "MTN-REV-7", status=422)
    assert over["message"] == (
        "returnedByProvider: 1 RWF is more than the provider can have sent back: it collected 50,000 RWF on this "
        f"payment, and 50,000 RWF of it is recorded as sent back by the provider already ({first['reference']}, "
        f"{second['reference']})")
    other = await _collected(admin, rt, demo)
    above = await _chargeback(admin, other, 50_001, "MTN-REV-8", status=422)
    assert above["message"] == ("returnedByProvider: 50,001 RWF is more than the provider can have sent back: it "
                                "collected 50,000 RWF on this payment")
    async with rt.sessionmaker() as s:
        assert (await s.get(Payment, paid["id"])).refunded_minor == 100_000
        assert [r.provider_transaction_id for r in (await s.execute(
            select(Refund).where(Refund.payment_id == other["id"]))).scalars()] == []


async def test_the_same_reversal_twice_is_a_conflict_even_when_nothing_is_left(admin: Any, rt: Any,
                                                                               demo: dict[str, Any]) -> None:
    paid = await _collected(admin, rt, demo)
    first = await _chargeback(admin, paid, 50_000, "MTN-REV-9")
    again = await _chargeback(admin, paid, 50_000, "MTN-REV-9", status=409)
    assert again["message"] == f"the provider's reversal MTN-REV-9 is already recorded, by refund {first['reference']}"


async def test_a_chargeback_withdraws_a_refund_not_yet_sent_instead_of_paying_twice(
        admin: Any, rt: Any, demo: dict[str, Any]) -> None:
    """A refund still queued (MTN down) would pay the member a second time: it is withdrawn, as when a failed
    refund went through after all; nothing is flagged (the money went back once)."""
    paid = await _collected(admin, rt, demo)
    queued = await admin.json("POST", f"/v1/payments/{paid['id']}/refunds", 201,
                              json={"amount": 20_000, "idempotencyKey": idem()})
    recorded = await _chargeback(admin, paid, 50_000, "MTN-REV-10")
    withdrawn = await admin.json("GET", f"/v1/refunds/{queued['id']}", 200)
    assert (withdrawn["status"], withdrawn["failureReason"]) == (
        "FAILED", f"not sent: the provider sent the money back itself (refund {recorded['reference']}, its chargeback)")
    async with rt.sessionmaker() as s:
        submit = (await s.execute(select(OutboxJob).where(OutboxJob.dedupe_key == f"refund:{queued['id']}")
                                  )).scalar_one()
    assert submit.status == "DONE"
    payment = await admin.json("GET", f"/v1/payments/{paid['id']}", 200)
    assert (payment["status"], payment["refundedAmount"], payment["mismatch"]) == ("REFUNDED", 50_000, False)
    assert await _audit(rt, "refund.returned_beyond_collected") == []


@pytest.mark.parametrize("parked", ["by its Result", "after its retries"])
async def test_a_chargeback_withdraws_a_refund_parked_for_the_gateways_credentials(
        admin: Any, rt: Any, demo: dict[str, Any], parked: str) -> None:
    """A refund whose submission was parked for the gateway's credentials (the provider refused them: nothing sent)
    was left by the chargeback (only a queued, untried one was withdrawn) and sent once the credentials were fixed
    and its job replayed: the member paid back twice. Withdrawn as an admin's withdrawal withdraws it; nothing is
    flagged (the money went back once)."""
    from core.ports import AWAITING_CONFIGURATION, AWAITING_CONFIGURATION_NOTE

    paid = await _collected(admin, rt, demo)
    waiting = await admin.json("POST", f"/v1/payments/{paid['id']}/refunds", 201,
                               json={"amount": 50_000, "idempotencyKey": idem()})
    error = (f"{AWAITING_CONFIGURATION}: the provider refused the credentials" if parked == "by its Result" else
             "CredentialsRefused: mtn_momo refused the gateway's credentials for refund (HTTP 401): "
             f"unauthorized{AWAITING_CONFIGURATION_NOTE}")
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(OutboxJob).where(OutboxJob.dedupe_key == f"refund:{waiting['id']}").values(
            status="PARKED", attempts=8, last_error=error))
    recorded = await _chargeback(admin, paid, 50_000, "MTN-REV-12")
    withdrawn = await admin.json("GET", f"/v1/refunds/{waiting['id']}", 200)
    assert (withdrawn["status"], withdrawn["failureReason"]) == (
        "FAILED", f"not sent: the provider sent the money back itself (refund {recorded['reference']}, its chargeback)")
    async with rt.sessionmaker() as s:
        submit = (await s.execute(select(OutboxJob).where(OutboxJob.dedupe_key == f"refund:{waiting['id']}")
                                  )).scalar_one()
    assert (submit.status, submit.last_error) == ("DONE", f"withdrawn: {withdrawn['failureReason']}")
    payment = await admin.json("GET", f"/v1/payments/{paid['id']}", 200)
    assert (payment["status"], payment["refundedAmount"], payment["mismatch"]) == ("REFUNDED", 50_000, False)
    assert await _audit(rt, "refund.returned_beyond_collected") == []


async def test_a_refund_being_sent_then_parked_unsent_and_withdrawn_says_there_is_nothing_to_recover(
        admin: Any, rt: Any, demo: dict[str, Any]) -> None:
    """A refund whose submission is being sent when the chargeback is recorded is left to go, and counted in the
    chargeback's flag; its try is then refused for the gateway's credentials (nothing sent) and parked, and the
    admin withdrawing it is said on the flag: nothing to recover."""
    from core.ports import AWAITING_CONFIGURATION

    paid = await _collected(admin, rt, demo)
    parked = await admin.json("POST", f"/v1/payments/{paid['id']}/refunds", 201,
                              json={"amount": 50_000, "idempotencyKey": idem()})
    submission = OutboxJob.dedupe_key == f"refund:{parked['id']}"
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(OutboxJob).where(submission).values(status="RUNNING", attempts=1,
                                                                   locked_by="worker-1"))
    recorded = await _chargeback(admin, paid, 50_000, "MTN-REV-12")
    assert (await admin.json("GET", f"/v1/refunds/{parked['id']}", 200))["status"] == "PENDING"
    payment = await admin.json("GET", f"/v1/payments/{paid['id']}", 200)
    assert f"goes back if refund {parked['reference']} completes" in payment["mismatchDetail"]
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(OutboxJob).where(submission).values(
            status="PARKED", locked_by=None,
            last_error=f"{AWAITING_CONFIGURATION}: the provider refused the credentials"))
    await admin.json("POST", f"/v1/refunds/{parked['id']}/cancel", 200, json={"note": "MTN reversed it itself"})
    payment = await admin.json("GET", f"/v1/payments/{paid['id']}", 200)
    assert payment["mismatchDetail"] == (
        f"chargeback {recorded['reference']} of 50,000 RWF: 50,000 RWF more than collected goes back if refund "
        f"{parked['reference']} completes: recover it from the member; refund {parked['reference']} failed: "
        "nothing to recover")


async def test_a_partial_chargeback_withdrawing_a_larger_queued_refund_flags_what_is_still_hers(
        admin: Any, rt: Any, demo: dict[str, Any]) -> None:
    """A 50,000 refund queued (MTN down), then MTN reverses 20,000 of the payment itself: the queued refund is
    withdrawn whole (sent, 70,000 would go back on 50,000), and the 30,000 the officer decided to give back besides
    was lost without a word (only the cooperative's system heard refund.failed): now flagged on the payment and
    noted on its dispute, to refund again."""
    paid = await _collected(admin, rt, demo)
    dispute = await admin.json("POST", "/v1/disputes", 201, json={"paymentId": paid["id"], "reason": "OTHER"})
    queued = await admin.json("POST", f"/v1/payments/{paid['id']}/refunds", 201,
                              json={"amount": 50_000, "idempotencyKey": idem()})
    recorded = await _chargeback(admin, paid, 20_000, "MTN-REV-13")
    assert (await admin.json("GET", f"/v1/refunds/{queued['id']}", 200))["status"] == "FAILED"
    payment = await admin.json("GET", f"/v1/payments/{paid['id']}", 200)
    assert (payment["status"], payment["refundedAmount"], payment["mismatch"]) == ("PARTIALLY_REFUNDED", 20_000, True)
    assert payment["mismatchDetail"] == (f"refund {queued['reference']} of 50,000 RWF withdrawn unsent: 30,000 RWF "
                                         "of it is still the member's: refund it again")
    async with rt.sessionmaker() as s:
        notes = [n["text"] for n in (await s.get(Dispute, dispute["id"])).notes or [] if "not sent" in n["text"]]
    assert notes == [f"refund {queued['reference']} not sent: the provider sent the money back itself (refund "
                     f"{recorded['reference']}, its chargeback): the member has been paid back by it, but for "
                     "30,000 RWF: refund that again"]
    # What is left is refundable again: the rest goes to her.
    again = await admin.json("POST", f"/v1/payments/{paid['id']}/refunds", 201, json={"idempotencyKey": idem()})
    assert again["amount"] == 30_000
    assert recorded["status"] == "COMPLETED" and dispute["status"] == "OPEN"


async def test_a_resolution_by_chargeback_keeps_the_note_of_the_refund_it_withdrew(
        admin: Any, rt: Any, demo: dict[str, Any]) -> None:
    """A refund asked for while the dispute was open, still queued (MTN down), is withdrawn by the chargeback the
    dispute is resolved with, and noted on the dispute: the resolution then wrote back the notes it had read before
    the refund was recorded, and that note was lost (the officer saw her refund FAILED with no word on why)."""
    paid = await _collected(admin, rt, demo)
    dispute = await admin.json("POST", "/v1/disputes", 201, json={"paymentId": paid["id"], "reason": "OTHER"})
    queued = await admin.json("POST", f"/v1/payments/{paid['id']}/refunds", 201,
                              json={"amount": 50_000, "idempotencyKey": idem()})
    resolved = await admin.json("POST", f"/v1/disputes/{dispute['id']}/transitions", 200, json={
        "status": "RESOLVED", "note": "MTN reversed it", "refundAmount": 50000,
        "returnedByProvider": {"providerTransactionId": "MTN-REV-14"}})
    assert (await admin.json("GET", f"/v1/refunds/{queued['id']}", 200))["status"] == "FAILED"
    texts = [n["text"] for n in (await admin.json("GET", f"/v1/disputes/{dispute['id']}", 200))["notes"]]
    refund = await admin.json("GET", f"/v1/refunds/{resolved['refundId']}", 200)
    assert texts[-2:] == [
        f"refund {queued['reference']} not sent: the provider sent the money back itself (refund "
        f"{refund['reference']}, its chargeback): the member has been paid back by it", "MTN reversed it"], texts


async def test_a_chargeback_leaves_a_replayed_refund_whose_earlier_try_may_have_arrived(
        admin: Any, rt: Any, demo: dict[str, Any]) -> None:
    """A refund whose try MTN answered 504 (it may carry it out) parked, then replayed: its submission is PENDING at
    0 attempts again, its try's mark kept. A chargeback withdrew it as never sent; had MTN carried the try out, the
    member was paid back twice with nothing flagged. Now it is left to go (as an admin's withdrawal leaves it) and
    counted in the chargeback's flag."""
    from core.outbox import CALL_SENT

    paid = await _collected(admin, rt, demo)
    tried = await admin.json("POST", f"/v1/payments/{paid['id']}/refunds", 201,
                             json={"amount": 50_000, "idempotencyKey": idem()})
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(OutboxJob).where(OutboxJob.dedupe_key == f"refund:{tried['id']}").values(
            status="PENDING", attempts=0, last_error=f"{CALL_SENT}: HTTP 504"))
    await admin.json("POST", f"/v1/refunds/{tried['id']}/cancel", 409, json={"note": "MTN reversed it"})
    await _chargeback(admin, paid, 50_000, "MTN-REV-15")
    assert (await admin.json("GET", f"/v1/refunds/{tried['id']}", 200))["status"] == "PENDING"
    payment = await admin.json("GET", f"/v1/payments/{paid['id']}", 200)
    assert payment["mismatch"] and (f"50,000 RWF more than collected goes back if refund {tried['reference']} "
                                    "completes" in payment["mismatchDetail"])


async def _review(admin: Any, paid: dict[str, Any]) -> None:
    await admin.json("POST", f"/v1/payments/{paid['id']}/review", 200, json={"note": "asked the member to repay"})


async def test_chargebacks_beyond_collected_on_one_payment_keep_one_flag_stating_the_total(
        admin: Any, rt: Any, demo: dict[str, Any]) -> None:
    """MTN reverses a payment in two parts while its full refund is at MTN. Each part added its own flag, "30,000 RWF
    more than collected goes back", then "50,000 RWF more than collected goes back" (read together: 80,000 to recover,
    when 50,000 is), and counted again in gateway_refund_anomalies_total{kind="beyond_collected"}. Now one flag states
    the total, naming both chargebacks; the payment is counted once, when it went beyond collected; each chargeback is
    audited."""
    paid = await _collected(admin, rt, demo)
    sent = await _at_the_provider(admin, rt, paid)
    before = _anomalies("beyond_collected")
    first = await _chargeback(admin, paid, 30_000, "MTN-REV-21")
    payment = await admin.json("GET", f"/v1/payments/{paid['id']}", 200)
    assert payment["mismatchDetail"] == (
        f"chargeback {first['reference']} of 30,000 RWF: 30,000 RWF more than collected goes back if refund "
        f"{sent['reference']} completes: recover it from the member")
    second = await _chargeback(admin, paid, 20_000, "MTN-REV-22")
    payment = await admin.json("GET", f"/v1/payments/{paid['id']}", 200)
    assert (payment["status"], payment["refundedAmount"], payment["mismatch"]) == ("REFUNDED", 50_000, True)
    assert payment["mismatchDetail"] == (
        f"chargebacks {first['reference']}, {second['reference']} of 50,000 RWF in all: 50,000 RWF more than "
        f"collected goes back if refund {sent['reference']} completes: recover it from the member")
    assert _anomalies("beyond_collected") == before + 1
    entries = sorted(await _audit(rt, "refund.returned_beyond_collected"), key=lambda e: e.at)
    assert [(e.entity_id, e.after["overReturned"], e.after["chargebacks"], e.after["updated"]) for e in entries] == [
        (first["id"], 30_000, [first["id"]], None),
        (second["id"], 50_000, [first["id"], second["id"]], first["id"])]
    # The refund at MTN then completes: the money its flag counted, flagged and counted no more.
    assert await _mtn_says_sent(rt, sent["id"]) == "completed"
    payment = await admin.json("GET", f"/v1/payments/{paid['id']}", 200)
    assert (payment["refundedAmount"], payment["mismatchDetail"].count("more than collected")) == (100_000, 1)
    assert _anomalies("beyond_collected") == before + 1


async def test_the_refund_counted_by_both_chargebacks_failing_leaves_nothing_to_recover(
        admin: Any, rt: Any, demo: dict[str, Any]) -> None:
    paid = await _collected(admin, rt, demo)
    sent = await _at_the_provider(admin, rt, paid)
    first = await _chargeback(admin, paid, 30_000, "MTN-REV-23")
    second = await _chargeback(admin, paid, 20_000, "MTN-REV-24")
    assert await _mtn_says_sent(rt, sent["id"], ProviderOutcome.FAILED) == "failed"
    payment = await admin.json("GET", f"/v1/payments/{paid['id']}", 200)
    assert (payment["refundedAmount"], payment["mismatch"], payment["mismatchDetail"]) == (50_000, True, (
        f"chargebacks {first['reference']}, {second['reference']} of 50,000 RWF in all: 50,000 RWF more than "
        f"collected goes back if refund {sent['reference']} completes: recover it from the member; refund "
        f"{sent['reference']} failed: nothing to recover"))


async def test_going_beyond_collected_again_is_a_new_flag_and_counted_again(
        admin: Any, rt: Any, demo: dict[str, Any]) -> None:
    """Once nothing is left to recover (the refund a chargeback's flag counted failed), or once a person reviewed the
    flag, a chargeback that takes the payment beyond collected again is a new flag, counted again."""
    paid = await _collected(admin, rt, demo)
    sent = await _at_the_provider(admin, rt, paid)
    before = _anomalies("beyond_collected")
    first = await _chargeback(admin, paid, 20_000, "MTN-REV-25")
    assert await _mtn_says_sent(rt, sent["id"], ProviderOutcome.FAILED) == "failed"  # nothing to recover
    again = await _at_the_provider(admin, rt, paid, amount=30_000)  # what is left, refunded
    second = await _chargeback(admin, paid, 20_000, "MTN-REV-26")
    payment = await admin.json("GET", f"/v1/payments/{paid['id']}", 200)
    # (The oldest flag's middle cut to the column's 300 characters: core.payments.fit_detail.)
    assert payment["mismatchDetail"].startswith(f"chargeback {first['reference']} of 20,000 RWF: ")
    assert payment["mismatchDetail"].endswith(
        f" failed: nothing to recover; chargeback {second['reference']} of 20,000 RWF: "
        f"20,000 RWF more than collected goes back if refund {again['reference']} completes: recover it from the "
        "member")
    assert _anomalies("beyond_collected") == before + 2
    # Reviewed: the next chargeback's flag is a new one (the reviewed one is no longer open), counted.
    await _review(admin, paid)
    third = await _chargeback(admin, paid, 10_000, "MTN-REV-27")
    payment = await admin.json("GET", f"/v1/payments/{paid['id']}", 200)
    assert (payment["mismatch"], payment["mismatchDetail"]) == (True, (
        f"chargeback {third['reference']} of 10,000 RWF: 30,000 RWF more than collected goes back if refund "
        f"{again['reference']} completes: recover it from the member"))
    assert _anomalies("beyond_collected") == before + 3


async def test_many_chargebacks_keep_one_flag_within_the_column_stating_the_total(
        admin: Any, rt: Any, demo: dict[str, Any]) -> None:
    """MTN reverses a payment in fifteen parts while its full refund is at MTN. The combined flag named every
    chargeback: past the column's 300 characters its middle was cut, the next chargeback no longer found it, and its
    flag was added after the cut one (two totals, counted again). Now it names the count and the latest, and each
    chargeback still replaces it: one flag, the total now, what to do, within the column, counted once."""
    paid = await _collected(admin, rt, demo)
    sent = await _at_the_provider(admin, rt, paid)
    before = _anomalies("beyond_collected")
    backs = [await _chargeback(admin, paid, 3_000, f"MTN-REV-4{n:02}") for n in range(15)]
    payment = await admin.json("GET", f"/v1/payments/{paid['id']}", 200)
    assert (payment["refundedAmount"], payment["mismatch"]) == (45_000, True)
    assert payment["mismatchDetail"] == (
        f"15 chargebacks of 45,000 RWF in all, the latest {backs[-1]['reference']}: 45,000 RWF more than collected "
        f"goes back if refund {sent['reference']} completes: recover it from the member")
    assert _anomalies("beyond_collected") == before + 1
    entries = sorted(await _audit(rt, "refund.returned_beyond_collected"), key=lambda e: e.at)
    assert [(e.after["chargebacks"], e.after["updated"]) for e in entries[-2:]] == [
        ([b["id"] for b in backs[:-1]], backs[-3]["id"]), ([b["id"] for b in backs], backs[-2]["id"])]
    assert entries[-1].after["flag"] == entries[-1].after["detail"] == payment["mismatchDetail"]
    assert entries[-1].after["replaced"] == entries[-2].after["flag"]
    # The refund at MTN then completes: counted in the flag already.
    assert await _mtn_says_sent(rt, sent["id"]) == "completed"
    payment = await admin.json("GET", f"/v1/payments/{paid['id']}", 200)
    assert payment["mismatchDetail"] == entries[-1].after["flag"]
    assert _anomalies("beyond_collected") == before + 1


async def test_a_chargeback_replaces_its_open_flag_keeping_the_flags_written_before_and_after_it(
        admin: Any, rt: Any, demo: dict[str, Any]) -> None:
    """The open flag is found where it was written (its audit row keeps the detail it wrote), not by its words: the
    flags before and after it (completed refunds MTN then says failed) stay, in their order, and the new one states
    the total after them."""
    paid = await _collected(admin, rt, demo)
    done = [await _at_the_provider(admin, rt, paid, amount=10_000) for _ in range(2)]
    for refund in done:
        assert await _mtn_says_sent(rt, refund["id"]) == "completed"
    sent = await _at_the_provider(admin, rt, paid, amount=20_000)
    contradicted = [f"refund {refund['reference']} reported failed after it was completed: reversal declined"
                    for refund in done]
    assert await _mtn_says_sent(rt, done[0]["id"], ProviderOutcome.FAILED) == "flagged_failed_after_completion"
    before = _anomalies("beyond_collected")
    first = await _chargeback(admin, paid, 30_000, "MTN-REV-31")
    assert (await admin.json("GET", f"/v1/payments/{paid['id']}", 200))["mismatchDetail"] == (
        f"{contradicted[0]}; chargeback {first['reference']} of 30,000 RWF: 20,000 RWF more than collected goes back "
        f"if refund {sent['reference']} completes: recover it from the member")
    assert await _mtn_says_sent(rt, done[1]["id"], ProviderOutcome.FAILED) == "flagged_failed_after_completion"
    # Past the column's 300 characters: the open flag's start was kept in the detail's first part, its end cut.
    cut = (await admin.json("GET", f"/v1/payments/{paid['id']}", 200))["mismatchDetail"]
    assert cut.startswith(f"{contradicted[0]}; chargeback {first['reference'][:6]}") and " … " in cut
    second = await _chargeback(admin, paid, 20_000, "MTN-REV-32")
    payment = await admin.json("GET", f"/v1/payments/{paid['id']}", 200)
    flag = (f"chargebacks {first['reference']}, {second['reference']} of 50,000 RWF in all: 20,000 RWF more than "
            f"collected has gone back, 40,000 RWF if refund {sent['reference']} completes: recover it from the member")
    # Nothing of the replaced flag is left (its start had stayed before the new flag); the flags of other kinds are
    # there, in their order, the middle cut to the column's 300 characters as fit_detail cuts any.
    assert payment["mismatchDetail"] == fit_detail(f"{contradicted[0]}; {contradicted[1]}; {flag}")
    assert payment["mismatchDetail"].count("chargeback") == 1 and len(payment["mismatchDetail"]) == 300
    assert _anomalies("beyond_collected") == before + 1
    latest = max(await _audit(rt, "refund.returned_beyond_collected"), key=lambda e: e.at)
    assert (latest.after["replaced"], latest.after["detail"]) == (
        f"chargeback {first['reference']} of 30,000 RWF: 20,000 RWF more than collected goes back if refund "
        f"{sent['reference']} completes: recover it from the member", payment["mismatchDetail"])


async def test_a_failed_refund_going_through_replaces_the_open_chargeback_flag_with_the_total(
        admin: Any, rt: Any, demo: dict[str, Any]) -> None:
    """A chargeback's flag beyond collected is open when a refund recorded FAILED is reported sent back after all:
    it added its own "… more than collected has gone back" (20,000, then 40,000: read as 60,000 to recover when
    40,000 is) and was counted again. Now the one open flag is replaced with the total, after the refund's own flag
    (sent back after it had failed, which stays); the payment is counted once; a later chargeback replaces it too."""
    paid = await _collected(admin, rt, demo)
    failed = await _at_the_provider(admin, rt, paid, amount=20_000)
    await admin.json("POST", f"/v1/refunds/{failed['id']}/outcome", 200, json={"status": "FAILED", "note": "failed"})
    done = await _at_the_provider(admin, rt, paid, amount=30_000)
    assert await _mtn_says_sent(rt, done["id"]) == "completed"
    before = _anomalies("beyond_collected")
    first = await _chargeback(admin, paid, 40_000, "MTN-REV-33")
    opened = (f"chargeback {first['reference']} of 40,000 RWF: 20,000 RWF more than collected has gone back to the "
              "payer: recover it from the member")
    assert (await admin.json("GET", f"/v1/payments/{paid['id']}", 200))["mismatchDetail"] == opened
    await admin.json("POST", f"/v1/refunds/{failed['id']}/outcome", 200, json={
        "status": "COMPLETED", "note": "on the statement after all", "providerTransactionId": "MTN-RF-33"})
    payment = await admin.json("GET", f"/v1/payments/{paid['id']}", 200)
    assert (payment["refundedAmount"], payment["mismatchDetail"]) == (90_000, (
        f"refund {failed['reference']} reported sent back after it had failed; chargeback {first['reference']} of "
        f"40,000 RWF and refund {failed['reference']} completed: 40,000 RWF more than collected has gone back to the "
        "payer: recover it from the member"))
    assert _anomalies("beyond_collected") == before + 1
    [entry] = await _audit(rt, "payment.beyond_collected")
    assert (entry.entity_id, entry.after["refundId"], entry.after["overReturned"], entry.after["chargebacks"],
            entry.after["refunds"], entry.after["replaced"]) == (
        paid["id"], failed["id"], 40_000, [first["id"]], [failed["id"]], opened)
    second = await _chargeback(admin, paid, 10_000, "MTN-REV-34")
    payment = await admin.json("GET", f"/v1/payments/{paid['id']}", 200)
    assert payment["mismatchDetail"] == (
        f"refund {failed['reference']} reported sent back after it had failed; chargebacks {first['reference']}, "
        f"{second['reference']} of 50,000 RWF in all and refund {failed['reference']} completed: 50,000 RWF more "
        "than collected has gone back to the payer: recover it from the member")
    assert _anomalies("beyond_collected") == before + 1
    latest = max(await _audit(rt, "refund.returned_beyond_collected"), key=lambda e: e.at)
    assert (latest.entity_id, latest.after["updated"], latest.after["chargebacks"]) == (
        second["id"], first["id"], [first["id"], second["id"]])


async def test_a_flag_naming_a_chargeback_a_refund_and_one_at_the_provider_is_kept_whole(
        admin: Any, rt: Any, demo: dict[str, Any]) -> None:
    """One chargeback, one refund that went through after failing and one at the provider, each named, with part of
    the money gone back: the flag said 200 characters, more than the column's end keeps (197), and past the 300
    fit_detail cut its start ("… back RFD_… of 30,000 RWF and refund …"); the next chargeback found nothing whole to
    replace and the cut one's end stayed before the new one. Now none is named when the counted form is too long: the
    flag is whole, and replaced whole."""
    paid = await _collected(admin, rt, demo)
    done = await _at_the_provider(admin, rt, paid, amount=5_000)
    assert await _mtn_says_sent(rt, done["id"]) == "completed"
    assert await _mtn_says_sent(rt, done["id"], ProviderOutcome.FAILED) == "flagged_failed_after_completion"
    contradicted = f"refund {done['reference']} reported failed after it was completed: reversal declined"
    failed = await _at_the_provider(admin, rt, paid, amount=20_000)
    await admin.json("POST", f"/v1/refunds/{failed['id']}/outcome", 200, json={"status": "FAILED", "note": "failed"})
    sent = await _at_the_provider(admin, rt, paid, amount=20_000)
    first = await _chargeback(admin, paid, 30_000, "MTN-REV-41")
    await admin.json("POST", f"/v1/refunds/{failed['id']}/outcome", 200, json={
        "status": "COMPLETED", "note": "on the statement after all", "providerTransactionId": "MTN-RF-41"})
    again = f"refund {failed['reference']} reported sent back after it had failed"
    payment = await admin.json("GET", f"/v1/payments/{paid['id']}", 200)
    opened = ("a chargeback of 30,000 RWF and a refund completed: 5,000 RWF more than collected has gone back, "
              "25,000 RWF if the refund at the provider completes: recover it from the member")
    assert payment["mismatchDetail"] == fit_detail(f"{contradicted}; {again}; {opened}")
    assert payment["mismatchDetail"].endswith(f"; {opened}") and len(payment["mismatchDetail"]) == 300
    second = await _chargeback(admin, paid, 5_000, "MTN-REV-42")
    payment = await admin.json("GET", f"/v1/payments/{paid['id']}", 200)
    flag = (f"2 chargebacks of 35,000 RWF in all and refund {failed['reference']} completed: 10,000 RWF more than "
            f"collected has gone back, 30,000 RWF if refund {sent['reference']} completes: recover it from the member")
    assert payment["mismatchDetail"] == fit_detail(f"{contradicted}; {again}; {flag}")
    assert payment["mismatchDetail"].endswith(f"; {flag}") and payment["mismatchDetail"].count("collected") == 1
    latest = max(await _audit(rt, "refund.returned_beyond_collected"), key=lambda e: e.at)
    assert (latest.entity_id, latest.after["chargebacks"]) == (second["id"], [first["id"], second["id"]])
