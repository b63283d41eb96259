"""A cooperative's system sends `POST /v1/payments` again with a key whose payment a restore of PostgreSQL lost (its
first try had timed out). The provider reference of an API payment is derived from the cooperative, the key and the
request, so the retry reaches the provider with the first request's id: MTN answers that it has it, and the member is
charged once. Before, each payment had a random reference, and the retry was a second PIN prompt the member paid."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
from aiohttp import web
from sqlalchemy import text

from core.config import ProviderConfig, Secret
from core.payments import NewPayment, create_payment
from providers.mtn_momo.adapter import MtnMomoAdapter
from providers.mtn_momo.simulator import TRANSACTIONS, create_simulator
from providers.simulation import STATE, SimulatorOptions
from tests.admin_api.conftest import Caller, idem, payment_body
from tests.conftest import drain
from tests.providers.wires import ADMIN, due_now

SIM_CREDS = {"api_user": "mtn-user-id", "api_key": "mtn-api-key-8f2a", "subscription_key": "mtn-sub-collection-77"}


@contextlib.asynccontextmanager
async def mtn_simulator(rt: Any, aiohttp_server: Any, credentials: dict[str, str] | None = None
                        ) -> AsyncIterator[web.Application]:
    """The MTN MoMo simulator over HTTP on 127.0.0.1 as the gateway's MTN while the block runs: payers approve within
    20 ms, its callbacks are dropped (the status poll asks); its app holds TRANSACTIONS and STATE. `credentials`:
    SIM_CREDS unless given (a refund needs the disbursement product's too)."""
    credentials = credentials or SIM_CREDS
    app = create_simulator(SimulatorOptions(delay=0.02, drop_callback=True, credentials=credentials))
    server = await aiohttp_server(app, host="127.0.0.1")
    config = ProviderConfig(base_url=str(server.make_url("")).rstrip("/"),
                            credentials={k: Secret(v) for k, v in credentials.items()},
                            options={"target_environment": "mtnrwanda"})
    async with httpx.AsyncClient() as http:
        rt.providers = {**rt.providers, "mtn_momo": MtnMomoAdapter(http, config)}
        yield app


async def _lose(rt: Any, payment_id: str) -> None:
    """What a restore to a point before the payment does to it: its row and its jobs are gone (the audit log, which
    refuses DELETE, keeps its rows here; the restored one would not have them either)."""
    async with rt.engine.begin() as conn:
        await conn.execute(text("DELETE FROM outbox_jobs"))
        await conn.execute(text("DELETE FROM provider_events WHERE payment_id = :i"), {"i": payment_id})
        await conn.execute(text("DELETE FROM payments WHERE id = :i"), {"i": payment_id})


async def test_two_cooperatives_one_key_two_references_and_one_cooperative_the_same_again(
        admin: Caller, rt: Any, demo: dict[str, Any], coop_b: dict[str, Any]) -> None:
    key = idem()
    body = payment_body(demo["payment_types"]["Monthly Rent"], idempotencyKey=key)
    ours = await admin.json("POST", "/v1/payments", 201, json=body)
    theirs = await coop_b["admin"].json("POST", "/v1/payments", 201, json=payment_body(
        coop_b["payment_type_id"], amount=1000, paymentAccount="+250788999001", idempotencyKey=key))
    assert ours["gatewayReference"] != theirs["gatewayReference"]
    # The reference a provider holds is in uuid4's form (MTN takes only a version 4 UUID).
    assert ours["gatewayReference"][14] == "4" and ours["gatewayReference"][19] in "89ab"
    await _lose(rt, ours["id"])
    again = await admin.json("POST", "/v1/payments", 201, json=body)
    assert again["id"] != ours["id"] and again["gatewayReference"] == ours["gatewayReference"]
    # Another request under the key (after the loss the gateway cannot compare): another request at the provider.
    await _lose(rt, again["id"])
    other = await admin.json("POST", "/v1/payments", 201, json={**body, "paymentAccount": "+250788000003"})
    assert other["gatewayReference"] != ours["gatewayReference"]


async def test_a_ussd_key_keeps_a_random_reference(rt: Any, demo: dict[str, Any]) -> None:
    """A USSD payment's key is the aggregator's session id, given again on another day to another session: its
    reference is never derived from it (a lost earlier payment's outcome would be taken as this one's)."""
    new = NewPayment(cooperative_id=demo["cooperative_id"], payment_type_id=demo["payment_types"]["Monthly Rent"],
                     method="MOBILE_MONEY_MTN", account="+250788000001", idempotency_key="ussd:africastalking:ATU-1",
                     channel="ussd", member_id=demo["members"]["+250788000001"])
    references = []
    for _ in range(2):
        async with rt.sessionmaker.begin() as s:
            payment, created = await create_payment(s, rt, new, actor=ADMIN)
        assert created
        references.append(payment.provider_reference)
        await _lose(rt, payment.id)
    assert references[0] != references[1]


async def test_a_retry_after_the_restore_is_collected_once_at_the_mtn_simulator(
        admin: Caller, rt: Any, demo: dict[str, Any], worker: Any, aiohttp_server: Any) -> None:
    async with mtn_simulator(rt, aiohttp_server) as app:
        state = app[STATE]
        body = payment_body(demo["payment_types"]["Monthly Rent"])
        first = await admin.json("POST", "/v1/payments", 201, json=body)
        await drain(worker)  # the collect job: MTN prompts the member, who approves
        await state.idle()
        [(reference, taken)] = app[TRANSACTIONS].items()
        assert (reference, taken["status"]) == (first["gatewayReference"], "SUCCESSFUL")

        await _lose(rt, first["id"])  # the restore; then the cooperative's system retries its timed-out request
        retry = await admin.json("POST", "/v1/payments", 201, json=body)
        assert retry["id"] != first["id"]
        await drain(worker)  # collect: MTN answers 409, it has this request
        await due_now(rt, "payment.poll")
        await drain(worker)  # the poll asks MTN about it: the first request's outcome
        await state.idle()
        assert list(app[TRANSACTIONS]) == [reference]  # one request to pay: the member charged once
        assert state.requests == 2  # the retry did reach MTN, and was refused as the same request
        done = await admin.json("GET", f"/v1/payments/{retry['id']}", 200)
        assert (done["status"], done["gatewayTransactionId"], done["collectedAmount"]) == (
            "COMPLETED", taken["financialTransactionId"], 50000)
