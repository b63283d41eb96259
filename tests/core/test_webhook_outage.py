"""A receiver's outage loses no event: a short one is retried through, a long one switches the endpoint off
with its deliveries held (and new events recorded) until it is enabled; a deleted endpoint records nothing."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from aiohttp import web
from sqlalchemy import select, update

from core import webhooks
from core.audit import Actor
from core.db import utcnow
from core.models import OutboxJob, WebhookDelivery, WebhookEndpoint
from core.outbox import RetryLater
from tests.channels.sms.helpers import as_job, jobs_of, start_simulator
from tests.conftest import drain
from tests.core.test_webhooks import approved_endpoint, emit

ADMIN = Actor("admin:1", "api")


class Receiver:
    """A cooperative's system that answers 500 while `down`, and notes which event ids it took."""

    def __init__(self) -> None:
        self.down = True
        self.answered: list[tuple[str, int]] = []

    async def handle(self, request: web.Request) -> web.Response:
        event_id = json.loads(await request.read())["id"]
        status = 500 if self.down else 200
        self.answered.append((event_id, status))
        return web.Response(status=status, text="ok")

    def taken(self) -> list[str]:
        return [event_id for event_id, status in self.answered if status == 200]


@pytest.fixture
async def outage(aiohttp_server: Any) -> tuple[Receiver, str]:
    hook = Receiver()
    app = web.Application()
    app.router.add_post("/hook", hook.handle)
    server = await aiohttp_server(app)
    return hook, str(server.make_url("/hook"))


async def _endpoint(rt: Any, endpoint_id: str) -> WebhookEndpoint:
    async with rt.sessionmaker() as session:
        endpoint = await session.get(WebhookEndpoint, endpoint_id)
    assert endpoint is not None
    return endpoint


async def _deliveries(rt: Any) -> dict[str, WebhookDelivery]:
    async with rt.sessionmaker() as session:
        return {d.event_id: d for d in (await session.execute(select(WebhookDelivery))).scalars()}


async def _bring_forward(rt: Any, by: timedelta) -> None:
    """Time passes for the queue: every waiting job is due `by` earlier (their order is kept)."""
    async with rt.sessionmaker.begin() as session:
        for job in (await session.execute(select(OutboxJob).where(OutboxJob.status == "PENDING"))).scalars():
            job.run_at -= by


async def _emit_many(rt: Any, coop: str, prefix: str, count: int) -> list[str]:
    ids = [f"{prefix}_{i:02d}" for i in range(count)]
    for event_id in ids:
        await emit(rt, coop, event_id=event_id)
    return ids


async def test_a_short_outage_of_a_busy_endpoint_loses_nothing(
    rt: Any, demo: dict[str, Any], outage: Any, worker: Any
) -> None:
    hook, url = outage
    coop = demo["cooperative_id"]
    endpoint, _ = await approved_endpoint(rt, coop, url, events=["payment.completed"])
    # 25 payments complete during a few minutes of 500s: 25 failed first attempts, more than DISABLE_AFTER.
    ids = await _emit_many(rt, coop, "evt_busy", 25)
    await drain(worker)
    assert len(hook.answered) == 25 and hook.taken() == []
    state = await _endpoint(rt, endpoint.id)
    assert state.status == "ACTIVE" and state.consecutive_failures == 25 > webhooks.DISABLE_AFTER
    assert all(d.status == "PENDING" for d in (await _deliveries(rt)).values())

    # The receiver is back; the retries come due one after another, each run when its time comes.
    hook.down = False
    retries = sorted((j for j in await jobs_of(rt, "webhook.deliver") if j.status == "PENDING"),
                     key=lambda j: (j.run_at, j.id))
    assert len(retries) == 25
    worker._batch = 1  # one job per claim: they run in the order they are due
    await _bring_forward(rt, timedelta(minutes=2))
    await drain(worker, rounds=100)

    assert hook.taken() == [j.payload["event_id"] for j in retries]  # in the order of their retries
    assert sorted(hook.taken()) == ids  # every event once
    deliveries = await _deliveries(rt)
    assert {d.status for d in deliveries.values()} == {"DELIVERED"}
    assert all([a["status_code"] for a in d.attempts] == [500, 200] for d in deliveries.values())
    state = await _endpoint(rt, endpoint.id)
    assert state.status == "ACTIVE" and state.consecutive_failures == 0


