"""`main.py sync-opt-outs`, after the rolling deploy of the release with migration 0016: a STOP or START that a
process of the release before it took meanwhile changed the memberships' flags (and left the audit rows) but not
the number's opt-out (phone_opt_outs), which the worker's send-time check and every later membership read."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from core.audit import Actor, record
from core.db import utcnow
from core.members import SMS_OPT_OUT_ACTION, create_member, number_opted_out, release_phone, replay_opt_outs
from core.models import AuditEvent, Member, PhoneOptOut
from core.phone import normalize
from core.reminders import scan, why_not_send
from tests.channels.sms.helpers import jobs_of
from tests.channels.sms.test_routes import ALINE, JEAN, inbound
from tests.channels.sms.test_stop_and_reply_limits import NOW, _second_coop
from tests.conftest import _base_env

ROOT = Path(__file__).resolve().parent.parent
SYSTEM = Actor("system", "system")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "main.py", "sync-opt-outs", *args], cwd=ROOT, capture_output=True,
                          text=True, env=_base_env(), timeout=120, check=False)


async def _previous_release(rt: Any, phone: str, command: str, *, at: datetime | None = None) -> None:
    """A STOP or START as a process of the release before 0016 took it (cc79f48's channels.sms.routes): each
    membership's flag and its audit row, and nothing for the number. `at`: the audit row's time (the log is
    append-only: dated as it is written)."""
    opt_out = command == "STOP"
    if at is not None:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr("core.audit.utcnow", lambda: at)
            return await _previous_release(rt, phone, command)
    async with rt.sessionmaker.begin() as s:
        for member in (await s.execute(select(Member).where(
                Member.phone_index == rt.cipher.blind_index(phone)))).scalars().all():
            if member.reminders_opt_out != opt_out:
                await s.execute(update(Member).where(Member.id == member.id)
                                .values(reminders_opt_out=opt_out, updated_at=utcnow()))
                await record(s, actor=Actor(f"phone:{normalize(phone).masked()}", "sms"),
                             action=SMS_OPT_OUT_ACTION, entity_type="member", entity_id=member.id,
                             before={"reminders_opt_out": not opt_out}, after={"reminders_opt_out": opt_out},
                             cooperative_id=member.cooperative_id)


async def _opted_out(rt: Any) -> set[str]:
    async with rt.sessionmaker() as s:
        return set((await s.execute(select(PhoneOptOut.phone_index))).scalars())


async def _join_elsewhere(rt: Any, phone: str) -> Member:
    coop = await _second_coop(rt)
    async with rt.sessionmaker.begin() as s:
        return await create_member(s, rt.cipher, cooperative_id=coop.id, name="Aline Uwase", phone=normalize(phone),
                                   actor=SYSTEM)


async def test_a_start_taken_by_the_previous_release_brings_her_reminders_back(rt, demo, client):
    """STOP before the deploy (0016's back-fill, or a new serve), START on a process not yet restarted: her
    number stayed opted out, and the new worker dropped every reminder at send time."""
    await inbound(client, ALINE, "STOP", "in-stop")
    since = datetime.now(UTC)
    await _previous_release(rt, ALINE, "START")
    assert await _opted_out(rt) == {rt.cipher.blind_index(ALINE)}  # what the deploy left

    done = _run("--since", since.isoformat())
    assert done.returncode == 0, done.stderr
    assert f"{normalize(ALINE).masked()}: opted in again (START at " in done.stdout
    assert "sync-opt-outs: 1 number changed" in done.stdout
    assert ALINE not in done.stdout  # masked only
    assert await _opted_out(rt) == set()

    async with rt.sessionmaker.begin() as s:  # the worker's morning scan, then its send-time check
        await scan(s, rt, now=NOW)
    # Her reminder (the STOP's and START's replies are hers too: tests/admin_api/test_keyword_replies_listed.py).
    [job] = [j for j in await jobs_of(rt, "sms.send")
             if (j.payload.get("member_id"), j.payload.get("template")) == (demo["members"][ALINE], "payment_reminder")]
    async with rt.engine.connect() as conn:
        assert await why_not_send(conn, job.payload) is None

    again = _run("--since", since.isoformat())  # run twice: nothing more to change
    assert again.returncode == 0 and "sync-opt-outs: 0 numbers changed" in again.stdout


async def test_a_stop_taken_by_the_previous_release_holds_for_a_later_membership(rt, demo):
    since = datetime.now(UTC)
    await _previous_release(rt, ALINE, "STOP")
    [changed] = await replay_opt_outs(rt.sessionmaker, since)
    assert (changed.phone_masked, changed.opted_out) == (normalize(ALINE).masked(), True)
    assert await _opted_out(rt) == {rt.cipher.blind_index(ALINE)}
    # The later membership holds it at send time, not in its own flag (which said True before the fix of the STOP
    # list read through member.created: a cooperative must not learn of a STOP sent elsewhere).
    later = await _join_elsewhere(rt, ALINE)
    assert later.reminders_opt_out is False
    async with rt.engine.connect() as conn:
        assert await conn.scalar(select(number_opted_out(later.phone_index))) is True


async def test_of_a_stop_and_a_start_in_the_window_the_latest_wins_by_time_then_id(rt, demo, client):
    """The old serves' rows are dated the same instant (two serves' clocks at once): the audit row's id orders
    them. Aline: STOP (a new serve, before) then START, STOP, START (old ones); Jean: STOP, START, STOP."""
    await inbound(client, ALINE, "STOP", "in-stop")
    since = datetime.now(UTC)
    for command in ("START", "STOP", "START"):
        await _previous_release(rt, ALINE, command, at=since)
    for command in ("STOP", "START", "STOP"):
        await _previous_release(rt, JEAN, command, at=since)

    changed = await replay_opt_outs(rt.sessionmaker, since)
    assert {(c.phone_masked, c.opted_out) for c in changed} == {(normalize(ALINE).masked(), False),
                                                                 (normalize(JEAN).masked(), True)}
    assert await _opted_out(rt) == {rt.cipher.blind_index(JEAN)}


async def test_this_releases_own_stop_and_start_replayed_change_nothing(rt, demo, client):
    """The release with 0016 writes the same audit rows and the number's opt-out in one transaction."""
    since = datetime.now(UTC)
    await inbound(client, ALINE, "STOP", "in-1")
    await inbound(client, JEAN, "STOP", "in-2")
    await inbound(client, JEAN, "START", "in-3")
    async with rt.sessionmaker() as s:
        rows = (await s.execute(select(AuditEvent.after).where(AuditEvent.action == SMS_OPT_OUT_ACTION)
                                .order_by(AuditEvent.id))).scalars().all()
    assert rows == [{"remindersOptOut": True}, {"remindersOptOut": True}, {"remindersOptOut": False}]
    assert await replay_opt_outs(rt.sessionmaker, since) == []
    assert await _opted_out(rt) == {rt.cipher.blind_index(ALINE)}


async def test_released_numbers_and_rows_before_since_are_left_alone(rt, demo):
    """Aline's number released (by this release) after an old serve's STOP, then given to someone else: the STOP
    was the last holder's. Jean's STOP before `since` is 0016's back-fill's, not the replay's."""
    since = datetime.now(UTC)
    await _previous_release(rt, JEAN, "STOP", at=since - timedelta(microseconds=1))
    await _previous_release(rt, ALINE, "STOP")
    async with rt.sessionmaker.begin() as s:
        aline = await s.get(Member, demo["members"][ALINE])
        assert aline is not None
        aline.status = "SUSPENDED"
        await s.flush()
        await release_phone(s, aline, actor=SYSTEM)
    holder = await _join_elsewhere(rt, ALINE)

    assert await replay_opt_outs(rt.sessionmaker, since) == []
    assert await _opted_out(rt) == set()
    async with rt.sessionmaker() as s:
        assert (await s.get(Member, holder.id)).reminders_opt_out is False


async def test_a_since_without_its_offset_is_refused(rt):
    refused = _run("--since", "2026-12-02T09:30:00")
    assert refused.returncode == 2 and refused.stdout == ""
    assert "has no offset: give it in UTC, e.g. 2026-12-02T09:30:00Z" in refused.stderr
    assert _run("--since", "yesterday").returncode == 2
    # Before the first instant UTC can hold: an argument error, not a traceback.
    early = _run("--since", "0001-01-01T00:00:00+01:00")
    assert early.returncode == 2 and "is out of range" in early.stderr and "Traceback" not in early.stderr


async def test_a_bare_date_is_refused_with_an_example_the_command_takes(rt):
    # The day `migrate` ran, as an operator may first give it: the example it is shown must itself be taken
    # ("2026-12-02Z" is no ISO 8601 time: refused again).
    refused = _run("--since", "2026-12-02")
    assert refused.returncode == 2 and refused.stdout == ""
    assert "has no offset: give it in UTC, e.g. 2026-12-02T00:00:00Z" in refused.stderr
    taken = _run("--since", "2026-12-02T00:00:00Z")
    assert taken.returncode == 0, taken.stderr
