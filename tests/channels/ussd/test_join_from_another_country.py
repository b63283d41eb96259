"""A number of another country asking to join a cooperative on USSD is told it cannot, in her language.

Found walking the join: a Ghanaian number (+233, reaching us through Hubtel) typed a Rwandan cooperative's code, gave
her name and was taken in as a PENDING member: "Thank you ... You will get an SMS once it is approved". Her payments
could never be collected: the cooperative's wallets are Rwanda's and take no Ghanaian number, and USSD offers no bank
method. She is refused at the join step, by its code or by the cooperative's own extension, and nothing is written;
a number of the cooperative's country joins as before. (An admin registering such a number, POST /v1/members, is
warned and not refused: a bank method may collect from her: tests/admin_api, FOREIGN_NUMBER.)"""

from __future__ import annotations

from typing import Any

import pytest

from core.models import Member, UssdSession
from tests.channels.ussd.test_flows_africastalking import option

GHANAIAN = "233244555123"  # MTN Ghana, a member of no cooperative
RWANDAN = "250788555123"  # MTN Rwanda, a member of no cooperative
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
