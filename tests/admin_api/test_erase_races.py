"""An erasure (POST /v1/members/{id}/erase) racing the desk's work on the member's payments, on PostgreSQL: the
erasure locks the member, then her payments; what locks one of her payments and then writes a row naming her
must not take them in the other order, or PostgreSQL ends the deadlock by rolling one back (503 to the admin)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncSession

from core.audit import Actor
from core.disputes import move_dispute, open_dispute
from core.errors import Conflict
from core.members import erase_member
from core.models import Dispute, Member, OutboxJob, Payment, Refund
from tests.admin_api.conftest import Caller, idem
from tests.channels.sms.helpers import make_payment
from tests.conftest import requires_pg, waiting_for_locks

NAME, PHONE = "Jeanne Mukeshimana", "+250788777111"
ADMIN = Actor("admin:test", "admin")


@asynccontextmanager
async def _patient(rt: Any) -> AsyncIterator[AsyncSession]:
    """A transaction of its own that waits at most 10 s for a lock (a deadlock is reported, not hung)."""
    async with rt.sessionmaker.begin() as s:
        await s.execute(text("SET LOCAL lock_timeout = '10s'"))
        yield s


async def _erased(rt: Any, member_id: str) -> Member:
    """Her erasure in a transaction of its own (_patient)."""
    async with _patient(rt) as s:
        return await erase_member(s, await s.get(Member, member_id), actor=ADMIN)


def _held(model: Any, row_id: str) -> Any:
    """The row's lock (FOR UPDATE) a blocker holds while _lined_up lines its steps up for it."""
    return select(model.id).where(model.id == row_id).with_for_update()


async def _lined_up(rt: Any, held: Any, *steps: Coroutine[Any, Any, Any]) -> list[Any]:
    """`steps` run in this order: a blocker holds `held` (_held) while each in turn comes to wait for it (the one
    before it waiting already), then lets them go. What each returned or raised (a deadlock, a 409), in order."""
    blocker, tasks = rt.sessionmaker(), []
    try:
        await blocker.begin()
        await blocker.execute(held)
        for step in steps:
            tasks.append(asyncio.create_task(step))
            await waiting_for_locks(rt, len(tasks))
        await blocker.commit()
        return list(await asyncio.gather(*tasks, return_exceptions=True))
    finally:
        await blocker.close()
        for step in steps[len(tasks):]:
            step.close()  # never started (the blocker failed)


@asynccontextmanager
async def _officer_at_a_dispute_opened_as_she_is_erased(rt: Any, paid: Payment, member_id: str, reference: str
                                                        ) -> AsyncIterator[tuple[AsyncSession, asyncio.Task[Any], str]]:
    """A dispute of her payment committed while her erasure waited for the payment (held FOR NO KEY UPDATE, as the
    dispute's opening holds it: the erasure's dispute lock taken before), then an officer's transaction holding
    that dispute (core.disputes.move_dispute) as the payment is let go. Yields the officer's session (begun), the
    erasure's task and the dispute's id once the erasure waits at the dispute (or has gone on without it: the
    test's assertions tell)."""
    blocker, officer = rt.sessionmaker(), rt.sessionmaker()
    try:
        await blocker.begin()  # the payment, as the dispute's opening holds it (FOR NO KEY UPDATE)
        await blocker.execute(select(Payment.id).where(Payment.id == paid.id).with_for_update(key_share=True))
        erasure = asyncio.create_task(_erased(rt, member_id))
        await waiting_for_locks(rt, 1)
        async with rt.sessionmaker.begin() as s:  # the dispute that opening wrote, committed as the erasure waits
            dispute = Dispute(cooperative_id=paid.cooperative_id, payment_id=paid.id, reference=reference,
                              reason="OTHER", status="OPEN", channel="api",
                              notes=[{"at": "2026-12-07T07:00:00Z", "actor": ADMIN.id, "text": f"for {NAME}"}])
            s.add(dispute)
        await officer.begin()  # an officer resolving it: its row locked (core.disputes.move_dispute)
        await officer.execute(text("SET LOCAL lock_timeout = '10s'"))
        await officer.execute(select(Dispute.id).where(Dispute.id == dispute.id).with_for_update())
        await blocker.commit()
        await waiting_for_locks(rt, 1, done=erasure)  # the erasure, at the dispute (or gone on without it)
        yield officer, erasure, dispute.id
    finally:
        await blocker.close()
        await officer.close()


async def _refund_word(rt: Any, **event: Any) -> str:
    """Her refund's provider callback (core.refunds.handle_refund_event), from MTN MoMo."""
    from core.ports import EventKind
    from core.ports import ProviderEvent as ProviderEventData
    from core.refunds import handle_refund_event

    return await handle_refund_event(rt, ProviderEventData(provider="mtn_momo", kind=EventKind.REFUND, **event))


async def _settled_refund(rt: Any, admin: Caller, paid: Payment, amount: int, refund: str, payment: str | None = None,
                          *, reason: str = "paid twice") -> dict[str, Any]:
    """A refund of `paid` asked for (POST /v1/payments/{id}/refunds) and settled as its provider's word would
    settle it: `refund`, the refund's columns (an SQL SET list), `payment` the payment's if it moved; its job done."""
    made = await admin.json("POST", f"/v1/payments/{paid.id}/refunds", 201,
                            json={"amount": amount, "reason": reason, "idempotencyKey": idem()})
    async with rt.sessionmaker.begin() as s:
        await s.execute(text(f"UPDATE refunds SET {refund} WHERE id = :id"), {"id": made["id"]})
        if payment is not None:
            await s.execute(text(f"UPDATE payments SET {payment} WHERE id = :id"), {"id": paid.id})
        await s.execute(text("UPDATE outbox_jobs SET status = 'DONE' WHERE dedupe_key = :k"),
                        {"k": f"refund:{made['id']}"})
    return made


async def _paid_back_in_full(rt: Any, admin: Caller, paid: Payment) -> None:
    """A refund of all of `paid` (50,000) the provider sent back: the refund COMPLETED, the payment REFUNDED."""
    await _settled_refund(rt, admin, paid, 50000, "status = 'COMPLETED', completed_at = now()",
                          "status = 'REFUNDED', refunded_minor = 50000")

@requires_pg
async def test_a_dispute_opened_on_her_payment_while_she_is_erased_never_deadlocks(
        rt: Any, admin: Caller, demo: Any) -> None:
    jeanne = await admin.json("POST", "/v1/members", 201, json={"name": NAME, "phone": PHONE})
    paid = await make_payment(rt, demo["cooperative_id"], account=PHONE, member_id=jeanne["id"])
    await admin.json("DELETE", f"/v1/members/{jeanne['id']}", 200)  # suspended: she may be erased

    async def opened() -> Dispute:
        async with _patient(rt) as s:
            payment = await s.get(Payment, paid.id)
            return await open_dispute(s, payment=payment, reason="OTHER", channel="api", actor=ADMIN,
                                      cipher=rt.cipher, answer_days=90)

    # Both line up for her payment: the dispute's opening first.
    results = await _lined_up(rt, _held(Payment, paid.id), opened(), _erased(rt, jeanne["id"]))
    assert not any(isinstance(r, BaseException) for r in results), results
    async with rt.sessionmaker() as s:
        member = await s.get(Member, jeanne["id"])
        assert (member.name, member.phone_enc) == ("Erased member", None)
        [stored] = (await s.execute(select(Dispute).where(Dispute.payment_id == paid.id))).scalars().all()
        assert stored.status == "OPEN"


