"""Every template in every language renders, stays GSM-7 and within three segments; values come from rows."""

from __future__ import annotations

import re
from typing import Any

import pytest

from channels.sms import templates
from channels.sms.encoding import GSM7, measure
from channels.sms.templates import CATALOGS, TEMPLATES, TemplateError, render
from tests.channels.sms.helpers import make_payment

# References at their realistic longest: the number comes from one PostgreSQL sequence shared by every cooperative,
# day and kind of a deployment (core/references.py), so a federation's year of payments makes it seven digits
# (PAY_20260115_1234567: 20 characters), not the three of PAY_20260115_001. A payment's, a refund's and a dispute's.
PAY_REF, RFD_REF, DSP_REF = "PAY_20260115_1234567", "RFD_20260115_1234568", "DSP_20260115_1234569"

# Long but realistic values: the longest names an admin would type.
WORST_CASE: dict[str, Any] = {
    "amount": "1,250,000 RWF",
    "type": "Monthly Rent and Service Charge",
    "coop": "Kigali Heights Housing Coop",
    "ref": PAY_REF,
    "txn": "MTN-1234567890123456",
    "date": "15/01/2026 23:30",
    "status": "",
    "reason": "",
    "dial": "*384*123*123#",
    "payment_ref": PAY_REF,
    "due": "01/02/2026",
    "host": "hooks.kigali-heights.example.rw",
    "failures": 20,
    "refunded": "1,250,000 RWF",
    # The BALANCE list at its longest: three names cut to templates.BALANCE_NAME, and the rest counted.
    "items": "Monthly Rent and Serv 1,250,000 RWF, Security and Garbage 1,250,000 RWF, Water and Electricit "
             "1,250,000 RWF, +9 more",
}
# Templates that fit one SMS, whatever the values (the one-SMS tests below measure the payment's and refund's texts
# with the values of a usual payment).
ONE_PART = ("help", "help_inactive", "not_found", "opted_in", "unknown", "unknown_inactive", "dispute_updated",
            "not_member", "payment_reminder")


def worst_case(template: str, language: str) -> dict[str, Any]:
    """WORST_CASE for one template in one language: its own kind of reference, and the longest status and reason
    phrases of that language it can say (a dispute's status is one of DISPUTE_STATUS, templates.build_message; a
    payment's one of PAYMENT_STATUS)."""
    catalog = CATALOGS[language]
    statuses = (catalog.DISPUTE_STATUS if template.startswith("dispute_")
                else catalog.REFUND_STATUS if template == "refund_status" else catalog.PAYMENT_STATUS)
    return {
        **WORST_CASE,
        "ref": _own_reference(template),
        "status": max(statuses.values(), key=len),
        "reason": max(catalog.REASONS.values(), key=len),
    }


@pytest.mark.parametrize("language", sorted(CATALOGS))
@pytest.mark.parametrize("template", TEMPLATES)
def test_every_template_fits(template: str, language: str) -> None:
    body = render(template, language, worst_case(template, language))
    assert "{" not in body and "}" not in body
    size = measure(body)
    assert size.encoding == GSM7, f"{template}/{language} would force UCS-2: {body!r}"
    assert size.segments <= 3, f"{template}/{language} is {size.length} septets"
    if template in ONE_PART:
        assert size.segments == 1, f"{template}/{language} should fit one SMS: {body!r}"


def _own_reference(template: str) -> str:
    """The {ref} a template names: a refund's or a dispute's own, else a payment's."""
    return RFD_REF if template.startswith("refund_") else DSP_REF if template.startswith("dispute_") else PAY_REF


@pytest.mark.parametrize("language", sorted(CATALOGS))
@pytest.mark.parametrize("template", [t for t in TEMPLATES if templates.is_payment_template(t)])
def test_payment_messages_fit_with_what_was_taken_beside_what_was_asked(template: str, language: str) -> None:
    """A payment the provider took another amount of states both amounts: still GSM-7, within three parts."""
    catalog = CATALOGS[language]
    amount = max((p.format(collected="1,250,000 RWF", amount="1,500,000 RWF") for p in catalog.AMOUNT_TAKEN.values()),
                 key=len)
    values = {
        **WORST_CASE,
        "amount": amount,
        "status": max(catalog.PAYMENT_STATUS.values(), key=len),
        "reason": max(catalog.REASONS.values(), key=len),
    }
    body = render(template, language, values)
    size = measure(body)
    assert size.encoding == GSM7, f"{template}/{language} would force UCS-2: {body!r}"
    assert size.segments <= 3, f"{template}/{language} is {size.length} septets"


