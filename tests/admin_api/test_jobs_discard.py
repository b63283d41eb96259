"""POST /v1/jobs/{id}/discard: a parked job that can never succeed (a poison job, whose replay could only park again)
is given up on by an admin, with a reason: DISCARDED, never run again, no longer counted as parked
(gateway_outbox_depth{status="PARKED"}, the ops page), pruned as DONE jobs are. Before, a parked job could only be
replayed, and prune kept it: the PARKED alert stayed up until someone edited the database. What the job is about
is never left looking on its way, and no money is decided by a discard."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select, update

from core.db import iso_z, utcnow
from core.jobs import STUCK_AFTER, sweep_open_payments
from core.models import AuditEvent, OutboxJob, Payment, Refund
from core.ops import dashboard
from core.outbox import enqueue, lock_parked, mark_discarded, replay_job
from core.payments import create_payment
from core.retention import RetentionPolicy, prune
from tests.conftest import behind_a_lock, drain
from tests.providers.wires import ADMIN, completed, due_now, jobs_done, mtn_adapter, mtn_payment, mtn_wire

REASON = "template removed in release 41; the receipt went by hand"


async def _job(rt: Any, key: str, cooperative_id: str | None, status: str = "PARKED", kind: str = "no.such.kind",
               payload: dict[str, Any] | None = None) -> int:
    async with rt.sessionmaker.begin() as s:
        await enqueue(s, kind, payload or {"n": 1}, dedupe_key=key, cooperative_id=cooperative_id)
        values: dict[str, Any] = {"status": status, "attempts": 8, "last_error": "PermanentJobError: unknown SMS "
                                  "template 'receipt_v1'" if status == "PARKED" else None}
        if status == "RUNNING":
            values.update(locked_by="worker-1", run_at=utcnow() + timedelta(seconds=60))
        if status == "DONE":
            values.update(done_at=utcnow())
        await s.execute(update(OutboxJob).where(OutboxJob.dedupe_key == key).values(**values))
        return (await s.execute(select(OutboxJob.id).where(OutboxJob.dedupe_key == key))).scalar_one()


async def _row(rt: Any, job_id: int) -> OutboxJob:
    async with rt.sessionmaker() as s:
        job = await s.get(OutboxJob, job_id)
        assert job is not None
        return job


async def _parked_gauge(client: Any) -> float:
    text = await (await client.get("/metrics")).text()
    return next(s.value for family in text_string_to_metric_families(text) for s in family.samples
                if s.name == "gateway_outbox_depth" and s.labels == {"status": "PARKED"})


async def test_a_parked_job_is_discarded_audited_and_no_longer_counted_as_parked(admin, rt, demo, client):
    job_id = await _job(rt, "poison", demo["cooperative_id"])
    async with rt.sessionmaker() as s:
        assert (await dashboard(s, demo["cooperative_id"]))["outbox"]["parked"] == 1
    assert await _parked_gauge(client) == 1

    await admin.json("POST", f"/v1/jobs/{job_id}/discard", 400, json={})
    await admin.json("POST", f"/v1/jobs/{job_id}/discard", 400, json={"reason": "   \t  "})
    assert (await _row(rt, job_id)).status == "PARKED"

    discarded = await admin.json("POST", f"/v1/jobs/{job_id}/discard", 200, json={"reason": f"  {REASON} "})
    assert (discarded["status"], discarded["doneAt"] is not None) == ("DISCARDED", True)
    assert discarded["lastError"] == (f"discarded by an admin: {REASON}; parked with: PermanentJobError: unknown SMS "
                                      "template 'receipt_v1'")
    row = await _row(rt, job_id)
    assert (row.status, row.locked_by, row.done_at is not None) == ("DISCARDED", None, True)
    async with rt.sessionmaker() as s:
        [audit] = (await s.execute(select(AuditEvent).where(AuditEvent.action == "job.discarded"))).scalars().all()
        ops = (await dashboard(s, demo["cooperative_id"]))["outbox"]
    assert (audit.entity_type, audit.entity_id, audit.cooperative_id, audit.actor.startswith("admin:"),
            audit.channel) == ("outbox_job", str(job_id), demo["cooperative_id"], True, "api")
    assert (audit.before, audit.after) == (
        {"status": "PARKED", "attempts": 8},
        {"status": "DISCARDED", "kind": "no.such.kind", "subject": None, "reason": REASON})
    assert (ops["parked"], ops["byStatus"]) == (0, {})
    assert await _parked_gauge(client) == 0

    # Listed by its status; never replayed (a replay is refused naming it), nor discarded twice.
    assert [j["id"] for j in (await admin.json("GET", "/v1/jobs?status=DISCARDED", 200))["data"]] == [job_id]
    assert (await admin.json("GET", "/v1/jobs?status=PARKED", 200))["data"] == []
    body = await admin.json("POST", f"/v1/jobs/{job_id}/replay", 409)
    assert f"job {job_id} is DISCARDED" in body["message"] and body["code"] == "INVALID_STATE"
    body = await admin.json("POST", f"/v1/jobs/{job_id}/discard", 409, json={"reason": REASON})
    assert f"job {job_id} is DISCARDED" in body["message"]
    assert (await _row(rt, job_id)).status == "DISCARDED"


async def test_only_a_parked_job_is_discarded(admin, rt, demo):
    """A job waiting, running (its worker's lease held) or done is left as it is: 409 naming its status."""
    ids = {status: await _job(rt, f"job-{status}", demo["cooperative_id"], status)
           for status in ("PENDING", "RUNNING", "DONE")}
    for status, job_id in ids.items():
        body = await admin.json("POST", f"/v1/jobs/{job_id}/discard", 409, json={"reason": REASON})
        assert f"job {job_id} is {status}: only a PARKED job can be discarded" == body["message"]
        assert (await _row(rt, job_id)).status == status
    running = await _row(rt, ids["RUNNING"])
    assert (running.locked_by, running.attempts) == ("worker-1", 8)
    async with rt.sessionmaker() as s:
        assert (await s.execute(select(AuditEvent).where(AuditEvent.action == "job.discarded"))).first() is None


async def test_who_may_discard_follows_replay(admin, superadmin, rt, demo, coop_b, tenant):
    """Within the caller's cooperative, as a replay: another cooperative's admin is told the job does not exist
    (404, as for any row of another cooperative), a tenant is refused (403), and a job of no cooperative (the
    system's: a sweep) is the super admin's."""
    job_id = await _job(rt, "theirs", demo["cooperative_id"])
    system = await _job(rt, "system", None)
    await coop_b["admin"].json("POST", f"/v1/jobs/{job_id}/discard", 404, json={"reason": REASON})
    await tenant.json("POST", f"/v1/jobs/{job_id}/discard", 403, json={"reason": REASON})
    await admin.json("POST", f"/v1/jobs/{system}/discard", 404, json={"reason": REASON})
    await admin.json("POST", "/v1/jobs/not-a-number/discard", 404, json={"reason": REASON})
    assert ((await _row(rt, job_id)).status, (await _row(rt, system)).status) == ("PARKED", "PARKED")
    await superadmin.json("POST", f"/v1/jobs/{system}/discard", 200, json={"reason": REASON})
    await superadmin.json("POST", f"/v1/jobs/{job_id}/discard", 200, json={"reason": REASON})
    assert ((await _row(rt, job_id)).status, (await _row(rt, system)).status) == ("DISCARDED", "DISCARDED")


async def test_prune_deletes_a_discarded_job_after_the_done_jobs_retention_not_before(admin, rt, demo):
    job_id = await _job(rt, "poison", demo["cooperative_id"])
    kept = await _job(rt, "still-parked", demo["cooperative_id"])
    await admin.json("POST", f"/v1/jobs/{job_id}/discard", 200, json={"reason": REASON})
    now = utcnow()
    report = await prune(rt.engine, RetentionPolicy(), now=now + timedelta(days=29))
    assert report[0].count == 0 and (await _row(rt, job_id)).status == "DISCARDED"
    report = await prune(rt.engine, RetentionPolicy(), now=now + timedelta(days=31))
    assert report[0].count == 1
    async with rt.sessionmaker() as s:
        assert [j.id for j in (await s.execute(select(OutboxJob))).scalars()] == [kept]  # the parked one stays


async def test_a_discarded_collect_leaves_its_payment_to_its_polls(admin, rt, demo):
    """A payment's collect discarded (or its poll): the payment stays as it is, PENDING, never ended by a discard
    (only the provider's word, or an admin's record of it, ends a payment), and its status is still asked: its
    poll goes on, and once its polls stopped (discarded too) the payment sweep queues a new one. With its
    provider left out of PROVIDERS nothing would ask any more: refused (409), for a record of its outcome."""
    async with rt.sessionmaker.begin() as s:
        payment, _ = await create_payment(s, rt, mtn_payment(demo), actor=ADMIN)
        await s.execute(update(OutboxJob).where(OutboxJob.kind.in_(("payment.collect", "payment.poll"))).values(
            status="PARKED", last_error="ProviderError: mtn_momo request to pay failed (HTTP 500)"))
        jobs = dict((await s.execute(select(OutboxJob.kind, OutboxJob.id))).all())
    for kind in ("payment.collect", "payment.poll"):
        shown = await admin.json("POST", f"/v1/jobs/{jobs[kind]}/discard", 200, json={"reason": REASON})
        assert shown["subject"] == {"type": "payment", "id": payment.id}
    async with rt.sessionmaker() as s:
        row = await s.get(Payment, payment.id)
        assert (row.status, row.failure_reason) == ("PENDING", None)
        listed = await admin.json("GET", f"/v1/jobs?paymentId={payment.id}&status=DISCARDED", 200)
        assert sorted(j["kind"] for j in listed["data"]) == ["payment.collect", "payment.poll"]
    assert await sweep_open_payments(rt, now=row.next_poll_at + STUCK_AFTER + timedelta(minutes=1)) == 1
    async with rt.sessionmaker() as s:
        live = (await s.execute(select(OutboxJob.kind).where(OutboxJob.status == "PENDING"))).scalars().all()
    assert live == ["payment.poll"]


async def test_a_payment_job_nothing_would_replace_is_not_discarded(admin, rt, demo):
    async with rt.sessionmaker.begin() as s:
        payment, _ = await create_payment(s, rt, mtn_payment(demo), actor=ADMIN)
        await s.execute(update(Payment).where(Payment.id == payment.id).values(status="PROCESSING"))
        await s.execute(update(OutboxJob).where(OutboxJob.kind == "payment.poll").values(
            status="PARKED", last_error="payment RW-1: mtn_momo is not in PROVIDERS"))
        poll = (await s.execute(select(OutboxJob.id).where(OutboxJob.kind == "payment.poll"))).scalar_one()
    providers = rt.providers
    rt.providers = {name: p for name, p in providers.items() if name != "mtn_momo"}
    try:
        body = await admin.json("POST", f"/v1/jobs/{poll}/discard", 409, json={"reason": REASON})
    finally:
        rt.providers = providers
    assert f"POST /v1/payments/{payment.id}/outcome" in body["message"] and "PROCESSING" in body["message"]
    assert (await _row(rt, poll)).status == "PARKED"


async def test_a_refund_job_is_not_discarded_while_its_refund_is_open(admin, rt, demo):
    """No sweep asks about refunds: a discarded submission or poll would leave its refund open (its amount held)
    for ever. Refused while it is open, pointing at the routes that settle it; once it has ended, discarded."""
    mtn_adapter(rt, mtn_wire())
    async with rt.sessionmaker.begin() as s:
        payment, _ = await create_payment(s, rt, mtn_payment(demo), actor=ADMIN)
    await completed(rt, payment)
    refund = await admin.json("POST", f"/v1/payments/{payment.id}/refunds", 201,
                              json={"idempotencyKey": "refund-key-0001"})
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(OutboxJob).where(OutboxJob.kind == "refund.submit").values(
            status="PARKED", last_error="provider call sent, may have arrived: HTTP 500"))
        submit = (await s.execute(select(OutboxJob.id).where(OutboxJob.kind == "refund.submit"))).scalar_one()
    body = await admin.json("POST", f"/v1/jobs/{submit}/discard", 409, json={"reason": REASON})
    assert f"refund {refund['id']} is PENDING" in body["message"]
    assert f"/v1/refunds/{refund['id']}/outcome" in body["message"]
    assert (await _row(rt, submit)).status == "PARKED"
    bulk = await admin.json("POST", "/v1/jobs/discard", 200, json={"reason": REASON, "kind": "refund.submit"})
    assert (bulk["discarded"], [s["id"] for s in bulk["skipped"]]) == ([], [submit])
    assert bulk["skipped"][0]["code"] == "INVALID_STATE"

    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Refund).where(Refund.id == refund["id"]).values(status="FAILED"))
    await admin.json("POST", f"/v1/jobs/{submit}/discard", 200, json={"reason": REASON})
    assert (await _row(rt, submit)).status == "DISCARDED"