@requires_pg
async def test_a_refunds_late_word_while_she_is_erased_never_deadlocks_the_erasure(
        rt: Any, admin: Caller, demo: Any) -> None:
    """A refund of hers, settled, that its provider (or an admin from the statement) speaks of again: the provider
    says a COMPLETED one failed (core.refunds._failed_after_completion), a FAILED one went through after all. Its
    callback locks the refund, then the payment (handle_refund_event, record_refund_outcome); the erasure locked
    the payment, then its refunds (to clear their notes), and one of the two was rolled back in a deadlock."""
    jeanne = await admin.json("POST", "/v1/members", 201, json={"name": NAME, "phone": PHONE})
    paid = await make_payment(rt, demo["cooperative_id"], account=PHONE, member_id=jeanne["id"])
    refund = await _settled_refund(rt, admin, paid, 10000, "status = 'COMPLETED'")  # the provider sent it back
    await admin.json("DELETE", f"/v1/members/{jeanne['id']}", 200)

    # The refund's callback, as it takes its locks: the refund (FOR UPDATE OF refunds), then its payment.
    async with rt.engine.connect() as callback:
        await callback.begin()
        await callback.execute(text("SET LOCAL lock_timeout = '10s'"))
        await callback.execute(select(Refund.id).where(Refund.id == refund["id"]).with_for_update())
        erasure = asyncio.create_task(_erased(rt, jeanne["id"]))
        await waiting_for_locks(rt, 1)
        await callback.execute(select(Payment.id).where(Payment.id == paid.id).with_for_update())
        await callback.rollback()
    member = await erasure
    assert (member.name, member.phone_enc) == ("Erased member", None)
    async with rt.sessionmaker() as s:
        assert (await s.get(Refund, refund["id"])).reason is None  # its note went with her


@requires_pg
@pytest.mark.parametrize("word", ["recorded", "callback"])
async def test_a_failed_refunds_late_success_while_she_is_erased_never_deadlocks_the_erasure(
        rt: Any, admin: Caller, demo: Any, word: str) -> None:
    """A FAILED refund of hers that went through after all (an admin recording it from the statement, or its
    provider's callback) as the desk erases her: the late success locked the refund, then wrote her payment twice
    (its flag, then its refunded amount), and PostgreSQL checks the payment's key to her row again on the second
    UPDATE (a row version this transaction wrote): a KEY SHARE lock on her row, which the erasure held (FOR UPDATE)
    while it waited for the refund. PostgreSQL ended the deadlock by rolling the erasure back. Her row is locked
    first (core.refunds._her_row_first), as the erasure takes it: the erasure waits, then erases the refund too."""
    from core.ports import ProviderOutcome
    from core.refunds import record_refund_outcome

    jeanne = await admin.json("POST", "/v1/members", 201, json={"name": NAME, "phone": PHONE})
    paid = await make_payment(rt, demo["cooperative_id"], account=PHONE, member_id=jeanne["id"])
    # The provider refused it (it said).
    refund = await _settled_refund(rt, admin, paid, 10000, "status = 'FAILED', provider_reference = 'RF-LATE-1', "
                                   "failure_reason = 'declined'", reason=f"paid twice, {NAME}")
    await admin.json("DELETE", f"/v1/members/{jeanne['id']}", 200)

    async def late_success() -> Any:
        if word == "callback":
            return await _refund_word(rt, event_id="late-1", reference="RF-LATE-1",
                                      outcome=ProviderOutcome.SUCCEEDED, provider_transaction_id="MTN-RF-9")
        async with _patient(rt) as s:
            return await record_refund_outcome(s, rt, refund_id=refund["id"], cooperative_id=None, succeeded=True,
                                               note="on the statement", actor=ADMIN, provider_transaction_id="MTN-RF-9")

    # Both line up for her payment: the late success (holding the refund) first.
    results = await _lined_up(rt, _held(Payment, paid.id), late_success(), _erased(rt, jeanne["id"]))
    assert not any(isinstance(r, BaseException) for r in results), results
    async with rt.sessionmaker() as s:
        member = await s.get(Member, jeanne["id"])
        stored = await s.get(Refund, refund["id"])
        payment = await s.get(Payment, paid.id)
    assert (member.name, member.phone_enc) == ("Erased member", None)
    assert (stored.status, stored.reason, payment.refunded_minor, payment.mismatch) == ("COMPLETED", None, 10000, True)


@requires_pg
async def test_a_refund_polled_complete_for_another_amount_while_she_is_erased_never_deadlocks_the_erasure(
        rt: Any, demo: Any, worker: Any) -> None:
    """The same for a refund of hers the provider's status answer completes for another amount (core.jobs): the
    worker locked the refund, then flagged her payment and moved it (two UPDATEs), and the erasure was rolled back."""
    from core.payments import create_payment
    from core.refunds import request_refund
    from tests.conftest import drain
    from tests.providers.wires import completed, due_now, mtn_adapter, mtn_payment, mtn_wire

    wire = mtn_wire().on("POST", "/disbursement/v1_0/refund", 202)
    mtn_adapter(rt, wire)
    async with rt.sessionmaker.begin() as s:
        payment, _ = await create_payment(s, rt, mtn_payment(demo), actor=ADMIN)
    await completed(rt, payment)
    async with rt.sessionmaker.begin() as s:
        refund, _ = await request_refund(s, rt, payment_id=payment.id, cooperative_id=None, amount=None,
                                         reason="paid twice", idempotency_key="refund-key-1", actor=ADMIN)
    await drain(worker)  # sent: PROCESSING
    wire.on("GET", f"/disbursement/v1_0/refund/{refund.provider_reference}", 200, {
        "amount": "60000", "currency": "RWF", "financialTransactionId": "RF-3", "externalId": refund.provider_reference,
        "status": "SUCCESSFUL"})
    async with rt.sessionmaker.begin() as s:
        await s.execute(text("UPDATE members SET status = 'SUSPENDED' WHERE id = :id"), {"id": payment.member_id})
    await due_now(rt, "refund.poll")

    # Both line up for her payment: the poll (holding the refund) first.
    results = await _lined_up(rt, _held(Payment, payment.id), drain(worker), _erased(rt, payment.member_id))
    assert not any(isinstance(r, BaseException) for r in results), results
    async with rt.sessionmaker() as s:
        stored, paid = await s.get(Refund, refund.id), await s.get(Payment, payment.id)
    assert (stored.status, paid.status, paid.mismatch, paid.payment_account_masked) == (
        "COMPLETED", "REFUNDED", True, "erased")


@requires_pg
async def test_a_chargeback_beyond_her_refund_recorded_while_she_is_erased_never_deadlocks_the_erasure(
        rt: Any, admin: Caller, demo: Any) -> None:
    """The provider's reversal of a payment of hers already refunded (returnedByProvider), recorded as the desk erases
    her: it is a success too, and writes her payment twice (its flag beyond collected, then its refunded amount)
    after locking it, which took her row (KEY SHARE) behind the erasure, which waited for the payment: deadlock, one
    rolled back. Her row is locked first there too (core.refunds._her_row_first)."""
    from core.money import Money
    from core.refunds import ReturnedByProvider, request_refund

    jeanne = await admin.json("POST", "/v1/members", 201, json={"name": NAME, "phone": PHONE})
    paid = await make_payment(rt, demo["cooperative_id"], account=PHONE, member_id=jeanne["id"])
    await _paid_back_in_full(rt, admin, paid)
    await admin.json("DELETE", f"/v1/members/{jeanne['id']}", 200)

    async def chargeback() -> Any:
        async with _patient(rt) as s:
            return await request_refund(s, rt, payment_id=paid.id, cooperative_id=None, amount=Money(50000, "RWF"),
                                        reason=None, idempotency_key=idem(), actor=ADMIN,
                                        returned=ReturnedByProvider("MTN-REV-1"))

    # Both line up for her payment: the chargeback first.
    results = await _lined_up(rt, _held(Payment, paid.id), chargeback(), _erased(rt, jeanne["id"]))
    assert not any(isinstance(r, BaseException) for r in results), results
    async with rt.sessionmaker() as s:
        member = await s.get(Member, jeanne["id"])
        payment = await s.get(Payment, paid.id)
    assert (member.name, member.phone_enc) == ("Erased member", None)
    assert (payment.refunded_minor, payment.mismatch, payment.payment_account_masked) == (100000, True, "erased")


