"""A member who dials again while her payment is still open is not charged twice (finding by an outage reviewer).

MTN MoMo answered 503 to request-to-pay: the member confirmed Monthly Rent, no PIN prompt came (the collect job
was retrying), so she dialled again 8 s later and confirmed it again. When MTN recovered both collect jobs went
out and both payments completed: 100,000 RWF for one month's rent. A confirmation now makes no payment while the
same payer has an open one of the same type and amount in the cooperative that can still be approved; it tells
her which payment waits, not to pay again, and that an SMS comes if it cannot be completed.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta
from typing import Any

from sqlalchemy import update

from channels.ussd import sessions
from core.audit import Actor
from core.db import utcnow
from core.models import OutboxJob, Payment, UssdSession
from core.money import Money
from core.ports import ProviderOutcome
from tests.channels.ussd.helpers import AtPhone
from tests.channels.ussd.test_flows_africastalking import EN_MTN, RW_MTN, option, reference_on
from tests.channels.ussd.test_resume_closed_payment import _outcome
from tests.conftest import sql_sent

WAITING_EN = ("END Payment {ref} of {amount} for {type} awaits your approval on your phone or mobile money. "
              "Do not pay again. If it is not completed, you will get an SMS.")


async def pay(client: Any, number: str, type_name: str = "Monthly Rent") -> tuple[AtPhone, str, str]:
    """Dial, Pay, the type, Confirm: the phone, the confirmation screen and the END screen."""
    phone = AtPhone(client, number)
    await phone.dial()
    types = await phone.send("1")
    confirm = await phone.send(option(types, type_name))
    assert confirm.startswith("CON "), confirm
    return phone, confirm, await phone.send("1")


async def collect_jobs(db: Any) -> int:
    return int(await db.count(OutboxJob, OutboxJob.kind == "payment.collect"))


async def test_dialling_again_while_the_payment_is_open_makes_no_second_payment(
        client: Any, demo: Any, db: Any) -> None:
    _first, _confirm, done = await pay(client, EN_MTN)
    first_ref = reference_on(done)
    assert done == f"END Approve the prompt on your phone to pay 50,000 RWF. Ref {first_ref}"

    second, confirm, refused = await pay(client, EN_MTN)
    assert refused == WAITING_EN.format(ref=first_ref, amount="50,000 RWF", type="Monthly Rent")
    assert reference_on(confirm) != first_ref  # the confirmation had reserved one of its own, unused
    payment = await db.one(Payment)  # the only one
    assert (payment.reference, payment.status, payment.member_id) == (first_ref, "PENDING", demo["members"][EN_MTN])
    assert await collect_jobs(db) == 1  # no second PIN prompt (no second collection once the provider is back)
    row = await db.one(UssdSession, UssdSession.session_id == second.session_id)
    assert (row.last_screen, row.payment_id) == ("pay_waiting", None)
    # The aggregator retrying that hop gets the same answer, and still nothing is made.
    assert await second.resend() == refused
    assert await db.count(Payment) == 1


async def test_the_answer_is_in_her_language(client: Any, demo: Any, db: Any) -> None:
    _phone, _confirm, done = await pay(client, RW_MTN)
    first_ref = reference_on(done)
    _again, _confirm, refused = await pay(client, RW_MTN)
    assert refused == (f"END Kwishyura 50,000 RWF ya Monthly Rent (Ref {first_ref}) biracyategereje ko ubyemeza "
                       "kuri telefoni yawe cyangwa mobile money. Ntukongere kwishyura. Nibidakunda, uzabona SMS.")
    assert await db.count(Payment) == 1


async def test_the_check_is_in_the_confirmations_one_read(client: Any, demo: Any, db: Any, rt: Any) -> None:
    """Refused or not, the confirmation reads the cooperative, type, member and her open payments in one query."""
    await pay(client, EN_MTN)
    phone = AtPhone(client, EN_MTN)
    await phone.dial()
    types = await phone.send("1")
    await phone.send(option(types, "Monthly Rent"))
    with sql_sent(rt, lambda q: " ".join(q.split())) as sent:
        refused = await phone.send("1")
    assert refused.startswith("END Payment PAY_"), refused
    reads = [q for q in sent if "FROM cooperatives" in q]
    assert len(reads) == 1 and "FROM payments" in reads[0], sent
    assert not [q for q in sent if q.startswith(("INSERT INTO payments", "WITH"))], sent


async def test_a_confirmation_replayed_by_its_own_session_still_finds_its_own_payment(
        client: Any, demo: Any, db: Any, rt: Any) -> None:
    """Idempotency by the session's key comes first: the session's own open payment is its answer, not a refusal
    (here after Redis lost the answer and the confirmation's reserved reference, as Africa's Talking's replayed
    text does)."""
    phone = AtPhone(client, EN_MTN)
    await phone.dial()
    types = await phone.send("1")
    await phone.send(option(types, "Monthly Rent"))
    stored = await sessions.load(rt.redis, "africastalking", phone.session_id)
    assert stored is not None
    done = await phone.send("1")
    stored.seen = None
    stored.state.data.pop("rr", None)  # the reservation lost too: the replay reserves none of its own
    await sessions.save(rt.redis, "africastalking", phone.session_id, stored)
    assert await phone.resend() == done
    assert done.startswith("END Approve the prompt on your phone to pay 50,000 RWF.")
    assert await db.count(Payment) == 1 and await collect_jobs(db) == 1


async def test_a_closed_payment_does_not_stop_her_paying(client: Any, demo: Any, db: Any, rt: Any) -> None:
    """She declined the prompt (FAILED): paying again makes a new payment and its prompt."""
    _phone, _confirm, done = await pay(client, EN_MTN)
    await _outcome(rt, reference_on(done), ProviderOutcome.FAILED)
    _again, confirm, second = await pay(client, EN_MTN)
    assert second == f"END Approve the prompt on your phone to pay 50,000 RWF. Ref {reference_on(confirm)}"
    assert await db.count(Payment) == 2 and await collect_jobs(db) == 2


async def test_a_payment_past_its_approval_window_does_not_stop_her_paying(
        client: Any, demo: Any, db: Any, rt: Any) -> None:
    """Still PENDING (the polls have not given it up yet) but its prompt can no longer be approved."""
    _phone, _confirm, done = await pay(client, EN_MTN)
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Payment).where(Payment.reference == reference_on(done))
                        .values(expires_at=utcnow() - timedelta(seconds=1)))
    _again, confirm, second = await pay(client, EN_MTN)
    assert second == f"END Approve the prompt on your phone to pay 50,000 RWF. Ref {reference_on(confirm)}"
    assert await db.count(Payment) == 2


async def test_a_request_the_provider_took_late_stops_her_until_its_prompt_is_over(
        client: Any, demo: Any, db: Any, rt: Any) -> None:
    """MTN was down; the collect's retry was taken just before the window's end (PROCESSING): her prompt lives on
    after the window, and the polls wait PAYMENT_PENDING_GRACE_SECONDS for her. Dialling again 30 s after the
    window, no prompt seen yet, she is told it waits, not given a second payment (two prompts, two rents). Past
    that grace she pays again."""
    _phone, _confirm, done = await pay(client, EN_MTN)
    first = reference_on(done)
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Payment).where(Payment.reference == first)
                        .values(status="PROCESSING", expires_at=utcnow() - timedelta(seconds=30)))
    _again, _confirm, second = await pay(client, EN_MTN)
    assert second.startswith(f"END Payment {first} of 50,000 RWF for Monthly Rent awaits your approval"), second
    assert await db.count(Payment) == 1
    grace = rt.settings.payment_pending_grace_seconds
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Payment).where(Payment.reference == first)
                        .values(expires_at=utcnow() - timedelta(seconds=grace + 1)))
    _later, confirm, third = await pay(client, EN_MTN)
    assert third == f"END Approve the prompt on your phone to pay 50,000 RWF. Ref {reference_on(confirm)}"
    assert await db.count(Payment) == 2


async def test_another_type_another_amount_or_another_member_is_not_stopped(
        client: Any, demo: Any, db: Any, rt: Any) -> None:
    _phone, _confirm, rent = await pay(client, EN_MTN)
    _water, _confirm, water = await pay(client, EN_MTN, "Water")  # another type
    assert water.startswith("END Approve the prompt on your phone to pay 5,000 RWF."), water
    _other, _confirm, other = await pay(client, RW_MTN)  # another member, the same type
    assert other.startswith("END Emeza ubutumwa"), other
    assert await db.count(Payment) == 3
    # The open rent payment was for another amount (an admin's): hers of 50,000 RWF is not its double.
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Payment).where(Payment.reference == reference_on(rent)).values(amount_minor=20_000))
    _again, confirm, again = await pay(client, EN_MTN)
    assert again == f"END Approve the prompt on your phone to pay 50,000 RWF. Ref {reference_on(confirm)}"
    assert await db.count(Payment) == 4


async def test_an_api_payment_is_not_refused(client: Any, demo: Any, db: Any, rt: Any) -> None:
    """The admin API (and a cooperative's system) may create two: its Idempotency-Key is its guard, unchanged."""
    from core.payments import NewPayment, create_payment

    _phone, _confirm, done = await pay(client, EN_MTN)
    async with rt.sessionmaker.begin() as s:
        made, created = await create_payment(s, rt, NewPayment(
            cooperative_id=demo["cooperative_id"], payment_type_id=demo["payment_types"]["Monthly Rent"],
            method="MOBILE_MONEY_MTN", account=EN_MTN, idempotency_key="coop-system-0001", channel="api",
            amount=Money(50_000, "RWF"), member_id=demo["members"][EN_MTN]), actor=Actor("user:test", "api"))
    assert created and made.reference != reference_on(done)
    assert await db.count(Payment) == 2


async def test_an_open_api_payment_stops_a_ussd_one(client: Any, demo: Any, db: Any, rt: Any) -> None:
    """Her cooperative's system asked for this month's rent (its prompt is on her phone): Pay on USSD points to it."""
    from core.payments import NewPayment, create_payment

    async with rt.sessionmaker.begin() as s:
        made, _created = await create_payment(s, rt, NewPayment(
            cooperative_id=demo["cooperative_id"], payment_type_id=demo["payment_types"]["Monthly Rent"],
            method="MOBILE_MONEY_MTN", account=EN_MTN, idempotency_key="coop-system-0002", channel="api",
            member_from_account=True), actor=Actor("user:test", "api"))
        reference = made.reference
    assert made.member_id == demo["members"][EN_MTN]
    _phone, _confirm, refused = await pay(client, EN_MTN)
    assert refused == WAITING_EN.format(ref=reference, amount="50,000 RWF", type="Monthly Rent")
    assert await db.count(Payment) == 1




async def test_two_confirmations_at_the_same_moment_make_one_payment(client: Any, demo: Any, db: Any,
                                                                     monkeypatch: Any) -> None:
    """Two sessions of one member confirm the same type at once (her husband paying for her from his phone while
    she pays from hers, or she dialled again while her first confirmation was still being answered; each hop on its
    own serve process): the open-payment check and the insert took no turns, both found nothing open and both made
    a payment, two PIN prompts for one rent. Now the second waits for the first and is told its payment awaits her."""
    import core.payments

    create = core.payments.create_payment
    arrived: list[int] = []
    both = asyncio.Event()

    async def after_the_check(*args: Any, **kwargs: Any) -> Any:
        # Each confirmation that found nothing open waits (a second at most) for the other to have checked too: the
        # moment the two were both past the check. One kept waiting at its turn never gets here.
        arrived.append(1)
        if len(arrived) == 2:
            both.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(both.wait(), 1.0)
        return await create(*args, **kwargs)

    monkeypatch.setattr(core.payments, "create_payment", after_the_check)
    phones = [AtPhone(client, EN_MTN), AtPhone(client, EN_MTN)]
    for phone in phones:  # (side by side: a session opened after the other one went quiet would offer to resume it)
        assert (await phone.dial()).startswith("CON Welcome")
    for types in [await phone.send("1") for phone in phones]:
        assert "Monthly Rent" in types, types
    for phone in phones:
        assert (await phone.send(option(types, "Monthly Rent"))).startswith("CON Pay Monthly Rent")
    answers = await asyncio.gather(*(phone.send("1") for phone in phones))
    payment = await db.one(Payment)  # the only one
    assert sorted(answers) == sorted([
        f"END Approve the prompt on your phone to pay 50,000 RWF. Ref {payment.reference}",
        WAITING_EN.format(ref=payment.reference, amount="50,000 RWF", type="Monthly Rent")]), answers
    assert await collect_jobs(db) == 1
