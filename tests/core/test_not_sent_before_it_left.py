"""An adapter's exception while it makes its request, before that request left, is a request never sent: the job's
attempt fails as a retryable NOT_SENT (counted in gateway_provider_errors_total under the job's operation), and its
next attempt sends it. Before, any exception after the job stamped its call (core.outbox.call_starting) was taken
for one that may have arrived: the collection was only asked about (never sent: the payer never prompted), and an
Airtel refund, which is never sent twice blind, was left to a person. A failure once the request was handed to the
transport is still in doubt: asked about, never sent again."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from sqlalchemy import select

import providers.airtel.adapter as airtel_adapter
import providers.mtn_momo.adapter as mtn_module
from core.metrics import REGISTRY
from core.models import OutboxJob, Payment
from core.outbox import CALL_SENT, INTERRUPTED
from core.payments import create_payment
from tests.conftest import drain
from tests.providers.test_refund_ambiguous import AIRTEL_REFUND, _ask_refund, _rows, airtel_collected
from tests.providers.wires import ADMIN, due_now, mtn_adapter, mtn_payment, mtn_wire

REQUEST_TO_PAY = "/collection/v1_0/requesttopay"
AIRTEL_REFUNDED = {"data": {"transaction": {"airtel_money_id": "RF-1", "status": "SUCCESS"}},
                   "status": {"code": "200", "message": "SUCCESS", "result_code": "ESB000010", "success": True}}


def _errors(provider: str, operation: str) -> float:
    return REGISTRY.get_sample_value("gateway_provider_errors_total",
                                     {"provider": provider, "operation": operation}) or 0.0


async def _job(rt: Any, kind: str) -> OutboxJob:
    async with rt.sessionmaker() as s:
        return (await s.execute(select(OutboxJob).where(OutboxJob.kind == kind))).scalar_one()


async def _mtn_payment(rt: Any, demo: dict[str, Any], key: str) -> tuple[Any, Payment]:
    wire = mtn_wire()  # answers the tokens only: any other request fails the test until a route is declared
    mtn_adapter(rt, wire)
    async with rt.sessionmaker.begin() as s:
        payment, _ = await create_payment(s, rt, mtn_payment(demo, key), actor=ADMIN)
    return wire, payment


def _fails_once(real: Any, fault: Exception) -> Any:
    faults = [fault]

    def once(*args: Any, **kwargs: Any) -> Any:
        if faults:
            raise faults.pop()
        return real(*args, **kwargs)

    return once


def _never_sent(job: OutboxJob) -> None:
    """The attempt failed as one that sent nothing, and is due again to send."""
    assert (job.status, job.attempts) == ("PENDING", 1)
    assert job.last_error and not job.last_error.startswith((INTERRUPTED, CALL_SENT)), job.last_error
    assert "the request could not be made" in job.last_error and "nothing was sent" in job.last_error


async def test_a_collection_whose_adapter_failed_making_its_request_is_sent_on_its_next_attempt(
        rt: Any, demo: dict[str, Any], worker: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    wire, payment = await _mtn_payment(rt, demo, "key-not-made-1")
    wire.on("POST", REQUEST_TO_PAY, 202)
    # The adapter fails while it makes its request to pay (its payer message), before anything is sent.
    monkeypatch.setattr(mtn_module, "_note", _fails_once(mtn_module._note, ValueError("note not representable")))
    errors = _errors("mtn_momo", "collect")
    await worker.run_once()
    assert wire.sent("POST", REQUEST_TO_PAY) == []
    _never_sent(await _job(rt, "payment.collect"))
    assert "mtn_momo collect" in (await _job(rt, "payment.collect")).last_error
    assert _errors("mtn_momo", "collect") == errors + 1
    await due_now(rt, "payment.collect")
    await drain(worker)
    assert len(wire.sent("POST", REQUEST_TO_PAY)) == 1  # sent on the next attempt, once
    async with rt.sessionmaker() as s:
        assert (await s.get(Payment, payment.id)).status == "PROCESSING"
    assert (await _job(rt, "payment.collect")).status == "DONE"


@pytest.mark.parametrize("fault", [RuntimeError("transport failed after writing the request"),
                                   httpx.RemoteProtocolError("server disconnected without a response")])
async def test_a_collection_that_failed_once_handed_over_is_never_sent_again(
        rt: Any, demo: dict[str, Any], worker: Any, fault: Exception) -> None:
    """The request reached the transport, then failed (a reset connection, or the transport's own exception): the
    provider may have it. Not NOT_SENT: the next attempt asks (or the status poll settles it), never a second one."""
    wire, payment = await _mtn_payment(rt, demo, "key-not-made-2")

    def fails(_request: httpx.Request) -> httpx.Response:
        raise fault

    wire.on("POST", REQUEST_TO_PAY, fails)
    await worker.run_once()
    collect = await _job(rt, "payment.collect")
    assert "could not be made" not in (collect.last_error or "")
    if collect.status == "PENDING":  # the transport's own exception: the job was cut off after its call
        assert collect.last_error.startswith(INTERRUPTED), collect.last_error
        await due_now(rt, "payment.collect")
        await worker.run_once()
    assert (await _job(rt, "payment.collect")).status == "DONE"
    assert len(wire.sent("POST", REQUEST_TO_PAY)) == 1
    async with rt.sessionmaker() as s:
        assert (await s.get(Payment, payment.id)).status == "PENDING"  # left to the status poll


async def test_an_airtel_refund_whose_adapter_failed_before_sending_is_sent_not_left_to_a_person(
        rt: Any, demo: dict[str, Any], worker: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Airtel's refund names only the payment: one that may have arrived is never sent again (a person settles it).
    One the adapter failed to make never left: sent on the next attempt."""
    wire, payment = await airtel_collected(rt, demo, "key-airtel-not-made")
    wire.on("POST", AIRTEL_REFUND, 200, AIRTEL_REFUNDED)
    adapter = rt.providers["airtel"]
    real_call = adapter._call
    faults = [LookupError("no X-Currency header for the refund")]

    async def call(operation: str, *args: Any, **kwargs: Any) -> Any:
        if operation == "refund" and faults:
            raise faults.pop()  # in the adapter, before its request is sent
        return await real_call(operation, *args, **kwargs)

    monkeypatch.setattr(adapter, "_call", call)
    refund = await _ask_refund(rt, demo, payment, key="refund-not-made-1")
    errors = _errors("airtel", "refund")
    await worker.run_once()
    assert wire.sent("POST", AIRTEL_REFUND) == []
    _, _, jobs = await _rows(rt, refund.id, payment.id)
    [submit] = [j for j in jobs if j.kind == "refund.submit"]
    _never_sent(submit)
    assert _errors("airtel", "refund") == errors + 1
    await due_now(rt, "refund.submit")
    await drain(worker)
    assert len(wire.sent("POST", AIRTEL_REFUND)) == 1
    stored, _, _ = await _rows(rt, refund.id, payment.id)
    assert stored.status == "COMPLETED"


async def test_an_airtel_refund_whose_adapter_failed_on_the_answer_is_never_sent_again(
        rt: Any, demo: dict[str, Any], worker: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The refund left and was answered; the adapter failed reading the answer: it may have been carried out. In
    doubt (INTERRUPTED), never sent again."""
    wire, payment = await airtel_collected(rt, demo, "key-airtel-answer-fails")
    wire.on("POST", AIRTEL_REFUND, 200, AIRTEL_REFUNDED)
    monkeypatch.setattr(airtel_adapter, "_status_block",
                        _fails_once(airtel_adapter._status_block, KeyError("status")))
    refund = await _ask_refund(rt, demo, payment, key="refund-answer-fails-1")
    await worker.run_once()
    _, _, jobs = await _rows(rt, refund.id, payment.id)
    [submit] = [j for j in jobs if j.kind == "refund.submit"]
    assert submit.status == "PENDING" and submit.last_error.startswith(INTERRUPTED), submit.last_error
    await due_now(rt, "refund.submit")
    await drain(worker)
    assert len(wire.sent("POST", AIRTEL_REFUND)) == 1
    stored, _, _ = await _rows(rt, refund.id, payment.id)
    assert stored.status == "PROCESSING"  # its outcome waited for, not a second refund