async def test_a_replay_of_a_job_being_discarded_waits_and_finds_it_discarded(rt, demo):
    """A discard and a replay of one parked job at once (two admins, or a double click on both buttons) take turns:
    the second finds the job no longer PARKED. On SQLite, where FOR UPDATE is nothing, both read PARKED and both
    wrote: the replay said done and put the job back PENDING while the discard's audit said DISCARDED (or the
    discard's later write ended a replayed job a worker had claimed since)."""
    job_id = await _job(rt, "raced", demo["cooperative_id"])

    async def replay() -> OutboxJob | None:
        async with rt.sessionmaker.begin() as s:
            return await replay_job(s, job_id)

    async with rt.sessionmaker.begin() as discarding:
        job = await lock_parked(discarding, job_id)
        assert job is not None
        replaying = asyncio.create_task(replay())
        await behind_a_lock(rt, replaying)  # the replay has reached the row: it waits there, however long this is
        assert not replaying.done()
        mark_discarded(job, REASON)
    assert await replaying is None
    assert (await _row(rt, job_id)).status == "DISCARDED"


async def test_parked_jobs_are_discarded_in_bulk(admin, rt, demo):
    """POST /v1/jobs/discard takes the filters of POST /v1/jobs/replay and a reason, each job discarded as a single
    discard (one job.discarded line each); one not parked is not touched."""
    first = await _job(rt, "poison-1", demo["cooperative_id"])
    second = await _job(rt, "poison-2", demo["cooperative_id"])
    other = await _job(rt, "other-kind", demo["cooperative_id"], kind="no.other.kind")
    waiting = await _job(rt, "waiting", demo["cooperative_id"], "PENDING")
    await admin.json("POST", "/v1/jobs/discard", 400, json={"kind": "no.such.kind"})
    bulk = await admin.json("POST", "/v1/jobs/discard", 200,
                            json={"reason": REASON, "kind": "no.such.kind", "limit": 1})
    assert (bulk["discarded"], bulk["discardedCount"], bulk["more"], bulk["lastId"]) == ([first], 1, True, first)
    bulk = await admin.json("POST", "/v1/jobs/discard", 200,
                            json={"reason": REASON, "lastErrorPrefix": "PermanentJobError", "afterId": first})
    assert (bulk["discarded"], bulk["skipped"], bulk["more"]) == ([second, other], [], False)
    statuses = [(await _row(rt, job_id)).status for job_id in (first, second, other, waiting)]
    assert statuses == ["DISCARDED", "DISCARDED", "DISCARDED", "PENDING"]
    async with rt.sessionmaker() as s:
        audited = (await s.execute(select(AuditEvent.entity_id).where(AuditEvent.action == "job.discarded"))
                   ).scalars().all()
    assert sorted(audited) == sorted(str(i) for i in (first, second, other))