def test_catalogs_have_the_same_templates_and_placeholders() -> None:
    english = CATALOGS["en"]
    for language, catalog in CATALOGS.items():
        assert set(catalog.MESSAGES) == set(english.MESSAGES), language
        assert set(catalog.PAYMENT_STATUS) == set(english.PAYMENT_STATUS), language
        assert set(catalog.DISPUTE_STATUS) == set(english.DISPUTE_STATUS), language
        assert set(catalog.REFUND_STATUS) == set(english.REFUND_STATUS) == {"PENDING", "PROCESSING", "COMPLETED",
                                                                             "FAILED"}, language
        assert set(catalog.REASONS) == set(english.REASONS), language
        assert set(catalog.KEYWORDS) == set(english.KEYWORDS), language
        assert set(catalog.AMOUNT_TAKEN) == set(english.AMOUNT_TAKEN) == {"less", "more"}, language
        for phrase in catalog.AMOUNT_TAKEN.values():
            assert templates._placeholders(phrase) == {"collected", "amount"}, (language, phrase)
        assert not templates._placeholders(catalog.AMOUNT_IN_REVIEW), language  # no figure: none is true
        for name, text in catalog.MESSAGES.items():
            assert templates._placeholders(text) <= templates._placeholders(english.MESSAGES[name]) | {
                "dial"
            }, (language, name)


# A connective after a type's name ("{type} ya ...", "{type} ({amount}) ya ...") agrees with the name's noun class.
CONNECTIVE_AFTER_TYPE = re.compile(r"\{type\}( \([^)]*\))? (wa|ya|la|cha|vya|za|rya|cya|bya|bwa|twa|ka|ra)\b")


@pytest.mark.parametrize(("language", "name", "coop", "expected"), [
    ("rw", "Umusanzu w'ukwezi", "Umuryango w'Abahinzi Kicukiro",
     "Kwibutsa: kwishyura Umusanzu w'ukwezi (5,000 RWF) muri Umuryango w'Abahinzi Kicukiro bitarenze ku wa "
     "01/02/2026. Kanda *384*123*123# wishyure."),
    ("sw", "Mchango wa mwezi", "Ushirika wa Nyumba Sinza",
     "Kumbusho: malipo ya Mchango wa mwezi (5,000 RWF) kwa Ushirika wa Nyumba Sinza yanadaiwa tarehe 01/02/2026. "
     "Piga *384*123*123# kulipa."),
])
def test_a_reminder_makes_neither_name_the_subject_of_a_verb(language: str, name: str, coop: str,
                                                            expected: str) -> None:
    """A Kinyarwanda or Swahili verb (and connective) agrees with its subject's noun class, and a type's or a
    cooperative's name has any: "Umusanzu w'ukwezi (...) ya ... igomba kwishyurwa" and "Mchango wa mwezi (...) ya
    ... inadaiwa" agreed with a class-9 noun only. The verb agrees with a fixed noun (Swahili "malipo ya ..."), or
    nothing does (Kinyarwanda "kwishyura ..."); the cooperative's name after "muri"/"kwa", as USSD's pay.none."""
    body = render("payment_reminder", language, {**WORST_CASE, "type": name, "coop": coop, "amount": "5,000 RWF"})
    assert body == expected
    for catalog in (CATALOGS["rw"], CATALOGS["sw"]):
        wrong = [key for key, text in catalog.MESSAGES.items()
                 if CONNECTIVE_AFTER_TYPE.search(text) or re.search(r"(^|\. )\{(coop|type)\} [a-z]", text)]
        assert not wrong, wrong


def test_every_keyword_a_message_names_comes_after_the_short_codes_word() -> None:
    """On a shared short code her next text reaches us only with its word first ("KHHC STOP"): every keyword any
    catalog's message tells her to send carries {kw}, in every language (a translation without it sends her nowhere)."""
    from channels.sms.routes import fold

    spellings = {fold(s) for catalog in CATALOGS.values() for words in catalog.KEYWORDS.values() for s in words}
    for language, catalog in CATALOGS.items():
        for name, text in catalog.MESSAGES.items():
            for named in re.finditer(r"(\{kw\})?\b(\w+)\b", text):
                if fold(named[2]) in spellings and named[2].isupper():
                    assert named[1], (language, name, named[2])


def test_render_refuses_unknown_template_and_missing_values() -> None:
    with pytest.raises(TemplateError, match="unknown SMS template"):
        render("nope", "en", {})
    with pytest.raises(TemplateError, match="needs"):
        render("payment_receipt", "en", {"amount": "1 RWF"})
    # Unknown language: English, not an error.
    assert render("help", "xx", {"dial": "*1#"}).startswith("Dial *1#")


def test_values_are_flattened() -> None:
    body = render("not_found", "en", {"ref": "A\nB  {x}"})
    assert "\n" not in body and "A B {x}" in body


