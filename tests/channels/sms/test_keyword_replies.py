"""Replies to keyword SMS as members of each language write them, through POST /sms/africastalking/inbound and
the simulator (findings of a localisation reviewer fluent in en, rw, fr and sw): STATUS or RECEIPT without a
reference, a reference typed with spaces or dashes, the receipt word of the Kinyarwanda USSD menu, and the
wording of the replies."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from channels.sms import templates
from channels.sms.encoding import GSM7, measure
from channels.sms.routes import fold, parse_keyword
from channels.sms.templates import CATALOGS, render
from core.models import Payment
from core.money import Money
from providers.mpesa.adapter import account_reference
from tests.channels.sms.helpers import jobs_of, make_payment
from tests.channels.sms.test_routes import inbound
from tests.conftest import drain

ALINE, JEAN, CLAUDINE, ERIC = "+250788000001", "+250788000002", "+250733000001", "+250733000002"  # rw en fr sw
USSD_LOCALES = Path(__file__).parents[3] / "channels" / "ussd" / "locale"


async def ask(sms_client: Any, sim: Any, worker: Any, phone: str, text: str, message_id: str) -> str:
    """The reply the simulator received for one inbound text."""
    before = len(sim.messages(phone))
    await inbound(sms_client, phone, text, message_id)
    await drain(worker)
    replies = sim.messages(phone)[before:]
    assert len(replies) == 1, replies
    return str(replies[0]["message"])


# ------------------------------------------------------------------------- STATUS or RECEIPT with no reference

HOW_TO_ASK = {
    "en": ("Send STATUS followed by the reference, e.g. STATUS PAY_20260115_001.",
           "Send RECEIPT followed by the reference, e.g. RECEIPT PAY_20260115_001."),
    "rw": ("Ohereza IMIMERERE ukurikizaho nimero y'ubwishyu, urugero IMIMERERE PAY_20260115_001.",
           "Ohereza INYEMEZABWISHYU ukurikizaho nimero y'ubwishyu, urugero INYEMEZABWISHYU PAY_20260115_001."),
    "fr": ("Envoyez STATUT suivi de la référence, ex. STATUT PAY_20260115_001.",
           "Envoyez RECU suivi de la référence, ex. RECU PAY_20260115_001."),
    "sw": ("Tuma HALI ikifuatiwa na kumbukumbu, mfano HALI PAY_20260115_001.",
           "Tuma RISITI ikifuatiwa na kumbukumbu, mfano RISITI PAY_20260115_001."),
}


@pytest.mark.parametrize(("phone", "texts", "language"), [
    (JEAN, ("STATUS", "receipt", "status please"), "en"),
    (ALINE, ("IMIMERERE", "inyemezabwishyu", "STATUS"), "rw"),  # STATUS from a rw member: answered in rw
    (CLAUDINE, ("STATUT", "Reçu PAY_1", "statut ?"), "fr"),  # PAY_1 is no reference: not "Aucun paiement PAY_1"
    (ERIC, ("HALI", "Risiti tafadhali", "Hali gani"), "sw"),  # "Hali gani": "how are you", HALI is STATUS
])
async def test_status_or_receipt_without_a_reference_says_how_to_ask(
    rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any, worker: Any, phone: str, texts: tuple[str, ...],
    language: str,
) -> None:
    """The keyword alone was answered "no payment -", a word after it "no payment GANI": she has a payment, and
    is told instead how to ask, in the language she wrote in, naming that language's keyword."""
    await make_payment(rt, demo["cooperative_id"], account=phone, member_id=demo["members"][phone])
    status, receipt = HOW_TO_ASK[language]
    replies = [await ask(sms_client, sim, worker, phone, text, f"{language}-{i}") for i, text in enumerate(texts)]
    assert replies == [status, receipt, status]


@pytest.mark.parametrize("language", sorted(CATALOGS))
def test_how_to_ask_names_a_keyword_of_its_language_in_one_gsm7_sms(language: str) -> None:
    for command, text in zip(("STATUS", "RECEIPT"), HOW_TO_ASK[language], strict=True):
        body = render(f"no_reference_{command.lower()}", language, {})
        assert body == text
        assert measure(body).encoding == GSM7 and measure(body).segments == 1, body
        # The keyword it names, and the example it gives, are read back as that command and reference.
        assert parse_keyword(" ".join(body.split()[-2:])) == (command, language, "PAY_20260115_001")


