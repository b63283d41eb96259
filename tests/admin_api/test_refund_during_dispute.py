"""A refund made straight on a payment while a dispute on it is open is noted on the dispute (and linked to it), so
the officer resolving the dispute sees the member was already paid back part, and does not pay her twice."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import func, select, text

from core.audit import Actor
from core.disputes import open_dispute
from core.models import Dispute, Payment, Refund
from core.money import Money
from core.refunds import request_refund
from tests.admin_api.conftest import complete_payment, idem, make_payment
from tests.conftest import make_settings, requires_pg, waiting_for_locks

ROUNDS = 20


@pytest.fixture
def settings(migrated_database):
    # Rounds of races need more payments than one admin may create in a minute: the limiter is not under test.
    return make_settings(RATE_LIMIT_MULTIPLIER="100")


async def _disputed(admin, rt, demo):
    """A collected 50,000 RWF payment with an open dispute, and the admin's actor id (from the opening note)."""
    payment = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    await complete_payment(rt, payment["id"])
    dispute = await admin.json("POST", "/v1/disputes", 201,
                               json={"paymentId": payment["id"], "reason": "OTHER", "note": "charged twice"})
    return payment, dispute, dispute["notes"][0]["actor"]


async def _held(rt, payment_id: str) -> int:
    async with rt.sessionmaker() as s:
        return (await s.execute(select(func.coalesce(func.sum(Refund.amount_minor), 0)).where(
            Refund.payment_id == payment_id, Refund.status != "FAILED"))).scalar_one()


async def _race(admin, payment, dispute, amount: int):
    """A direct refund of `amount` on the payment and the dispute resolved with a 30,000 RWF refund, sent at once."""
    return await asyncio.gather(
        admin.req("POST", f"/v1/payments/{payment['id']}/refunds", json={"amount": amount, "idempotencyKey": idem()}),
        admin.req("POST", f"/v1/disputes/{dispute['id']}/transitions",
                  json={"status": "RESOLVED", "refundAmount": 30000}))


async def test_a_refund_made_while_a_dispute_is_open_is_noted_on_it(admin, rt, demo):
    payment, dispute, actor = await _disputed(admin, rt, demo)
    body = {"amount": 20000, "reason": "goodwill", "idempotencyKey": idem()}
    refund = await admin.json("POST", f"/v1/payments/{payment['id']}/refunds", 201, json=body)
    assert refund["disputeId"] == dispute["id"]
    seen = await admin.json("GET", f"/v1/disputes/{dispute['id']}", 200)
    assert seen["status"] == "OPEN" and seen["refundId"] is None  # not the resolution's refund
    [_opening, noted] = seen["notes"]
    assert noted["actor"] == actor and noted["status"] == "OPEN" and noted["evidence"] is None
    assert refund["reference"] in noted["text"] and "20,000 RWF" in noted["text"], noted
    # A replay of the same request is the same refund: not noted twice.
    again = await admin.json("POST", f"/v1/payments/{payment['id']}/refunds", 201, json=body)
    assert again["id"] == refund["id"]
    assert len((await admin.json("GET", f"/v1/disputes/{dispute['id']}", 200))["notes"]) == 2
    # The officer resolving it sees the note, and the resolution's refund gets only what is left.
    await admin.json("POST", f"/v1/disputes/{dispute['id']}/transitions", 422,
                     json={"status": "RESOLVED", "refundAmount": 30001})
    resolved = await admin.json("POST", f"/v1/disputes/{dispute['id']}/transitions", 200,
                                json={"status": "RESOLVED", "refundAmount": 30000})
    assert resolved["refundId"] not in (None, refund["id"]) and len(resolved["notes"]) == 2
    assert await _held(rt, payment["id"]) == 50000
    # Once the dispute is settled, a refund on the payment is nobody's dispute note.
    async with rt.sessionmaker.begin() as s:  # (room for one more: the resolution's refund failed, say)
        await s.execute(text("UPDATE refunds SET status = 'FAILED' WHERE id = :id"), {"id": resolved["refundId"]})
    later = await admin.json("POST", f"/v1/payments/{payment['id']}/refunds", 201,
                             json={"amount": 1000, "idempotencyKey": idem()})
    assert later["disputeId"] is None
    assert len((await admin.json("GET", f"/v1/disputes/{dispute['id']}", 200))["notes"]) == 2


async def test_a_refund_without_a_dispute_is_linked_to_none(admin, rt, demo):
    payment = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    await complete_payment(rt, payment["id"])
    refund = await admin.json("POST", f"/v1/payments/{payment['id']}/refunds", 201,
                              json={"amount": 1000, "idempotencyKey": idem()})
    assert refund["disputeId"] is None


