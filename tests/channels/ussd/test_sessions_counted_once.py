"""Each USSD session is counted once in gateway_ussd_sessions_total, whatever closes its row first and in whatever
order the others come: the sweep, Africa's Talking's end-of-session notice, the END hop, Hubtel's Timeout. The first
close of a row counts; a later one writes the row's truth (the aggregator's word stands) and counts nothing."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import update

from channels.ussd import records, sessions
from core.models import UssdSession
from core.phone import normalize
from tests.channels.ussd.helpers import AtPhone
from tests.channels.ussd.test_abandoned_sessions import _added, _age, _row, _sessions_counted
from tests.channels.ussd.test_flows_africastalking import EN_MTN, RW_MTN, option
from tests.channels.ussd.test_hubtel_nalo_flows import EN_MTN as HUBTEL_EN_MTN
from tests.channels.ussd.test_hubtel_nalo_flows import FR_AIRTEL as HUBTEL_FR_AIRTEL
from tests.channels.ussd.test_hubtel_nalo_flows import HubtelPhone
from tests.conftest import behind_a_lock, requires_pg

AT = "africastalking"


async def _notice(client: Any, session_id: str, status: str, error: str = "") -> None:
    """Africa's Talking's end-of-session notification of the session, posted again on a 503 as Africa's Talking does:
    the route answers 503 when its write does not finish within 5 s (a loaded CI host stalled one once); a notice
    the route keeps refusing still fails the test."""
    for attempt in range(3):
        resp = await client.post("/ussd/africastalking/events", data={
            "date": "2026-01-15 10:00:00", "sessionId": session_id, "serviceCode": "*384*123#",
            "networkCode": "63510", "phoneNumber": EN_MTN, "status": status, "cost": "KES 0.05",
            "durationInMillis": "20000", "hopsCount": "3", "input": "2", "lastAppResponse": "END",
            "errorMessage": error})
        if resp.status != 503 or attempt == 2:
            break
        await asyncio.sleep(0.5)
    assert resp.status == 200, await resp.text()


async def _to_confirm(phone: AtPhone) -> None:
    """The session up to its payment's confirmation: its next key ("2", cancel) ends it, counted completed."""
    await phone.dial()
    types = await phone.send("1")
    confirm = await phone.send(option(types, "Monthly Rent"))
    assert confirm.startswith("CON ") and "Monthly Rent" in confirm


async def _cancel(phone: AtPhone) -> None:
    assert (await phone.send("2")).startswith("END ")


@pytest.mark.parametrize(("status", "outcome"), [("Incomplete", "incomplete"), ("Failed", "failed")])
async def test_a_notice_before_the_end_hop_counts_the_session_once(status: str, outcome: str, client: Any,
                                                                   demo: Any, db: Any, rt: Any) -> None:
    """Africa's Talking gave up on a slow hop and said so before that hop's END was written: the notice counted
    the session (its outcome: it came first), the END counts nothing and writes what it knows on the row, the
    aggregator's status standing. (A Success cannot come first: it answers our END, whose hop closed the row
    before answering; see test_a_hop_answered_unavailable_then_the_notice_counts_the_session_once.)"""
    phone = AtPhone(client, EN_MTN)
    await _to_confirm(phone)
    before = _sessions_counted(AT)
    await _notice(client, phone.session_id, status, "" if status == "Success" else "network timeout")
    assert _added(before, _sessions_counted(AT)) == {outcome: 1}
    await _cancel(phone)
    assert _added(before, _sessions_counted(AT)) == {outcome: 1}
    row = await _row(db, phone.session_id)
    assert (row.status, row.last_screen, row.hops) == (status, "pay_cancelled", 4)


@pytest.mark.parametrize("status", ["Incomplete", "Failed", "Success"])
async def test_a_notice_after_the_end_hop_counts_nothing(status: str, client: Any, demo: Any, db: Any,
                                                        rt: Any) -> None:
    phone = AtPhone(client, EN_MTN)
    await _to_confirm(phone)
    before = _sessions_counted(AT)
    await _cancel(phone)
    assert _added(before, _sessions_counted(AT)) == {"completed": 1}
    await _notice(client, phone.session_id, status)
    await _notice(client, phone.session_id, status)  # the aggregator's retry of it
    assert _added(before, _sessions_counted(AT)) == {"completed": 1}
    assert (await _row(db, phone.session_id)).status == status  # the aggregator's word


async def test_a_notice_sent_twice_counts_once(client: Any, demo: Any, db: Any, rt: Any) -> None:
    phone = AtPhone(client, EN_MTN)
    await phone.dial()
    before = _sessions_counted(AT)
    await _notice(client, phone.session_id, "Incomplete")
    await _notice(client, phone.session_id, "Incomplete")
    # A notice of a session no hop reached (no row) counts it, once too.
    await _notice(client, "ATUid_no_hop", "Failed")
    await _notice(client, "ATUid_no_hop", "Failed")
    assert _added(before, _sessions_counted(AT)) == {"incomplete": 1, "failed": 1}


async def test_the_sweep_then_a_notice_then_the_end_hop_count_the_sweeps_timed_out_alone(
        client: Any, demo: Any, db: Any, rt: Any) -> None:
    """The notice replaces the sweep's guess on the row (no more Incomplete with TIMED_OUT): the END coming after it
    still knows the session was counted."""
    phone = AtPhone(client, EN_MTN)
    await _to_confirm(phone)
    await _age(rt, phone.session_id, 11)
    before = _sessions_counted(AT)
    assert await records.close_abandoned(rt) == 1
    await _notice(client, phone.session_id, "Failed", "network")
    await _cancel(phone)
    assert _added(before, _sessions_counted(AT)) == {"timed_out": 1}
    row = await _row(db, phone.session_id)
    assert (row.status, row.error, row.last_screen) == ("Failed", "network", "pay_cancelled")


async def test_a_notice_then_the_sweep_counts_the_notice_alone(client: Any, demo: Any, db: Any, rt: Any) -> None:
    phone = AtPhone(client, EN_MTN)
    await phone.dial()
    await _age(rt, phone.session_id, 11)
    before = _sessions_counted(AT)
    await _notice(client, phone.session_id, "Incomplete")
    assert await records.close_abandoned(rt) == 0
    assert _added(before, _sessions_counted(AT)) == {"incomplete": 1}


