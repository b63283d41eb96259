"""Jobs waiting after a failed try, told apart from planned waits by what the try said, not by its error's text.

A handler may retry its failures with its attempt given back (RetryLater(failed=True)): a webhook delivery (its
three days bound it) and a payment's status poll whose status query failed stay PENDING with attempts 0 however long
they fail. The worker records that the try failed (outbox_jobs.after_failure), so GET /v1/jobs?waiting=true lists
them and POST /v1/jobs/replay {"waiting": true} runs them now once the cause is fixed; a poll told "still pending"
(a planned wait) is not. Before, only a webhook delivery was recognised, by its lastError's prefix.

A replayed poll that finds the provider has never heard of the payment sends it again: its resend is keyed by its
own count of resends (its payload, which a replay keeps), not by its attempts (which a replay starts again, so the
resend was taken for an earlier try's and never queued).

A bulk replay or run-now checks each job again under its row lock: one that changed since the call listed them is
skipped, never given the other call's treatment.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import select, update

import core.db
from core.db import utcnow
from core.models import AuditEvent, OutboxJob
from core.payments import create_payment
from tests.conftest import drain
from tests.core.test_poll_unsettled import _payment, _processing
from tests.providers.wires import ADMIN, due_now, mtn_adapter, mtn_payment, mtn_wire

RTP = "/collection/v1_0/requesttopay"
NOT_FOUND = {"code": "RESOURCE_NOT_FOUND", "message": "Requested resource was not found."}


def _status(ref: str, status: str) -> dict[str, Any]:
    return {"amount": "50000", "currency": "RWF", "financialTransactionId": "FT-RUN-NOW", "externalId": ref,
            "payer": {"partyIdType": "MSISDN", "partyId": "250788000001"}, "status": status}


async def _jobs(rt: Any, kind: str) -> list[OutboxJob]:
    async with rt.sessionmaker() as s:
        return list((await s.execute(select(OutboxJob).where(OutboxJob.kind == kind).order_by(OutboxJob.id)))
                    .scalars())


async def _replayed(rt: Any) -> list[tuple[str, Any]]:
    async with rt.sessionmaker() as s:
        rows = (await s.execute(select(AuditEvent).where(AuditEvent.action == "job.replayed")
                                .order_by(AuditEvent.id))).scalars().all()
    return [(a.entity_id, a.before) for a in rows]


async def test_a_poll_whose_status_query_failed_is_waiting_and_run_now_a_pending_one_is_not(
        rt: Any, demo: dict[str, Any], worker: Any, admin: Any) -> None:
    wire, payment = await _processing(rt, demo, worker)
    ref = payment.provider_reference
    # MTN answers: still pending. A planned wait (the poll's cadence), nothing to hurry.
    wire.on("GET", RTP + "/*", 200, _status(ref, "PENDING"))
    await due_now(rt, "payment.poll")
    await drain(worker)
    [poll] = await _jobs(rt, "payment.poll")
    assert (poll.status, poll.attempts, poll.last_error, poll.after_failure) == ("PENDING", 0, "still pending", False)
    assert (await admin.json("GET", "/v1/jobs?waiting=true", 200))["data"] == []
    await admin.json("POST", f"/v1/jobs/{poll.id}/replay", 409)

    # Its status lookup now fails (HTTP 500): the try failed, its attempt given back all the same.
    wire.on("GET", RTP + "/*", 500, {"message": "Internal error"})
    await due_now(rt, "payment.poll")
    await drain(worker)
    [poll] = await _jobs(rt, "payment.poll")
    assert (poll.status, poll.attempts, poll.after_failure) == ("PENDING", 0, True)
    assert poll.last_error.startswith("status query failed") and poll.run_at > utcnow()
    listed = await admin.json("GET", "/v1/jobs?waiting=true", 200)
    assert [j["id"] for j in listed["data"]] == [poll.id]

    # MTN fixed, and the payer approved meanwhile: run now, the payment completes without waiting out the cadence.
    asked = len(wire.sent("GET", RTP + "/*"))
    wire.on("GET", RTP + "/*", 200, _status(ref, "SUCCESSFUL"))
    ran = await admin.json("POST", "/v1/jobs/replay", 200, json={"waiting": True, "kind": "payment.poll"})
    assert (ran["replayed"], ran["skipped"]) == ([poll.id], [])
    [(entity, before)] = await _replayed(rt)
    assert entity == str(poll.id) and (before["status"], before["attempts"]) == ("PENDING", 0)
    await drain(worker)
    assert len(wire.sent("GET", RTP + "/*")) == asked + 1
    assert (await _payment(rt, payment.id)).status == "COMPLETED"
    [poll] = await _jobs(rt, "payment.poll")
    assert poll.status == "DONE"


async def test_a_poll_waiting_after_a_failed_query_shows_it_and_is_no_longer_waiting_once_told_still_pending(
        rt: Any, demo: dict[str, Any], worker: Any, admin: Any) -> None:
    """Each job says why it is (or is not) waiting: afterFailure. A poll's failed status query (its attempt given back,
    attempts 0) shows true; its next try, told "still pending" (a planned wait), clears it, and the poll is no longer
    listed as waiting nor run now (its attempts are still 0: no try of it used one)."""
    wire, payment = await _processing(rt, demo, worker)
    ref = payment.provider_reference
    wire.on("GET", RTP + "/*", 500, {"message": "Internal error"})
    await due_now(rt, "payment.poll")
    await drain(worker)
    [listed] = (await admin.json("GET", "/v1/jobs?waiting=true", 200))["data"]
    assert (listed["kind"], listed["attempts"], listed["afterFailure"]) == ("payment.poll", 0, True)
    assert listed["lastError"].startswith("status query failed")

    wire.on("GET", RTP + "/*", 200, _status(ref, "PENDING"))
    await due_now(rt, "payment.poll")
    await drain(worker)
    assert (await admin.json("GET", "/v1/jobs?waiting=true", 200))["data"] == []
    [poll] = (await admin.json("GET", "/v1/jobs?kind=payment.poll&status=PENDING", 200))["data"]
    assert (poll["id"], poll["attempts"], poll["afterFailure"], poll["lastError"]) == (
        listed["id"], 0, False, "still pending")
    await admin.json("POST", f"/v1/jobs/{poll['id']}/replay", 409)


async def test_a_job_whose_failed_attempt_was_followed_by_a_planned_wait_is_no_longer_waiting(
        rt: Any, demo: dict[str, Any], worker: Any, admin: Any) -> None:
    """Waiting is what the last try said, not what an earlier one did. As a refund's poll: its status query fails
    (an exception: an attempt used), then it is told "still pending" (RetryLater: its wait planned, its attempts still
    1). Before, its attempts kept it listed as waiting (and run now by {"waiting": true}) for the rest of its polls."""
    from core.outbox import RetryLater, enqueue

    async with rt.sessionmaker.begin() as s:
        await enqueue(s, "test.poll", {"n": 1}, dedupe_key="test-poll", cooperative_id=demo["cooperative_id"])
    said: list[BaseException] = [RuntimeError("provider HTTP 500"), RetryLater(600, "still pending")]

    async def poll(job: Any) -> None:
        raise said.pop(0)

    worker._handlers["test.poll"] = poll
    await drain(worker)
    [listed] = (await admin.json("GET", "/v1/jobs?waiting=true", 200))["data"]
    assert (listed["kind"], listed["attempts"], listed["afterFailure"]) == ("test.poll", 1, True)

    await due_now(rt, "test.poll")
    await drain(worker)
    assert said == [] and (await admin.json("GET", "/v1/jobs?waiting=true", 200))["data"] == []
    [job] = (await admin.json("GET", "/v1/jobs?kind=test.poll", 200))["data"]
    assert (job["status"], job["attempts"], job["afterFailure"], job["lastError"]) == (
        "PENDING", 1, False, "still pending")
    assert (await admin.json("POST", "/v1/jobs/replay", 200, json={"waiting": True}))["replayed"] == []
    await admin.json("POST", f"/v1/jobs/{job['id']}/replay", 409)


async def test_a_job_done_after_a_failed_attempt_no_longer_shows_its_failure(
        rt: Any, demo: dict[str, Any], worker: Any, admin: Any) -> None:
    """afterFailure is what the job's last try said: one that failed once (an attempt used, listed as waiting) and
    then succeeded is DONE, its last try no failure. Before, the failed try's mark stayed on the DONE job (true),
    and a job queued again from DONE under its key (a replayed refund's poll) was listed as waiting at once."""
    from core.outbox import enqueue

    async with rt.sessionmaker.begin() as s:
        await enqueue(s, "test.once", {"n": 1}, dedupe_key="test-once", cooperative_id=demo["cooperative_id"])
    said: list[BaseException | None] = [RuntimeError("provider HTTP 500"), None]

    async def once(job: Any) -> None:
        error = said.pop(0)
        if error is not None:
            raise error

    worker._handlers["test.once"] = once
    await drain(worker)
    [listed] = (await admin.json("GET", "/v1/jobs?waiting=true", 200))["data"]
    assert (listed["kind"], listed["attempts"], listed["afterFailure"]) == ("test.once", 1, True)

    await due_now(rt, "test.once")
    await drain(worker)
    assert said == []
    [job] = (await admin.json("GET", "/v1/jobs?kind=test.once&status=DONE", 200))["data"]
    assert (job["id"], job["attempts"], job["afterFailure"], job["lastError"]) == (listed["id"], 2, False, None)


async def test_a_replayed_poll_sends_a_request_the_provider_never_got_again(
        rt: Any, demo: dict[str, Any], worker: Any, admin: Any) -> None:
    wire = mtn_wire().on("POST", RTP, 503, {"message": "Service unavailable"}).on("GET", RTP + "/*", 404, NOT_FOUND)
    mtn_adapter(rt, wire)
    async with rt.sessionmaker.begin() as s:
        payment, _ = await create_payment(s, rt, mtn_payment(demo), actor=ADMIN)
    await worker.run_once()  # the collect's first try: 503
    async with rt.sessionmaker.begin() as s:  # its next try falls after the window: the poll resends it
        await s.execute(update(OutboxJob).where(OutboxJob.kind == "payment.collect").values(
            run_at=utcnow() + timedelta(hours=1)))
    await due_now(rt, "payment.poll")
    await drain(worker)  # the poll: NOT_FOUND, a resend queued; the resend: 503 again
    [_, resend] = await _jobs(rt, "payment.collect")
    assert resend.dedupe_key.startswith(f"collect:{payment.id}:") and len(wire.sent("POST", RTP)) == 2
    # Both retried through the outage until their attempts ran out, and parked.
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(OutboxJob).where(OutboxJob.id == resend.id).values(
            status="PARKED", attempts=8, last_error="ProviderError: mtn_momo HTTP 503"))
        await s.execute(update(OutboxJob).where(OutboxJob.kind == "payment.poll").values(
            status="PARKED", attempts=25, last_error="ProviderError: mtn_momo HTTP 503"))
    [poll] = await _jobs(rt, "payment.poll")

    # MTN is back; the admin replays the parked poll. It finds MTN has never heard of the payment, still inside its
    # window, and sends it again (before: its key was an earlier try's, so nothing was queued and nothing sent).
    wire.on("POST", RTP, 202)
    await admin.json("POST", f"/v1/jobs/{poll.id}/replay", 200)
    await drain(worker)
    assert len(wire.sent("POST", RTP)) == 3
    assert [r.headers["X-Reference-Id"] for r in wire.sent("POST", RTP)] == [payment.provider_reference] * 3
    assert (await _payment(rt, payment.id)).status == "PROCESSING"
    keys = [j.dedupe_key for j in await _jobs(rt, "payment.collect")]
    assert keys == [f"collect:{payment.id}", f"collect:{payment.id}:resent:1", f"collect:{payment.id}:resent:2"]