@requires_pg
async def test_a_direct_refund_racing_a_resolution_with_refund_moves_only_what_was_collected(admin, rt, demo):
    """Both lock the dispute before the payment: no deadlock (no 500), and never more than collected refunded.
    Each asks 30,000 of 50,000: exactly one is made; the other is refused as more than is left."""
    for _ in range(ROUNDS):
        payment, dispute, actor = await _disputed(admin, rt, demo)
        direct, resolve = await _race(admin, payment, dispute, 30000)
        statuses = sorted([direct.status, resolve.status])
        assert statuses in ([200, 422], [201, 422]), (statuses, await direct.text(), await resolve.text())
        assert await _held(rt, payment["id"]) == 30000
        final = await admin.json("GET", f"/v1/disputes/{dispute['id']}", 200)
        if direct.status == 201:  # first: noted on the dispute, which stays open
            made = await direct.json()
            assert final["status"] == "OPEN" and made["disputeId"] == dispute["id"]
            assert any(made["reference"] in (n["text"] or "") and n["actor"] == actor for n in final["notes"])
        else:
            assert final["status"] == "RESOLVED" and final["refundId"] is not None
            assert "exceeds the refundable" in (await direct.json())["message"]


@requires_pg
async def test_a_direct_refund_and_a_resolution_that_both_fit_are_both_made(admin, rt, demo):
    for _ in range(ROUNDS):
        payment, dispute, _actor = await _disputed(admin, rt, demo)
        direct, resolve = await _race(admin, payment, dispute, 20000)
        assert (direct.status, resolve.status) == (201, 200), (await direct.text(), await resolve.text())
        assert await _held(rt, payment["id"]) == 50000
        made = await direct.json()
        final = await admin.json("GET", f"/v1/disputes/{dispute['id']}", 200)
        # Before the resolution: noted (and the resolution was made with it on the dispute); after: no note.
        noted = any(made["reference"] in (n["text"] or "") for n in final["notes"])
        assert noted == (made["disputeId"] == dispute["id"])


@requires_pg
async def test_a_dispute_opened_while_the_refund_waits_for_the_payment_is_noted(admin, rt, demo):
    """The refund found no dispute, then waited for the payment's lock held by the dispute's opening: the dispute
    committed meanwhile is found under the payment's lock and noted too."""
    actor = Actor("admin:test", "admin")
    payment_id = (await make_payment(admin, demo["payment_types"]["Monthly Rent"]))["id"]
    await complete_payment(rt, payment_id)
    opener = rt.sessionmaker()
    try:
        await opener.begin()
        paid = await opener.get(Payment, payment_id)
        dispute = await open_dispute(opener, payment=paid, reason="OTHER", channel="api", actor=actor,
                                     cipher=rt.cipher, answer_days=rt.settings.sms_payer_answer_days)

        async def refund():
            async with rt.sessionmaker.begin() as s:
                made, _ = await request_refund(s, rt, payment_id=payment_id, cooperative_id=None,
                                               amount=Money(5000, "RWF"), reason=None, idempotency_key=idem(),
                                               actor=actor)
                return made.id, made.reference

        task = asyncio.create_task(refund())
        await waiting_for_locks(rt, 1)
        await opener.commit()
        refund_id, reference = await task
    finally:
        await opener.close()
    async with rt.sessionmaker() as s:
        stored = await s.get(Dispute, dispute.id)
        linked = await s.get(Refund, refund_id)
    assert linked.dispute_id == dispute.id
    assert [n["actor"] for n in stored.notes] == [actor.id] and reference in stored.notes[0]["text"]


