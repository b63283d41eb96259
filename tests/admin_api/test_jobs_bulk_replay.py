"""After a provider outage, the parked jobs of a cooperative are replayed at once (POST /v1/jobs/replay), each as
POST /v1/jobs/{id}/replay would: within the caller's cooperative, audited one by one, a collect whose payment has
ended skipped (with its reason), not put back to send nothing."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select, update

from core.db import utcnow
from core.models import AuditEvent, OutboxJob, Payment
from core.outbox import enqueue
from core.payments import create_payment
from tests.providers.wires import ADMIN, mtn_payment


async def _park(rt, kind: str, key: str, cooperative_id: str, error: str = "ProviderError: HTTP 503") -> int:
    async with rt.sessionmaker.begin() as s:
        await enqueue(s, kind, {"n": key}, dedupe_key=key, cooperative_id=cooperative_id)
        await s.execute(update(OutboxJob).where(OutboxJob.dedupe_key == key).values(
            status="PARKED", attempts=8, last_error=error))
        return (await s.execute(select(OutboxJob.id).where(OutboxJob.dedupe_key == key))).scalar_one()


async def _parked_collect(rt, demo, key: str, *, settled: bool) -> tuple[int, str]:
    async with rt.sessionmaker.begin() as s:
        payment, _ = await create_payment(s, rt, mtn_payment(demo, key=key), actor=ADMIN)
        if settled:
            await s.execute(update(Payment).where(Payment.id == payment.id).values(status="SUCCESS"))
        collect = (await s.execute(select(OutboxJob).where(
            OutboxJob.kind == "payment.collect", OutboxJob.payload["payment_id"].as_string() == payment.id))
        ).scalar_one()
        collect.status, collect.attempts, collect.last_error = "PARKED", 8, "ProviderError: mtn_momo HTTP 500"
        return collect.id, payment.id


async def _statuses(rt) -> dict[int, str]:
    async with rt.sessionmaker() as s:
        return dict((await s.execute(select(OutboxJob.id, OutboxJob.status))).all())


async def _replayed_audit(rt) -> list[tuple[str, str | None, str]]:
    async with rt.sessionmaker() as s:
        rows = (await s.execute(select(AuditEvent).where(AuditEvent.action == "job.replayed")
                                .order_by(AuditEvent.entity_id))).scalars().all()
    return [(a.entity_id, a.cooperative_id, a.actor) for a in rows]


async def test_bulk_replay_puts_back_the_callers_parked_jobs_and_skips_an_ended_collect(admin, rt, demo, coop_b):
    coop_a = demo["cooperative_id"]
    open_collect, open_payment = await _parked_collect(rt, demo, "bulk-open-0001", settled=False)
    settled_collect, settled_payment = await _parked_collect(rt, demo, "bulk-settled-01", settled=True)
    webhook_like = [await _park(rt, "no.such.kind", f"bulk-a-{n}", coop_a) for n in range(3)]
    other_error = await _park(rt, "no.such.kind", "bulk-a-other", coop_a, error="ValueError: bad payload")
    theirs = await _park(rt, "no.such.kind", "bulk-b", coop_b["cooperative_id"])
    before = await _statuses(rt)

    # The collects only: the open one goes back, the settled one is skipped, saying why.
    answer = await admin.json("POST", "/v1/jobs/replay", 200, json={"kind": "payment.collect"})
    assert answer["replayed"] == [open_collect]
    assert [s["id"] for s in answer["skipped"]] == [settled_collect]
    assert settled_payment in answer["skipped"][0]["reason"] and "SUCCESS" in answer["skipped"][0]["reason"]
    assert answer["skipped"][0]["code"] == "INVALID_STATE"  # as a single replay's 409 says it, to branch on
    assert (answer["replayedCount"], answer["skippedCount"], answer["more"]) == (1, 1, False)

    # By the reason they parked, a page at a time: the oldest first, and `more` says the rest are waiting.
    page = await admin.json("POST", "/v1/jobs/replay", 200,
                            json={"lastErrorPrefix": "ProviderError: HTTP", "limit": 2})
    assert (page["replayed"], page["skipped"], page["more"]) == (webhook_like[:2], [], True)
    rest = await admin.json("POST", "/v1/jobs/replay", 200, json={"lastErrorPrefix": "ProviderError: HTTP"})
    assert (rest["replayed"], rest["more"]) == (webhook_like[2:], False)

    after = await _statuses(rt)
    assert {j for j in after if after[j] != before[j]} == {open_collect, *webhook_like}
    assert {after[j] for j in (open_collect, *webhook_like)} == {"PENDING"}
    assert (after[settled_collect], after[other_error], after[theirs]) == ("PARKED", "PARKED", "PARKED")
    async with rt.sessionmaker() as s:
        assert (await s.get(Payment, open_payment)).status == "PENDING"
        assert (await s.get(OutboxJob, open_collect)).attempts == 0
    # One audit entry a job put back, as a single replay writes, in the caller's cooperative; none for the skipped.
    audit = await _replayed_audit(rt)
    assert sorted((int(e), c) for e, c, _ in audit) == sorted((j, coop_a) for j in (open_collect, *webhook_like))
    assert len({a for _, _, a in audit}) == 1 and "admin" in audit[0][2]  # the caller, as a single replay names it


async def test_bulk_replay_never_reaches_another_cooperatives_jobs(admin, rt, demo, coop_b, tenant):
    mine = await _park(rt, "no.such.kind", "bulk-mine", demo["cooperative_id"])
    theirs = await _park(rt, "no.such.kind", "bulk-theirs", coop_b["cooperative_id"])
    other = coop_b["admin"]
    answer = await other.json("POST", "/v1/jobs/replay", 200, json={})
    assert (answer["replayed"], answer["skipped"]) == ([theirs], [])
    assert (await _statuses(rt))[mine] == "PARKED"
    assert [(int(e), c) for e, c, _ in await _replayed_audit(rt)] == [(theirs, coop_b["cooperative_id"])]
    # The single replay's role, and its checks of what is asked.
    await tenant.json("POST", "/v1/jobs/replay", 403, json={})
    await admin.json("POST", "/v1/jobs/replay", 400, json={"limit": 501})
    await admin.json("POST", "/v1/jobs/replay", 400, json={"paymentId": "x", "refundId": "y"})
    await admin.json("POST", "/v1/jobs/replay", 400, json={"status": "DONE"})
    assert (await _statuses(rt))[mine] == "PARKED"


async def test_bulk_replay_by_provider_payment_and_parked_since(admin, rt, demo):
    collect, payment = await _parked_collect(rt, demo, "bulk-by-pay-01", settled=False)
    old = await _park(rt, "no.such.kind", "bulk-old", demo["cooperative_id"])
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(OutboxJob).where(OutboxJob.id == old).values(updated_at=utcnow() - timedelta(days=2)))
    assert (await admin.json("POST", "/v1/jobs/replay", 200, json={"provider": "airtel_money"}))["replayed"] == []
    by_payment = await admin.json("POST", "/v1/jobs/replay", 200, json={"provider": "mtn_momo", "paymentId": payment})
    assert by_payment["replayed"] == [collect]
    since = (utcnow() - timedelta(days=1)).isoformat()
    assert (await admin.json("POST", "/v1/jobs/replay", 200, json={"parkedSince": since}))["replayed"] == []
    assert (await _statuses(rt))[old] == "PARKED"


async def test_jobs_skipped_for_good_do_not_keep_the_next_call_from_the_rest(admin, rt, demo):
    # The oldest parked collect's payment ended: every call skipped it first, and with limit 1 (or a page of
    # them) `more` said "call again" while no call ever reached the jobs behind it.
    settled_collect, _ = await _parked_collect(rt, demo, "bulk-stuck-0001", settled=True)
    later = await _park(rt, "no.such.kind", "bulk-behind", demo["cooperative_id"])
    first = await admin.json("POST", "/v1/jobs/replay", 200, json={"limit": 1})
    assert ([s["id"] for s in first["skipped"]], first["replayed"], first["more"]) == ([settled_collect], [], True)
    second = await admin.json("POST", "/v1/jobs/replay", 200, json={"limit": 1, "afterId": first["lastId"]})
    assert (second["replayed"], second["more"]) == ([later], False)
    assert (await _statuses(rt))[later] == "PENDING"


async def test_an_empty_parked_since_is_refused_not_read_as_no_filter(admin, rt, demo):
    """`parkedSince: ""` (a script's unset variable) is no instant: refused, where it was read as no filter and every
    parked job of the cooperative was put back, the old ones meant to stay parked too."""
    old = await _park(rt, "no.such.kind", "bulk-empty-since", demo["cooperative_id"])
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(OutboxJob).where(OutboxJob.id == old).values(updated_at=utcnow() - timedelta(days=30)))
    for empty in ("", " "):
        refused = await admin.json("POST", "/v1/jobs/replay", 400, json={"parkedSince": empty})
        assert (refused["field"], refused["message"]) == ("parkedSince", ["parkedSince must be a valid date-time"])
    assert (await _statuses(rt))[old] == "PARKED"
    async with rt.sessionmaker() as s:
        assert (await s.execute(select(AuditEvent.id).where(AuditEvent.action == "job.replayed"))).all() == []


async def _waiting(rt, kind: str, key: str, cooperative_id: str, *, attempts: int = 1,
                   in_minutes: float = 29, status: str = "PENDING") -> int:
    async with rt.sessionmaker.begin() as s:
        await enqueue(s, kind, {"n": key}, dedupe_key=key, cooperative_id=cooperative_id)
        await s.execute(update(OutboxJob).where(OutboxJob.dedupe_key == key).values(
            status=status, attempts=attempts, run_at=utcnow() + timedelta(minutes=in_minutes),
            after_failure=attempts > 0,  # as the worker writes a failed attempt's retry
            last_error="SmsAccountError: Africa's Talking refused the credentials (HTTP 401)"))
        return (await s.execute(select(OutboxJob.id).where(OutboxJob.dedupe_key == key))).scalar_one()


async def _due(rt) -> dict[int, bool]:
    async with rt.sessionmaker() as s:
        return {j.id: j.run_at <= utcnow() for j in (await s.execute(select(OutboxJob))).scalars()}


async def test_bulk_replay_of_waiting_jobs_runs_them_now_and_leaves_the_rest(admin, rt, demo, coop_b):
    """After the SMS API key is fixed, `waiting: true` makes the cooperative's jobs waiting for their retry due now,
    each audited as a replay, its attempts kept; parked, never-tried, running and other cooperatives' jobs are not
    touched, and the parked ones are still replayed without it."""
    coop_a = demo["cooperative_id"]
    texts = [await _waiting(rt, "no.such.sms", f"wait-a-{n}", coop_a, attempts=n + 1) for n in range(3)]
    other_kind = await _waiting(rt, "no.such.kind", "wait-a-other", coop_a)
    planned = await _waiting(rt, "no.such.sms", "wait-a-planned", coop_a, attempts=0)
    running = await _waiting(rt, "no.such.sms", "wait-a-running", coop_a, status="RUNNING")
    parked = await _park(rt, "no.such.sms", "wait-a-parked", coop_a)
    theirs = await _waiting(rt, "no.such.sms", "wait-b", coop_b["cooperative_id"])

    page = await admin.json("POST", "/v1/jobs/replay", 200, json={"waiting": True, "kind": "no.such.sms", "limit": 2})
    assert (page["replayed"], page["skipped"], page["more"], page["lastId"]) == (texts[:2], [], True, texts[1])
    rest = await admin.json("POST", "/v1/jobs/replay", 200,
                            json={"waiting": True, "kind": "no.such.sms", "afterId": page["lastId"]})
    assert (rest["replayed"], rest["more"]) == (texts[2:], False)

    due, statuses = await _due(rt), await _statuses(rt)
    assert sorted(j for j in due if due[j] and j != parked) == texts  # (the parked one was due when it parked)
    assert (statuses[parked], statuses[running], statuses[planned]) == ("PARKED", "RUNNING", "PENDING")
    assert not due[other_kind] and not due[theirs]
    async with rt.sessionmaker() as s:
        assert [(await s.get(OutboxJob, j)).attempts for j in texts] == [1, 2, 3]
    assert sorted((int(e), c) for e, c, _ in await _replayed_audit(rt)) == [(j, coop_a) for j in texts]
    # Without `waiting`, a bulk replay is still about the parked jobs only.
    assert (await admin.json("POST", "/v1/jobs/replay", 200, json={"kind": "no.such.sms"}))["replayed"] == [parked]


async def test_waiting_is_refused_with_parked_since_and_by_a_discard(admin, rt, demo, tenant):
    job = await _waiting(rt, "no.such.sms", "wait-refused", demo["cooperative_id"])
    refused = await admin.json("POST", "/v1/jobs/replay", 400,
                               json={"waiting": True, "parkedSince": utcnow().isoformat()})
    assert refused["field"] == "parkedSince"
    await admin.json("POST", "/v1/jobs/discard", 400, json={"waiting": True, "reason": "a job still retried"})
    await admin.json("POST", f"/v1/jobs/{job}/discard", 409, json={"reason": "a job still retried"})
    await tenant.json("POST", "/v1/jobs/replay", 403, json={"waiting": True})
    await admin.json("POST", "/v1/jobs/replay", 400, json={"waiting": "yes"})
    assert not (await _due(rt))[job] and (await _statuses(rt))[job] == "PENDING"
