"""A large member import shares its serve's event loop with the USSD hops: it gives the loop a turn every few rows
(core.member_import.turns, read_rows), from reading the file to the warnings of its answer.

A 10,000-row import held the loop for up to 0.4 s in one stretch (its phone warnings), and its parsing, in a thread,
held the interpreter's lock the hops waited for: hops took 0.4-0.7 s while it ran. No time is measured here: what
runs between two turns of another coroutine is counted.
"""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
import threading
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import event, func, select

from core import member_import
from core.audit import Actor
from core.member_import import CHUNK, import_members
from core.models import AuditEvent, Member
from core.phone import Phone
from tests.conftest import is_postgres
from tests.core import factories

ADMIN = Actor("admin:test", "api")
ROWS = 2_000


async def test_a_large_import_gives_other_requests_a_turn_every_few_rows(rt: Any,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    async with rt.sessionmaker.begin() as s:
        coop = await factories.cooperative(s)
    csv = ("name,phone,unit\n" + "".join(f"Member {n:04d},07881{n:05d},A-{n}\n" for n in range(ROWS))).encode()
    # The import's work, row by row: each number read (parse), blind-indexed (once for the check against the members
    # and the order the rows are written in, then for each member's row written) and looked at for a warning. The
    # check computed its own again: 10,000 more HMACs for a full file.
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
    assert done[0] == 4 * ROWS
    assert threads == {threading.get_ident()}  # read on the event loop, not in a thread holding the lock
    # Between two turns of the other coroutine, at most a turn's rows (TURN, 20: about 1 ms of parsing) of one step
    # and of the next.
    stretches = [after - before for before, after in itertools.pairwise(seen)]
    assert seen[-1] == 4 * ROWS and max(stretches) <= 40, max(stretches)


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



SQLITE_ONLY = pytest.mark.skipif(is_postgres(), reason="SQLite's write lock: PostgreSQL's writers lock rows, not the "
                                                       "database")


class OtherWriter:
    """Another writer of the SQLite database (a member confirming a payment by USSD), told "database is locked" at
    once where it would wait for the lock's holder (BEGIN IMMEDIATE, no busy timeout): no time is measured."""

    def __init__(self, rt: Any) -> None:
        self.db = sqlite3.connect(rt.engine.url.database, timeout=0, isolation_level=None)
        self.tried = self.locked = 0

    @classmethod
    def at_each_new_row(cls, rt: Any, monkeypatch: pytest.MonkeyPatch) -> tuple[OtherWriter, Callable[[Phone], None]]:
        """A writer that tries a write as each new member's number is encrypted (member_row), and the import's
        phone_warning that tries one at each new member's warning."""
        other = cls(rt)
        encrypt = rt.cipher.encrypt

        def encrypting(*args: Any, **kwargs: Any) -> Any:
            other.write()
            return encrypt(*args, **kwargs)

        def warning(phone: Phone) -> None:
            other.write()

        monkeypatch.setattr(rt.cipher, "encrypt", encrypting)
        return other, warning

    def write(self) -> None:
        self.tried += 1
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError:
            self.locked += 1
        else:
            self.db.execute("ROLLBACK")


@SQLITE_ONLY
async def test_other_writers_are_not_held_while_the_import_works_its_rows_out(rt: Any,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """On SQLite the import's first write takes the database's write lock, held to its commit: every other writer
    of the serve waits for it. Its rows were encrypted between its inserts and their warnings read after them, and
    a write sent during a 10,000-row import waited for 1.3-2.2 s (the import's 2.6-4.8 s, on a busy 2-CPU machine).
    All of that is worked out before the first write now: a write tried at each step of it finds the database
    free."""
    async with rt.sessionmaker.begin() as s:
        coop = await factories.cooperative(s)
    csv = ("name,phone,unit\n" + "".join(f"Member {n:04d},07881{n:05d},A-{n}\n" for n in range(ROWS))).encode()
    other, warning = OtherWriter.at_each_new_row(rt, monkeypatch)
    try:
        async with rt.sessionmaker() as s:
            imported = await import_members(s, rt.cipher, cooperative=coop, data=csv, actor=ADMIN,
                                            phone_warning=warning)
            assert (other.tried, other.locked) == (2 * ROWS, 0)
            other.write()  # the import's writes themselves hold the lock to the commit, as any writer's
            assert other.locked == 1
            await s.commit()
        other.write()
        assert other.locked == 1
    finally:
        other.db.close()
    assert len(imported.member_ids) == ROWS


@SQLITE_ONLY
async def test_other_writers_are_not_held_while_the_list_sent_again_reads_its_members(rt: Any) -> None:
    """existing=update took SQLite's write lock before reading the file's members (so that an erasure cannot slip
    in between): the ORM's reading of 10,000 of them, 0.6-0.7 s, held every other writer. They are read first now,
    and checked again under the lock (test_members_concurrency: one erased in between)."""
    async with rt.sessionmaker.begin() as s:
        coop = await factories.cooperative(s)
    rows = "".join(f"Member {n:04d},07881{n:05d},A-{n}\n" for n in range(ROWS))
    async with rt.sessionmaker.begin() as s:
        await import_members(s, rt.cipher, cooperative=coop, data=("name,phone,unit\n" + rows).encode(), actor=ADMIN)
    other = OtherWriter(rt)
    loaded = [0]

    def loading(*_: Any) -> None:  # a member read into the session: another writer tried each 100 of them
        loaded[0] += 1
        if loaded[0] % 100 == 0:
            other.write()

    event.listen(Member, "load", loading)
    try:
        async with rt.sessionmaker.begin() as s:
            done = await import_members(s, rt.cipher, cooperative=coop, actor=ADMIN, existing="update",
                                        data=("name,phone,unit\n" + rows.replace(",A-7\n", ",B-7\n")).encode())
    finally:
        event.remove(Member, "load", loading)
        other.db.close()
    assert (loaded[0], other.locked) == (ROWS, 0)
    assert (len(done.updated_ids), done.unchanged) == (1, ROWS - 1)


@SQLITE_ONLY
async def test_other_writers_are_not_held_while_the_list_sent_again_works_its_new_rows_out(
        rt: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A list sent again with existing=update, grown since (half of its rows new members): the import took SQLite's
    write lock to check the members it had read, then encrypted its new rows and read their warnings under it, every
    other writer of the serve waiting. They are worked out from the members read before the lock now."""
    async with rt.sessionmaker.begin() as s:
        coop = await factories.cooperative(s)
    lines = [f"Member {n:04d},07881{n:05d},A-{n}\n" for n in range(ROWS)]
    async with rt.sessionmaker.begin() as s:
        await import_members(s, rt.cipher, cooperative=coop, actor=ADMIN,
                             data=("name,phone,unit\n" + "".join(lines[::2])).encode())
    other, warning = OtherWriter.at_each_new_row(rt, monkeypatch)
    try:
        async with rt.sessionmaker.begin() as s:
            done = await import_members(s, rt.cipher, cooperative=coop, actor=ADMIN, existing="update",
                                        data=("name,phone,unit\n" + "".join(lines)).encode(), phone_warning=warning)
    finally:
        other.db.close()
    assert (other.tried, other.locked) == (ROWS, 0)
    assert (len(done.member_ids), done.updated_ids, done.unchanged) == (ROWS // 2, [], ROWS // 2)
