"""The member's "refund failed" SMS says why in the refund's own words. It was sorted through the payment's reasons:
an admin's note that the cooperative cancelled it read "you declined the request", and the cooperative's
disbursement account short of money read "not enough money on the account"."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select, update

from channels.sms.catalogs import en, fr, rw, sw
from channels.sms.encoding import GSM7, measure
from channels.sms.templates import CATALOGS, build_message, refund_reason_key, render
from core.audit import Actor
from core.models import OutboxJob, Refund
from core.ports import ProviderOutcome
from core.refunds import apply_refund_outcome, record_refund_outcome, request_refund
from providers.mtn_momo.adapter import REASON_WORDS as MTN_WORDS
from tests.channels.sms.helpers import make_payment

ADMIN = Actor("admin:test", "api")
ENGLISH_MEMBER = "+250788000002"  # Jean Bosco, English (core.demo)


@pytest.mark.parametrize("reason", [
    "recorded by an admin: the cooperative cancelled it, paid in cash at the office",
    "recorded by an admin: MTN rejected it: account limit",
    "recorded by an admin: member says not enough money arrived, declined by MTN, internal error",
    "withdrawn by an admin: MTN reversed it itself",
    None,
    "failed",
])
def test_a_persons_note_or_no_word_is_the_neutral_reason(reason: str | None) -> None:
    assert refund_reason_key(reason) == "not_sent"


def test_every_mtn_reason_has_the_refunds_wording() -> None:
    # The adapter's words (what a refund stores) and the bare codes (as a poll may store them): in a refund the
    # "payer" is the cooperative's disbursement account, and the member declined nothing.
    expected = {
        "APPROVAL_REJECTED": "not_sent",
        "EXPIRED": "not_sent",
        "PAYER_NOT_FOUND": "not_sent",
        "PAYEE_NOT_FOUND": "receiving_account",
        "NOT_ENOUGH_FUNDS": "not_sent",
        "PAYER_LIMIT_REACHED": "not_sent",
        "COULD_NOT_PERFORM_TRANSACTION": "provider_error",
        "INTERNAL_PROCESSING_ERROR": "provider_error",
        "SERVICE_UNAVAILABLE": "provider_error",
        "TRANSACTION_CANCELED": "not_sent",
    }
    assert {code: refund_reason_key(words) for code, words in MTN_WORDS.items()} == expected
    assert {code: refund_reason_key(code) for code in MTN_WORDS} == expected


@pytest.mark.parametrize("catalog", [en, fr, rw, sw], ids=["en", "fr", "rw", "sw"])
def test_every_refund_reason_is_worded_in_every_language_and_fits(catalog: Any) -> None:
    assert set(catalog.REFUND_REASONS) == {"not_sent", "receiving_account", "provider_error"}
    language = next(code for code, module in CATALOGS.items() if module is catalog)
    for reason in catalog.REFUND_REASONS.values():
        body = render("refund_failed", language, {"amount": "1,250,000 RWF", "payment_ref": "PAY_20260115_000123",
                                                  "coop": "Kigali Heights Housing Coop", "ref": "RFD_20260115_000124",
                                                  "reason": reason})
        size = measure(body)
        assert size.encoding == GSM7, body
        assert size.segments <= 2, body


async def _refund_failed_sms(rt: Any, demo: dict[str, Any], fail: Any) -> str:
    """The SMS the member gets when `fail(session, refund)` ends her refund FAILED."""
    payment = await make_payment(rt, demo["cooperative_id"], account=ENGLISH_MEMBER,
                                 member_id=demo["members"][ENGLISH_MEMBER])
    async with rt.sessionmaker.begin() as s:
        refund, _ = await request_refund(s, rt, payment_id=payment.id, cooperative_id=payment.cooperative_id,
                                         amount=None, reason="paid twice", idempotency_key=f"refund-{payment.id}",
                                         actor=ADMIN)
        # Sent, its answer never came and its poll was parked: a person, or the provider's late word, settles it.
        await s.execute(update(Refund).where(Refund.id == refund.id).values(status="PROCESSING"))
        await s.execute(update(OutboxJob).where(OutboxJob.dedupe_key == f"refund:{refund.id}").values(status="DONE"))
    async with rt.sessionmaker.begin() as s:
        await fail(s, await s.get(Refund, refund.id))
    async with rt.sessionmaker() as s:
        job = (await s.execute(select(OutboxJob).where(OutboxJob.dedupe_key == f"sms:refund_failed:{refund.id}"))
               ).scalar_one()
        _phone, language, body = await build_message(s, rt.cipher, job.payload)
    assert language == "en"
    return body


async def test_an_admins_note_is_never_read_as_the_members_doing(rt: Any, demo: dict[str, Any]) -> None:
    async def recorded_failed(s: Any, refund: Refund) -> None:
        await record_refund_outcome(s, rt, refund_id=refund.id, cooperative_id=refund.cooperative_id,
                                    succeeded=False, actor=ADMIN,
                                    note="the cooperative cancelled it, paid in cash at the office")

    body = await _refund_failed_sms(rt, demo, recorded_failed)
    assert "failed: the refund could not be sent. Your cooperative will contact you." in body, body
    assert "declined" not in body


async def test_the_cooperatives_account_short_of_money_is_not_the_members(rt: Any, demo: dict[str, Any]) -> None:
    async def mtn_says_not_enough_funds(s: Any, refund: Refund) -> None:
        await apply_refund_outcome(s, rt, refund, ProviderOutcome.FAILED, actor=Actor("provider:mtn_momo", "provider"),
                                   reason=MTN_WORDS["NOT_ENOUGH_FUNDS"])

    body = await _refund_failed_sms(rt, demo, mtn_says_not_enough_funds)
    assert "failed: the refund could not be sent. Your cooperative will contact you." in body, body
    assert "not enough money" not in body


async def test_an_account_that_cannot_receive_it_is_said_so(rt: Any, demo: dict[str, Any]) -> None:
    async def mtn_says_no_payee(s: Any, refund: Refund) -> None:
        await apply_refund_outcome(s, rt, refund, ProviderOutcome.FAILED, actor=Actor("provider:mtn_momo", "provider"),
                                   reason=MTN_WORDS["PAYEE_NOT_FOUND"])

    body = await _refund_failed_sms(rt, demo, mtn_says_no_payee)
    assert "failed: your account could not receive it. Your cooperative will contact you." in body, body