@pytest.mark.parametrize("language", sorted(CATALOGS))
def test_names_outside_gsm7_do_not_turn_a_message_into_ucs2(language: str) -> None:
    """An accent the alphabet lacks or a pasted dash in a name would make the whole SMS UCS-2 (70 characters a
    part instead of 160): values are transliterated, keeping the accents GSM-7 has."""
    typed = {**WORST_CASE, "coop": "Coopérative de l'Île Rêve – Block A", "type": "Loyer “mensuel”"}
    plain = {**WORST_CASE, "coop": "Coopérative de l'Ile Reve - Block A", "type": 'Loyer "mensuel"'}
    body = render("payment_receipt", language, typed)
    assert body == render("payment_receipt", language, plain)
    assert "Coopérative de l'Ile Reve - Block A" in body
    assert measure(body).encoding == GSM7


@pytest.mark.parametrize(
    ("typed", "sent"),
    [
        ("Aline\u2019s Coop", "Aline's Coop"),  # a phone's or a word processor's apostrophe
        ("Coope\u0301rative", "Coopérative"),  # é typed as e and a combining accent: the é GSM-7 has
        ("Adébáyọ\u0300 Coop", "Adébayo Coop"),  # a mark no precomposed letter holds: dropped, not a '?'
    ],
)
def test_names_are_transliterated_as_a_member_would_write_them(typed: str, sent: str) -> None:
    body = render("payment_receipt", "en", {**WORST_CASE, "coop": typed})
    assert body == render("payment_receipt", "en", {**WORST_CASE, "coop": sent})
    assert sent in body and "?" not in body
    assert measure(body).encoding == GSM7


@pytest.mark.parametrize(
    ("reason", "key"),
    [
        ("Payer has insufficient funds", "insufficient_funds"),
        ("NOT_ENOUGH_FUNDS", "insufficient_funds"),
        ("APPROVAL_REJECTED", "declined"),
        ("Request cancelled by user", "declined"),
        ("Transaction expired", "not_approved"),
        ("Daily limit exceeded", "limit"),
        ("Payee not found", "invalid_account"),
        ("Internal error", "provider_error"),
        # A PIN typed wrong, however a provider words it: never "account not valid" (its "invalid").
        ("Invalid PIN", "wrong_pin"),
        ("Incorrect Pin has been entered", "wrong_pin"),
        # M-Pesa's own words for its 1001: another prompt open on her phone, not a provider fault.
        ("A transaction is already in process for the current subscriber", "other_transaction"),
        # A provider's code stored as it came: its words are read across the underscores.
        ("PAYER_NOT_FOUND", "invalid_account"),
        ("WRONG_PIN", "wrong_pin"),
        (None, "unknown"),
    ],
)
def test_reason_key(reason: str | None, key: str) -> None:
    assert templates.reason_key(reason) == key


def test_dial_code() -> None:
    assert templates.dial_code("*384*123#", "12") == "*384*123*12#"
    assert templates.dial_code("*384*123#", None) == "*384*123#"


async def test_build_receipt_from_rows_in_member_language_and_local_time(
    rt: Any, demo: dict[str, Any]
) -> None:
    member_id = demo["members"]["+250788000003"]  # Grace, English
    payment = await make_payment(rt, demo["cooperative_id"], account="+250788000003", member_id=member_id)
    payload = {
        "template": "payment_receipt",
        "cooperative_id": demo["cooperative_id"],
        "member_id": member_id,
        "phone_enc": None,
        "context": {"payment_id": payment.id},
        "key": "k1",
    }
    async with rt.sessionmaker() as session:
        phone, language, body = await templates.build_message(
            session, rt.cipher, payload, service_code="*384*123#"
        )
    assert phone.e164 == "+250788000003"
    assert language == "en"
    assert "50,000 RWF" in body and payment.reference in body and "MTN-TX-778899" in body
    assert "Kigali Heights Housing Cooperative" in body
    assert "15/01/2026 23:30" in body  # 21:30 UTC is 23:30 in Africa/Kigali


TAKEN_SHOWN = {  # 40,000 or 60,000 RWF taken of a 50,000 RWF payment, in each language
    "en": ("We received 40,000 RWF of 50,000 RWF for ", "We received 60,000 RWF (50,000 RWF due) for "),
    "fr": ("Payé : 40 000 RWF sur 50 000 RWF pour ",  # French groups digits with spaces
           "Payé : 60 000 RWF et non 50 000 RWF pour "),
    "rw": ("Twakiriye 40,000 RWF aho kuba 50,000 RWF ya ", "Twakiriye 60,000 RWF aho kuba 50,000 RWF ya "),
    "sw": ("Tumepokea 40,000 RWF kati ya 50,000 RWF kwa ", "Tumepokea 60,000 RWF (ombi 50,000 RWF) kwa "),
}


