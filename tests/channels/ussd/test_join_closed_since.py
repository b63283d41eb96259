"""A number that is no member, left at the name prompt of a cooperative that was then suspended or stopped
registering members by phone: Continue ("where you left off") showed the prompt again and her name was taken in
as a PENDING member (create_member checks neither). She is now told what typing its code would tell her, at once on
Continue, and on the name typed in a session still open at the prompt. On PostgreSQL and the embedded SQLite."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from channels.ussd import cache
from core.models import Cooperative, Member, UssdSession
from tests.channels.ussd.helpers import AtPhone
from tests.channels.ussd.test_flows_africastalking import STRANGER, option
from tests.conftest import behind_a_lock

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


async def _continued_is_told(client: Any, db: Any, members: int, screen: str, told: str) -> None:
    """She dials again and takes Continue: told `told` at once (the session's last screen `screen`), no member made."""
    again = AtPhone(client, STRANGER)
    offer = await again.dial()
    assert offer.startswith("CON You did not finish your last session."), offer
    assert await again.send(option(offer, "Continue where you left off")) == told
    assert await db.count(Member) == members
    [row] = await db.all(UssdSession, UssdSession.session_id == again.session_id)
    assert row.last_screen == screen


@pytest.mark.parametrize("since", sorted(SINCE))
async def test_a_session_continued_at_the_name_prompt_is_told_at_once(client: Any, demo: dict[str, Any], db: Any,
                                                                      rt: Any, since: str) -> None:
    change, screen, told = SINCE[since]
    members = await db.count(Member)
    await _at_the_name_prompt(client)  # then the network drops her session there
    await _changed(rt, demo, change)
    await _continued_is_told(client, db, members, screen, told)


@pytest.mark.parametrize("since", sorted(SINCE))
async def test_a_name_typed_at_a_prompt_shown_before_is_refused(client: Any, demo: dict[str, Any], db: Any,
                                                                rt: Any, since: str) -> None:
    change, _, told = SINCE[since]
    members = await db.count(Member)
    phone = await _at_the_name_prompt(client)
    await _changed(rt, demo, change)
    assert await phone.send("Alice Mukamana") == told
    assert await db.count(Member) == members


async def _changed_within_the_cache(rt: Any, demo: dict[str, Any], change: dict[str, Any]) -> None:
    """The change written while this process's copy of the cooperative (cache.TTL_SECONDS, 5 s) still says it is
    ACTIVE and registering by phone: a Continue or a name a second after the office's suspension."""
    coop_id = demo["cooperative_id"]
    cached = cache.of(rt).coops.get(coop_id)
    if cached is cache.MISSING:  # as the name prompt's hops leave it (each session reads it through the cache)
        from channels.ussd import flows

        async with cache.autocommit(rt) as conn:
            row = (await conn.execute(flows._COOP_BY_ID, {"coop_id": coop_id})).first()
        cache.of(rt).coops.put(coop_id, flows._coop_row(row))
    assert cache.of(rt).coops.get(coop_id).status == "ACTIVE"
    async with rt.sessionmaker.begin() as s:
        coop = await s.get(Cooperative, coop_id)
        for key, value in change.items():
            setattr(coop, key, value)
    assert cache.of(rt).coops.get(coop_id) is not cache.MISSING  # the stale copy is still there


@pytest.mark.parametrize("since", sorted(SINCE))
async def test_a_session_continued_right_after_the_change_is_told_at_once(client: Any, demo: dict[str, Any],
                                                                          db: Any, rt: Any, since: str) -> None:
    """Resumed within the cache's life: the cooperative is read from the database on Continue, not the copy that
    still says ACTIVE (the prompt was shown again, and her name then taken in, for up to 5 s after a suspension)."""
    change, screen, told = SINCE[since]
    members = await db.count(Member)
    await _at_the_name_prompt(client)
    await _changed_within_the_cache(rt, demo, change)
    await _continued_is_told(client, db, members, screen, told)


@pytest.mark.parametrize("since", sorted(SINCE))
async def test_a_name_typed_right_after_the_change_is_refused(client: Any, demo: dict[str, Any], db: Any, rt: Any,
                                                              since: str) -> None:
    """The name typed within the cache's life: the cooperative read again where her membership would be created."""
    change, _, told = SINCE[since]
    members = await db.count(Member)
    phone = await _at_the_name_prompt(client)
    await _changed_within_the_cache(rt, demo, change)
    assert await phone.send("Alice Mukamana") == told
    assert await db.count(Member) == members


async def test_a_name_typed_while_a_suspension_is_being_written_waits_for_it(client: Any, demo: dict[str, Any],
                                                                             db: Any, rt: Any) -> None:
    """The suspension holding the cooperative's row (core.cooperatives.hold, as the office's PATCH does), not yet
    committed: the name's hop reads the row FOR SHARE (SQLite: the write lock), waits for it, and reads SUSPENDED.
    Read without the lock, it read ACTIVE and took her in PENDING beside the suspension."""
    from core.cooperatives import hold

    members = await db.count(Member)
    phone = await _at_the_name_prompt(client)
    async with rt.sessionmaker.begin() as s:
        coop = await hold(s, demo["cooperative_id"])
        coop.status = "SUSPENDED"
        await s.flush()
        name = asyncio.create_task(phone.send("Alice Mukamana"))
        await behind_a_lock(rt, name)
        assert not name.done()
    assert await name == SINCE["suspended"][2]
    assert await db.count(Member) == members
