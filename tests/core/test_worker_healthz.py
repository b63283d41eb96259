"""A worker's /healthz (WORKER_METRICS_PORT) answers 503, saying why, while its claims keep failing (its database
down) or while no claim has come back for WORKER_STALE_SECONDS (a claim hanging), and ok again once one works."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

import core.outbox as outbox
from app import worker_app
from core.outbox import OutboxWorker


@pytest.fixture
async def driven(rt: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A worker whose claims the test answers one at a time (as test_operator_signals drives one), its clock
    moved by hand, and its /healthz served over HTTP."""
    clock = [1000.0]
    monkeypatch.setattr(outbox.time, "monotonic", lambda: clock[0])
    worker = OutboxWorker(rt.sessionmaker, {}, idle_sleep=0.2)
    outcomes: asyncio.Queue[BaseException | None] = asyncio.Queue()
    turns: asyncio.Queue[float] = asyncio.Queue()

    async def claim(limit: int | None = None, *, sparing: Any = ()) -> list[Any]:
        outcome = await outcomes.get()
        if outcome is not None:
            raise outcome
        return []

    async def sleep(seconds: float, or_until: Any = None) -> None:
        clock[0] += seconds
        await turns.put(seconds)

    monkeypatch.setattr(worker, "claim", claim)
    monkeypatch.setattr(worker, "_sleep", sleep)
    loop = asyncio.create_task(worker.run_forever())
    client = TestClient(TestServer(worker_app(rt, worker, stale_after=120)))
    await client.start_server()

    async def turn(outcome: BaseException | None) -> None:
        await outcomes.put(outcome)
        await asyncio.wait_for(turns.get(), 5)  # the loop took it and went to sleep

    async def health() -> tuple[int, dict[str, Any]]:
        resp = await client.get("/healthz")
        return resp.status, await resp.json()

    yield clock, turn, health
    worker.stop()
    await outcomes.put(None)
    await asyncio.wait_for(loop, 5)
    await client.close()


async def test_worker_healthz_fails_while_its_claims_fail_and_recovers(driven: Any) -> None:
    _clock, turn, health = driven
    assert await health() == (200, {"status": "ok"})
    await turn(None)
    await turn(ConnectionRefusedError("database down"))
    assert (await health())[0] == 200  # one failed claim: backing off, not yet unhealthy
    await turn(ConnectionRefusedError("database down"))
    await turn(ConnectionRefusedError("database down"))
    status, body = await health()
    assert status == 503 and body["status"] == "failing"
    assert "3 claims failed in a row" in body["reason"] and "ConnectionRefusedError" in body["reason"]
    await turn(None)  # the database is back
    assert await health() == (200, {"status": "ok"})


async def test_worker_healthz_fails_when_no_claim_comes_back(driven: Any) -> None:
    clock, turn, health = driven
    await turn(None)
    clock[0] += 119  # a claim under way (hanging on its database) but not for long yet
    assert (await health())[0] == 200
    clock[0] += 2
    status, body = await health()
    assert status == 503 and "no claim has succeeded for 121 s" in body["reason"]
    await turn(None)
    assert await health() == (200, {"status": "ok"})
