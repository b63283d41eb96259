"""A provider's callback about a refund of ours is stored naming that refund and its payment, with what applying it
did, as a payment's callback is: a refund's callbacks are found from the refund. Before, its row kept refund_id,
payment_id and outcome NULL (nothing led from the refund to it)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from core.models import ProviderEvent, Refund
from core.payments import create_payment
from core.refunds import request_refund
from tests.admin_api.conftest import Caller
from tests.admin_api.test_unmatched_callbacks import LIST, REFUND_STATUS, _mtn_refund_callback
from tests.conftest import drain
from tests.providers.wires import ADMIN, completed, mtn_adapter, mtn_payment, mtn_wire


async def test_a_refunds_callbacks_name_it_and_its_payment(
        rt: Any, client: Any, worker: Any, superadmin: Caller, demo: dict[str, Any]) -> None:
    wire = mtn_wire().on("POST", "/disbursement/v1_0/refund", 202)
    mtn_adapter(rt, wire)
    async with rt.sessionmaker.begin() as s:
        payment, _ = await create_payment(s, rt, mtn_payment(demo), actor=ADMIN)
    await completed(rt, payment)
    async with rt.sessionmaker.begin() as s:
        refund, _ = await request_refund(s, rt, payment_id=payment.id, cooperative_id=demo["cooperative_id"],
                                         amount=None, reason="duplicate payment", idempotency_key="refund-link-1",
                                         actor=ADMIN)
    await drain(worker)  # sent to MTN: PROCESSING
    # MTN's callbacks are unsigned: each is confirmed by the refund's status query. First it is still pending...
    status = {"amount": "50000", "currency": "RWF", "externalId": refund.provider_reference, "status": "PENDING"}
    wire.on("GET", REFUND_STATUS, 200, status)
    assert (await _mtn_refund_callback(client, refund.provider_reference, "PENDING"))["result"] == "pending"
    # ...then paid out.
    wire.on("GET", REFUND_STATUS, 200, {**status, "status": "SUCCESSFUL", "financialTransactionId": "RF-4411"})
    assert (await _mtn_refund_callback(client, refund.provider_reference))["result"] == "completed"
    assert (await _mtn_refund_callback(client, refund.provider_reference))["result"] == "duplicate"

    async with rt.sessionmaker() as s:
        stored = await s.get(Refund, refund.id)
        rows = (await s.execute(select(ProviderEvent).where(ProviderEvent.kind == "refund")
                                .order_by(ProviderEvent.received_at))).scalars().all()
        found = (await s.execute(select(ProviderEvent.id).where(  # what "the refund's callbacks" now reads
            ProviderEvent.payment_id == refund.payment_id, ProviderEvent.refund_id == refund.id))).scalars().all()
    assert (stored.status, stored.provider_transaction_id) == ("COMPLETED", "RF-4411")
    assert [(r.refund_id, r.payment_id, r.outcome, r.status) for r in rows] == [
        (refund.id, payment.id, "pending", "PENDING"), (refund.id, payment.id, "completed", "SUCCEEDED")]
    assert sorted(found) == sorted(r.id for r in rows)
    # Matched: never listed among the callbacks for no refund of ours.
    assert (await superadmin.json("GET", LIST, 200))["data"] == []