async def test_two_polls_finding_the_same_state_resend_once(
        rt: Any, demo: dict[str, Any], worker: Any, monkeypatch: Any) -> None:
    """Never doubled: the payment's poll and the one the payment sweep queued beside it, each finding no resend in
    flight (both asked before either queued one), queue one resend between them: the same key."""
    import core.jobs
    from core.outbox import enqueue

    wire = mtn_wire().on("POST", RTP, 503, {"message": "Service unavailable"}).on("GET", RTP + "/*", 404, NOT_FOUND)
    mtn_adapter(rt, wire)
    async with rt.sessionmaker.begin() as s:
        payment, _ = await create_payment(s, rt, mtn_payment(demo), actor=ADMIN)
        await s.execute(update(OutboxJob).where(OutboxJob.kind == "payment.collect").values(
            status="PARKED", attempts=8, last_error="ProviderError: mtn_momo HTTP 503"))
    async with rt.sessionmaker.begin() as s:
        await enqueue(s, "payment.poll", {"payment_id": payment.id}, dedupe_key=f"poll:{payment.id}:sweep:1",
                      cooperative_id=payment.cooperative_id)

    async def none_in_flight(*args: Any, **kwargs: Any) -> bool:
        return False

    monkeypatch.setattr(core.jobs, "_collect_in_flight", none_in_flight)
    await due_now(rt, "payment.poll")
    claimed = await worker.claim(2)
    assert len(claimed) == 2
    for job in claimed:
        await worker.run_job(job)
    [_, resend] = await _jobs(rt, "payment.collect")
    assert resend.status == "PENDING" and resend.dedupe_key.startswith(f"collect:{payment.id}:")


