"""Replaying a parked payment.collect job over the API after a provider outage (README: parked jobs)."""

from __future__ import annotations

import json

from sqlalchemy import select

from core.models import AuditEvent, OutboxJob, Payment
from tests.conftest import drain
from tests.core.test_outage_recovery import RTP, outage_payment
from tests.providers.wires import due_now


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
