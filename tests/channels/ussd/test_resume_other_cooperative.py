"""A session left in one cooperative is not continued from a dial of another cooperative's code.

Found walking a Ghanaian member of two cooperatives through Nalo: she left a payment in one, dialled the other's
extension, was offered "Continue where you left off", and Continue showed the first cooperative's payment list
and confirmation (neither names the cooperative): the payment went to the cooperative she had not dialled."""

from __future__ import annotations

from typing import Any

import pytest

from core.models import Payment
from tests.admin_api.conftest import Caller, bearer
from tests.channels.ussd.helpers import AtPhone
from tests.channels.ussd.test_hubtel_nalo_flows import nalo

MEMBER = "+250788111222"
OFFER = "You did not finish your last session."


@pytest.fixture
async def two_coops(client: Any, demo: dict[str, Any]) -> dict[str, str]:
    """Two cooperatives (extensions 41 and 42), one type each, and one member of both."""
    operator: Caller = await bearer(client, *demo["super_admin"])
    ids = {}
    for ext, name, levy in (("41", "Nyamirambo Traders", "Stall levy"), ("42", "Remera Drivers", "Parking fee")):
        coop = await operator.json("POST", "/v1/cooperatives", 201, json={
            "name": name, "shortCode": f"C{ext}", "country": "RW", "ussdExtension": ext})
        await operator.json("POST", "/v1/payment-types", 201, json={
            "name": levy, "amount": 2000, "cooperativeId": coop["id"]})
        await operator.json("POST", "/v1/members", 201, json={"name": "Aline Uwase", "phone": MEMBER,
                                                              "cooperativeId": coop["id"]})
        ids[ext] = coop["id"]
    return ids


async def test_another_cooperatives_code_opens_its_own_menu(client: Any, two_coops: dict[str, str],
                                                            db: Any) -> None:
    left = AtPhone(client, MEMBER, service_code="*384*123*41#")
    await left.dial()
    await left.send("1")
    confirm = await left.send("1")
    assert confirm.startswith("CON Pay Stall levy"), confirm  # and the network drops the session here

    other = AtPhone(client, MEMBER, service_code="*384*123*42#")
    home = await other.dial()
    assert home.startswith("CON Welcome to Remera Drivers\n1. Pay"), home
    # The left session is still offered where it was left: its own cooperative's code.
    back = AtPhone(client, MEMBER, service_code="*384*123*41#")
    assert (await back.dial()).startswith(f"CON {OFFER}")
    assert await back.send("1") == confirm
    await back.send("1")
    payment = await db.one(Payment)
    assert payment.cooperative_id == two_coops["41"]


async def test_continue_never_crosses_to_the_other_cooperative(client: Any, two_coops: dict[str, str],
                                                               db: Any) -> None:
    left = AtPhone(client, MEMBER, service_code="*384*123*42#")
    await left.dial()
    assert "Parking fee" in await left.send("1")  # left on Remera Drivers' list
    other = AtPhone(client, MEMBER, service_code="*384*123*41#")
    assert (await other.dial()).startswith("CON Welcome to Nyamirambo Traders\n1. Pay")
    types = await other.send("1")
    assert "Stall levy" in types and "Parking fee" not in types, types
    await other.send("1")
    await other.send("1")  # Confirm
    payment = await db.one(Payment)
    assert payment.cooperative_id == two_coops["41"]


async def test_the_same_cooperatives_code_through_another_aggregator_still_resumes(
        client: Any, two_coops: dict[str, str]) -> None:
    left = AtPhone(client, MEMBER, service_code="*384*123*41#")
    await left.dial()
    types = await left.send("1")
    # Nalo numbers in international form without "+"; the same phone, the same cooperative's code.
    offer = await nalo(client, "nalo-resume-41", "*384*123*41#", True, MEMBER[1:])
    assert offer["MSG"].startswith(OFFER), offer
    resumed = await nalo(client, "nalo-resume-41", "1", False, MEMBER[1:])
    assert "Stall levy" in resumed["MSG"] and resumed["MSG"].startswith(types[4:].split("\n")[0]), resumed


async def test_a_session_left_at_choose_your_cooperative_is_not_continued_from_one_cooperatives_code(
        client: Any, two_coops: dict[str, str], db: Any) -> None:
    """Left at the shared code's "Choose your cooperative" (the network dropped it), she dialled Nyamirambo Traders'
    own code: "Continue where you left off" showed both cooperatives again, and she paid Remera Drivers from
    Nyamirambo Traders' code. That code opens its own menu; the shared code still offers to continue."""
    left = AtPhone(client, MEMBER)
    await left.dial()
    chooser = await left.send("1")
    assert chooser.startswith("CON Choose your cooperative:"), chooser

    other = AtPhone(client, MEMBER, service_code="*384*123*41#")
    home = await other.dial()
    assert home.startswith("CON Welcome to Nyamirambo Traders\n1. Pay"), home
    types = await other.send("1")
    assert "Stall levy" in types and "Parking fee" not in types, types
    await other.send("1")
    await other.send("1")  # Confirm
    payment = await db.one(Payment)
    assert payment.cooperative_id == two_coops["41"]

    again = AtPhone(client, MEMBER)
    await again.dial()
    await again.send("1")  # the chooser, left again
    shared = AtPhone(client, MEMBER)
    assert (await shared.dial()).startswith(f"CON {OFFER}")
    assert await shared.send("1") == chooser