async def _waiting_job(rt: Any, cooperative_id: str, key: str) -> int:
    from core.outbox import enqueue
    async with rt.sessionmaker.begin() as s:
        await enqueue(s, "no.such.kind", {"n": key}, dedupe_key=key, cooperative_id=cooperative_id)
        await s.execute(update(OutboxJob).where(OutboxJob.dedupe_key == key).values(
            attempts=2, last_error="ProviderError: HTTP 503", run_at=utcnow() + timedelta(minutes=30),
            after_failure=True))
        return (await s.execute(select(OutboxJob.id).where(OutboxJob.dedupe_key == key))).scalar_one()


def _meanwhile(monkeypatch: Any, rt: Any, change: Any) -> None:
    """`change` (a session's writes) committed by another transaction after the bulk call listed its jobs, before it
    takes the first one (its first row lock; on SQLite, its first write)."""
    real = core.db.serialise_on_sqlite
    done: list[bool] = []

    async def then_lock(session: Any, model: Any, row_id: Any) -> None:
        if not done:
            done.append(True)
            async with rt.sessionmaker.begin() as other:
                await change(other)
        await real(session, model, row_id)

    monkeypatch.setattr(core.db, "serialise_on_sqlite", then_lock)


async def test_a_bulk_run_now_skips_a_job_parked_since_it_was_listed(
        rt: Any, demo: dict[str, Any], admin: Any, monkeypatch: Any) -> None:
    coop = demo["cooperative_id"]
    first, second = await _waiting_job(rt, coop, "cross-1"), await _waiting_job(rt, coop, "cross-2")

    async def last_attempt_parked_it(s: Any) -> None:  # a worker claimed it and its last attempt failed
        await s.execute(update(OutboxJob).where(OutboxJob.id == second).values(
            status="PARKED", attempts=8, last_error="ProviderError: HTTP 500"))

    _meanwhile(monkeypatch, rt, last_attempt_parked_it)
    ran = await admin.json("POST", "/v1/jobs/replay", 200, json={"waiting": True, "kind": "no.such.kind"})
    assert ran["replayed"] == [first] and ran["replayedCount"] == 1 and ran["skippedCount"] == 1
    [skipped] = ran["skipped"]
    assert skipped["id"] == second and skipped["code"] == "INVALID_STATE"
    assert "no longer matches" in skipped["reason"] and "PARKED" in skipped["reason"]
    async with rt.sessionmaker() as s:
        parked = await s.get(OutboxJob, second)
    # Left PARKED with its attempts used, for a replay an admin chooses: not given a fresh budget by a run-now.
    assert (parked.status, parked.attempts, parked.last_error) == ("PARKED", 8, "ProviderError: HTTP 500")
    assert [entity for entity, _ in await _replayed(rt)] == [str(first)]


