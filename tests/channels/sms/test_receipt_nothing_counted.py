"""A payment completed with money the provider reported taken that the gateway cannot count (40.00 USD taken for a
50,000 RWF payment, a negative or zero amount: collected 0, flagged for a person, as the README documents): her
wallet was charged, and her receipt said "We received 0 RWF of 50,000 RWF" ("Twakiriye 0 RWF aho kuba 50,000 RWF").
It says the payment was received and that her cooperative reviews it, with no figure that is not what was taken; so
do her STATUS and RECEIPT replies. The data stays (collectedAmount 0, the mismatch and its detail)."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

from channels.sms.catalogs import en, fr, rw, sw
from channels.sms.encoding import GSM7, measure
from core.audit import Actor
from core.models import Member, Payment, SmsMessage
from core.money import Money
from core.ports import ProviderOutcome
from core.provider_events import apply_collection_outcome
from tests.channels.sms.helpers import make_payment
from tests.channels.sms.test_routes import inbound
from tests.conftest import drain

PROVIDER = Actor("provider:test", "provider")
ALINE = "+250788000001"
CATALOGS = {"en": en, "fr": fr, "rw": rw, "sw": sw}


async def _completed_with(rt: Any, demo: dict[str, Any], taken: Money, language: str) -> Payment:
    member_id = demo["members"][ALINE]
    async with rt.sessionmaker.begin() as s:
        await s.execute(Member.__table__.update().where(Member.id == member_id).values(language=language))
    payment = await make_payment(rt, demo["cooperative_id"], account=ALINE, member_id=member_id, status="PENDING")
    async with rt.sessionmaker.begin() as s:
        result = await apply_collection_outcome(s, rt, await s.get(Payment, payment.id), ProviderOutcome.SUCCEEDED,
                                                actor=PROVIDER, amount=taken, provider_transaction_id="MTN-TX-1")
    assert result == "completed"
    async with rt.sessionmaker() as s:
        row = await s.get(Payment, payment.id)
        assert row is not None
        assert (row.status, row.collected_minor, row.mismatch) == ("COMPLETED", 0, True)  # the data is kept
        return row


@pytest.mark.parametrize("language", sorted(CATALOGS))
@pytest.mark.parametrize("taken", [Money(40_00, "USD"), Money(-50_000, "RWF"), Money(0, "RWF")],
                         ids=["another-currency", "negative", "zero"])
async def test_her_receipt_states_no_false_amount(rt: Any, demo: dict[str, Any], sim: Any, worker: Any,
                                                  language: str, taken: Money) -> None:
    payment = await _completed_with(rt, demo, taken, language)
    await drain(worker)
    async with rt.sessionmaker() as s:
        [receipt] = (await s.execute(select(SmsMessage).where(SmsMessage.template == "payment_receipt"))).scalars()
    body = receipt.body
    assert receipt.language == language
    assert CATALOGS[language].AMOUNT_IN_REVIEW in body, body
    assert " 0 RWF" not in body and "50,000" not in body and "50 000" not in body, body  # no false figure
    assert "USD" not in body and "40.00" not in body and "40,00" not in body, body
    assert payment.reference in body and "MTN-TX-1" in body, body
    assert measure(body).encoding == GSM7 and measure(body).segments <= 2


@pytest.mark.parametrize("language", sorted(CATALOGS))
async def test_her_status_and_receipt_replies_state_no_false_amount(rt: Any, demo: dict[str, Any], sms_client: Any,
                                                                    sim: Any, worker: Any, language: str) -> None:
    payment = await _completed_with(rt, demo, Money(40_00, "USD"), language)
    await drain(worker)
    await inbound(sms_client, ALINE, f"STATUS {payment.reference}", "u-status")
    await inbound(sms_client, ALINE, f"RECEIPT {payment.reference}", "u-receipt")
    await drain(worker)
    replies = [m["message"] for m in sim.messages(ALINE)]
    assert len(replies) == 3, replies  # the receipt, then both replies
    for reply in replies:
        assert CATALOGS[language].AMOUNT_IN_REVIEW in reply, reply
        assert " 0 RWF" not in reply and "USD" not in reply, reply