async def test_one_reply_per_inbound_id_without_a_reference(
    rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any, worker: Any
) -> None:
    for _ in range(3):  # the aggregator retried
        await inbound(sms_client, ERIC, "HALI", "same-id")
    await drain(worker)
    assert [m["message"] for m in sim.messages(ERIC)] == [HOW_TO_ASK["sw"][0]]
    assert [j.payload["template"] for j in await jobs_of(rt, "sms.send")] == ["no_reference_status"]


# ------------------------------------------------------------------------------ references as they are typed


@pytest.mark.parametrize(("text", "expected"), [
    ("RISITI PAY 20260115 123456", ("RECEIPT", "sw", "PAY_20260115_123456")),
    ("RISITI PAY-20260115-123456", ("RECEIPT", "sw", "PAY_20260115_123456")),
    ("risiti pay20260115123456", ("RECEIPT", "sw", "PAY_20260115_123456")),
    ("STATUS PAY 2026 01 15 001", ("STATUS", "en", "PAY_20260115_001")),
    ("STATUS PAY__20260115__001", ("STATUS", "en", "PAY_20260115_001")),
    ("status of PAY_20260115_001 please", ("STATUS", "en", "PAY_20260115_001")),
    ("STATUT PAY 20260115 001 merci", ("STATUS", "fr", "PAY_20260115_001")),
    ("STATUS RFD 20260115 002", ("STATUS", "en", "RFD_20260115_002")),
    # The account M-Pesa names on the payer's prompt and confirmation SMS (providers.mpesa.adapter.account_reference)
    ("RISITI 20261203018", ("RECEIPT", "sw", "PAY_20261203_018")),
    ("risiti ya 202612031234 tafadhali", ("RECEIPT", "sw", "PAY_20261203_1234")),
    ("STATUS 26112212345", ("STATUS", "en", "PAY_20261122_12345")),
    ("STATUS 254712345678", ("STATUS", "en", "254712345678")),  # a phone number: no date in it
    # A phone number that reads as a date (a Rwandan Airtel number: 22 July 2025 and 123456) is no account either
    ("STATUS 250722123456", ("STATUS", "en", "250722123456")),
    ("status call me on 250731234567", ("STATUS", "en", "CALL ME ON 250731234567")),
    ("STATUS 20261341018", ("STATUS", "en", "20261341018")),  # no such day
    ("risiti sf65ec9797", ("RECEIPT", "sw", "SF65EC9797")),  # her M-Pesa confirmation's receipt
    ("RISITI SF65EC9797 Confirmed. Ksh1,000.00 sent to NYERI SACCO", ("RECEIPT", "sw", "SF65EC9797")),
    ("Hali gani", ("STATUS", "sw", "GANI")),  # no reference: the route tells how to ask
    ("STATUS", ("STATUS", "en", None)),
])
def test_the_reference_is_rebuilt_from_the_words_after_the_keyword(text: str, expected: tuple[Any, ...]) -> None:
    assert parse_keyword(text) == expected


@pytest.mark.parametrize("shape", [
    lambda r: r.replace("_", " "),
    lambda r: r.replace("_", "-"),
    lambda r: r.replace("_", "").lower(),
])
async def test_a_reference_typed_with_spaces_or_dashes_finds_the_payment(
    rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any, worker: Any, shape: Any
) -> None:
    """"_" is deep in a feature phone's symbols: she types spaces or dashes; the reply was "no payment PAY"."""
    paid = await make_payment(rt, demo["cooperative_id"], account=ERIC, member_id=demo["members"][ERIC])
    receipt = await ask(sms_client, sim, worker, ERIC, f"RISITI {shape(paid.reference)}", "r1")
    assert receipt.startswith("Tumepokea ") and f"Kumb: {paid.reference} (" in receipt, receipt
    status = await ask(sms_client, sim, worker, JEAN, f"STATUS {shape(paid.reference)}", "s1")
    assert status == render("not_found", "en", {"ref": paid.reference})  # Eric's payment: not Jean's to ask


async def test_a_phone_number_after_the_keyword_is_no_reference(
    rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any, worker: Any
) -> None:
    """A number typed after STATUS that is a phone number, though its digits read as an M-Pesa account's date and
    number (250722123456: 22 July 2025, 123456), was answered "no payment PAY_20250722_123456", a reference she
    never typed; she is told how to ask, as for any other words."""
    await make_payment(rt, demo["cooperative_id"], account=JEAN, member_id=demo["members"][JEAN])
    assert await ask(sms_client, sim, worker, JEAN, "STATUS 250722123456", "ph1") == HOW_TO_ASK["en"][0]


