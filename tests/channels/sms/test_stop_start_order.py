"""STOP and START follow the order she sent them in, not the order the gateway happened to take them in.

Africa's Talking posts each text on its own request: a STOP and a START sent seconds apart (she changed her mind)
are taken by two handlers at once, or the second one first (a retry of the first after a late answer). The later
one taken used to win: she sent STOP then START, and ended opted out. Each text carries the aggregator's `date` (when
it was received): a text older than the last STOP or START taken for the number changes nothing."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select, text, update

from channels.sms.routes import _taken_key
from channels.sms.templates import render
from core.db import utcnow
from core.models import Member, OutboxJob, PhoneOptOut, SmsMessage
from tests.channels.sms.test_routes import ALINE, first_try_fails_after_its_count
from tests.conftest import drain, requires_pg, waiting_for_locks


async def _text(client: Any, text: str, message_id: str, date: str) -> None:
    response = await client.post("/sms/africastalking/inbound", data={
        "date": date, "from": ALINE, "id": message_id, "linkId": "L1", "text": text, "to": "12345",
        "networkCode": "63510"})
    assert response.status == 200


async def _state(rt: Any, demo: dict[str, Any]) -> tuple[bool, bool]:
    """(her membership's flag, the number's opt-out)."""
    async with rt.sessionmaker() as s:
        member = await s.get(Member, demo["members"][ALINE])
        number = await s.get(PhoneOptOut, rt.cipher.blind_index(ALINE))
    return member.reminders_opt_out, number is not None


async def test_a_start_taken_before_the_stop_she_sent_first_leaves_reminders_on(
    rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any, worker: Any
) -> None:
    await _text(sms_client, "START", "at-2", "2026-01-15 10:00:05")
    await _text(sms_client, "STOP", "at-1", "2026-01-15 10:00:00")  # sent first, taken second
    assert await _state(rt, demo) == (False, False)
    await drain(worker)
    # One reply, the START's: the STOP's "no more reminders" would tell her the opposite of what holds.
    assert [m["message"] for m in sim.messages(ALINE)] == [render("opted_in", "rw", {})]


async def test_a_stop_taken_before_the_start_she_sent_first_leaves_reminders_off(
    rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any, worker: Any
) -> None:
    await _text(sms_client, "STOP", "at-2", "2026-01-15 10:00:05")
    await _text(sms_client, "START", "at-1", "2026-01-15 10:00:00")  # sent first, taken second
    assert await _state(rt, demo) == (True, True)
    # A later START still turns them on again.
    await _text(sms_client, "START", "at-3", "2026-01-15 10:01:00")
    assert await _state(rt, demo) == (False, False)


async def _stop_undone_since(rt: Any, sms_client: Any, sim: Any, worker: Any) -> None:
    """STOP, its reply's first try failing (an aggregator's 500), then START, whose reply goes; then the STOP's
    reply's retry, judged at its turn."""
    sim.set_failure("http500", times=1)
    await _text(sms_client, "STOP", "at-1", "2026-01-15 10:00:00")
    await drain(worker)  # the STOP's reply waits for its retry
    await _text(sms_client, "START", "at-2", "2026-01-15 10:00:05")
    await drain(worker)
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(OutboxJob).values(run_at=utcnow() - timedelta(seconds=1)))
    await drain(worker)


async def test_the_reply_to_a_stop_she_undid_since_is_not_sent_after_the_starts(
    rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any, worker: Any
) -> None:
    """Both taken in order, but their replies go as the worker gets to them: the STOP's first try failed (an
    aggregator's 500), the START's went, and the STOP's retry told her "no more reminders" last, while her START had
    turned them back on. Judged at its turn, it is not sent; the row says so."""
    await _stop_undone_since(rt, sms_client, sim, worker)
    assert await _state(rt, demo) == (False, False)
    assert [m["message"] for m in sim.messages(ALINE)] == [render("opted_in", "rw", {})]
    async with rt.sessionmaker() as s:
        rows = {template: (status, reason) for template, status, reason in (await s.execute(
            select(SmsMessage.template, SmsMessage.status, SmsMessage.failure_reason))).all()}
        jobs = {job.payload["template"]: job.status for job in (await s.execute(
            select(OutboxJob).where(OutboxJob.kind == "sms.send"))).scalars()}
    assert rows == {"opted_in": ("SENT", None), "opted_out": ("FAILED", "not sent: switched_since")}
    assert jobs == {"opted_in": "DONE", "opted_out": "DONE"}
    # Her next STOP is answered as ever.
    await _text(sms_client, "STOP", "at-3", "2026-01-15 10:01:00")
    await drain(worker)
    assert [m["message"] for m in sim.messages(ALINE)][-1] == render("opted_out", "rw", {})


