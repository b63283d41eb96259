"""What the member reads, the same on USSD and by SMS: a payment she did not approve in time is said so in both
(the USSD said "Expired"), French writes "Réf :" in both (the SMS wrote "Réf:"), and a payment whose complaint is
open already is said so when she picks it, not after she chose a reason. On PostgreSQL and on the embedded SQLite."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

from channels.sms import templates
from core.models import Dispute, OutboxJob, Payment
from tests.channels.ussd.helpers import AtPhone
from tests.channels.ussd.test_flows_africastalking import EN_MTN, FR_AIRTEL, RW_MTN, SW_AIRTEL, _pay, option

# Her phone, the status line the list and the detail show, and the detail's "Status" label, in her language.
NOT_APPROVED = {
    EN_MTN: ("Not approved in time", "Status: Not approved in time"),
    FR_AIRTEL: ("Non approuvé à temps", "Statut : Non approuvé à temps"),
    RW_MTN: ("Ntibyemejwe ku gihe", "Uko bihagaze: Ntibyemejwe ku gihe"),
    SW_AIRTEL: ("Haikuthibitishwa kwa wakati", "Hali: Haikuthibitishwa kwa wakati"),
}
# The same payment by SMS: the timeout notice and the STATUS reply.
TIMEOUT_SMS = {
    EN_MTN: "Payment of 50,000 RWF for Monthly Rent was not approved in time. Ref: {ref}. "
            "Dial *384*123*123# to try again.",
    FR_AIRTEL: "Paiement de 50 000 RWF pour Monthly Rent n'a pas été approuvé à temps. Réf : {ref}. "
               "Recomposez *384*123*123#.",
    RW_MTN: "Kwishyura 50,000 RWF ya Monthly Rent ntibyemejwe ku gihe. Nimero: {ref}. "
            "Ongera ugerageze ukanda *384*123*123#.",
    SW_AIRTEL: "Malipo ya 50,000 RWF kwa Monthly Rent hayakuthibitishwa kwa wakati. Kumb: {ref}. "
               "Piga *384*123*123# kulipa tena.",
}


async def _timed_out(client: Any, rt: Any, phone_number: str) -> Payment:
    """Her USSD payment, which she let lapse: TIMEOUT "not approved in time", as the worker records it."""
    await _pay(client, phone_number)
    async with rt.sessionmaker.begin() as s:
        payment = (await s.execute(select(Payment).order_by(Payment.created_at.desc()).limit(1))).scalar_one()
        # Test set-up only; the app moves status through core.state.
        payment.status, payment.failure_reason = "TIMEOUT", "not approved in time"
    return payment


@pytest.mark.parametrize("number", sorted(NOT_APPROVED))
async def test_a_payment_not_approved_in_time_is_said_so_on_ussd_as_by_sms(client: Any, demo: Any, db: Any,
                                                                           rt: Any, number: str) -> None:
    payment = await _timed_out(client, rt, number)
    status, detail_line = NOT_APPROVED[number]
    phone = AtPhone(client, number)
    await phone.dial()
    listing = await phone.send("2")
    amount = "50 000 RWF" if number == FR_AIRTEL else "50,000 RWF"  # French groups digits with spaces
    assert f"{amount} Monthly Rent {status} {payment.reference}" in listing, listing
    detail = await phone.send(option(listing, payment.reference))
    assert detail_line in detail.split("\n"), detail
    assert "Expired" not in detail and "Expiré" not in detail
    await phone.send("1")  # her status by SMS: the words the USSD showed
    job = await db.one(OutboxJob, OutboxJob.kind == "sms.send")
    async with rt.sessionmaker() as session:
        _, _, reply = await templates.build_message(session, rt.cipher, job.payload)
        payload = {**job.payload, "template": "payment_timeout"}
        _, _, notice = await templates.build_message(session, rt.cipher, payload)
    assert f" - {status.lower()}. " in reply, reply  # the STATUS reply's words, as the screen's
    assert notice == TIMEOUT_SMS[number].format(ref=payment.reference), notice


async def test_french_writes_ref_with_the_space_before_its_colon_on_ussd_and_by_sms(client: Any, demo: Any,
                                                                                    db: Any, rt: Any) -> None:
    phone = AtPhone(client, FR_AIRTEL)
    await phone.dial()
    types = await phone.send("1")
    confirm = await phone.send(option(types, "Monthly Rent"))
    assert "\nRéf : PAY_" in confirm, confirm
    await phone.send("1")
    payment = await db.one(Payment)
    async with rt.sessionmaker.begin() as s:
        row = await s.get(Payment, payment.id)
        row.status, row.provider_transaction_id = "COMPLETED", "AIRTEL-TX-1"  # test set-up only
    payload = {"template": "payment_receipt", "cooperative_id": payment.cooperative_id,
               "member_id": payment.member_id, "context": {"payment_id": payment.id},
               "phone_enc": rt.cipher.encrypt(FR_AIRTEL, context="sms")}
    async with rt.sessionmaker() as session:
        _, _, receipt = await templates.build_message(session, rt.cipher, payload)
    assert receipt.startswith(f"Payé : 50 000 RWF pour Monthly Rent, Kigali Heights Housing Cooperative. "
                              f"Réf : {payment.reference} (AIRTEL-TX-1). "), receipt
    assert "Réf:" not in receipt


async def test_a_payment_with_an_open_complaint_is_said_so_when_she_picks_it(client: Any, demo: Any,
                                                                             db: Any) -> None:
    """The reasons are not offered for a payment whose complaint is open: she is told its reference at once."""
    await _pay(client, FR_AIRTEL)
    payment = await db.one(Payment)
    first = AtPhone(client, FR_AIRTEL)
    await first.dial()
    await first.send("3")
    await first.send("1")
    done = await first.send("2")
    dispute = await db.one(Dispute)
    assert done.startswith(f"END Réclamation {dispute.reference} ouverte."), done
    again = AtPhone(client, FR_AIRTEL)
    await again.dial()
    pick = await again.send("3")
    told = await again.send(option(pick, payment.reference))
    assert told == f"END Une réclamation est déjà ouverte pour ce paiement : {dispute.reference}."
    assert await db.count(Dispute) == 1


async def test_two_sessions_at_the_reasons_open_one_complaint(client: Any, demo: Any, db: Any) -> None:
    """Both picked the payment before either chose a reason (no complaint yet: both see the reasons): the first
    opens it, the second is told it is open, by open_dispute's own check."""
    await _pay(client, EN_MTN)
    one, two = AtPhone(client, EN_MTN), AtPhone(client, EN_MTN)
    for phone in (one, two):
        await phone.dial()
        await phone.send("3")
        assert (await phone.send("1")).startswith("CON What went wrong?")
    assert (await one.send("1")).startswith("END Complaint DSP_")
    dispute = await db.one(Dispute)
    assert await two.send("2") == f"END A complaint is already open for this payment: {dispute.reference}."
    assert await db.count(Dispute) == 1


