"""A member the provider took less of than a fixed-amount recurring type's price is reminded of the balance of the
period ("balance 20,000 RWF of 50,000 RWF"), not of the whole price: paying that again overpaid."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import update

from channels.sms.encoding import GSM7, measure
from core.models import Member
from tests.channels.sms.helpers import start_simulator
from tests.conftest import drain
from tests.core.test_reminders_review3 import ALINE, _payment, _scan, _texts, sender  # noqa: F401

BALANCE_SAID = {"en": "Reminder: Monthly Rent (balance 20,000 RWF of 50,000 RWF) for ",
                "rw": "Kwibutsa: kwishyura Monthly Rent (asigaye 20,000 RWF kuri 50,000 RWF) muri ",
                "fr": "Rappel : Monthly Rent (reste 20 000 RWF sur 50 000 RWF) pour ",
                "sw": "Kumbusho: malipo ya Monthly Rent (salio 20,000 RWF kati ya 50,000 RWF) kwa "}


@pytest.mark.parametrize("language", sorted(BALANCE_SAID))
async def test_an_underpaid_period_is_reminded_of_its_balance(rt: Any, demo: dict[str, Any], sender: Any,  # noqa: F811
                                                              aiohttp_server: Any, language: str) -> None:
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Member).where(Member.id == demo["members"][ALINE]).values(language=language))
    await _payment(rt, demo, ALINE, collected_minor=30_000, mismatch=True)  # 30,000 of 50,000 taken
    # 20,000 of 50,000 refunded: 30,000 kept too.
    await _payment(rt, demo, "+250788000002", status="PARTIALLY_REFUNDED", refunded_minor=20_000)
    assert await _scan(rt) == 5
    _server, sim = await start_simulator(aiohttp_server, rt)
    await drain(sender)
    rent = [text for text in _texts(sim, ALINE) if "Monthly Rent" in text]
    assert len(rent) == 1 and rent[0].startswith(BALANCE_SAID[language]), rent
    # One SMS to each member reminded: in Kinyarwanda and Swahili the cooperative's name took it to two (167 and
    # 165 characters); its short code then, as the refund and dispute texts.
    assert (measure(rent[0]).encoding, measure(rent[0]).segments) == (GSM7, 1), rent[0]
    assert ("KHHC" in rent[0]) is (language in ("rw", "sw")), rent[0]
    refunded = [text for text in _texts(sim, "+250788000002") if "Monthly Rent" in text]
    assert refunded and "(balance 20,000 RWF of 50,000 RWF)" in refunded[0], refunded


async def test_a_period_nothing_was_kept_of_is_reminded_of_the_price(rt: Any, demo: dict[str, Any], sender: Any,  # noqa: F811
                                                                     aiohttp_server: Any) -> None:
    # Taken in another currency (collected 0): nothing kept, the whole price is owed, said as before.
    await _payment(rt, demo, "+250788000002", collected_minor=0, mismatch=True)
    assert await _scan(rt) == 5
    _server, sim = await start_simulator(aiohttp_server, rt)
    await drain(sender)
    rent = [text for text in _texts(sim, "+250788000002") if "Monthly Rent" in text]
    assert rent and rent[0].startswith("Reminder: Monthly Rent (50,000 RWF) for "), rent