async def test_a_receipt_built_as_she_is_erased_is_neither_stored_with_her_number_nor_sent(
        rt: Any, admin: Caller, demo: Any, aiohttp_server: Any, monkeypatch: Any) -> None:
    """Her payment's late success came in (its receipt queued) as the desk erased her: the worker read her number
    and the receipt's text before the erasure committed, and stored the message after it, past the erasure's
    clearing of her texts. Her number and the text stayed on an SMS row of hers, and the receipt went out."""
    from channels.sms.jobs import SmsJobs
    from core.models import SmsMessage
    from core.notify import send_sms
    from core.outbox import OutboxWorker, RetryLater
    from tests.channels.sms.helpers import start_simulator

    _, sim = await start_simulator(aiohttp_server, rt)
    jeanne = await admin.json("POST", "/v1/members", 201, json={"name": NAME, "phone": PHONE})
    paid = await make_payment(rt, demo["cooperative_id"], account=PHONE, member_id=jeanne["id"])
    await admin.json("DELETE", f"/v1/members/{jeanne['id']}", 200)
    async with rt.sessionmaker.begin() as s:
        await send_sms(s, template="payment_receipt", cooperative_id=demo["cooperative_id"], cipher=rt.cipher,
                       context={"payment_id": paid.id}, member_id=jeanne["id"], dedupe=f"late-receipt:{paid.id}")
    [job] = await OutboxWorker(rt.sessionmaker, {}, lease_seconds=30).claim()
    jobs = SmsJobs(rt)
    built = jobs._build

    async def erased_meanwhile(*args: Any, **kwargs: Any) -> Any:
        message = await built(*args, **kwargs)  # her number and the text, read before the erasure
        await admin.json("POST", f"/v1/members/{jeanne['id']}/erase", 200)
        return message

    monkeypatch.setattr(jobs, "_build", erased_meanwhile)
    with pytest.raises(RetryLater, match="or her number changed"):
        await jobs.send(job)  # not stored (held to her number): built again at its next attempt
    monkeypatch.setattr(jobs, "_build", built)
    await jobs.send(job)  # her number is gone: not sent
    assert sim.requests == []
    async with rt.sessionmaker() as s:
        rows = (await s.execute(select(SmsMessage).where(SmsMessage.member_id == jeanne["id"]))).scalars().all()
    assert all((row.phone_enc, row.body) == ("", "") for row in rows), [(r.status, r.body) for r in rows]


@requires_pg
async def test_a_receipt_stored_while_her_erasure_is_under_way_waits_for_it(
        rt: Any, admin: Caller, demo: Any, aiohttp_server: Any, monkeypatch: Any) -> None:
    """The same, the message stored while the erasure is still under way (past the clearing of her texts, not yet
    committed): the store waits for it, then finds her number gone."""
    from channels.sms.jobs import SmsJobs
    from core.models import SmsMessage
    from core.notify import send_sms
    from core.outbox import OutboxWorker, RetryLater
    from tests.channels.sms.helpers import start_simulator

    _, sim = await start_simulator(aiohttp_server, rt)
    jeanne = await admin.json("POST", "/v1/members", 201, json={"name": NAME, "phone": PHONE})
    paid = await make_payment(rt, demo["cooperative_id"], account=PHONE, member_id=jeanne["id"])
    await admin.json("DELETE", f"/v1/members/{jeanne['id']}", 200)
    async with rt.sessionmaker.begin() as s:
        await send_sms(s, template="payment_receipt", cooperative_id=demo["cooperative_id"], cipher=rt.cipher,
                       context={"payment_id": paid.id}, member_id=jeanne["id"], dedupe=f"late-receipt:{paid.id}")
    [job] = await OutboxWorker(rt.sessionmaker, {}, lease_seconds=30).claim()
    jobs = SmsJobs(rt)
    built, erasing = jobs._build, asyncio.Event()

    async def erased_meanwhile(*args: Any, **kwargs: Any) -> Any:
        message = await built(*args, **kwargs)
        await erasing.wait()
        return message

    monkeypatch.setattr(jobs, "_build", erased_meanwhile)
    send = asyncio.create_task(jobs.send(job))
    async with rt.sessionmaker.begin() as s:
        await erase_member(s, await s.get(Member, jeanne["id"]), actor=ADMIN)  # her texts cleared, not committed
        erasing.set()
        await waiting_for_locks(rt, 1)  # the store waits for her row
    with pytest.raises(RetryLater):
        await send
    monkeypatch.setattr(jobs, "_build", built)
    await jobs.send(job)
    assert sim.requests == []
    async with rt.sessionmaker() as s:
        rows = (await s.execute(select(SmsMessage).where(SmsMessage.member_id == jeanne["id"]))).scalars().all()
    assert all((row.phone_enc, row.body) == ("", "") for row in rows)


@requires_pg
@pytest.mark.parametrize("first", ["erasure", "completion"])
async def test_a_late_completion_racing_her_erasure_tells_of_her_payment_scrubbed(
        rt: Any, admin: Caller, demo: Any, first: str) -> None:
    """Money found taken on a payment of hers the cooperative had cancelled (an admin's recording; a provider's late
    success takes the same way, core.provider_events._apply_outcome), completing it late while the desk erases her:
    its payment.completed event is built from the payment read under its row lock. Read after the erasure's lock
    (_refuse_open_money), it waits and reads the erased row; read before, its event is committed before the erasure
    goes on, which scrubs it with the others. Either way no event of hers keeps her account's mask or the desk's
    note naming her."""
    from core.models import OutboxJob
    from core.money import Money
    from core.recorded_payments import record_collected

    jeanne = await admin.json("POST", "/v1/members", 201, json={"name": NAME, "phone": PHONE})
    cancelled = await make_payment(rt, demo["cooperative_id"], account=PHONE, member_id=jeanne["id"],
                                   status="CANCELLED", failure_reason=f"cancelled by the cooperative: {NAME}")
    await admin.json("DELETE", f"/v1/members/{jeanne['id']}", 200)

    async def complete() -> None:
        async with rt.sessionmaker.begin() as s:
            await record_collected(s, rt, payment_id=cancelled.id, cooperative_id=None, provider_transaction_id="MTN-9",
                                   note="on the statement", actor=ADMIN, amount=Money(50_000, "RWF"))

    async def erase() -> None:
        async with rt.sessionmaker.begin() as s:
            await erase_member(s, await s.get(Member, jeanne["id"]), actor=ADMIN)

    async with rt.sessionmaker.begin() as s:
        if first == "erasure":
            await erase_member(s, await s.get(Member, jeanne["id"]), actor=ADMIN)
            other = asyncio.create_task(complete())
        else:
            await record_collected(s, rt, payment_id=cancelled.id, cooperative_id=None, provider_transaction_id="MTN-9",
                                   note="on the statement", actor=ADMIN, amount=Money(50_000, "RWF"))
            other = asyncio.create_task(erase())
        await waiting_for_locks(rt, 1)  # the other waits for her payment's row
    await asyncio.wait_for(other, 10)

    async with rt.sessionmaker() as s:
        assert (await s.get(Payment, cancelled.id)).status == "COMPLETED"
        events = [job.payload for job in (await s.execute(select(OutboxJob).where(
            OutboxJob.kind == "webhook.event"))).scalars()]
    [completed] = [event for event in events if event["event_type"] == "payment.completed"]
    assert (completed["data"]["id"], completed["data"]["paymentAccount"]) == (cancelled.id, "erased")
    for personal in (NAME, cancelled.payment_account_masked):
        assert personal not in json.dumps(events, ensure_ascii=False), events


