"""BALANCE by SMS (KHHC BAL, SOLDE, ASIGAYE, SALIO): what an SMS-only member still owes this period of each of her
cooperative's fixed-amount recurring types, in one GSM-7 SMS in her language, as it left the simulator; nothing of
another member's; a stranger told the number is no member's; the per-number reply limits apply."""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from app import create_app
from channels.sms.encoding import GSM7, measure
from channels.sms.routes import REPLY_LIMIT, parse_keyword
from channels.sms.templates import CATALOGS, render
from core.audit import Actor
from core.cooperatives import zone_of
from core.db import utcnow
from core.members import create_member, update_member
from core.models import Cooperative, Member, Payment, PaymentType, SmsMessage
from core.phone import mask, normalize
from core.reminders import current_period, utc_midnight
from tests.channels.sms.helpers import make_payment
from tests.channels.sms.test_keyword_replies import ALINE, CLAUDINE, ERIC, JEAN, ask
from tests.channels.sms.test_routes import inbound
from tests.conftest import drain

STRANGER = "+250788555444"
SYSTEM = Actor("system", "system")


@pytest.mark.parametrize(("text", "language"), [
    ("KHHC BAL", "en"), ("balance", "en"), ("Solde ?", "fr"), ("khhc asigaye", "rw"), ("SALIO", "sw"),
])
def test_balance_keyword_in_every_language(text: str, language: str) -> None:
    assert parse_keyword(text, ("KHHC",)) == ("BALANCE", language, None)


async def _pay(rt: Any, demo: dict[str, Any], phone: str, type_name: str, collected: int, *,
               status: str = "COMPLETED") -> None:
    """A completed payment of `type_name` for the member of `phone`, for the period a payment made now pays, of
    which the provider took `collected`; with `status` PENDING, one of `collected` still awaiting her PIN."""
    payment = await make_payment(rt, demo["cooperative_id"], account=phone, member_id=demo["members"][phone],
                                 created_at=utcnow(), status=status)
    async with rt.sessionmaker.begin() as s:
        ptype = (await s.execute(select(PaymentType).where(PaymentType.name == type_name))).scalar_one()
        due, _period = current_period(ptype, utcnow(), zone_of("Africa/Kigali"))
        await s.execute(update(Payment).where(Payment.id == payment.id).values(
            payment_type_id=ptype.id, due_date=utc_midnight(due),
            **({"amount_minor": ptype.amount_minor, "collected_minor": collected} if status == "COMPLETED" else
               {"amount_minor": collected, "collected_minor": None, "provider_transaction_id": None})))


async def _types(rt: Any, demo: dict[str, Any]) -> None:
    """Besides the demo's Monthly Rent (50,000) and Water (5,000): two more fixed monthly types, and three that
    have nothing owed to list (an amount she chooses, one not recurring, one deactivated)."""
    async with rt.sessionmaker.begin() as s:
        for name, amount, extra in [("Security", 2_000, {}), ("Garbage", 1_000, {}),
                                    ("Savings", 0, {"allow_custom_amount": True}),
                                    ("Entry Fee", 10_000, {"is_recurring": False, "due_day": None}),
                                    ("Old Levy", 3_000, {"is_active": False})]:
            s.add(PaymentType(cooperative_id=demo["cooperative_id"], name=name, amount_minor=amount, currency="RWF",
                              **{"is_recurring": True, "recurring_interval": "MONTHLY", "due_day": 5,
                                 "is_active": True, **extra}))


EXPECTED = {
    JEAN: "Still to pay this period (KHHC): Garbage 1,000 RWF, Monthly Rent 30,000 RWF, "
          "Security 2,000 RWF. Dial *384*123*123# to pay.",
    ALINE: "Ibyo usigaje kwishyura (KHHC): Garbage 1,000 RWF, Monthly Rent 30,000 RWF, "
           "Security 2,000 RWF. Kanda *384*123*123# wishyure.",
    CLAUDINE: "Reste à payer (KHHC) : Garbage 1 000 RWF, Monthly Rent 30 000 RWF, "
              "Security 2 000 RWF. Composez *384*123*123#.",
    ERIC: "Kiasi cha kulipa (KHHC): Garbage 1,000 RWF, Monthly Rent 30,000 RWF, "
          "Security 2,000 RWF. Piga *384*123*123# kulipa.",
}