@pytest.mark.parametrize("language", sorted(CATALOGS))
async def test_a_receipt_states_what_was_taken_when_the_provider_took_another_amount(
    rt: Any, demo: dict[str, Any], language: str
) -> None:
    """The provider reported 40,000 (or 60,000) of 50,000 RWF taken: the member is told that, not 50,000."""
    from core.models import Payment

    payment = await make_payment(rt, demo["cooperative_id"], account="+250788000003")
    payload = {"template": "payment_receipt", "context": {"payment_id": payment.id, "language": language},
               "phone_enc": rt.cipher.encrypt("+250788000003", context="sms")}
    for taken, shown in zip((40_000, 60_000), TAKEN_SHOWN[language], strict=True):
        async with rt.sessionmaker.begin() as session:
            row = await session.get(Payment, payment.id)
            row.mismatch, row.collected_minor = True, taken
        async with rt.sessionmaker() as session:
            _, _, body = await templates.build_message(session, rt.cipher, payload)
        assert body.startswith(shown), body
        assert measure(body).encoding == GSM7
    # Taken in full (no collected figure, or the same one): the amount alone, as before.
    for collected in (None, 50_000):
        async with rt.sessionmaker.begin() as session:
            row = await session.get(Payment, payment.id)
            row.collected_minor = collected
        async with rt.sessionmaker() as session:
            _, _, body = await templates.build_message(session, rt.cipher, payload)
        sep = " " if language == "fr" else ","
        assert f" 50{sep}000 RWF " in body and f"40{sep}000" not in body and f"60{sep}000" not in body, body


async def test_a_message_before_money_is_taken_states_the_amount_asked(rt: Any, demo: dict[str, Any]) -> None:
    payment = await make_payment(rt, demo["cooperative_id"], account="+250788000003", status="FAILED",
                                 failure_reason="payer declined")
    payload = {"template": "payment_failed", "context": {"payment_id": payment.id, "language": "en"},
               "phone_enc": rt.cipher.encrypt("+250788000003", context="sms")}
    async with rt.sessionmaker() as session:
        _, _, body = await templates.build_message(session, rt.cipher, payload)
    assert body.startswith("Payment of 50,000 RWF for "), body


async def test_build_failed_in_kinyarwanda_with_reason_and_dial(rt: Any, demo: dict[str, Any]) -> None:
    member_id = demo["members"]["+250788000001"]  # Aline, Kinyarwanda
    payment = await make_payment(
        rt,
        demo["cooperative_id"],
        account="+250788000001",
        member_id=member_id,
        status="FAILED",
        failure_reason="Insufficient balance",
    )
    payload = {
        "template": "payment_failed",
        "cooperative_id": demo["cooperative_id"],
        "member_id": member_id,
        "context": {"payment_id": payment.id},
    }
    async with rt.sessionmaker() as session:
        _, language, body = await templates.build_message(
            session, rt.cipher, payload, service_code="*384*123#"
        )
    assert language == "rw"
    assert CATALOGS["rw"].REASONS["insufficient_funds"] in body
    assert "*384*123*123#" in body  # the cooperative's extension


async def test_build_for_a_phone_without_member(rt: Any, demo: dict[str, Any]) -> None:
    from core.phone import Phone

    payload = {
        "template": "help",
        "cooperative_id": None,
        "member_id": None,
        "phone_enc": rt.cipher.encrypt("+250788999999", context="sms"),
        "context": {"language": "sw"},
    }
    async with rt.sessionmaker() as session:
        phone, language, body = await templates.build_message(
            session, rt.cipher, payload, service_code="*384*123#"
        )
    assert phone == Phone("+250788999999") and language == "sw"
    assert body.startswith("Piga *384*123# kulipa")


@pytest.mark.parametrize("language", ["de", "", None])
async def test_a_language_without_a_catalog_is_sent_in_english(rt: Any, demo: dict[str, Any],
                                                               language: str | None) -> None:
    """A job's language the gateway has no catalog of (a member row or an API caller's "de"): the message goes in
    English, never not at all."""
    payload = {"template": "help", "phone_enc": rt.cipher.encrypt("+250788999999", context="sms"),
               "context": {"language": language}}
    async with rt.sessionmaker() as session:
        _phone, sent_in, body = await templates.build_message(session, rt.cipher, payload, service_code="*384*123#")
    assert sent_in == "en"
    assert body == render("help", "en", {"dial": "*384*123#"})


async def test_a_disabled_webhook_is_named_by_its_host_not_its_url(rt: Any, demo: dict[str, Any]) -> None:
    """The admin's SMS names the endpoint's host: its path and query (a token some receivers put there) stay out of
    an SMS, which would also run to more parts."""
    from core.models import WebhookEndpoint

    async with rt.sessionmaker.begin() as session:
        endpoint = WebhookEndpoint(cooperative_id=demo["cooperative_id"], secret_enc="x", events=["payment.completed"],
                                   url="https://hooks.kigali-heights.example.rw/gateway/in?token=s3cr3t-t0ken")
        session.add(endpoint)
    payload = {"template": "webhook_disabled", "cooperative_id": demo["cooperative_id"],
               "phone_enc": rt.cipher.encrypt("+250788000003", context="sms"),
               "context": {"endpoint_id": endpoint.id, "failures": 20, "language": "en"}}
    async with rt.sessionmaker() as session:
        _phone, _language, body = await templates.build_message(session, rt.cipher, payload)
    assert body == ("Kigali Heights Housing Cooperative: webhook to hooks.kigali-heights.example.rw was disabled "
                    "after 20 failed deliveries. Re-enable it in the API.")


