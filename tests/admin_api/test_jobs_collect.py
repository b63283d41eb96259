"""Replaying a parked payment.collect job over the API after a provider outage (README: parked jobs)."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import select, update

from core.models import AuditEvent, OutboxJob, Payment
from core.outbox import CALL_SENT
from core.payments import create_payment
from tests.conftest import drain
from tests.core.test_outage_recovery import RTP, outage_payment
from tests.providers.wires import ADMIN, Routes, due_now, mtn_adapter, mtn_payment, mtn_wire


async def test_replay_of_collect_whose_window_is_over_is_refused(admin, rt, demo, worker):
    wire, payment, collect = await outage_payment(rt, demo, worker)
    body = await admin.json("POST", f"/v1/jobs/{collect.id}/replay", 409)
    assert "approval window is over" in body["message"] and payment.id in body["message"]
    await drain(worker)
    assert wire.sent("POST", RTP) == []  # no PIN prompt an hour late
    async with rt.sessionmaker() as s:
        assert (await s.get(OutboxJob, collect.id)).status == "PARKED"  # nothing replayed, nothing audited
        assert (await s.execute(select(AuditEvent).where(AuditEvent.action == "job.replayed"))).first() is None


async def test_replay_of_collect_within_its_window_sends_it(admin, rt, demo, worker):
    wire, payment, collect = await outage_payment(rt, demo, worker, window_over=False)
    replayed = await admin.json("POST", f"/v1/jobs/{collect.id}/replay", 200)
    assert (replayed["status"], replayed["subject"]) == ("PENDING", {"type": "payment", "id": payment.id})
    await drain(worker)
    assert len(wire.sent("POST", RTP)) == 1
    async with rt.sessionmaker() as s:
        assert (await s.get(Payment, payment.id)).status == "PROCESSING"


async def test_jobs_view_names_the_payment_not_the_payload(admin, rt, demo, worker):
    _wire, payment, collect = await outage_payment(rt, demo, worker)
    page = await admin.json("GET", "/v1/jobs?kind=payment.collect&status=PARKED", 200)
    [job] = page["data"]
    assert (job["id"], job["subject"]) == (collect.id, {"type": "payment", "id": payment.id})
    assert "payload" not in job
    await due_now(rt, "payment.poll")
    await drain(worker, rounds=2)  # the poll ends the payment and queues the payer's SMS
    polls = await admin.json("GET", "/v1/jobs?kind=payment.poll", 200)
    assert {j["subject"]["id"] for j in polls["data"]} == {payment.id}
    sms = await admin.json("GET", "/v1/jobs?kind=sms.send", 200)
    # The payer's SMS names its payment (its context's payment_id, an opaque id), so a parked receipt is traced to
    # it; nothing else of its payload (an encrypted phone number) is shown.
    assert sms["data"] and all(j["subject"] == {"type": "payment", "id": payment.id} for j in sms["data"])
    assert all("payload" not in j and "phone" not in json.dumps(j) for j in sms["data"])


async def test_replay_of_collect_whose_payment_has_ended_is_refused_not_a_silent_no_op(admin, rt, demo, worker):
    """After the outage the poll ends the payment (FAILED: MTN never got it) while its collect job stays parked.
    Replaying that job would be answered 200 and then send nothing (the collect leaves a payment that is no longer
    PENDING alone): the engineer would believe the payer was prompted. Refused, saying why."""
    wire, payment, collect = await outage_payment(rt, demo, worker)
    await due_now(rt, "payment.poll")
    await drain(worker, rounds=2)
    async with rt.sessionmaker() as s:
        assert (await s.get(Payment, payment.id)).status == "FAILED"
    body = await admin.json("POST", f"/v1/jobs/{collect.id}/replay", 409)
    assert payment.id in body["message"] and "FAILED" in body["message"]
    await drain(worker)
    assert wire.sent("POST", RTP) == []
    async with rt.sessionmaker() as s:
        assert (await s.get(OutboxJob, collect.id)).status == "PARKED"
        assert (await s.execute(select(AuditEvent).where(AuditEvent.action == "job.replayed"))).first() is None


async def _parked_after_a_5xx(rt: Any, demo: dict[str, Any], worker: Any, key: str) -> tuple[Routes, Payment,
                                                                                              OutboxJob]:
    """A payment whose collect job parked after MTN answered its pushes 500 (it may have stored one: the push was
    sent again under the same reference, core.outbox.CALL_SENT), MTN then holding her approval."""
    wire = mtn_wire().on("POST", RTP, 500, {})
    mtn_adapter(rt, wire)
    async with rt.sessionmaker.begin() as s:
        payment, _ = await create_payment(s, rt, mtn_payment(demo, key), actor=ADMIN)
        await s.execute(update(OutboxJob).where(OutboxJob.kind == "payment.collect").values(max_attempts=2))
    for _ in range(2):
        await due_now(rt, "payment.collect")
        await worker.run_once()
    async with rt.sessionmaker() as s:
        collect = (await s.execute(select(OutboxJob).where(
            OutboxJob.kind == "payment.collect", OutboxJob.payload["payment_id"].as_string() == payment.id)
        )).scalar_one()
    assert (collect.status, collect.last_error.startswith(CALL_SENT)) == ("PARKED", True), collect.last_error
    assert len(wire.sent("POST", RTP)) == 2
    wire.on("GET", RTP + "/*", 200, {"status": "SUCCESSFUL", "amount": "50000", "currency": "RWF",
                                     "financialTransactionId": "MTN-TAKEN-9", "externalId": payment.reference})
    return wire, payment, collect


async def test_replayed_collect_after_a_5xx_of_a_member_suspended_since_is_left_to_the_poll(admin, rt, demo, worker):
    """A replay gives the job a fresh attempt budget (attempts 0): its next try is its first by count, though an
    earlier one was answered 5xx and MTN may hold it (the member can still approve the prompt). Her membership
    suspended before the replay ran, it ended the payment CANCELLED "not sent to the provider, nothing was taken"
    while MTN could still take her money. Now nothing is sent again, the payment is left open, and its poll settles
    it from MTN's answer."""
    from core.members import update_member
    from core.models import Member

    wire, payment, collect = await _parked_after_a_5xx(rt, demo, worker, "key-replay-suspended")
    await admin.json("POST", f"/v1/jobs/{collect.id}/replay", 200)
    async with rt.sessionmaker.begin() as s:
        await update_member(s, await s.get(Member, payment.member_id), actor=ADMIN, status="SUSPENDED")
    await worker.run_once()
    assert len(wire.sent("POST", RTP)) == 2  # no third prompt
    async with rt.sessionmaker() as s:
        assert (await s.get(Payment, payment.id)).status == "PENDING"  # not "nothing was taken"
        assert (await s.get(OutboxJob, collect.id)).status == "DONE"
    await due_now(rt, "payment.poll")
    await drain(worker)
    async with rt.sessionmaker() as s:
        assert (await s.get(Payment, payment.id)).status == "COMPLETED"