async def _hubtel_to_confirm(client: Any, session_id: str) -> HubtelPhone:
    phone = HubtelPhone(client, HUBTEL_EN_MTN, session_id)
    await phone.post("Initiation", "*384*123#")
    await phone.post("Response", "1")
    assert (await phone.post("Response", "1"))["Message"].startswith("Pay Monthly Rent")
    return phone


async def test_hubtels_timeout_after_the_end_hop_counts_nothing(client: Any, demo: Any, db: Any, rt: Any) -> None:
    phone = await _hubtel_to_confirm(client, "hubtel-ended")
    before = _sessions_counted("hubtel")
    assert (await phone.post("Response", "2"))["Type"] == "Release"
    assert (await phone.post("Timeout", ""))["Type"] == "Release"
    assert _added(before, _sessions_counted("hubtel")) == {"completed": 1}
    assert (await _row(db, "hubtel-ended")).status == "Success"


async def test_hubtels_timeout_before_a_late_end_hop_counts_it_abandoned(client: Any, demo: Any, db: Any,
                                                                         rt: Any) -> None:
    phone = await _hubtel_to_confirm(client, "hubtel-timeout")
    before = _sessions_counted("hubtel")
    assert (await phone.post("Timeout", ""))["Type"] == "Release"
    await phone.post("Response", "2")
    assert _added(before, _sessions_counted("hubtel")) == {"abandoned": 1}
    row = await _row(db, "hubtel-timeout")
    assert (row.status, row.last_screen) == ("Incomplete", "pay_cancelled")


async def test_hubtels_timeout_of_a_session_whose_state_is_gone_closes_its_row(client: Any, demo: Any, db: Any,
                                                                              rt: Any) -> None:
    """No Redis state left (lost): the Timeout still closes the row, and the sweep then finds it closed. It used to
    count abandoned and leave the row OPEN, for the sweep to count a second time. A row older than the longest
    session (one the sweep closed, or a previous session's of the id: Hubtel uses ids again) is left as it is, and
    the Timeout counts nothing: a late notice of a session the sweep counted, which it counted a second time."""
    phone = await _hubtel_to_confirm(client, "hubtel-lost")
    previous = HubtelPhone(client, HUBTEL_FR_AIRTEL, "hubtel-previous")
    await previous.post("Initiation", "*384*123#")
    await _age(rt, "hubtel-previous", 11)
    before = _sessions_counted("hubtel")
    assert await records.close_abandoned(rt) == 1
    await rt.redis.flushdb()
    assert (await phone.post("Timeout", ""))["Type"] == "Release"
    assert _added(before, _sessions_counted("hubtel")) == {"timed_out": 1, "abandoned": 1}
    row = await _row(db, "hubtel-lost")
    assert (row.status, row.error) == ("Incomplete", None) and row.ended_at is not None
    await _age(rt, "hubtel-lost", 11)
    assert await records.close_abandoned(rt) == 0
    swept = (await _row(db, "hubtel-previous")).ended_at
    assert (await previous.post("Timeout", ""))["Type"] == "Release"  # late, after the sweep
    assert _added(before, _sessions_counted("hubtel")) == {"timed_out": 1, "abandoned": 1}
    row = await _row(db, "hubtel-previous")
    assert (row.status, row.error, row.ended_at) == ("Incomplete", records.TIMED_OUT, swept)
    # A Timeout of an id no row holds counts nothing: its opening hop, shed or failed before writing the row, counted
    # the session (busy, unavailable), or it never reached us.
    assert (await HubtelPhone(client, HUBTEL_EN_MTN, "hubtel-no-row").post("Timeout", ""))["Type"] == "Release"
    assert _added(before, _sessions_counted("hubtel")) == {"timed_out": 1, "abandoned": 1}


async def test_the_end_hop_and_the_notice_at_once_count_each_session_once(client: Any, demo: Any, db: Any,
                                                                          rt: Any) -> None:
    phones = []
    before = _sessions_counted(AT)
    for _ in range(4):
        pair = [AtPhone(client, EN_MTN), AtPhone(client, RW_MTN)]
        for phone in pair:
            await _to_confirm(phone)
        await asyncio.gather(*(step for phone in pair for step in (
            _cancel(phone), _notice(client, phone.session_id, "Incomplete"))))
        phones += pair
    added = _added(before, _sessions_counted(AT))
    assert sum(added.values()) == len(phones) and set(added) <= {"completed", "incomplete"}, added
    for phone in phones:
        row = await _row(db, phone.session_id)
        assert row.last_screen == "pay_cancelled" and row.status in ("Incomplete", "Success")


async def test_two_closes_at_once_tell_exactly_one_it_was_first(client: Any, demo: Any, db: Any, rt: Any) -> None:
    """records.closed() and record_event() return whether the session was closed (counted) before them: of two
    run at once, exactly one is the first."""
    for n in range(6):
        phone = AtPhone(client, EN_MTN, session_id=f"ATUid_race_{n}")
        await phone.dial()
        event = records.SessionEvent(aggregator=AT, session_id=phone.session_id, phone=normalize(EN_MTN),
                                     service_code="*384*123#", network=None, status="Failed", hops=2,
                                     duration_ms=None, cost=None, error="network")
        close = records.closed(rt, aggregator=AT, session_id=phone.session_id, hops=2, last_screen="home", data={})
        other = records.record_event(rt, event) if n % 2 else records.closed(  # a notice, or Hubtel's Timeout
            rt, aggregator=AT, session_id=phone.session_id, hops=2, last_screen="home", data={}, status="Incomplete")
        before = await asyncio.gather(close, other)
        assert sorted(before) == [False, True], (n, before)


@requires_pg
async def test_an_end_waiting_on_a_notices_lock_is_told_the_notice_counted(client: Any, demo: Any, db: Any,
                                                                           rt: Any) -> None:
    """The notice's write holds the row while the END's close comes: the close waits for it to commit, finds the
    row closed, and counts nothing (PostgreSQL checks the OPEN condition again on the row the notice left)."""
    phone = AtPhone(client, EN_MTN)
    await phone.dial()
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(UssdSession).where(UssdSession.session_id == phone.session_id)
                        .values(status="Failed", error="network"))
        late = asyncio.create_task(records.closed(rt, aggregator=AT, session_id=phone.session_id, hops=3,
                                                  last_screen="home", data={}))
        await behind_a_lock(rt, late)
        assert not late.done()  # waiting on the notice's row lock
    assert await late is True
    row = await _row(db, phone.session_id)
    assert (row.status, row.error, row.hops, row.last_screen) == ("Failed", "network", 3, "home")


