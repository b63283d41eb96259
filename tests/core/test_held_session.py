"""core.db.Held: a request's session closed without a task of its own when it holds nothing, the shielded way
when a transaction is still open; the connection goes back to the pool either way, and nothing uncommitted
stays."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from core.db import Held
from core.models import OutboxJob
from tests.conftest import count_calls
from tests.core.test_pgraw import _params


def _checked_out(sm: Any) -> int:
    return int(sm.kw["bind"].sync_engine.pool.checkedout())


async def _count(sm: Any) -> int:
    async with sm() as s:
        return int((await s.execute(select(func.count()).select_from(OutboxJob))).scalar_one())


@pytest.fixture
def shielded(monkeypatch: Any) -> list[int]:
    """Counts the closes that go through AsyncSession's own (shielded) exit."""
    return count_calls(monkeypatch, AsyncSession, "__aexit__")


async def test_a_committed_session_is_closed_without_the_task(sm: Any, shielded: list[int]) -> None:
    async with Held(sm) as session:
        await session.execute(select(1))
        session.add(OutboxJob(**_job()))
        await session.commit()
        assert _checked_out(sm) == 0  # the commit gave the connection back
    assert shielded == [] and not session.in_transaction() and len(session.identity_map) == 0
    assert await _count(sm) == 1


async def test_an_open_transaction_is_closed_the_shielded_way_and_rolled_back(sm: Any, shielded: list[int]) -> None:
    async with Held(sm) as session:
        session.add(OutboxJob(**_job()))
        await session.flush()  # written in the open transaction, never committed
        assert _checked_out(sm) == 1
    assert shielded == [1] and _checked_out(sm) == 0
    assert await _count(sm) == 0


async def test_an_error_inside_rolls_back_and_gives_the_connection_back(sm: Any, shielded: list[int]) -> None:
    with pytest.raises(RuntimeError):
        async with Held(sm) as session:
            session.add(OutboxJob(**_job()))
            await session.flush()
            raise RuntimeError("the handler failed")
    assert shielded == [1] and _checked_out(sm) == 0
    assert await _count(sm) == 0


async def test_a_session_that_never_checked_out_holds_nothing(sm: Any, shielded: list[int]) -> None:
    async with Held(sm) as session:
        pass
    assert shielded == [] and _checked_out(sm) == 0 and not session.in_transaction()


def _job() -> dict[str, Any]:
    raw = _params("held")
    return {"kind": raw["kind"], "payload": raw["payload"], "dedupe_key": raw["key"], "status": "PENDING",
            "attempts": 0, "max_attempts": 3, "run_at": raw["at"], "created_at": raw["at"], "updated_at": raw["at"]}

