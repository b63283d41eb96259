"""What a provider says when it refuses or fails a call reaches people other than the logs: a payment's
failureReason (the API, exports, webhooks) and a job's lastError (GET /v1/jobs, read by the on-call engineer).
MTN MoMo and Airtel Money name the payer's number in some of their messages ("Account holder with FRI ...");
it is masked there as M-Pesa's and IremboPay's words are, and as every log line is."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update

from core.models import OutboxJob, Payment
from core.payments import create_payment
from tests.conftest import drain
from tests.providers.test_refund_ambiguous import AIRTEL_BASE
from tests.providers.wires import ADMIN, NewPayment, Routes, due_now, mtn_adapter, mtn_payment, mtn_wire

RTP = "/collection/v1_0/requesttopay"
NUMBER = "250788000001"


async def _payment(rt: Any, demo: dict[str, Any], new: NewPayment) -> Payment:
    async with rt.sessionmaker.begin() as s:
        payment, _ = await create_payment(s, rt, new, actor=ADMIN)
    return payment


async def _failure_reason(rt: Any, payment: Payment) -> str:
    async with rt.sessionmaker() as s:
        stored = await s.get(Payment, payment.id)
    assert stored.status == "FAILED"
    return stored.failure_reason


async def test_mtn_refusal_naming_the_payer_is_masked_on_the_payment(rt, demo, worker):
    mtn_adapter(rt, mtn_wire().on("POST", RTP, 400, {
        "code": "PAYER_NOT_FOUND", "message": f"Account holder with FRI:{NUMBER}/MSISDN not found"}))
    payment = await _payment(rt, demo, mtn_payment(demo))
    await drain(worker)
    reason = await _failure_reason(rt, payment)
    assert NUMBER not in reason and "FRI:25078****001/MSISDN" in reason


async def test_mtn_failure_naming_the_payer_is_masked_on_the_parked_job(rt, demo, worker):
    mtn_adapter(rt, mtn_wire().on("POST", RTP, 500, {"message": f"timeout reaching party {NUMBER}"}))
    await _payment(rt, demo, mtn_payment(demo))
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(OutboxJob).where(OutboxJob.kind == "payment.collect").values(max_attempts=1))
    await due_now(rt, "payment.collect")
    await drain(worker)
    async with rt.sessionmaker() as s:
        collect = (await s.execute(select(OutboxJob).where(OutboxJob.kind == "payment.collect"))).scalar_one()
    assert collect.status == "PARKED"
    assert NUMBER not in collect.last_error and "party 25078****001" in collect.last_error


async def test_airtel_refusal_naming_the_payer_is_masked_on_the_payment(rt, demo, worker):
    from providers.airtel.adapter import AirtelAdapter
    from tests.providers import test_airtel

    wire = (Routes(AIRTEL_BASE).on("POST", "/auth/oauth2/token", 200, {"access_token": "t", "expires_in": "180"})
            .on("POST", "/merchant/v1/payments/", 200, {"status": {
                "code": "200", "message": "Subscriber 733000001 is barred", "result_code": "ESB000010",
                "success": False}}))
    rt.providers = {**rt.providers, "airtel": AirtelAdapter(wire.client(), test_airtel.config(AIRTEL_BASE))}
    payment = await _payment(rt, demo, NewPayment(
        cooperative_id=demo["cooperative_id"], payment_type_id=demo["payment_types"]["Monthly Rent"],
        method="MOBILE_MONEY_AIRTEL", account="0733000001", idempotency_key="key-airtel-words", channel="api"))
    await drain(worker)
    reason = await _failure_reason(rt, payment)
    assert "733000001" not in reason and "Subscriber 73300*001 is barred" in reason


async def test_a_failed_status_naming_the_payer_is_masked_in_its_reason():
    """The words of a FAILED status (MTN's reason message, Airtel's transaction message) are the payment's
    failureReason when the poll or a callback ends it."""
    from providers.airtel.adapter import AirtelAdapter
    from tests.providers import test_airtel

    mtn = mtn_adapter(_Holder(), mtn_wire().on("GET", RTP + "/*", 200, {
        "status": "FAILED", "amount": "50000", "currency": "RWF", "externalId": "x",
        "reason": {"code": "SOMETHING_NEW", "message": f"Payer {NUMBER} could not be debited"}}))
    result = await mtn.collection_status("ref-1", None, "RWF")
    assert result.reason == "Payer 25078****001 could not be debited"

    wire = (Routes(AIRTEL_BASE).on("POST", "/auth/oauth2/token", 200, {"access_token": "t", "expires_in": "180"})
            .on("GET", "/standard/v1/payments/*", 200, {
                "data": {"transaction": {"id": "ref-1", "status": "TF", "message": "Subscriber 733000001 barred"}},
                "status": {"code": "200", "success": True, "result_code": "ESB000010", "message": "SUCCESS"}}))
    airtel = AirtelAdapter(wire.client(), test_airtel.config(AIRTEL_BASE))
    result = await airtel.collection_status("ref-1", None, "RWF")
    assert result.reason == "Subscriber 73300*001 barred"


class _Holder:
    providers: dict[str, Any] = {}