async def _replies_to_status(rt: Any, client: Any, count: int) -> int:
    """How many of `count` STATUS texts (a reference that is none: "not found") get a reply."""
    for i in range(count):
        await _text(client, "STATUS PAY_20260115_999999", f"status-{i}", "2026-01-15 10:02:00")
    async with rt.sessionmaker() as s:
        jobs = (await s.execute(select(OutboxJob).where(OutboxJob.kind == "sms.send"))).scalars()
        return sum(job.payload["template"] == "not_found" for job in jobs)


@pytest.mark.usefixtures("limiter_clock")
async def test_the_reply_to_a_stop_undone_since_gives_its_count_back(
    rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any, worker: Any
) -> None:
    """Her STOP's reply, judged at its retry, is not sent (switched_since): it uses none of her 5 replies per 10
    minutes. Counted still, she got 1 reply (the START's) and 3 of her next 4 keywords were answered."""
    await _stop_undone_since(rt, sms_client, sim, worker)
    async with rt.sessionmaker() as s:
        assert (await s.execute(select(SmsMessage.failure_reason).where(SmsMessage.template == "opted_out"))
                ).scalar_one() == "not sent: switched_since"
    assert await _replies_to_status(rt, sms_client, 5) == 4
    await drain(worker)
    assert len(sim.messages(ALINE)) == 5


@pytest.mark.usefixtures("limiter_clock")
async def test_replies_to_stop_and_start_not_sent_count_once_and_only_what_went(
    rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any, worker: Any
) -> None:
    """A reply dropped at its first turn (her START taken before the worker got to her STOP's reply: nothing stored)
    gives its count back once, its job run again included; the aggregator's retry of that STOP gets no reply and
    counts nothing; and her STOP taken after her later START (stale: no reply) counts nothing either."""
    await _text(sms_client, "STOP", "at-1", "2026-01-15 10:00:00")
    await _text(sms_client, "START", "at-2", "2026-01-15 10:00:05")
    await drain(worker)
    async with rt.sessionmaker.begin() as s:  # the STOP's reply's job run again (its end lost, say)
        await s.execute(update(OutboxJob).where(OutboxJob.payload["template"].as_string() == "opted_out")
                        .values(status="PENDING", run_at=utcnow() - timedelta(seconds=1)))
    await drain(worker)
    await _text(sms_client, "STOP", "at-1", "2026-01-15 10:00:00")  # the aggregator's retry
    await _text(sms_client, "STOP", "at-0", "2026-01-15 09:59:59")  # sent before her START, taken after: stale
    assert [m["message"] for m in sim.messages(ALINE)] == [render("opted_in", "rw", {})]
    assert await _replies_to_status(rt, sms_client, 5) == 4  # 1 + 4: the fifth is refused


@pytest.mark.usefixtures("limiter_clock")
async def test_a_reply_counted_by_its_texts_first_try_and_not_sent_gives_its_count_back(
    rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any, worker: Any, monkeypatch: Any
) -> None:
    """Her STOP's first try counted its reply and failed (503); its retry queued the reply, which her START taken
    since leaves unsent (switched_since): the count the first try made is given back, as its own would be. Kept
    counted (the retry knew no time for it), 3 of her next 5 keywords were answered, not 4."""
    await first_try_fails_after_its_count(sms_client, monkeypatch, "STOP", "at-1", "2026-01-15 10:00:00")
    await _text(sms_client, "STOP", "at-1", "2026-01-15 10:00:00")  # the aggregator's retry
    await _text(sms_client, "START", "at-2", "2026-01-15 10:00:05")
    await drain(worker)
    assert [m["message"] for m in sim.messages(ALINE)] == [render("opted_in", "rw", {})]
    assert await _replies_to_status(rt, sms_client, 5) == 4
    # The verdict itself is kept as the release before reads it: "1", its time beside it.
    assert await rt.redis.get(_taken_key(rt.cipher.blind_index(ALINE), "at-1", "reply")) == b"1"