@pytest.mark.parametrize(("phone", "text"), [(JEAN, "BAL"), (ALINE, "ASIGAYE"), (CLAUDINE, "solde"),
                                             (ERIC, "Salio")])
async def test_she_is_told_what_she_still_owes_this_period(
    rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any, worker: Any, phone: str, text: str,
) -> None:
    """Rent taken 20,000 of 50,000 (30,000 left), water paid: the three owed, in one GSM-7 SMS, no "+1 more" for the
    paid one (it said "+1 more", though nothing more was owed); another member's full payment of the rent changes
    nothing of hers."""
    await _types(rt, demo)
    await _pay(rt, demo, phone, "Monthly Rent", 20_000)
    await _pay(rt, demo, phone, "Water", 5_000)
    other = JEAN if phone != JEAN else ALINE
    await _pay(rt, demo, other, "Garbage", 1_000)
    reply = await ask(sms_client, sim, worker, phone, text, f"bal-{phone}")
    assert reply == EXPECTED[phone]
    assert measure(reply).encoding == GSM7 and measure(reply).segments == 1


OPEN = {
    JEAN: "Still to pay this period (KHHC): Garbage 1,000 RWF awaiting approval, Monthly Rent 30,000 RWF awaiting "
          "approval, +2 more. Dial *384*123*123# to pay.",
    ALINE: "Ibyo usigaje kwishyura (KHHC): Garbage 1,000 RWF dutegereje ko wemeza, Monthly Rent 30,000 RWF "
           "dutegereje ko wemeza, +2 ibindi. Kanda *384*123*123# wishyure.",
    CLAUDINE: "Reste à payer (KHHC) : Garbage 1 000 RWF en attente d'approbation, Monthly Rent 30 000 RWF en "
              "attente d'approbation, +2 autre(s). Composez *384*123*123#.",
    ERIC: "Kiasi cha kulipa (KHHC): Garbage 1,000 RWF inasubiri uthibitisho wako, Monthly Rent 30,000 RWF inasubiri "
          "uthibitisho wako, +2 zaidi. Piga *384*123*123# kulipa.",
}


@pytest.mark.parametrize(("phone", "text"), [(JEAN, "BAL"), (ALINE, "ASIGAYE"), (CLAUDINE, "solde"),
                                             (ERIC, "Salio")])
async def test_a_payment_awaiting_her_pin_is_said_in_the_same_sms(
    rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any, worker: Any, phone: str, text: str,
) -> None:
    """Rent taken 20,000 of 50,000 and the 30,000 left asked, garbage asked: both prompts still wait for her PIN.
    The reply said she owed both in full as if nothing were under way (she paid again); now it says what awaits
    her approval, those types first so that no "+N more" hides it, in one GSM-7 SMS."""
    await _types(rt, demo)
    await _pay(rt, demo, phone, "Monthly Rent", 20_000)
    await _pay(rt, demo, phone, "Monthly Rent", 30_000, status="PENDING")
    await _pay(rt, demo, phone, "Garbage", 1_000, status="PROCESSING")
    other = JEAN if phone != JEAN else ALINE
    await _pay(rt, demo, other, "Security", 2_000, status="PENDING")  # another member's: nothing of hers
    reply = await ask(sms_client, sim, worker, phone, text, f"bal-open-{phone}")
    assert reply == OPEN[phone]
    assert measure(reply).encoding == GSM7 and measure(reply).segments == 1


async def test_an_open_payment_of_another_amount_is_said_with_its_own(
    rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any, worker: Any,
) -> None:
    """Water paid, and a second prompt for it on her phone (an API payment): "paid" and what the prompt asks; rent
    20,000 asked of the 50,000 owed: both amounts."""
    await _pay(rt, demo, JEAN, "Water", 5_000)
    await _pay(rt, demo, JEAN, "Water", 5_000, status="PENDING")
    await _pay(rt, demo, JEAN, "Monthly Rent", 20_000, status="PENDING")
    assert await ask(sms_client, sim, worker, JEAN, "BAL", "bal-open-other") == (
        "Still to pay this period (KHHC): Monthly Rent 50,000 RWF (20,000 RWF awaiting approval), "
        "Water paid (5,000 RWF awaiting approval). Dial *384*123*123# to pay.")


