"""Two copies of one USSD hop at once: the aggregator retries a hop still being answered, and the retry lands on
another serve process. Both step from the same session; the session is saved compare-and-set, so the copy that
saves second answers with what the first saved, never a screen the session does not hold."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from channels.ussd import sessions
from core.db import utcnow
from core.models import Payment
from core.ops import FUNNEL_ALL, funnel_field, funnel_key
from core.phone import normalize
from tests.channels.ussd.helpers import AtPhone
from tests.channels.ussd.test_flows_africastalking import EN_MTN, option, reference_on


async def another_serve_process(rt: Any, aiohttp_client: Any) -> Any:
    from app import create_app

    return await aiohttp_client(create_app(rt.settings, runtime=rt))


def first_save_waits(monkeypatch: Any, until: Callable[[], bool] | None = None) -> tuple[asyncio.Event,
                                                                                         asyncio.Event]:
    """The first session save of the hop waits (having read the session and stepped) until released: the
    other copy reads, steps and saves meanwhile. Returns (the first copy is waiting, release it)."""
    waiting, release = asyncio.Event(), asyncio.Event()
    real = sessions.save

    async def save(*args: Any, **kwargs: Any) -> Any:
        if not waiting.is_set():
            waiting.set()
            await asyncio.wait_for(release.wait(), 10)
        return await real(*args, **kwargs)

    monkeypatch.setattr(sessions, "save", save)
    return waiting, release


async def test_both_copies_of_the_type_hop_show_the_reference_the_payment_gets(
        client: Any, demo: Any, db: Any, rt: Any, aiohttp_client: Any, monkeypatch: Any, caplog: Any) -> None:
    """Each copy reserved a payment reference for the confirmation screen; the one saved last was the one the
    payment got, whichever screen the member had been shown."""
    phone = AtPhone(client, EN_MTN)
    await phone.dial()
    types = await phone.send("1")
    phone.inputs.append(option(types, "Monthly Rent"))
    retry = AtPhone(await another_serve_process(rt, aiohttp_client), EN_MTN, session_id=phone.session_id)
    retry.inputs = list(phone.inputs)
    hour = funnel_key(utcnow())
    counted = await rt.redis.hgetall(hour)

    waiting, release = first_save_waits(monkeypatch)
    first = asyncio.ensure_future(phone.dial())
    await waiting.wait()  # the first copy has read the session, reserved a reference, and not saved yet
    second = await retry.dial()  # the retry on the other process: reads, reserves another, saves
    release.set()
    first_screen = await first

    assert first_screen == second and reference_on(second) != ""
    assert "ussd hop answered twice at once; the first saved answer is given" in caplog.messages
    kept = await sessions.load(rt.redis, "africastalking", phone.session_id)
    assert kept is not None and kept.state.data["rr"] == reference_on(second)
    # The resume route (another key, written alongside) and the ops funnel were those of the winning copy too.
    route = await sessions.load_resume(rt.redis, rt.cipher, normalize(EN_MTN))
    assert route is not None and route.data["rr"] == reference_on(second)
    after = await rt.redis.hgetall(hour)
    added = {k: int(v) - int(counted.get(k, 0)) for k, v in after.items() if int(v) != int(counted.get(k, 0))}
    assert added and set(added.values()) == {1}, added  # the confirm step counted once, not twice

    done = await phone.send("1")
    payment = await db.one(Payment)
    assert done.startswith("END Approve the prompt") and payment.reference == reference_on(second)


async def test_two_copies_of_the_opening_hop_answer_alike(client: Any, demo: Any, rt: Any, aiohttp_client: Any,
                                                          monkeypatch: Any, caplog: Any) -> None:
    """The first hop: no session yet on either copy; the one saving second answers with the first's."""
    phone = AtPhone(client, EN_MTN)
    retry = AtPhone(await another_serve_process(rt, aiohttp_client), EN_MTN, session_id=phone.session_id)
    waiting, release = first_save_waits(monkeypatch)
    first = asyncio.ensure_future(phone.dial())
    await waiting.wait()
    second = await retry.dial()
    release.set()
    assert await first == second
    assert "ussd hop answered twice at once; the first saved answer is given" in caplog.messages
    assert (await phone.send("1")).startswith("CON ")  # and the session goes on from it


