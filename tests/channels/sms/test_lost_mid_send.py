"""A worker lost mid-send (its request at Africa's Talking, no answer recorded, its lease lapsing), then her erasure or
the release of her number before the retry: the erasure or release reads the row QUEUED and writes "not sent"
(Skipped: never handed to Africa's Talking), though the text may have gone. The retry, told its previous attempt was
lost (Job.interrupted), records it as it records any text whose attempt was lost mid-send: SENT Unconfirmed, not
resent; an erased row keeps its number and text cleared. A row whose earlier attempt ended with nothing out (a 503)
stays "not sent"."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import update

from channels.sms.jobs import SmsJobs, message_key, message_keys
from core.db import utcnow
from core.models import OutboxJob
from core.state.sms import SENT_UNCONFIRMED, SKIPPED
from tests.channels.sms.helpers import jobs_of
from tests.channels.sms.test_send_faults import ALINE, make_due, queue_receipt, the_row
from tests.channels.sms.test_send_in_flight import _actions, _erase, _release
from tests.conftest import drain, requires_pg

pytestmark = requires_pg
HELD = {"erasure": "not sent: member_erased", "release": "not sent: phone_released"}


async def _lost_mid_send(rt: Any, worker: Any, monkeypatch: Any) -> None:
    """The worker's run of the receipt's job stores the row and sends it (the simulator has it), and is lost before the
    answer is recorded: its task cancelled with the request out, the job left RUNNING, its lease and send lock then
    lapsed (due again: the next claim takes it as WORKER_LOST)."""
    real_send, out = rt.sms.send, asyncio.Event()

    async def send(phone: Any, body: str) -> Any:
        result = await real_send(phone, body)
        out.set()
        await asyncio.Event().wait()  # the answer never comes back to this run
        return result

    monkeypatch.setattr(rt.sms, "send", send)
    [job] = await worker.claim()
    run = asyncio.create_task(worker.run_job(job))
    await asyncio.wait_for(out.wait(), 30)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    monkeypatch.setattr(rt.sms, "send", real_send)
    async with rt.sessionmaker.begin() as session:
        await session.execute(update(OutboxJob).where(OutboxJob.id == job.id).values(
            run_at=utcnow() - timedelta(seconds=1)))
    await rt.hot_redis.delete(message_keys(message_key(job.payload))[0])
    [lost] = await jobs_of(rt, "sms.send")
    assert lost.status == "RUNNING"


def _assert_unconfirmed(row: Any, action: str, held: Any) -> None:
    assert (row.status, row.provider_status, row.provider_message_id, row.failure_reason) == (
        "SENT", SENT_UNCONFIRMED, None, "unconfirmed, not resent: previous attempt cut off mid-send")
    assert row.sent_at is not None
    if action == "erasure":
        assert (row.phone_enc, row.phone_index, row.body) == ("", "", "")
    else:
        assert (row.phone_enc, row.body) == (held.phone_enc, held.body) != ("", "")


@pytest.mark.parametrize("action", ["erasure", "release"])
async def test_a_text_whose_worker_was_lost_mid_send_before_her_erasure_or_release_is_recorded_unconfirmed(
    rt: Any, demo: dict[str, Any], sim: Any, worker: Any, monkeypatch: Any, action: str
) -> None:
    """Before, the retry found the row FAILED Skipped "not sent", no answer kept, and ended the job: the row said the
    text never went to Africa's Talking while she had it."""
    await queue_receipt(rt, demo)
    await _lost_mid_send(rt, worker, monkeypatch)
    await (_erase if action == "erasure" else _release)(rt, demo)
    held = await the_row(rt)
    assert (held.status, held.provider_status, held.failure_reason) == ("FAILED", SKIPPED, HELD[action])
    await drain(worker)
    row = await the_row(rt)
    _assert_unconfirmed(row, action, held)
    assert await _actions(rt, row.id) == ["sms.failed", "sms.sent"]
    assert [j.status for j in await jobs_of(rt, "sms.send")] == ["DONE"]
    assert len(sim.requests) == 1 and len(sim.messages(ALINE)) == 1


async def test_an_erasure_committing_as_the_retry_records_a_lost_send_unconfirmed_is_corrected(
    rt: Any, demo: dict[str, Any], sim: Any, worker: Any, monkeypatch: Any
) -> None:
    """The retry reads the row QUEUED (the erasure not committed yet) and goes to record it Unconfirmed; her erasure
    commits in between and writes "not sent". Before, the retry's move from QUEUED found it FAILED and left it so."""
    await queue_receipt(rt, demo)
    await _lost_mid_send(rt, worker, monkeypatch)
    real = SmsJobs._unconfirmed

    async def erased_first(self: Any, *args: Any, **kwargs: Any) -> None:
        await _erase(rt, demo)  # commits after the retry read the row QUEUED
        await real(self, *args, **kwargs)

    monkeypatch.setattr(SmsJobs, "_unconfirmed", erased_first)
    await drain(worker)
    row = await the_row(rt)
    _assert_unconfirmed(row, "erasure", None)
    assert await _actions(rt, row.id) == ["sms.failed", "sms.sent"]
    assert len(sim.requests) == 1


async def test_a_text_whose_earlier_attempt_sent_nothing_stays_not_sent_after_her_erasure(
    rt: Any, demo: dict[str, Any], sim: Any, worker: Any
) -> None:
    """Its first attempt stored the row and was answered 503 (nothing taken, retried as any): her erasure's "not sent"
    (Skipped) is true, and the retry leaves it so, sending nothing."""
    await queue_receipt(rt, demo)
    sim.set_failure("http503", times=1)
    await drain(worker)
    [waiting] = await jobs_of(rt, "sms.send")
    assert waiting.status == "PENDING" and (await the_row(rt)).status == "QUEUED"
    await _erase(rt, demo)
    await make_due(rt)
    await drain(worker)
    row = await the_row(rt)
    assert (row.status, row.provider_status, row.failure_reason) == ("FAILED", SKIPPED, HELD["erasure"])
    assert sim.messages(ALINE) == [] and [j.status for j in await jobs_of(rt, "sms.send")] == ["DONE"]