async def test_long_names_are_cut_between_words(rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any,
                                                worker: Any) -> None:
    """A name longer than BALANCE_NAME ends at the last word that fits ("Monthly security lev" was sent); one with
    no space in its first characters is cut where it must."""
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(PaymentType).where(PaymentType.cooperative_id == demo["cooperative_id"]).values(
            is_active=False))
        for name in ("Monthly security levy", "Cooperativecontributions"):
            s.add(PaymentType(cooperative_id=demo["cooperative_id"], name=name, amount_minor=1_000, currency="RWF",
                              is_recurring=True, recurring_interval="MONTHLY", due_day=5, is_active=True))
    assert await ask(sms_client, sim, worker, JEAN, "BAL", "bal-cut") == (
        "Still to pay this period (KHHC): Cooperativecontribut 1,000 RWF, Monthly security 1,000 RWF. "
        "Dial *384*123*123# to pay.")


async def test_a_name_whose_word_ends_at_the_limit_keeps_that_word(rt: Any, demo: dict[str, Any], sms_client: Any,
                                                                    sim: Any, worker: Any) -> None:
    """"Garbage and security levy": its first BALANCE_NAME characters end with a whole word ("Garbage and
    security"), which is kept, not cut back to "Garbage and"."""
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(PaymentType).where(PaymentType.cooperative_id == demo["cooperative_id"]).values(
            is_active=False))
        s.add(PaymentType(cooperative_id=demo["cooperative_id"], name="Garbage and security levy", amount_minor=1_000,
                          currency="RWF", is_recurring=True, recurring_interval="MONTHLY", due_day=5, is_active=True))
    assert await ask(sms_client, sim, worker, JEAN, "BAL", "bal-word-at-limit") == (
        "Still to pay this period (KHHC): Garbage and security 1,000 RWF. Dial *384*123*123# to pay.")


async def test_names_cut_alike_are_told_apart(rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any,
                                             worker: Any) -> None:
    """Two names that differ in their first BALANCE_NAME characters but not before their last space there: cut
    between words both read "Amafaranga" (which is which was paid?); such names are cut where they must, as before,
    which tells them apart."""
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(PaymentType).where(PaymentType.cooperative_id == demo["cooperative_id"]).values(
            is_active=False))
        for name, amount in (("Amafaranga y'umutekano", 2_000), ("Amafaranga y'ubwisungane", 3_000),
                             ("Monthly security levy", 1_000)):
            s.add(PaymentType(cooperative_id=demo["cooperative_id"], name=name, amount_minor=amount, currency="RWF",
                              is_recurring=True, recurring_interval="MONTHLY", due_day=5, is_active=True))
    assert await ask(sms_client, sim, worker, JEAN, "BAL", "bal-alike") == (
        "Still to pay this period (KHHC): Amafaranga y'ubwisun 3,000 RWF, Amafaranga y'umuteka 2,000 RWF, "
        "Monthly security 1,000 RWF. Dial *384*123*123# to pay.")


async def test_names_alike_in_their_first_characters_keep_their_ends(rt: Any, demo: dict[str, Any], sms_client: Any,
                                                                     sim: Any, worker: Any) -> None:
    """Each block's rent: both cut to "Monthly Rent - Block" (which one is paid?). They keep the end that tells
    them apart, as the USSD list names them."""
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(PaymentType).where(PaymentType.cooperative_id == demo["cooperative_id"]).values(
            is_active=False))
        for name, amount in (("Monthly Rent - Block A", 50_000), ("Monthly Rent - Block B", 40_000)):
            s.add(PaymentType(cooperative_id=demo["cooperative_id"], name=name, amount_minor=amount, currency="RWF",
                              is_recurring=True, recurring_interval="MONTHLY", due_day=5, is_active=True))
    await _pay(rt, demo, JEAN, "Monthly Rent - Block B", 40_000)
    assert await ask(sms_client, sim, worker, JEAN, "BAL", "bal-blocks") == (
        "Still to pay this period (KHHC): Monthly Ren..Block A 50,000 RWF, Monthly Ren..Block B paid. "
        "Dial *384*123*123# to pay.")


async def test_paid_types_say_paid(rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any, worker: Any) -> None:
    await _pay(rt, demo, JEAN, "Water", 5_000)
    assert await ask(sms_client, sim, worker, JEAN, "BALANCE", "bal-paid") == (
        "Still to pay this period (KHHC): Monthly Rent 50,000 RWF, Water paid. "
        "Dial *384*123*123# to pay.")
    await _pay(rt, demo, JEAN, "Monthly Rent", 50_000)
    assert await ask(sms_client, sim, worker, JEAN, "BALANCE", "bal-paid-2") == (
        "Still to pay this period (KHHC): Monthly Rent paid, Water paid. "
        "Dial *384*123*123# to pay.")


