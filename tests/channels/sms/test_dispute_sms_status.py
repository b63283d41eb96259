"""A dispute's SMS tells the change it was queued for, whatever the dispute's status when the worker sends it.

The worker fills a message in when its turn comes: a dispute moved OPEN -> UNDER_REVIEW -> REJECTED before
then (an SMS backlog, a quick admin) used to send "not accepted" for the review and again for the closing.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from core.audit import Actor
from core.disputes import SMS_SPACING, move_dispute, open_dispute
from core.models import Dispute, Payment
from core.notify import send_sms
from tests.channels.sms.helpers import jobs_of, make_payment
from tests.conftest import drain
from tests.providers.wires import due_now

JEAN = "+250788000002"  # reads English
ADMIN = Actor("admin:test", "api")


async def _dispute(rt: Any, demo: dict[str, Any]) -> tuple[Dispute, str]:
    """A dispute OPEN on a payment of Jean's, and that payment's reference."""
    paid = await make_payment(rt, demo["cooperative_id"], account=JEAN, member_id=demo["members"][JEAN])
    async with rt.sessionmaker.begin() as session:
        payment = await session.get(Payment, paid.id)
        dispute = await open_dispute(session, payment=payment, reason="WRONG_AMOUNT", channel="api", actor=ADMIN,
                                     cipher=rt.cipher, answer_days=rt.settings.sms_payer_answer_days)
    return dispute, paid.reference


async def _move(rt: Any, dispute: Dispute, target: str) -> None:
    async with rt.sessionmaker.begin() as session:
        await move_dispute(session, rt, dispute_id=dispute.id, cooperative_id=dispute.cooperative_id,
                           target=target, actor=ADMIN, note="checked the statement")


async def test_each_change_is_told_once_though_the_dispute_moved_on_before_the_sms_left(
    rt: Any, demo: dict[str, Any], sim: Any, worker: Any
) -> None:
    dispute, payment_ref = await _dispute(rt, demo)
    await _move(rt, dispute, "UNDER_REVIEW")
    await _move(rt, dispute, "REJECTED")
    jobs = await jobs_of(rt, "sms.send")
    assert len(jobs) == 3  # none sent yet, and the dispute is REJECTED by now
    # Each change's SMS is due after the one before it (parallel sends would deliver "closed" first).
    by_key = {j.dedupe_key.split(":")[1]: j.run_at for j in jobs}
    assert by_key["dispute_updated"] - by_key["dispute_opened"] >= SMS_SPACING
    assert by_key["dispute_resolved"] - by_key["dispute_updated"] >= SMS_SPACING

    await due_now(rt, "sms.send")
    await drain(worker)

    about = f"{dispute.reference} about payment {payment_ref}"
    inbox = Counter(m["message"] for m in sim.messages(JEAN))
    [opened] = [body for body in inbox if body.startswith(f"Your dispute {about} ")]
    assert inbox == Counter({
        opened: 1,
        f"Dispute {about}: under review.": 1,
        f"Dispute {about} is closed: not accepted. Thank you.": 1,
    })
    async with rt.sessionmaker() as session:
        assert (await session.get(Dispute, dispute.id)).status == "REJECTED"


async def test_a_job_queued_without_the_status_says_the_rows(
    rt: Any, demo: dict[str, Any], sim: Any, worker: Any
) -> None:
    """A job queued before the status was put in the SMS context still sends, with the dispute's status."""
    dispute, payment_ref = await _dispute(rt, demo)
    await drain(worker)  # the "registered" SMS
    async with rt.sessionmaker.begin() as session:
        await send_sms(session, template="dispute_updated", cooperative_id=dispute.cooperative_id,
                       context={"dispute_id": dispute.id}, cipher=rt.cipher, member_id=demo["members"][JEAN],
                       dedupe=f"dispute_updated:{dispute.id}:under_review")
    await drain(worker)
    assert sim.messages(JEAN)[-1]["message"] == f"Dispute {dispute.reference} about payment {payment_ref}: received."