async def test_the_account_number_on_her_m_pesa_sms_finds_the_payment(
    rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any, worker: Any
) -> None:
    """Found walking a Kenyan SACCO: M-Pesa's prompt and confirmation SMS name the payment by its account number
    (PAY_20261203_018 as 20261203018, Daraja's 12 characters), the number she keeps; "RISITI 20261203018" was
    answered with how to ask ("send RISITI followed by the reference")."""
    paid = await make_payment(rt, demo["cooperative_id"], account=ERIC, member_id=demo["members"][ERIC])
    receipt = await ask(sms_client, sim, worker, ERIC, f"RISITI {account_reference(paid.reference)}", "mp1")
    assert receipt.startswith("Tumepokea ") and f"Kumb: {paid.reference} (" in receipt, receipt
    # Or the receipt her M-Pesa confirmation SMS begins with, which the payment holds once Daraja's callback came;
    # another number's receipt is not found (as another's reference is not).
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Payment).where(Payment.id == paid.id).values(provider_transaction_id="SF65EC9797"))
    receipt = await ask(sms_client, sim, worker, ERIC, "risiti SF65EC9797 Confirmed. Ksh150.00 sent", "mp2")
    assert receipt.startswith("Tumepokea ") and f"Kumb: {paid.reference} (SF65EC9797)." in receipt, receipt
    status = await ask(sms_client, sim, worker, JEAN, "STATUS SF65EC9797", "mp3")
    assert status == render("not_found", "en", {"ref": "SF65EC9797"})


async def test_a_made_up_reference_typed_with_spaces_is_not_found_as_issued(
    rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any, worker: Any
) -> None:
    reply = await ask(sms_client, sim, worker, JEAN, "STATUS PAY 20260115 999999", "m1")
    assert reply == "No payment PAY_20260115_999999 found for this phone number."


# ----------------------------------------------------------------------------------------------- wording


async def test_kinyarwanda_receipt_word_of_the_ussd_menu_is_a_keyword(
    rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any, worker: Any
) -> None:
    """USSD offers "inyemezabwishyu" (my.receipt); the SMS keywords had only INYEMEZABUGUZI and INYEMEZA."""
    paid = await make_payment(rt, demo["cooperative_id"], account=ALINE, member_id=demo["members"][ALINE])
    reply = await ask(sms_client, sim, worker, ALINE, f"Inyemezabwishyu {paid.reference}", "i1")
    assert reply.startswith("Twakiriye 50,000 RWF ") and paid.reference in reply, reply
    for old in ("INYEMEZABUGUZI", "INYEMEZA"):  # the words that worked still do
        assert parse_keyword(f"{old} {paid.reference}") == ("RECEIPT", "rw", paid.reference)
    help_ = await ask(sms_client, sim, worker, ALINE, "UBUFASHA", "h1")
    assert "SMS: INYEMEZABWISHYU <nimero>, IMIMERERE <nimero>" in help_, help_
    ussd_words = json.loads((USSD_LOCALES / "rw.json").read_text(encoding="utf-8"))["my.receipt"].split()
    assert fold("INYEMEZABWISHYU") in {fold(word) for word in ussd_words}


async def test_swahili_status_of_a_cancelled_payment_says_cancelled_not_suspended(
    rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any, worker: Any
) -> None:
    paid = await make_payment(rt, demo["cooperative_id"], account=ERIC, member_id=demo["members"][ERIC],
                              status="CANCELLED")
    reply = await ask(sms_client, sim, worker, ERIC, f"HALI {paid.reference}", "c1")
    assert reply.startswith(f"Malipo {paid.reference}: ") and " - imeghairiwa. Tarehe: " in reply, reply
    assert "imesitishwa" not in reply
    ussd = json.loads((USSD_LOCALES / "sw.json").read_text(encoding="utf-8"))["status.CANCELLED"]
    assert ussd.lower() == "imeghairiwa"  # as the USSD says it


@pytest.mark.parametrize(("phone", "text", "says"), [
    (CLAUDINE, "AIDE", "STOP (fin des rappels), START."),  # was "STOP (rappels)": STOP for reminders
    (ERIC, "MSAADA", "SITISHA (kusimamisha vikumbusho), ANZA."),  # was "SITISHA (vikumbusho)"
])
async def test_help_says_stop_ends_the_reminders(
    rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any, worker: Any, phone: str, text: str, says: str
) -> None:
    reply = await ask(sms_client, sim, worker, phone, text, "help")
    assert reply.endswith(says), reply
    [row] = sim.messages(phone)
    assert measure(row["message"]).encoding == GSM7 and measure(row["message"]).segments == 1


