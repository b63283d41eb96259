"""Seed 001's development webhook, `POST /webhooks/payments/test`: beside the simulators it moves a payment as its
provider's callback would (receipt and webhook event queued); without them, and in production, it is not there."""

from __future__ import annotations

import dataclasses
from typing import Any

from sqlalchemy import select

from core.models import OutboxJob, Payment
from tests.admin_api.conftest import make_payment


async def _client(rt: Any, aiohttp_client: Any, **settings: Any) -> Any:
    from app import create_app

    return await aiohttp_client(create_app(dataclasses.replace(rt.settings, **settings), runtime=rt))


async def test_the_test_webhook_completes_a_payment_beside_the_simulators(admin, rt, demo, aiohttp_client):
    client = await _client(rt, aiohttp_client, simulators_in_process=True)
    payment = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    body = {"gatewayTransactionId": "TEST_TXN_123456", "status": "COMPLETED",
            "gatewayReference": payment["gatewayReference"], "failureReason": None,
            "gatewayData": {"test": True, "amount": 50000}}
    resp = await client.post("/webhooks/payments/test", json=body)
    assert (resp.status, await resp.json()) == (200, {"status": "accepted", "result": "completed"})
    async with rt.sessionmaker() as s:
        row = await s.get(Payment, payment["id"])
        kinds = sorted((await s.execute(select(OutboxJob.dedupe_key).where(
            OutboxJob.kind.in_(("sms.send", "webhook.event"))))).scalars())
    assert (row.status, row.provider_transaction_id) == ("COMPLETED", "TEST_TXN_123456")
    assert kinds == [f"sms:payment_receipt:{payment['id']}", f"wh:evt_payment_completed_{payment['id']}"]
    again = await client.post("/webhooks/payments/test", json=body)
    assert (await again.json())["result"] == "already_completed"
    for bad, status in (({**body, "status": "PAID"}, 400), ({**body, "gatewayReference": "nope"}, 404),
                        ({**body, "gatewayData": {"amount": "x"}}, 400), ([1], 400)):
        resp = await client.post("/webhooks/payments/test", json=bad)
        assert resp.status == status, await resp.text()


async def test_there_is_no_test_webhook_without_the_simulators(rt, aiohttp_client):
    for settings in ({"simulators_in_process": False}, {"simulators_in_process": True, "environment": "production"}):
        client = await _client(rt, aiohttp_client, **settings)
        resp = await client.post("/webhooks/payments/test", json={"gatewayReference": "x", "status": "COMPLETED"})
        assert resp.status == 404 and (await resp.json())["message"] == "unknown payment provider 'test'"


async def test_a_payment_of_a_real_provider_is_not_moved(admin, rt, demo, aiohttp_client):
    """A development install whose MTN points at the real MTN: the test webhook does not move its payments."""
    real = dataclasses.replace(rt.settings.providers["mtn_momo"], base_url="https://proxy.momoapi.mtn.com")
    client = await _client(rt, aiohttp_client, simulators_in_process=True,
                           providers={**rt.settings.providers, "mtn_momo": real})
    payment = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    resp = await client.post("/webhooks/payments/test", json={"gatewayReference": payment["gatewayReference"],
                                                              "status": "COMPLETED"})
    assert resp.status == 403, await resp.text()
    async with rt.sessionmaker() as s:
        assert (await s.get(Payment, payment["id"])).status == "PENDING"


async def test_its_refusals_write_the_timestamp_as_the_api_does(admin, rt, demo, aiohttp_client):
    """The seed's error shape, `timestamp` included, as every /v1 error writes it (UTC, milliseconds, `Z`:
    admin_api.errors.timestamp): an integration parsing the API's errors parses these too."""
    import re

    client = await _client(rt, aiohttp_client, simulators_in_process=True)
    api = await (await client.get("/v1/payments")).json()
    refusals = [await client.post("/webhooks/payments/test", json={"status": "COMPLETED"}),
                await client.post("/webhooks/payments/mtn_momo", data=b"{}")]
    for resp in refusals:
        body = await resp.json()
        assert resp.status in (400, 401), body
        for stamp in (api["timestamp"], body["timestamp"]):
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", stamp), stamp
