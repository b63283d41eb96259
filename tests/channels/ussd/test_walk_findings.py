"""What a walk through the menu graph found: a resumed session's language, the offer to continue once left,
"Choose Pay to register" where Pay cannot register, and long Africa's Talking sessions."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

from channels.ussd import sessions
from core.models import Cooperative, Member, PaymentType, UssdSession
from core.phone import normalize
from tests.channels.ussd.helpers import AtPhone
from tests.channels.ussd.test_flows_africastalking import EN_MTN, FR_AIRTEL, RW_MTN, STRANGER, option
from tests.channels.ussd.test_hubtel_nalo_flows import HubtelPhone

OFFER_FR = "CON Vous n'avez pas terminé votre dernière session.\n1. Reprendre où vous étiez\n2. Recommencer"


async def _left_on_the_type_list(client: Any, number: str) -> str:
    """Dial, Pay, and the session drops on the list of payment types: the next dial offers to continue."""
    left = AtPhone(client, number)
    await left.dial()
    types = await left.send("1")
    assert "50,000 RWF" in types, types
    return types


# -- 1. resuming keeps the language chosen since; leaving the offer withdraws it -------------------------

async def test_a_language_chosen_past_the_offer_is_the_one_she_hears_next(client: Any, demo: Any,
                                                                         rt: Any) -> None:
    """Aline left a payment in Kinyarwanda; dialling again she went past the offer to the menu and chose
    French. The next dial greets her in French and offers nothing (it offered the payment she had left, and
    continuing it spoke Kinyarwanda again)."""
    await _left_on_the_type_list(client, RW_MTN)
    chooser = AtPhone(client, RW_MTN)
    assert (await chooser.dial()).startswith("CON Ntiwarangije ibyo watangiye.")
    home = await chooser.send("00")
    languages = await chooser.send(option(home, "Ururimi"))
    french_home = await chooser.send(option(languages, "Francais"))
    assert french_home.startswith("CON Bienvenue")
    assert await rt.redis.get(sessions.resume_key(rt.cipher, normalize(RW_MTN))) is None
    assert (await AtPhone(client, RW_MTN).dial()) == french_home


async def test_continuing_speaks_the_language_of_now(client: Any, demo: Any, rt: Any, db: Any) -> None:
    """Her language changed after she left a session (an operator's edit; or a language chosen in another
    session): the offer and the resumed screens speak the new one, not the saved session's."""
    await _left_on_the_type_list(client, RW_MTN)
    await _speaks(rt, RW_MTN, "fr")
    again = AtPhone(client, RW_MTN)
    assert (await again.dial()) == OFFER_FR
    resumed = await again.send("1")
    assert resumed.startswith("CON Que voulez-vous payer ?"), resumed
    confirm = await again.send(option(resumed, "Water"))
    assert confirm.startswith("CON Payer Water"), confirm
    assert [m.language for m in await db.all(Member, _mine(rt, RW_MTN))] == ["fr"]


async def _speaks(rt: Any, number: str, lang: str) -> None:
    async with rt.sessionmaker.begin() as s:
        for member in (await s.execute(select(Member).where(_mine(rt, number)))).scalars():
            member.language = lang


def _mine(rt: Any, number: str) -> Any:
    return Member.phone_index == rt.cipher.blind_index(normalize(number).e164)


@pytest.mark.parametrize("key", ["0", "00"])
async def test_leaving_the_offer_for_the_menu_withdraws_it(client: Any, demo: Any, rt: Any, key: str) -> None:
    """0 or 00 on "You did not finish your last session" goes to the menu, as "Start again" does; the next
    dial must not offer the screen she chose to leave (it came back on every dial until she continued)."""
    await _left_on_the_type_list(client, EN_MTN)
    past = AtPhone(client, EN_MTN)
    assert (await past.dial()).startswith("CON You did not finish your last session.")
    home = await past.send(key)
    assert home.startswith("CON Welcome to Kigali Heights")
    assert await rt.redis.get(sessions.resume_key(rt.cipher, normalize(EN_MTN))) is None
    assert (await AtPhone(client, EN_MTN).dial()) == home


async def test_start_again_still_withdraws_the_offer(client: Any, demo: Any, rt: Any) -> None:
    await _left_on_the_type_list(client, EN_MTN)
    again = AtPhone(client, EN_MTN)
    await again.dial()
    home = await again.send("2")  # Start again
    assert home.startswith("CON Welcome to")
    assert await rt.redis.get(sessions.resume_key(rt.cipher, normalize(EN_MTN))) is None
    assert (await AtPhone(client, EN_MTN).dial()) == home


async def test_hubtel_leaving_the_offer_for_the_menu_withdraws_it(client: Any, demo: Any) -> None:
    """The same on an aggregator that sends only the latest input."""
    number = "250788000002"
    left = HubtelPhone(client, number, "walk-hubtel-1")
    await left.post("Initiation", "*384*123#")
    await left.post("Response", "1")
    await left.post("Timeout", "")
    past = HubtelPhone(client, number, "walk-hubtel-2")
    assert (await past.post("Initiation", "*384*123#"))["Message"].startswith("You did not finish")
    home = await past.post("Response", "00")
    assert home["Message"].startswith("Welcome to Kigali Heights")
    later = HubtelPhone(client, number, "walk-hubtel-3")
    assert (await later.post("Initiation", "*384*123#"))["Message"] == home["Message"]