async def test_a_bulk_replay_skips_a_parked_job_waiting_again_since_it_was_listed(
        rt: Any, demo: dict[str, Any], admin: Any, monkeypatch: Any) -> None:
    coop = demo["cooperative_id"]
    first, second = await _waiting_job(rt, coop, "cross-3"), await _waiting_job(rt, coop, "cross-4")
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(OutboxJob).where(OutboxJob.id.in_([first, second])).values(
            status="PARKED", attempts=8))
    retry_at = utcnow() + timedelta(minutes=10)

    async def replayed_by_hand_and_failed(s: Any) -> None:  # another admin replayed it; its try failed again
        await s.execute(update(OutboxJob).where(OutboxJob.id == second).values(
            status="PENDING", attempts=1, run_at=retry_at, after_failure=True))

    _meanwhile(monkeypatch, rt, replayed_by_hand_and_failed)
    ran = await admin.json("POST", "/v1/jobs/replay", 200, json={"kind": "no.such.kind"})
    assert ran["replayed"] == [first] and [s["id"] for s in ran["skipped"]] == [second]
    assert "waiting for its retry" in ran["skipped"][0]["reason"]
    async with rt.sessionmaker() as s:
        waiting = await s.get(OutboxJob, second)
    # Its retry left as it was planned, not run now by a replay of the parked jobs.
    assert (waiting.status, waiting.attempts) == ("PENDING", 1)
    assert abs((waiting.run_at - retry_at).total_seconds()) < 1
    assert [entity for entity, _ in await _replayed(rt)] == [str(first)]


async def test_a_bulk_discard_skips_a_job_parked_again_with_another_error(
        rt: Any, demo: dict[str, Any], admin: Any, monkeypatch: Any) -> None:
    coop = demo["cooperative_id"]
    first, second = await _waiting_job(rt, coop, "cross-5"), await _waiting_job(rt, coop, "cross-6")
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(OutboxJob).where(OutboxJob.id.in_([first, second])).values(
            status="PARKED", attempts=8, last_error="ValueError: bad payload"))

    async def parked_again_otherwise(s: Any) -> None:  # replayed, fixed in part, parked with another error
        await s.execute(update(OutboxJob).where(OutboxJob.id == second).values(
            last_error="ProviderError: HTTP 503"))

    _meanwhile(monkeypatch, rt, parked_again_otherwise)
    done = await admin.json("POST", "/v1/jobs/discard", 200,
                            json={"lastErrorPrefix": "ValueError", "reason": "payload no release reads"})
    assert done["discarded"] == [first] and [s["id"] for s in done["skipped"]] == [second]
    async with rt.sessionmaker() as s:
        assert (await s.get(OutboxJob, second)).status == "PARKED"