async def test_the_watch_of_a_cancelled_payment_is_not_discarded_while_it_may_still_be_paid(admin, rt, demo):
    """payment.watch is what asks the provider about a payment its cooperative cancelled (the prompt cannot be
    withdrawn: the member may still pay). Discarded, money taken after the cancel was never found: the payment
    stayed CANCELLED for good. Refused (409) while it is CANCELLED, for a replay or the money recorded from the
    statement; once the payment completed late, discarded."""
    async with rt.sessionmaker.begin() as s:
        payment, _ = await create_payment(s, rt, mtn_payment(demo), actor=ADMIN)
    await admin.json("POST", f"/v1/payments/{payment.id}/cancel", 200, json={"note": "asked for by mistake"})
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(OutboxJob).where(OutboxJob.kind == "payment.watch").values(
            status="PARKED", last_error="attempts exhausted: cancelled, still pending at the provider"))
        watch = (await s.execute(select(OutboxJob.id).where(OutboxJob.kind == "payment.watch"))).scalar_one()
    body = await admin.json("POST", f"/v1/jobs/{watch}/discard", 409, json={"reason": REASON})
    assert (body["code"], f"payment {payment.id} is CANCELLED" in body["message"]) == ("INVALID_STATE", True)
    assert "replay this job" in body["message"] and f"POST /v1/payments/{payment.id}/outcome" in body["message"]
    bulk = await admin.json("POST", "/v1/jobs/discard", 200, json={"reason": REASON, "kind": "payment.watch"})
    assert (bulk["discarded"], [j["id"] for j in bulk["skipped"]]) == ([], [watch])
    assert (await _row(rt, watch)).status == "PARKED"

    await admin.json("POST", f"/v1/payments/{payment.id}/outcome", 200,
                     json={"status": "COMPLETED", "providerTransactionId": "MTN-STATEMENT-1",
                           "note": "on the statement after the cancel"})
    await admin.json("POST", f"/v1/jobs/{watch}/discard", 200, json={"reason": REASON})
    assert (await _row(rt, watch)).status == "DISCARDED"