async def test_on_the_shared_code_and_to_a_stranger(
    rt: Any, demo: dict[str, Any], aiohttp_client: Any, sim: Any, worker: Any,
) -> None:
    rt.settings = dataclasses.replace(rt.settings, sms_shortcode_keywords=("KHHC",))
    client = await aiohttp_client(create_app(rt.settings, runtime=rt))
    assert await ask(client, sim, worker, ALINE, "KHHC ASIGAYE", "bal-kw") == (
        "Ibyo usigaje kwishyura (KHHC): Monthly Rent 50,000 RWF, Water 5,000 RWF. "
        "Kanda *384*123*123# wishyure.")
    stranger = await ask(client, sim, worker, STRANGER, "KHHC BAL", "bal-stranger")
    assert stranger == "This phone number is not registered with any cooperative. Please contact your cooperative."
    assert stranger == render("not_member", "en", {})


async def test_a_member_who_cannot_pay_gets_no_balance(
    rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any, worker: Any,
) -> None:
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Cooperative).where(Cooperative.id == demo["cooperative_id"]).values(status="SUSPENDED"))
    assert await ask(sms_client, sim, worker, ERIC, "SALIO", "bal-susp") == render("help_suspended", "sw", {})


async def test_balance_replies_count_toward_the_reply_limit(
    rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any, worker: Any,
) -> None:
    for i in range(REPLY_LIMIT.count + 2):
        await inbound(sms_client, JEAN, "BAL", f"bal-flood-{i}")
    await drain(worker)
    assert len(sim.messages(JEAN)) == REPLY_LIMIT.count


@pytest.mark.parametrize("language", sorted(CATALOGS))
def test_help_names_balance_in_one_sms(language: str) -> None:
    body = render("help", language, {"dial": "*384*123*123#", "kw": "KHHC"})
    assert f"KHHC {CATALOGS[language].KEYWORDS['BALANCE'][0]}" in body
    assert measure(body).encoding == GSM7 and measure(body).segments == 1, body


async def _second_membership(rt: Any, phone: str, language: str = "en") -> str:
    """`phone`'s membership of a second cooperative (OTHER, on the same shared code), with one fixed monthly type."""
    async with rt.sessionmaker.begin() as s:
        coop = Cooperative(name="Other Coop", short_code="OTHER", country="RW", currency="RWF",
                           timezone="Africa/Kigali", status="ACTIVE", ussd_extension="77")
        s.add(coop)
        await s.flush()
        s.add(PaymentType(cooperative_id=coop.id, name="Shares", amount_minor=7_000, currency="RWF",
                          is_recurring=True, recurring_interval="MONTHLY", due_day=5, is_active=True))
        await create_member(s, rt.cipher, cooperative_id=coop.id, name="Jean Other", phone=normalize(phone),
                            language=language, actor=SYSTEM)
        return coop.id


async def test_a_member_of_two_cooperatives_gets_the_balance_of_the_one_her_text_names(
    rt: Any, demo: dict[str, Any], aiohttp_client: Any, sim: Any, worker: Any,
) -> None:
    """On the shared code the word she begins with is her cooperative's short code: OTHER BAL is OTHER's balance,
    KHHC BAL is KHHC's (it used to be the first membership's whichever she named)."""
    await _second_membership(rt, JEAN)
    rt.settings = dataclasses.replace(rt.settings, sms_shortcode_keywords=("KHHC", "OTHER"))
    client = await aiohttp_client(create_app(rt.settings, runtime=rt))
    other = await ask(client, sim, worker, JEAN, "OTHER BAL", "bal-two-1")
    assert other == "Still to pay this period (OTHER): Shares 7,000 RWF. Dial *384*123*77# to pay."
    khhc = await ask(client, sim, worker, JEAN, "KHHC BAL", "bal-two-2")
    assert khhc.startswith("Still to pay this period (KHHC): Monthly Rent 50,000 RWF"), khhc