@requires_pg
async def test_a_resolution_relying_on_her_refunds_while_she_is_erased_never_deadlocks(
        rt: Any, admin: Caller, demo: Any) -> None:
    """Two refunds of her payment on their way (the older with the greater id) when the officer resolves her dispute
    without a refund of its own (core.disputes._rely_on_unsettled links them) while an admin erases her: the erasure
    locks her refunds in id order (core.members._refuse_open_money), the resolution's UPDATE locked them as it read
    them (the older first), and PostgreSQL ended the deadlock by rolling one of the two back. Taken in id order,
    the resolution waited. Now the erasure locks no refund still open: it is refused for them (409) without waiting,
    and the dispute is resolved on them."""
    jeanne = await admin.json("POST", "/v1/members", 201, json={"name": NAME, "phone": PHONE})
    older, newer = ({"id": "0"}, {"id": "1"})
    while older["id"] < newer["id"]:  # (random ids: tried again, on another payment, until the older has the greater)
        paid = await make_payment(rt, demo["cooperative_id"], account=PHONE, member_id=jeanne["id"])
        older = await admin.json("POST", f"/v1/payments/{paid.id}/refunds", 201,
                                 json={"amount": 1000, "idempotencyKey": idem()})
        newer = await admin.json("POST", f"/v1/payments/{paid.id}/refunds", 201,
                                 json={"amount": 1000, "idempotencyKey": idem()})
    dispute = await admin.json("POST", "/v1/disputes", 201, json={"paymentId": paid.id, "reason": "OTHER"})
    await admin.json("DELETE", f"/v1/members/{jeanne['id']}", 200)

    async def resolved() -> Dispute:
        async with _patient(rt) as s:
            return await move_dispute(s, rt, dispute_id=dispute["id"], cooperative_id=None, target="RESOLVED",
                                      actor=ADMIN, note="refunded already, on its way")

    # The refund of the lower id held (as the resolution's UPDATE held it): the erasure no longer locks a refund still
    # open (core.members._refuse_open_money: it is refused for it), so it does not wait for it; the resolution does.
    blocker = rt.sessionmaker()
    try:
        await blocker.begin()
        await blocker.execute(_held(Refund, newer["id"]))
        refused = await asyncio.wait_for(asyncio.gather(_erased(rt, jeanne["id"]), return_exceptions=True), 10)
        resolving = asyncio.create_task(resolved())
        await waiting_for_locks(rt, 1)
        await blocker.commit()
        [refused], done = refused, await resolving
    finally:
        await blocker.close()
    assert isinstance(refused, Conflict) and "refund(s) still open" in str(refused), refused
    assert isinstance(done, Dispute) and done.status == "RESOLVED", done
    async with rt.sessionmaker() as s:
        linked = (await s.execute(select(Refund.id).where(Refund.dispute_id == dispute["id"]))).scalars().all()
    assert sorted(linked) == sorted([older["id"], newer["id"]])


@requires_pg
async def test_a_resolution_with_a_chargeback_while_she_is_erased_never_deadlocks(
        rt: Any, admin: Caller, demo: Any) -> None:
    """The erasure writes her payment's disputes too (their notes and resolution: core.members._erase_disputes),
    and a resolution locks its dispute, then the payment (its refund: core.refunds.request_refund): the erasure
    locks her disputes before her payments, or, taken after them, the two deadlocked. The resolution waits for the
    erasure; its chargeback is then recorded (a refund of an erased member's payment can only be that), and what the
    officer wrote before it is erased."""
    from core.money import Money
    from core.refunds import ReturnedByProvider

    jeanne = await admin.json("POST", "/v1/members", 201, json={"name": NAME, "phone": PHONE})
    paid = await make_payment(rt, demo["cooperative_id"], account=PHONE, member_id=jeanne["id"])
    dispute = await admin.json("POST", "/v1/disputes", 201, json={"paymentId": paid.id, "reason": "OTHER",
                                                                   "note": f"called {NAME}"})
    await admin.json("DELETE", f"/v1/members/{jeanne['id']}", 200)

    async def resolved() -> Dispute:
        async with _patient(rt) as s:
            return await move_dispute(s, rt, dispute_id=dispute["id"], cooperative_id=None, target="RESOLVED",
                                      actor=ADMIN, refund_amount=Money(paid.amount_minor, paid.currency),
                                      returned=ReturnedByProvider("MTN-CB-1"))

    # Both line up for her payment: the erasure first.
    results = await _lined_up(rt, _held(Payment, paid.id), _erased(rt, jeanne["id"]), resolved())
    assert not any(isinstance(r, BaseException) for r in results), results
    async with rt.sessionmaker() as s:
        row = await s.get(Dispute, dispute["id"])
        refund = await s.get(Refund, row.refund_id)
    assert (row.status, row.notes[0]["text"], refund.status) == ("RESOLVED", "[note erased]", "COMPLETED")


@requires_pg
async def test_a_dispute_opened_as_she_is_erased_and_resolved_at_once_is_neither_lost_nor_left(
        rt: Any, admin: Caller, demo: Any) -> None:
    """A payment from her number with no member attached is hers (core.members._Hers), and a dispute of it is
    opened without her row's lock (core.disputes._lock_payment): one committed while the erasure waited for the
    payment (its dispute lock taken before) was read by _erase_disputes unlocked. An officer resolving it then had
    the note written over with the notes as read (lost from the case file) and the resolution with none, while its
    dispute.updated event, written after _erase_events, kept her name. The erasure waits for it, and erases it all."""
    jeanne = await admin.json("POST", "/v1/members", 201, json={"name": NAME, "phone": PHONE})
    paid = await make_payment(rt, demo["cooperative_id"], account=PHONE, created_at=datetime.now(UTC))
    await admin.json("DELETE", f"/v1/members/{jeanne['id']}", 200)

    async with _officer_at_a_dispute_opened_as_she_is_erased(rt, paid, jeanne["id"], "DSP-RACE-1") as (
            officer, erasure, dispute_id):
        await move_dispute(officer, rt, dispute_id=dispute_id, cooperative_id=None, target="RESOLVED", actor=ADMIN,
                           note=f"paid back to {NAME}")
        await officer.commit()
        await erasure
    async with rt.sessionmaker() as s:
        stored = await s.get(Dispute, dispute_id)
        events = (await s.execute(select(OutboxJob.payload).where(OutboxJob.kind == "webhook.event"))).scalars().all()
    assert ([note["text"] for note in stored.notes], stored.resolution) == (
        ["[note erased]", "[note erased]"], "[note erased]"), (stored.notes, stored.resolution)
    told = [event["data"]["resolution"] for event in events if event["data"].get("id") == dispute_id]
    assert told and set(told) <= {None, "[note erased]"}, told


@requires_pg
@pytest.mark.parametrize(("chargeback", "first", "keyed"), [
    ("beyond", "resolution", False), ("beyond", "resolution", True), ("withdrawing", "resolution", False),
    ("plain", "resolution", False), ("beyond", "erasure", False), ("plain", "erasure", True)])
async def test_a_resolution_recording_a_chargeback_as_she_is_erased_never_deadlocks_whichever_goes_first(
        rt: Any, admin: Caller, demo: Any, chargeback: str, first: str, keyed: bool) -> None:
    """An officer resolves her dispute with the provider's chargeback (refundAmount and returnedByProvider: POST
    /v1/disputes/{id}/transitions, with an idempotencyKey or not) as the desk erases her. The resolution locked its
    dispute, then her payment; beyond what was collected (her payment refunded already) it writes the payment twice
    (its flag, then its refunded amount), and PostgreSQL checks that row version's key to her member row again: a KEY
    SHARE lock on her row, which the erasure held (FOR UPDATE) while it waited for her dispute. PostgreSQL ended the
    deadlock by rolling the erasure back (503). So too when it withdraws her refund not yet sent (the money went back
    without it), noted on the dispute before the resolution writes it: her dispute written twice. Her row is taken
    first (core.disputes._her_row_before_dispute, as core.refunds._her_row_first): whichever comes second waits, and
    both are done; a chargeback on an erased member's payment is what can still be recorded."""
    from core.disputes import move_keyed_dispute
    from core.money import Money
    from core.refunds import ReturnedByProvider

    jeanne = await admin.json("POST", "/v1/members", 201, json={"name": NAME, "phone": PHONE})
    paid = await make_payment(rt, demo["cooperative_id"], account=PHONE, member_id=jeanne["id"])
    dispute = await admin.json("POST", "/v1/disputes", 201, json={"paymentId": paid.id, "reason": "OTHER",
                                                                   "note": f"called {NAME}"})
    if chargeback == "beyond":  # paid back in full already: the chargeback gives back more than was collected
        await _paid_back_in_full(rt, admin, paid)
    elif chargeback == "withdrawing":  # a refund asked for during the dispute, not sent yet: withdrawn by it
        refund = await admin.json("POST", f"/v1/payments/{paid.id}/refunds", 201,
                                  json={"amount": 50000, "reason": "paid twice", "idempotencyKey": idem()})
    await admin.json("DELETE", f"/v1/members/{jeanne['id']}", 200)

    async def resolved() -> Dispute:
        async with _patient(rt) as s:
            move: dict[str, Any] = {
                "dispute_id": dispute["id"], "cooperative_id": None, "target": "RESOLVED", "actor": ADMIN,
                "refund_amount": Money(50000, "RWF"), "returned": ReturnedByProvider("MTN-CB-7")}
            if keyed:  # (the route with an idempotencyKey: the dispute locked before the key is looked up)
                return (await move_keyed_dispute(s, rt, idempotency_key=idem(), **move))[0]
            return await move_dispute(s, rt, **move)

    # Both line up for her payment, `first` first.
    order = (first, {"resolution": "erasure", "erasure": "resolution"}[first])
    results = await _lined_up(rt, _held(Payment, paid.id), *(
        resolved() if which == "resolution" else _erased(rt, jeanne["id"]) for which in order))
    assert not any(isinstance(r, BaseException) for r in results), results
    async with rt.sessionmaker() as s:
        member = await s.get(Member, jeanne["id"])
        row = await s.get(Dispute, dispute["id"])
        payment = await s.get(Payment, paid.id)
        recorded = await s.get(Refund, row.refund_id)
        withdrawn = None if chargeback != "withdrawing" else await s.get(Refund, refund["id"])
    assert (member.name, member.phone_enc) == ("Erased member", None)
    assert (row.status, row.notes[0]["text"]) == ("RESOLVED", "[note erased]")
    assert (recorded.status, recorded.returned_by_provider, recorded.provider_transaction_id) == (
        "COMPLETED", True, "MTN-CB-7")
    assert (payment.status, payment.payment_account_masked) == ("REFUNDED", "erased")
    assert (payment.refunded_minor, payment.mismatch) == ((100000, True) if chargeback == "beyond" else (50000, False))
    if withdrawn is not None:
        assert (withdrawn.status, withdrawn.reason) == ("FAILED", None), (withdrawn.status, withdrawn.failure_reason)


