"""A number of another country asking to join a cooperative on USSD is told it cannot, in her language.

Found walking the join: a Ghanaian number (+233, reaching us through Hubtel) typed a Rwandan cooperative's code, gave
her name and was taken in as a PENDING member: "Thank you ... You will get an SMS once it is approved". Her payments
could never be collected: the cooperative's wallets are Rwanda's and take no Ghanaian number, and USSD offers no bank
method. She is refused at the join step, by its code or by the cooperative's own extension, and nothing is written;
a number of the cooperative's country joins as before. Asking for her payments (or with a problem with one) on that
cooperative's own extension, she was told to "Choose Pay to register", for Pay to refuse her: she is told at once
now, and so is a session of hers left at the name prompt before the check and continued. (An admin registering such
a number, POST /v1/members, is warned and not refused: a bank method may collect from her: tests/admin_api,
FOREIGN_NUMBER.)

On the shared code (no cooperative named) such a number was still told "Choose Pay to register", and Pay asked for a
code every one of which refused her: where no active cooperative is of her number's country, Pay, My payments and
Problem with a payment tell her at once (reg_foreign_any, naming no cooperative); where one is, she may be joining
it: the code prompt as before, and a code of another country's cooperative typed there refuses her (reg_foreign)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from channels.ussd import cache, flows
from core import gsm
from core.models import Cooperative, Member, UssdSession
from tests.channels.ussd.helpers import AtPhone
from tests.channels.ussd.test_flows_africastalking import option
from tests.channels.ussd.test_hubtel_nalo_flows import nalo
from tests.conftest import sql_sent

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


# The shared code, no cooperative of her number's country (reg_foreign_any): no cooperative named.
REFUSED_ANY = {
    "en": "This phone's number is of another country: no cooperative here can take payments from it. Please contact "
          "your cooperative office.",
    "fr": "Le numéro de ce téléphone est d'un autre pays : aucune coopérative ici ne peut en recevoir de paiements. "
          "Contactez votre coopérative.",
    "rw": "Nimero y'iyi telefoni ni iyo mu kindi gihugu: ntishobora kwishyura muri koperative n'imwe hano. Gana ibiro "
          "bya koperative yawe.",
    "sw": "Namba ya simu hii ni ya nchi nyingine: haiwezi kulipa kwa chama chochote hapa. Tafadhali wasiliana na ofisi "
          "ya chama chako.",
}
# Nalo's 120 characters: its short form.
NALO_REFUSED_ANY = ("This phone's number is of another country: no cooperative here can take payments from it. "
                    "Contact your cooperative.")
PAY = {"en": "Pay", "fr": "Payer", "rw": "Kwishyura", "sw": "Lipa"}


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


async def _a_ghanaian_cooperative(rt: Any, status: str = "ACTIVE") -> None:
    """A cooperative of Ghana beside the demo's Rwandan one: a Ghanaian number on the shared code may be joining it."""
    async with rt.sessionmaker.begin() as s:
        s.add(Cooperative(name="Kumasi Market Women Susu", short_code="KMWS", country="GH", currency="GHS",
                          status=status, ussd_extension="44", self_registration=True))


@pytest.mark.parametrize("language", sorted(REFUSED))
async def test_a_ghanaian_number_typing_a_rwandan_cooperatives_code_is_refused(
        client: Any, demo: dict[str, Any], db: Any, rt: Any, language: str) -> None:
    await _a_ghanaian_cooperative(rt)  # else the shared code's Pay refuses her at once (below)
    before = await _members(db)
    phone = Hubtel(client, GHANAIAN, f"gh-join-code-{language}", "384*123")
    home = await phone.in_language(language)
    code = await phone.post("Response", option(home["Message"], PAY[language]))
    assert (code["Type"], code["Message"].split("\n")[0]) == ("Response", _shown(language, "reg.code")), code
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


def _shown(language: str, key: str, **args: str) -> str:
    """A screen's words as sent: in GSM-7 ("n'êtes" is "n'etes")."""
    return gsm.to_gsm(_label(language, key).format(**args))


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

        async def a_cooperative_of_hers(_ctx: Any) -> bool:
            return False
        before_the_check.setattr(flows, "no_cooperative_of_her_country", a_cooperative_of_hers)
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


# -- the shared code, where no cooperative is of her number's country ---------------------------------------------

SHARED_CODE_CHOICES = ("menu.pay", "menu.my", "menu.dsp")


