"""A large member import shares its serve's event loop with the USSD hops: it gives the loop a turn every few rows
(core.member_import.turns, read_rows), from reading the file to the warnings of its answer.

A 10,000-row import held the loop for up to 0.4 s in one stretch (its phone warnings), and its parsing, in a thread,
held the interpreter's lock the hops waited for: hops took 0.4-0.7 s while it ran. No time is measured here: what
runs between two turns of another coroutine is counted.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from typing import Any

import pytest
from sqlalchemy import event, func, select

from core import member_import
from core.audit import Actor
from core.member_import import CHUNK, import_members
from core.models import AuditEvent, Member
from core.phone import Phone
from tests.core import factories

ADMIN = Actor("admin:test", "api")
ROWS = 2_000


async def test_a_large_import_gives_other_requests_a_turn_every_few_rows(rt: Any,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    async with rt.sessionmaker.begin() as s:
        coop = await factories.cooperative(s)
    csv = ("name,phone,unit\n" + "".join(f"Member {n:04d},07881{n:05d},A-{n}\n" for n in range(ROWS))).encode()
    # The import's work, row by row: each number read (parse), blind-indexed (the check against the members, the
    # order the rows are written in, then each member's row written) and looked at for a warning.
    done, threads = [0], set()
    read, index = member_import.normalize, rt.cipher.blind_index

    def reading(raw: str, region: str) -> Phone:
        threads.add(threading.get_ident())
        done[0] += 1
        return read(raw, region)

    def indexing(value: str, **kw: Any) -> str:
        done[0] += 1
        return str(index(value, **kw))

    def warning(phone: Phone) -> None:
        done[0] += 1

    monkeypatch.setattr(member_import, "normalize", reading)
    monkeypatch.setattr(rt.cipher, "blind_index", indexing)
    seen: list[int] = []  # the work done so far, each time the other coroutine (a USSD hop) got a turn
    importing = True

    async def other_request() -> None:
        while importing:
            seen.append(done[0])
            await asyncio.sleep(0)

    other = asyncio.create_task(other_request())
    async with rt.sessionmaker() as s:
        imported = await import_members(s, rt.cipher, cooperative=coop, data=csv, actor=ADMIN, phone_warning=warning)
        await s.commit()
    importing = False
    await other
    assert len(imported.member_ids) == ROWS
    assert done[0] == 5 * ROWS
    assert threads == {threading.get_ident()}  # read on the event loop, not in a thread holding the lock
    # Between two turns of the other coroutine, at most a turn's rows (TURN, 20: about 1 ms of parsing) of one step
    # and of the next.
    stretches = [after - before for before, after in itertools.pairwise(seen)]
    assert seen[-1] == 5 * ROWS and max(stretches) <= 40, max(stretches)


async def test_the_whole_list_sent_again_to_update_writes_its_members_a_chunk_at_a_time(rt: Any) -> None:
    """existing=update: the ORM flush of every changed member (and their audit rows) was one stretch of the event
    loop, 0.1-0.3 s for 10,000 members: written CHUNK members at a time, between turns of other requests."""
    async with rt.sessionmaker.begin() as s:
        coop = await factories.cooperative(s)
    rows = [f"Member {n:04d},07881{n:05d},A-{n}" for n in range(ROWS)]
    async with rt.sessionmaker.begin() as s:
        await import_members(s, rt.cipher, cooperative=coop, data=("name,phone,unit\n" + "\n".join(rows)).encode(),
                             actor=ADMIN)
    written = [0]

    def updating(*_: Any) -> None:  # the flush writing a member
        written[0] += 1

    seen: list[int] = []
    importing = True

    async def other_request() -> None:
        while importing:
            seen.append(written[0])
            await asyncio.sleep(0)

    event.listen(Member, "before_update", updating)
    try:
        other = asyncio.create_task(other_request())
        async with rt.sessionmaker.begin() as s:
            done = await import_members(s, rt.cipher, cooperative=coop, actor=ADMIN, existing="update",
                                        data=("name,phone,unit\n" + "\n".join(rows).replace("A-", "B-")).encode())
        importing = False
        await other
    finally:
        event.remove(Member, "before_update", updating)
    assert len(done.updated_ids) == written[0] == ROWS
    stretches = [after - before for before, after in itertools.pairwise(seen)]
    assert max(stretches) <= CHUNK, max(stretches)
    async with rt.sessionmaker() as s:
        audits = await s.scalar(select(func.count()).select_from(AuditEvent).where(
            AuditEvent.action == "member.updated", AuditEvent.entity_id.in_(done.updated_ids)))
    assert audits == ROWS
