"""SMS after a membership changed: a recycled number's new holder is not answered as its old member, and the
"you are now a member" message of an approval undone before the worker's turn is not sent."""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from typing import Any

from sqlalchemy import select

from channels.sms.templates import render
from core.audit import Actor
from core.db import utcnow
from core.members import approve_member, create_member, release_phone, update_member
from core.models import Cooperative, Member, SmsMessage
from core.phone import normalize
from tests.channels.sms.conftest import gateway_app
from tests.channels.sms.helpers import make_payment
from tests.channels.sms.test_routes import inbound
from tests.conftest import drain

ALINE = "+250788000001"  # Kigali Heights, Kinyarwanda
SYSTEM = Actor("system", "system")


async def _suspend(rt: Any, member_id: str, *, release: bool = False) -> None:
    async with rt.sessionmaker.begin() as s:
        member = await s.get(Member, member_id)
        member = await update_member(s, member, actor=SYSTEM, status="SUSPENDED")
        if release:
            await release_phone(s, member, actor=SYSTEM)


async def _other_coop_member(rt: Any, phone: str) -> str:
    async with rt.sessionmaker.begin() as s:
        coop = Cooperative(name="Other Coop", short_code="OTHER", country="RW", currency="RWF",
                           timezone="Africa/Kigali", status="ACTIVE", ussd_extension="77")
        s.add(coop)
        await s.flush()
        member = await create_member(s, rt.cipher, cooperative_id=coop.id, name="New Holder",
                                     phone=normalize(phone), language="en", actor=SYSTEM)
        return member.id


async def test_new_holder_of_a_suspended_members_number_is_not_answered_as_her(
    rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any, worker: Any
) -> None:
    """Aline is suspended (left); her number now belongs to another cooperative's new member (English)."""
    aline = demo["members"][ALINE]
    old = await make_payment(rt, demo["cooperative_id"], account=ALINE, member_id=aline)
    await _suspend(rt, aline)
    await _other_coop_member(rt, ALINE)
    await inbound(sms_client, ALINE, "HELP", "rec-1")
    await drain(worker)
    await inbound(sms_client, ALINE, f"STATUS {old.reference}", "rec-2")
    await drain(worker)
    await inbound(sms_client, ALINE, f"RECEIPT {old.reference}", "rec-3")
    await drain(worker)
    help_reply, status_reply, receipt_reply = [m["message"] for m in sim.messages(ALINE)]
    # English, and the new holder's cooperative's code (*384*123*77#), not Kigali Heights' in Kinyarwanda.
    assert help_reply == render("help", "en", {"dial": "*384*123*77#"})
    for reply in (status_reply, receipt_reply):
        assert reply == render("not_found", "en", {"ref": old.reference})


async def test_released_number_registered_again_does_not_read_the_old_members_payments(
    rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any, worker: Any
) -> None:
    aline = demo["members"][ALINE]
    old = await make_payment(rt, demo["cooperative_id"], account=ALINE, member_id=aline)
    await _suspend(rt, aline, release=True)
    async with rt.sessionmaker.begin() as s:
        holder = await create_member(s, rt.cipher, cooperative_id=demo["cooperative_id"], name="New Holder",
                                     phone=normalize(ALINE), language="en", actor=SYSTEM)
    mine = await make_payment(rt, demo["cooperative_id"], account=ALINE, member_id=holder.id,
                              reference="PAY_20260115_000777")
    await inbound(sms_client, ALINE, f"STATUS {old.reference}", "rel-1")
    await drain(worker)
    await inbound(sms_client, ALINE, f"RECEIPT {mine.reference}", "rel-2")
    await drain(worker)
    theirs, own = [m["message"] for m in sim.messages(ALINE)]
    assert theirs == render("not_found", "en", {"ref": old.reference})
    assert own.startswith("We received") and mine.reference in own  # the new holder's own, in English


async def test_welcome_not_sent_to_a_member_suspended_before_it_left(
    rt: Any, demo: dict[str, Any], sim: Any, worker: Any
) -> None:
    async with rt.sessionmaker.begin() as s:
        made = await create_member(s, rt.cipher, cooperative_id=demo["cooperative_id"], name="Pending Person",
                                   phone=normalize("+250788555111"), status="PENDING", actor=SYSTEM)
    async with rt.sessionmaker.begin() as s:
        await approve_member(s, await s.get(Member, made.id), actor=SYSTEM, cipher=rt.cipher)
    await _suspend(rt, made.id)  # the wrong person: removed at once, before the worker's turn
    await drain(worker)
    assert sim.messages("+250788555111") == []
    async with rt.sessionmaker() as s:
        stored = (await s.execute(select(SmsMessage).where(SmsMessage.member_id == made.id))).scalars().all()
    assert stored == []


