"""Parked outbox jobs are visible over the API and can be replayed, within the caller's cooperative."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select, update

from core.db import utcnow
from core.models import AuditEvent, OutboxJob
from core.outbox import UNKNOWN_KIND_PARK_AFTER, enqueue
from tests.conftest import drain


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
    assert "PARKED" in body["message"]
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
