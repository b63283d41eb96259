"""A reply to STOP or START the worker does not send because the number switched since (switched_since) gives its
count against the number's reply limits back through an 'sms.give_back' job queued with the reply's end, not by a
call to Redis after it: a worker lost, or Redis refusing, between the two left the count used for good (one of her 5
replies per 10 minutes, 20 a day, for a reply she never got)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from sqlalchemy import select, update

from channels.sms.jobs import GIVE_BACK_JOB, SmsJobs
from channels.sms.templates import render
from core.db import utcnow
from core.models import OutboxJob, SmsMessage
from core.ratelimit import RateLimiter
from core.state.sms import SmsStatus
from tests.channels.sms.helpers import jobs_of
from tests.channels.sms.test_routes import ALINE
from tests.channels.sms.test_send_faults import make_due
from tests.channels.sms.test_stop_start_order import _replies_to_status, _stop_undone_since, _text
from tests.conftest import drain


def _redis_refuses(monkeypatch: Any, times: int = 1) -> list[int]:
    """The next `times` give-backs (RateLimiter.uncount_once) find Redis refusing connections; the ones after go."""
    real, refused = RateLimiter.uncount_once, []

    async def refuses(self: Any, *args: Any, **kwargs: Any) -> bool:
        if len(refused) < times:
            refused.append(1)
            raise RedisConnectionError("Connection refused")
        return await real(self, *args, **kwargs)

    monkeypatch.setattr(RateLimiter, "uncount_once", refuses)
    return refused


async def _the_reply(rt: Any) -> tuple[str, str | None, str | None]:
    async with rt.sessionmaker() as s:
        row = (await s.execute(select(SmsMessage).where(SmsMessage.template == "opted_out"))).scalar_one()
    return row.status, row.provider_status, row.failure_reason


@pytest.mark.usefixtures("limiter_clock")
async def test_a_reply_switched_since_gives_its_count_back_though_redis_refused_it_at_the_move(
    rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any, worker: Any, monkeypatch: Any
) -> None:
    """Her STOP's reply (stored by a try that failed) is FAILED switched_since at its retry, after her START, and
    Redis refuses the give-back then (the run's own, at once, and its give-back job's first try). The job waits for
    Redis, its attempt kept, and gives the count back on its next try: 4 of her next 5 keywords answered. Given back
    in the run only (best effort), it stayed counted: 3."""
    refused = _redis_refuses(monkeypatch, times=2)
    await _stop_undone_since(rt, sms_client, sim, worker)
    assert len(refused) == 2
    assert await _the_reply(rt) == ("FAILED", "Skipped", "not sent: switched_since")
    waited = await jobs_of(rt, GIVE_BACK_JOB)
    await make_due(rt)
    await drain(worker)
    assert await _replies_to_status(rt, sms_client, 5) == 4
    assert [(j.status, j.attempts) for j in waited] == [("PENDING", 0)], [j.last_error for j in waited]
    assert [j.status for j in await jobs_of(rt, GIVE_BACK_JOB)] == ["DONE"]
    await drain(worker)
    assert len(sim.messages(ALINE)) == 5


@pytest.mark.usefixtures("limiter_clock")
async def test_a_reply_switched_since_whose_run_is_lost_right_after_the_move_gives_its_count_back(
    rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any, worker: Any, monkeypatch: Any
) -> None:
    """The worker's run of her STOP's reply is lost right after it moved the reply to FAILED (its process killed:
    here an error raised there), before any give-back. Its job's next run finds the reply FAILED and does nothing:
    the give-back must have been committed with the move. Left to the run, 3 of her next 5 keywords were answered."""
    real = SmsJobs._move

    async def lost_after_the_move(self: Any, message_id: str, target: SmsStatus, **kwargs: Any) -> bool:
        moved = await real(self, message_id, target, **kwargs)
        if target is SmsStatus.FAILED:
            raise RuntimeError("worker process lost")
        return moved

    with monkeypatch.context() as patched:
        patched.setattr(SmsJobs, "_move", lost_after_the_move)
        await _stop_undone_since(rt, sms_client, sim, worker)
    assert await _the_reply(rt) == ("FAILED", "Skipped", "not sent: switched_since")
    await make_due(rt)
    await drain(worker)  # the reply's job run again: its row is FAILED, it ends
    async with rt.sessionmaker() as s:
        jobs = {job.payload.get("template", job.kind): job.status for job in (await s.execute(select(OutboxJob)))
                .scalars()}
    assert await _replies_to_status(rt, sms_client, 5) == 4
    assert jobs == {"opted_out": "DONE", "opted_in": "DONE", GIVE_BACK_JOB: "DONE"}


@pytest.mark.usefixtures("limiter_clock")
async def test_a_reply_switched_since_before_it_was_stored_gives_its_count_back_though_redis_refused_it(
    rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any, worker: Any, monkeypatch: Any
) -> None:
    """Her START taken before the worker got to her STOP's reply (nothing stored, nothing moved), Redis refusing the
    give-back then (the run's at once, and its job's first try): the job queued with the reply's job's end gives it
    back once Redis takes it (4 of her next 5 keywords answered). Given back in the run only (best effort), it stayed
    counted: 3."""
    refused = _redis_refuses(monkeypatch, times=2)
    await _text(sms_client, "STOP", "at-1", "2026-01-15 10:00:00")
    await _text(sms_client, "START", "at-2", "2026-01-15 10:00:05")
    await drain(worker)
    assert len(refused) == 2
    assert [m["message"] for m in sim.messages(ALINE)] == [render("opted_in", "rw", {})]
    async with rt.sessionmaker() as s:
        assert (await s.execute(select(SmsMessage.template))).scalars().all() == ["opted_in"]
    await make_due(rt)
    await drain(worker)
    assert await _replies_to_status(rt, sms_client, 5) == 4
    assert [j.status for j in await jobs_of(rt, GIVE_BACK_JOB)] == ["DONE"]


@pytest.mark.usefixtures("limiter_clock")
async def test_a_reply_switched_since_gives_its_count_back_once_however_often_its_jobs_run(
    rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any, worker: Any
) -> None:
    """Its give-back job run again (its worker lost after Redis took it, before DONE was written), and the reply's
    own job run again (its end lost): one give-back job, the count given back once. Given back twice, her STATUS's
    count went too: 5 of her next 5 answered, 6 replies in her 10 minutes."""
    await _stop_undone_since(rt, sms_client, sim, worker)
    [back] = await jobs_of(rt, GIVE_BACK_JOB)
    assert back.status == "DONE"
    await _text(sms_client, "STATUS PAY_20260115_999999", "status-first", "2026-01-15 10:02:00")  # 2 of her 5
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(OutboxJob).where(OutboxJob.kind == GIVE_BACK_JOB).values(
            status="RUNNING", done_at=None, run_at=utcnow() - timedelta(seconds=1)))
        await s.execute(update(OutboxJob).where(OutboxJob.payload["template"].as_string() == "opted_out").values(
            status="PENDING", run_at=utcnow() - timedelta(seconds=1)))
    await drain(worker)
    assert [j.status for j in await jobs_of(rt, GIVE_BACK_JOB)] == ["DONE"]
    # Her START's reply and that STATUS counted: 3 more of her 5 (4 "not found" replies in all), not 4 (5).
    assert await _replies_to_status(rt, sms_client, 4) == 4


@pytest.mark.usefixtures("limiter_clock")
async def test_a_give_back_job_for_a_reply_that_went_gives_nothing_back(
    rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any, worker: Any
) -> None:
    """The give-back job checks the message as it runs: only one never handed to Africa's Talking (FAILED Skipped, or
    none stored) gives its count back. One for a reply that went (here queued by hand: a bug, a restored database),
    its answer from Africa's Talking no longer kept in Redis (a week later, or Redis lost it), keeps it: 4 of her next
    5 keywords answered, not 5."""
    from channels.sms.jobs import message_key, message_keys
    from core.outbox import enqueue

    await _text(sms_client, "STOP", "at-1", "2026-01-15 10:00:00")
    await drain(worker)
    [reply] = await jobs_of(rt, "sms.send")
    assert [m["message"] for m in sim.messages(ALINE)] == [render("opted_out", "rw", {})]
    assert await rt.hot_redis.delete(message_keys(message_key(reply.payload))[1]) == 1
    async with rt.sessionmaker.begin() as s:
        await enqueue(s, GIVE_BACK_JOB, {"job_id": reply.id}, dedupe_key=f"{GIVE_BACK_JOB}:{reply.id}")
    await drain(worker)
    assert [j.status for j in await jobs_of(rt, GIVE_BACK_JOB)] == ["DONE"]
    assert await _replies_to_status(rt, sms_client, 5) == 4


async def _statuses_answered(rt: Any, client: Any, count: int, first: int = 0) -> int:
    """Text STATUS `count` times (inbound ids from `first`: each a text of its own); how many STATUS replies are
    queued in all."""
    for i in range(first, first + count):
        await _text(client, "STATUS PAY_20260115_999999", f"status-{i}", "2026-01-15 10:02:00")
    return sum(job.payload["template"] == "not_found" for job in await jobs_of(rt, "sms.send"))


@pytest.mark.usefixtures("limiter_clock")
@pytest.mark.parametrize("stored", [True, False])
async def test_a_reply_switched_since_gives_its_count_back_at_once_and_once(
    rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any, worker: Any, stored: bool
) -> None:
    """The worker's run that ends her STOP's reply unsent (switched_since: stored by a try that failed, `stored`, or
    not yet) gives its count back at once, beside the give-back job it queues: the keywords she texts right after,
    before any poll of the worker runs that job, are answered (4 of 5: her START's reply used one). Left to the job,
    3 were. Then the job runs and gives nothing back a second time: her next keyword is refused."""
    if stored:
        sim.set_failure("http500", times=1)
    await _text(sms_client, "STOP", "at-1", "2026-01-15 10:00:00")
    if stored:
        await drain(worker)  # the STOP's reply stored, its try failed: waits for its retry
    await _text(sms_client, "START", "at-2", "2026-01-15 10:00:05")
    if stored:
        await drain(worker)  # the START's reply goes
        await make_due(rt)
    for job in await worker.claim():  # one poll: the replies' jobs due, and nothing they queue
        await worker.run_job(job)
    assert [m["message"] for m in sim.messages(ALINE)] == [render("opted_in", "rw", {})]
    [back] = await jobs_of(rt, GIVE_BACK_JOB)
    assert back.status == "PENDING"  # not run yet
    assert await _statuses_answered(rt, sms_client, 5) == 4
    await drain(worker)  # the give-back job: the count was given back already, and is not given back twice
    assert [j.status for j in await jobs_of(rt, GIVE_BACK_JOB)] == ["DONE"]
    assert await _statuses_answered(rt, sms_client, 1, first=5) == 4