def _first_copys_row_fails(monkeypatch: Any, *, later_rows: bool = False) -> tuple[asyncio.Event, asyncio.Event]:
    """The opening hop's first copy saves the session (`saved` set once a save ran) and writes its row slowly: no row
    with the memberships (records.opened writes it beside the save), and that write waits for `answered`, then fails.
    `later_rows`: the row writes after that first one go through."""
    from channels.ussd import records

    saved, answered = asyncio.Event(), asyncio.Event()
    real_save, real_opened = sessions.save, records.opened
    calls = 0

    async def save(*args: Any, **kwargs: Any) -> Any:
        try:
            return await real_save(*args, **kwargs)
        finally:
            saved.set()

    async def apart(*_args: Any, **_kwargs: Any) -> None:
        return None  # no row written with the memberships: records.opened() writes it beside the save

    async def written_slowly_then_failed(*args: Any, **kwargs: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 1 or not later_rows:
            await asyncio.wait_for(answered.wait(), 10)
            raise ConnectionError("database went away")
        await real_opened(*args, **kwargs)

    monkeypatch.setattr(records, "opened_reading", apart)
    monkeypatch.setattr(records, "opened", written_slowly_then_failed)
    monkeypatch.setattr(sessions, "save", save)
    return saved, answered



@pytest.mark.parametrize("aggregator", ["hubtel", "nalo", "africastalking"])
async def test_a_copy_of_the_opening_hop_without_its_row_leaves_the_session_the_other_copy_answered_from(
        aggregator: str, client: Any, demo: Any, rt: Any, aiohttp_client: Any, monkeypatch: Any) -> None:
    """The aggregator sent the opening request twice, each copy to another serve process. The first saved the session
    and wrote its row slowly; the second read that session and answered its menu (a retry). The first's row write
    then failed: answered "unavailable", it took back the session it saved, the one the second copy's member goes on
    from, and her next key showed her the menu again. The second copy claims the session it answers from: the take-back
    leaves it (and the funnel's count of its menu), and her next key goes on from the menu."""
    from channels.ussd.routes import USSD
    from tests.channels.ussd.test_hubtel_nalo_flows import EN_MTN as GH_MTN
    from tests.channels.ussd.test_hubtel_nalo_flows import FR_AIRTEL, HubtelPhone, nalo

    saved, answered = _first_copys_row_fails(monkeypatch)
    other = await another_serve_process(rt, aiohttp_client)
    from tests.channels.ussd.test_abandoned_sessions import _added
    from tests.channels.ussd.test_sessions_counted_once import _counted

    session_id = f"{aggregator}-two-openings"
    counted = _counted(aggregator, "unavailable")
    hour = funnel_key(utcnow())
    home = int(await rt.redis.hget(hour, funnel_field(FUNNEL_ALL, "home")) or 0)

    async def opening(on: Any) -> str:
        if aggregator == "hubtel":
            return str((await HubtelPhone(on, GH_MTN, session_id).post("Initiation", "*384*123#"))["Message"])
        if aggregator == "nalo":
            return str((await nalo(on, session_id, "*384*123#", True))["MSG"])
        return await AtPhone(on, EN_MTN, session_id=session_id).dial()

    first = asyncio.ensure_future(opening(client))
    await asyncio.wait_for(saved.wait(), 10)  # the first copy saved the session; its row is being written
    second = await opening(other)
    answered.set()
    assert "unavailable" in await first and "unavailable" not in second
    await client.app[USSD].settled()
    kept = await sessions.load(rt.hot_redis, aggregator, session_id)
    assert kept is not None and kept.state.screen == "home"
    assert int(await rt.redis.hget(hour, funnel_field(FUNNEL_ALL, "home")) or 0) == home + 1
    # (Its close's write of the row failing too, the session is counted by that close: no row for its end to count.)
    assert _added(counted, _counted(aggregator, "unavailable")) == {"unavailable": 1}
    monkeypatch.undo()
    # Her next key, on the screen the second copy showed her: the payment types, not the menu again.
    if aggregator == "hubtel":
        phone = HubtelPhone(other, GH_MTN, session_id)
        phone.sequence = 1
        await phone.post("Response", "1")
    elif aggregator == "nalo":
        await nalo(other, session_id, "1", False, msisdn=FR_AIRTEL)
    else:
        retry = AtPhone(other, EN_MTN, session_id=session_id)
        await retry.send("1")
    went_on = await sessions.load(rt.hot_redis, aggregator, session_id)
    assert went_on is not None and went_on.state.screen != "home" and went_on.hops == 2


async def test_a_copy_of_the_opening_hop_that_lost_the_save_keeps_the_winners_session_from_its_take_back(
        rt: Any) -> None:
    """Both copies of the opening hop read no session; the first saved, the second lost (compare-and-set) and answers
    with the first's session. The first's row write then failed and its take-back removed that session (its SHA-1 was
    still the first's): the second copy's member saw the menu again. The losing save claims it in the same command:
    the take-back leaves it, and the menu's funnel count stays counted once."""
    redis, read = rt.hot_redis, rt.redis
    field = funnel_field(FUNNEL_ALL, "home")
    first = sessions.Stored(state=sessions.State(screen="home"), hops=1, reply=("CON Welcome", False), seen="")
    second = sessions.Stored(state=sessions.State(screen="home"), hops=1, reply=("CON Welcome!", False), seen="")
    assert await sessions.save(redis, "nalo", "lost-save", first, funnel=[field]) is None
    hour = first.counted_in
    assert hour is not None
    counted = int(await read.hget(hour, field) or 0)
    winner = await sessions.save(redis, "nalo", "lost-save", second, funnel=[field])
    assert winner is not None and winner.reply == ("CON Welcome", False)
    assert await sessions.unsave(redis, "nalo", "lost-save", first, funnel=[field]) is False
    kept = await sessions.load(redis, "nalo", "lost-save")
    assert kept is not None and kept.reply == ("CON Welcome", False)
    assert int(await read.hget(hour, field) or 0) == counted
    # Without a copy answering from it, the take-back removes the session and its count.
    alone = sessions.Stored(state=sessions.State(screen="home"), hops=1, reply=("CON Welcome", False), seen="")
    assert await sessions.save(redis, "nalo", "alone", alone, funnel=[field]) is None
    assert await sessions.unsave(redis, "nalo", "alone", alone, funnel=[field]) is True
    assert await sessions.load(redis, "nalo", "alone") is None
    assert int(await read.hget(hour, field) or 0) == counted


@pytest.mark.parametrize("claimed_by", ["replay", "lost save"])
async def test_a_claim_by_a_late_copy_of_the_opening_hop_does_not_undo_her_next_key(claimed_by: str, rt: Any) -> None:
    """Her opening hop answered, she pressed a key; while that hop runs, a late copy of the opening request (the
    aggregator sent it twice, to another serve process) claims the opening session it answers from (a replay, or its
    save that lost). The claim rewrote the session (its marker in front), so her hop's compare-and-set lost to it: her
    key was dropped and she was shown the menu again. A claim is no change of the session: her hop's save is written."""
    redis = rt.hot_redis
    session_id = f"claim-vs-next-{claimed_by.replace(' ', '-')}"
    opening = sessions.Stored(state=sessions.State(screen="home"), hops=1, reply=("CON Welcome", False), seen="")
    assert await sessions.save(redis, "nalo", session_id, opening) is None
    her_hop = await sessions.load(redis, "nalo", session_id)  # her next key's hop read the menu's session
    assert her_hop is not None
    if claimed_by == "replay":
        copy = await sessions.load(redis, "nalo", session_id)
        assert copy is not None
        await sessions.claim(redis, "nalo", session_id, copy)
    else:
        copy = sessions.Stored(state=sessions.State(screen="home"), hops=1, reply=("CON Welcome", False), seen="")
        assert await sessions.save(redis, "nalo", session_id, copy) is not None  # lost: answers from (claims) hers
    her_hop.state.screen, her_hop.hops, her_hop.reply = "pay_type", 2, ("CON Pay what?", False)
    assert await sessions.save(redis, "nalo", session_id, her_hop) is None  # written: her key is not dropped
    now = await sessions.load(redis, "nalo", session_id)
    assert now is not None and (now.state.screen, now.hops) == ("pay_type", 2)
    # The first copy's take-back (its row not written) still leaves the session she goes on from.
    assert await sessions.unsave(redis, "nalo", session_id, opening) is False
    assert await sessions.load(redis, "nalo", session_id) is not None


@pytest.mark.parametrize("aggregator", ["hubtel", "nalo", "africastalking"])
async def test_the_row_of_a_session_another_copy_of_its_opening_hop_goes_on_from_is_not_closed_unavailable(
        aggregator: str, client: Any, demo: Any, db: Any, rt: Any, aiohttp_client: Any, monkeypatch: Any) -> None:
    """As above: the first copy of the opening hop saved the session, the second answered its menu from it (and
    claimed it), the first's row write failed and its take-back left the session she goes on from. That copy's close
    still closed the session's row (written closed when none: Incomplete, unavailable) and counted her session
    `unavailable` while she went on: her real end counted nothing, and the row said she got "unavailable". The close
    of a copy whose session goes on writes the row OPEN (it has none: the second copy replayed, writing nothing) and
    counts nothing; her session is counted once, by its own end."""
    from channels.ussd import records
    from channels.ussd.routes import USSD
    from core.models import UssdSession
    from tests.channels.ussd.test_abandoned_sessions import _added
    from tests.channels.ussd.test_hubtel_nalo_flows import EN_MTN as GH_MTN
    from tests.channels.ussd.test_hubtel_nalo_flows import FR_AIRTEL, HubtelPhone, nalo
    from tests.channels.ussd.test_sessions_counted_once import _counted, _notice

    saved, answered = _first_copys_row_fails(monkeypatch, later_rows=True)
    other = await another_serve_process(rt, aiohttp_client)
    session_id = f"{aggregator}-two-openings-row"
    before = _counted(aggregator, "unavailable")

    async def opening(on: Any) -> str:
        if aggregator == "hubtel":
            return str((await HubtelPhone(on, GH_MTN, session_id).post("Initiation", "*384*123#"))["Message"])
        if aggregator == "nalo":
            return str((await nalo(on, session_id, "*384*123#", True))["MSG"])
        return await AtPhone(on, EN_MTN, session_id=session_id).dial()

    first = asyncio.ensure_future(opening(client))
    await asyncio.wait_for(saved.wait(), 10)
    second = await opening(other)
    answered.set()
    assert "unavailable" in await first and "unavailable" not in second
    await client.app[USSD].settled()
    monkeypatch.undo()
    assert _added(before, _counted(aggregator, "unavailable")) == {}  # her session goes on: not counted yet
    rows = await db.all(UssdSession, UssdSession.session_id == session_id)
    assert [(row.status, row.error) for row in rows] == [("OPEN", None)]
    # Her next key, then her session's own end: counted once, as it ended.
    if aggregator == "hubtel":
        phone = HubtelPhone(other, GH_MTN, session_id)
        phone.sequence = 1
        await phone.post("Response", "1")
        await phone.post("Release", "")
        outcome = "abandoned"
    elif aggregator == "nalo":
        await nalo(other, session_id, "1", False, msisdn=FR_AIRTEL)
        assert await records.close_abandoned(rt, now=records.utcnow() + records.ABANDONED_AFTER * 2) == 1
        outcome = "timed_out"
    else:
        await AtPhone(other, EN_MTN, session_id=session_id).send("1")
        await _notice(other, session_id, "Incomplete", "user left")
        outcome = "incomplete"
    assert _added(before, _counted(aggregator, "unavailable")) == {outcome: 1}
    row = (await db.all(UssdSession, UssdSession.session_id == session_id))[0]
    assert row.status != "OPEN" and row.error != "unavailable"