async def test_the_end_hop_closes_its_row_in_one_statement_and_a_second_only_after_a_notice(
        client: Any, demo: Any, db: Any, rt: Any) -> None:
    """The hop path's cost: an END on an OPEN row is one UPDATE (the normal case); after the notice, a second writes
    the row closed before."""
    from tests.channels.ussd.test_hop_cost import statements

    for notice_first, writes in ((False, 1), (True, 2)):
        phone = AtPhone(client, EN_MTN)
        await _to_confirm(phone)
        if notice_first:
            await _notice(client, phone.session_id, "Incomplete")
        with statements(rt) as sent:
            await _cancel(phone)
        assert len([s for s in sent if "ussd_sessions" in s]) == writes, sent


def _failing(monkeypatch: Any, *, first: bool) -> None:
    """records.closed()'s first write (the row found OPEN or not) or its second (a row closed before) fails, as a
    database going away does: ConnectionError."""
    built = records._close_statement
    failing: set[int] = set()

    def close_statement(columns: tuple[str, ...], is_first: bool, young: bool) -> Any:
        stmt = built(columns, is_first, young)
        if is_first == first:
            failing.add(id(stmt))
        return stmt

    real_first = records.pgraw.first

    async def first_row(conn: Any, stmt: Any, *args: Any, **kwargs: Any) -> Any:
        if id(stmt) in failing:
            raise ConnectionError("database went away")
        return await real_first(conn, stmt, *args, **kwargs)

    monkeypatch.setattr(records, "_close_statement", close_statement)
    monkeypatch.setattr(records.pgraw, "first", first_row)


async def test_an_end_whose_second_write_fails_after_a_notice_counts_nothing(client: Any, demo: Any, db: Any,
                                                                            rt: Any, monkeypatch: Any) -> None:
    """The notice counted the session (its row closed); the END's first write found that, and its second (what the
    hop knows, on the closed row) fails: the session was counted, the END counts nothing all the same."""
    phone = AtPhone(client, EN_MTN)
    await _to_confirm(phone)
    before = _sessions_counted(AT)
    await _notice(client, phone.session_id, "Incomplete", "network timeout")
    _failing(monkeypatch, first=False)
    await _cancel(phone)  # the member still hears her END
    assert _added(before, _sessions_counted(AT)) == {"incomplete": 1}


async def test_an_end_whose_write_fails_is_counted_once_by_the_sweep(client: Any, demo: Any, db: Any, rt: Any,
                                                                    monkeypatch: Any) -> None:
    """Hubtel (and Nalo) report no end: the END's close fails (the database away), its row stays OPEN, and the
    sweep closes it later and counts it. The END counting it too made it twice."""
    phone = await _hubtel_to_confirm(client, "hubtel-unwritten")
    before = _sessions_counted("hubtel")
    with monkeypatch.context() as patched:
        _failing(patched, first=True)
        assert (await phone.post("Response", "2"))["Type"] == "Release"
    assert (await _row(db, "hubtel-unwritten")).status == "OPEN"
    await _age(rt, "hubtel-unwritten", 11)
    assert await records.close_abandoned(rt) == 1
    assert _added(before, _sessions_counted("hubtel")) == {"timed_out": 1}


async def test_an_africastalking_end_whose_write_fails_is_counted_once_by_the_end(client: Any, demo: Any, db: Any,
                                                                                 rt: Any, monkeypatch: Any) -> None:
    """Africa's Talking reports our END a Success, which counts nothing: the END whose close failed is the one to
    count the session (not counted at all otherwise); the notice closes its row."""
    phone = AtPhone(client, EN_MTN)
    await _to_confirm(phone)
    before = _sessions_counted(AT)
    with monkeypatch.context() as patched:
        _failing(patched, first=True)
        await _cancel(phone)
    await _notice(client, phone.session_id, "Success")
    assert _added(before, _sessions_counted(AT)) == {"completed": 1}
    assert (await _row(db, phone.session_id)).status == "Success"


@pytest.mark.parametrize("kind", ["Timeout", "Release"])
async def test_hubtels_close_after_the_end_hop_leaves_its_row_as_the_end_wrote_it(kind: str, client: Any, demo: Any,
                                                                                   db: Any, rt: Any) -> None:
    """A Timeout (or Release) of a session our END already released says nothing of how it ended: the row keeps the
    END's end and duration (it took the Timeout's instant, a session as long as the wait for it)."""
    phone = await _hubtel_to_confirm(client, f"hubtel-ended-{kind}")
    assert (await phone.post("Response", "2"))["Type"] == "Release"
    ended = await _row(db, f"hubtel-ended-{kind}")
    await asyncio.sleep(0.05)
    before = _sessions_counted("hubtel")
    assert (await phone.post(kind, ""))["Type"] == "Release"
    assert _added(before, _sessions_counted("hubtel")) == {}
    row = await _row(db, f"hubtel-ended-{kind}")
    assert (row.status, row.ended_at, row.duration_ms, row.hops, row.last_screen) == (
        "Success", ended.ended_at, ended.duration_ms, ended.hops, ended.last_screen)


def _with_unavailable(aggregator: str) -> dict[str, float]:
    from core.metrics import REGISTRY

    return {**_sessions_counted(aggregator), "unavailable": REGISTRY.get_sample_value(
        "gateway_ussd_sessions_total", {"aggregator": aggregator, "outcome": "unavailable"}) or 0.0}


async def test_a_hop_answered_unavailable_then_the_notice_counts_the_session_once(client: Any, demo: Any, db: Any,
                                                                                   rt: Any, monkeypatch: Any) -> None:
    """A hop that fails is answered END "service unavailable" and counted so (the alert's signal); its row is not
    closed (the hop did not finish). Africa's Talking then reports the session a Success (our END ended it): not a
    second count, as `completed`."""
    from channels.ussd import service

    phone = AtPhone(client, EN_MTN)
    await _to_confirm(phone)
    before = _with_unavailable(AT)

    async def redis_down(*_args: Any, **_kwargs: Any) -> Any:
        raise ConnectionError("redis went away")

    with monkeypatch.context() as patched:
        patched.setattr(service.sessions, "save", redis_down)
        assert (await phone.send("2")) == "END Service unavailable, please try again later."
    unavailable = {"unavailable": 1}
    assert _added(before, _with_unavailable(AT)) == unavailable
    await _notice(client, phone.session_id, "Success")
    assert _added(before, _with_unavailable(AT)) == unavailable
    assert (await _row(db, phone.session_id)).status == "Success"