async def test_failing_for_a_day_switches_it_off_holds_and_records_then_enabling_sends_all(
    rt: Any, demo: dict[str, Any], outage: Any, worker: Any, aiohttp_server: Any
) -> None:
    _, sim = await start_simulator(aiohttp_server, rt)
    hook, url = outage
    coop = demo["cooperative_id"]
    endpoint, _ = await approved_endpoint(rt, coop, url, events=["payment.completed"])
    first = await _emit_many(rt, coop, "evt_day", 25)
    await drain(worker)
    assert (await _endpoint(rt, endpoint.id)).status == "ACTIVE"
    # A day later it still fails: the streak (begun when updated_at says) is older than the limit.
    async with rt.sessionmaker.begin() as session:
        began = (await session.get(WebhookEndpoint, endpoint.id)).updated_at
        await session.execute(update(WebhookEndpoint).values(
            updated_at=utcnow() - webhooks.DISABLE_AFTER_FAILING_FOR - timedelta(minutes=1)))
    assert utcnow() - began < timedelta(minutes=1)  # set by the first failure of the streak
    await _bring_forward(rt, timedelta(minutes=2))
    await drain(worker)  # one retry fails: switched off
    state = await _endpoint(rt, endpoint.id)
    assert state.status == "DISABLED" and state.disabled_at is not None
    [notice] = sim.messages("+250788123456")  # the admin is told, once
    assert "disabled after" in notice["message"]

    # Everything still waiting is held, not tried and not given up ...
    await _bring_forward(rt, timedelta(hours=7))
    await drain(worker)
    tried = len(hook.answered)
    assert all(d.status == "PENDING" for d in (await _deliveries(rt)).values())
    # ... and events while it is off are recorded for it, but not sent.
    later = await _emit_many(rt, coop, "evt_off", 3)
    await drain(worker)
    assert len(hook.answered) == tried
    deliveries = await _deliveries(rt)
    assert sorted(deliveries) == sorted(first + later)
    assert all(d.status == "PENDING" for d in deliveries.values())
    assert all(d.attempts == [] for k, d in deliveries.items() if k in later)
    assert len(sim.messages("+250788123456")) == 1

    # The cooperative fixes its system and enables the endpoint: all of it goes out, each event once.
    hook.down = False
    async with rt.sessionmaker.begin() as session:
        await webhooks.enable_endpoint(session, endpoint_id=endpoint.id, cooperative_id=coop, actor=ADMIN)
    await _bring_forward(rt, timedelta(seconds=len(first + later) // webhooks.RESUME_PER_SECOND + 1))
    await drain(worker)
    assert sorted(hook.taken()) == sorted(first + later)
    deliveries = await _deliveries(rt)
    assert {d.status for d in deliveries.values()} == {"DELIVERED"}
    state = await _endpoint(rt, endpoint.id)
    assert state.status == "ACTIVE" and state.consecutive_failures == 0


async def test_enabling_resumes_oldest_first_spread_and_with_fresh_retries(
    rt: Any, demo: dict[str, Any], outage: Any, worker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(webhooks, "RESUME_PER_SECOND", 2)
    _hook, url = outage  # down: every attempt answers 500
    coop = demo["cooperative_id"]
    endpoint, _ = await approved_endpoint(rt, coop, url, events=["payment.completed"])
    await _switched_off_after_failures(rt, endpoint.id)
    ids = await _emit_many(rt, coop, "evt_held", 5)
    await drain(worker)
    # Held for four days: longer than the three days of retries.
    async with rt.sessionmaker.begin() as session:
        for age, event_id in enumerate(reversed(ids)):
            await session.execute(update(WebhookDelivery).where(WebhookDelivery.event_id == event_id)
                                  .values(created_at=utcnow() - timedelta(days=4, minutes=age)))
    # A retry queued before the switch-off, not yet due: it knows nothing of the resume.
    async with rt.sessionmaker.begin() as session:
        session.add(OutboxJob(kind="webhook.deliver", payload={"endpoint_id": endpoint.id, "event_id": ids[0]},
                              dedupe_key=f"whd:{endpoint.id}:{ids[0]}:old", cooperative_id=coop,
                              status="PENDING", run_at=utcnow() + timedelta(hours=5)))
    async with rt.sessionmaker.begin() as session:
        await webhooks.enable_endpoint(session, endpoint_id=endpoint.id, cooperative_id=coop, actor=ADMIN)
    resumed = [j for j in await jobs_of(rt, "webhook.deliver") if j.status == "PENDING"]
    by_event = {j.payload["event_id"]: j for j in resumed}
    assert sorted(by_event) == ids and len(resumed) == len(ids)  # one job each: the old retry superseded
    [old] = [j for j in await jobs_of(rt, "webhook.deliver") if j.dedupe_key.endswith(":old")]
    assert (old.status, old.last_error) == ("DONE", "superseded: the endpoint was enabled again")
    # Had it been running at that moment (no resumed_at of its own), its failure still counts the three
    # days from the enable, as the audit log records it: retried, not given up.
    with pytest.raises(RetryLater):
        await webhooks.deliver(rt, as_job(old))
    assert (await _deliveries(rt))[ids[0]].status == "PENDING"
    start = min(j.run_at for j in resumed)
    assert [round((by_event[e].run_at - start).total_seconds()) for e in ids] == [0, 0, 1, 1, 2]
    # Still failing once resumed: retried again (counted from the resume), not given up.
    with pytest.raises(RetryLater):
        await webhooks.deliver(rt, as_job(by_event[ids[0]]))
    assert (await _deliveries(rt))[ids[0]].status == "PENDING"


async def _switched_off_after_failures(rt: Any, endpoint_id: str) -> None:
    """The endpoint as the worker leaves it after a day of failures."""
    async with rt.sessionmaker.begin() as session:
        await session.execute(update(WebhookEndpoint).where(WebhookEndpoint.id == endpoint_id).values(
            consecutive_failures=webhooks.DISABLE_AFTER - 1,
            updated_at=utcnow() - webhooks.DISABLE_AFTER_FAILING_FOR - timedelta(minutes=1)))
        await webhooks._disable(rt, session, endpoint_id, webhooks.DISABLE_AFTER, utcnow() - timedelta(days=1))
    async with rt.sessionmaker() as session:
        assert await webhooks.disabled_for_failures(session, endpoint_id)


async def test_a_deleted_endpoint_gets_no_new_deliveries(
    rt: Any, demo: dict[str, Any], outage: Any, worker: Any
) -> None:
    hook, url = outage
    coop = demo["cooperative_id"]
    endpoint, _ = await approved_endpoint(rt, coop, url, events=["payment.completed"])
    await emit(rt, coop, event_id="evt_before")
    await drain(worker)  # failed once, waits for its retry
    async with rt.sessionmaker.begin() as session:
        await webhooks.delete_endpoint(session, endpoint_id=endpoint.id, cooperative_id=coop, actor=ADMIN)
    async with rt.sessionmaker() as session:
        assert not await webhooks.disabled_for_failures(session, endpoint.id)
    await emit(rt, coop, event_id="evt_after")
    await _bring_forward(rt, timedelta(minutes=2))
    await drain(worker)
    deliveries = await _deliveries(rt)
    assert sorted(deliveries) == ["evt_before"] and deliveries["evt_before"].status == "FAILED"
    assert len(hook.answered) == 1


async def test_deleting_an_endpoint_switched_off_after_failures_stops_recording(
    rt: Any, demo: dict[str, Any], outage: Any, worker: Any
) -> None:
    _hook, url = outage
    coop = demo["cooperative_id"]
    endpoint, _ = await approved_endpoint(rt, coop, url, events=["payment.completed"])
    await _switched_off_after_failures(rt, endpoint.id)
    await emit(rt, coop, event_id="evt_held")
    await drain(worker)
    assert (await _deliveries(rt))["evt_held"].status == "PENDING"
    async with rt.sessionmaker.begin() as session:
        deleted = await webhooks.delete_endpoint(session, endpoint_id=endpoint.id, cooperative_id=coop,
                                                 actor=ADMIN)
    assert deleted.status == "DISABLED"
    async with rt.sessionmaker() as session:
        assert not await webhooks.disabled_for_failures(session, endpoint.id)
    await emit(rt, coop, event_id="evt_gone")
    await drain(worker)
    deliveries = await _deliveries(rt)
    assert sorted(deliveries) == ["evt_held"] and deliveries["evt_held"].status == "FAILED"
    # Enabled again later: it starts afresh, with nothing from while it was deleted.
    async with rt.sessionmaker.begin() as session:
        await webhooks.enable_endpoint(session, endpoint_id=endpoint.id, cooperative_id=coop, actor=ADMIN)
    assert [j for j in await jobs_of(rt, "webhook.deliver") if j.status == "PENDING"] == []


async def test_enabling_twice_in_one_second_still_resumes_what_is_held(
    rt: Any, demo: dict[str, Any], outage: Any, worker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    _hook, url = outage
    coop = demo["cooperative_id"]
    endpoint, _ = await approved_endpoint(rt, coop, url, events=["payment.completed"])
    await _switched_off_after_failures(rt, endpoint.id)
    await emit(rt, coop, event_id="evt_held")
    await drain(worker)
    assert (await _deliveries(rt))["evt_held"].status == "PENDING"
    # Enabled, switched off again and enabled again, all within one second.
    moment = utcnow()
    monkeypatch.setattr(webhooks, "utcnow", lambda: moment)
    async with rt.sessionmaker.begin() as session:
        await webhooks.enable_endpoint(session, endpoint_id=endpoint.id, cooperative_id=coop, actor=ADMIN)
    await _switched_off_after_failures(rt, endpoint.id)
    async with rt.sessionmaker.begin() as session:
        await webhooks.enable_endpoint(session, endpoint_id=endpoint.id, cooperative_id=coop, actor=ADMIN)
    # The second enable's resume is not dropped as a duplicate of the first's (which it superseded).
    [waiting] = [j for j in await jobs_of(rt, "webhook.deliver") if j.status == "PENDING"]
    assert waiting.payload["event_id"] == "evt_held"


async def test_the_ops_page_counts_held_deliveries_apart_from_pending_ones(
    rt: Any, demo: dict[str, Any], outage: Any, worker: Any
) -> None:
    from core.models import ApprovedDomain
    from core.ops import dashboard

    _hook, url = outage  # down: every attempt answers 500
    coop = demo["cooperative_id"]
    off, _ = await approved_endpoint(rt, coop, url, events=["payment.completed"])
    await _switched_off_after_failures(rt, off.id)
    await approved_endpoint(rt, coop, url.replace("/hook", "/other"), events=["payment.completed"])
    await emit(rt, coop, event_id="evt_1")
    await drain(worker)  # the switched-off one's held, the other's failed once and waits for its retry
    assert {d.status for d in (await _deliveries(rt)).values()} == {"PENDING"}

    async def hooks() -> dict[str, Any]:
        async with rt.sessionmaker() as session:
            figures = await dashboard(session, coop)
        return dict(figures["webhooks"])

    shown = await hooks()
    assert (shown["deliveries"], shown["held"]) == ({"PENDING": 1, "HELD": 1}, 1)
    # Its domain rejected: the other one's is held too.
    async with rt.sessionmaker.begin() as session:
        await session.execute(update(ApprovedDomain).where(ApprovedDomain.cooperative_id == coop)
                              .values(status="REJECTED"))
    shown = await hooks()
    assert (shown["deliveries"], shown["held"]) == ({"HELD": 2}, 2)


async def test_the_ops_page_reads_held_deliveries_in_as_many_queries_for_five_endpoints_as_for_two(
    rt: Any, demo: dict[str, Any], outage: Any, worker: Any
) -> None:
    """Each endpoint with deliveries pending was read, and its held reason looked up, one by one: two or three queries
    an endpoint, on a page an operator keeps open over every cooperative's endpoints."""
    from core.ops import dashboard
    from tests.conftest import sql_sent

    _hook, url = outage
    coop = demo["cooperative_id"]
    off, _ = await approved_endpoint(rt, coop, url, events=["payment.completed"])
    await _switched_off_after_failures(rt, off.id)
    await approved_endpoint(rt, coop, url.replace("/hook", "/other"), events=["payment.completed"])
    await emit(rt, coop, event_id="evt_1")
    await drain(worker)

    async def hooks() -> tuple[dict[str, Any], int]:
        with sql_sent(rt) as sent:
            async with rt.sessionmaker() as session:
                figures = await dashboard(session, coop)
        return dict(figures["webhooks"]), len(sent)

    two, queries = await hooks()
    assert (two["deliveries"], two["held"]) == ({"PENDING": 1, "HELD": 1}, 1)
    for n in range(3):
        await approved_endpoint(rt, coop, url.replace("/hook", f"/more{n}"), events=["payment.completed"])
    await emit(rt, coop, event_id="evt_2")
    await drain(worker)
    five, queries_for_five = await hooks()
    assert (five["deliveries"], five["held"]) == ({"PENDING": 5, "HELD": 2}, 2)
    assert queries_for_five == queries