@pytest.mark.parametrize("choice", SHARED_CODE_CHOICES)
@pytest.mark.parametrize("language", sorted(REFUSED_ANY))
async def test_a_ghanaian_number_on_the_shared_code_of_rwandan_cooperatives_is_told_at_once(
        client: Any, demo: dict[str, Any], db: Any, language: str, choice: str) -> None:
    """Pay asked for a cooperative's code, and every code refused her; My payments and Problem with a payment said
    "Choose Pay to register". No cooperative here is Ghana's: she is told at once, naming none."""
    before = await _members(db)
    phone = Hubtel(client, GHANAIAN, f"gh-shared-{choice}-{language}", "384*123")
    home = await phone.in_language(language)
    refused = await phone.post("Response", option(home["Message"], _label(language, choice)))
    assert (refused["Type"], refused["Message"]) == ("Release", REFUSED_ANY[language])
    assert await _members(db) == before
    [row] = await db.all(UssdSession, UssdSession.session_id == phone.session_id)
    assert (row.last_screen, row.cooperative_id) == ("reg_foreign_any", None)


async def test_a_kenyan_number_on_the_shared_code_through_africas_talking_and_nalos_short_form(
        client: Any, demo: dict[str, Any], db: Any) -> None:
    for choice in ("Pay", "My payments", "Problem with a payment"):
        kenyan = AtPhone(client, KENYAN)
        assert await kenyan.send(option(await kenyan.dial(), choice)) == f"END {REFUSED_ANY['en']}", choice
    for key in ("1", "2", "3"):  # Pay, My payments, Problem with a payment: within Nalo's 120 characters
        session = f"nalo-gh-shared-{key}"
        await nalo(client, session, "*384*123#", True, GHANAIAN)
        refused = await nalo(client, session, key, False, GHANAIAN)
        assert (refused["MSGTYPE"], refused["MSG"]) == (False, NALO_REFUSED_ANY)
    # A Rwandan number that is no member is still asked for a code, and told to register.
    rwandan = AtPhone(client, "+" + RWANDAN)
    assert await rwandan.send(option(await rwandan.dial(), "Pay")) == f"CON {_label('en', 'reg.code')}\n0. Back"
    rwandan = AtPhone(client, "+250788555124")  # another: the first's session at the code prompt is offered again
    assert await rwandan.send(option(await rwandan.dial(), "My payments")) == f"END {_label('en', 'member.none')}"


@pytest.mark.parametrize("language", sorted(REFUSED_ANY))
async def test_with_a_cooperative_of_her_country_the_shared_code_asks_for_its_code(
        client: Any, demo: dict[str, Any], db: Any, rt: Any, language: str) -> None:
    """She may be joining the Ghanaian one: Pay asks for a code, My payments says to choose Pay to register, and her
    cooperative's code takes her name."""
    await _a_ghanaian_cooperative(rt)
    phone = Hubtel(client, GHANAIAN, f"gh-shared-mine-{language}", "384*123")
    home = await phone.in_language(language)
    mine = await phone.post("Response", option(home["Message"], _label(language, "menu.my")))
    assert (mine["Type"], mine["Message"]) == ("Release", _shown(language, "member.none"))
    phone = Hubtel(client, GHANAIAN, f"gh-shared-join-{language}", "384*123")
    home = await phone.post("Initiation", "*384*123#")  # in the language she chose
    code = await phone.post("Response", option(home["Message"], PAY[language]))
    assert (code["Type"], code["Message"].split("\n")[0]) == ("Response", _shown(language, "reg.code"))
    asked = await phone.post("Response", "KMWS")
    assert asked["Message"].split("\n")[0] == _shown(language, "reg.name", coop="Kumasi Market Women Susu"), asked


async def test_a_suspended_cooperative_of_her_country_is_still_hers_to_ask_for(client: Any, demo: dict[str, Any],
                                                                               rt: Any) -> None:
    """A number of Ghana is not "of another country" where a Ghanaian cooperative is, suspended or not: asked for its
    code, she is told it is not taking payments now (tests/channels/ussd/test_suspended_code_and_new_sim.py)."""
    await _a_ghanaian_cooperative(rt, status="SUSPENDED")
    phone = Hubtel(client, GHANAIAN, "gh-shared-suspended", "384*123")
    home = await phone.post("Initiation", "*384*123#")
    code = await phone.post("Response", option(home["Message"], "Pay"))
    assert code["Message"].split("\n")[0] == _shown("en", "reg.code"), code
    told = await phone.post("Response", "KMWS")
    assert (told["Type"], told["Message"]) == ("Release", _shown("en", "reg.suspended"))