async def test_build_refuses_missing_rows(rt: Any, demo: dict[str, Any]) -> None:
    payload = {
        "template": "payment_receipt",
        "cooperative_id": demo["cooperative_id"],
        "member_id": demo["members"]["+250788000001"],
        "context": {"payment_id": "nope"},
    }
    async with rt.sessionmaker() as session:
        with pytest.raises(TemplateError, match="payment nope not found"):
            await templates.build_message(session, rt.cipher, payload)
        with pytest.raises(TemplateError, match="neither a member nor a phone"):
            await templates.build_message(session, rt.cipher, {"template": "help", "context": {}})


async def test_build_member_approved_in_member_language_with_dial(rt: Any, demo: dict[str, Any]) -> None:
    payload = {
        "template": "member_approved",
        "cooperative_id": demo["cooperative_id"],
        "member_id": demo["members"]["+250733000001"],  # Claudine, French
        "context": {},
    }
    async with rt.sessionmaker() as session:
        phone, language, body = await templates.build_message(
            session, rt.cipher, payload, service_code="*384*123#"
        )
        assert phone.e164 == "+250733000001" and language == "fr"
        assert body == (
            "Bienvenue ! Votre adhésion à Kigali Heights Housing Cooperative est approuvée. "
            "Pour payer, composez *384*123*123#."
        )
        assert measure(body).encoding == GSM7
        no_member = {**payload, "member_id": None, "phone_enc": rt.cipher.encrypt("+250733000001", context="sms")}
        with pytest.raises(TemplateError, match="member_approved needs a member"):
            await templates.build_message(session, rt.cipher, no_member)


ANY_AMOUNT_SHOWN = {"en": "Reminder: Savings (any amount) for ", "fr": "Rappel : Savings (montant libre) pour ",
                    "rw": "(amafaranga ushaka)", "sw": "(kiasi chochote)"}


@pytest.mark.parametrize("language", sorted(ANY_AMOUNT_SHOWN))
async def test_a_reminder_of_a_type_the_member_pays_what_she_chooses_asks_no_zero(
    rt: Any, demo: dict[str, Any], language: str
) -> None:
    """A recurring savings contribution of any amount (amount 0, allowCustomAmount): its reminder said '(0 RWF)'."""
    from core.models import PaymentType

    async with rt.sessionmaker.begin() as session:
        savings = PaymentType(cooperative_id=demo["cooperative_id"], name="Savings", amount_minor=0, currency="RWF",
                              allow_custom_amount=True, is_recurring=True, due_day=1, is_active=True)
        fixed = PaymentType(cooperative_id=demo["cooperative_id"], name="Dues", amount_minor=2_000, currency="RWF",
                            allow_custom_amount=True, is_recurring=True, due_day=1, is_active=True)
        session.add_all([savings, fixed])
    member = demo["members"]["+250788000001"]
    bodies = []
    for ptype in (savings, fixed):
        payload = {"template": "payment_reminder", "member_id": member, "context": {
            "member_id": member, "payment_type_id": ptype.id, "due_date": "2026-12-01", "language": language}}
        async with rt.sessionmaker() as session:
            _phone, _lang, body = await templates.build_message(session, rt.cipher, payload)
        bodies.append(body)
        assert measure(body).encoding == GSM7, body
    assert ANY_AMOUNT_SHOWN[language] in bodies[0] and "0 RWF" not in bodies[0], bodies[0]
    usual = "(2 000 RWF)" if language == "fr" else "(2,000 RWF)"  # French groups digits with spaces
    assert usual in bodies[1], bodies[1]  # a usual amount, even if another may be paid, is said


@pytest.mark.parametrize("language", sorted(CATALOGS))
def test_a_reminder_of_a_balance_fits(language: str) -> None:
    """A fixed amount the provider took only part of is reminded as its balance and the price beside it ("balance
    20,000 RWF of 50,000 RWF"): still GSM-7, within three parts, in every language."""
    phrase = CATALOGS[language].BALANCE
    assert templates._placeholders(phrase) == {"balance", "amount"}, (language, phrase)
    values = {**WORST_CASE, "amount": phrase.format(balance="1,249,999 RWF", amount="1,250,000 RWF")}
    body = render("payment_reminder", language, values)
    size = measure(body)
    assert size.encoding == GSM7, f"{language} would force UCS-2: {body!r}"
    assert size.segments <= 3, f"{language} is {size.length} septets"