def _counted(aggregator: str, *outcomes: str) -> dict[str, float]:
    from core.metrics import REGISTRY

    return {**_sessions_counted(aggregator), **{outcome: REGISTRY.get_sample_value(
        "gateway_ussd_sessions_total", {"aggregator": aggregator, "outcome": outcome}) or 0.0
        for outcome in outcomes}}


async def _redis_down(*_args: Any, **_kwargs: Any) -> Any:
    raise ConnectionError("redis went away")


@pytest.mark.parametrize("aggregator", ["hubtel", "nalo"])
async def test_a_hop_answered_unavailable_closes_its_row_and_the_sweep_counts_it_no_more(
        aggregator: str, client: Any, demo: Any, db: Any, rt: Any, monkeypatch: Any) -> None:
    """Hubtel and Nalo report no end after our END: a hop that failed and was answered "service unavailable" left
    its row OPEN, and the sweep counted the session timed_out besides the hop's unavailable. The hop now closes
    the row (Incomplete, "unavailable"), counted once; the sweep finds nothing to close."""
    from channels.ussd import service
    from tests.channels.ussd.test_hubtel_nalo_flows import nalo

    session_id = f"{aggregator}-unavailable"
    if aggregator == "hubtel":
        phone = HubtelPhone(client, HUBTEL_EN_MTN, session_id)
        await phone.post("Initiation", "*384*123#")
    else:
        await nalo(client, session_id, "*384*123#", True)
    before = _counted(aggregator, "unavailable")
    with monkeypatch.context() as patched:
        patched.setattr(service.sessions, "save", _redis_down)
        if aggregator == "hubtel":
            answer = await phone.post("Response", "1")
            assert (answer["Type"], answer["Message"]) == (
                "Release", "Service unavailable, please try again later.")
        else:
            answer = await nalo(client, session_id, "1", False)
            assert answer["MSGTYPE"] is False
    assert _added(before, _counted(aggregator, "unavailable")) == {"unavailable": 1}
    row = await _row(db, session_id)
    assert (row.status, row.error) == ("Incomplete", "unavailable") and row.ended_at is not None
    await _age(rt, session_id, 11)
    assert await records.close_abandoned(rt) == 0
    assert _added(before, _counted(aggregator, "unavailable")) == {"unavailable": 1}


async def test_a_shed_hop_mid_session_closes_its_row_once(capped_client: Any, demo: Any, db: Any, rt: Any,
                                                          monkeypatch: Any) -> None:
    """A Hubtel hop shed past the cap on hops in flight mid-session: counted busy once, by its row's close in the
    background; the sweep then finds the row closed. (An opening hop shed has no row: counted, nothing written;
    tests/channels/ussd/test_overload.py.)"""
    from channels.ussd.routes import USSD
    from tests.channels.ussd.test_overload import Gate

    phone = await _hubtel_to_confirm(capped_client, "hubtel-shed")
    before = _counted("hubtel", "busy")
    gate = Gate()
    monkeypatch.setattr(sessions_module(), "load_opening", gate.hold(sessions_module().load_opening))
    held = [asyncio.create_task(AtPhone(capped_client, EN_MTN).dial()) for _ in range(2)]
    await gate.until(2)
    answer = await phone.post("Response", "2")
    assert (answer["Type"], answer["Message"]) == ("Release", "Service unavailable, please try again later.")
    await capped_client.app[USSD].settled()
    assert _added(before, _counted("hubtel", "busy")) == {"busy": 1}
    row = await _row(db, "hubtel-shed")
    assert (row.status, row.error) == ("Incomplete", "busy") and row.ended_at is not None
    gate.opened.set()
    await asyncio.gather(*held)
    await _age(rt, "hubtel-shed", 11)
    assert await records.close_abandoned(rt) == 0
    assert _added(before, _counted("hubtel", "busy")) == {"busy": 1}


async def test_hubtels_release_of_a_shed_opening_hop_counts_nothing_more(capped_client: Any, demo: Any, db: Any,
                                                                        rt: Any, monkeypatch: Any) -> None:
    """A Hubtel opening hop shed past the cap on hops in flight is counted busy, nothing written (no row, no state);
    Hubtel's Release (or Timeout) of that session after our END finds neither, and used to count it abandoned too:
    twice. It counts nothing: the session is counted once, busy."""
    from channels.ussd.routes import USSD
    from tests.channels.ussd.test_overload import Gate

    before = _counted("hubtel", "busy")
    gate = Gate()
    monkeypatch.setattr(sessions_module(), "load_opening", gate.hold(sessions_module().load_opening))
    held = [asyncio.create_task(AtPhone(capped_client, EN_MTN).dial()) for _ in range(2)]
    await gate.until(2)
    phone = HubtelPhone(capped_client, HUBTEL_EN_MTN, "hubtel-shed-opening")
    answer = await phone.post("Initiation", "*384*123#")
    assert (answer["Type"], answer["Message"]) == ("Release", "Service unavailable, please try again later.")
    gate.opened.set()
    await asyncio.gather(*held)
    assert (await phone.post("Release", ""))["Type"] == "Release"
    assert (await phone.post("Timeout", ""))["Type"] == "Release"
    await capped_client.app[USSD].settled()
    assert _added(before, _counted("hubtel", "busy")) == {"busy": 1}
    assert await db.count(UssdSession, UssdSession.session_id == "hubtel-shed-opening") == 0


async def test_africas_talkings_opening_hop_with_its_code_in_the_text_answered_unavailable_is_counted(
        client: Any, demo: Any, db: Any, rt: Any, monkeypatch: Any) -> None:
    """Africa's Talking sends a cooperative's code dialled (*384*123*7#) as the opening hop's text ("7"): that hop
    is not is_new. One that fails (Redis away) before writing its row is answered "service unavailable": it opened the
    session, which has no row, and counts it (unavailable), once: its close, which finds no row, took it for a Hubtel
    Release after a shed opening hop and counted nothing, and the Success notice of our END counts nothing either."""
    from channels.ussd import service
    from channels.ussd.routes import USSD

    before = _counted(AT, "unavailable")
    phone = AtPhone(client, EN_MTN)
    phone.inputs.append("7")
    with monkeypatch.context() as patched:
        patched.setattr(service.sessions, "load", _redis_down)
        assert (await phone.dial()) == "END Service unavailable, please try again later."
    await client.app[USSD].settled()
    await _notice(client, phone.session_id, "Success")
    assert _added(before, _counted(AT, "unavailable")) == {"unavailable": 1}


