"""Refunds after a restore of PostgreSQL. A payment recorded from MTN's statement (POST /v1/payments/recorded) takes
the reference of the request that took its money (gatewayReference, or the one the callback it resolves names), so
its refund names that request (MTN's referenceIdToRefund) and goes through; without it, the refund is refused before
anything is sent (MTN never had the value a recorded payment held: before, the refund failed at MTN). And a refund's
provider reference is derived from its key, so a cooperative's system that sends a refund again after the restore
lost it reaches MTN as the same request: MTN answers that it has it, and the member is paid back once (before, a
random reference made it a second refund)."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, text

from core.config import ProviderConfig, Secret
from core.models import OutboxJob, Payment, Refund
from core.money import Money
from core.phone import Phone
from core.ports import ProviderError, RefundRequest
from core.refunds import derived_refund_reference
from providers.mtn_momo.adapter import MtnMomoAdapter
from providers.mtn_momo.simulator import REFUNDS, TRANSACTIONS
from providers.simulation import STATE
from tests.admin_api.conftest import Caller, idem, payment_body
from tests.admin_api.test_recorded_payments import _line, _said
from tests.admin_api.test_retried_key_after_restore import mtn_simulator
from tests.admin_api.test_unmatched_callbacks import _lost_payment_reference, _mtn_callback
from tests.conftest import drain
from tests.providers.wires import due_now

SIM_CREDS = {"api_user": "mtn-user-id", "api_key": "mtn-api-key-8f2a", "subscription_key": "mtn-sub-collection-77",
             "disbursement_api_user": "mtn-dis-user", "disbursement_api_key": "mtn-dis-key-3c1d",
             "disbursement_subscription_key": "mtn-sub-disbursement-55"}


@pytest.fixture(autouse=True)
async def _restored(rt: Any) -> None:
    """The references' sequence past the lost ones, as `main.py advance-references` leaves it after a restore."""
    async with rt.sessionmaker.begin() as s:
        if s.get_bind().dialect.name == "postgresql":
            await s.execute(text("SELECT setval('human_reference_seq', 1000000)"))


async def _lose_payment(rt: Any, payment_id: str) -> None:
    """A restore to a point before the payment: its row, its jobs and its callbacks are gone."""
    async with rt.engine.begin() as conn:
        await conn.execute(text("DELETE FROM outbox_jobs"))
        await conn.execute(text("DELETE FROM provider_events WHERE payment_id = :i"), {"i": payment_id})
        await conn.execute(text("DELETE FROM payments WHERE id = :i"), {"i": payment_id})


async def _lose_refunds(rt: Any, payment_id: str) -> None:
    """A restore to a point before the payment's refund: the refund, its jobs and callbacks are gone, and the payment
    is as it was before it (nothing refunded)."""
    async with rt.engine.begin() as conn:
        await conn.execute(text("DELETE FROM outbox_jobs"))
        await conn.execute(text("DELETE FROM provider_events WHERE refund_id IS NOT NULL"))
        await conn.execute(text("DELETE FROM refunds WHERE payment_id = :i"), {"i": payment_id})
        await conn.execute(text("UPDATE payments SET refunded_minor = 0, status = 'COMPLETED' WHERE id = :i"),
                           {"i": payment_id})


async def _refund_rows(rt: Any) -> list[Refund]:
    async with rt.sessionmaker() as s:
        return list((await s.execute(select(Refund))).scalars())


async def _refund_jobs(rt: Any) -> int:
    async with rt.sessionmaker() as s:
        return int((await s.execute(select(func.count(OutboxJob.id)).where(OutboxJob.kind == "refund.submit")))
                   .scalar_one())


async def _settle_refunds(rt: Any, worker: Any, state: Any) -> None:
    await drain(worker)  # refund.submit
    await state.idle()
    await due_now(rt, "refund.poll")
    await drain(worker)  # its status, asked of MTN


