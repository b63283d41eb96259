"""A disputed payment walked as the people who live it: the officer resolving it (what a resolution takes and
refuses) and the cooperative's system applying each step from its webhooks."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from core.db import utcnow
from core.models import AuditEvent, Dispute, OutboxJob, Refund
from tests.admin_api.conftest import complete_payment, idem, make_payment


async def _paid(admin: Any, rt: Any, demo: dict[str, Any]) -> dict[str, Any]:
    payment = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    await complete_payment(rt, payment["id"])
    return payment


async def _jobs(rt: Any, *kinds: str) -> list[OutboxJob]:
    async with rt.sessionmaker() as s:
        return list((await s.execute(select(OutboxJob).where(OutboxJob.kind.in_(kinds))
                                     .order_by(OutboxJob.created_at))).scalars())


async def test_to_paying_number_without_an_amount_is_refused_and_the_dispute_stays_open(
        admin: Any, rt: Any, demo: dict[str, Any]) -> None:
    """`toPayingNumber` says where a refund goes; sent without `refundAmount` it was dropped and the dispute
    RESOLVED with no refund: closed for good, the member texted "resolved in your favour", nothing sent back."""
    paid = await _paid(admin, rt, demo)
    dispute = await admin.json("POST", "/v1/disputes", 201, json={"paymentId": paid["id"], "reason": "OTHER"})
    told = len(await _jobs(rt, "sms.send", "webhook.event"))
    refused = await admin.json("POST", f"/v1/disputes/{dispute['id']}/transitions", 400, json={
        "status": "RESOLVED", "note": "paid twice: refund her old number", "toPayingNumber": True})
    assert (refused["code"], refused["field"], refused["message"]) == (
        "VALIDATION_FAILED", "toPayingNumber",
        ["toPayingNumber needs refundAmount: how much to send back to the number that paid"])
    shown = await admin.json("GET", f"/v1/disputes/{dispute['id']}", 200)
    assert (shown["status"], shown["resolvedAt"], shown["refundId"]) == ("OPEN", None, None)
    assert len(await _jobs(rt, "sms.send", "webhook.event")) == told  # nobody told anything
    async with rt.sessionmaker() as s:
        assert (await s.execute(select(AuditEvent.id).where(AuditEvent.action == "dispute.resolved"))).all() == []
    # The same with the amount: resolved with its refund, as asked.
    resolved = await admin.json("POST", f"/v1/disputes/{dispute['id']}/transitions", 200, json={
        "status": "RESOLVED", "refundAmount": 50000, "toPayingNumber": True})
    assert resolved["status"] == "RESOLVED" and resolved["refundId"] is not None


async def test_refund_events_name_their_dispute_and_the_providers_line(admin: Any, rt: Any,
                                                                      demo: dict[str, Any]) -> None:
    """A refund made while the payment is disputed and a chargeback recorded then are noted on the dispute, but no
    dispute event names them: the cooperative's system, told refund.completed, could not tell which dispute the
    money went back for, nor that the provider made it itself (nothing sent by the gateway), nor the statement's
    line to match it with."""
    paid = await _paid(admin, rt, demo)
    dispute = await admin.json("POST", "/v1/disputes", 201, json={"paymentId": paid["id"],
                                                                 "reason": "WRONG_AMOUNT"})
    chargeback = await admin.json("POST", f"/v1/payments/{paid['id']}/refunds", 201, json={
        "amount": 20000, "idempotencyKey": idem(), "returnedByProvider": {"providerTransactionId": "MTN-REV-9"}})
    assert (chargeback["status"], chargeback["disputeId"]) == ("COMPLETED", dispute["id"])
    events = {j.dedupe_key: j.payload for j in await _jobs(rt, "webhook.event")}
    data = events[f"wh:evt_refund_completed_{chargeback['id']}"]["data"]
    assert (data["disputeId"], data["returnedByProvider"], data["providerTransactionId"]) == (
        dispute["id"], True, "MTN-REV-9")
    # Its note on the dispute says the same to the officer.
    async with rt.sessionmaker() as s:
        notes = (await s.get(Dispute, dispute["id"])).notes
        stored = await s.get(Refund, chargeback["id"])
    assert "recorded as sent back by the provider" in notes[-1]["text"]
    assert stored.dispute_id == dispute["id"]


async def test_a_failed_payments_statement_money_is_refused_saying_what_to_do(admin: Any, rt: Any,
                                                                           demo: dict[str, Any]) -> None:
    """"MoMo took my 50,000 but you say FAILED", and no late success came: the desk's outcome is refused (a FAILED
    payment is never reopened), and the refusal used to end there. It says what to do, and that works."""
    from core.audit import Actor
    from core.models import Payment
    from core.ports import ProviderOutcome
    from core.provider_events import apply_collection_outcome
    from tests.admin_api.test_chargeback_visibility import _z

    asked = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    async with rt.sessionmaker.begin() as s:
        await apply_collection_outcome(s, rt, await s.get(Payment, asked["id"]), ProviderOutcome.FAILED,
                                       actor=Actor("provider:mtn_momo", "provider"), reason="insufficient balance")
    refused = await admin.json("POST", f"/v1/payments/{asked['id']}/outcome", 409, json={
        "status": "COMPLETED", "providerTransactionId": "MTN-STMT-77", "note": "member's MoMo SMS, statement line 4"})
    assert refused["message"] == (
        "payment is FAILED: the provider said it failed; a final payment is not reopened: have the provider send "
        "the money back, or record its statement line as a payment (POST /v1/payments/recorded)")
    assert (await admin.json("GET", f"/v1/payments/{asked['id']}", 200))["status"] == "FAILED"
    recorded = await admin.json("POST", "/v1/payments/recorded", 201, json={
        "paymentTypeId": demo["payment_types"]["Monthly Rent"], "amount": 50000, "paymentMethod": "MOBILE_MONEY_MTN",
        "memberId": asked["memberId"], "providerTransactionId": "MTN-STMT-77", "completedAt": _z(utcnow()),
        "note": "member's MoMo SMS, statement line 4", "idempotencyKey": idem()})
    assert (recorded["status"], recorded["collectedAmount"]) == ("COMPLETED", 50000)


async def test_a_note_never_sets_the_disputes_clock_back_so_its_next_event_is_applied(
        admin: Any, rt: Any, demo: dict[str, Any]) -> None:
    """The cooperative's system applies a dispute event only if its updatedAt is later than the last one it applied.
    A move written by a host whose clock is ahead (here: a minute, which a slow machine's run does not catch up
    with), then a note (evidence, or a refund's failure noted by the worker) by one whose clock is right: the note
    set updated_at back to its own now, and the resolution after it read older than the move before: dropped by the
    receiver, the dispute left UNDER_REVIEW there."""
    from datetime import timedelta

    from sqlalchemy import update

    paid = await _paid(admin, rt, demo)
    dispute = await admin.json("POST", "/v1/disputes", 201, json={"paymentId": paid["id"], "reason": "OTHER"})
    url = f"/v1/disputes/{dispute['id']}/transitions"
    await admin.json("POST", url, 200, json={"status": "UNDER_REVIEW"})
    ahead = utcnow().replace(microsecond=0) + timedelta(minutes=1)
    async with rt.sessionmaker.begin() as s:  # as the host ahead wrote it (and its event told it)
        await s.execute(update(Dispute).where(Dispute.id == dispute["id"]).values(updated_at=ahead))
    await admin.json("POST", url, 200, json={"status": "UNDER_REVIEW", "evidence": "MTN statement line 9"})
    async with rt.sessionmaker() as s:
        assert (await s.get(Dispute, dispute["id"])).updated_at > ahead
    await admin.json("POST", url, 200, json={"status": "REJECTED", "note": "not taken twice"})
    events = {j.dedupe_key: j.payload["data"] for j in await _jobs(rt, "webhook.event")}
    rejected = events[f"wh:evt_dispute_updated_{dispute['id']}_rejected"]
    assert rejected["updatedAt"] > ahead.strftime("%Y-%m-%dT%H:%M:%S.000Z")


async def test_each_note_tells_the_cooperatives_system_once_without_texting_the_member(
        admin: Any, rt: Any, demo: dict[str, Any]) -> None:
    """A cooperative's system mirrors its disputes' case files: a note or evidence added without a move sent no
    event, and its copy stayed stale until the next move. Each note (with or without evidence) is dispute.updated,
    once, queued with it: the status unchanged, updatedAt the note's (later than the move before, earlier than the
    next); the member is not texted. A note refused (nothing in it, or the dispute closed) tells nothing."""
    paid = await _paid(admin, rt, demo)
    dispute = await admin.json("POST", "/v1/disputes", 201, json={"paymentId": paid["id"], "reason": "OTHER"})
    url = f"/v1/disputes/{dispute['id']}/transitions"
    texts = len(await _jobs(rt, "sms.send"))

    async def told() -> list[tuple[str, str, str, str]]:
        return [(j.dedupe_key, j.payload["event_type"], j.payload["data"]["status"], j.payload["data"]["updatedAt"])
                for j in await _jobs(rt, "webhook.event") if j.payload["data"]["id"] == dispute["id"]]

    noted = await admin.json("POST", url, 200, json={"status": "OPEN", "note": "called the member back"})
    reviewed = await admin.json("POST", url, 200, json={"status": "UNDER_REVIEW"})
    evidence = await admin.json("POST", url, 200, json={"status": "UNDER_REVIEW", "evidence": "MTN statement line 9"})
    both = await admin.json("POST", url, 200, json={"status": "UNDER_REVIEW", "note": "MTN asked",
                                                    "evidence": "ticket 4411"})
    await admin.json("POST", url, 422, json={"status": "UNDER_REVIEW"})  # nothing to add
    rejected = await admin.json("POST", url, 200, json={"status": "REJECTED", "note": "taken once"})
    await admin.json("POST", url, 409, json={"status": "REJECTED", "note": "and again"})  # closed
    key = f"wh:evt_dispute_updated_{dispute['id']}"
    events = sorted(await told(), key=lambda e: e[3])  # (the API's updatedAt is to the second, the event's to the ms)
    assert [(e[0], e[1], e[2], e[3][:19]) for e in events[1:]] == [
        (f"{key}_note_1", "dispute.updated", "OPEN", noted["updatedAt"][:19]),
        (f"{key}_under_review", "dispute.updated", "UNDER_REVIEW", reviewed["updatedAt"][:19]),
        (f"{key}_note_2", "dispute.updated", "UNDER_REVIEW", evidence["updatedAt"][:19]),
        (f"{key}_note_3", "dispute.updated", "UNDER_REVIEW", both["updatedAt"][:19]),
        (f"{key}_rejected", "dispute.updated", "REJECTED", rejected["updatedAt"][:19])], events
    assert len({e[3] for e in events}) == len(events)  # each later than the one before
    assert len(rejected["notes"]) == 4
    # The member was texted the moves, not the notes.
    assert [j.dedupe_key for j in await _jobs(rt, "sms.send")][texts:] == [
        f"sms:dispute_updated:{dispute['id']}:under_review", f"sms:dispute_resolved:{dispute['id']}:rejected"]


async def test_the_members_refund_sms_comes_after_the_resolution_it_was_made_for(
        admin: Any, rt: Any, demo: dict[str, Any]) -> None:
    """Opened, then resolved with a refund a moment later: the resolution's SMS waits for the opening's (spaced, so
    the worker's parallel sends keep the order). The refund failed within seconds, and its SMS, due at once, reached
    her first: "refund failed ... your cooperative will contact you", then "resolved in your favour. Thank you."."""
    from core.audit import Actor
    from core.ports import ProviderOutcome
    from core.refunds import apply_refund_outcome

    paid = await _paid(admin, rt, demo)
    dispute = await admin.json("POST", "/v1/disputes", 201, json={"paymentId": paid["id"], "reason": "WRONG_AMOUNT"})
    resolved = await admin.json("POST", f"/v1/disputes/{dispute['id']}/transitions", 200, json={
        "status": "RESOLVED", "refundAmount": 10000, "note": "overcharged"})
    async with rt.sessionmaker.begin() as s:
        refund = await s.get(Refund, resolved["refundId"])
        await apply_refund_outcome(s, rt, refund, ProviderOutcome.FAILED, actor=Actor("provider:mtn_momo", "provider"),
                                   reason="MTN could not perform the transaction")
    due = {j.payload["template"]: j.run_at for j in await _jobs(rt, "sms.send")}
    assert due["dispute_opened"] < due["dispute_resolved"] < due["refund_failed"]