@pytest.mark.usefixtures("limiter_clock")
async def test_a_stale_retry_gives_back_the_count_its_first_try_made(
    rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any, worker: Any, monkeypatch: Any
) -> None:
    """Her STOP's first try counted its reply and failed (503); her START, sent after it, is taken before its retry,
    which is then stale: no reply, and the first try's count given back."""
    await first_try_fails_after_its_count(sms_client, monkeypatch, "STOP", "at-1", "2026-01-15 10:00:00")
    await _text(sms_client, "START", "at-2", "2026-01-15 10:00:05")
    await _text(sms_client, "STOP", "at-1", "2026-01-15 10:00:00")  # the aggregator's retry: stale
    assert await _state(rt, demo) == (False, False)
    assert await _replies_to_status(rt, sms_client, 5) == 4
    await drain(worker)
    assert len(sim.messages(ALINE)) == 5


@pytest.mark.usefixtures("limiter_clock")
async def test_a_stale_retry_gives_back_no_count_of_a_reply_its_first_try_queued(
    rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any, worker: Any, monkeypatch: Any
) -> None:
    """Her STOP's first try queued its reply, which went, but its mark was lost (Redis failing as it was written:
    logged), so the aggregator's retry of it, after her START was taken, is stale: its reply is that try's, counted
    (sent), and the retry gives nothing back. Given back, 4 of her next 5 keywords were answered, 6 replies in her
    10 minutes."""
    from channels.sms import routes

    real = routes._mark_taken
    lost = {"left": 1}

    async def mark_lost_once(*args: Any) -> None:
        if lost["left"]:
            lost["left"] -= 1
            return
        await real(*args)

    monkeypatch.setattr(routes, "_mark_taken", mark_lost_once)
    await _text(sms_client, "STOP", "at-1", "2026-01-15 10:00:00")
    await drain(worker)
    await _text(sms_client, "START", "at-2", "2026-01-15 10:00:05")
    await _text(sms_client, "STOP", "at-1", "2026-01-15 10:00:00")  # the aggregator's retry: stale
    assert await _state(rt, demo) == (False, False)
    assert await _replies_to_status(rt, sms_client, 5) == 3
    await drain(worker)
    assert len(sim.messages(ALINE)) == 5


@pytest.mark.usefixtures("limiter_clock")
@pytest.mark.parametrize("went", [True, False], ids=["reply-went", "reply-not-sent"])
async def test_a_stop_taken_twice_at_once_and_then_stale_counts_its_reply_once(
    rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any, worker: Any, monkeypatch: Any, went: bool
) -> None:
    """Her STOP's first try counts its reply and is held there; its retry (our answer was slow) comes in meanwhile,
    takes the STOP whole and queues the reply; her START is taken; then the first try goes on, stale. The text's
    reply is counted once, by the first try, for both: when the reply went before her START was taken it stays
    counted (the stale try gives back nothing: 3 of her next 5 keywords answered), when it was not sent (her
    START taken since) its job gives it back, once (4 answered). Counted by each try, the reply not sent kept one
    of her five."""
    real_eval = rt.redis.eval
    counted, go = asyncio.Event(), asyncio.Event()

    async def lined_up(script: Any, numkeys: int, *keys_and_args: Any) -> Any:
        answer = await real_eval(script, numkeys, *keys_and_args)
        if not counted.is_set() and any(":sms:reply:" in str(key) for key in keys_and_args[:numkeys]):
            counted.set()  # the first try's count: held here until the test lets it go on
            await asyncio.wait_for(go.wait(), 30)
        return answer

    with monkeypatch.context() as patched:
        patched.setattr(rt.redis, "eval", lined_up)
        first = asyncio.create_task(_text(sms_client, "STOP", "at-1", "2026-01-15 10:00:00"))
        await asyncio.wait_for(counted.wait(), 30)
        await _text(sms_client, "STOP", "at-1", "2026-01-15 10:00:00")  # the aggregator's retry, taken whole
        if went:
            await drain(worker)
        await _text(sms_client, "START", "at-2", "2026-01-15 10:00:05")
        await drain(worker)
        go.set()
        await first  # stale now: no reply
    assert await _state(rt, demo) == (False, False)
    replies = [render("opted_out", "rw", {})] if went else []
    assert [m["message"] for m in sim.messages(ALINE)] == [*replies, render("opted_in", "rw", {})]
    assert await _replies_to_status(rt, sms_client, 5) == (3 if went else 4)