@requires_pg
@pytest.mark.parametrize(("first", "to_paying_number"), [
    ("resolution", False), ("resolution", True), ("erasure", False)])
async def test_a_resolution_sending_her_a_refund_as_she_is_erased_waits_and_one_is_refused(
        rt: Any, admin: Caller, demo: Any, first: str, to_paying_number: bool) -> None:
    """A resolution with a refund sent to the provider (refundAmount, toPayingNumber or not) as the desk erases her:
    its refund waits, PENDING, and writes neither her payment nor her dispute twice, so it takes no lock on her row
    (core.disputes._her_row_before_dispute) and never deadlocks. Whichever locks her dispute first goes on; the
    other gets its documented refusal: the erasure, her refund still open (409); the refund, the account to send it
    to erased (409 MEMBER_ERASED), the dispute left open for the officer to record the provider's reversal."""
    from core.errors import MEMBER_ERASED
    from core.money import Money

    jeanne = await admin.json("POST", "/v1/members", 201, json={"name": NAME, "phone": PHONE})
    paid = await make_payment(rt, demo["cooperative_id"], account=PHONE, member_id=jeanne["id"])
    dispute = await admin.json("POST", "/v1/disputes", 201, json={"paymentId": paid.id, "reason": "OTHER"})
    await admin.json("DELETE", f"/v1/members/{jeanne['id']}", 200)

    async def resolved() -> Dispute:
        async with _patient(rt) as s:
            return await move_dispute(s, rt, dispute_id=dispute["id"], cooperative_id=None, target="RESOLVED",
                                      actor=ADMIN, refund_amount=Money(50000, "RWF"),
                                      to_paying_number=to_paying_number)

    # Both line up for her payment, `first` first.
    order = (first, {"resolution": "erasure", "erasure": "resolution"}[first])
    results = dict(zip(order, await _lined_up(rt, _held(Payment, paid.id), *(
        resolved() if which == "resolution" else _erased(rt, jeanne["id"]) for which in order)), strict=True))
    async with rt.sessionmaker() as s:
        member = await s.get(Member, jeanne["id"])
        row = await s.get(Dispute, dispute["id"])
        refunds = (await s.execute(select(Refund.status).where(Refund.payment_id == paid.id))).scalars().all()
    if first == "resolution":
        refused = results["erasure"]
        assert isinstance(refused, Conflict) and "refund(s) still open" in str(refused), refused
        assert (row.status, refunds, member.name) == ("RESOLVED", ["PENDING"], NAME)
    else:
        refused = results["resolution"]
        assert isinstance(refused, Conflict) and refused.code == MEMBER_ERASED, refused
        assert (row.status, refunds, member.name) == ("OPEN", [], "Erased member")


@requires_pg
@pytest.mark.parametrize("word", ["callback", "worker"])
async def test_a_completed_refund_reported_failed_while_she_is_erased_never_deadlocks_the_erasure(
        rt: Any, admin: Caller, demo: Any, word: str) -> None:
    """A COMPLETED refund of hers that its provider now reports failed (its callback, or the worker's answer), as the
    desk erases her: core.refunds._failed_after_completion locks the refund, then her payment, and flags it. The flag
    (core.refunds._flag) set the loaded payment's mismatch_detail before its UPDATE, whose autoflush wrote that first:
    her payment written twice, and PostgreSQL checks the second row version's key to her member row again, a KEY SHARE
    lock on her row, which the erasure held (FOR UPDATE) while it waited for her refund: a deadlock, the erasure rolled
    back (503). One UPDATE now: nothing waits for her row, and both are done."""
    from core.ports import ProviderOutcome
    from core.refunds import apply_refund_outcome, lock_for_outcome

    jeanne = await admin.json("POST", "/v1/members", 201, json={"name": NAME, "phone": PHONE})
    paid = await make_payment(rt, demo["cooperative_id"], account=PHONE, member_id=jeanne["id"])
    # The provider sent it back (it said).
    refund = await _settled_refund(
        rt, admin, paid, 10000, "status = 'COMPLETED', completed_at = now(), provider_reference = 'RF-UNDONE-1'",
        "status = 'PARTIALLY_REFUNDED', refunded_minor = 10000", reason=f"paid twice, {NAME}")
    await admin.json("DELETE", f"/v1/members/{jeanne['id']}", 200)

    async def reported_failed() -> Any:
        if word == "callback":
            return await _refund_word(rt, event_id="undone-1", reference="RF-UNDONE-1",
                                      outcome=ProviderOutcome.FAILED, reason="reversed by the provider")
        async with _patient(rt) as s:  # (core.jobs: a status answer)
            fresh = await lock_for_outcome(s, refund["id"], ProviderOutcome.FAILED)
            return await apply_refund_outcome(s, rt, fresh, ProviderOutcome.FAILED, actor=ADMIN,
                                              reason="reversed by the provider")

    # Both line up for her payment: the failure (holding the refund) first.
    results = await _lined_up(rt, _held(Payment, paid.id), reported_failed(), _erased(rt, jeanne["id"]))
    assert not any(isinstance(r, BaseException) for r in results), results
    async with rt.sessionmaker() as s:
        member = await s.get(Member, jeanne["id"])
        stored = await s.get(Refund, refund["id"])
        payment = await s.get(Payment, paid.id)
    assert (member.name, member.phone_enc) == ("Erased member", None)
    assert (stored.status, stored.reason) == ("COMPLETED", None)
    assert payment.mismatch and "reported failed after it was completed" in payment.mismatch_detail
    assert payment.payment_account_masked == "erased"