async def test_a_recorded_payment_is_refunded_through_mtn_and_a_refund_sent_again_is_paid_once(
        admin: Caller, rt: Any, demo: dict[str, Any], worker: Any, aiohttp_server: Any) -> None:
    async with mtn_simulator(rt, aiohttp_server, SIM_CREDS) as app:
        state = app[STATE]
        first = await admin.json("POST", "/v1/payments", 201, json=payment_body(demo["payment_types"]["Monthly Rent"]))
        await drain(worker)  # MTN prompts the member, who approves
        await state.idle()
        [(request, taken)] = app[TRANSACTIONS].items()
        assert taken["status"] == "SUCCESSFUL"

        # The restore loses the payment; an admin records it from MTN's statement, with its request's reference.
        await _lose_payment(rt, first["id"])
        recorded = await admin.json("POST", "/v1/payments/recorded", 201, json=_line(
            demo, memberId=None, paymentAccount="+250788000001", gatewayReference=request.upper(),
            providerTransactionId=taken["financialTransactionId"]))
        assert recorded["gatewayReference"] == request

        body = {"amount": 20000, "reason": "overpaid", "idempotencyKey": idem()}
        refund = await admin.json("POST", f"/v1/payments/{recorded['id']}/refunds", 201, json=body)
        await _settle_refunds(rt, worker, state)
        [(sent, at_mtn)] = app[REFUNDS].items()  # MTN found the request to pay it names, and paid back
        assert at_mtn["status"] == "SUCCESSFUL"
        done = await admin.json("GET", f"/v1/refunds/{refund['id']}", 200)
        assert (done["status"], done["providerTransactionId"]) == ("COMPLETED", at_mtn["financialTransactionId"])
        [row] = await _refund_rows(rt)
        assert row.provider_reference == sent

        # The restore loses the refund; the cooperative's system sends it again under its key.
        await _lose_refunds(rt, recorded["id"])
        again = await admin.json("POST", f"/v1/payments/{recorded['id']}/refunds", 201, json=body)
        assert again["id"] != refund["id"]
        requests_before = state.requests
        await _settle_refunds(rt, worker, state)
        assert list(app[REFUNDS]) == [sent]  # one refund at MTN: the member paid back once
        assert state.requests > requests_before  # the retry did reach MTN (409: it has this request)
        settled = await admin.json("GET", f"/v1/refunds/{again['id']}", 200)
        assert (settled["status"], settled["providerTransactionId"]) == (
            "COMPLETED", at_mtn["financialTransactionId"])
        [row] = await _refund_rows(rt)
        assert row.provider_reference == sent


async def test_the_callback_it_resolves_gives_its_request(admin: Caller, superadmin: Caller, client: Any, rt: Any,
                                                          demo: dict[str, Any]) -> None:
    reference = await _lost_payment_reference(rt, admin, demo)
    await _mtn_callback(client, reference, txn="MTN-9911")
    [callback] = (await superadmin.json("GET", "/v1/provider-callbacks?unmatched=true&resolved=false", 200))["data"]
    assert callback["payload"]["gatewayReference"] == reference
    line = _line(demo, cooperativeId=demo["cooperative_id"], providerTransactionId="MTN-9911",
                 callbackId=callback["id"])
    # Given too, the reference must be the callback's: refused whole otherwise.
    other = str(uuid.uuid4())
    wrong = await superadmin.json("POST", "/v1/payments/recorded", 409, json={**line, "gatewayReference": other})
    assert "gatewayReference" in _said(wrong) and reference in _said(wrong)
    done = await superadmin.json("POST", "/v1/payments/recorded", 201, json=line)
    async with rt.sessionmaker() as s:
        row = await s.get(Payment, done["id"])
    assert (row.provider_reference, done["gatewayReference"]) == (reference, reference)


async def test_without_its_request_an_mtn_refund_is_refused_before_anything_is_sent(
        admin: Caller, rt: Any, demo: dict[str, Any]) -> None:
    recorded = await admin.json("POST", "/v1/payments/recorded", 201, json=_line(demo))
    refused = await admin.json("POST", f"/v1/payments/{recorded['id']}/refunds", 409,
                               json={"idempotencyKey": idem()})
    assert "gatewayReference" in _said(refused)
    assert "nothing was sent" in _said(refused) and "returnedByProvider" in _said(refused)
    assert await _refund_rows(rt) == [] and await _refund_jobs(rt) == 0
    # What the admin is told to do instead: the money MTN sent back, recorded and never sent.
    returned = await admin.json("POST", f"/v1/payments/{recorded['id']}/refunds", 201, json={
        "idempotencyKey": idem(), "returnedByProvider": {"providerTransactionId": "MTN-RV-1"}})
    assert (returned["status"], returned["returnedByProvider"]) == ("COMPLETED", True)
    assert await _refund_jobs(rt) == 0
    # Airtel refunds by its own transaction id (the statement's): a recorded Airtel payment is refunded as any.
    airtel = await admin.json("POST", "/v1/payments/recorded", 201, json=_line(
        demo, memberId=None, paymentAccount="0733000001", paymentMethod="MOBILE_MONEY_AIRTEL",
        providerTransactionId="AIRTEL-88231"))
    queued = await admin.json("POST", f"/v1/payments/{airtel['id']}/refunds", 201, json={"idempotencyKey": idem()})
    assert queued["status"] == "PENDING" and await _refund_jobs(rt) == 1


