"""M-Pesa's 1001 ("a transaction is already in process for this subscriber") tells the member what to do.

Found walking a Kenyan SACCO: a member with another M-Pesa prompt still open on her phone paid again; Daraja refused
the push (500.001.1001, or ResultCode 1001 on the callback) and her SMS read "failed: the mobile money service had a
problem", though nothing was wrong with M-Pesa: she only had to finish or cancel the prompt already on her phone and
pay again. The stored reason said so; the SMS sorted it by its words "(M-Pesa service busy)" into a service fault."""

from __future__ import annotations

from typing import Any

import pytest

from channels.sms import templates
from channels.sms.catalogs import en
from channels.sms.templates import CATALOGS
from providers.mpesa.adapter import REASONS
from tests.channels.sms.helpers import make_payment, start_simulator
from tests.conftest import drain
from tests.core.test_provider_faults_mpesa import PUSH, _payment
from tests.providers.test_mpesa_review3 import LOCKED
from tests.providers.wires import MPESA_BASE, mpesa_adapter, mpesa_payment, mpesa_wire

PAYER = "+254708000001"


async def test_a_push_refused_for_a_prompt_already_on_her_phone_tells_her_to_finish_it(rt, demo, worker,
                                                                                        aiohttp_server):
    _server, sms = await start_simulator(aiohttp_server, rt)
    wire = mpesa_wire().on("POST", PUSH, 500, LOCKED)
    mpesa_adapter(rt, MPESA_BASE, wire.client())
    payment = await mpesa_payment(rt, demo, PAYER)
    await drain(worker)  # the collect job, then the SMS it queues
    assert (await _payment(rt, payment.id)).status == "FAILED"
    [text] = [m["message"] for m in sms.inbox.get(PAYER, [])]
    assert "failed: finish or cancel your other transaction. Ref: " in text and "to try again." in text
    assert en.REASONS["provider_error"] not in text


@pytest.mark.parametrize("language", sorted(CATALOGS))
@pytest.mark.parametrize("reason", [REASONS["1001"], f"{REASONS['1001']} (Daraja 500.001.1001)",
                                    "Unable to lock subscriber, a transaction is already in process for the current "
                                    "subscriber"], ids=["callback", "push_refused", "darajas_words"])
async def test_the_failed_sms_says_so_in_every_language(rt: Any, demo: dict[str, Any], language: str,
                                                        reason: str) -> None:
    """As the callback's ResultCode 1001, the refused push and Daraja's own words (a reason stored as Daraja gave
    it) store it, in each language the member may have chosen."""
    payment = await make_payment(rt, demo["cooperative_id"], account=PAYER, status="FAILED", failure_reason=reason)
    payload = {"template": "payment_failed", "context": {"payment_id": payment.id, "language": language},
               "phone_enc": rt.cipher.encrypt(PAYER, context="sms")}
    async with rt.sessionmaker() as session:
        _, said_in, body = await templates.build_message(session, rt.cipher, payload)
    assert said_in == language
    assert f": {CATALOGS[language].REASONS['other_transaction']}. " in body
    assert CATALOGS[language].REASONS["provider_error"] not in body