# ----------------------------------------------------- HELP, or a word not understood, from a member who cannot pay


@pytest.mark.parametrize(("text", "template"), [("HELP", "help_inactive"), ("what now", "unknown_inactive")])
@pytest.mark.parametrize("suspended", ["cooperative", "member", "pending"])
@pytest.mark.parametrize(("phone", "language"), [(JEAN, "en"), (ALINE, "rw"), (CLAUDINE, "fr"), (ERIC, "sw")])
async def test_help_to_a_member_who_cannot_pay_names_no_code_and_says_why(
    rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any, worker: Any, phone: str, language: str, suspended: str,
    text: str, template: str,
) -> None:
    """Her cooperative suspended (or she, or she is still awaiting approval): HELP told her "Dial *384*123# to pay",
    and a word not understood "Send HELP or dial *384*123#", and dialling it cannot pay (USSD tells her that her
    membership is not active, or awaits approval). Each reply says so, in her language, and names no code."""
    from sqlalchemy import update

    from core.models import Cooperative, Member

    async with rt.sessionmaker.begin() as s:
        if suspended == "cooperative":
            await s.execute(update(Cooperative).where(Cooperative.id == demo["cooperative_id"]).values(
                status="SUSPENDED"))
        else:  # pending: her registration (USSD) not approved yet; USSD tells her it awaits approval
            await s.execute(update(Member).where(Member.id == demo["members"][phone]).values(
                status="SUSPENDED" if suspended == "member" else "PENDING"))
    reply = await ask(sms_client, sim, worker, phone, text, "help-inactive")
    if text == "HELP" and suspended == "member":
        # A suspended member's RECEIPT and STATUS are not answered (channels.sms.routes._owns): HELP offers her none.
        template = "help_suspended"
    assert reply == render(template, language, {}), reply
    assert "*384*" not in reply and "#" not in reply
    assert measure(reply).encoding == GSM7 and measure(reply).segments == 1


@pytest.mark.parametrize("suspended", ["cooperative", "member"])
async def test_what_help_offers_a_member_who_cannot_pay_is_answered(
    rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any, worker: Any, suspended: str
) -> None:
    """HELP's "SMS: RECEIPT <ref>, STATUS <ref>" to a member who cannot pay: answered when her cooperative is
    suspended (she is still its member), and not offered to a suspended member, whose RECEIPT gets "No payment ...
    found" (her number may be someone else's now)."""
    from sqlalchemy import update

    from core.models import Cooperative, Member

    paid = await make_payment(rt, demo["cooperative_id"], account=JEAN, member_id=demo["members"][JEAN])
    async with rt.sessionmaker.begin() as s:
        if suspended == "cooperative":
            await s.execute(update(Cooperative).where(Cooperative.id == demo["cooperative_id"]).values(
                status="SUSPENDED"))
        else:
            await s.execute(update(Member).where(Member.id == demo["members"][JEAN]).values(status="SUSPENDED"))
    help_ = await ask(sms_client, sim, worker, JEAN, "HELP", "help-then-receipt")
    receipt = await ask(sms_client, sim, worker, JEAN, f"RECEIPT {paid.reference}", "receipt-after-help")
    answered = receipt != f"No payment {paid.reference} found for this phone number."
    assert answered == (suspended == "cooperative"), receipt
    assert ("RECEIPT <ref>" in help_) == answered, help_
    assert help_.startswith("Your membership is not active") and "*384*" not in help_


async def test_help_to_an_active_member_still_names_the_code_to_dial(
    rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any, worker: Any
) -> None:
    reply = await ask(sms_client, sim, worker, JEAN, "HELP", "help-active")
    assert reply.startswith("Dial *384*123") and "# to pay. SMS: RECEIPT <ref>" in reply, reply
    reply = await ask(sms_client, sim, worker, JEAN, "what now", "unknown-active")
    assert reply.startswith("Sorry, we did not understand. Send HELP or dial *384*123") and reply.endswith("#."), reply


# --------------------------------------------------------------------------------------- amounts in French


