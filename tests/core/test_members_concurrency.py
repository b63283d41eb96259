"""Creating a member whose number another transaction is adding at the same moment: a Conflict, never a 500.

The second create waits on the first (PostgreSQL: the unique index; SQLite: the write lock), and when the
first commits it is told the number is taken, as it would be a second later.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import func, select

from core import member_import
from core.audit import Actor
from core.errors import Conflict, ValidationError
from core.member_import import ImportRejected, import_members
from core.members import DUPLICATE_PHONE, ERASED_NAME, create_member, erase_member, update_member
from core.models import Cooperative, Member
from core.phone import normalize
from tests.conftest import behind_a_lock, is_postgres, requires_pg
from tests.core import factories

ADMIN = Actor("admin:test", "api")
PHONE = "+250788123456"


async def _coop(rt: Any) -> Cooperative:
    async with rt.sessionmaker.begin() as s:
        coop = await factories.cooperative(s)
    return coop


async def _first_holds_the_number(rt: Any, coop: Cooperative) -> Any:
    """A session that has inserted PHONE and not committed yet."""
    first = rt.sessionmaker()
    await create_member(first, rt.cipher, cooperative_id=coop.id, name="First", phone=normalize(PHONE), actor=ADMIN)
    return first


async def test_a_create_racing_an_uncommitted_one_of_the_same_number_is_a_conflict(rt: Any) -> None:
    coop = await _coop(rt)
    first = await _first_holds_the_number(rt, coop)
    async with rt.sessionmaker() as second:
        racing = asyncio.create_task(create_member(second, rt.cipher, cooperative_id=coop.id, name="Second",
                                                   phone=normalize(PHONE), actor=ADMIN))
        await behind_a_lock(rt, racing)
        assert not racing.done()  # it waits for the first to finish
        await first.commit()
        await first.close()
        with pytest.raises(Conflict) as refused:
            await racing
        assert refused.value.message == DUPLICATE_PHONE and refused.value.field == "phone"
        await second.rollback()
    async with rt.sessionmaker() as s:  # the same answer as a create after the first committed
        with pytest.raises(Conflict, match=DUPLICATE_PHONE):
            await create_member(s, rt.cipher, cooperative_id=coop.id, name="Third", phone=normalize(PHONE),
                                actor=ADMIN)


async def test_an_import_racing_a_create_of_one_of_its_numbers_names_the_row(rt: Any) -> None:
    coop = await _coop(rt)
    first = await _first_holds_the_number(rt, coop)
    csv = f"name,phone\nAnne One,+250788000101\nBob Two,{PHONE}\n".encode()
    async with rt.sessionmaker() as second:
        # The import's own check runs before the first commits and does not see the number.
        racing = asyncio.create_task(import_members(second, rt.cipher, cooperative=coop, data=csv, actor=ADMIN))
        await behind_a_lock(rt, racing)
        assert not racing.done()
        await first.commit()
        await first.close()
        with pytest.raises(ImportRejected) as refused:
            await racing
        assert refused.value.errors == [
            "file: 1 row with a number already a member's: leave them out, or import with existing=update to "
            "update those members' name, unit and language from the file",
            "row 3: phone: already a member of this cooperative"]
        await second.rollback()


async def _sent_again_while_the_first_is_written(rt: Any, again: Callable[[bytes], bytes]) -> list[str]:
    """A 1,200-row file imported, and `again(file)` imported while the first is still being written (a clerk whose
    upload timed out sends it again): what the second is refused with. Nothing is doubled."""
    coop = await _coop(rt)
    csv = ("name,phone\n" + "".join(f"Member {n:04d},07881{n:05d}\n" for n in range(1_200))).encode()
    first = rt.sessionmaker()
    await import_members(first, rt.cipher, cooperative=coop, data=csv, actor=ADMIN)
    async with rt.sessionmaker() as second:
        racing = asyncio.create_task(import_members(second, rt.cipher, cooperative=coop, data=again(csv),
                                                    actor=ADMIN))
        await behind_a_lock(rt, racing)
        assert not racing.done()
        await first.commit()
        await first.close()
        with pytest.raises(ImportRejected) as refused:
            await racing
        await second.rollback()
    async with rt.sessionmaker() as s:
        count = await s.scalar(select(func.count()).select_from(Member).where(Member.cooperative_id == coop.id))
    assert count == 1_200
    return refused.value.errors


async def test_the_same_file_sent_again_while_the_first_is_written_is_told_it_was_imported(rt: Any) -> None:
    """Its every row met the first upload's: one error says the list was imported, as it would a second later,
    where "already a member" was said 1,200 times."""
    errors = await _sent_again_while_the_first_is_written(rt, lambda csv: csv)
    assert len(errors) == 1, errors[:3]
    assert errors[0].startswith("file: this list was already imported: its 1,200 rows match 1,200 members of this "
                                "cooperative with the same name, unit and language, added "), errors[0]


async def test_an_edited_file_sent_while_the_first_is_written_names_every_row(rt: Any) -> None:
    """The answer names all its rows, as it would a second later. It named the first chunk's alone ("500 row(s)" of
    1,200), and the clerk who left those out was refused again."""
    errors = await _sent_again_while_the_first_is_written(rt, lambda csv: csv.replace(b"Member 0007", b"Membre 0007"))
    assert errors[0].startswith("file: 1,200 rows with a number already a member's")
    assert errors[1:] == [f"row {n}: phone: already a member of this cooperative" for n in range(2, 1_202)]


async def test_an_import_committing_while_the_list_sent_again_is_checked_is_named_for_every_row(rt: Any) -> None:
    """The first upload commits while the second's check of its numbers is reading them: the answer still names all
    1,200 rows. Read 500 numbers at a time, the check saw the first 500 as no one's and the rest as members: "700
    row(s)", and the clerk who left those out was refused again."""
    coop = await _coop(rt)
    csv = ("name,phone\n" + "".join(f"Member {n:04d},07881{n:05d}\n" for n in range(1_200))).encode()
    first = rt.sessionmaker()
    await import_members(first, rt.cipher, cooperative=coop, data=csv, actor=ADMIN)
    committed = False
    async with rt.sessionmaker() as second:
        execute = second.execute

        async def checked_then_committed(statement: Any, *args: Any, **kwargs: Any) -> Any:
            nonlocal committed
            result = await execute(statement, *args, **kwargs)
            if not committed and "members.phone_index IN" in str(statement):
                committed = True  # the first upload commits right after the check's first read
                await first.commit()
                await first.close()
            return result

        second.execute = checked_then_committed  # type: ignore[method-assign]
        with pytest.raises(ImportRejected) as refused:
            await import_members(second, rt.cipher, cooperative=coop, data=csv.replace(b"Member 0007", b"Membre 0007"),
                                 actor=ADMIN)
        await second.rollback()
    assert committed
    assert refused.value.errors[0].startswith("file: 1,200 rows with a number already a member's"), \
        refused.value.errors[0]
    assert len(refused.value.errors) == 1_201