async def test_hubtel_continue_speaks_the_language_of_now(client: Any, demo: Any, rt: Any) -> None:
    number = "250788000002"  # Jean Bosco, English
    left = HubtelPhone(client, number, "walk-hubtel-4")
    await left.post("Initiation", "*384*123#")
    await left.post("Response", "1")
    await left.post("Timeout", "")
    await _speaks(rt, EN_MTN, "fr")
    later = HubtelPhone(client, number, "walk-hubtel-5")
    assert (await later.post("Initiation", "*384*123#"))["Message"] == OFFER_FR[4:]
    resumed = await later.post("Response", "1")
    assert resumed["Message"].startswith("Que voulez-vous payer ?"), resumed


# -- 2. "Choose Pay to register" only where Pay registers -----------------------------------------------

async def _closed_cooperative(rt: Any, *, self_registration: bool) -> None:
    async with rt.sessionmaker.begin() as s:
        coop = Cooperative(name="Umoja Savings Group", short_code="UMOJA", country="RW", currency="RWF",
                           status="ACTIVE", ussd_extension="7", self_registration=self_registration)
        s.add(coop)
        await s.flush()
        s.add(PaymentType(cooperative_id=coop.id, name="Share capital", amount_minor=20_000, currency="RWF",
                          is_active=True))


@pytest.mark.parametrize("flow", ["My payments", "Problem with a payment"])
async def test_a_cooperative_that_does_not_register_by_phone_does_not_say_choose_pay(
        client: Any, demo: Any, rt: Any, db: Any, flow: str) -> None:
    """Jean, a member of the demo cooperative only, dials Umoja's code (no registration by phone): told to
    contact its office, not to choose Pay (where Pay would say it does not register members by phone)."""
    await _closed_cooperative(rt, self_registration=False)
    phone = AtPhone(client, EN_MTN, service_code="*384*123*7#")
    home = await phone.dial()
    told = await phone.send(option(home, flow))
    assert told == ("END This phone is not registered with Umoja Savings Group. "
                    "Please contact the cooperative office.")
    row = await db.one(UssdSession, UssdSession.session_id == phone.session_id)
    assert row.last_screen == "member_not_here_office"
    pay = AtPhone(client, EN_MTN, service_code="*384*123*7#")
    await pay.dial()
    assert (await pay.send("1")).startswith("END Umoja Savings Group does not register members by phone.")


async def test_a_cooperative_that_registers_by_phone_still_says_choose_pay(client: Any, demo: Any,
                                                                           rt: Any) -> None:
    await _closed_cooperative(rt, self_registration=True)
    phone = AtPhone(client, EN_MTN, service_code="*384*123*7#")
    home = await phone.dial()
    assert (await phone.send(option(home, "My payments"))) == (
        "END This phone is not registered with Umoja Savings Group. Choose Pay to register.")


async def test_the_office_answer_in_the_members_language(client: Any, demo: Any, rt: Any) -> None:
    await _closed_cooperative(rt, self_registration=False)
    phone = AtPhone(client, FR_AIRTEL, service_code="*384*123*7#")
    await phone.dial()
    assert (await phone.send("2")) == (
        "END Ce téléphone n'est pas inscrit à Umoja Savings Group. Contactez la coopérative.")


# -- 3. long Africa's Talking sessions -----------------------------------------------------------------

async def test_long_inputs_do_not_end_an_africastalking_session(client: Any, demo: Any) -> None:
    """Africa's Talking sends every input so far: three long entries (a name, a wrong amount typed at length)
    took the text past 500 characters and the session ended "Sorry" in English."""
    phone = AtPhone(client, FR_AIRTEL)
    home = await phone.dial()
    for _ in range(6):
        answer = await phone.send("1" * 170)  # not a choice on the menu: the menu again, with an error line
        assert answer.startswith("CON Choix invalide."), answer
    assert len("*".join(phone.inputs)) > 1000
    assert (await phone.send("00")) == home
    assert (await phone.send("1")).startswith("CON Que voulez-vous payer ?")


async def test_a_malformed_hop_ends_in_the_phones_language(client: Any, demo: Any) -> None:
    """A hop the adapter cannot read (here a control character in the text) still ends the session cleanly, in
    the language this process last answered the phone in; an unknown phone hears English."""
    phone = AtPhone(client, FR_AIRTEL)
    await phone.dial()
    phone.inputs.append("1\x01")
    status, body = await phone.post(phone.form())
    assert (status, body) == (200, "END Désolé, votre demande n'a pas abouti. Réessayez plus tard.")
    stranger = AtPhone(client, STRANGER)
    stranger.inputs.append("1\x01")
    assert (await stranger.post(stranger.form()))[1] == (
        "END Sorry, we could not complete your request. Please try again later.")


async def test_a_text_longer_than_any_session_is_still_refused(client: Any, demo: Any) -> None:
    phone = AtPhone(client, RW_MTN)
    await phone.dial()
    phone.inputs.append("1" * (8 * 1024 + 1))
    status, body = await phone.post(phone.form())
    assert (status, body) == (200, "END Twihanganire, ntibyakunze. Ongera ugerageze nyuma.")