@contextlib.asynccontextmanager
async def _first_held_before_its_commit(monkeypatch: Any) -> AsyncIterator[tuple[asyncio.Event, asyncio.Event]]:
    """The first text to change her membership's flag stops there, before its commit (holding her membership's row
    and the number's; `reached`) until `go` is set: the text sent after it reads her memberships meanwhile (KEY SHARE
    does not wait), then waits for the first's locks. Two texts both held behind another transaction's lock on her
    membership were let go at once, and either took the number's row first: the one sent second, taken first,
    made the first stale, and the test did not test the second waiting for the first (a second text that wrote the
    flags it read before the first committed passed, about one run in two)."""
    from channels.sms import routes

    reached, go, real_record = asyncio.Event(), asyncio.Event(), routes.record

    async def record_then_wait(*args: Any, **kwargs: Any) -> Any:
        written = await real_record(*args, **kwargs)
        if kwargs.get("action") == "member.reminders_opt_out" and not reached.is_set():
            reached.set()
            await go.wait()
        return written

    monkeypatch.setattr(routes, "record", record_then_wait)
    yield reached, go


@requires_pg
async def test_a_stop_and_a_start_taken_at_once_end_in_the_later_ones_state(
    rt: Any, demo: dict[str, Any], sms_client: Any, monkeypatch: Any
) -> None:
    """Her STOP is taken first and held before its commit; her START, sent after it, comes in meanwhile and reads
    her memberships before the STOP commits. Once the STOP commits, the START must still turn her reminders on: on
    her membership too, though it read it before the STOP set its flag."""
    async with _first_held_before_its_commit(monkeypatch) as (reached, go):
        stop = asyncio.create_task(_text(sms_client, "STOP", "at-1", "2026-01-15 10:00:00"))
        await asyncio.wait_for(reached.wait(), 30)
        start = asyncio.create_task(_text(sms_client, "START", "at-2", "2026-01-15 10:00:02"))
        await waiting_for_locks(rt, 1, done=[stop, start])  # the START waits for the STOP (held: not done)
        assert not stop.done() and not start.done()
        go.set()
        await asyncio.gather(stop, start)
    assert await _state(rt, demo) == (False, False)


@requires_pg
async def test_a_stop_sent_after_a_start_taken_at_once_ends_opted_out(
    rt: Any, demo: dict[str, Any], sms_client: Any, monkeypatch: Any
) -> None:
    """The other way round: her START (sent first) is held before its commit, her STOP sent after it reads her
    memberships meanwhile, waits for it, and ends it opted out."""
    await _text(sms_client, "STOP", "at-0", "2026-01-15 09:00:00")
    async with _first_held_before_its_commit(monkeypatch) as (reached, go):
        start = asyncio.create_task(_text(sms_client, "START", "at-1", "2026-01-15 10:00:00"))
        await asyncio.wait_for(reached.wait(), 30)
        stop = asyncio.create_task(_text(sms_client, "STOP", "at-2", "2026-01-15 10:00:02"))
        await waiting_for_locks(rt, 1, done=[start, stop])  # the STOP waits for the START (held: not done)
        assert not start.done() and not stop.done()
        go.set()
        await asyncio.gather(stop, start)
    assert await _state(rt, demo) == (True, True)


async def test_a_word_dated_ahead_of_our_clock_does_not_silence_the_ones_after_it(
    rt: Any, demo: dict[str, Any], sms_client: Any
) -> None:
    """An aggregator writing its local time as the date (or a clock gone wrong) dates her STOP hours ahead: taken as
    sent now, not then, so her START sent right after it, dated by a right clock, still turns reminders back on:
    though it is dated (in whole seconds, as Africa's Talking dates) the same second the STOP was taken in."""
    from core.db import utcnow

    ahead = (utcnow() + timedelta(hours=3)).strftime("%Y-%m-%d %H:%M:%S")
    await _text(sms_client, "STOP", "at-1", ahead)
    assert await _state(rt, demo) == (True, True)
    await _text(sms_client, "START", "at-2", utcnow().strftime("%Y-%m-%d %H:%M:%S"))
    assert await _state(rt, demo) == (False, False)


