"""A mobile-money push through IremboPay that the payer does not approve: IremboPay's invoice turns FAILED, and its
webhook and status say no more than that (PROTOCOLS.md: paymentStatus, no reason). Her SMS says what that status
tells: the request was declined or not approved. Before, the adapter stored "payment failed", which the SMS's
reason sorter could not place: she read "failed: the payment was not completed", which only repeats "failed"."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from channels.sms import templates
from channels.sms.catalogs import en
from channels.sms.encoding import GSM7, measure
from channels.sms.templates import CATALOGS, reason_key
from core.ports import InboundCallback, ProviderOutcome
from tests.admin_api.conftest import Caller, Irembo, payment_body
from tests.admin_api.test_irembopay_bank_walk import _signed
from tests.channels.sms.helpers import make_payment, start_simulator
from tests.conftest import drain
from tests.providers.wires import due_now

DECLINES = "+250788000002"  # the simulators' payer whose prompt ends without her money


async def test_a_push_she_does_not_approve_texts_her_that_it_was_declined_or_not_approved(
        admin: Caller, rt: Any, demo: dict[str, Any], worker: Any, irembo: Irembo, aiohttp_server: Any) -> None:
    _server, sms = await start_simulator(aiohttp_server, rt)
    created = await admin.json("POST", "/v1/payments", 201,
                               json=payment_body(demo["payment_types"]["Monthly Rent"], paymentAccount=DECLINES))
    await drain(worker)  # the invoice and the push
    # The simulator settles the push in the background: polled until it has (a loaded machine may take a while).
    for _ in range(200):
        await due_now(rt, "payment.poll")
        await drain(worker)  # the poll finds the invoice FAILED; the SMS it queues
        failed = await admin.json("GET", f"/v1/payments/{created['id']}", 200)
        if failed["status"] != "PROCESSING":
            break
        await asyncio.sleep(0.05)
    assert failed["status"] == "FAILED"
    [text] = [m["message"] for m in sms.inbox.get(DECLINES, [])]
    assert f"failed: {en.REASONS['declined_or_not_approved']}." in text, text
    assert en.REASONS["unknown"] not in text


async def test_the_failed_webhook_carries_the_same_reason(irembo: Irembo, rt: Any) -> None:
    adapter = rt.providers["irembopay"]
    signed = _signed({"amount": 50000, "invoiceNumber": "880100000001", "transactionId": "T-1",
                      "paymentStatus": "FAILED", "paymentMethod": "MOMO_MTN", "currency": "RWF"})
    event = adapter.parse_callback(InboundCallback(method="POST", headers=signed["headers"], query={},
                                                   body=signed["data"]))
    assert event.outcome is ProviderOutcome.FAILED
    assert reason_key(event.reason) == "declined_or_not_approved"


@pytest.mark.parametrize("language", sorted(CATALOGS))
async def test_said_in_every_language_within_gsm7(rt: Any, demo: dict[str, Any], language: str) -> None:
    from providers.irembopay.adapter import FAILED_REASON

    payment = await make_payment(rt, demo["cooperative_id"], account=DECLINES, status="FAILED",
                                 failure_reason=FAILED_REASON)
    payload = {"template": "payment_failed", "context": {"payment_id": payment.id, "language": language},
               "phone_enc": rt.cipher.encrypt(DECLINES, context="sms")}
    async with rt.sessionmaker() as session:
        _, said_in, body = await templates.build_message(session, rt.cipher, payload)
    reason = CATALOGS[language].REASONS["declined_or_not_approved"]
    assert said_in == language and f": {reason}. " in body
    assert measure(reason).encoding == GSM7
