"""A STOP or START taken with no reply queued (sent before her latest word, taken already: stale; or the aggregator's
retry of a text taken already that counted itself again) gives its count against the number's reply limits back
through an 'sms.give_back' job committed with the text's transaction, not only by a call to Redis after the commit:
a process lost, or Redis refusing, between the two left the count used for good (one of her 5 replies per 10
minutes, 20 a day, for a reply she never got)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import update

from channels.sms.jobs import GIVE_BACK_JOB
from channels.sms.routes import _reply_limits, _taken_key
from core.db import utcnow
from core.models import OutboxJob
from core.ratelimit import RateLimiter
from tests.channels.sms.helpers import jobs_of
from tests.channels.sms.test_routes import ALINE
from tests.channels.sms.test_stop_start_order import _replies_to_status, _text
from tests.channels.sms.test_switched_since_give_back import _redis_refuses
from tests.conftest import drain


@pytest.mark.usefixtures("limiter_clock")
async def test_a_stale_stop_gives_its_count_back_though_redis_refused_it_in_the_request(
    rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any, worker: Any, monkeypatch: Any
) -> None:
    """Her START is taken, then her STOP sent before it (stale: no reply), and Redis refuses the STOP's give-back in
    the request. Its give-back job, committed with the text, gives it back: 4 of her next 5 keywords answered (the
    START's reply used one). Given back in the request only, it stayed counted: 3."""
    await _text(sms_client, "START", "at-2", "2026-01-15 10:00:05")
    refused = _redis_refuses(monkeypatch)
    await _text(sms_client, "STOP", "at-1", "2026-01-15 10:00:00")  # sent before her START: stale
    assert refused
    await drain(worker)
    assert await _replies_to_status(rt, sms_client, 5) == 4
    assert [j.status for j in await jobs_of(rt, GIVE_BACK_JOB)] == ["DONE"]


@pytest.mark.usefixtures("limiter_clock")
async def test_a_retry_that_counted_again_gives_its_count_back_though_redis_refused_it_in_the_request(
    rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any, worker: Any, monkeypatch: Any
) -> None:
    """Her STOP is taken and answered; the aggregator's retry of it finds the text taken but its verdict gone (Redis
    lost those keys), so it counts again, and gives back that count of its own (its reply went: one per text). Redis
    refuses that give-back in the request: its job gives it back all the same, whatever became of the STOP's reply
    (sent: the count given back is the retry's own). 4 of her next 5 keywords answered; left counted, 3."""
    await _text(sms_client, "STOP", "at-1", "2026-01-15 10:00:00")
    await drain(worker)
    index = rt.cipher.blind_index(ALINE)
    await rt.redis.delete(_taken_key(index, "at-1", "reply"), _taken_key(index, "at-1", "reply-at"),
                          RateLimiter(rt.redis)._mark(_reply_limits("STOP"), index, "at-1", "once"))
    refused = _redis_refuses(monkeypatch)
    await _text(sms_client, "STOP", "at-1", "2026-01-15 10:00:00")  # the aggregator's retry
    assert refused
    await drain(worker)
    assert await _replies_to_status(rt, sms_client, 5) == 4
    assert [j.status for j in await jobs_of(rt, GIVE_BACK_JOB)] == ["DONE"]


@pytest.mark.usefixtures("limiter_clock")
async def test_a_stale_texts_count_is_given_back_once_however_often_its_job_runs(
    rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any, worker: Any
) -> None:
    """The request gives the count back (Redis there), and its job does too, and runs again (its end lost, say):
    given back once. Twice, 5 of her next 5 keywords were answered."""
    await _text(sms_client, "START", "at-2", "2026-01-15 10:00:05")
    await _text(sms_client, "STOP", "at-1", "2026-01-15 10:00:00")  # stale
    await drain(worker)
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(OutboxJob).where(OutboxJob.kind == GIVE_BACK_JOB)
                        .values(status="PENDING", run_at=utcnow() - timedelta(seconds=1)))
    await drain(worker)
    assert await _replies_to_status(rt, sms_client, 5) == 4
    assert [j.status for j in await jobs_of(rt, GIVE_BACK_JOB)] == ["DONE"]