@requires_pg
@pytest.mark.parametrize("word", ["after_failure", "late_receipt", "adopted"])
async def test_a_payment_callback_writing_her_payment_twice_while_she_is_erased_never_deadlocks_the_erasure(
        rt: Any, admin: Caller, demo: Any, monkeypatch: Any, word: str) -> None:
    """The provider's callback about a settled payment of hers as the desk erases her: its first statement locks the
    payment (core.provider_events._store_event_and_lock), and the erasure, holding her row (FOR UPDATE), waits for it.
    A callback that then writes her payment twice has PostgreSQL check the second row version's key to her member row
    again, a KEY SHARE lock on her row behind the erasure's: a deadlock, one of the two rolled back. So it did:
    - money reported taken after her payment had failed, its receipt held by another payment of the cooperative
      (_flag_held_twice's audit row flushed part of the flag, the rest was flushed after it);
    - a late receipt of a payment completed under a provisional id, held by another payment (the id's UPDATE, then the
      flag's);
    - an unsigned callback found by our reference for a payment whose request's answer was lost (no id: TIMEOUT),
      completing it late (the adopted id's UPDATE, then the move's).
    The first two write her payment once now; the third takes her row first (FOR KEY SHARE): both are done."""
    from core.money import Money
    from core.ports import EventKind, ProviderOutcome, StatusResult
    from core.ports import ProviderEvent as ProviderEventData
    from core.provider_events import handle_provider_event

    jeanne = await admin.json("POST", "/v1/members", 201, json={"name": NAME, "phone": PHONE})
    status, stored = {"after_failure": ("FAILED", None), "late_receipt": ("COMPLETED", "ws_CO_1"),
                      "adopted": ("TIMEOUT", None)}[word]
    paid = await make_payment(rt, demo["cooperative_id"], account=PHONE, member_id=jeanne["id"], status=status)
    other = await make_payment(rt, demo["cooperative_id"], account="+250788000222")  # holds the receipt too
    async with rt.sessionmaker.begin() as s:
        await s.execute(text("UPDATE payments SET provider_transaction_id = :txn WHERE id = :id"),
                        {"txn": stored, "id": paid.id})
        await s.execute(text("UPDATE payments SET provider_transaction_id = 'RCPT-1' WHERE id = :id"),
                        {"id": other.id})
    await admin.json("DELETE", f"/v1/members/{jeanne['id']}", 200)
    receipt = "RCPT-9" if word == "adopted" else "RCPT-1"
    if word == "after_failure":
        event = ProviderEventData(provider="mtn_momo", kind=EventKind.COLLECTION, event_id=f"{word}-1",
                                  reference=paid.provider_reference, outcome=ProviderOutcome.SUCCEEDED,
                                  amount=Money(50_000, "RWF"), provider_transaction_id=receipt)
    else:  # (by the provider's id: M-Pesa's CheckoutRequestID; a lost request's found by our reference)
        raw = {"lookup": "provider_transaction_id"}
        if word == "adopted":
            raw["provider_reference"] = paid.provider_reference

            async def confirmed(*_args: Any) -> StatusResult:
                return StatusResult(ProviderOutcome.SUCCEEDED, provider_transaction_id=receipt)

            monkeypatch.setattr(rt.providers["mtn_momo"], "collection_status", confirmed)
        event = ProviderEventData(provider="mtn_momo", kind=EventKind.COLLECTION, event_id=f"{word}-1",
                                  reference=stored or "ws_CO_9", outcome=ProviderOutcome.SUCCEEDED,
                                  provider_transaction_id=receipt, needs_confirmation=word == "adopted", raw=raw)

    # Both line up for her payment: the callback first.
    results = await _lined_up(rt, _held(Payment, paid.id), handle_provider_event(rt, event),
                              _erased(rt, jeanne["id"]))
    assert not any(isinstance(r, BaseException) for r in results), results
    assert results[0] == {"after_failure": "flagged_success_after_failure", "late_receipt": "already_completed",
                          "adopted": "late_completed"}[word]
    async with rt.sessionmaker() as s:
        member = await s.get(Member, jeanne["id"])
        payment = await s.get(Payment, paid.id)
    assert (member.name, member.phone_enc) == ("Erased member", None)
    assert (payment.provider_transaction_id, payment.payment_account_masked) == (receipt, "erased")
    if word == "adopted":
        assert (payment.status, payment.late, payment.mismatch) == ("COMPLETED", True, False)
    else:  # its money is the other payment's: counted there, flagged here
        assert (payment.status, payment.collected_minor, payment.mismatch) == (status, 0, True)
        assert f"held by payment {other.reference} too" in payment.mismatch_detail


@requires_pg
@pytest.mark.parametrize("first", ["callback", "erasure"])
@pytest.mark.parametrize("status", ["PENDING", "PROCESSING", "TIMEOUT", "FAILED", "COMPLETED"])
async def test_a_callback_adopting_the_id_her_payment_lacks_while_she_is_erased_never_deadlocks(
        rt: Any, admin: Caller, demo: Any, monkeypatch: Any, status: str, first: str) -> None:
    """An unsigned callback found by our reference for a payment of hers whose request's answer was lost (it holds no
    provider id), in each status such a callback adopts the id on (core.provider_events.handle_provider_event:
    still open, timed out, failed, or completed by a status query naming no id), as the desk erases her, whichever
    comes first: the callback writes the id, then its outcome (the move, the flag or the final id: her payment
    written twice), so it takes her row first (FOR KEY SHARE) and the two take turns. Her payment still open when
    the erasure gets it is a 409 (erase once it settles); else both are done."""
    from core.ports import EventKind, ProviderOutcome, StatusResult
    from core.ports import ProviderEvent as ProviderEventData
    from core.provider_events import handle_provider_event

    jeanne = await admin.json("POST", "/v1/members", 201, json={"name": NAME, "phone": PHONE})
    paid = await make_payment(rt, demo["cooperative_id"], account=PHONE, member_id=jeanne["id"], status=status)
    async with rt.sessionmaker.begin() as s:
        await s.execute(text("UPDATE payments SET provider_transaction_id = NULL WHERE id = :id"), {"id": paid.id})
    await admin.json("DELETE", f"/v1/members/{jeanne['id']}", 200)

    async def confirmed(*_args: Any) -> StatusResult:
        return StatusResult(ProviderOutcome.SUCCEEDED, provider_transaction_id="RCPT-9")

    monkeypatch.setattr(rt.providers["mtn_momo"], "collection_status", confirmed)
    event = ProviderEventData(provider="mtn_momo", kind=EventKind.COLLECTION, event_id=f"adopt-{status}",
                              reference="ws_CO_9", outcome=ProviderOutcome.SUCCEEDED, provider_transaction_id="RCPT-9",
                              needs_confirmation=True,
                              raw={"lookup": "provider_transaction_id", "provider_reference": paid.provider_reference})
    steps = [handle_provider_event(rt, event), _erased(rt, jeanne["id"])]
    results = await _lined_up(rt, _held(Payment, paid.id), *(steps if first == "callback" else steps[::-1]))
    callback, erasure = results if first == "callback" else results[::-1]
    still_open = first == "erasure" and status in ("PENDING", "PROCESSING")
    assert not isinstance(callback, BaseException), results
    assert callback == {"PENDING": "completed", "PROCESSING": "completed", "TIMEOUT": "late_completed",
                        "FAILED": "flagged_success_after_failure", "COMPLETED": "already_completed"}[status]
    if still_open:
        assert isinstance(erasure, Conflict) and "still open" in str(erasure), results
    else:
        assert isinstance(erasure, Member), results
    async with rt.sessionmaker() as s:
        member = await s.get(Member, jeanne["id"])
        payment = await s.get(Payment, paid.id)
    assert payment.provider_transaction_id == "RCPT-9"
    if still_open:
        assert (member.name, payment.payment_account_masked) == (NAME, PHONE[:6] + "***")
    else:
        assert (member.name, member.phone_enc, payment.payment_account_enc) == ("Erased member", None, "")
        assert payment.payment_account_masked == "erased"


async def _left_in_clear(rt: Any, member_id: str) -> list[str]:
    """What still names her, or reaches her number, after her erasure: her row, and every row of the tables her
    erasure scrubs that holds her member id or her number's blind index with a number or text still in it."""
    from core.models import SmsMessage, UssdSession

    index = rt.cipher.blind_index(PHONE)
    left: list[str] = []
    async with rt.sessionmaker() as s:
        member = await s.get(Member, member_id)
        if (member.name, member.phone_enc, member.phone_index) != ("Erased member", None, None):
            left.append(f"member {member.name}")
        for sms in (await s.execute(select(SmsMessage).where(
                (SmsMessage.member_id == member_id) | (SmsMessage.phone_index == index)))).scalars():
            if sms.phone_enc or sms.body:
                left.append(f"sms {sms.template} {sms.status} {sms.phone_masked}")
        for row in (await s.execute(select(UssdSession).where(
                (UssdSession.member_id == member_id) | (UssdSession.phone_index == index)))).scalars():
            if row.phone_index or row.phone_masked != "erased":
                left.append(f"ussd session {row.session_id} {row.phone_masked}")
        for job in (await s.execute(select(OutboxJob).where(OutboxJob.kind == "sms.send"))).scalars():
            if (job.payload or {}).get("member_id") == member_id and (job.payload or {}).get("phone_enc"):
                left.append(f"sms job {job.payload.get('template')} {job.status}")
    return left


