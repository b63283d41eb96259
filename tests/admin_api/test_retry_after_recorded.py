"""After a restore: the lost payment recorded from the statement with its request (`gatewayReference`), then the
cooperative's system sending its POST /v1/payments again (same key and body: the same derived request id, which the
recorded payment now holds) is a 409 naming that payment, never a 500 nor a second collection; and a completion
whose transaction id another payment holds counts once in the reconciliation and texts no second receipt."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import func, select

from core.audit import Actor
from core.db import utcnow
from core.models import OutboxJob, Payment
from core.ports import ProviderOutcome
from core.provider_events import apply_collection_outcome
from providers.mtn_momo.simulator import TRANSACTIONS
from providers.simulation import STATE
from tests.admin_api.conftest import Caller, idem, make_payment, payment_body
from tests.admin_api.test_chargeback_visibility import _z
from tests.admin_api.test_retried_key_after_restore import _lose, mtn_simulator
from tests.conftest import drain

PROVIDER = Actor("provider:test", "provider")


async def test_the_retry_of_a_payment_recorded_with_its_request_is_refused_naming_it(
        admin: Caller, rt: Any, demo: dict[str, Any], worker: Any, aiohttp_server: Any) -> None:
    async with mtn_simulator(rt, aiohttp_server) as app:
        body = payment_body(demo["payment_types"]["Monthly Rent"])
        first = await admin.json("POST", "/v1/payments", 201, json=body)
        await drain(worker)
        await app[STATE].idle()
        [taken] = app[TRANSACTIONS].values()
        await _lose(rt, first["id"])
        recorded = await admin.json("POST", "/v1/payments/recorded", 201, json={
            "paymentTypeId": body["paymentTypeId"], "amount": 50000, "paymentMethod": "MOBILE_MONEY_MTN",
            "paymentAccount": body["paymentAccount"], "providerTransactionId": taken["financialTransactionId"],
            "gatewayReference": first["gatewayReference"],
            "completedAt": _z(utcnow().replace(microsecond=0) - timedelta(minutes=5)),
            "note": "MTN statement of the restore's gap", "idempotencyKey": idem()})
        assert recorded["gatewayReference"] == first["gatewayReference"]
        refused = await admin.json("POST", "/v1/payments", 409, json=body)
        assert refused["message"] == (f"this request's money is recorded already as payment {recorded['reference']} "
                                      "(recorded from the provider's statement after a restore): it is not "
                                      "collected again")
        assert refused["code"] == "PAYMENT_ALREADY_RECORDED"
        await drain(worker)
    assert len(app[TRANSACTIONS]) == 1  # never sent again
    async with rt.sessionmaker() as s:
        assert (await s.execute(select(func.count(Payment.id)))).scalar_one() == 1


async def _completed_holding(admin: Caller, rt: Any, demo: dict[str, Any], txn: str) -> dict[str, Any]:
    payment = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    async with rt.sessionmaker.begin() as s:
        await apply_collection_outcome(s, rt, await s.get(Payment, payment["id"]), ProviderOutcome.SUCCEEDED,
                                       actor=PROVIDER, provider_transaction_id=txn)
    return payment


async def test_one_statement_line_on_two_payments_is_counted_once_and_receipted_once(
        admin: Caller, rt: Any, demo: dict[str, Any]) -> None:
    holder = await _completed_holding(admin, rt, demo, "MTN-ONE-LINE")
    twice = await _completed_holding(admin, rt, demo, "MTN-ONE-LINE")
    row = await admin.json("GET", f"/v1/payments/{twice['id']}", 200)
    assert (row["status"], row["mismatch"], row["collectedAmount"]) == ("COMPLETED", True, 0)
    report = await admin.json("GET", "/v1/reports/reconciliation", 200)
    [line] = [line for line in report["settled"] if line["provider"] == "mtn_momo"]
    assert (line["collectedCount"], line["collected"]) == (1, 50000), line
    [total] = [t for t in report["totals"] if t["currency"] == "RWF"]
    assert (total["collectedCount"], total["collected"]) == (1, 50000), total
    async with rt.sessionmaker() as s:
        receipts = (await s.execute(select(OutboxJob.dedupe_key).where(
            OutboxJob.kind == "sms.send", OutboxJob.dedupe_key.like("sms:payment_receipt:%")))).scalars().all()
        events = (await s.execute(select(OutboxJob.payload).where(OutboxJob.kind == "webhook.event"))).scalars().all()
    assert sorted(receipts) == [f"sms:payment_receipt:{holder['id']}"]  # her receipt once, for the money once
    told = [e for e in events if e.get("event_type") == "payment.completed"
            and (e.get("data") or {}).get("id") == twice["id"]]
    assert told and told[0]["data"]["mismatch"] is True  # the cooperative's system is told, flagged
