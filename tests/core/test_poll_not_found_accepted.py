"""A status query answering NOT_FOUND for a request the provider accepted is no answer.

MTN took the request-to-pay (202: the payment is PROCESSING, the member's PIN prompt open), then its degraded
status lookup answers 404 for it. That must not end the payment "not approved in time" at the end of the window
(the member told to dial again while her prompt is still open, and charged twice if she does): the payment stays
open as for any unknown outcome (the settling grace), and is given up, if the provider never tells, as
"could not be confirmed", never "not approved". Only a request the provider never accepted ends at once
(FAILED "provider unreachable": tests/core/test_outage_recovery.py).

And while a payment's first collect job is still retrying through an outage inside the window, a status poll
finding nothing queues no second collect job beside it.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update

from channels.sms.templates import CATALOGS, build_message
from core.db import utcnow
from core.jobs import SETTLE_GRACE
from core.models import OutboxJob, Payment
from core.payments import create_payment
from core.provider_events import UNCONFIRMED_FLAG
from core.state.payment import UNCONFIRMED
from tests.conftest import drain
from tests.core.test_poll_unsettled import _payment, _processing, _window_over
from tests.providers.wires import ADMIN, due_now, mtn_adapter, mtn_payment, mtn_wire

RTP = "/collection/v1_0/requesttopay"
NOT_FOUND = {"code": "RESOURCE_NOT_FOUND", "message": "Requested resource was not found."}
SUCCESSFUL = {"amount": "50000", "currency": "RWF", "financialTransactionId": "FT-404",
              "payer": {"partyIdType": "MSISDN", "partyId": "250788000001"}, "status": "SUCCESSFUL"}


async def _jobs(rt: Any, kind: str) -> list[OutboxJob]:
    async with rt.sessionmaker() as s:
        return list((await s.execute(select(OutboxJob).where(OutboxJob.kind == kind)
                                     .order_by(OutboxJob.created_at))).scalars())


async def _sms_templates(rt: Any, payment_id: str) -> list[str]:
    return [j.payload["template"] for j in await _jobs(rt, "sms.send")
            if (j.payload.get("context") or {}).get("payment_id") == payment_id]


async def _accepted_then_not_found(rt: Any, demo: dict[str, Any], worker: Any) -> tuple[Any, Payment]:
    """An MTN payment MTN accepted (202, PROCESSING); its status lookup then answers 404 for it."""
    wire, stored = await _processing(rt, demo, worker)
    wire.on("GET", RTP + "/*", 404, NOT_FOUND)
    return wire, stored


async def test_not_found_for_an_accepted_request_at_the_window_keeps_it_open(rt, demo, worker, client):
    wire, payment = await _accepted_then_not_found(rt, demo, worker)
    await _window_over(rt, payment.id)
    asked = utcnow()  # before the poll runs: a loaded machine can take seconds over it and the checks below
    await drain(worker)
    # Not ended at the window: no "not approved in time, dial again" while her prompt is open.
    held = await _payment(rt, payment.id)
    assert (held.status, held.failure_reason) == ("PROCESSING", None)
    assert await _sms_templates(rt, payment.id) == []
    [poll] = await _jobs(rt, "payment.poll")
    assert poll.status == "PENDING" and "outcome unknown after the approval window" in poll.last_error
    assert "no record of the request it accepted" in poll.last_error
    assert asked + timedelta(seconds=50) < poll.run_at <= utcnow() + timedelta(seconds=60)  # the grace's cadence
    # She approves; MTN's lookup is back and its one callback arrives: completed on time, one receipt.
    ref = payment.provider_reference
    wire.on("GET", RTP + "/*", 200, {**SUCCESSFUL, "externalId": ref})
    resp = await client.put(f"/webhooks/payments/mtn_momo?ref={ref}", json={**SUCCESSFUL, "externalId": ref})
    assert resp.status == 200
    await drain(worker)
    done = await _payment(rt, payment.id)
    assert (done.status, done.late, done.failure_reason, done.provider_transaction_id) == (
        "COMPLETED", False, None, "FT-404")
    assert await _sms_templates(rt, payment.id) == ["payment_receipt"]
    assert len(wire.sent("POST", RTP)) == 1  # never sent again


async def test_not_found_inside_the_window_sends_no_collect_again_for_an_accepted_request(rt, demo, worker):
    wire, payment = await _accepted_then_not_found(rt, demo, worker)
    await due_now(rt, "payment.poll")
    await drain(worker)
    assert (await _payment(rt, payment.id)).status == "PROCESSING"
    assert [j.dedupe_key for j in await _jobs(rt, "payment.collect")] == [f"collect:{payment.id}"]
    assert len(wire.sent("POST", RTP)) == 1


@pytest.mark.parametrize("language", ["en", "fr", "rw", "sw"])
async def test_still_not_found_after_the_grace_ends_unconfirmed_not_unapproved(rt, demo, worker, language):
    wire, payment = await _accepted_then_not_found(rt, demo, worker)
    await _window_over(rt, payment.id, SETTLE_GRACE - timedelta(minutes=5))
    await drain(worker)
    assert (await _payment(rt, payment.id)).status == "PROCESSING"  # 23 h 55 min over: still asked
    await _window_over(rt, payment.id, SETTLE_GRACE)
    await drain(worker, rounds=2)  # the poll (its SMS not sent yet)
    gone = await _payment(rt, payment.id)
    assert (gone.status, gone.failure_reason, gone.mismatch_detail) == ("TIMEOUT", UNCONFIRMED, UNCONFIRMED_FLAG)
    [sms] = [j for j in await _jobs(rt, "sms.send")
             if (j.payload.get("context") or {}).get("payment_id") == payment.id]
    assert sms.payload["template"] == "payment_unconfirmed"
    payload = {**sms.payload, "context": {**(sms.payload.get("context") or {}), "language": language}}
    async with rt.sessionmaker() as s:
        _phone, lang, body = await build_message(s, rt.cipher, payload)
    catalog = CATALOGS[language]
    assert lang == language
    assert body.startswith(catalog.MESSAGES["payment_unconfirmed"].split("{")[0])
    assert catalog.REASONS["not_approved"] not in body and catalog.PAYMENT_STATUS["TIMEOUT"] not in body
    assert len(wire.sent("POST", RTP)) == 1


async def test_a_request_accepted_after_the_poll_asked_is_asked_again_not_ended(rt, demo, worker):
    """The collect sent its request just inside the window and MTN answered it late: the poll's status query,
    after the window, found nothing yet (404), and the 202 moved the payment to PROCESSING before the poll
    wrote. The payer was prompted just now: the payment is asked about again, not ended "not approved"."""
    wire = mtn_wire().on("POST", RTP, 503, {"message": "Service unavailable"})
    mtn_adapter(rt, wire)
    async with rt.sessionmaker.begin() as s:
        payment, _ = await create_payment(s, rt, mtn_payment(demo), actor=ADMIN)
        await s.execute(update(OutboxJob).where(OutboxJob.kind == "payment.collect").values(status="DONE"))
    await _window_over(rt, payment.id)

    async def not_found_yet(_request: httpx.Request) -> httpx.Response:
        async with rt.sessionmaker.begin() as s:  # the collect's 202, recorded while MTN answers the poll
            await s.execute(update(Payment).where(Payment.id == payment.id).values(status="PROCESSING"))
        return httpx.Response(404, json=NOT_FOUND)

    wire.on("GET", RTP + "/*", not_found_yet)
    asked = utcnow()  # before the poll runs: a loaded CI machine can take seconds over the checks below
    await drain(worker, rounds=2)
    held = await _payment(rt, payment.id)
    assert (held.status, held.failure_reason) == ("PROCESSING", None)
    assert await _sms_templates(rt, payment.id) == []
    [poll] = await _jobs(rt, "payment.poll")
    assert poll.status == "PENDING" and "accepted after the status query" in poll.last_error
    assert held.next_poll_at is not None and held.next_poll_at > asked + timedelta(seconds=10)
    # MTN now has it, the payer still deciding: its prompt's grace, then her approval completes it on time.
    wire.on("GET", RTP + "/*", 200, {**SUCCESSFUL, "externalId": payment.provider_reference, "status": "PENDING"})
    await due_now(rt, "payment.poll")
    await drain(worker, rounds=2)
    assert (await _payment(rt, payment.id)).status == "PROCESSING"
    wire.on("GET", RTP + "/*", 200, {**SUCCESSFUL, "externalId": payment.provider_reference})
    await due_now(rt, "payment.poll")
    await drain(worker)
    done = await _payment(rt, payment.id)
    assert (done.status, done.late) == ("COMPLETED", False)
    assert await _sms_templates(rt, payment.id) == ["payment_receipt"]


# --- One collect job at a time through an outage of request-to-pay -------------------------------------------


async def _collect_failing(rt: Any, demo: dict[str, Any], worker: Any) -> tuple[Any, Payment]:
    """MTN's request-to-pay answers 503 (its status lookup works, and has no such request): the payment's first
    collect job failed once and waits for its retry."""
    wire = (mtn_wire().on("POST", RTP, 503, {"message": "Service unavailable"})
            .on("GET", RTP + "/*", 404, NOT_FOUND))
    mtn_adapter(rt, wire)
    async with rt.sessionmaker.begin() as s:
        payment, _ = await create_payment(s, rt, mtn_payment(demo), actor=ADMIN)
    await worker.run_once()  # the collect job's first try
    [collect] = await _jobs(rt, "payment.collect")
    assert (collect.status, collect.attempts) == ("PENDING", 1)
    return wire, payment


async def test_a_poll_queues_no_second_collect_while_the_first_retries_inside_the_window(rt, demo, worker):
    wire, payment = await _collect_failing(rt, demo, worker)
    async with rt.sessionmaker.begin() as s:  # its retry is a while off, still inside the window
        await s.execute(update(OutboxJob).where(OutboxJob.kind == "payment.collect").values(
            run_at=utcnow() + timedelta(seconds=90)))
    await due_now(rt, "payment.poll")
    await drain(worker)
    assert [j.dedupe_key for j in await _jobs(rt, "payment.collect")] == [f"collect:{payment.id}"]
    assert len(wire.sent("POST", RTP)) == 1
    # MTN is back: the first collect job sends it (under the same reference) and the payment goes on.
    wire.on("POST", RTP, 202)
    await due_now(rt, "payment.collect")
    await drain(worker)
    assert (await _payment(rt, payment.id)).status == "PROCESSING"
    assert [r.headers["X-Reference-Id"] for r in wire.sent("POST", RTP)] == [payment.provider_reference] * 2


async def test_a_poll_sends_it_again_when_the_first_collects_retry_falls_after_the_window(rt, demo, worker):
    """The first collect job's next try would be past the window (it would send nothing then): the resend is
    the payment's only chance to reach MTN in time, so it is still queued."""
    wire, payment = await _collect_failing(rt, demo, worker)
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(OutboxJob).where(OutboxJob.kind == "payment.collect").values(
            run_at=utcnow() + timedelta(hours=1)))
    wire.on("POST", RTP, 202)
    await due_now(rt, "payment.poll")
    await drain(worker)
    keys = sorted(j.dedupe_key for j in await _jobs(rt, "payment.collect"))
    assert keys[0] == f"collect:{payment.id}" and len(keys) == 2 and keys[1].startswith(f"collect:{payment.id}:")
    assert (await _payment(rt, payment.id)).status == "PROCESSING"
    assert len(wire.sent("POST", RTP)) == 2