async def test_africas_talkings_success_notice_of_a_shed_opening_hop_counts_nothing_more(
        capped_client: Any, demo: Any, db: Any, rt: Any, monkeypatch: Any) -> None:
    """Africa's Talking's notice of the END that answered a shed opening hop says Success: it writes the session's row
    and counts nothing (Nalo reports no end at all). The session is counted once, busy."""
    from tests.channels.ussd.test_overload import Gate

    before = _counted(AT, "busy")
    gate = Gate()
    monkeypatch.setattr(sessions_module(), "load_opening", gate.hold(sessions_module().load_opening))
    held = [asyncio.create_task(AtPhone(capped_client, RW_MTN).dial()) for _ in range(2)]
    await gate.until(2)
    phone = AtPhone(capped_client, EN_MTN)
    assert (await phone.dial()) == "END Service unavailable, please try again later."
    gate.opened.set()
    await asyncio.gather(*held)
    await _notice(capped_client, phone.session_id, "Success")
    assert _added(before, _counted(AT, "busy")) == {"busy": 1}


def sessions_module() -> Any:
    from channels.ussd import sessions

    return sessions


@pytest.fixture
async def capped_client(rt: Any, aiohttp_client: Any, settings_factory: Any) -> Any:
    """The app with room for two hops in flight."""
    from app import create_app

    return await aiohttp_client(create_app(settings_factory(USSD_MAX_HOPS_IN_FLIGHT="2"), runtime=rt))


async def test_an_end_after_the_notice_leaves_the_notices_end_and_duration(client: Any, demo: Any, db: Any,
                                                                           rt: Any) -> None:
    """Africa's Talking gave up on the session and said when; the END hop that comes after writes what it knows
    (its screen, hops) but not its own instant and duration over the aggregator's."""
    phone = AtPhone(client, EN_MTN)
    await _to_confirm(phone)
    await _notice(client, phone.session_id, "Incomplete", "network timeout")
    noticed = await _row(db, phone.session_id)
    assert noticed.duration_ms == 20000
    await asyncio.sleep(0.05)
    await _cancel(phone)
    row = await _row(db, phone.session_id)
    assert (row.status, row.error, row.ended_at, row.duration_ms, row.last_screen) == (
        "Incomplete", "network timeout", noticed.ended_at, 20000, "pay_cancelled")


async def test_a_shed_hop_whose_close_comes_after_africas_talkings_success_notice_is_counted_once(
        capped_client: Any, demo: Any, db: Any, rt: Any, monkeypatch: Any) -> None:
    """An Africa's Talking hop shed mid-session: its row's close runs in the background, after the END "unavailable"
    was answered, and Africa's Talking's Success notice of that END (which counts nothing: the hop that ended the
    session counts it) may close the row first, the database being slow under the load that shed the hop. The
    session is still counted, busy, once."""
    from channels.ussd.routes import USSD
    from tests.channels.ussd.test_overload import Gate

    phone = AtPhone(capped_client, EN_MTN)
    await _to_confirm(phone)
    before = _counted(AT, "busy")
    gate, closing = Gate(), Gate()
    monkeypatch.setattr(sessions_module(), "load_opening", gate.hold(sessions_module().load_opening))
    monkeypatch.setattr(records, "closed", closing.hold(records.closed))
    held = [asyncio.create_task(AtPhone(capped_client, RW_MTN).dial()) for _ in range(2)]
    await gate.until(2)
    assert (await phone.send("2")) == "END Service unavailable, please try again later."
    await closing.until(1)
    await _notice(capped_client, phone.session_id, "Success")
    closing.opened.set()
    await capped_client.app[USSD].settled()
    gate.opened.set()
    await asyncio.gather(*held)
    assert _added(before, _counted(AT, "busy")) == {"busy": 1}
    await _notice(capped_client, phone.session_id, "Success")  # its retry
    assert _added(before, _counted(AT, "busy")) == {"busy": 1}


@pytest.mark.parametrize("aggregator", ["hubtel", "nalo"])
async def test_an_opening_hop_answered_unavailable_of_an_id_used_before_is_counted(
        aggregator: str, client: Any, demo: Any, db: Any, rt: Any, monkeypatch: Any) -> None:
    """Hubtel and Nalo use a session id again on another day: the previous session's row is there, closed and
    counted. A new session of the id whose opening hop fails (Redis away) before its row is written is answered
    "service unavailable": that session is counted (unavailable), once, and its row, written closed by the hop's close
    in place of the previous session's (as its opening would have), is this session's: a retry of its opening request
    goes on from it, counted no more."""
    from channels.ussd import service
    from tests.channels.ussd.test_hubtel_nalo_flows import nalo

    session_id = f"{aggregator}-used-again"
    if aggregator == "hubtel":
        await HubtelPhone(client, HUBTEL_EN_MTN, session_id).post("Initiation", "*384*123#")
    else:
        await nalo(client, session_id, "*384*123#", True)
    await _age(rt, session_id, 60 * 24)
    assert await records.close_abandoned(rt) == 1
    previous = await _row(db, session_id)
    before = _counted(aggregator, "unavailable")
    with monkeypatch.context() as patched:
        patched.setattr(service.sessions, "load_opening", _redis_down)
        if aggregator == "hubtel":
            answer = await HubtelPhone(client, HUBTEL_EN_MTN, session_id).post("Initiation", "*384*123#")
            assert answer["Type"] == "Release"
        else:
            assert (await nalo(client, session_id, "*384*123#", True))["MSGTYPE"] is False
    assert _added(before, _counted(aggregator, "unavailable")) == {"unavailable": 1}
    row = await _row(db, session_id)
    assert (row.status, row.error, row.hops) == ("Incomplete", "unavailable", 0)
    assert row.started_at > previous.started_at and row.ended_at > previous.ended_at


async def test_a_close_writes_its_end_as_every_other_time_is_written(client: Any, demo: Any, db: Any,
                                                                     rt: Any) -> None:
    """The row's end, written by a close, is stored as the column's type stores it (UTC, on SQLite the same text as
    every other time: no offset), not as the database driver would render a bare value."""
    from sqlalchemy import text

    phone = AtPhone(client, EN_MTN)
    await _to_confirm(phone)
    await _cancel(phone)
    async with rt.sessionmaker() as s:
        started, ended = (await s.execute(text("SELECT CAST(started_at AS TEXT), CAST(ended_at AS TEXT) "
                                               "FROM ussd_sessions WHERE session_id = :id"),
                                          {"id": phone.session_id})).one()
    digits = ".0123456789"  # (the offset after the seconds: none on SQLite, "+00" on PostgreSQL)
    assert ended[19:].lstrip(digits) == started[19:].lstrip(digits), (started, ended)


