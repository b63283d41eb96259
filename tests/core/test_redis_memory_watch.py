"""A Redis that evicts keys or refuses writes for want of memory is reported (the disaster-recovery drill: USSD
sessions evicted mid-menu, then every write refused with OOM, while /readyz said "ok" and gateway_redis_up 1):
/readyz says "degraded" and names it, gateway_redis_evicting, gateway_redis_writes_refused and
gateway_redis_evicted_keys_total say it, and each serve's revocation guard and each worker log it once per change,
also when it changes under a running process (CONFIG SET, or a failover to another server: another run_id).

Against a Redis of the test's own (CONFIG SET on the shared one would change every other test's memory limit),
restarted on its port to stand for a failover."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from app import create_app, open_runtime
from core.auth import evicted_keys, guard_revocations
from core.metrics import REGISTRY
from tests.conftest import _base_env, clean_database, make_settings, readiness
from tests.integration.procs import Harness, PrivateServices, free_port, private_services_available

pytestmark = pytest.mark.skipif(not private_services_available(), reason="needs redis-server (and PostgreSQL)")

EVICTING = "Redis evicts keys when its memory is full"
REFUSING = "Redis refuses writes"


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[PrivateServices]:
    """A redis-server of this test's own (no PostgreSQL: the suite's database is used)."""
    services = PrivateServices(tmp_path)
    services.start_redis()
    try:
        yield services
    finally:
        services.close()


@pytest.fixture
async def prt(migrated_database: str, own_redis: PrivateServices) -> AsyncIterator[Any]:
    """A Runtime on the suite's (clean) database and the test's own Redis."""
    async with open_runtime(make_settings(REDIS_URL=own_redis.redis_url)) as runtime:
        await clean_database(runtime)
        yield runtime


async def _limit(redis: Redis, policy: str, *, room: int | None) -> None:
    """maxmemory `room` bytes above what Redis holds now (None: 1 byte, below it: full) under `policy`."""
    used = int((await redis.info("memory"))["used_memory"])
    await redis.config_set("maxmemory-policy", policy)
    await redis.config_set("maxmemory", 1 if room is None else used + room)


async def _unlimited(redis: Redis) -> None:
    await redis.config_set("maxmemory", 0)
    await redis.config_set("maxmemory-policy", "noeviction")


def _sample(text: str, name: str) -> float:
    [value] = [s.value for family in text_string_to_metric_families(text) for s in family.samples if s.name == name]
    return value


async def _scraped(client: Any) -> Callable[[str], float]:
    response = await client.get("/metrics")
    assert response.status == 200
    text = await response.text()
    return lambda name: _sample(text, name)


async def test_readiness_and_metrics_name_an_evicting_or_full_redis(prt: Any, aiohttp_client: Any) -> None:
    client = await aiohttp_client(create_app(prt.settings, runtime=prt))
    assert await readiness(client) == (200, {"status": "ok", "checks": {"database": "ok", "redis": "ok"}})
    metric = await _scraped(client)
    assert (metric("gateway_redis_evicting"), metric("gateway_redis_writes_refused")) == (0, 0)
    try:
        # Set while serving, as in the drill: the next check says so (before: "ok", and gateway_redis_up 1 alone).
        await _limit(prt.redis, "allkeys-lru", room=50_000_000)
        assert await readiness(client) == (200, {"status": "degraded", "checks": {
            "database": "ok", "redis": "degraded: evicts keys (maxmemory-policy allkeys-lru)"}})
        metric = await _scraped(client)
        assert (metric("gateway_redis_evicting"), metric("gateway_redis_writes_refused")) == (1, 0)
        assert metric("gateway_redis_up") == 1

        # Past what evicting can free (the drill's second stage): every write refused with OOM, PING still fine.
        await _limit(prt.redis, "allkeys-lru", room=None)
        assert await prt.redis.ping()
        assert await readiness(client) == (200, {"status": "degraded", "checks": {
            "database": "ok", "redis": "degraded: out of memory, writes refused"}})
        metric = await _scraped(client)
        assert (metric("gateway_redis_evicting"), metric("gateway_redis_writes_refused")) == (1, 1)
        assert metric("gateway_redis_up") == 1

        # Full under noeviction (the README's policy): refused writes, no eviction.
        await _limit(prt.redis, "noeviction", room=None)
        assert (await readiness(client))[1]["checks"]["redis"] == "degraded: out of memory, writes refused"
        metric = await _scraped(client)
        assert (metric("gateway_redis_evicting"), metric("gateway_redis_writes_refused")) == (0, 1)
    finally:
        await _unlimited(prt.redis)
    assert await readiness(client) == (200, {"status": "ok", "checks": {"database": "ok", "redis": "ok"}})
    metric = await _scraped(client)
    assert (metric("gateway_redis_evicting"), metric("gateway_redis_writes_refused")) == (0, 0)


def _gauge(name: str) -> float | None:
    return REGISTRY.get_sample_value(f"gateway_redis_{name}")


def _evicted_counted() -> float:
    return REGISTRY.get_sample_value("gateway_redis_evicted_keys_total") or 0.0


async def _until(check: Callable[[], bool], what: str, within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, f"not within {within}s: {what}"
        await asyncio.sleep(0.02)


def _said(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "gateway.auth" and r.getMessage().startswith(text)]


async def test_the_guard_reports_each_change_once_and_counts_evictions(
        prt: Any, own_redis: PrivateServices, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.auth")
    redis = prt.redis
    stop = asyncio.Event()
    guard = asyncio.create_task(guard_revocations(redis, prt.sessionmaker, ttl_seconds=prt.settings.jwt_ttl_seconds,
                                                  every=0.05, stop=stop))
    try:
        await _until(lambda: _gauge("evicting") == 0, "the first check")
        await asyncio.sleep(0.3)
        assert _said(caplog, EVICTING) == []

        # A CONFIG SET under the running process (before: checked once, at its start, never again).
        await _limit(redis, "allkeys-lru", room=3_000_000)
        await _until(lambda: _gauge("evicting") == 1, "gateway_redis_evicting 1")
        counted, before = _evicted_counted(), await evicted_keys(redis)
        assert before is not None
        for i in range(2_000):  # up to 20 MB into 3 MB of room: keys evicted
            await redis.set(f"filler:{i}", b"x" * 10_000)
        await _limit(redis, "allkeys-lru", room=50_000_000)  # room again: no eviction after this count
        after = await evicted_keys(redis)
        assert after is not None and after > before
        await _until(lambda: _evicted_counted() - counted == after - before, "the evictions counted")
        await asyncio.sleep(0.3)  # several more cycles: still one line
        [evicting] = _said(caplog, EVICTING)
        assert evicting.levelno == logging.ERROR and evicting.policy == "allkeys-lru"  # type: ignore[attr-defined]
        first_server = evicting.redis_run_id  # type: ignore[attr-defined]
        assert first_server == (await redis.info("server"))["run_id"]

        # Full: writes refused, said once; the marks are not tried (no warning every cycle: one at most, from the
        # cycle whose write probe came just before the limit).
        await _limit(redis, "allkeys-lru", room=None)
        await _until(lambda: _gauge("writes_refused") == 1, "gateway_redis_writes_refused 1")
        await asyncio.sleep(0.3)
        [refusing] = _said(caplog, REFUSING)
        assert refusing.levelno == logging.ERROR
        assert len(_said(caplog, "could not check the token revocation marks")) <= 1

        await _unlimited(redis)
        await _until(lambda: _gauge("writes_refused") == 0 and _gauge("evicting") == 0, "the gauges back to 0")
        await asyncio.sleep(0.3)
        assert [r.levelno for r in _said(caplog, "Redis takes writes again")] == [logging.INFO]
        assert [r.levelno for r in _said(caplog, "Redis no longer evicts keys")] == [logging.INFO]
        assert len(_said(caplog, EVICTING)) == 1 and len(_said(caplog, REFUSING)) == 1

        # Another server (a restart, or a failover to a replica: another run_id) configured to evict: said again.
        own_redis.stop_redis()
        own_redis.start_redis()
        await redis.connection_pool.disconnect()  # the test's next command on a fresh connection (the guard's too)
        await _limit(redis, "allkeys-lru", room=50_000_000)
        await _until(lambda: len(_said(caplog, EVICTING)) == 2, "the second server reported")
        await asyncio.sleep(0.3)
        evictings = _said(caplog, EVICTING)
        assert len(evictings) == 2
        assert evictings[1].redis_run_id not in (None, first_server)  # type: ignore[attr-defined]
    finally:
        stop.set()
        await asyncio.wait({guard}, timeout=10)
        await _unlimited(redis)
    assert guard.done() and guard.exception() is None


async def test_a_worker_reports_an_evicting_or_full_redis(
        migrated_database: str, own_redis: PrivateServices, tmp_path: Path) -> None:
    """`main.py worker` (with its /metrics): before, it never looked at Redis's memory."""
    async with Redis.from_url(own_redis.redis_url) as redis:
        await _limit(redis, "allkeys-lru", room=50_000_000)
        harness = Harness(tmp_path / "procs")
        port = free_port()
        env = {**_base_env(), "REDIS_URL": own_redis.redis_url}
        worker = harness.spawn("worker", ["worker", "--metrics-port", str(port)], env, port=port,
                               ready_path="/healthz")
        try:
            async with httpx.AsyncClient(base_url=worker.url, timeout=5) as http:

                async def metric(name: str) -> float:
                    return _sample((await http.get("/metrics")).text, name)

                deadline = time.monotonic() + 30
                while await metric("gateway_redis_evicting") != 1:
                    assert time.monotonic() < deadline, worker.tail()
                    await asyncio.sleep(0.2)
                await _limit(redis, "allkeys-lru", room=None)
                while await metric("gateway_redis_writes_refused") != 1:
                    assert time.monotonic() < deadline + 15, worker.tail()
                    await asyncio.sleep(0.2)
                await asyncio.sleep(6)  # another look (every 5 s): nothing said again
        finally:
            harness.stop_all()
            await _unlimited(redis)
    assert worker.popen.returncode == 0, worker.tail()
    lines = [json.loads(line) for line in worker.log.read_text().splitlines() if line.startswith("{")]
    said = [(entry["level"], entry["msg"].split(":")[0], entry.get("policy")) for entry in lines
            if entry["msg"].startswith(("Redis ", "could not look"))]
    assert said == [("ERROR", EVICTING, "allkeys-lru"), ("ERROR", REFUSING, None)]