async def test_a_resumed_session_at_the_reasons_says_the_complaint_opened_since_at_once(client: Any, demo: Any,
                                                                                      db: Any, rt: Any) -> None:
    """Her session was lost at the reasons (she had picked the payment); the office opened a complaint about that
    payment meanwhile (she called it). Dialling again and continuing where she left off, she is told at once that it
    is open, as picking the payment tells her, not shown the reasons to choose one for nothing."""
    from core.audit import Actor
    from core.disputes import open_dispute

    await _pay(client, EN_MTN)
    payment = await db.one(Payment)
    lost = AtPhone(client, EN_MTN)
    await lost.dial()
    pick = await lost.send("3")
    assert (await lost.send(option(pick, payment.reference))).startswith("CON What went wrong?")
    # No complaint yet: continuing shows the reasons, as before (and this session is lost there too).
    resumed = AtPhone(client, EN_MTN)
    assert (await resumed.dial()).startswith("CON You did not finish your last session.")
    assert (await resumed.send("1")).startswith("CON What went wrong?")
    async with rt.sessionmaker.begin() as s:  # the office's desk, while her session was gone
        row = await s.get(Payment, payment.id)
        dispute = await open_dispute(s, payment=row, reason="WRONG_AMOUNT", channel="api",
                                     actor=Actor("admin:desk", "api"), cipher=rt.cipher, answer_days=30)
    again = AtPhone(client, EN_MTN)
    assert (await again.dial()).startswith("CON You did not finish your last session.")
    told = await again.send("1")  # Continue where you left off
    assert told == f"END A complaint is already open for this payment: {dispute.reference}.", told
    assert await db.count(Dispute) == 1