def test_a_date_ahead_is_taken_as_the_current_second_and_one_behind_as_it_is() -> None:
    from channels.sms.routes import _said_at
    from core.db import utcnow

    before = utcnow().replace(microsecond=0)
    taken = _said_at((before + timedelta(hours=3)).strftime("%Y-%m-%d %H:%M:%S"))
    assert taken.microsecond == 0 and before <= taken <= utcnow()
    assert _said_at("2026-01-15 10:00:00.250000+02:00") == datetime(2026, 1, 15, 8, 0, 0, 250_000, tzinfo=UTC)
    undated = _said_at("not a date")  # as one dated ahead in whole seconds: the two tie within a second
    assert undated.microsecond == 0 and before <= undated <= utcnow()
    # A date ahead with a fraction is ordered with dates that have one: now, to the microsecond (a word sent after
    # it, dated a little later but not ahead, still comes after it).
    earlier = utcnow()
    fractional = _said_at((earlier + timedelta(hours=3)).replace(microsecond=250_000).isoformat())
    assert earlier <= fractional <= utcnow()


@requires_pg
async def test_a_stop_while_her_number_is_released_never_deadlocks(
    rt: Any, demo: dict[str, Any], sms_client: Any
) -> None:
    """Her number released (POST /v1/members/{id}/release-phone, or an erasure) as her STOP comes in: the release
    locks her membership, then forgets the number's STOP and its latest word (phone_opt_out_words); the STOP must not
    take the word's row first and then wait for her membership, or PostgreSQL rolls one of them back (a 500 to the
    aggregator, or to the admin)."""
    from core.audit import Actor
    from core.members import release_phone

    member_id = demo["members"][ALINE]
    await _text(sms_client, "START", "at-0", "2026-01-15 09:00:00")  # the number's latest word: its row exists
    async with rt.sessionmaker.begin() as s:
        await s.execute(text("UPDATE members SET status = 'SUSPENDED' WHERE id = :id"), {"id": member_id})

    async def released() -> Member:
        async with rt.sessionmaker.begin() as s:
            await s.execute(text("SET LOCAL lock_timeout = '10s'"))
            return await release_phone(s, await s.get(Member, member_id), actor=Actor("admin:test", "admin"))

    holder = rt.sessionmaker()
    try:
        await holder.begin()  # holds her membership while both line up for it: the release first
        await holder.execute(select(Member.id).where(Member.id == member_id).with_for_update())
        release = asyncio.create_task(released())
        await waiting_for_locks(rt, 1)
        stop = asyncio.create_task(_text(sms_client, "STOP", "at-1", "2026-01-15 10:00:00"))
        await waiting_for_locks(rt, 2)
        await holder.rollback()
    finally:
        await holder.close()
    results = await asyncio.gather(release, stop, return_exceptions=True)
    assert not any(isinstance(r, BaseException) for r in results), results
    async with rt.sessionmaker() as s:
        member = await s.get(Member, member_id)
    assert (member.phone_enc, member.phone_index) == (None, None)