async def test_replayed_collect_after_a_5xx_whose_provider_was_left_out_is_parked_not_failed(admin, rt, demo, worker):
    """The same, MTN left out of PROVIDERS before the replay ran: it ended the payment FAILED "never sent". Now the
    job parks for a person (its status cannot be asked), still saying an earlier try may have reached MTN."""
    wire, payment, collect = await _parked_after_a_5xx(rt, demo, worker, "key-replay-left-out")
    await admin.json("POST", f"/v1/jobs/{collect.id}/replay", 200)
    rt.providers = {name: p for name, p in rt.providers.items() if name != "mtn_momo"}
    await worker.run_once()
    async with rt.sessionmaker() as s:
        stored, job = await s.get(Payment, payment.id), await s.get(OutboxJob, collect.id)
    assert stored.status == "PENDING"  # not FAILED "never sent"
    assert job.status == "PARKED" and "so its status cannot be asked" in job.last_error, job.last_error
    assert job.last_error.startswith(CALL_SENT), job.last_error
    # Replayed again (attempts back at 0 once more) before MTN is added back: the mark parked with says it still.
    await admin.json("POST", f"/v1/jobs/{collect.id}/replay", 200)
    await worker.run_once()
    async with rt.sessionmaker() as s:
        stored, job = await s.get(Payment, payment.id), await s.get(OutboxJob, collect.id)
    assert (stored.status, job.status) == ("PENDING", "PARKED")
    assert len(wire.sent("POST", RTP)) == 2