@requires_pg
@pytest.mark.parametrize("first", ["import", "erasure"])
async def test_an_update_import_naming_her_while_she_is_erased_never_deadlocks_nor_writes_her_back(
        rt: Any, admin: Caller, demo: Any, first: str) -> None:
    """The cooperative's list sent again (existing=update) naming her, a new name spelling, as the desk erases her:
    the import locks the members its numbers find (core.member_import._members_of, FOR UPDATE), the erasure hers
    first; whichever gets her row, the other waits. The import first: her new name is written, then erased. The
    erasure first: the import's lock, granted after it, finds her number no longer hers (PostgreSQL reads the row
    again), so it does not write her row: the number is a new member's, as in a list sent after the erasure."""
    from core.cooperatives import get_cooperative
    from core.member_import import import_members

    jeanne = await admin.json("POST", "/v1/members", 201, json={"name": NAME, "phone": PHONE})
    await admin.json("DELETE", f"/v1/members/{jeanne['id']}", 200)

    async def imported() -> Any:
        async with _patient(rt) as s:
            return await import_members(s, rt.cipher, cooperative=await get_cooperative(s, demo["cooperative_id"]),
                                        data=f"name,phone\nJeanne Mukeshimana-Uwase,{PHONE}\n".encode(),
                                        actor=ADMIN, existing="update")

    steps = [imported(), _erased(rt, jeanne["id"])]
    results = await _lined_up(rt, _held(Member, jeanne["id"]), *(steps if first == "import" else steps[::-1]))
    assert not any(isinstance(r, BaseException) for r in results), results
    done = results[0] if first == "import" else results[1]
    assert await _left_in_clear(rt, jeanne["id"]) == []
    if first == "import":
        assert (done.updated_ids, done.member_ids) == ([jeanne["id"]], [])
    else:  # her number, free again, registered anew by the list
        assert done.updated_ids == [] and len(done.member_ids) == 1 and done.member_ids[0] != jeanne["id"]


@requires_pg
@pytest.mark.parametrize("word", ["STOP", "HELP"])
@pytest.mark.parametrize("first", ["text", "erasure"])
async def test_a_text_from_her_number_while_she_is_erased_never_deadlocks_nor_leaves_her_number(
        rt: Any, admin: Caller, client: Any, demo: Any, first: str, word: str) -> None:
    """Her STOP (or any keyword) texted as the desk erases her: the text locks the memberships of the number (FOR KEY
    SHARE: channels.sms.routes.inbound), the erasure hers (FOR UPDATE); whichever gets her row, the other waits, and
    nothing of hers keeps her number. The text reading her membership unlocked, after the erasure had locked it,
    queued its reply to her (her member id and her number in its job) once the erasure had cleared her texts' jobs,
    and the reply's SMS row then named her with her number."""
    jeanne = await admin.json("POST", "/v1/members", 201, json={"name": NAME, "phone": PHONE})
    await admin.json("DELETE", f"/v1/members/{jeanne['id']}", 200)

    async def texted() -> int:
        response = await client.post("/sms/africastalking/inbound", data={
            "date": "2026-01-15 10:00:00", "from": PHONE, "id": "at-text-1", "linkId": "L1", "text": word,
            "to": "12345", "networkCode": "63510"})
        return response.status

    steps = [texted(), _erased(rt, jeanne["id"])]
    results = await _lined_up(rt, _held(Member, jeanne["id"]), *(steps if first == "text" else steps[::-1]))
    assert not any(isinstance(r, BaseException) for r in results), results
    assert (results[0] if first == "text" else results[1]) == 200
    assert await _left_in_clear(rt, jeanne["id"]) == []


@requires_pg
@pytest.mark.parametrize("first", ["dial", "erasure"])
async def test_a_dial_from_her_number_while_she_is_erased_leaves_no_session_row_with_her_number(
        rt: Any, admin: Caller, client: Any, demo: Any, first: str) -> None:
    """Her number dialling the USSD code as the desk erases her: the session's row (ussd_sessions: her number's
    blind index and mask) is written on the first hop, before the erasure's statements (scrubbed by it) or after it
    committed (the number released: no member's any more). The erasure holds her payment's lock here while the dial
    comes (first='erasure'), or the dial comes first."""
    from tests.channels.ussd.helpers import AtPhone

    jeanne = await admin.json("POST", "/v1/members", 201, json={"name": NAME, "phone": PHONE})
    paid = await make_payment(rt, demo["cooperative_id"], account=PHONE, member_id=jeanne["id"])
    await admin.json("DELETE", f"/v1/members/{jeanne['id']}", 200)
    phone = AtPhone(client, PHONE, service_code=f"*384*{demo['short_code']}#")
    if first == "dial":
        await phone.dial()
        await _erased(rt, jeanne["id"])
    else:
        blocker = rt.sessionmaker()
        try:
            await blocker.begin()
            await blocker.execute(_held(Payment, paid.id))
            erasure = asyncio.create_task(_erased(rt, jeanne["id"]))
            await waiting_for_locks(rt, 1)  # her row locked, her payment waited for
            await phone.dial()
            await blocker.commit()
        finally:
            await blocker.close()
        await erasure
    assert await _left_in_clear(rt, jeanne["id"]) == []


@requires_pg
async def test_a_help_from_her_number_as_her_erasure_ends_leaves_no_reply_with_her_number(
        rt: Any, admin: Caller, client: Any, demo: Any) -> None:
    """Her HELP texted once her erasure has cleared her texts' jobs but before it commits (here it waits for her USSD
    session's row, its next statement): the text must wait for her membership, not read it as the number's and queue
    a reply with her member id and her number that nothing clears any more."""
    from core.models import UssdSession

    jeanne = await admin.json("POST", "/v1/members", 201, json={"name": NAME, "phone": PHONE})
    await admin.json("DELETE", f"/v1/members/{jeanne['id']}", 200)
    async with rt.sessionmaker.begin() as s:
        s.add(UssdSession(aggregator="africastalking", session_id="ATUid_1", cooperative_id=demo["cooperative_id"],
                          member_id=jeanne["id"], phone_index=rt.cipher.blind_index(PHONE),
                          phone_masked=PHONE[:6] + "***", service_code="*384*123#"))
    blocker = rt.sessionmaker()
    try:
        await blocker.begin()
        await blocker.execute(select(UssdSession.id).where(UssdSession.member_id == jeanne["id"]).with_for_update())
        erasure = asyncio.create_task(_erased(rt, jeanne["id"]))
        await waiting_for_locks(rt, 1)  # past her texts' jobs, waiting for her session's row
        texted = asyncio.create_task(client.post("/sms/africastalking/inbound", data={
            "date": "2026-01-15 10:00:00", "from": PHONE, "id": "at-help-1", "linkId": "L1", "text": "HELP",
            "to": "12345", "networkCode": "63510"}))
        # The text waits for her membership (or, unlocked, went through meanwhile).
        await waiting_for_locks(rt, 2, done=texted)
        await blocker.commit()
    finally:
        await blocker.close()
    results = await asyncio.gather(erasure, texted, return_exceptions=True)
    assert not any(isinstance(r, BaseException) for r in results), results
    assert results[1].status == 200
    assert await _left_in_clear(rt, jeanne["id"]) == []