async def test_a_member_of_two_cooperatives_names_the_one_she_asks_about_after_the_keyword(
    rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any, worker: Any,
) -> None:
    """Without a shared code's keywords (SMS_SHORTCODE_KEYWORDS) "BAL OTHER" was KHHC's balance, the word dropped:
    she had no way to ask about her second cooperative. A word that is none of her cooperatives' codes is her
    first membership's, as before."""
    await _second_membership(rt, JEAN)
    other = await ask(sms_client, sim, worker, JEAN, "BAL other", "bal-after-1")
    assert other == "Still to pay this period (OTHER): Shares 7,000 RWF. Dial *384*123*77# to pay."
    khhc = await ask(sms_client, sim, worker, JEAN, "BALANCE KHHC", "bal-after-2")
    assert khhc.startswith("Still to pay this period (KHHC): Monthly Rent 50,000 RWF"), khhc
    nobody = await ask(sms_client, sim, worker, JEAN, "BAL NOPE", "bal-after-3")
    assert nobody.startswith("Still to pay this period (KHHC): "), nobody
    helped = await ask(sms_client, sim, worker, JEAN, "HELP OTHER", "bal-after-4")
    assert helped.startswith("Dial *384*123*77# to pay."), helped


async def test_a_balance_is_not_sent_to_a_number_she_no_longer_holds(
    rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any, worker: Any,
) -> None:
    """Asked, then her number changed (a new SIM) before the reply was built: the old number, perhaps already
    someone else's, does not get what she owes; neither does the new one (it did not ask)."""
    await inbound(sms_client, JEAN, "BAL", "bal-moved")
    async with rt.sessionmaker.begin() as s:
        member = await s.get(Member, demo["members"][JEAN])
        await update_member(s, member, actor=SYSTEM, phone=normalize("+250788999111"), cipher=rt.cipher)
    await drain(worker)
    assert sim.messages(JEAN) == [] and sim.messages("+250788999111") == []


@pytest.mark.parametrize("language", sorted(CATALOGS))
async def test_long_names_and_amounts_still_fit_one_sms(
    rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any, worker: Any, language: str,
) -> None:
    """Four types with 20-character names and six-figure prices: fewer listed, the rest "+N more", in one SMS."""
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Member).where(Member.id == demo["members"][JEAN]).values(language=language))
        for name in ("Umusanzu w'ukwezi wa koperative", "Ubwiteganyirize bw'abanyamuryango",
                     "Inguzanyo y'ishuri ry'abana", "Amafaranga y'isuku n'umutekano"):
            s.add(PaymentType(cooperative_id=demo["cooperative_id"], name=name, amount_minor=1_250_000,
                              currency="RWF", is_recurring=True, recurring_interval="MONTHLY", due_day=5,
                              is_active=True))
    reply = await ask(sms_client, sim, worker, JEAN, "BAL", f"bal-long-{language}")
    assert measure(reply).segments == 1, reply
    assert CATALOGS[language].BALANCE_MORE.split("{")[0] in reply, reply