def test_a_ghana_receipt_of_a_four_figure_amount_is_one_sms() -> None:
    """A GHS 1,234.56 receipt of a cooperative with a 30-character name went as two SMS (163 septets): twice the
    cost of every receipt of such an amount. It fits one, and still says the amount, what for, the reference, the
    cooperative, the provider's transaction and when."""
    values = {"amount": "GHS 1,234.56", "type": "Monthly susu", "coop": "Kejetia Market Women Susu Assn",
              "ref": PAY_REF, "txn": "8419567321", "date": "15/01/2026 10:30"}
    assert len(values["coop"]) == 30
    body = render("payment_receipt", "en", values)
    size = measure(body)
    assert (size.encoding, size.segments) == (GSM7, 1), f"{size.length} septets: {body!r}"
    for value in values.values():
        assert value in body


@pytest.mark.parametrize("currency", ["GHS", "RWF", "KES"])
@pytest.mark.parametrize("language", sorted(CATALOGS))
def test_a_receipt_of_a_usual_payment_is_one_sms_in_every_language(language: str, currency: str) -> None:
    """The English receipt fitted one SMS with a 30-character cooperative name and a four- to seven-figure amount; the
    French one was 165 septets, the Kinyarwanda one 173: two SMS, twice the cost of each of their receipts. Each fits
    one, and still says the amount, what for, the cooperative, the reference, the provider's transaction and when."""
    from core.money import Money

    minor = {"GHS": 123_456, "RWF": 1_234_567, "KES": 1_234_500}[currency]  # GHS 1,234.56, 1,234,567 RWF, 12,345.00 KES
    values = {"amount": Money(minor, currency).format(language), "type": "Monthly savings",
              "coop": "Kejetia Market Women Susu Assn", "ref": PAY_REF, "txn": "8419567321",
              "date": "15/01/2026 10:30"}
    assert len(values["coop"]) == 30
    body = render("payment_receipt", language, values)
    size = measure(body)
    assert (size.encoding, size.segments) == (GSM7, 1), f"{size.length} septets: {body!r}"
    for value in values.values():
        assert value in body


def _texts(catalog: Any) -> dict[str, str]:
    """Every phrase of a catalog that goes into an SMS: its messages and the phrases filled into them."""
    texts = {}
    for name in ("MESSAGES", "AMOUNT_TAKEN", "PAYMENT_STATUS", "DISPUTE_STATUS", "REFUND_STATUS", "REASONS",
                 "REFUND_REASONS"):
        texts.update({f"{name}.{key}": text for key, text in getattr(catalog, name).items()})
    for name in ("AMOUNT_IN_REVIEW", "ANY_AMOUNT", "BALANCE", "BALANCE_PAID", "BALANCE_MORE", "BALANCE_NONE",
                 "BALANCE_WAITING", "BALANCE_ALL_WAITING"):
        texts[name] = getattr(catalog, name)
    return texts


@pytest.mark.parametrize("language", sorted(CATALOGS))
def test_every_phrase_of_every_catalog_is_gsm7(language: str) -> None:
    """A character outside GSM-7 in a message's fixed text sends the whole SMS as UCS-2 (70 characters a part), and
    in a phrase filled into one (a status) it is changed to the nearest GSM-7 letter: a French dispute was told
    "Réclamation ...: recue.". Every phrase is GSM-7 as written."""
    from core.gsm import is_gsm

    wrong = {key: text for key, text in _texts(CATALOGS[language]).items() if not is_gsm(text)}
    assert not wrong, wrong


def test_french_puts_a_plain_space_before_a_colon_exclamation_question_mark_and_semicolon() -> None:
    """French typography: "Bienvenue !", "l'opérateur ; si ...", "Réf : ..." (the SMS read "Bienvenue!"). A plain
    space: a non-breaking one is not GSM-7 and would send the SMS as UCS-2."""
    glued = {key: text for key, text in _texts(CATALOGS["fr"]).items() if re.search(r"[^ ][!?;:]", text)}
    assert not glued, glued


# The values the one-SMS tests measure with: a 30-character cooperative name, a four- to seven-figure amount (GHS
# 1,234.56, 1,234,567 RWF, 12,345.00 KES), a seven-digit reference (PAY_REF), the provider's transaction, the date and
# a code with an extension.
USUAL_MINOR = {"GHS": 123_456, "RWF": 1_234_567, "KES": 1_234_500}
CURRENCIES = sorted(USUAL_MINOR)


def _usual(language: str, currency: str) -> dict[str, Any]:
    from core.money import Money

    return {"amount": Money(USUAL_MINOR[currency], currency).format(language), "type": "Monthly savings",
            "coop": "Kejetia Market Women Susu Assn", "ref": PAY_REF, "txn": "8419567321",
            "date": "15/01/2026 10:30", "dial": "*384*123*123#"}


def _one_sms(body: str) -> None:
    size = measure(body)
    assert (size.encoding, size.segments) == (GSM7, 1), f"{size.length} septets: {body!r}"