@pytest.mark.parametrize(("money", "language", "shown"), [
    (Money(5_000, "BIF"), "fr", "5 000 BIF"),
    (Money(150_050, "KES"), "fr", "1 500,50 KES"),
    (Money(1_250_000, "RWF"), "fr", "1 250 000 RWF"),
    (Money(500, "RWF"), "fr", "500 RWF"),
    (Money(5_000, "BIF"), "en", "5,000 BIF"),
    (Money(150_050, "KES"), "en", "1,500.50 KES"),
    (Money(150_050, "KES"), "rw", "1,500.50 KES"),
    (Money(150_050, "KES"), "sw", "1,500.50 KES"),
])
def test_amounts_are_written_as_the_language_writes_numbers(money: Money, language: str, shown: str) -> None:
    """A French reader takes "5,000 BIF" for five francs: French groups digits with a (plain, GSM-7) space."""
    assert money.format(language) == shown


@pytest.mark.parametrize(("phone", "amount"), [(CLAUDINE, "50 000 RWF"), (JEAN, "50,000 RWF"),
                                               (ALINE, "50,000 RWF"), (ERIC, "50,000 RWF")])
async def test_a_receipt_states_the_amount_as_her_language_writes_it(
    rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any, worker: Any, phone: str, amount: str
) -> None:
    paid = await make_payment(rt, demo["cooperative_id"], account=phone, member_id=demo["members"][phone])
    keyword = CATALOGS[{CLAUDINE: "fr", JEAN: "en", ALINE: "rw", ERIC: "sw"}[phone]].KEYWORDS["RECEIPT"][0]
    reply = await ask(sms_client, sim, worker, phone, f"{keyword} {paid.reference}", "a1")
    assert f" {amount} " in reply, reply


async def test_a_french_reminder_and_refund_state_amounts_with_spaces(rt: Any, demo: dict[str, Any]) -> None:
    """The reminder and the refund messages are built apart from the payment ones: the same number format."""
    from core.models import Refund

    rent = demo["payment_types"]["Monthly Rent"]
    member = demo["members"][CLAUDINE]
    paid = await make_payment(rt, demo["cooperative_id"], account=CLAUDINE, member_id=member)
    async with rt.sessionmaker.begin() as session:
        refund = Refund(payment_id=paid.id, cooperative_id=demo["cooperative_id"], reference="RFD_20260115_001",
                        amount_minor=12_500, currency="RWF", status="COMPLETED", reason="test",
                        idempotency_key="rfd-1", provider_reference="prov-rfd-1")
        session.add(refund)
    reminder = {"template": "payment_reminder", "member_id": member,
                "context": {"member_id": member, "payment_type_id": rent, "due_date": "2026-02-01"}}
    refunded = {"template": "refund_completed", "member_id": member, "context": {"refund_id": refund.id}}
    async with rt.sessionmaker() as session:
        _, language, body = await templates.build_message(session, rt.cipher, reminder)
        _, _, refund_body = await templates.build_message(session, rt.cipher, refunded)
    assert language == "fr"
    assert body.startswith("Rappel : Monthly Rent (50 000 RWF) pour "), body
    assert refund_body.startswith("Remboursement de 12 500 RWF effectué"), refund_body


async def test_help_offers_receipts_to_a_number_that_is_a_member_somewhere_it_is_not_suspended(
    rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any, worker: Any
) -> None:
    """Jean is an active member of a cooperative that is suspended, and a suspended member of another: he can pay at
    neither, and HELP says so; but he is still a member of the first (not suspended himself), so RECEIPT and STATUS
    answer him there and HELP offers them. Offering them only when every membership is not suspended took them from
    him."""
    from sqlalchemy import update

    from core.audit import Actor
    from core.members import create_member
    from core.models import Cooperative, Member
    from core.phone import normalize

    paid = await make_payment(rt, demo["cooperative_id"], account=JEAN, member_id=demo["members"][JEAN])
    async with rt.sessionmaker.begin() as s:
        other = Cooperative(name="Musanze Farmers", short_code="MSZF", country="RW", currency="RWF",
                            timezone="Africa/Kigali", ussd_extension="77", status="ACTIVE")
        s.add(other)
        await s.flush()
        there = await create_member(s, rt.cipher, cooperative_id=other.id, name="Jean Bosco", phone=normalize(JEAN),
                                    actor=Actor("system", "system"))
        await s.execute(update(Member).where(Member.id == there.id).values(status="SUSPENDED"))
        await s.execute(update(Cooperative).where(Cooperative.id == demo["cooperative_id"]).values(
            status="SUSPENDED"))
    help_ = await ask(sms_client, sim, worker, JEAN, "HELP", "help-two-memberships")
    assert help_ == render("help_inactive", "en", {}), help_
    receipt = await ask(sms_client, sim, worker, JEAN, f"RECEIPT {paid.reference}", "receipt-two-memberships")
    assert paid.reference in receipt and "No payment" not in receipt, receipt