async def test_a_discarded_contested_job_flags_its_payment_as_the_job_would_have(admin, rt, demo):
    """payment.contested flags a payment whose transaction id another cooperative's payment completed with.
    Discarded, the flag was never set: the cooperative counted money that may be the other's with nothing telling
    it to check. The discard flags it (once: a payment flagged already is left as it is)."""
    async with rt.sessionmaker.begin() as s:
        payment, _ = await create_payment(s, rt, mtn_payment(demo), actor=ADMIN)
    await completed(rt, payment)
    async with rt.sessionmaker() as s:
        txn = (await s.get(Payment, payment.id)).provider_transaction_id
    job_id = await _job(rt, "contested", demo["cooperative_id"], kind="payment.contested",
                        payload={"payment_id": payment.id, "provider_transaction_id": txn})
    shown = await admin.json("POST", f"/v1/jobs/{job_id}/discard", 200, json={"reason": REASON})
    assert shown["status"] == "DISCARDED"
    flagged = await admin.json("GET", f"/v1/payments/{payment.id}", 200)
    assert flagged["mismatch"] is True and "recorded by another cooperative's payment too" in flagged["mismatchDetail"]


async def test_the_watch_of_a_cancelled_payment_whose_provider_is_gone_is_discarded_once_nothing_can_be_paid(
        admin, rt, demo, worker):
    """A payment of a provider left out of PROVIDERS for good (its contract ended), cancelled by the support desk:
    its watch parks at once (nothing can ask), and a replay parks it again. Refused for good, it stayed PARKED
    for ever (the PARKED alert up) where the statement showed nothing taken: POST /outcome records only money
    taken. Refused only while a prompt or invoice may still be paid (the window and its grace), saying until when;
    discarded after."""
    async with rt.sessionmaker.begin() as s:
        payment, _ = await create_payment(s, rt, mtn_payment(demo), actor=ADMIN)
        await s.execute(update(Payment).where(Payment.id == payment.id).values(status="PROCESSING"))
    await jobs_done(rt)
    providers = rt.providers
    rt.providers = {name: p for name, p in providers.items() if name != "mtn_momo"}
    try:
        await admin.json("POST", f"/v1/payments/{payment.id}/cancel", 200, json={"note": "MTN contract ended"})
        await due_now(rt, "payment.watch")
        await drain(worker)
        async with rt.sessionmaker() as s:
            watch = (await s.execute(select(OutboxJob).where(OutboxJob.kind == "payment.watch"))).scalar_one()
        assert watch.status == "PARKED" and "mtn_momo" in (watch.last_error or "")
        body = await admin.json("POST", f"/v1/jobs/{watch.id}/discard", 409, json={"reason": REASON})
        until = iso_z(payment.expires_at + timedelta(seconds=rt.settings.payment_settle_grace_seconds))
        assert f"until {until}" in body["message"] and "add it back and replay" in body["message"]

        async with rt.sessionmaker.begin() as s:  # the window and its grace over: nothing can be paid any more
            await s.execute(update(Payment).where(Payment.id == payment.id).values(
                expires_at=utcnow() - timedelta(seconds=rt.settings.payment_settle_grace_seconds + 1)))
        await admin.json("POST", f"/v1/jobs/{watch.id}/replay", 200)
        await due_now(rt, "payment.watch")
        await drain(worker)
        assert (await _row(rt, watch.id)).status == "PARKED"  # replayed, it parks again: nothing can ask
        bulk = await admin.json("POST", "/v1/jobs/discard", 200, json={"reason": REASON, "kind": "payment.watch"})
        assert (bulk["discarded"], bulk["skipped"]) == ([watch.id], [])
    finally:
        rt.providers = providers
    assert (await _row(rt, watch.id)).status == "DISCARDED"
    async with rt.sessionmaker() as s:
        assert (await s.get(Payment, payment.id)).status == "CANCELLED"