async def test_the_check_is_a_strangers_read_kept_a_few_seconds(client: Any, demo: dict[str, Any], rt: Any,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The countries are read once for strangers on the shared code (cache.countries), and never on a member's
    hops (tests/channels/ussd/test_hop_cost.py: her Pay hop sends no statement). The cache's clock stands still
    (_still_clock): a host slow enough to take 5 s over the two sessions would otherwise read them again."""
    _still_clock(monkeypatch)
    first = Hubtel(client, GHANAIAN, "gh-shared-read-1", "384*123")
    home = await first.post("Initiation", "*384*123#")
    with sql_sent(rt) as read:
        assert (await first.post("Response", option(home["Message"], "Pay")))["Type"] == "Release"
    assert [q for q in read if "cooperatives" in q and "DISTINCT" in q.upper()], read
    again = Hubtel(client, GHANAIAN, "gh-shared-read-2", "384*123")
    home = await again.post("Initiation", "*384*123#")
    with sql_sent(rt) as cached:
        assert (await again.post("Response", option(home["Message"], "Pay")))["Type"] == "Release"
    assert not [q for q in cached if "cooperatives" in q], cached


def _still_clock(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """The per-process cache's clock (channels.ussd.cache reads only time.monotonic), standing still until the test
    moves it (`.now`): what is kept stays kept however slowly the host runs the test."""
    clock = SimpleNamespace(now=time.monotonic())
    monkeypatch.setattr(cache, "time", SimpleNamespace(monotonic=lambda: clock.now))
    return clock


async def test_with_no_cooperative_at_all_no_number_is_of_another_country(client: Any, db: Any) -> None:
    phone = AtPhone(client, "+" + RWANDAN)
    assert await phone.send(option(await phone.dial(), "Pay")) == f"CON {_shown('en', 'reg.code')}\n0. Back"


async def test_a_countrys_first_cooperative_is_found_once_the_read_expires(client: Any, demo: dict[str, Any], rt: Any,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's 5 s: a Ghanaian number refused on the shared code is refused for at most cache.TTL_SECONDS after
    Ghana's first cooperative is added, then asked for its code (the countries are read again, not kept for good)."""
    clock = _still_clock(monkeypatch)
    before = Hubtel(client, GHANAIAN, "gh-first-coop-1", "384*123")
    home = await before.post("Initiation", "*384*123#")
    assert (await before.post("Response", option(home["Message"], "Pay")))["Message"] == REFUSED_ANY["en"]
    await _a_ghanaian_cooperative(rt)
    within = Hubtel(client, GHANAIAN, "gh-first-coop-2", "384*123")
    home = await within.post("Initiation", "*384*123#")
    assert (await within.post("Response", option(home["Message"], "Pay")))["Message"] == REFUSED_ANY["en"]
    assert cache.TTL_SECONDS == 5  # what the README says
    clock.now += cache.TTL_SECONDS + 0.1
    after = Hubtel(client, GHANAIAN, "gh-first-coop-3", "384*123")
    home = await after.post("Initiation", "*384*123#")
    code = await after.post("Response", option(home["Message"], "Pay"))
    assert (code["Type"], code["Message"].split("\n")[0]) == ("Response", _shown("en", "reg.code")), code


async def test_a_kenyan_member_of_a_rwandan_cooperative_is_not_refused_on_the_shared_code(
        client: Any, demo: dict[str, Any], rt: Any) -> None:
    """Registered by the office (POST /v1/members warns, takes her): the shared code's check is a stranger's only."""
    from core.audit import Actor
    from core.members import create_member
    from core.phone import normalize

    async with rt.sessionmaker.begin() as s:
        await create_member(s, rt.cipher, cooperative_id=demo["cooperative_id"], name="Wanjiru Kamau",
                            phone=normalize(KENYAN), actor=Actor.system())
    for choice, shown in (("Pay", "CON Choose what to pay:"), ("My payments", "END You have no payments yet."),
                          ("Problem with a payment", "END You have no payments yet.")):
        kenyan = AtPhone(client, KENYAN)
        home = await kenyan.dial()
        if "did not finish" in home:
            home = await kenyan.send(option(home, "Start again"))
        assert (await kenyan.send(option(home, choice))).startswith(shown), choice