async def test_an_import_with_an_unknown_status_is_refused_before_reading_the_file(rt: Any) -> None:
    coop = await _coop(rt)
    async with rt.sessionmaker() as s:
        with pytest.raises(ValidationError, match="status must be one of PENDING, ACTIVE, SUSPENDED"):
            await import_members(s, rt.cipher, cooperative=coop, data=b"name,phone\nAnne One,+250788000101\n",
                                 actor=ADMIN, status="VIP")


async def test_an_update_import_racing_an_erasure_never_writes_her_name_back(rt: Any,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole list sent again (existing=update) while the desk erases a member it names: the erasure waits for
    the import (or the import for it), so her name is never written back onto her erased row. On SQLite the import
    read her row without the write lock, the erasure committed meanwhile, and the import's UPDATE by id put her
    name back."""
    coop = await _coop(rt)
    async with rt.sessionmaker.begin() as s:
        member = await create_member(s, rt.cipher, cooperative_id=coop.id, name="Mutesi Beatrice",
                                     phone=normalize(PHONE), actor=ADMIN)
        await update_member(s, member, actor=ADMIN, status="SUSPENDED")
    read, go_on = asyncio.Event(), asyncio.Event()
    original = member_import._update_rows

    async def paused(*args: Any, **kwargs: Any) -> Any:
        read.set()  # her row read (and, on PostgreSQL, locked)
        await go_on.wait()
        return await original(*args, **kwargs)

    async def erase(session: Any) -> None:
        async with session.begin():
            await erase_member(session, await session.get(Member, member.id), actor=ADMIN)

    monkeypatch.setattr(member_import, "_update_rows", paused)
    csv = f"name,phone\nMutesi Béatrice,{PHONE}\n".encode()
    async with rt.sessionmaker() as importing, rt.sessionmaker() as erasing:
        racing = asyncio.create_task(import_members(importing, rt.cipher, cooperative=coop, data=csv, actor=ADMIN,
                                                    existing="update"))
        await asyncio.wait_for(read.wait(), 60)
        erasure = asyncio.create_task(erase(erasing))
        await behind_a_lock(rt, erasure)
        assert not erasure.done()  # it waits for the import
        go_on.set()
        assert (await racing).updated_ids == [member.id]
        await importing.commit()
        await erasure
    async with rt.sessionmaker() as s:
        erased = await s.get(Member, member.id)
        assert erased is not None and (erased.name, erased.phone_index) == (ERASED_NAME, None)


async def test_a_list_sent_twice_with_existing_update_at_once_is_answered_as_a_second_later(rt: Any) -> None:
    """Two existing=update imports of one list (a clerk's upload sent twice): the second waits for the first and
    finds every member it added, unchanged. On PostgreSQL it read the first's members in part (the chunks of
    numbers it read after the first committed), tried to add the others again, and the clerk who asked for an
    update was refused "this list was already imported: its 499 rows match 499 members ... import it with
    existing=update"."""
    coop = await _coop(rt)
    async with rt.sessionmaker.begin() as s:
        await import_members(s, rt.cipher, cooperative=coop, data=b"name,phone\nOld One,0788199999\n", actor=ADMIN)
    csv = ("name,phone\nOld One Renamed,0788199999\n"
           + "".join(f"Member {n:04d},07881{n:05d}\n" for n in range(1_200))).encode()
    first = rt.sessionmaker()
    await import_members(first, rt.cipher, cooperative=coop, data=csv, actor=ADMIN, existing="update")
    async with rt.sessionmaker() as second:
        racing = asyncio.create_task(import_members(second, rt.cipher, cooperative=coop, data=csv, actor=ADMIN,
                                                    existing="update"))
        await behind_a_lock(rt, racing)
        assert not racing.done()
        await first.commit()
        await first.close()
        done = await racing
        assert (done.member_ids, done.updated_ids, done.unchanged) == ([], [], 1_201)
        await second.commit()
    async with rt.sessionmaker() as s:
        names = set((await s.execute(select(Member.name).where(Member.cooperative_id == coop.id))).scalars())
    assert len(names) == 1_201 and "Old One Renamed" in names


@requires_pg  # SQLite: the import waits for the create's write lock, then finds her and updates her
async def test_an_update_import_racing_a_create_of_its_only_number_is_not_told_it_was_imported(rt: Any) -> None:
    """existing=update adds the rows with no member: one whose number was registered meanwhile (USSD, the API)
    is named, not taken for the whole list sent again (an update, imported already, "nothing was imported"), and
    the file is to be sent again as it was (it was told "leave them out, or import with existing=update", the
    option it was sent with)."""
    coop = await _coop(rt)
    first = await _first_holds_the_number(rt, coop)
    async with rt.sessionmaker() as second:
        racing = asyncio.create_task(import_members(second, rt.cipher, cooperative=coop, actor=ADMIN,
                                                    data=f"name,phone\nFirst,{PHONE}\n".encode(), existing="update"))
        await behind_a_lock(rt, racing)
        assert not racing.done()
        await first.commit()
        await first.close()
        with pytest.raises(ImportRejected) as refused:
            await racing
        assert refused.value.errors == [
            "file: 1 row with a number registered while this import ran (by USSD or another request): nothing "
            "was imported; send the file again to update those members too",
            "row 2: phone: already a member of this cooperative"]
        await second.rollback()


async def test_a_list_and_the_same_list_sorted_otherwise_imported_at_once_take_turns(rt: Any) -> None:
    """Two clerks import the list at once, one as it came, one sorted the other way: the second waits for the
    first and is told the list was imported. Each wrote in its file's order and waited for a number the other had
    written first: PostgreSQL found the deadlock and one was answered 503. The new members' ids are still given
    in the file's order."""
    coop = await _coop(rt)
    lines = [f"Member {n:04d},07881{n:05d}\n" for n in range(1_200)]
    ids: dict[int, list[str]] = {}

    async def upload(rows: list[str]) -> list[str] | int:
        async with rt.sessionmaker() as s:
            try:
                done = await import_members(s, rt.cipher, cooperative=coop, actor=ADMIN,
                                            data=("name,phone\n" + "".join(rows)).encode())
            except ImportRejected as refused:
                await s.rollback()
                return refused.errors
            await s.commit()
            ids[len(ids)] = done.member_ids
            return 1 if rows == lines else -1  # which file was imported

    answers = await asyncio.gather(upload(lines), upload(lines[::-1]))
    [imported] = [a for a in answers if isinstance(a, int)]
    [refused] = [a for a in answers if isinstance(a, list)]
    assert len(refused) == 1
    assert refused[0].startswith("file: this list was already imported: its 1,200 rows match 1,200 members")
    async with rt.sessionmaker() as s:
        names = dict((await s.execute(select(Member.id, Member.name).where(Member.cooperative_id == coop.id))).all())
    assert [names[i] for i in ids[0]] == [line.split(",")[0] for line in lines[::imported]]


@pytest.mark.skipif(is_postgres(), reason="SQLite: the members are read before the write lock (PostgreSQL: locked)")
async def test_a_member_erased_while_the_update_import_takes_the_write_lock_keeps_her_erasure(
        rt: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """existing=update on SQLite reads the file's members, then takes the write lock and checks them: one erased in
    between is read again, not updated by her id from what was read before (her name written back onto her erased
    row). Her number, released, is a new member's, as the same list imported a moment later makes it."""
    coop = await _coop(rt)
    async with rt.sessionmaker.begin() as s:
        member = await create_member(s, rt.cipher, cooperative_id=coop.id, name="Mutesi Beatrice",
                                     phone=normalize(PHONE), actor=ADMIN)
        await update_member(s, member, actor=ADMIN, status="SUSPENDED")
    original = member_import.serialise_on_sqlite

    async def erased_first(*args: Any, **kwargs: Any) -> None:
        async with rt.sessionmaker.begin() as erasing:
            await erase_member(erasing, await erasing.get(Member, member.id), actor=ADMIN)
        await original(*args, **kwargs)

    monkeypatch.setattr(member_import, "serialise_on_sqlite", erased_first)
    async with rt.sessionmaker.begin() as s:
        done = await import_members(s, rt.cipher, cooperative=coop, actor=ADMIN, existing="update",
                                    data=f"name,phone\nMutesi Béatrice,{PHONE}\n".encode())
    assert (done.updated_ids, len(done.member_ids)) == ([], 1)
    async with rt.sessionmaker() as s:
        erased = await s.get(Member, member.id)
        assert erased is not None and (erased.name, erased.phone_index) == (ERASED_NAME, None)


@pytest.mark.skipif(is_postgres(), reason="SQLite: the members are read before the write lock (PostgreSQL: locked)")
async def test_a_member_registered_while_the_update_import_takes_the_write_lock_is_updated(
        rt: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """existing=update on SQLite works its new rows' members out from the members read before the write lock: one
    of those numbers registered in between (by USSD, by the API) is a member under the lock, updated as the file
    says, not written again (the unique index refusing the file, "already a member's", to an update import)."""
    coop = await _coop(rt)
    original = member_import.serialise_on_sqlite

    async def registered_first(*args: Any, **kwargs: Any) -> None:
        async with rt.sessionmaker.begin() as registering:
            await create_member(registering, rt.cipher, cooperative_id=coop.id, name="Mutesi",
                                phone=normalize(PHONE), actor=ADMIN)
        await original(*args, **kwargs)

    monkeypatch.setattr(member_import, "serialise_on_sqlite", registered_first)
    async with rt.sessionmaker.begin() as s:
        done = await import_members(s, rt.cipher, cooperative=coop, actor=ADMIN, existing="update",
                                    data=f"name,phone\nMutesi Beatrice,{PHONE}\nKamali Jean,+250788123457\n".encode())
    assert (len(done.updated_ids), len(done.member_ids)) == (1, 1)
    async with rt.sessionmaker() as s:
        names = (await s.execute(select(Member.name).where(Member.cooperative_id == coop.id)
                                 .order_by(Member.name))).scalars().all()
    assert names == ["Kamali Jean", "Mutesi Beatrice"]
