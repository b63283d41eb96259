"""User journeys over HTTP against real processes: USSD pay, provider callback, receipt SMS, refund, webhooks.

One stack for the module: five simulator processes, one `serve`, one `worker`, on the suite's
PostgreSQL (DATABASE_URL) and Redis (REDIS_URL), with the demo cooperative seeded by `seed-demo`.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from sqlalchemy import select

from core.models import AuditEvent, ProviderEvent, Refund, SmsMessage, WebhookDelivery
from tests.conftest import requires_pg
from tests.integration.conftest import needs_servers, start_stack
from tests.integration.helpers import (
    MTN_FAIL,
    MTN_OK,
    UssdPhone,
    admin_token,
    messages_about,
    payment_by_reference,
    set_sim_options,
    sms_rows,
    transitions,
    wait_for,
    wait_payment_status,
)
from tests.integration.procs import Stack, free_port

pytestmark = [requires_pg, needs_servers]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # The webhook receiver listens on this machine: listed, as an operator lists a staging receiver's address.
    s = start_stack(tmp_path_factory.mktemp("e2e"), os.environ["DATABASE_URL"], os.environ["REDIS_URL"],
                    env_overrides={"WEBHOOK_PRIVATE_NETWORKS": "127.0.0.1/32"})
    try:
        yield s
    finally:
        s.stop()




async def test_member_pays_by_ussd_and_gets_an_sms_receipt(stack: Stack, gw: Any, demo: dict[str, Any],
                                                           http: aiohttp.ClientSession) -> None:
    phone = UssdPhone(http, stack.serve_urls, MTN_OK)
    reference = await phone.pay_first_type()

    payment = await wait_payment_status(gw, reference, "COMPLETED", timeout=20)
    assert (payment.amount_minor, payment.currency, payment.method, payment.provider, payment.channel) == (
        50_000, "RWF", "MOBILE_MONEY_MTN", "mtn_momo", "ussd")
    assert payment.member_id == demo["members"][MTN_OK]
    assert payment.payment_type_id == demo["payment_types"]["Monthly Rent"]
    assert payment.idempotency_key == f"ussd:africastalking:{phone.session_id}"
    assert payment.provider_transaction_id and payment.completed_at is not None
    assert not payment.late and not payment.mismatch
    # The simulator called back: the callback was stored and applied once.
    async with gw.sessionmaker() as s:
        events = (await s.execute(select(ProviderEvent).where(ProviderEvent.payment_id == payment.id))).scalars().all()
    assert [e.outcome for e in events] == ["completed"]
    assert await transitions(gw, payment.id, "payment.completed") == 1

    receipts = await wait_for(lambda: messages_about(http, stack.sim_url("africastalking"), MTN_OK, reference),
                              timeout=15, what="the receipt SMS")
    assert len(receipts) == 1
    assert payment.provider_transaction_id in receipts[0]  # Kinyarwanda receipt, with the transaction id
    rows = await wait_for(lambda: _sms_in(gw, payment.id, {"SENT", "DELIVERED"}), timeout=10, what="SMS row")
    assert [r.template for r in rows] == ["payment_receipt"] and rows[0].language == "rw"
    # The delivery report from the SMS simulator came back to the gateway.
    await wait_for(lambda: _sms_in(gw, payment.id, {"DELIVERED"}), timeout=10, what="delivery report")


async def _sms_in(gw: Any, payment_id: str, statuses: set[str]) -> list[SmsMessage]:
    rows = await sms_rows(gw, payment_id)
    return rows if rows and all(r.status in statuses for r in rows) else []


async def test_failing_number_ends_failed_with_a_failure_sms(stack: Stack, gw: Any,
                                                             http: aiohttp.ClientSession) -> None:
    phone = UssdPhone(http, stack.serve_urls, MTN_FAIL)
    reference = await phone.pay_first_type()

    payment = await wait_payment_status(gw, reference, "FAILED", timeout=20)
    assert payment.completed_at is None
    assert payment.failure_reason == "the payer does not have enough money"  # MTN's NOT_ENOUGH_FUNDS
    sms = await wait_for(lambda: messages_about(http, stack.sim_url("africastalking"), MTN_FAIL, reference),
                         timeout=15, what="the failure SMS")
    # Jean Bosco reads English, and why: he can top up (it said "the payment was not completed").
    assert len(sms) == 1 and "failed: not enough money on the account." in sms[0], sms
    assert [r.template for r in await sms_rows(gw, payment.id)] == ["payment_failed"]
    assert await transitions(gw, payment.id, "payment.completed") == 0
    assert await transitions(gw, payment.id, "payment.failed") == 1


async def test_dropped_callback_completes_through_worker_polling(stack: Stack, gw: Any,
                                                                 http: aiohttp.ClientSession) -> None:
    await set_sim_options(http, stack.sim_url("mtn_momo"), drop_callback=True)
    try:
        reference = await UssdPhone(http, stack.serve_urls, MTN_OK).pay_first_type()
        # POLL_AFTER_SECONDS=2: the worker asks MTN for the status and finds it SUCCESSFUL.
        payment = await wait_payment_status(gw, reference, "COMPLETED", timeout=20)
    finally:
        await set_sim_options(http, stack.sim_url("mtn_momo"), drop_callback=False)
    async with gw.sessionmaker() as s:
        assert (await s.execute(select(ProviderEvent).where(ProviderEvent.payment_id == payment.id))
                ).first() is None, "no callback was sent, so none may be recorded"
        completed = (await s.execute(select(AuditEvent).where(
            AuditEvent.entity_id == payment.id, AuditEvent.action == "payment.completed"))).scalars().all()
    assert [(a.actor, a.channel) for a in completed] == [("system", "worker")]
    receipts = await wait_for(lambda: messages_about(http, stack.sim_url("africastalking"), MTN_OK, reference),
                              timeout=15, what="the receipt SMS")
    assert len(receipts) == 1


async def test_admin_sees_the_payment_and_refunds_part_of_it(stack: Stack, gw: Any, demo: dict[str, Any],
                                                             http: aiohttp.ClientSession) -> None:
    base = stack.serve_url(0)
    reference = await UssdPhone(http, stack.serve_urls, MTN_OK).pay_first_type()
    payment = await wait_payment_status(gw, reference, "COMPLETED", timeout=20)

    token = await admin_token(http, base, demo["admin"])
    auth = {"Authorization": f"Bearer {token}"}
    async with http.get(f"{base}/v1/payments", params={"status": "COMPLETED", "limit": "100"},
                        headers=auth) as resp:
        listed = await resp.json()
        assert resp.status == 200, listed
    mine = [p for p in listed["data"] if p["id"] == payment.id]
    assert len(mine) == 1
    assert (mine[0]["reference"], mine[0]["status"], mine[0]["currency"], mine[0]["paymentMethod"]) == (
        reference, "COMPLETED", "RWF", "MOBILE_MONEY_MTN")
    assert int(mine[0]["amount"]) == 50_000
    assert mine[0]["paymentAccount"] != MTN_OK and "****" in mine[0]["paymentAccount"]  # masked
    assert "+250788000001" not in json.dumps(listed)

    # No credentials, no payments.
    async with http.get(f"{base}/v1/payments") as resp:
        assert resp.status == 401

    key = f"refund-{uuid.uuid4().hex}"
    refund_body = {"amount": 20_000, "reason": "overpaid", "idempotencyKey": key}
    async with http.post(f"{base}/v1/payments/{payment.id}/refunds", json=refund_body, headers=auth) as resp:
        created = await resp.json()
        assert resp.status == 201, created
    assert created["status"] == "PENDING" and int(created["amount"]) == 20_000
    async with http.post(f"{base}/v1/payments/{payment.id}/refunds", json=refund_body, headers=auth) as resp:
        replay = await resp.json()
        # Answered as the first was (201), marked replayed.
        assert resp.status == 201 and resp.headers["Idempotent-Replayed"] == "true", replay
        assert replay["id"] == created["id"], replay
    # More than what is left (50,000 - 20,000) is refused with a clear error.
    async with http.post(f"{base}/v1/payments/{payment.id}/refunds",
                         json={"amount": 40_000, "idempotencyKey": f"refund-{uuid.uuid4().hex}"},
                         headers=auth) as resp:
        refused = await resp.json()
        assert (resp.status, refused["code"], refused["field"]) == (422, "REFUND_EXCEEDS_REFUNDABLE", "amount"), refused
        assert refused["message"].startswith("refund of 40,000 RWF exceeds the refundable 30,000 RWF"), refused

    async def refund_done() -> Refund | None:
        async with gw.sessionmaker() as s:
            row = await s.get(Refund, created["id"])
            return row if row is not None and row.status in ("COMPLETED", "FAILED") else None

    refund = await wait_for(refund_done, timeout=25, what="the refund to settle")
    assert refund.status == "COMPLETED" and refund.provider_transaction_id
    after = await payment_by_reference(gw, reference)
    assert after is not None
    assert (after.status, after.refunded_minor) == ("PARTIALLY_REFUNDED", 20_000)
    async with http.get(f"{base}/v1/refunds/{refund.id}", headers=auth) as resp:
        shown = await resp.json()
        assert resp.status == 200 and shown["status"] == "COMPLETED", shown
    sms = await wait_for(lambda: messages_about(http, stack.sim_url("africastalking"), MTN_OK, refund.reference),
                         timeout=15, what="the refund SMS")
    assert len(sms) == 1


async def _register_receiver(gw: Any, demo: dict[str, Any], url: str) -> str:
    """Register a 127.0.0.1 endpoint, its address listed in the stack's WEBHOOK_PRIVATE_NETWORKS (the API refuses
    any other IP host on PostgreSQL deployments, see the test); returns the signing secret."""
    from core import webhooks
    from core.audit import Actor

    actor, private = Actor("system", "system"), gw.settings.webhook_private_networks
    async with gw.sessionmaker.begin() as s:
        domain = await webhooks.request_domain(s, cooperative_id=demo["cooperative_id"], domain="127.0.0.1",
                                               actor=actor, private=private)
        await webhooks.approve_domain(s, domain_id=domain.id, actor=actor, is_super_admin=True)
        _endpoint, secret = await webhooks.register_endpoint(
            s, gw.cipher, cooperative_id=demo["cooperative_id"], url=url,
            events=["payment.completed", "payment.failed", "refund.completed"], actor=actor, private=private)
    return secret


async def test_registered_webhook_endpoint_receives_signed_events(stack: Stack, gw: Any, demo: dict[str, Any],
                                                                  http: aiohttp.ClientSession) -> None:
    from core.webhooks import EVENT_ID_HEADER, SIGNATURE_HEADER, verify_signature

    received: list[tuple[dict[str, str], bytes]] = []

    async def receive(request: web.Request) -> web.Response:
        received.append((dict(request.headers), await request.read()))
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/hooks/gateway", receive)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    url = f"http://127.0.0.1:{port}/hooks/gateway"
    try:
        # Through the API, outside the embedded default, a LAN/loopback address not listed is refused as such, over
        # http and https (127.0.0.2: loopback, but only 127.0.0.1 is listed).
        token = await admin_token(http, stack.serve_url(0), demo["admin"])
        unlisted = url.replace("127.0.0.1", "127.0.0.2", 1)
        why = ("webhook domains must be public host names, not IP addresses or localhost, except an address of the "
               "networks the operator allows")
        for refused in (unlisted, unlisted.replace("http://", "https://", 1)):
            async with http.post(f"{stack.serve_url(0)}/v1/webhook-endpoints", json={
                    "url": refused, "events": ["payment.completed"]},
                    headers={"Authorization": f"Bearer {token}"}) as resp:
                body = await resp.json()
                assert (resp.status, body["code"], body["message"]) == (400, "VALIDATION_FAILED", [why]), body
        secret = await _register_receiver(gw, demo, url)

        ok_ref = await UssdPhone(http, stack.serve_urls, MTN_OK).pay_first_type()
        failed_ref = await UssdPhone(http, stack.serve_urls, MTN_FAIL).pay_first_type()

        def events() -> dict[str, list[dict[str, Any]]]:
            by_ref: dict[str, list[dict[str, Any]]] = {}
            for _headers, body in received:
                event = json.loads(body)
                by_ref.setdefault(event["data"].get("reference", ""), []).append(event)
            return by_ref

        async def both_arrived() -> bool:
            seen = events()
            return ok_ref in seen and failed_ref in seen

        await wait_for(both_arrived, timeout=25, what="webhook events for both payments")
        for headers, body in received:
            assert verify_signature(secret, headers[SIGNATURE_HEADER], body), headers
            assert headers[EVENT_ID_HEADER] == json.loads(body)["id"]
            assert verify_signature("whsec_wrong", headers[SIGNATURE_HEADER], body) is False
        seen = events()
        assert [e["type"] for e in seen[ok_ref]] == ["payment.completed"]
        assert [e["type"] for e in seen[failed_ref]] == ["payment.failed"]
        completed = seen[ok_ref][0]
        assert completed["cooperativeId"] == demo["cooperative_id"]
        assert completed["data"]["status"] == "COMPLETED" and completed["data"]["currency"] == "RWF"
        assert "+250788000001" not in json.dumps(completed)  # the account is masked
        async def recorded() -> list[str]:  # the worker records the attempt after our 200
            async with gw.sessionmaker() as s:
                rows = (await s.execute(select(WebhookDelivery.status).where(
                    WebhookDelivery.event_id == completed["id"]))).scalars().all()
            return list(rows) if rows and "PENDING" not in rows else []

        assert await wait_for(recorded, timeout=10, what="the delivery recorded") == ["DELIVERED"]
    finally:
        await runner.cleanup()