# A payment of which the provider took less or more than was asked (GHS 1,234.56 of GHS 1,500.00, and the other way):
# its messages state both amounts (AMOUNT_TAKEN).
OTHER_AMOUNTS = [("GHS", 150_000, 123_456), ("GHS", 123_456, 150_000), ("RWF", 1_500_000, 1_234_567),
                 ("RWF", 1_234_567, 1_500_000), ("KES", 1_500_000, 1_234_500), ("KES", 1_234_500, 1_500_000)]


def _other_amount(language: str, currency: str, asked: int, taken: int) -> tuple[str, str, str]:
    """What was taken, what was asked, and the {amount} that says both."""
    from core.money import Money

    phrase = CATALOGS[language].AMOUNT_TAKEN["less" if taken < asked else "more"]
    collected, amount = Money(taken, currency).format(language), Money(asked, currency).format(language)
    return collected, amount, phrase.format(collected=collected, amount=amount)


@pytest.mark.parametrize("currency", CURRENCIES)
@pytest.mark.parametrize("language", sorted(CATALOGS))
def test_a_failed_or_lapsed_payment_is_one_sms_in_every_language(language: str, currency: str) -> None:
    """Members often cancel or ignore the PIN prompt, and each failure or timeout SMS was two (the English timeout 165
    septets, the French 178; a failure 168 to 209): twice the cost of the most frequent texts after receipts. Each fits
    one with the receipt's values and every reason, the rarer ones too (another prompt open on her phone: 191 to 227
    septets; the provider unreachable: 174 to 184; its error in French and Kinyarwanda, and an account that cannot
    receive it in French: 161 to 163; with a seven-digit reference, another prompt open, the provider unreachable or
    its error 161 to 164 in every language), and still says which payment (amount, type, reference), why it did not
    go through and the code to dial to try again."""
    catalog = CATALOGS[language]
    values = _usual(language, currency)
    reasons = list(catalog.REASONS.values())
    bodies = [render("payment_timeout", language, values)] + [
        render("payment_failed", language, {**values, "reason": reason}) for reason in reasons]
    for body, reason in zip(bodies, ["", *reasons], strict=True):
        _one_sms(body)
        for name in ("amount", "type", "ref", "dial"):
            assert values[name] in body, (name, body)
        assert reason in body


@pytest.mark.parametrize("currency", CURRENCIES)
@pytest.mark.parametrize("language", sorted(CATALOGS))
def test_a_refund_is_one_sms_in_every_language(language: str, currency: str) -> None:
    """A refund that failed was told in 199 to 218 septets, two SMS (with seven-digit references, 165 to 168 after the
    first trim). It fits one with every reason, and still says what failed (the refund, its amount, the payment it
    pays back), why, that her cooperative will contact her, and the refund's reference. A completed refund too: its
    amount, the payment, the cooperative and the refund's reference."""
    values = {**_usual(language, currency), "payment_ref": PAY_REF, "ref": RFD_REF}
    for reason in CATALOGS[language].REFUND_REASONS.values():
        body = render("refund_failed", language, {**values, "reason": reason})
        _one_sms(body)
        for name in ("amount", "payment_ref", "ref"):
            assert values[name] in body, (name, body)
        assert reason in body
    body = render("refund_completed", language, values)
    _one_sms(body)
    for name in ("amount", "payment_ref", "coop", "ref"):
        assert values[name] in body, (name, body)


@pytest.mark.parametrize("currency", CURRENCIES)
@pytest.mark.parametrize("language", sorted(CATALOGS))
def test_a_receipt_asked_for_after_a_refund_says_the_refund_in_one_sms(language: str, currency: str) -> None:
    """RECEIPT of a payment refunded in part or in full sent the plain receipt ("We received 50,000 RWF ..."), proof
    of money the cooperative no longer holds. The receipt asked for then says what was refunded since, with the
    receipt's facts, in one SMS; with the amount taken beside the amount asked too."""
    values = {**_usual(language, currency), "refunded": _usual(language, currency)["amount"]}
    for amount in (values["amount"], *(_other_amount(language, *case)[2] for case in OTHER_AMOUNTS
                                       if case[0] == currency)):
        body = render("payment_receipt_refunded", language, {**values, "amount": amount})
        _one_sms(body)
        for name in ("type", "ref", "txn", "date", "refunded"):
            assert values[name] in body, (name, body)
        assert body.count(values["refunded"]) >= 1 and amount in body


@pytest.mark.parametrize("currency", CURRENCIES)
@pytest.mark.parametrize("language", sorted(CATALOGS))
@pytest.mark.parametrize(("template", "facts"), [
    # Not confirmed by the provider (197 to 219 septets; 161 to 163 in French and Swahili with a seven-digit
    # reference): which payment, and that money taken is confirmed or refunded.
    ("payment_unconfirmed", ("amount", "type", "ref")),
    # Told failed, then taken after all (235 to 261 septets): which payment, not to pay again, and its receipt's facts.
    ("payment_late_receipt", ("amount", "type", "ref", "txn", "date")),
])
def test_an_unconfirmed_or_late_payment_is_one_sms_in_every_language(template: str, facts: tuple[str, ...],
                                                                      language: str, currency: str) -> None:
    values = _usual(language, currency)
    body = render(template, language, values)
    _one_sms(body)
    for name in facts:
        assert values[name] in body, (name, body)


