"""BALANCE by SMS (KHHC BAL, SOLDE, ASIGAYE, SALIO): what an SMS-only member still owes this period of each of her
cooperative's fixed-amount recurring types, in one GSM-7 SMS in her language, as it left the simulator; nothing of
another member's; a stranger told the number is no member's; the per-number reply limits apply."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from sqlalchemy import select, update

from app import create_app
from channels.sms.encoding import GSM7, measure
from channels.sms.routes import REPLY_LIMIT, parse_keyword
from channels.sms.templates import CATALOGS, render
from core.cooperatives import zone_of
from core.db import utcnow
from core.models import Cooperative, Payment, PaymentType
from core.reminders import current_period, utc_midnight
from tests.channels.sms.helpers import make_payment
from tests.channels.sms.test_keyword_replies import ALINE, CLAUDINE, ERIC, JEAN, ask
from tests.channels.sms.test_routes import inbound
from tests.conftest import drain

STRANGER = "+250788555444"


@pytest.mark.parametrize(("text", "language"), [
    ("KHHC BAL", "en"), ("balance", "en"), ("Solde ?", "fr"), ("khhc asigaye", "rw"), ("SALIO", "sw"),
])
def test_balance_keyword_in_every_language(text: str, language: str) -> None:
    assert parse_keyword(text, ("KHHC",)) == ("BALANCE", language, None)


async def _pay(rt: Any, demo: dict[str, Any], phone: str, type_name: str, collected: int) -> None:
    """A completed payment of `type_name` for the member of `phone`, for the period a payment made now pays, of
    which the provider took `collected`."""
    payment = await make_payment(rt, demo["cooperative_id"], account=phone, member_id=demo["members"][phone],
                                 created_at=utcnow())
    async with rt.sessionmaker.begin() as s:
        ptype = (await s.execute(select(PaymentType).where(PaymentType.name == type_name))).scalar_one()
        due, _period = current_period(ptype, utcnow(), zone_of("Africa/Kigali"))
        await s.execute(update(Payment).where(Payment.id == payment.id).values(
            payment_type_id=ptype.id, amount_minor=ptype.amount_minor, collected_minor=collected,
            due_date=utc_midnight(due)))


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
          "Security 2,000 RWF, +1 more. Dial *384*123*123# to pay.",
    ALINE: "Ibyo usigaje kwishyura (KHHC): Garbage 1,000 RWF, Monthly Rent 30,000 RWF, "
           "Security 2,000 RWF, +1 ibindi. Kanda *384*123*123# wishyure.",
    CLAUDINE: "Reste à payer (KHHC): Garbage 1 000 RWF, Monthly Rent 30 000 RWF, "
              "Security 2 000 RWF, +1 autre(s). Composez *384*123*123#.",
    ERIC: "Kiasi cha kulipa (KHHC): Garbage 1,000 RWF, Monthly Rent 30,000 RWF, "
          "Security 2,000 RWF, +1 zaidi. Piga *384*123*123# kulipa.",
}


@pytest.mark.parametrize(("phone", "text"), [(JEAN, "BAL"), (ALINE, "ASIGAYE"), (CLAUDINE, "solde"),
                                             (ERIC, "Salio")])
async def test_she_is_told_what_she_still_owes_this_period(
    rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any, worker: Any, phone: str, text: str,
) -> None:
    """Rent taken 20,000 of 50,000 (30,000 left), water paid: the three owed, in one GSM-7 SMS, "+1 more" for the
    paid one; another member's full payment of the rent changes nothing of hers."""
    await _types(rt, demo)
    await _pay(rt, demo, phone, "Monthly Rent", 20_000)
    await _pay(rt, demo, phone, "Water", 5_000)
    other = JEAN if phone != JEAN else ALINE
    await _pay(rt, demo, other, "Garbage", 1_000)
    reply = await ask(sms_client, sim, worker, phone, text, f"bal-{phone}")
    assert reply == EXPECTED[phone]
    assert measure(reply).encoding == GSM7 and measure(reply).segments == 1


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