@pytest.mark.parametrize(("aggregator", "counted"), [("hubtel", 0.0), ("africastalking", 1.0)])
async def test_past_the_cap_on_background_closes_nothing_is_written_and_counted_as_a_failed_close(
        aggregator: str, counted: float, rt: Any) -> None:
    """MAX_PENDING_CLOSES closes already running (each waiting for a pool connection, the process overloaded): the
    next session ended unanswered is not written, and counted as a close that failed is: on Africa's Talking by the
    hop (its Success notice counts nothing), on Hubtel and Nalo by the sweep, from its row left OPEN."""
    from channels.ussd import routes
    from channels.ussd.types import UssdTurn

    channel = routes.UssdChannel(())
    held = [asyncio.get_running_loop().create_future() for _ in range(routes.MAX_PENDING_CLOSES)]
    channel._closing.update(asyncio.ensure_future(f) for f in held)
    turn = UssdTurn(aggregator=aggregator, session_id=f"{aggregator}-capped", phone=normalize(EN_MTN),
                    service_code="*384*123#", input="1", is_new=False)
    before = _counted(aggregator, "busy")
    await channel.end_unanswered(rt, turn, "busy", 0.0)
    assert len(channel._closing) == routes.MAX_PENDING_CLOSES  # no close started
    added = _added(before, _counted(aggregator, "busy"))
    assert added == ({"busy": counted} if counted else {})
    for f in held:
        f.cancel()


@pytest.mark.parametrize("kind", ["Timeout", "Release"])
async def test_hubtels_close_that_read_the_session_before_its_end_leaves_the_ends_hops_and_screen(
        kind: str, client: Any, demo: Any, db: Any, rt: Any, monkeypatch: Any) -> None:
    """Hubtel's Release (or Timeout) sent while her last hop runs on another serve process: it read the session as it
    was before that hop (the confirmation), and its close came after the hop's END closed the row. It wrote its older
    hops and screen over the END's: the row of a session that paid said 3 hops, last screen pay_confirm (the ops
    page's USSD funnel counted a payment's session as left at its confirmation)."""
    phone = await _hubtel_to_confirm(client, f"hubtel-read-before-{kind}")
    before_end = await sessions.load(rt.hot_redis, "hubtel", phone.session_id)
    assert before_end is not None and before_end.state.screen == "pay_confirm"
    assert (await phone.post("Response", "2"))["Type"] == "Release"
    ended = await _row(db, phone.session_id)
    assert (ended.status, ended.last_screen, ended.hops) == ("Success", "pay_cancelled", 4)

    async def as_read_before_the_end(*_args: Any) -> Any:
        return before_end

    monkeypatch.setattr(sessions, "load", as_read_before_the_end)
    assert (await phone.post(kind, ""))["Type"] == "Release"
    row = await _row(db, phone.session_id)
    assert (row.status, row.last_screen, row.hops, row.ended_at) == ("Success", "pay_cancelled", 4, ended.ended_at)


def _opening_row_fails(patched: Any, *, closes_fail: bool = False) -> None:
    """The opening hop's write of its session row fails (the database away), as on SQLite, where it runs beside the
    session's save (PostgreSQL writes it with the memberships' read, before the save: a failure there saves nothing);
    `closes_fail`: the close of the hop's row too (the database still away)."""

    async def apart(*_args: Any, **_kwargs: Any) -> None:
        return None  # no row written with the memberships: records.opened() writes it beside the save

    async def database_down(*_args: Any, **_kwargs: Any) -> Any:
        raise ConnectionError("database went away")

    patched.setattr(records, "opened_reading", apart)
    patched.setattr(records, "opened", database_down)
    if closes_fail:
        patched.setattr(records, "closed", database_down)


async def _open_unavailable(client: Any, aggregator: str, session_id: str) -> Any:
    """The session's opening hop on `aggregator`, which must be answered END "service unavailable"; its phone."""
    from tests.channels.ussd.test_hubtel_nalo_flows import nalo

    unavailable = "Service unavailable, please try again later."
    if aggregator == "hubtel":
        phone: Any = HubtelPhone(client, HUBTEL_EN_MTN, session_id)
        answer = await phone.post("Initiation", "*384*123#")
        assert (answer["Type"], answer["Message"]) == ("Release", unavailable), answer
        return phone
    if aggregator == "nalo":
        answer = await nalo(client, session_id, "*384*123#", True)
        assert answer["MSGTYPE"] is False, answer
        return None
    phone = AtPhone(client, EN_MTN, session_id=session_id)
    assert await phone.dial() == f"END {unavailable}"
    return phone


async def _after_the_end(client: Any, rt: Any, aggregator: str, phone: Any, kind: str) -> None:
    """What follows our END: Hubtel's Release or Timeout, Africa's Talking's Success notice; Nalo reports nothing, and
    the sweep finds nothing to close."""
    if aggregator == "hubtel":
        assert (await phone.post(kind, ""))["Type"] == "Release"
    elif aggregator == AT:
        await _notice(client, phone.session_id, "Success")
    assert await records.close_abandoned(rt, now=records.utcnow() + records.ABANDONED_AFTER * 2) == 0


async def _funnel_home(rt: Any) -> int:
    from core.ops import FUNNEL_ALL, funnel_field, funnel_key

    return int(await rt.redis.hget(funnel_key(records.utcnow()), funnel_field(FUNNEL_ALL, "home")) or 0)


@pytest.mark.parametrize(("aggregator", "kind"), [("hubtel", "Release"), ("hubtel", "Timeout"), ("nalo", ""),
                                                  (AT, "")])
