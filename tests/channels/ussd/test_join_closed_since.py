"""A number that is no member, left at the name prompt of a cooperative that was then suspended or stopped
registering members by phone: Continue ("where you left off") showed the prompt again and her name was taken in
as a PENDING member (create_member checks neither). She is now told what typing its code would tell her, at once on
Continue, and on the name typed in a session still open at the prompt. On PostgreSQL and the embedded SQLite."""

from __future__ import annotations

from typing import Any

import pytest

from channels.ussd import cache
from core.models import Cooperative, Member, UssdSession
from tests.channels.ussd.helpers import AtPhone
from tests.channels.ussd.test_flows_africastalking import STRANGER, option

# What changed at the cooperative, and what its code typed now answers (code_entered).
SINCE = {
    "suspended": ({"status": "SUSPENDED"}, "reg_suspended",
                  "END This cooperative is not taking payments now. Please contact the cooperative office."),
    "closed to registration": ({"self_registration": False}, "reg_closed",
                               "END Kigali Heights Housing Cooperative does not register members by phone. "
                               "Please contact the cooperative office."),
}


async def _at_the_name_prompt(client: Any) -> AtPhone:
    phone = AtPhone(client, STRANGER)
    await phone.dial()
    await phone.send("1")  # Pay
    assert (await phone.send("KHHC")).startswith("CON Enter your full name to join Kigali Heights")
    return phone


async def _changed(rt: Any, demo: dict[str, Any], change: dict[str, Any]) -> None:
    async with rt.sessionmaker.begin() as s:
        coop = await s.get(Cooperative, demo["cooperative_id"])
        for key, value in change.items():
            setattr(coop, key, value)  # test set-up: what the office's PATCH or suspension writes
    cache.of(rt).coops.clear()  # what its TTL_SECONDS (5 s) does before she dials again


@pytest.mark.parametrize("since", sorted(SINCE))
async def test_a_session_continued_at_the_name_prompt_is_told_at_once(client: Any, demo: dict[str, Any], db: Any,
                                                                      rt: Any, since: str) -> None:
    change, screen, told = SINCE[since]
    members = await db.count(Member)
    await _at_the_name_prompt(client)  # then the network drops her session there
    await _changed(rt, demo, change)
    again = AtPhone(client, STRANGER)
    offer = await again.dial()
    assert offer.startswith("CON You did not finish your last session."), offer
    assert await again.send(option(offer, "Continue where you left off")) == told
    assert await db.count(Member) == members
    [row] = await db.all(UssdSession, UssdSession.session_id == again.session_id)
    assert row.last_screen == screen


@pytest.mark.parametrize("since", sorted(SINCE))
async def test_a_name_typed_at_a_prompt_shown_before_is_refused(client: Any, demo: dict[str, Any], db: Any,
                                                                rt: Any, since: str) -> None:
    change, _, told = SINCE[since]
    members = await db.count(Member)
    phone = await _at_the_name_prompt(client)
    await _changed(rt, demo, change)
    assert await phone.send("Alice Mukamana") == told
    assert await db.count(Member) == members