@requires_pg
@pytest.mark.parametrize("word", ["recorded", "callback"])
async def test_a_late_success_on_a_payment_from_her_number_while_she_is_erased_withdraws_the_refund_waiting(
        rt: Any, admin: Caller, demo: Any, word: str) -> None:
    """A payment from her number with no member attached (hers: core.members._Hers), whose full refund FAILED, then
    a second full refund asked for and not yet sent; the first one goes through after all (its callback, or an
    admin's record) as the desk erases her. The late success takes no row of hers (the payment has no member): it
    locks its refund, then the payment, then withdraws the refunds not yet sent (core.refunds._withdraw_unsent),
    skipping one another transaction holds. The erasure locked her refunds in id order, the one waiting first,
    then waited for the failed one: the late success skipped the refund waiting, it stayed PENDING, the erasure was
    refused for it (a refund still open), and it was sent: the member was paid back twice. The erasure locks the
    settled refunds first (those a late word moves), the open ones after: the late success withdraws it."""
    from core.ports import ProviderOutcome
    from core.refunds import record_refund_outcome

    jeanne = await admin.json("POST", "/v1/members", 201, json={"name": NAME, "phone": PHONE})
    paid = await make_payment(rt, demo["cooperative_id"], account=PHONE, created_at=datetime.now(UTC))
    failed = await _settled_refund(rt, admin, paid, 50000, "status = 'FAILED', provider_reference = 'RF-LATE-1', "
                                   "failure_reason = 'declined'")
    while True:  # the refund waiting, with an id before the failed one's (the erasure locks her refunds in id order)
        waiting = await admin.json("POST", f"/v1/payments/{paid.id}/refunds", 201,
                                   json={"amount": 50000, "reason": "paid twice", "idempotencyKey": idem()})
        async with rt.sessionmaker() as s:
            first = (await s.execute(select(Refund.id).where(Refund.id.in_((waiting["id"], failed["id"])))
                                     .order_by(Refund.id).limit(1))).scalar_one()
        if first == waiting["id"]:
            break
        async with rt.sessionmaker.begin() as s:  # (withdrawn: asked again)
            await s.execute(text("UPDATE refunds SET status = 'FAILED', failure_reason = 'x' WHERE id = :id"),
                            {"id": waiting["id"]})
            await s.execute(text("UPDATE outbox_jobs SET status = 'DONE' WHERE dedupe_key = :k"),
                            {"k": f"refund:{waiting['id']}"})
    await admin.json("DELETE", f"/v1/members/{jeanne['id']}", 200)

    async def late_success() -> Any:
        if word == "callback":
            return await _refund_word(rt, event_id="late-1", reference="RF-LATE-1",
                                      outcome=ProviderOutcome.SUCCEEDED, provider_transaction_id="MTN-RF-9")
        async with _patient(rt) as s:
            return await record_refund_outcome(s, rt, refund_id=failed["id"], cooperative_id=None, succeeded=True,
                                               note="on the statement", actor=ADMIN, provider_transaction_id="MTN-RF-9")

    # Both line up for the payment: the late success (holding the failed refund) first.
    late, erased = await _lined_up(rt, _held(Payment, paid.id), late_success(), _erased(rt, jeanne["id"]))
    assert not isinstance(late, BaseException), late
    async with rt.sessionmaker() as s:
        left = await s.get(Refund, waiting["id"])
        job = (await s.execute(select(OutboxJob.status).where(OutboxJob.dedupe_key == f"refund:{waiting['id']}"))
               ).scalar_one()
        payment = await s.get(Payment, paid.id)
    assert (left.status, job) == ("FAILED", "DONE"), (left.status, left.failure_reason, job, erased)
    assert (payment.status, payment.refunded_minor) == ("REFUNDED", 50000)
    # Nothing of hers left open: the erasure, which waited for the late success, went through.
    assert not isinstance(erased, BaseException), erased
    assert (erased.name, erased.phone_enc) == ("Erased member", None)


@requires_pg
async def test_a_chargeback_on_a_payment_from_her_number_while_she_is_erased_withdraws_the_refund_waiting(
        rt: Any, admin: Caller, demo: Any) -> None:
    """A payment from her number with no member attached (hers: core.members._Hers), a full refund of it asked for
    and not yet sent, and the provider's reversal of it recorded (returnedByProvider) as the desk erases her. The
    chargeback takes no row of hers (the payment has no member): it locks the payment, then withdraws the refunds
    not yet sent that no other transaction holds (core.refunds._withdraw_unsent, SKIP LOCKED). The erasure held the
    refund waiting (it locked her open refunds too) while it waited for the payment: the chargeback skipped it, it
    stayed PENDING and was sent (the member paid back twice, flagged only once it completed), and the erasure was
    refused for it. The erasure no longer locks a refund still open (it is refused for one anyway): the chargeback
    withdraws it, and the erasure is refused as before (a refund was open when it looked)."""
    from core.money import Money
    from core.refunds import ReturnedByProvider, request_refund

    jeanne = await admin.json("POST", "/v1/members", 201, json={"name": NAME, "phone": PHONE})
    paid = await make_payment(rt, demo["cooperative_id"], account=PHONE, created_at=datetime.now(UTC))
    waiting = await admin.json("POST", f"/v1/payments/{paid.id}/refunds", 201,
                               json={"amount": 50000, "reason": "paid twice", "idempotencyKey": idem()})
    await admin.json("DELETE", f"/v1/members/{jeanne['id']}", 200)

    async def chargeback() -> Any:
        async with _patient(rt) as s:
            return await request_refund(s, rt, payment_id=paid.id, cooperative_id=None, amount=Money(50000, "RWF"),
                                        reason=None, idempotency_key=idem(), actor=ADMIN,
                                        returned=ReturnedByProvider("MTN-REV-1"))

    # Both line up for the payment: the chargeback first.
    recorded, erased = await _lined_up(rt, _held(Payment, paid.id), chargeback(), _erased(rt, jeanne["id"]))
    assert not isinstance(recorded, BaseException), recorded
    async with rt.sessionmaker() as s:
        left = await s.get(Refund, waiting["id"])
        payment = await s.get(Payment, paid.id)
    assert (left.status, (left.failure_reason or "")[:9]) == ("FAILED", "not sent:"), (left.status, erased)
    assert (payment.status, payment.refunded_minor, payment.mismatch) == ("REFUNDED", 50000, False)
    # The erasure saw the refund open (it is refused for one, as before: erased again, it goes through).
    assert isinstance(erased, Conflict) and "refund(s) still open" in str(erased), erased


@requires_pg
async def test_a_dispute_opened_as_she_is_erased_and_resolved_with_a_chargeback_never_deadlocks(
        rt: Any, admin: Caller, demo: Any) -> None:
    """As above (a dispute of a payment from her number with no member attached, committed while the erasure waited
    for the payment, its dispute lock taken before), the officer resolving it by recording the provider's chargeback:
    her resolution holds the dispute and waits for the payment, which the erasure held while it waited for that
    dispute (_erase_disputes): a deadlock, one of the two rolled back (503). The erasure now takes a dispute opened so
    only if it is free, else lets the payments go and takes them again after it: both are done."""
    from core.money import Money
    from core.refunds import ReturnedByProvider

    jeanne = await admin.json("POST", "/v1/members", 201, json={"name": NAME, "phone": PHONE})
    paid = await make_payment(rt, demo["cooperative_id"], account=PHONE, created_at=datetime.now(UTC))
    await admin.json("DELETE", f"/v1/members/{jeanne['id']}", 200)

    async with _officer_at_a_dispute_opened_as_she_is_erased(rt, paid, jeanne["id"], "DSP-RACE-2") as (
            officer, erasure, dispute_id):
        try:
            await move_dispute(officer, rt, dispute_id=dispute_id, cooperative_id=None, target="RESOLVED",
                               actor=ADMIN, note=f"charged back to {NAME}", refund_amount=Money(50000, "RWF"),
                               returned=ReturnedByProvider("MTN-CB-9"))
            await officer.commit()
            resolution: Any = None
        except Exception as exc:
            resolution = exc
        results = [resolution, *(await asyncio.gather(erasure, return_exceptions=True))]
    assert results[0] is None and not isinstance(results[1], BaseException), results
    async with rt.sessionmaker() as s:
        member = await s.get(Member, jeanne["id"])
        stored = await s.get(Dispute, dispute_id)
        payment = await s.get(Payment, paid.id)
    assert (member.name, member.phone_enc) == ("Erased member", None)
    assert stored.status == "RESOLVED" and stored.refund_id is not None
    assert {note["text"] for note in stored.notes} == {"[note erased]"}, stored.notes
    assert (payment.status, payment.payment_account_masked) == ("REFUNDED", "erased")
