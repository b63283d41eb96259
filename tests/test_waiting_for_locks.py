"""tests.conftest.waiting_for_locks: a racing task that never came to the lock fails the test, `done` or not."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests import conftest
from tests.conftest import behind_a_lock, requires_pg, waiting_for_locks


@requires_pg
async def test_a_task_neither_waiting_for_a_lock_nor_ended_fails_the_test(rt: Any, monkeypatch: Any) -> None:
    """A racing request not at the lock by the limit (a loaded host's, or one held elsewhere) reaches it only once
    the test has let the lock go: the assertions after it then pass whatever the code locks. Returning quietly
    there, as before, the test passed for nothing."""
    monkeypatch.setattr(conftest, "LOCK_WAIT_LIMIT", 0.3)
    late = asyncio.ensure_future(asyncio.sleep(60))  # not at any lock, not ended
    try:
        with pytest.raises(AssertionError, match="never came to wait for a lock"):
            await waiting_for_locks(rt, 1, done=late)
        with pytest.raises(AssertionError, match="never came to wait for a lock"):
            await behind_a_lock(rt, late)
        ended = asyncio.ensure_future(asyncio.sleep(0))
        await ended
        await waiting_for_locks(rt, 1, done=[late, ended])  # one ended: the assertions after it tell
    finally:
        late.cancel()
