"""RECEIPT of a payment refunded in part or in full: the receipt says what was refunded since.

It sent the plain receipt ("We received 50,000 RWF for ..."), which a member could show as proof of money her
cooperative no longer holds; STATUS and BALANCE already told the truth."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import update

from channels.sms.encoding import GSM7, measure
from core.models import Payment
from tests.channels.sms.helpers import jobs_of, make_payment
from tests.channels.sms.test_keyword_replies import ALINE, CLAUDINE, ERIC, JEAN, ask

PARTLY = {
    JEAN: ("RECEIPT", "We received 50,000 RWF for {type}. Refunded since: 12,500 RWF. Ref: {ref}. Txn: {txn}. "
                      "15/01/2026 23:30."),
    CLAUDINE: ("RECU", "Payé : 50 000 RWF pour {type}. Remboursé depuis : 12 500 RWF. Réf : {ref} ({txn}). "
                       "15/01/2026 23:30."),
    ALINE: ("INYEMEZABWISHYU", "Twakiriye 50,000 RWF ya {type}. Byasubijwe nyuma: 12,500 RWF. Nimero: {ref} ({txn}). "
                               "15/01/2026 23:30."),
    ERIC: ("RISITI", "Tumepokea 50,000 RWF kwa {type}. Imerudishwa baadaye: 12,500 RWF. Kumb: {ref} ({txn}). "
                     "15/01/2026 23:30"),
}


async def _refunded(rt: Any, demo: dict[str, Any], phone: str, status: str, refunded: int) -> Payment:
    """A payment of the member of `phone`, completed, then refunded `refunded` (a refund's completion leaves the
    payment so: core.refunds)."""
    paid = await make_payment(rt, demo["cooperative_id"], account=phone, member_id=demo["members"][phone])
    async with rt.sessionmaker.begin() as session:
        await session.execute(update(Payment).where(Payment.id == paid.id).values(status=status,
                                                                                  refunded_minor=refunded))
        return await session.get(Payment, paid.id)


@pytest.mark.parametrize("phone", [JEAN, CLAUDINE, ALINE, ERIC])
async def test_receipt_of_a_partly_refunded_payment_says_the_refund_in_her_language(
    rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any, worker: Any, phone: str,
) -> None:
    payment = await _refunded(rt, demo, phone, "PARTIALLY_REFUNDED", 12_500)
    keyword, expected = PARTLY[phone]
    async with rt.sessionmaker() as session:
        from core.models import PaymentType

        type_name = (await session.get(PaymentType, payment.payment_type_id)).name
    reply = await ask(sms_client, sim, worker, phone, f"{keyword} {payment.reference}", "rcpt-refunded")
    assert reply == expected.format(type=type_name, ref=payment.reference, txn=payment.provider_transaction_id)
    assert measure(reply).encoding == GSM7 and measure(reply).segments == 1
    [job] = await jobs_of(rt, "sms.send")
    assert job.payload["template"] == "payment_receipt_refunded"


async def test_receipt_of_a_fully_refunded_payment_says_all_of_it_went_back(
    rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any, worker: Any,
) -> None:
    payment = await _refunded(rt, demo, JEAN, "REFUNDED", 50_000)
    reply = await ask(sms_client, sim, worker, JEAN, f"RECEIPT {payment.reference}", "rcpt-refunded-all")
    assert reply.startswith("We received 50,000 RWF for ") and "Refunded since: 50,000 RWF." in reply, reply


async def test_receipt_of_a_payment_not_refunded_is_the_plain_receipt(
    rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any, worker: Any,
) -> None:
    payment = await make_payment(rt, demo["cooperative_id"], account=JEAN, member_id=demo["members"][JEAN])
    reply = await ask(sms_client, sim, worker, JEAN, f"RECEIPT {payment.reference}", "rcpt-plain")
    assert reply.startswith("We received 50,000 RWF for ") and "Kigali Heights Housing Cooperative" in reply
    assert "Refunded" not in reply
    [job] = await jobs_of(rt, "sms.send")
    assert job.payload["template"] == "payment_receipt"
