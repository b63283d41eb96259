"""What a payer is told about a payment whose outcome the provider never confirmed (TIMEOUT "provider status
unknown"), or whose money was taken after it failed: never "not approved" / "failed" alone, which would invite a
second payment; in the STATUS and RECEIPT replies, and on the USSD "my payments" screens, in every language."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import update

from channels.sms.catalogs import en, fr, rw, sw
from channels.ussd import i18n
from core.db import utcnow
from core.models import Payment
from core.provider_events import UNCONFIRMED_FLAG
from core.state.payment import UNCONFIRMED, PaymentStatus, shown_status
from tests.channels.sms.helpers import make_payment
from tests.channels.sms.test_routes import JEAN, inbound
from tests.conftest import drain

SHOWN = ("UNCONFIRMED", "TAKEN_AFTER_FAILURE", *(s.value for s in PaymentStatus))


def test_shown_status():
    now = utcnow()
    assert shown_status("TIMEOUT", UNCONFIRMED, None) == "UNCONFIRMED"
    assert shown_status("TIMEOUT", "not approved in time", None) == "TIMEOUT"
    assert shown_status("FAILED", "payer declined", now) == "TAKEN_AFTER_FAILURE"
    assert shown_status("FAILED", "payer declined", None) == "FAILED"
    assert shown_status("COMPLETED", None, now) == "COMPLETED"


@pytest.mark.parametrize("catalog", [en, fr, rw, sw], ids=["en", "fr", "rw", "sw"])
def test_every_shown_status_has_words(catalog: Any) -> None:
    assert set(SHOWN) <= set(catalog.PAYMENT_STATUS)
    lang = catalog.__name__.rsplit(".", 1)[-1]
    for status in SHOWN:
        assert i18n.has(lang, f"status.{status}"), (lang, status)


async def test_status_of_an_unconfirmed_payment(rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any,
                                                worker: Any) -> None:
    p = await make_payment(rt, demo["cooperative_id"], account=JEAN, status="TIMEOUT", failure_reason=UNCONFIRMED,
                           created_at=utcnow() - timedelta(days=1))
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Payment).where(Payment.id == p.id).values(mismatch=True,
                                                                         mismatch_detail=UNCONFIRMED_FLAG))
    await inbound(sms_client, JEAN, f"STATUS {p.reference}", "u-1")
    await drain(worker)
    [reply] = sim.messages(JEAN)
    assert "not confirmed by the provider; if money was taken it will be confirmed or refunded" in reply["message"]
    assert "not approved" not in reply["message"]


async def test_status_of_money_taken_after_a_failure(rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any,
                                                     worker: Any) -> None:
    p = await make_payment(rt, demo["cooperative_id"], account=JEAN, status="FAILED", failure_reason="payer declined",
                           created_at=utcnow() - timedelta(days=1))
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Payment).where(Payment.id == p.id).values(mismatch=True, collected_minor=50_000,
                                                                         completed_at=utcnow()))
    await inbound(sms_client, JEAN, f"STATUS {p.reference}", "u-2")
    await drain(worker)
    [reply] = sim.messages(JEAN)
    assert "failed, but the money was taken: your cooperative will count it or refund it" in reply["message"]


async def test_status_of_a_voided_recording(rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any,
                                            worker: Any) -> None:
    """A recording of money taken voided by the desk (collected 0, its completedAt kept): "not paid: recorded in
    error", with the amount asked (never "0 RWF of 50,000 RWF", which reads as a part payment)."""
    p = await make_payment(rt, demo["cooperative_id"], account=JEAN, status="VOIDED",
                           failure_reason="recording voided: wrong statement line",
                           created_at=utcnow() - timedelta(days=1))
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Payment).where(Payment.id == p.id).values(collected_minor=0,
                                                                         completed_at=utcnow() - timedelta(hours=1)))
    await inbound(sms_client, JEAN, f"STATUS {p.reference}", "u-3")
    await inbound(sms_client, JEAN, f"RECEIPT {p.reference}", "u-4")
    await drain(worker)
    replies = [m["message"] for m in sim.messages(JEAN)]
    assert len(replies) == 2
    for reply in replies:
        assert "50,000 RWF" in reply and "not paid: recorded in error" in reply, reply
        assert "0 RWF of" not in reply, reply