async def test_welcome_sent_to_a_member_still_active(rt: Any, demo: dict[str, Any], sim: Any, worker: Any) -> None:
    async with rt.sessionmaker.begin() as s:
        made = await create_member(s, rt.cipher, cooperative_id=demo["cooperative_id"], name="Pending Person",
                                   phone=normalize("+250788555111"), status="PENDING", actor=SYSTEM)
    async with rt.sessionmaker.begin() as s:
        await approve_member(s, await s.get(Member, made.id), actor=SYSTEM, cipher=rt.cipher)
    await drain(worker)
    [welcome] = sim.messages("+250788555111")
    assert welcome["message"].startswith("Welcome! You are now a member")


async def test_message_to_a_member_whose_number_was_released_is_not_sent(
    rt: Any, demo: dict[str, Any], sim: Any, worker: Any
) -> None:
    from core.notify import send_sms
    from tests.channels.sms.helpers import jobs_of

    aline = demo["members"][ALINE]
    payment = await make_payment(rt, demo["cooperative_id"], account=ALINE, member_id=aline)
    async with rt.sessionmaker.begin() as s:
        await send_sms(s, template="payment_receipt", cooperative_id=demo["cooperative_id"],
                       context={"payment_id": payment.id}, cipher=rt.cipher, member_id=aline, dedupe="to-released")
    await _suspend(rt, aline, release=True)
    await drain(worker)
    assert sim.messages(ALINE) == []
    [job] = await jobs_of(rt, "sms.send")
    assert job.status == "DONE"  # ended, not parked as a fault


PAYER = "+250788000004"  # no member anywhere: pays for no one (an API payment)
FRIEND = "+250788000005"  # no member either: pays for Aline from her wallet


async def test_the_number_that_paid_is_answered_about_it_for_a_while_only(
    rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any, worker: Any
) -> None:
    """A payment for no member is asked about by the number that paid; once SMS_PAYER_ANSWER_DAYS (90) have
    passed the number may be someone else's (references are a date and a counter: easily guessed)."""
    now = utcnow()
    recent = await make_payment(rt, demo["cooperative_id"], account=PAYER, created_at=now - timedelta(days=89))
    old = await make_payment(rt, demo["cooperative_id"], account=PAYER, created_at=now - timedelta(days=91))
    await inbound(sms_client, PAYER, f"RECEIPT {recent.reference}", "payer-1")
    await drain(worker)
    await inbound(sms_client, PAYER, f"STATUS {old.reference}", "payer-2")
    await drain(worker)
    await inbound(sms_client, PAYER, f"RECEIPT {old.reference}", "payer-3")
    await drain(worker)
    receipt, *refused = [m["message"] for m in sim.messages(PAYER)]
    assert recent.reference in receipt and "MTN-TX-778899" in receipt
    assert refused == [render("not_found", "en", {"ref": old.reference})] * 2


async def test_a_members_own_number_is_answered_about_her_old_payments_but_not_another_payer(
    rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any, worker: Any
) -> None:
    """Aline's payment of last year, paid from a friend's wallet: Aline (an active member, her number hers) may ask;
    a friend's number, a payer only, may no longer."""
    aline = demo["members"][ALINE]
    paid = await make_payment(rt, demo["cooperative_id"], account=FRIEND, member_id=aline,
                              created_at=utcnow() - timedelta(days=200))
    await inbound(sms_client, ALINE, f"RECEIPT {paid.reference}", "own-1")
    await drain(worker)
    await inbound(sms_client, FRIEND, f"RECEIPT {paid.reference}", "own-2")
    await drain(worker)
    [to_aline] = sim.messages(ALINE)
    [to_friend] = sim.messages(FRIEND)
    assert paid.reference in to_aline["message"] and "MTN-TX-778899" in to_aline["message"]
    assert to_friend["message"] == render("not_found", "en", {"ref": paid.reference})


async def test_zero_days_answers_the_number_that_paid_always(
    rt: Any, demo: dict[str, Any], aiohttp_client: Any, sim: Any
) -> None:
    from app import create_worker

    always = dataclasses.replace(rt, settings=dataclasses.replace(rt.settings, sms_payer_answer_days=0))
    client = await aiohttp_client(gateway_app(always, always.settings))
    old = await make_payment(rt, demo["cooperative_id"], account=PAYER, created_at=utcnow() - timedelta(days=900))
    await inbound(client, PAYER, f"RECEIPT {old.reference}", "always-1")
    await drain(create_worker(always))  # its worker's too: the reply is judged again when sent (channels.sms.jobs)
    [reply] = sim.messages(PAYER)
    assert old.reference in reply["message"] and "MTN-TX-778899" in reply["message"]
