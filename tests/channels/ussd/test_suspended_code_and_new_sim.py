"""Two USSD end texts testers found untrue, through POST /ussd/africastalking.

A stranger typing a SUSPENDED cooperative's code was told "No cooperative has this code": the code exists, and she
would try it again and again. She is told that the cooperative is not taking payments now (no more than that: not
its name, not why), in her language.

A member's number changed (NEW_SIM, the admin API) while a USSD session of her old number was open: that session's
next hop, refused as her, ended on "Sorry, we could not complete your request. Please try again later.", which
whoever holds that phone cannot act on (trying later cannot help). It says the number is no longer registered for
the member, and to dial again (a new session sees the phone as it now is), in the session's language."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from channels.ussd.i18n import translate
from core import gsm
from core.audit import Actor
from core.members import create_member
from core.models import Cooperative, Member, Payment
from core.phone import normalize
from tests.admin_api.conftest import Caller, bearer
from tests.channels.sms.helpers import make_payment
from tests.channels.ussd.helpers import AtPhone
from tests.channels.ussd.test_flows_africastalking import EN_MTN, FR_AIRTEL, RW_MTN, STRANGER, SW_AIRTEL, option
from tests.channels.ussd.test_language_across_cooperatives import add_cooperative

LOCALE = Path(__file__).resolve().parents[3] / "channels" / "ussd" / "locale"
NOT_TAKING = {
    "en": "END This cooperative is not taking payments now. Please contact the cooperative office.",
    "rw": "END Iyi koperative ntiyakira ubwishyu ubu. Gana ibiro bya koperative.",
    "fr": "END Cette coopérative n'accepte pas de paiements pour le moment. Contactez la coopérative.",
    "sw": "END Chama hiki hakipokei malipo kwa sasa. Tafadhali wasiliana na ofisi ya chama.",
}
LANGUAGE_LABEL = {"en": "English", "rw": "Ikinyarwanda", "fr": "Francais", "sw": "Kiswahili"}


@pytest.fixture
async def admin(client: Any, demo: dict[str, Any]) -> Caller:
    return await bearer(client, *demo["admin"])


async def _suspend(rt: Any, cooperative_id: str) -> None:
    async with rt.sessionmaker.begin() as s:
        coop = await s.get(Cooperative, cooperative_id)
        coop.status = "SUSPENDED"


@pytest.mark.parametrize("language", sorted(NOT_TAKING))
async def test_a_suspended_cooperatives_code_says_it_is_not_taking_payments(
        rt: Any, client: Any, demo: dict[str, Any], db: Any, language: str) -> None:
    await _suspend(rt, demo["cooperative_id"])
    phone = AtPhone(client, STRANGER)
    home = await phone.dial()
    languages = await phone.send(option(home, "Language"))
    home = await phone.send(option(languages, LANGUAGE_LABEL[language]))
    await phone.send("1")  # Pay: not a member, so the cooperative's code first
    told = await phone.send(demo["short_code"].lower())
    assert told == NOT_TAKING[language], told
    assert "Kigali" not in told  # nothing more than that: not its name
    assert await db.count(Member, Member.phone_index == rt.cipher.blind_index("+250788555123")) == 0


async def test_an_unknown_code_is_still_unknown(rt: Any, client: Any, demo: dict[str, Any]) -> None:
    await _suspend(rt, demo["cooperative_id"])
    phone = AtPhone(client, STRANGER)
    await phone.dial()
    await phone.send("1")
    assert (await phone.send("ZZZQ")).startswith("CON No cooperative has this code.")


NUMBER_CHANGED = {
    "en": "END This number is no longer registered for this member. Please dial again.",
    "rw": "END Iyi nimero ntikiyanditse kuri uyu munyamuryango. Ongera utangire.",
    "fr": "END Ce numéro n'est plus inscrit pour ce membre. Recomposez le code.",
    "sw": "END Namba hii haijasajiliwa tena kwa mwanachama huyu. Piga tena.",
}
MEMBERS = {"en": (EN_MTN, "+250788999881"), "rw": (RW_MTN, "+250788999882"),
           "fr": (FR_AIRTEL, "+250733999883"), "sw": (SW_AIRTEL, "+250733999884")}


@pytest.mark.parametrize("language", sorted(MEMBERS))
async def test_an_open_session_of_her_old_number_ends_saying_the_number_changed(
        rt: Any, client: Any, demo: dict[str, Any], db: Any, admin: Caller, language: str) -> None:
    old, new = MEMBERS[language]
    member = demo["members"][old]
    await make_payment(rt, demo["cooperative_id"], account=old, member_id=member)
    live = AtPhone(client, old)
    await live.dial()
    types = await live.send("1")  # Pay
    confirm = await live.send(option(types, "Water") if "Water" in types else "1")
    assert confirm.startswith("CON ")
    await admin.json("PATCH", f"/v1/members/{member}", 200, json={"phone": new, "phoneChange": "NEW_SIM"})
    told = await live.send("1")  # Confirm, from the number that is not hers any more
    assert told == NUMBER_CHANGED[language], told
    assert await db.count(Payment) == 1  # none made: only the payment she had


@pytest.mark.parametrize("entry", ["2", "3"])  # My payments; Problem with a payment
async def test_her_payments_from_the_old_number_end_saying_the_number_changed(
        rt: Any, client: Any, demo: dict[str, Any], admin: Caller, entry: str) -> None:
    member = demo["members"][EN_MTN]
    paid = await make_payment(rt, demo["cooperative_id"], account=EN_MTN, member_id=member)
    live = AtPhone(client, EN_MTN)
    await live.dial()
    await admin.json("PATCH", f"/v1/members/{member}", 200, json={"phone": "+250788999881"})
    told = await live.send(entry)
    assert told == NUMBER_CHANGED["en"] and paid.reference not in told, told


@pytest.mark.parametrize("language", sorted(NOT_TAKING))
def test_the_end_texts_are_gsm7_and_fit_one_screen(language: str) -> None:
    catalog = json.loads((LOCALE / f"{language}.json").read_text())
    for key in ("reg.suspended", "member.number_changed"):
        text = catalog[key]
        assert gsm.is_gsm(text) and gsm.length(text) <= 182, (key, text)


async def test_back_to_her_payments_from_the_old_number_ends_saying_the_number_changed(
        rt: Any, client: Any, demo: dict[str, Any], admin: Caller) -> None:
    """Back to the list of her payments (rendered again, outside the step's choice) ends as a choice does."""
    member = demo["members"][EN_MTN]
    await make_payment(rt, demo["cooperative_id"], account=EN_MTN, member_id=member)
    live = AtPhone(client, EN_MTN)
    await live.dial()
    listed = await live.send("2")  # My payments
    assert listed.startswith("CON "), listed
    detail = await live.send("1")
    assert detail.startswith("CON "), detail
    await admin.json("PATCH", f"/v1/members/{member}", 200, json={"phone": "+250788999881"})
    told = await live.send("0")  # Back: the list again
    assert told == NUMBER_CHANGED["en"], told


# ------------------------------------------------------------------- a suspended cooperative's own code dialled

DEMO = "Kigali Heights Housing Cooperative"


@pytest.mark.parametrize("key", ["1", "2", "3"])  # Pay, My payments, Problem with a payment
async def test_a_suspended_cooperatives_extension_never_opens_her_other_cooperatives_menu(
        rt: Any, client: Any, demo: dict[str, Any], db: Any, key: str) -> None:
    """A member of the demo cooperative and of Remera dials the demo cooperative's own code while the demo
    cooperative is suspended: its extension was looked up among active cooperatives only, found none, and the
    session went on as if she had dialled the shared code, on her one usable membership: Remera's menu, Remera's
    types, a payment to Remera, when she had dialled to pay the demo cooperative. She is told her membership
    there is not active, as when she alone is suspended there; Remera's own code still takes her to Remera."""
    remera = await add_cooperative(rt, "Remera Teachers SACCO", "7")
    async with rt.sessionmaker.begin() as s:
        await create_member(s, rt.cipher, cooperative_id=remera, name="Jean Bosco", phone=normalize(EN_MTN),
                            actor=Actor("system", "system"), language="en", status="ACTIVE")
    await _suspend(rt, demo["cooperative_id"])
    phone = AtPhone(client, EN_MTN, service_code="*384*123*123#")
    home = await phone.dial()
    assert "Remera" not in home, home
    told = await phone.send(key)
    assert told == "END " + translate("en", "member.inactive", coop=DEMO), told
    assert await db.count(Payment) == 0

    remera_code = AtPhone(client, EN_MTN, service_code="*384*123*7#")
    await remera_code.dial()
    assert "Savings" in await remera_code.send("1")  # Remera's own code: Remera's types


async def test_a_stranger_dialling_a_suspended_cooperatives_extension_is_told_it_takes_no_payments(
        rt: Any, client: Any, demo: dict[str, Any], db: Any) -> None:
    """A stranger dialling a suspended cooperative's own code was greeted as on the shared code and, at Pay, asked
    for her cooperative's code (typed, it says the cooperative is not taking payments now): she is told that at
    once, as the typed code tells her, in her language; no registration is made."""
    await _suspend(rt, demo["cooperative_id"])
    phone = AtPhone(client, STRANGER, service_code="*384*123*123#")
    await phone.dial()
    assert await phone.send("1") == NOT_TAKING["en"]
    assert await db.count(Member, Member.phone_index == rt.cipher.blind_index(STRANGER)) == 0