async def test_a_cooperative_of_many_types_is_read_at_most_balance_read_types(
    rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any, worker: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Twenty fixed monthly types besides the demo's two: the text reads the balance of BALANCE_READ of them (a query
    each), not of every one, and counts the others in "+N more" (every type named or counted once)."""
    import channels.sms.templates as templates

    async with rt.sessionmaker.begin() as s:
        for i in range(20):
            s.add(PaymentType(cooperative_id=demo["cooperative_id"], name=f"Levy {i:02d}", amount_minor=1_000,
                              currency="RWF", is_recurring=True, recurring_interval="MONTHLY", due_day=5,
                              is_active=True))
    reads: list[str] = []
    real = templates.balance_now

    async def counted(conn: Any, member_id: str, ptype: Any, timezone: str | None, **kwargs: Any) -> Any:
        reads.append(ptype.name)
        return await real(conn, member_id, ptype, timezone, **kwargs)

    monkeypatch.setattr(templates, "balance_now", counted)
    reply = await ask(sms_client, sim, worker, JEAN, "BAL", "bal-many")
    assert len(reads) == templates.BALANCE_READ
    named = reply.split(": ", 1)[1].split(". Dial")[0].split(", ")
    more = int(named[-1].removeprefix("+").removesuffix(" more"))
    assert len(named) - 1 + more == 22, reply
    assert measure(reply).segments == 1, reply


async def test_an_open_payment_past_the_types_read_is_read_and_listed_first(
    rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any, worker: Any,
) -> None:
    """Twenty fixed monthly types named before the demo's Water: her payment of Water awaiting approval is read and
    said first, not hidden in "+N more" (she would pay it again)."""
    async with rt.sessionmaker.begin() as s:
        for i in range(20):
            s.add(PaymentType(cooperative_id=demo["cooperative_id"], name=f"Levy {i:02d}", amount_minor=1_000,
                              currency="RWF", is_recurring=True, recurring_interval="MONTHLY", due_day=5,
                              is_active=True))
    await _pay(rt, demo, JEAN, "Water", 2_000, status="PENDING")
    reply = await ask(sms_client, sim, worker, JEAN, "BAL", "bal-open-late")
    assert reply.startswith(
        "Still to pay this period (KHHC): Water 5,000 RWF (2,000 RWF awaiting approval), Levy 00 1,000 RWF"), reply
    named = reply.split(": ", 1)[1].split(". Dial")[0].split(", ")
    assert int(named[-1].removeprefix("+").removesuffix(" more")) == 22 - (len(named) - 1), reply
    assert measure(reply).segments == 1, reply


async def test_a_prompt_left_on_her_lost_sim_is_not_said_to_await_her_approval(
    rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any, worker: Any,
) -> None:
    """Her rent's PIN prompt waits on the SIM she lost (her number corrected since, NEW_SIM): only her PIN there
    approves it, and the USSD lets her pay from her new number (core.payments.approvable_by). The BALANCE reply
    from her new number said the rent was "awaiting approval", so she did not pay it; now it says what she owes.
    Her husband's prompt, paying her water for her from his phone, still awaits approval."""
    new = "+250788999222"
    await _pay(rt, demo, JEAN, "Monthly Rent", 50_000, status="PENDING")
    await _pay(rt, demo, JEAN, "Water", 5_000, status="PENDING")
    async with rt.sessionmaker.begin() as s:
        rows = (await s.execute(select(Payment).where(Payment.member_id == demo["members"][JEAN])
                                .order_by(Payment.created_at))).scalars().all()
        rows[0].payment_account_masked = mask(JEAN)  # from her own (old) number
        rows[1].payment_account_masked = mask("+250788123111")  # her husband's
    async with rt.sessionmaker.begin() as s:
        member = await s.get(Member, demo["members"][JEAN])
        await update_member(s, member, actor=SYSTEM, phone=normalize(new), cipher=rt.cipher, phone_change="NEW_SIM")
    assert await ask(sms_client, sim, worker, new, "BAL", "bal-lost-sim") == (
        "Still to pay this period (KHHC): Water 5,000 RWF awaiting approval, Monthly Rent 50,000 RWF. "
        "Dial *384*123*123# to pay.")


async def _opened(rt: Any, demo: dict[str, Any], type_name: str, status: str, ago: timedelta) -> None:
    """Jean's payment of `type_name` (its price, `status`) made `ago` before now: its approval window
    (PAYMENT_TIMEOUT_SECONDS, an MTN prompt's) runs from then."""
    await _pay(rt, demo, JEAN, type_name, 0, status=status)
    made = utcnow() - ago
    async with rt.sessionmaker.begin() as s:
        ptype = (await s.execute(select(PaymentType).where(PaymentType.name == type_name))).scalar_one()
        await s.execute(update(Payment).where(Payment.member_id == demo["members"][JEAN],
                                              Payment.payment_type_id == ptype.id).values(
            amount_minor=ptype.amount_minor, created_at=made, updated_at=made,
            expires_at=made + timedelta(seconds=rt.settings.payment_timeout_seconds)))


@pytest.mark.parametrize("status", ["PENDING", "PROCESSING"])
async def test_a_prompt_past_its_approval_window_is_not_said_to_await_her_approval(
    rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any, worker: Any, status: str,
) -> None:
    """Her rent's prompt is past its approval window (PENDING past it; PROCESSING past it and the grace the
    provider's word is waited for): it can no longer be approved, and the worker closes it as TIMEOUT at its next
    poll. The USSD lets her pay beside it (core.payments: still open only inside the window); the BALANCE reply
    said the rent was "awaiting approval" all the same, so she did not pay it. Now it says what she owes. Her water
    prompt, inside the window (PROCESSING: within the grace), still awaits her approval."""
    window = timedelta(seconds=rt.settings.payment_timeout_seconds)
    grace = timedelta(seconds=rt.settings.payment_pending_grace_seconds)
    past = window + (grace if status == "PROCESSING" else timedelta()) + timedelta(minutes=1)
    inside = (window + grace / 2) if status == "PROCESSING" else window / 2
    await _opened(rt, demo, "Monthly Rent", status, past)
    await _opened(rt, demo, "Water", status, inside)
    assert await ask(sms_client, sim, worker, JEAN, "BAL", f"bal-past-window-{status}") == (
        "Still to pay this period (KHHC): Water 5,000 RWF awaiting approval, Monthly Rent 50,000 RWF. "
        "Dial *384*123*123# to pay.")


