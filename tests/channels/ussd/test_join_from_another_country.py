"""A number of another country asking to join a cooperative on USSD is told it cannot, in her language.

Found walking the join: a Ghanaian number (+233, reaching us through Hubtel) typed a Rwandan cooperative's code, gave
her name and was taken in as a PENDING member: "Thank you ... You will get an SMS once it is approved". Her payments
could never be collected: the cooperative's wallets are Rwanda's and take no Ghanaian number, and USSD offers no bank
method. She is refused at the join step, by its code or by the cooperative's own extension, and nothing is written;
a number of the cooperative's country joins as before. Asking for her payments (or with a problem with one) on that
cooperative's own extension, she was told to "Choose Pay to register", for Pay to refuse her: she is told at once
now, and so is a session of hers left at the name prompt before the check and continued. (An admin registering such
a number, POST /v1/members, is warned and not refused: a bank method may collect from her: tests/admin_api,
FOREIGN_NUMBER.)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from channels.ussd import flows
from core.models import Cooperative, Member, UssdSession
from tests.channels.ussd.helpers import AtPhone
from tests.channels.ussd.test_flows_africastalking import option
from tests.channels.ussd.test_hubtel_nalo_flows import nalo

GHANAIAN = "233244555123"  # MTN Ghana, a member of no cooperative
RWANDAN = "250788555123"  # MTN Rwanda, a member of no cooperative
KENYAN = "+254712555123"  # Safaricom, a member of no cooperative (Africa's Talking sends + numbers)
LOCALES = Path(flows.__file__).parent / "locale"
LANGUAGE_LABEL = {"en": "English", "rw": "Ikinyarwanda", "fr": "Francais", "sw": "Kiswahili"}
REFUSED = {
    "en": "This phone's number is of another country: Kigali Heights Housing Cooperative cannot take payments from "
          "it. Please contact the cooperative office.",
    "fr": "Le numéro de ce téléphone est d'un autre pays : Kigali Heights Housing Cooperative ne peut pas en recevoir "
          "de paiements. Contactez la coopérative.",
    "rw": "Nimero y'iyi telefoni ni iyo mu kindi gihugu: ntishobora kwishyura muri Kigali Heights Housing "
          "Cooperative. Gana ibiro bya koperative.",
    "sw": "Namba ya simu hii ni ya nchi nyingine: haiwezi kulipa kwa Kigali Heights Housing Cooperative. Tafadhali "
          "wasiliana na ofisi ya chama.",
}


# Nalo's 120 characters: the name is shortened, marked "..", as on its other screens.
NALO_REFUSED_REMERA = ("This phone's number is of another country: Remera.. cannot take payments from it. "
                       "Please contact the cooperative office.")


class Hubtel:
    """A Hubtel session of `mobile` dialling `service` (the shared code, or a cooperative's own extension)."""

    def __init__(self, client: Any, mobile: str, session_id: str, service: str) -> None:
        self.client, self.mobile, self.session_id, self.service, self.sequence = client, mobile, session_id, service, 0

    async def post(self, kind: str, message: str) -> dict[str, Any]:
        self.sequence += 1
        resp = await self.client.post("/ussd/hubtel", json={
            "Mobile": self.mobile, "SessionId": self.session_id, "ServiceCode": self.service, "Type": kind,
            "Message": message, "Operator": "mtn", "Sequence": self.sequence, "ClientState": f"s{self.sequence}"})
        assert resp.status == 200, await resp.text()
        return dict(await resp.json())

    async def in_language(self, language: str) -> dict[str, Any]:
        """Dialled, then the language chosen: the home screen in it."""
        home = await self.post("Initiation", f"*{self.service}#")
        if language == "en":
            return home
        languages = await self.post("Response", option(home["Message"], "Language"))
        return await self.post("Response", option(languages["Message"], LANGUAGE_LABEL[language]))


async def _members(db: Any) -> int:
    return int(await db.count(Member))


@pytest.mark.parametrize("language", sorted(REFUSED))
async def test_a_ghanaian_number_typing_a_rwandan_cooperatives_code_is_refused(
        client: Any, demo: dict[str, Any], db: Any, language: str) -> None:
    before = await _members(db)
    phone = Hubtel(client, GHANAIAN, f"gh-join-code-{language}", "384*123")
    home = await phone.in_language(language)
    code = await phone.post("Response", option(home["Message"], {"en": "Pay", "fr": "Payer", "rw": "Kwishyura",
                                                                "sw": "Lipa"}[language]))
    assert code["Type"] == "Response", code
    refused = await phone.post("Response", demo["short_code"])
    assert (refused["Type"], refused["Message"]) == ("Release", REFUSED[language])
    assert await _members(db) == before  # not taken in
    [row] = await db.all(UssdSession, UssdSession.session_id == phone.session_id)
    assert row.last_screen == "reg_foreign"


async def test_a_ghanaian_number_dialling_a_rwandan_cooperatives_extension_is_refused(
        client: Any, demo: dict[str, Any], db: Any) -> None:
    before = await _members(db)
    phone = Hubtel(client, GHANAIAN, "gh-join-extension", "384*123*123")  # Kigali Heights' own extension
    home = await phone.post("Initiation", "*384*123*123#")
    refused = await phone.post("Response", option(home["Message"], "Pay"))
    assert (refused["Type"], refused["Message"]) == ("Release", REFUSED["en"])
    assert await _members(db) == before


async def test_a_number_of_the_cooperatives_country_still_joins(client: Any, demo: dict[str, Any], db: Any) -> None:
    before = await _members(db)
    phone = Hubtel(client, RWANDAN, "rw-join-code", "384*123")
    home = await phone.post("Initiation", "*384*123#")
    await phone.post("Response", option(home["Message"], "Pay"))
    asked = await phone.post("Response", demo["short_code"])
    assert asked["Message"].startswith("Enter your full name to join Kigali Heights Housing Cooperative:"), asked
    done = await phone.post("Response", "Ange Mukamana")
    assert done["Type"] == "Release" and done["Message"].startswith("Thank you Ange Mukamana."), done
    assert await _members(db) == before + 1


# -- not a member here: "My payments" or "Problem with a payment" on the cooperative's own extension ---------------

def _label(language: str, key: str) -> str:
    """A menu line's words in that language's catalog."""
    return str(json.loads((LOCALES / f"{language}.json").read_text(encoding="utf-8"))[key])


@pytest.mark.parametrize("language", sorted(REFUSED))
async def test_a_ghanaian_number_asking_for_her_payments_on_a_rwandan_extension_is_not_invited_to_register(
        client: Any, demo: dict[str, Any], db: Any, language: str) -> None:
    """It said "This phone is not registered with Kigali Heights... Choose Pay to register", and Pay then refused
    her (reg_foreign): she is told at once, in her language, that it cannot take payments from her number."""
    before = await _members(db)
    phone = Hubtel(client, GHANAIAN, f"gh-not-here-{language}", "384*123*123")  # Kigali Heights' own extension
    home = await phone.in_language(language)
    refused = await phone.post("Response", option(home["Message"], _label(language, "menu.my")))
    assert (refused["Type"], refused["Message"]) == ("Release", REFUSED[language])
    assert await _members(db) == before
    [row] = await db.all(UssdSession, UssdSession.session_id == phone.session_id)
    assert row.last_screen == "reg_foreign"


async def test_a_kenyan_number_on_a_rwandan_extension_through_africas_talking(client: Any, demo: dict[str, Any],
                                                                               db: Any) -> None:
    kenyan = AtPhone(client, KENYAN, service_code="*384*123*123#")
    home = await kenyan.dial()
    assert await kenyan.send(option(home, "My payments")) == f"END {REFUSED['en']}"
    problem = AtPhone(client, KENYAN, service_code="*384*123*123#")
    assert await problem.send(option(await problem.dial(), "Problem with a payment")) == f"END {REFUSED['en']}"
    # A Rwandan number that is no member is still invited to join.
    rwandan = AtPhone(client, "+" + RWANDAN, service_code="*384*123*123#")
    assert await rwandan.send(option(await rwandan.dial(), "My payments")) == (
        "END This phone is not registered with Kigali Heights Housing Cooperative. Choose Pay to register.")


async def test_a_ghanaian_number_on_an_office_only_rwandan_extension_through_nalo(client: Any, demo: dict[str, Any],
                                                                                 rt: Any) -> None:
    """A cooperative that registers no member by phone said "contact the cooperative office" (true, but she could
    not pay there once registered): as Pay says (reg_foreign before reg_closed), her number is of another country."""
    async with rt.sessionmaker.begin() as s:
        s.add(Cooperative(name="Remera Teachers SACCO", short_code="RTS", country="RW", currency="RWF",
                          status="ACTIVE", ussd_extension="7", self_registration=False))
    home = await nalo(client, "nalo-gh-office", "*384*123*7#", True, GHANAIAN)
    refused = await nalo(client, "nalo-gh-office", option("END " + home["MSG"], "My payments"), False, GHANAIAN)
    assert (refused["MSGTYPE"], refused["MSG"]) == (False, NALO_REFUSED_REMERA)
    pay = await nalo(client, "nalo-gh-office-pay", "*384*123*7#", True, GHANAIAN)
    assert (await nalo(client, "nalo-gh-office-pay", option("END " + pay["MSG"], "Pay"), False,
                       GHANAIAN))["MSG"] == NALO_REFUSED_REMERA  # the same words as Pay


# -- a session left at the name prompt before the country check ---------------------------------------------------

async def _at_the_name_prompt_before_the_check(client: Any, demo: dict[str, Any], monkeypatch: Any,
                                               session_id: str) -> Hubtel:
    """A Ghanaian number's session at Kigali Heights' name prompt, as the release before the check let her reach."""
    with monkeypatch.context() as before_the_check:
        before_the_check.setattr(flows, "_another_countrys", lambda _ctx, _coop: False)
        phone = Hubtel(client, GHANAIAN, session_id, "384*123")
        home = await phone.post("Initiation", "*384*123#")
        await phone.post("Response", option(home["Message"], "Pay"))
        asked = await phone.post("Response", demo["short_code"])
    assert asked["Message"].startswith("Enter your full name to join Kigali Heights Housing Cooperative:"), asked
    return phone


async def test_a_session_continued_at_the_name_prompt_is_refused_at_once(client: Any, demo: dict[str, Any], db: Any,
                                                                         monkeypatch: Any) -> None:
    before = await _members(db)
    left = await _at_the_name_prompt_before_the_check(client, demo, monkeypatch, "gh-left-at-name")
    assert (await left.post("Timeout", ""))["Type"] == "Release"  # the network drops her session there
    again = Hubtel(client, GHANAIAN, "gh-continued-at-name", "384*123")
    offer = await again.post("Initiation", "*384*123#")
    assert offer["Message"].startswith("You did not finish your last session."), offer
    refused = await again.post("Response", option(offer["Message"], "Continue where you left off"))
    assert (refused["Type"], refused["Message"]) == ("Release", REFUSED["en"])
    assert await _members(db) == before
    [row] = await db.all(UssdSession, UssdSession.session_id == again.session_id)
    assert row.last_screen == "reg_foreign"


async def test_a_name_typed_at_a_prompt_shown_before_the_check_is_refused(client: Any, demo: dict[str, Any], db: Any,
                                                                         monkeypatch: Any) -> None:
    before = await _members(db)
    phone = await _at_the_name_prompt_before_the_check(client, demo, monkeypatch, "gh-name-across-the-upgrade")
    refused = await phone.post("Response", "Ama Mensah")
    assert (refused["Type"], refused["Message"]) == ("Release", REFUSED["en"])
    assert await _members(db) == before
