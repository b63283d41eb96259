"""GET /v1/payments/{id}/callbacks and GET /v1/refunds/{id}/callbacks: what the providers said about a payment and
its refunds, and what the gateway did with each callback, for the support desk; no body (it holds the payer's full
number); another cooperative's is 404."""

from __future__ import annotations

from typing import Any

from core.payments import create_payment
from core.refunds import request_refund
from tests.admin_api.conftest import Caller
from tests.admin_api.test_unmatched_callbacks import REFUND_STATUS, _mtn_callback, _mtn_refund_callback
from tests.conftest import drain
from tests.providers.wires import ADMIN, completed, mtn_adapter, mtn_payment, mtn_wire


async def _refunded(rt: Any, client: Any, worker: Any, demo: dict[str, Any]) -> tuple[Any, Any]:
    """An MTN payment completed by a callback (then that callback again, and a stale PENDING one), and a refund of
    it paid out as MTN's refund callbacks say (PENDING, then SUCCESSFUL)."""
    wire = mtn_wire().on("POST", "/disbursement/v1_0/refund", 202)
    mtn_adapter(rt, wire)
    async with rt.sessionmaker.begin() as s:
        payment, _ = await create_payment(s, rt, mtn_payment(demo), actor=ADMIN)
    await completed(rt, payment, "MTN-CB-1")
    async with rt.sessionmaker.begin() as s:
        refund, _ = await request_refund(s, rt, payment_id=payment.id, cooperative_id=demo["cooperative_id"],
                                         amount=None, reason="charged twice", idempotency_key="cb-list-1",
                                         actor=ADMIN)
    await drain(worker)
    status = {"amount": "50000", "currency": "RWF", "externalId": refund.provider_reference, "status": "PENDING"}
    wire.on("GET", REFUND_STATUS, 200, status)
    assert (await _mtn_refund_callback(client, refund.provider_reference, "PENDING"))["result"] == "pending"
    wire.on("GET", REFUND_STATUS, 200, {**status, "status": "SUCCESSFUL", "financialTransactionId": "RF-CB-1"})
    assert (await _mtn_refund_callback(client, refund.provider_reference))["result"] == "completed"
    return payment, refund


async def test_a_payments_callbacks_and_its_refunds_are_listed_newest_first(
        rt: Any, client: Any, worker: Any, admin: Caller, demo: dict[str, Any]) -> None:
    payment, refund = await _refunded(rt, client, worker, demo)
    listed = await admin.json("GET", f"/v1/payments/{payment.id}/callbacks", 200)
    rows = [(c["kind"], c["refundId"], c["status"], c["outcome"], c["provider"]) for c in listed["data"]]
    assert rows == [("refund", refund.id, "SUCCEEDED", "completed", "mtn_momo"),
                    ("refund", refund.id, "PENDING", "pending", "mtn_momo"),
                    ("collection", None, "SUCCEEDED", "completed", "mtn_momo")], rows
    assert listed["meta"]["total"] == 3
    assert set(listed["data"][0]) == {"id", "provider", "eventId", "kind", "refundId", "status", "outcome",
                                      "receivedAt"}  # no body: it holds the payer's number
    assert listed["data"][2]["eventId"] == f"done-{payment.id}"
    # The refund's own: its two.
    of_refund = await admin.json("GET", f"/v1/refunds/{refund.id}/callbacks", 200)
    assert [(c["status"], c["outcome"]) for c in of_refund["data"]] == [("SUCCEEDED", "completed"),
                                                                        ("PENDING", "pending")]
    # Paged as the other lists.
    page = await admin.json("GET", f"/v1/payments/{payment.id}/callbacks?limit=1&page=2", 200)
    assert [c["id"] for c in page["data"]] == [listed["data"][1]["id"]]


async def test_a_callback_repeated_is_listed_once_with_what_it_did(
        rt: Any, client: Any, worker: Any, admin: Caller, demo: dict[str, Any]) -> None:
    """MTN's retry of one callback is the same event (one row); a stale one after completion is its own row, with
    what the gateway made of it."""
    wire = mtn_wire()
    mtn_adapter(rt, wire)
    async with rt.sessionmaker.begin() as s:
        payment, _ = await create_payment(s, rt, mtn_payment(demo), actor=ADMIN)
    ok = {"amount": "50000", "currency": "RWF", "externalId": payment.provider_reference, "status": "SUCCESSFUL",
          "financialTransactionId": "MTN-9911"}
    wire.on("GET", "/collection/v1_0/requesttopay/*", 200, ok)
    for _ in range(2):
        await _mtn_callback(client, payment.provider_reference)
    await _mtn_callback(client, payment.provider_reference, "FAILED")
    listed = (await admin.json("GET", f"/v1/payments/{payment.id}/callbacks", 200))["data"]
    ref = payment.provider_reference
    # MTN signs nothing: what a callback reported is what the status query it asked confirmed (SUCCESSFUL).
    assert [(c["eventId"], c["status"], c["outcome"]) for c in listed] == [
        (f"{ref}:FAILED:MTN-9911", "SUCCEEDED", "already_completed"),
        (f"{ref}:SUCCESSFUL:MTN-9911", "SUCCEEDED", "completed")]


async def test_another_cooperatives_payment_or_refund_is_not_found(
        rt: Any, client: Any, worker: Any, demo: dict[str, Any], superadmin: Caller, coop_b: dict[str, Any],
        tenant: Caller, admin: Caller) -> None:
    payment, refund = await _refunded(rt, client, worker, demo)
    other: Caller = coop_b["admin"]
    for path, what in ((f"/v1/payments/{payment.id}/callbacks", "payment"),
                       (f"/v1/refunds/{refund.id}/callbacks", "refund")):
        assert (await other.json("GET", path, 404))["message"] == f"{what} not found"
        assert (await superadmin.json("GET", path, 200))["data"]
        await tenant.json("GET", path, 403)
    await admin.json("GET", "/v1/payments/not-an-id/callbacks", 404)
    await admin.json("GET", f"/v1/payments/{payment.id}/callbacks?limit=0", 400)
