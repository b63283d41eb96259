"""Parked outbox jobs are visible over the API and can be replayed, within the caller's cooperative."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select, update

from admin_api.common import iso
from core.db import utcnow
from core.models import AuditEvent, OutboxJob
from core.outbox import UNKNOWN_KIND_PARK_AFTER, enqueue
from core.payments import create_payment
from tests.conftest import drain
from tests.providers.wires import ADMIN, mtn_payment


async def _parked_job(rt, worker, cooperative_id: str) -> int:
    async with rt.sessionmaker.begin() as s:
        await enqueue(s, "no.such.kind", {"n": 1}, dedupe_key="jobs-api-test", cooperative_id=cooperative_id)
        # A kind no release has handled for hours parks (a younger one is handed back: a deploy's window).
        await s.execute(update(OutboxJob).where(OutboxJob.dedupe_key == "jobs-api-test")
                        .values(created_at=utcnow() - UNKNOWN_KIND_PARK_AFTER - timedelta(minutes=1)))
    await drain(worker)
    async with rt.sessionmaker() as s:
        job = (await s.execute(select(OutboxJob).where(OutboxJob.dedupe_key == "jobs-api-test"))).scalar_one()
    assert job.status == "PARKED" and "no handler" in job.last_error
    return job.id


async def test_parked_job_listed_and_replayed(admin, rt, demo, worker):
    job_id = await _parked_job(rt, worker, demo["cooperative_id"])
    page = await admin.json("GET", "/v1/jobs?status=PARKED", 200)
    assert [j["id"] for j in page["data"]] == [job_id]
    assert page["data"][0]["kind"] == "no.such.kind" and "payload" not in page["data"][0]

    replayed = await admin.json("POST", f"/v1/jobs/{job_id}/replay", 200)
    assert (replayed["status"], replayed["attempts"]) == ("PENDING", 0)
    async with rt.sessionmaker() as s:
        row = await s.get(OutboxJob, job_id)
        assert (row.status, row.attempts, row.locked_by) == ("PENDING", 0, None)
        audit = (await s.execute(select(AuditEvent).where(AuditEvent.action == "job.replayed"))).scalars().all()
        assert [(a.entity_id, a.cooperative_id) for a in audit] == [(str(job_id), demo["cooperative_id"])]

    body = await admin.json("POST", f"/v1/jobs/{job_id}/replay", 409)
    # A replay sent again (its answer lost) says the first one took: the job is back in the queue.
    assert f"job {job_id} is PENDING" in body["message"] and "PARKED" in body["message"]
    # The replayed job runs again (and parks again: its cause was not fixed).
    await drain(worker)
    async with rt.sessionmaker() as s:
        assert (await s.get(OutboxJob, job_id)).status == "PARKED"


async def test_jobs_of_another_cooperative_are_invisible(admin, rt, demo, worker, coop_b, tenant):
    job_id = await _parked_job(rt, worker, demo["cooperative_id"])
    other = coop_b["admin"]
    assert (await other.json("GET", "/v1/jobs?status=PARKED", 200))["data"] == []
    await other.json("POST", f"/v1/jobs/{job_id}/replay", 404)
    await admin.json("POST", "/v1/jobs/not-a-number/replay", 404)
    await admin.json("POST", "/v1/jobs/%C2%B3/replay", 404)  # "³": a digit to str.isdigit, not to int()
    await admin.json("POST", "/v1/jobs/%D9%A3/replay", 404)  # "٣" (Arabic-Indic three): not job 3 either
    await admin.json("POST", "/v1/jobs/999999999/replay", 404)
    await tenant.json("GET", "/v1/jobs", 403)
    await admin.json("GET", "/v1/jobs?status=BOGUS", 400)
    async with rt.sessionmaker() as s:
        assert (await s.get(OutboxJob, job_id)).status == "PARKED"


async def test_a_replay_is_audited_with_the_payment_it_is_about(admin, rt, demo):
    """The morning after, "who replayed the collect of payment X?" is answered from the audit log."""
    async with rt.sessionmaker.begin() as s:
        payment, _ = await create_payment(s, rt, mtn_payment(demo), actor=ADMIN)
        await s.execute(update(OutboxJob).where(OutboxJob.kind == "payment.collect").values(
            status="PARKED", last_error="ProviderError: mtn_momo request to pay failed (HTTP 500)"))
        job_id = (await s.execute(select(OutboxJob.id).where(OutboxJob.kind == "payment.collect"))).scalar_one()
    await admin.json("POST", f"/v1/jobs/{job_id}/replay", 200)
    async with rt.sessionmaker() as s:
        [audit] = (await s.execute(select(AuditEvent).where(AuditEvent.action == "job.replayed"))).scalars().all()
    assert audit.after == {"kind": "payment.collect", "subject": {"type": "payment", "id": payment.id}}


async def test_only_a_parked_job_is_replayed_never_one_running_or_done(admin, rt, demo):
    """A replay of a job a worker is running (its lease held) or has finished is refused and leaves the row as it
    is: put back PENDING, a running collect or refund would be run a second time beside the first, and a sent
    receipt sent again."""
    async with rt.sessionmaker.begin() as s:
        for key in ("running", "done"):
            await enqueue(s, "no.such.kind", {"n": 1}, dedupe_key=f"replay-{key}",
                          cooperative_id=demo["cooperative_id"])
        lease_end = utcnow() + timedelta(seconds=60)
        await s.execute(update(OutboxJob).where(OutboxJob.dedupe_key == "replay-running").values(
            status="RUNNING", locked_by="worker-1", attempts=1, run_at=lease_end))
        await s.execute(update(OutboxJob).where(OutboxJob.dedupe_key == "replay-done").values(
            status="DONE", attempts=1, done_at=utcnow()))
    async with rt.sessionmaker() as s:
        ids = {j.dedupe_key: j.id for j in (await s.execute(select(OutboxJob))).scalars()}
    for key, status in (("running", "RUNNING"), ("done", "DONE")):
        body = await admin.json("POST", f"/v1/jobs/{ids[f'replay-{key}']}/replay", 409)
        assert f"is {status}" in body["message"], body
    async with rt.sessionmaker() as s:
        running = await s.get(OutboxJob, ids["replay-running"])
        done = await s.get(OutboxJob, ids["replay-done"])
    assert (running.status, running.locked_by, running.attempts) == ("RUNNING", "worker-1", 1)
    assert (done.status, done.attempts) == ("DONE", 1)


async def _job(rt, key: str, cooperative_id: str, **values) -> int:
    async with rt.sessionmaker.begin() as s:
        await enqueue(s, "no.such.kind", {"n": key}, dedupe_key=key, cooperative_id=cooperative_id)
        await s.execute(update(OutboxJob).where(OutboxJob.dedupe_key == key).values(**values))
        return (await s.execute(select(OutboxJob.id).where(OutboxJob.dedupe_key == key))).scalar_one()


async def test_a_job_waiting_for_its_retry_is_run_now_by_a_replay(admin, rt, demo, coop_b):
    """Its cause fixed (the SMS API key corrected), a job failed once waits out its backoff (an SMS refused for our
    account: 30 minutes) unless an admin runs it now: a replay makes it due at once, its attempts kept, audited."""
    coop = demo["cooperative_id"]
    later = utcnow() + timedelta(minutes=29)
    job_id = await _job(rt, "run-now-waiting", coop, attempts=2, run_at=later, after_failure=True,
                        last_error="SmsAccountError: Africa's Talking refused the credentials (HTTP 401)")
    listed = await admin.json("GET", "/v1/jobs?waiting=true", 200)
    assert [j["id"] for j in listed["data"]] == [job_id]
    assert [j["id"] for j in (await admin.json("GET", "/v1/jobs?waiting=true&status=PENDING", 200))["data"]] == [job_id]
    # Another status with it would list nothing, whatever waits: said, not an empty page.
    refused = await admin.json("GET", "/v1/jobs?waiting=true&status=PARKED", 400)
    assert "status PARKED lists none of them" in refused["message"][0], refused

    await coop_b["admin"].json("POST", f"/v1/jobs/{job_id}/replay", 404)  # another cooperative's: not found
    answer = await admin.json("POST", f"/v1/jobs/{job_id}/replay", 200)
    assert (answer["status"], answer["attempts"]) == ("PENDING", 2)
    async with rt.sessionmaker() as s:
        row = await s.get(OutboxJob, job_id)
        [audit] = (await s.execute(select(AuditEvent).where(AuditEvent.action == "job.replayed"))).scalars().all()
    assert row.status == "PENDING" and row.run_at <= utcnow() and row.attempts == 2
    assert row.last_error.startswith("SmsAccountError")  # kept: its next try reads it
    assert (audit.entity_id, audit.cooperative_id) == (str(job_id), coop)
    assert audit.before == {"status": "PENDING", "attempts": 2, "runAt": iso(later)}  # when it would have run
    assert audit.after == {"kind": "no.such.kind", "subject": None}
    assert (await admin.json("GET", "/v1/jobs?waiting=true", 200))["data"] == []
    # Sent again (its answer lost): the job is due now, nothing left to hurry.
    again = await admin.json("POST", f"/v1/jobs/{job_id}/replay", 409)
    assert again["message"] == (f"job {job_id} is PENDING and not waiting for a retry (due now, or not tried yet): "
                                "only a PARKED job, or a PENDING one waiting for its retry after a failed attempt, "
                                "can be replayed")


async def test_a_job_never_tried_or_running_is_not_run_now(admin, rt, demo):
    """Only a job that failed is hurried: one queued for later on purpose (never tried: a poll's or a scan's planned
    time) keeps its time, and one a worker holds (RUNNING, its run_at the lease's end) is left to it."""
    coop = demo["cooperative_id"]
    later = utcnow() + timedelta(minutes=10)
    planned = await _job(rt, "run-now-planned", coop, attempts=0, run_at=later)
    running = await _job(rt, "run-now-running", coop, status="RUNNING", locked_by="worker-1", attempts=1,
                         run_at=later)
    body = await admin.json("POST", f"/v1/jobs/{planned}/replay", 409)
    assert body["message"].startswith(f"job {planned} is PENDING and not waiting for a retry")
    assert "is RUNNING: only a PARKED job" in (await admin.json("POST", f"/v1/jobs/{running}/replay", 409))["message"]
    async with rt.sessionmaker() as s:
        rows = {j.id: (j.status, j.attempts, j.run_at) for j in (await s.execute(select(OutboxJob))).scalars()}
    assert rows[planned] == ("PENDING", 0, later) and rows[running] == ("RUNNING", 1, later)
    async with rt.sessionmaker() as s:
        assert (await s.execute(select(AuditEvent.id).where(AuditEvent.action == "job.replayed"))).all() == []