@pytest.mark.parametrize("language", sorted(CATALOGS))
@pytest.mark.parametrize("template", ["payment_receipt", "payment_late_receipt"])
@pytest.mark.parametrize(("currency", "asked", "taken"), OTHER_AMOUNTS)
def test_a_receipt_of_another_amount_than_asked_is_one_sms_in_every_language(template: str, language: str,
                                                                             currency: str, asked: int,
                                                                             taken: int) -> None:
    """A provider that took less or more than was asked: the receipt states both ("GHS 1,234.56 (GHS 1,500.00
    due)"), and was two SMS (English 168 to 175 septets; French and Kinyarwanda 177, Swahili 171; with a seven-digit
    reference 159 to 164). It fits one, with every fact of the usual receipt kept; the late one too (174 to 186
    septets), which also says not to pay again."""
    collected, amount, both = _other_amount(language, currency, asked, taken)
    values = {**_usual(language, currency), "amount": both}
    del values["dial"]
    if template == "payment_late_receipt":
        del values["coop"]  # which payment: the type, the amounts and the reference say it
    body = render(template, language, values)
    _one_sms(body)
    for value in (collected, amount, *values.values()):
        assert value in body


# The texts the one-SMS tests leave at two, and why: each with how many septets it takes at most with the usual
# values (a seven-digit reference), in any language, with one amount or with what was taken beside what was asked.
TWO_SMS = {
    # A FAILED payment whose money the provider then reported taken (rare: a late report after a failure): it says
    # which payment (amount, type, cooperative, reference), that the failure she was told of was not the end, not to
    # pay again, that her cooperative counts the money or refunds it, and the provider's transaction and its date, her
    # proof of the money taken. One SMS would lose the type, the transaction and the date, and would not fit even
    # then with two amounts in French (about 178 septets).
    "payment_taken_after_failure": 294,
}


@pytest.mark.parametrize("language", sorted(CATALOGS))
@pytest.mark.parametrize("template", sorted(TWO_SMS))
def test_the_texts_left_at_two_sms_are_two_and_no_more(template: str, language: str) -> None:
    """A text on the list that comes to fit one SMS leaves the list for the one-SMS tests; one that grows past its
    septets, or past two SMS, is seen."""
    amounts = [_usual(language, currency)["amount"] for currency in CURRENCIES] + [
        _other_amount(language, *case)[2] for case in OTHER_AMOUNTS]
    sizes = [measure(render(template, language, {**_usual(language, "RWF"), "amount": amount})) for amount in amounts]
    assert {size.encoding for size in sizes} == {GSM7}
    assert max(size.length for size in sizes) <= TWO_SMS[template]
    assert {size.segments for size in sizes} == {2}, [size.length for size in sizes]


@pytest.mark.parametrize("language", sorted(CATALOGS))
@pytest.mark.parametrize("template", ["payment_receipt", "payment_receipt_refunded", "payment_late_receipt",
                                      "payment_taken_after_failure"])
def test_a_receipt_without_a_transaction_id_shows_no_empty_brackets(template: str, language: str) -> None:
    """A payment confirmed without an id the payer can find (M-Pesa confirmed by its status query, whose
    CheckoutRequestID she finds nowhere): French, Kinyarwanda and Swahili put the id in brackets after the reference,
    and showed "(-)"; the brackets go with it. English labels it ("Txn: -"), which says there is none."""
    usual = {**_usual(language, "RWF"), "refunded": "5,000 RWF"}  # (payment_receipt_refunded's)
    values = {**usual, "txn": templates.payer_transaction_id("mpesa", None)}
    body = render(template, language, values)
    assert "(-)" not in body and "()" not in body, body
    assert PAY_REF in body and values["amount"] in body
    with_txn = render(template, language, usual)
    assert "8419567321" in with_txn
    if language == "en":
        assert "Txn: -." in body
    else:
        assert body == with_txn.replace(" (8419567321)", ""), (body, with_txn)


def test_a_dispute_status_of_money_under_review_reads_as_french_writes_it() -> None:
    """dispute_status states the payment's amount as its messages do, AMOUNT_IN_REVIEW too (money taken that counts
    as nothing): French elides "de" before "un montant" ("de un montant" is a mistake any reader sees)."""
    body = render("dispute_status", "fr", {**worst_case("dispute_status", "fr"),
                                           "amount": CATALOGS["fr"].AMOUNT_IN_REVIEW})
    assert "de un " not in body, body
