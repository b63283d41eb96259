"""A parked 'sms.send' discarded by an admin (POST /v1/jobs/{id}/discard): its message, still QUEUED and shown as
parked (QUEUED_PARKED: "replay it"), will never go. It becomes FAILED, not sent, saying why (SKIPPED: never handed
to the aggregator), so the ops page no longer shows it waiting and prune may empty its text as any other's."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update

from core.models import AuditEvent, OutboxJob, SmsMessage
from core.notify import send_sms
from core.ops import dashboard
from core.outbox import INTERRUPTED
from tests.admin_api.conftest import bearer
from tests.channels.sms.test_send_faults import ALINE, last_attempt, queue_receipt, the_job, the_row
from tests.conftest import drain

REASON = "the member paid at the office; receipt given by hand"


async def test_a_discarded_send_fails_its_queued_message(
    rt: Any, demo: dict[str, Any], sim: Any, worker: Any, client: Any
) -> None:
    await queue_receipt(rt, demo)
    await last_attempt(rt)
    sim.set_failure("http503")
    await drain(worker)
    job = await the_job(rt)
    assert (job.status, (await the_row(rt)).provider_status) == ("PARKED", "RetriesExhausted")

    admin = await bearer(client, *demo["admin"])
    await admin.json("POST", f"/v1/jobs/{job.id}/discard", 200, json={"reason": REASON})
    row = await the_row(rt)
    assert (row.status, row.provider_status, row.failure_reason) == (
        "FAILED", "Skipped", f"discarded by an admin: {REASON}"[:64])
    async with rt.sessionmaker() as session:
        counts = (await dashboard(session, demo["cooperative_id"]))["sms"]["counts"]
        moved = (await session.execute(select(AuditEvent).where(AuditEvent.entity_type == "sms",
                                                                AuditEvent.entity_id == row.id,
                                                                AuditEvent.after["status"].as_string() == "FAILED")
                                       )).scalars().all()
    assert counts == {"SKIPPED": 1} and len(moved) == 1
    assert (await the_job(rt)).status == "DISCARDED"
    sim.set_failure(None)
    await drain(worker)
    assert sim.messages(ALINE) == []


async def test_a_discarded_send_that_stored_no_message_changes_no_message(
    rt: Any, demo: dict[str, Any], sim: Any, worker: Any, client: Any
) -> None:
    """A poison send: its template is gone (a release removed it), so it parked before storing any message."""
    async with rt.sessionmaker.begin() as session:
        await send_sms(session, template="receipt_removed_in_v41", cooperative_id=demo["cooperative_id"],
                       context={}, cipher=rt.cipher, member_id=demo["members"][ALINE], dedupe="poison-1")
    await drain(worker)
    job = await the_job(rt)
    assert job.status == "PARKED" and "template" in (job.last_error or "")
    admin = await bearer(client, *demo["admin"])
    await admin.json("POST", f"/v1/jobs/{job.id}/discard", 200, json={"reason": REASON})
    async with rt.sessionmaker() as session:
        assert (await session.execute(select(SmsMessage))).first() is None
        assert (await session.get(OutboxJob, job.id)).status == "DISCARDED"


async def test_a_discarded_send_whose_last_try_was_cut_off_is_a_plain_failure(
    rt: Any, demo: dict[str, Any], sim: Any, worker: Any, client: Any
) -> None:
    """Its last try cut off mid-send may have reached Africa's Talking: FAILED without the Skipped mark, which would
    say it was never handed over (a reminder so marked counts as not sent, and the next scan queues it again)."""
    await queue_receipt(rt, demo)
    await last_attempt(rt)
    sim.set_failure("http503")
    await drain(worker)
    job = await the_job(rt)
    async with rt.sessionmaker.begin() as session:
        await session.execute(update(OutboxJob).where(OutboxJob.id == job.id).values(
            last_error=f"{INTERRUPTED}: ran past 55s"))
    admin = await bearer(client, *demo["admin"])
    await admin.json("POST", f"/v1/jobs/{job.id}/discard", 200, json={"reason": REASON})
    row = await the_row(rt)
    assert (row.status, row.provider_status) == ("FAILED", None)
