"""An M-Pesa payment confirmed by Daraja's STK query alone, its callback (with the receipt number) never come.

Found walking a Kenyan SACCO with the simulator dropping callbacks: the payment completed holding its
CheckoutRequestID, the member's receipt SMS read 'Transaction: ws_CO_0312...', an id she finds nowhere (her M-Pesa
SMS names the receipt), and a refund asked for was taken (201), then failed at once in the worker ('a reversal needs
the M-Pesa receipt number') and the member was texted that her refund failed."""

from __future__ import annotations

import dataclasses
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from aiohttp import web
from sqlalchemy import select

from core.errors import Conflict
from core.models import OutboxJob, ProviderEvent, Refund, SmsMessage
from core.refunds import request_refund
from providers.mpesa.simulator import create_simulator
from providers.simulation import STATE, SimulatorOptions
from tests.admin_api.conftest import bearer
from tests.channels.sms.helpers import start_simulator
from tests.conftest import drain
from tests.core.test_provider_faults_mpesa import (
    CHECKOUT,
    QUERY,
    RECEIPT,
    _payment,
    _pushed,
    _query_answer,
    _stk_callback,
)
from tests.providers.wires import ADMIN, MPESA_CREDS, due_now, mpesa_adapter, mpesa_payment


async def _confirmed_by_query(rt: Any, demo: dict[str, Any], worker: Any, aiohttp_server: Any) -> tuple[Any, Any,
                                                                                                          Any]:
    wire, payment = await _pushed(rt, demo, worker)
    _server, sms = await start_simulator(aiohttp_server, rt)
    wire.on("POST", QUERY, *_query_answer("0"))  # success, and no receipt number: the STK query carries none
    await due_now(rt, "payment.poll")
    await drain(worker)
    stored = await _payment(rt, payment.id)
    assert (stored.status, stored.provider_transaction_id) == ("COMPLETED", CHECKOUT)
    return wire, stored, sms


async def test_the_receipt_sms_names_no_checkout_request_id(rt: Any, demo: dict[str, Any], worker: Any,
                                                            aiohttp_server: Any) -> None:
    _wire, payment, sms = await _confirmed_by_query(rt, demo, worker, aiohttp_server)
    async with rt.sessionmaker() as s:
        [receipt] = (await s.execute(select(SmsMessage).where(SmsMessage.template == "payment_receipt"))).scalars()
    assert receipt.status == "SENT"
    assert f"Ref: {payment.reference}. Txn: -. " in receipt.body, receipt.body
    assert "ws_CO_" not in receipt.body
    assert [m for messages in sms.inbox.values() for m in messages if "ws_CO_" in str(m)] == []


async def test_a_refund_is_refused_before_anything_is_queued_until_the_receipt_is_known(
        rt: Any, demo: dict[str, Any], worker: Any, aiohttp_server: Any, client: Any) -> None:
    _wire, payment, _sms = await _confirmed_by_query(rt, demo, worker, aiohttp_server)
    async with rt.sessionmaker() as s:
        jobs_before = len((await s.execute(select(OutboxJob))).scalars().all())
    with pytest.raises(Conflict) as refused:
        async with rt.sessionmaker.begin() as s:
            await request_refund(s, rt, payment_id=payment.id, cooperative_id=demo["cooperative_id"], amount=None,
                                 reason="paid twice", idempotency_key="refund-key-query-1", actor=ADMIN)
    assert "no M-Pesa receipt number" in refused.value.message and "returnedByProvider" in refused.value.message
    # What the admin sees on the API: a 409 saying why and what to do; nothing stored, queued or texted.
    admin = await bearer(client, *demo["super_admin"])
    body = await admin.json("POST", f"/v1/payments/{payment.id}/refunds", 409,
                            json={"reason": "paid twice", "idempotencyKey": "refund-key-query-2"})
    assert "reverse the payment in the M-Pesa portal" in str(body["message"]), body
    async with rt.sessionmaker() as s:
        assert (await s.execute(select(Refund))).scalars().all() == []
        assert len((await s.execute(select(OutboxJob))).scalars().all()) == jobs_before
    # Daraja's callback comes after all: it brings the receipt, and the refund goes, naming it.
    resp = await client.post(f"/webhooks/payments/mpesa?ref={payment.provider_reference}",
                             json=_stk_callback(0, RECEIPT))
    assert resp.status == 200
    assert (await _payment(rt, payment.id)).provider_transaction_id == RECEIPT
    await admin.json("POST", f"/v1/payments/{payment.id}/refunds", 201,
                     json={"reason": "paid twice", "idempotencyKey": "refund-key-query-3"})


async def test_the_simulator_dates_a_payment_in_nairobi_time_as_daraja_does(rt: Any, demo: dict[str, Any],
                                                                            worker: Any, client: Any) -> None:
    """Daraja's TransactionDate is Nairobi's wall clock. The simulator sent UTC's digits, read three hours early by
    the adapter, so every simulated M-Pesa payment was dated at its request (the earliest time the gateway keeps),
    not at the payer's approval the callback reports."""
    sim = create_simulator(SimulatorOptions(delay=0.05, credentials=MPESA_CREDS))
    runner = web.AppRunner(sim, handler_cancellation=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        rt.settings = dataclasses.replace(rt.settings, public_base_url=str(client.make_url("")).rstrip("/"))
        async with httpx.AsyncClient() as http:
            mpesa_adapter(rt, f"http://127.0.0.1:{runner.addresses[0][1]}", http)
            payment = await mpesa_payment(rt, demo)
            await worker.run_once()  # the STK push; the payer approves, the callback comes
            await sim[STATE].idle()
        stored = await _payment(rt, payment.id)
        async with rt.sessionmaker() as s:
            [event] = (await s.execute(select(ProviderEvent))).scalars().all()
        assert stored.status == "COMPLETED" and stored.completed_at is not None
        sent = str(event.payload["TransactionDate"])
        assert stored.completed_at.astimezone(ZoneInfo("Africa/Nairobi")).strftime("%Y%m%d%H%M%S") == sent
    finally:
        await runner.cleanup()