async def test_an_opening_hop_whose_row_write_fails_is_counted_once(aggregator: str, kind: str, client: Any,
                                                                    demo: Any, db: Any, rt: Any,
                                                                    monkeypatch: Any) -> None:
    """The opening hop's row write fails once while its session is saved in Redis: answered "service unavailable",
    counted so. Its state stayed, and Hubtel's Release (or Timeout) after that END found it, with no row, and counted
    the session a second time (abandoned). The hop now takes its state back (and the funnel's count of its menu, which
    the member never saw): the Release counts nothing, and the session is counted once, unavailable."""
    from channels.ussd.routes import USSD

    session_id = f"{aggregator}-unwritten-{kind}"
    before, home = _counted(aggregator, "unavailable"), await _funnel_home(rt)
    with monkeypatch.context() as patched:
        _opening_row_fails(patched)
        phone = await _open_unavailable(client, aggregator, session_id)
        await client.app[USSD].settled()
    left, home_after = await sessions.load(rt.hot_redis, aggregator, session_id), await _funnel_home(rt)
    await _after_the_end(client, rt, aggregator, phone, kind)
    assert _added(before, _counted(aggregator, "unavailable")) == {"unavailable": 1}
    assert left is None and home_after == home
    rows = await db.all(UssdSession, UssdSession.session_id == session_id)
    # The hop's close writes the row closed (unavailable) that its opening could not; Africa's Talking's Success
    # notice writes its word on it.
    assert [row.status for row in rows] == (["Success"] if aggregator == AT else ["Incomplete"])


@pytest.mark.parametrize("aggregator", ["hubtel", "nalo", AT])
async def test_an_opening_hop_whose_row_and_close_fail_is_counted_once(aggregator: str, client: Any, demo: Any,
                                                                       db: Any, rt: Any, monkeypatch: Any) -> None:
    """The database away for the opening hop's row and for its close: on Hubtel and Nalo a close that fails leaves
    the session to the sweep (its row OPEN), but this one has no row: Nalo's session went uncounted, Hubtel's was
    counted abandoned by its Release. The hop counts it, unavailable, once."""
    from channels.ussd.routes import USSD

    session_id = f"{aggregator}-database-away"
    before = _counted(aggregator, "unavailable")
    with monkeypatch.context() as patched:
        _opening_row_fails(patched, closes_fail=True)
        phone = await _open_unavailable(client, aggregator, session_id)
        await client.app[USSD].settled()
    await _after_the_end(client, rt, aggregator, phone, "Release")
    assert _added(before, _counted(aggregator, "unavailable")) == {"unavailable": 1}


async def test_a_session_whose_state_outlived_its_unwritten_row_is_not_counted_again(
        client: Any, demo: Any, db: Any, rt: Any, monkeypatch: Any) -> None:
    """The opening hop could not write its row nor take its state back (Redis gone right after the save): Hubtel's
    Release finds the state and the row the hop's close wrote closed, and counts nothing (the hop counted the session,
    unavailable)."""
    from channels.ussd.routes import USSD

    async def redis_away(*_args: Any, **_kwargs: Any) -> None:
        raise ConnectionError("redis went away")

    before = _counted("hubtel", "unavailable")
    with monkeypatch.context() as patched:
        _opening_row_fails(patched)
        patched.setattr(sessions, "unsave", redis_away, raising=False)  # (raising: to run it without the fix)
        phone = await _open_unavailable(client, "hubtel", "hubtel-state-kept")
        await client.app[USSD].settled()
    assert await sessions.load(rt.hot_redis, "hubtel", "hubtel-state-kept") is not None
    assert (await phone.post("Release", ""))["Type"] == "Release"
    assert _added(before, _counted("hubtel", "unavailable")) == {"unavailable": 1}
    # (The hop's close wrote the row closed, which its opening could not.)
    assert [row.status for row in await db.all(UssdSession, UssdSession.session_id == "hubtel-state-kept")] == [
        "Incomplete"]


@pytest.mark.parametrize(("aggregator", "kind"), [("hubtel", "Release"), ("hubtel", "Timeout"), ("nalo", ""),
                                                  (AT, "")])
async def test_an_opening_hop_whose_row_write_failed_after_its_commit_is_counted_once(
        aggregator: str, kind: str, client: Any, demo: Any, db: Any, rt: Any, monkeypatch: Any) -> None:
    """The opening hop's row write is committed, but its answer is lost (the connection drops after the COMMIT):
    the hop cannot tell a row written from one not written. Answered "service unavailable", counted so, once: its
    close finds the row OPEN and closes it. Closing nothing, the hop left the row OPEN, and Hubtel's Release (or the
    sweep, on Nalo) counted the session a second time."""
    from channels.ussd.routes import USSD

    real_opened = records.opened

    async def apart(*_args: Any, **_kwargs: Any) -> None:
        return None

    async def written_then_lost(*args: Any, **kwargs: Any) -> None:
        await real_opened(*args, **kwargs)
        raise ConnectionError("connection lost after the COMMIT")

    session_id = f"{aggregator}-committed-{kind}"
    before = _counted(aggregator, "unavailable")
    with monkeypatch.context() as patched:
        patched.setattr(records, "opened_reading", apart)
        patched.setattr(records, "opened", written_then_lost)
        phone = await _open_unavailable(client, aggregator, session_id)
        await client.app[USSD].settled()
    await _after_the_end(client, rt, aggregator, phone, kind)
    assert _added(before, _counted(aggregator, "unavailable")) == {"unavailable": 1}
    rows = await db.all(UssdSession, UssdSession.session_id == session_id)
    assert [(row.status, row.error) for row in rows] == [
        ("Success" if aggregator == AT else "Incomplete", None if aggregator == AT else "unavailable")]


@pytest.mark.parametrize("aggregator", ["hubtel", "nalo", AT])
async def test_an_opening_hop_whose_memberships_read_and_close_fail_is_counted_once(
        aggregator: str, client: Any, demo: Any, db: Any, rt: Any, monkeypatch: Any) -> None:
    """PostgreSQL writes the session's row in the opening hop's memberships statement: the database away, that
    statement fails (no row, nothing saved) and so does the hop's close. On Hubtel and Nalo a failing close leaves
    the session to the sweep, which had no row to count: the session went uncounted. Counted once, unavailable."""
    from channels.ussd import flows
    from channels.ussd.routes import USSD

    async def database_down(*_args: Any, **_kwargs: Any) -> Any:
        raise ConnectionError("database went away")

    session_id = f"{aggregator}-memberships-away"
    before = _counted(aggregator, "unavailable")
    with monkeypatch.context() as patched:
        patched.setattr(flows, "opening_memberships", database_down)
        patched.setattr(flows, "memberships", database_down)
        patched.setattr(records, "closed", database_down)
        phone = await _open_unavailable(client, aggregator, session_id)
        await client.app[USSD].settled()
    await _after_the_end(client, rt, aggregator, phone, "Release")
    assert _added(before, _counted(aggregator, "unavailable")) == {"unavailable": 1}


