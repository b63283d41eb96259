"""/metrics tells a stuck worker from a healthy schedule, and a database it cannot read from current figures."""

from __future__ import annotations

import asyncio
import logging
import math
from datetime import timedelta

from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import update

import core.metrics as metrics
from core.db import utcnow
from core.models import OutboxJob
from core.ops import dashboard
from core.outbox import enqueue


async def _scrape(client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = await client.get("/metrics")
    assert response.status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(await response.text()) for s in family.samples}


def _get(scraped, name: str, **labels: str) -> float:
    return scraped[(name, tuple(sorted(labels.items())))]


async def _jobs(rt, run_at, n: int = 50, status: str = "PENDING") -> None:
    async with rt.sessionmaker.begin() as s:
        for i in range(n):
            await enqueue(s, "sms.send", {"n": i}, dedupe_key=f"lag-{status}-{i}")
        await s.execute(update(OutboxJob).where(OutboxJob.dedupe_key.like(f"lag-{status}-%"))
                        .values(run_at=run_at, status=status))


async def test_stuck_worker_is_told_from_a_healthy_schedule(rt, client):
    # Healthy: 50 jobs scheduled for later (webhook retries, status polls 30 min apart, tomorrow's reminders).
    await _jobs(rt, utcnow() + timedelta(minutes=30))
    healthy = await _scrape(client)
    assert _get(healthy, "gateway_outbox_depth", status="PENDING") == 50
    assert _get(healthy, "gateway_outbox_due_jobs", status="PENDING") == 0
    assert _get(healthy, "gateway_outbox_oldest_due_seconds") == 0
    assert _get(healthy, "gateway_outbox_gauges_ok") == 1

    # Stuck: the same 50 jobs were due an hour ago and no worker took them.
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(OutboxJob).values(run_at=utcnow() - timedelta(hours=1)))
    stuck = await _scrape(client)
    assert _get(stuck, "gateway_outbox_depth", status="PENDING") == 50  # the old gauge alone: no difference
    assert _get(stuck, "gateway_outbox_due_jobs", status="PENDING") == 50
    assert 3590 < _get(stuck, "gateway_outbox_oldest_due_seconds") < 3700


async def test_running_jobs_whose_lease_lapsed_count_as_due(rt, client):
    # A claim moves run_at to the lease's end: RUNNING with run_at passed is a job whose worker was lost.
    await _jobs(rt, utcnow() + timedelta(seconds=50), n=3, status="RUNNING")  # leased, workers alive
    await _jobs(rt, utcnow() - timedelta(minutes=10), n=2, status="PARKED")  # parked jobs are never due
    live = await _scrape(client)
    assert _get(live, "gateway_outbox_depth", status="RUNNING") == 3
    assert _get(live, "gateway_outbox_due_jobs", status="RUNNING") == 0
    assert _get(live, "gateway_outbox_oldest_due_seconds") == 0

    async with rt.sessionmaker.begin() as s:
        await s.execute(update(OutboxJob).where(OutboxJob.status == "RUNNING")
                        .values(run_at=utcnow() - timedelta(minutes=7)))
    lost = await _scrape(client)
    assert _get(lost, "gateway_outbox_due_jobs", status="RUNNING") == 3
    assert 415 < _get(lost, "gateway_outbox_oldest_due_seconds") < 480


async def test_gauges_when_the_database_is_down(rt, client, monkeypatch, caplog):
    monkeypatch.setattr(metrics, "_last_warning", -math.inf)
    await _jobs(rt, utcnow() - timedelta(hours=1))
    before = await _scrape(client)
    assert _get(before, "gateway_outbox_due_jobs", status="PENDING") == 50
    assert _get(before, "gateway_outbox_gauges_ok") == 1
    failures = _get(before, "gateway_outbox_gauge_refresh_failures_total")

    working = rt.sessionmaker

    class Down:
        def __call__(self):
            raise ConnectionRefusedError("database down")

    monkeypatch.setattr(rt, "sessionmaker", Down())
    with caplog.at_level(logging.WARNING, logger="gateway.metrics"):
        down = await _scrape(client)
        again = await _scrape(client)
    for scraped in (down, again):
        # The last figures are not reported as current: NaN, and a gauge an alert can test.
        assert _get(scraped, "gateway_outbox_gauges_ok") == 0
        for name, labels in (("gateway_outbox_depth", {"status": "PENDING"}),
                             ("gateway_outbox_due_jobs", {"status": "PENDING"}),
                             ("gateway_outbox_oldest_due_seconds", {})):
            assert math.isnan(_get(scraped, name, **labels)), name
    assert _get(again, "gateway_outbox_gauge_refresh_failures_total") == failures + 2
    warnings = [r for r in caplog.records if r.name == "gateway.metrics" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "ConnectionRefusedError" in warnings[0].getMessage()  # once a minute at most

    monkeypatch.setattr(rt, "sessionmaker", working)
    back = await _scrape(client)
    assert _get(back, "gateway_outbox_gauges_ok") == 1
    assert _get(back, "gateway_outbox_due_jobs", status="PENDING") == 50


async def test_ops_dashboard_shows_the_oldest_due_job(rt):
    await _jobs(rt, utcnow() + timedelta(minutes=30), n=4)
    async with rt.sessionmaker() as s:
        healthy = (await dashboard(s))["outbox"]
    assert (healthy["pending"], healthy["due"], healthy["oldestDueSeconds"]) == (4, 0, 0)

    async with rt.sessionmaker.begin() as s:
        await s.execute(update(OutboxJob).values(run_at=utcnow() - timedelta(minutes=20)))
    async with rt.sessionmaker() as s:
        stuck = (await dashboard(s))["outbox"]
        other = (await dashboard(s, "another-cooperative"))["outbox"]
    assert (stuck["pending"], stuck["due"]) == (4, 4)
    assert 1190 < stuck["oldestDueSeconds"] < 1260
    assert (other["due"], other["oldestDueSeconds"]) == (0, 0)


async def test_scrapes_at_once_share_one_read_of_the_database(rt, client, monkeypatch):
    # Each scrape read the database on a connection of its own: a burst of them (anyone, while METRICS_TOKEN is
    # unset) took every pooled connection, and USSD hops waiting for one were answered "service unavailable".
    await _jobs(rt, utcnow() - timedelta(minutes=5), n=3)
    reads = 0
    read_database = metrics._read_database

    async def counted(runtime):
        nonlocal reads
        reads += 1
        await asyncio.sleep(0.2)  # a slow read: the other scrapes come while it runs
        return await read_database(runtime)

    monkeypatch.setattr(metrics, "_read_database", counted)
    scraped = await asyncio.gather(*(_scrape(client) for _ in range(40)))
    assert reads == 1
    for one in scraped:  # every scrape got the figures that read gave
        assert _get(one, "gateway_outbox_due_jobs", status="PENDING") == 3
        assert _get(one, "gateway_outbox_gauges_ok") == 1
    # One after the others: read again, its own figures (nothing kept between scrapes).
    await _jobs(rt, utcnow() - timedelta(minutes=5), n=5, status="PARKED")
    later = await _scrape(client)
    assert reads == 2
    assert _get(later, "gateway_outbox_depth", status="PARKED") == 5