@requires_pg
async def test_a_late_success_of_a_refund_made_during_the_dispute_never_deadlocks_another_refund(admin, rt, demo):
    """A refund made during the dispute (linked to it) failed, then the provider says it went through after all: its
    callback notes that on the dispute. Meanwhile an officer refunds the payment (the dispute locked, then the
    payment). Before: the callback locked the payment, then the dispute, and one of the two was rolled back in a
    deadlock (the officer's answered 500)."""
    from core.ports import ProviderOutcome
    from core.refunds import apply_refund_outcome

    actor = Actor("admin:test", "admin")
    payment, dispute, _actor = await _disputed(admin, rt, demo)
    early = await admin.json("POST", f"/v1/payments/{payment['id']}/refunds", 201,
                             json={"amount": 10000, "idempotencyKey": idem()})
    assert early["disputeId"] == dispute["id"]
    async with rt.sessionmaker.begin() as s:  # the provider refused it
        await s.execute(text("UPDATE refunds SET status = 'FAILED', failure_reason = 'refused' WHERE id = :id"),
                        {"id": early["id"]})
    blocker = rt.sessionmaker()
    try:
        await blocker.begin()  # holds the payment while both line up for it: the callback first
        await blocker.execute(select(Payment.id).where(Payment.id == payment["id"]).with_for_update())

        async def late_success():
            async with rt.sessionmaker.begin() as s:
                fresh = (await s.execute(select(Refund).where(Refund.id == early["id"]).with_for_update())
                         ).scalar_one()
                await apply_refund_outcome(s, rt, fresh, ProviderOutcome.SUCCEEDED, actor=actor)

        async def officer_refund():
            async with rt.sessionmaker.begin() as s:
                await request_refund(s, rt, payment_id=payment["id"], cooperative_id=None,
                                     amount=Money(5000, "RWF"), reason=None, idempotency_key=idem(), actor=actor)

        callback = asyncio.create_task(late_success())
        await waiting_for_locks(rt, 1)
        officer = asyncio.create_task(officer_refund())
        await waiting_for_locks(rt, 2)
        await blocker.commit()
        results = await asyncio.gather(callback, officer, return_exceptions=True)
    finally:
        await blocker.close()
    assert results == [None, None], results
    async with rt.sessionmaker() as s:
        stored = await s.get(Dispute, dispute["id"])
        assert (await s.get(Refund, early["id"])).status == "COMPLETED"
    assert any("went through after all" in (n["text"] or "") for n in stored.notes)
    assert await _held(rt, payment["id"]) == 15000


@requires_pg
async def test_a_late_success_withdrawing_a_refund_made_during_a_dispute_never_deadlocks_the_officer(admin, rt, demo):
    """A refund made before the dispute (linked to none) failed; one made during it waits to be sent. The first goes
    through after all: the second is withdrawn, and that is noted on its dispute. Meanwhile an officer refunds the
    payment (the dispute locked, then the payment). Before: the late success locked the payment, then the withdrawn
    refund's dispute, and one of the two was rolled back in a deadlock."""
    from core.errors import BusinessRuleError
    from core.ports import ProviderOutcome
    from core.refunds import apply_refund_outcome

    actor = Actor("admin:test", "admin")
    payment = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    await complete_payment(rt, payment["id"])
    early = await admin.json("POST", f"/v1/payments/{payment['id']}/refunds", 201,
                             json={"amount": 50000, "idempotencyKey": idem()})
    async with rt.sessionmaker.begin() as s:  # the provider refused it
        await s.execute(text("UPDATE refunds SET status = 'FAILED', failure_reason = 'refused' WHERE id = :id"),
                        {"id": early["id"]})
    dispute = await admin.json("POST", "/v1/disputes", 201,
                               json={"paymentId": payment["id"], "reason": "OTHER", "note": "charged twice"})
    queued = await admin.json("POST", f"/v1/payments/{payment['id']}/refunds", 201,
                              json={"amount": 30000, "idempotencyKey": idem()})
    assert early["disputeId"] is None and queued["disputeId"] == dispute["id"]
    blocker = rt.sessionmaker()
    try:
        await blocker.begin()  # holds the payment while both line up for it: the late success first
        await blocker.execute(select(Payment.id).where(Payment.id == payment["id"]).with_for_update())

        async def late_success():
            async with rt.sessionmaker.begin() as s:
                fresh = (await s.execute(select(Refund).where(Refund.id == early["id"]).with_for_update())
                         ).scalar_one()
                await apply_refund_outcome(s, rt, fresh, ProviderOutcome.SUCCEEDED, actor=actor)

        async def officer_refund():
            async with rt.sessionmaker.begin() as s:
                await request_refund(s, rt, payment_id=payment["id"], cooperative_id=None,
                                     amount=Money(5000, "RWF"), reason=None, idempotency_key=idem(), actor=actor)

        callback = asyncio.create_task(late_success())
        await waiting_for_locks(rt, 1)
        officer = asyncio.create_task(officer_refund())
        await waiting_for_locks(rt, 2)
        await blocker.commit()
        results = await asyncio.gather(callback, officer, return_exceptions=True)
    finally:
        await blocker.close()
    assert results[0] is None and isinstance(results[1], BusinessRuleError), results  # nothing left to refund
    async with rt.sessionmaker() as s:
        stored = await s.get(Dispute, dispute["id"])
        assert (await s.get(Refund, queued["id"])).status == "FAILED"
    assert any("went through after all" in (n["text"] or "") for n in stored.notes)