async def test_the_reference_given_is_checked_and_part_of_the_request(admin: Caller, rt: Any,
                                                                      demo: dict[str, Any],
                                                                      coop_b: dict[str, Any]) -> None:
    for bad in ("PAY_20261130_4821", "recorded:" + str(uuid.uuid4()), "  "):
        refused = await admin.json("POST", "/v1/payments/recorded", 400, json=_line(demo, gatewayReference=bad))
        assert "gatewayReference" in _said(refused)
    paid = await admin.json("POST", "/v1/payments", 201, json=payment_body(demo["payment_types"]["Monthly Rent"]))
    held = await admin.json("POST", "/v1/payments/recorded", 409, json=_line(
        demo, gatewayReference=paid["gatewayReference"]))
    assert "gatewayReference" in _said(held) and paid["reference"] in _said(held)
    theirs = await coop_b["admin"].json("POST", "/v1/payments/recorded", 409, json=_line(
        demo, paymentTypeId=coop_b["payment_type_id"], memberId=coop_b["member_id"], amount=1000,
        gatewayReference=paid["gatewayReference"]))
    assert "another cooperative's payment" in _said(theirs) and paid["reference"] not in _said(theirs)

    request = str(uuid.uuid4())
    body = _line(demo, gatewayReference=request)
    done = await admin.json("POST", "/v1/payments/recorded", 201, json=body)
    replay = await admin.req("POST", "/v1/payments/recorded", json=body)
    assert (replay.status, replay.headers.get("Idempotent-Replayed")) == (201, "true")
    changed = await admin.json("POST", "/v1/payments/recorded", 409, json={**body, "gatewayReference": str(
        uuid.uuid4())})
    assert "idempotency key" in _said(changed)
    async with rt.sessionmaker() as s:
        assert (await s.get(Payment, done["id"])).provider_reference == request
        count = (await s.execute(select(func.count(Payment.id)).where(Payment.channel == "recorded"))).scalar_one()
    assert count == 1


async def test_a_sent_refund_reference_is_derived_from_its_key_and_request(admin: Caller, rt: Any,
                                                                           demo: dict[str, Any]) -> None:
    paid = await admin.json("POST", "/v1/payments/recorded", 201, json=_line(
        demo, gatewayReference=str(uuid.uuid4())))
    key = idem()
    body = {"amount": 10000, "reason": "overpaid", "idempotencyKey": key}
    await admin.json("POST", f"/v1/payments/{paid['id']}/refunds", 201, json=body)
    [first] = await _refund_rows(rt)
    async with rt.sessionmaker() as s:
        payment = await s.get(Payment, paid["id"])
    assert first.provider_reference == derived_refund_reference(rt.cipher, payment, key, first.request_hash)
    assert first.provider_reference[14] == "4" and first.provider_reference[19] in "89ab"  # uuid4's form (MTN's)
    await _lose_refunds(rt, paid["id"])
    await admin.json("POST", f"/v1/payments/{paid['id']}/refunds", 201, json=body)
    [again] = await _refund_rows(rt)
    assert again.id != first.id and again.provider_reference == first.provider_reference
    # Another request under the key after the loss, or another key: another request at the provider.
    await _lose_refunds(rt, paid["id"])
    await admin.json("POST", f"/v1/payments/{paid['id']}/refunds", 201, json={**body, "amount": 9000})
    await admin.json("POST", f"/v1/payments/{paid['id']}/refunds", 201, json={**body, "idempotencyKey": idem()})
    references = {r.provider_reference for r in await _refund_rows(rt)}
    assert len(references) == 2 and first.provider_reference not in references


async def test_mtn_adapter_refuses_a_refund_of_no_known_request_unsent() -> None:
    sent: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(500)

    config = ProviderConfig(base_url="https://mtn.test", credentials={k: Secret(v) for k, v in SIM_CREDS.items()},
                            options={"target_environment": "mtnrwanda"})
    async with httpx.AsyncClient(transport=httpx.MockTransport(record)) as http:
        adapter = MtnMomoAdapter(http, config)
        with pytest.raises(ProviderError) as refused:
            await adapter.request_refund(RefundRequest(
                provider_reference=str(uuid.uuid4()), original_provider_reference=f"recorded:{uuid.uuid4()}",
                original_provider_transaction_id="MTN-STMT-4821", amount=Money(5000, "RWF"), full=False,
                payer=Phone("+250788000001"), reason="refund", callback_url="https://gw.test/cb"))
    assert (refused.value.code, refused.value.retryable, sent) == ("NO_REQUEST_TO_REFUND", False, [])