@requires_pg
async def test_a_stop_and_another_text_of_the_number_as_it_joins_another_cooperative_never_deadlock(
    rt: Any, demo: dict[str, Any], sms_client: Any, monkeypatch: Any
) -> None:
    """Her STOP reads (and locks) the number's memberships, then locks them again for the flags it sets; a
    membership the number got in between (she joined another cooperative: a registration, an import, a number
    corrected to hers), its id before hers, is locked there too. Her HELP texted meanwhile reads the memberships as
    they are now: the new one first, then hers. Neither must wait for the other's row while holding the one the other
    waits for, or PostgreSQL rolls one of them back (a 500 to the aggregator)."""
    from channels.sms import routes
    from core.members import phone_context
    from core.models import Cooperative
    from core.phone import normalize

    real = routes._named_membership
    read, go = asyncio.Event(), asyncio.Event()

    async def paused(session: Any, ranked: Any, prefix: Any) -> Any:
        if not read.is_set():  # the STOP, its memberships read: held here until the test lets it go on
            read.set()
            await asyncio.wait_for(go.wait(), 30)
        return await real(session, ranked, prefix)

    monkeypatch.setattr(routes, "_named_membership", paused)
    stop = asyncio.create_task(_text(sms_client, "STOP", "at-1", "2026-01-15 10:00:00"))
    try:
        await asyncio.wait_for(read.wait(), 30)
        async with rt.sessionmaker.begin() as s:
            coop = Cooperative(name="Musanze Farmers", short_code="MSZF", country="RW", currency="RWF",
                               timezone="Africa/Kigali", ussd_extension="77", status="ACTIVE")
            s.add(coop)
            await s.flush()
            first_id = "00000000-0000-4000-8000-000000000000"
            assert first_id < demo["members"][ALINE]
            s.add(Member(id=first_id, cooperative_id=coop.id, name="Aline U.", language="en", status="ACTIVE",
                         phone_enc=rt.cipher.encrypt(ALINE, context=phone_context(coop.id)),
                         phone_index=rt.cipher.blind_index(ALINE), phone_masked=normalize(ALINE).masked()))
        help_ = asyncio.create_task(_text(sms_client, "HELP", "at-2", "2026-01-15 10:00:01"))
        # The HELP waits for the STOP (or went through meanwhile).
        await waiting_for_locks(rt, 1, done=help_)
    finally:
        go.set()
    results = await asyncio.gather(stop, help_, return_exceptions=True)
    assert not any(isinstance(r, BaseException) for r in results), results
    async with rt.sessionmaker() as s:
        flags = (await s.execute(select(Member.reminders_opt_out).where(
            Member.phone_index == rt.cipher.blind_index(ALINE)))).scalars().all()
    assert flags == [True, True]  # her STOP is the number's: both memberships'


@requires_pg
async def test_two_stops_of_the_number_and_its_erasure_waiting_between_them_never_deadlock(
    rt: Any, demo: dict[str, Any], sms_client: Any, monkeypatch: Any
) -> None:
    """Two texts of hers (a STOP and its START, or the aggregator's retry) have read her membership (FOR KEY SHARE)
    when the desk's erasure comes to wait for it (FOR UPDATE); each then locks it again to set its flag: the second
    waits for the first, never behind the erasure that waits for both (PostgreSQL's tuple lock: a deadlock)."""
    from channels.sms import routes
    from core.audit import Actor
    from core.members import erase_member

    member_id = demo["members"][ALINE]
    async with rt.sessionmaker.begin() as s:
        await s.execute(text("UPDATE members SET status = 'SUSPENDED' WHERE id = :id"), {"id": member_id})
    real = routes._named_membership
    read, go = [asyncio.Event(), asyncio.Event()], asyncio.Event()

    async def paused(session: Any, ranked: Any, prefix: Any) -> Any:
        arrived = next((event for event in read if not event.is_set()), None)
        if arrived is not None:  # each text, its memberships read: held here until the test lets them go on
            arrived.set()
            await asyncio.wait_for(go.wait(), 30)
        return await real(session, ranked, prefix)

    async def erased() -> Member:
        async with rt.sessionmaker.begin() as s:
            await s.execute(text("SET LOCAL lock_timeout = '10s'"))
            return await erase_member(s, await s.get(Member, member_id), actor=Actor("admin:test", "admin"))

    monkeypatch.setattr(routes, "_named_membership", paused)
    stop = asyncio.create_task(_text(sms_client, "STOP", "at-1", "2026-01-15 10:00:00"))
    start = asyncio.create_task(_text(sms_client, "START", "at-2", "2026-01-15 10:00:02"))
    try:
        await asyncio.wait_for(asyncio.gather(read[0].wait(), read[1].wait()), 30)
        erasure = asyncio.create_task(erased())
        await waiting_for_locks(rt, 1)
    finally:
        go.set()
    results = await asyncio.gather(stop, start, erasure, return_exceptions=True)
    assert not any(isinstance(r, BaseException) for r in results), results