async def test_a_member_of_two_cooperatives_gets_the_help_of_the_one_her_text_names(
    rt: Any, demo: dict[str, Any], aiohttp_client: Any, sim: Any, worker: Any,
) -> None:
    """HELP, and the reply to a word not understood, name the code to dial of the cooperative whose short code her text
    begins with, as BALANCE does: OTHER HELP told her to dial KHHC's code (her first membership's) beside "OTHER
    RECEIPT ...", and she paid the wrong cooperative."""
    await _second_membership(rt, JEAN)
    rt.settings = dataclasses.replace(rt.settings, sms_shortcode_keywords=("KHHC", "OTHER"))
    client = await aiohttp_client(create_app(rt.settings, runtime=rt))
    other = await ask(client, sim, worker, JEAN, "OTHER HELP", "help-two-1")
    assert other.startswith("Dial *384*123*77# to pay. SMS: OTHER RECEIPT <ref>"), other
    khhc = await ask(client, sim, worker, JEAN, "KHHC HELP", "help-two-2")
    assert "*384*123*77#" not in khhc and khhc.startswith("Dial *384*123"), khhc
    unknown = await ask(client, sim, worker, JEAN, "OTHER hello", "help-two-3")
    assert unknown == "Sorry, we did not understand. Send OTHER HELP or dial *384*123*77#.", unknown


async def test_a_member_of_two_cooperatives_is_answered_in_the_language_of_the_one_her_text_names(
    rt: Any, demo: dict[str, Any], aiohttp_client: Any, sim: Any, worker: Any,
) -> None:
    """A member's language is her membership's: Jean is English at KHHC and French at OTHER. HELP, BALANCE and the
    reply to a word not understood speak for the membership her text's short code names, in its language (they
    named OTHER's code in KHHC's English); a keyword written in another language than English still answers in
    that language."""
    await _second_membership(rt, JEAN, language="fr")
    rt.settings = dataclasses.replace(rt.settings, sms_shortcode_keywords=("KHHC", "OTHER"))
    client = await aiohttp_client(create_app(rt.settings, runtime=rt))
    other = await ask(client, sim, worker, JEAN, "OTHER HELP", "lang-two-1")
    assert other.startswith("Composez *384*123*77# pour payer. SMS : OTHER RECU <réf>"), other
    unknown = await ask(client, sim, worker, JEAN, "OTHER hello", "lang-two-2")
    assert unknown == "Message non compris. Envoyez OTHER AIDE ou composez *384*123*77#.", unknown
    balance = await ask(client, sim, worker, JEAN, "OTHER BAL", "lang-two-3")
    assert balance == "Reste à payer (OTHER) : Shares 7 000 RWF. Composez *384*123*77#.", balance
    khhc = await ask(client, sim, worker, JEAN, "KHHC HELP", "lang-two-4")
    assert khhc.startswith("Dial *384*123") and "*77#" not in khhc, khhc
    async with rt.sessionmaker() as s:
        languages = (await s.execute(select(SmsMessage.template, SmsMessage.language).order_by(SmsMessage.created_at)
                                     )).all()
    assert [tuple(row) for row in languages] == [
        ("help", "fr"), ("unknown", "fr"), ("balance", "fr"), ("help", "en")], languages


async def test_a_pending_member_gets_no_balance(
    rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any, worker: Any,
) -> None:
    """A membership still PENDING (registered by USSD, not yet approved) cannot pay: BALANCE tells her so, as it tells
    a suspended one, rather than listing dues she cannot pay by phone."""
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Member).where(Member.id == demo["members"][ERIC]).values(status="PENDING"))
    assert await ask(sms_client, sim, worker, ERIC, "SALIO", "bal-pending") == render("help_suspended", "sw", {})
