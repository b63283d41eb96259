"""Creating a member whose number another transaction is adding at the same moment: a Conflict, never a 500.

The second create waits on the first (PostgreSQL: the unique index; SQLite: the write lock), and when the
first commits it is told the number is taken, as it would be a second later.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from core.audit import Actor
from core.errors import Conflict, ValidationError
from core.member_import import ImportRejected, import_members
from core.members import DUPLICATE_PHONE, create_member
from core.models import Cooperative
from core.phone import normalize
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
        await asyncio.sleep(0.3)
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
        await asyncio.sleep(0.3)
        assert not racing.done()
        await first.commit()
        await first.close()
        with pytest.raises(ImportRejected) as refused:
            await racing
        assert refused.value.errors == [
            "file: 1 row(s) with a number already a member's: leave them out, or import with existing=update to "
            "update those members' name, unit and language from the file",
            "row 3: phone: already a member of this cooperative"]
        await second.rollback()


async def test_an_import_with_an_unknown_status_is_refused_before_reading_the_file(rt: Any) -> None:
    coop = await _coop(rt)
    async with rt.sessionmaker() as s:
        with pytest.raises(ValidationError, match="status must be one of PENDING, ACTIVE, SUSPENDED"):
            await import_members(s, rt.cipher, cooperative=coop, data=b"name,phone\nAnne One,+250788000101\n",
                                 actor=ADMIN, status="VIP")
