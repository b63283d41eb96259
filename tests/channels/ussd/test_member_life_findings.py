"""A member's life in her cooperative, walked through POST /ussd/africastalking and the admin API (h4's findings):

- A member suspended while she was on a confirmation, with a payment of the same type and amount still open, was
  told "PAY_... awaits your approval on your phone ... do not pay twice, an SMS follows if it fails": the open
  payment's collect job finds her suspended and sends no prompt. She is told her membership is not active, as
  without an open payment.
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select, update

from channels.ussd.i18n import translate
from core.models import Member, Payment
from tests.channels.ussd.helpers import AtPhone

MEMBERS = {"en": "+250788000002", "fr": "+250733000001"}
COOP = "Kigali Heights Housing Cooperative"  # the demo's


async def _to_confirmation(client: Any, phone: str) -> AtPhone:
    member = AtPhone(client, phone)
    await member.dial()
    await member.send("1")  # Pay
    confirm = await member.send("1")  # the first type: its confirmation
    assert "PAY_" in confirm and confirm.startswith("CON "), confirm
    return member


@pytest.mark.parametrize("lang", MEMBERS)
async def test_a_member_suspended_with_a_payment_still_open_is_told_her_membership_is_not_active(
        client: Any, demo: Any, rt: Any, db: Any, lang: str) -> None:
    phone = MEMBERS[lang]
    first = await _to_confirmation(client, phone)
    paid = await first.send("1")  # Confirm: PENDING, its prompt on her phone
    assert paid.startswith("END ") and await db.count(Payment) == 1, paid
    again = await _to_confirmation(client, phone)  # the same type and amount, in a new session
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Member).where(Member.id == demo["members"][phone]).values(status="SUSPENDED"))
    refused = await again.send("1")
    assert refused == "END " + translate(lang, "member.inactive", coop=COOP), refused
    assert await db.count(Payment) == 1


@pytest.mark.parametrize("lang", MEMBERS)
@pytest.mark.parametrize(("change", "screen"), [
    ({"is_active": False}, "pay.type_gone"),  # closed by the cooperative while she was on its confirmation
    ({"amount_minor": 60_000}, "pay.type_changed"),  # repriced meanwhile: the 50,000 shown is refused
])
async def test_a_type_closed_or_repriced_during_her_confirmation_is_told_so_and_nothing_is_charged(
        client: Any, demo: Any, rt: Any, db: Any, lang: str, change: dict[str, Any], screen: str) -> None:
    """She was told "Sorry, we could not complete your request. Please try again later.": trying again is refused the
    same way (a closed type), or pays what she was not shown. She is told what changed, that nothing was charged."""
    from core.models import PaymentType

    phone = MEMBERS[lang]
    member = await _to_confirmation(client, phone)  # Monthly Rent, 50,000 RWF
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(PaymentType).where(PaymentType.name == "Monthly Rent",
                                                  PaymentType.cooperative_id == demo["cooperative_id"])
                        .values(**change))
    refused = await member.send("1")  # Confirm
    assert refused == "END " + translate(lang, screen, type="Monthly Rent", coop=COOP), refused
    assert await db.count(Payment) == 0
    if "amount_minor" in change:  # dialling again shows the new price, and pays it
        from channels.ussd import cache

        cache.of(rt).types.clear()  # what its TTL_SECONDS (5 s) does before she has dialled again
        again = AtPhone(client, phone)
        await again.dial()
        await again.send("1")  # Pay
        confirm = await again.send("1")
        assert "60,000 RWF" in confirm or "60 000 RWF" in confirm, confirm
        assert (await again.send("1")).startswith("END ")
        async with rt.sessionmaker() as s:
            [paid] = (await s.execute(select(Payment))).scalars().all()
        assert paid.amount_minor == 60_000