async def test_an_opening_hop_taken_back_after_the_hour_turned_uncounts_the_hour_it_counted_in(
        rt: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # The opening hop counts its funnel fields in its hour's key; its take-back (no row could be written) comes a
    # moment later. Across an hour's turn it took them from the new hour's key: the old hour kept them, and the new
    # key was made at -1, with no expiry.
    from datetime import UTC, datetime

    from core.ops import funnel_key

    before, after = datetime(2026, 12, 7, 10, 59, 59, 900_000, UTC), datetime(2026, 12, 7, 11, 0, 0, 100_000, UTC)
    redis, read = rt.hot_redis, rt.redis
    await read.delete(funnel_key(before), funnel_key(after))
    stored = sessions.Stored(state=sessions.State(screen="home"), seen="")
    monkeypatch.setattr(sessions, "utcnow", lambda: before)
    assert await sessions.save(redis, "hubtel", "hour-turn", stored, funnel=["opened", "home"]) is None
    assert await read.hgetall(funnel_key(before)) == {b"opened": b"1", b"home": b"1"}
    monkeypatch.setattr(sessions, "utcnow", lambda: after)
    await sessions.unsave(redis, "hubtel", "hour-turn", stored, funnel=["opened", "home"])
    assert await read.hgetall(funnel_key(before)) == {b"opened": b"0", b"home": b"0"}
    assert await read.exists(funnel_key(after)) == 0
    assert await read.get(sessions.session_key("hubtel", "hour-turn")) is None
    # Taken back once: a second take-back of the same save counts nothing more.
    await sessions.unsave(redis, "hubtel", "hour-turn", stored, funnel=["opened", "home"])
    assert await read.hgetall(funnel_key(before)) == {b"opened": b"0", b"home": b"0"}
    await read.delete(funnel_key(before))


async def test_a_take_back_never_makes_an_expired_hours_key_again(rt: Any) -> None:
    # The hour's key gone meanwhile (expired, or flushed): taken back into nothing, not made again at -1 forever.
    # (That key, the one save() counted in: the hour's key of the time asserted was another one when the hour
    # turned in between.)
    redis, read = rt.hot_redis, rt.redis
    stored = sessions.Stored(state=sessions.State(screen="home"), seen="")
    assert await sessions.save(redis, "nalo", "gone-hour", stored, funnel=["opened"]) is None
    hour = stored.counted_in
    assert hour is not None
    await read.delete(hour)
    await sessions.unsave(redis, "nalo", "gone-hour", stored, funnel=["opened"])
    assert await read.exists(hour) == 0


@pytest.mark.parametrize("aggregator", ["hubtel", "nalo", AT])
async def test_an_opening_hop_cut_off_while_writing_its_row_with_its_close_failing_is_counted_once(
        aggregator: str, client: Any, demo: Any, db: Any, rt: Any, monkeypatch: Any) -> None:
    """The opening hop's row write hangs (the database stalled) past the hop's budget, and the database is away for
    its close too: answered "service unavailable", the close fails. On Hubtel and Nalo a failing close leaves the
    session to the sweep (its row OPEN), but this one has no row: the session went uncounted (Africa's Talking's
    hop counted it). Counted once, unavailable, on all three."""
    from channels.ussd.routes import USSD

    async def apart(*_args: Any, **_kwargs: Any) -> None:
        return None  # no row written with the memberships: records.opened() writes it beside the save

    async def stalled(*_args: Any, **_kwargs: Any) -> None:
        await asyncio.sleep(30)

    async def database_down(*_args: Any, **_kwargs: Any) -> Any:
        raise ConnectionError("database went away")

    channel = client.app[USSD]
    session_id = f"{aggregator}-cut-off-unwritten"
    before = _counted(aggregator, "unavailable")
    with monkeypatch.context() as patched:
        patched.setattr(channel, "budget", 0.3)
        patched.setattr(records, "opened_reading", apart)
        patched.setattr(records, "opened", stalled)
        patched.setattr(records, "closed", database_down)
        phone = await _open_unavailable(client, aggregator, session_id)
        await channel.settled()
    await _after_the_end(client, rt, aggregator, phone, "Release")
    assert _added(before, _counted(aggregator, "unavailable")) == {"unavailable": 1}


@pytest.mark.parametrize("aggregator", ["hubtel", "nalo", AT])
async def test_a_retried_opening_request_after_its_unavailable_answer_is_counted_once(
        aggregator: str, client: Any, demo: Any, db: Any, rt: Any, monkeypatch: Any) -> None:
    """The opening hop fails before its row is written (Redis away) and is answered "service unavailable", counted so;
    the aggregator then sends the opening request again (the same session id), which goes on. It opened a new row,
    OPEN, and its own end counted the session a second time (Hubtel's Release abandoned, Africa's Talking's notice
    incomplete, Nalo's sweep timed_out). The failed hop's close writes the session's row closed: the retry goes on
    from it, and the session is counted once, unavailable (its row then tells what the retry did)."""
    from channels.ussd import service
    from channels.ussd.routes import USSD
    from tests.channels.ussd.test_hubtel_nalo_flows import nalo

    session_id = f"{aggregator}-retried-opening"
    before = _counted(aggregator, "unavailable")
    with monkeypatch.context() as patched:
        patched.setattr(service.sessions, "load_opening", _redis_down)
        phone = await _open_unavailable(client, aggregator, session_id)
        await client.app[USSD].settled()
    if aggregator == "hubtel":
        phone = HubtelPhone(client, HUBTEL_EN_MTN, session_id)
        assert (await phone.post("Initiation", "*384*123#"))["Type"] == "Response"
        assert (await phone.post("Response", "1"))["Type"] == "Response"
        assert (await phone.post("Release", ""))["Type"] == "Release"
    elif aggregator == "nalo":
        assert (await nalo(client, session_id, "*384*123#", True))["MSGTYPE"] is True
        assert (await nalo(client, session_id, "1", False))["MSGTYPE"] is True
    else:
        phone = AtPhone(client, EN_MTN, session_id=session_id)
        assert (await phone.dial()).startswith("CON ")
        assert (await phone.send("1")).startswith("CON ")
        await _notice(client, session_id, "Incomplete", "user left")
    assert await records.close_abandoned(rt, now=records.utcnow() + records.ABANDONED_AFTER * 2) == 0
    assert _added(before, _counted(aggregator, "unavailable")) == {"unavailable": 1}
    assert (await _row(db, session_id)).status != "OPEN"
