"""A session that confirmed Monthly Rent (50,000 RWF) is lost from Redis, the cooperative reprices the type
(60,000), and the member comes to Confirm again: her first payment, whose PIN prompt is on her phone, is the
answer, never a second payment of the same rent.

1. The same session (its id, so its idempotency key): Africa's Talking retries the Confirm hop whose answer was
   lost, the session is gone, and she walks Pay, Monthly Rent, Confirm again, now shown 60,000 with a reference
   reserved anew. The key's payment is this session's (made since records.previous_before): she was told "Sorry, we
   could not complete your request. Please try again later." while the 50,000 prompt waited, and trying again in a
   new session paid the 60,000 beside it. A previous session's payment under a reused id is not hers to be shown:
   that one is keyed anew (tests/channels/ussd/test_hubtel_nalo_certification.py). Nor is one that closed (declined;
   or paid, and 10,000 of the new price left to pay) or of another type: a request of its own, refused as before.
2. A later session resumes the route the lost END left, which keeps the reserved reference: she goes Back and picks
   Monthly Rent again at 60,000 under that reference. The reference is taken by her first payment: it is shown."""

from __future__ import annotations

from typing import Any

from sqlalchemy import update

from channels.ussd import cache, sessions
from core.models import OutboxJob, Payment, PaymentType, UssdSession
from core.phone import normalize
from tests.channels.ussd.helpers import AtPhone
from tests.channels.ussd.test_flows_africastalking import EN_MTN, option, reference_on


async def _reprice(rt: Any, demo: dict[str, Any], amount_minor: int) -> None:
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(PaymentType).where(PaymentType.name == "Monthly Rent",
                                                  PaymentType.cooperative_id == demo["cooperative_id"])
                        .values(amount_minor=amount_minor))
    cache.of(rt).types.clear()  # what its TTL_SECONDS does before she walks again


async def _rent_confirmed(client: Any, rt: Any, *, end_lost: bool = False) -> tuple[AtPhone, str]:
    """Monthly Rent confirmed (50,000 RWF, PENDING); `end_lost`: the END's DEL of the phone's resume route was lost,
    which still holds the confirmation with its reserved reference. Returns the phone and the reference."""
    phone = AtPhone(client, EN_MTN)
    await phone.dial()
    types = await phone.send("1")
    confirm = await phone.send(option(types, "Monthly Rent"))
    assert "Amount: 50,000 RWF" in confirm, confirm
    route_key = sessions.resume_key(rt.cipher, normalize(EN_MTN))
    route = await rt.redis.get(route_key)
    assert route is not None
    done = await phone.send("1")
    assert done == f"END Approve the prompt on your phone to pay 50,000 RWF. Ref {reference_on(confirm)}"
    if end_lost:
        await rt.redis.set(route_key, route, ex=sessions.RESUME_TTL)
    return phone, reference_on(confirm)


async def test_the_same_session_lost_and_confirmed_again_at_a_new_price_is_answered_by_its_payment(
        client: Any, demo: Any, db: Any, rt: Any) -> None:
    phone, first_ref = await _rent_confirmed(client, rt)
    first = await db.one(Payment)
    await _reprice(rt, demo, 60_000)
    await rt.redis.flushdb()

    home = await phone.resend()  # the Confirm hop again, on the lost session: its keys consumed
    assert home.startswith("CON Welcome to Kigali Heights Housing Cooperative"), home
    types = await phone.send(option(home, "Pay"))
    confirm = await phone.send(option(types, "Monthly Rent"))
    assert "Amount: 60,000 RWF" in confirm and reference_on(confirm) != first_ref, confirm
    assert await phone.send("1") == f"END Approve the prompt on your phone to pay 50,000 RWF. Ref {first_ref}"

    assert [(p.id, p.amount_minor) for p in await db.all(Payment)] == [(first.id, 50_000)]
    assert await db.count(OutboxJob, OutboxJob.kind == "payment.collect") == 1
    assert (await db.one(UssdSession, UssdSession.session_id == phone.session_id)).payment_id == first.id


async def test_a_resumed_reservation_confirmed_at_a_new_price_is_answered_by_its_payment(
        client: Any, demo: Any, db: Any, rt: Any) -> None:
    _phone, first_ref = await _rent_confirmed(client, rt, end_lost=True)
    first = await db.one(Payment)
    await _reprice(rt, demo, 60_000)

    again = AtPhone(client, EN_MTN)
    assert (await again.dial()).startswith("CON You did not finish your last session.")
    resumed = await again.send("1")  # the confirmation, as left: 50,000 under the reserved reference
    assert "Amount: 50,000 RWF" in resumed and reference_on(resumed) == first_ref, resumed
    types = await again.send("0")  # Back
    confirm = await again.send(option(types, "Monthly Rent"))  # 60,000 now; the reservation travels with her
    assert "Amount: 60,000 RWF" in confirm and reference_on(confirm) == first_ref, confirm
    assert await again.send("1") == f"END Approve the prompt on your phone to pay 50,000 RWF. Ref {first_ref}"

    assert [(p.id, p.amount_minor) for p in await db.all(Payment)] == [(first.id, 50_000)]
    assert await db.count(OutboxJob, OutboxJob.kind == "payment.collect") == 1
    assert (await db.one(UssdSession, UssdSession.session_id == again.session_id)).payment_id == first.id
