"""Hubtel and Nalo sessions end to end through their endpoints."""

from __future__ import annotations

from typing import Any

import pytest

from core.models import Cooperative, OutboxJob, Payment, UssdSession

FR_AIRTEL = "250733000001"
EN_MTN = "250788000002"


class HubtelPhone:
    def __init__(self, client: Any, mobile: str, session_id: str, operator: str = "mtn") -> None:
        self.client, self.mobile, self.session_id, self.sequence = client, mobile, session_id, 0
        self.operator = operator  # Hubtel's Operator: the network the subscriber is on

    async def post(self, kind: str, message: str, *, sequence: int | None = None) -> dict[str, Any]:
        if sequence is None:
            self.sequence += 1
            sequence = self.sequence
        resp = await self.client.post("/ussd/hubtel", json={
            "Mobile": self.mobile, "SessionId": self.session_id, "ServiceCode": "384*123", "Type": kind,
            "Message": message, "Operator": self.operator, "Sequence": sequence, "ClientState": f"s{sequence}"})
        assert resp.status == 200, await resp.text()
        assert resp.content_type == "application/json"
        return await resp.json()


async def test_hubtel_full_pay_flow(client: Any, demo: Any, db: Any) -> None:
    phone = HubtelPhone(client, EN_MTN, "hubtel-session-0001")
    first = await phone.post("Initiation", "*384*123#")
    assert first["Type"] == "Response" and first["Message"].startswith("Welcome to Kigali Heights")
    assert first["ClientState"] == "s1"
    types = await phone.post("Response", "1")
    assert "Monthly Rent" in types["Message"]
    # A retried hop (same Sequence) answers the same screen.
    assert (await phone.post("Response", "1", sequence=2))["Message"] == types["Message"]
    confirm = await phone.post("Response", "1")
    assert confirm["Message"].startswith("Pay Monthly Rent")
    done = await phone.post("Response", "1")
    assert done["Type"] == "Release" and done["Message"].startswith("Approve the prompt on your phone")
    again = await phone.post("Response", "1", sequence=4)
    assert again == done
    payment = await db.one(Payment)
    assert payment.idempotency_key == "ussd:hubtel:hubtel-session-0001"
    assert await db.count(OutboxJob, OutboxJob.kind == "payment.collect") == 1


async def test_hubtel_release_marks_the_session_incomplete_and_offers_resume(client: Any, demo: Any,
                                                                            db: Any) -> None:
    phone = HubtelPhone(client, EN_MTN, "hubtel-session-0002")
    await phone.post("Initiation", "*384*123#")
    await phone.post("Response", "1")
    closing = await phone.post("Timeout", "")
    assert closing["Type"] == "Release"
    row = await db.one(UssdSession)
    assert row.status == "Incomplete" and row.last_screen == "pay_type"
    later = HubtelPhone(client, EN_MTN, "hubtel-session-0003")
    offer = await later.post("Initiation", "*384*123#")
    assert offer["Message"].startswith("You did not finish your last session.")
    resumed = await later.post("Response", "1")
    assert resumed["Message"].startswith("Choose what to pay:")


# Nalo's NETWORK for a number never ported: the name of its range's operator as Nalo spells it.
_NALO_NETWORKS = {"MTN": "MTN", "TELECEL": "VODAFONE", "AIRTELTIGO": "AIRTELTIGO"}


def nalo_network(msisdn: str) -> str:
    from core.phone import normalize

    operator = normalize(msisdn, "GH").operator or ""
    return _NALO_NETWORKS.get(operator, operator or "MTN")


async def nalo(client: Any, session_id: str, userdata: str, first: bool,
               msisdn: str = FR_AIRTEL, network: str | None = None) -> dict[str, Any]:
    resp = await client.post("/ussd/nalo", json={
        "USERID": "NALOTest", "MSISDN": msisdn, "USERDATA": userdata, "MSGTYPE": first,
        "NETWORK": nalo_network(msisdn) if network is None else network, "SESSIONID": session_id})
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["USERID"] == "NALOTest" and body["MSISDN"] == msisdn
    assert len(body["MSG"]) <= 120, body["MSG"]
    return body


async def test_nalo_full_pay_flow_in_french_within_120_characters(client: Any, demo: Any, db: Any) -> None:
    home = await nalo(client, "nalo-1", "*384*123#", True)
    assert home["MSGTYPE"] is True and home["MSG"].startswith("Bienvenue")
    types = await nalo(client, "nalo-1", "1", False)
    assert "Monthly Rent" in types["MSG"]
    confirm = await nalo(client, "nalo-1", "2", False)
    assert "5 000 RWF" in confirm["MSG"] and "Airtel Money" in confirm["MSG"]  # French writes 5 000
    done = await nalo(client, "nalo-1", "1", False)
    assert done["MSGTYPE"] is False and "PAY_" in done["MSG"]
    payment = await db.one(Payment)
    assert (payment.method, payment.amount_minor, payment.idempotency_key) == (
        "MOBILE_MONEY_AIRTEL", 5_000, "ussd:nalo:nalo-1")


async def test_nalo_every_screen_of_a_long_walk_fits(client: Any, demo: Any) -> None:
    await nalo(client, "nalo-2", "*384*123#", True, EN_MTN)
    for key in ("1", "1", "1"):
        await nalo(client, "nalo-2", key, False, EN_MTN)
    await nalo(client, "nalo-3", "*384*123#", True, EN_MTN)
    seen = []
    # my payments, a detail, back twice, problem, a payment, home, language, French, help
    for key in ("2", "1", "0", "0", "3", "1", "00", "4", "3", "5"):
        body = await nalo(client, "nalo-3", key, False, EN_MTN)
        seen.append(body["MSG"])
    assert seen[1].startswith("PAY_") and "Pending" in seen[1]
    assert seen[5].startswith("What went wrong?")
    assert seen[8].startswith("Bienvenue")
    assert body["MSGTYPE"] is False and "+250788123456" in body["MSG"]


async def test_an_empty_reply_is_an_invalid_choice_not_the_end_of_the_session(client: Any, demo: Any) -> None:
    """The user pressed Send with nothing typed: as on Africa's Talking, the menu says so and goes on (a 400
    ended the session on the aggregator's side)."""
    await nalo(client, "nalo-empty", "*384*123#", True)
    again = await nalo(client, "nalo-empty", "", False)
    assert again["MSGTYPE"] is True and again["MSG"].startswith("Choix invalide") and "\n1. " in again["MSG"]
    phone = HubtelPhone(client, EN_MTN, "hubtel-empty")
    await phone.post("Initiation", "*384*123#")
    empty = await phone.post("Response", "")
    assert empty["Type"] == "Response" and empty["Message"].startswith("Invalid choice.")
    # Leaving the field out is still a malformed request.
    resp = await client.post("/ussd/nalo", json={"USERID": "NALOTest", "MSISDN": FR_AIRTEL, "MSGTYPE": False,
                                                 "SESSIONID": "nalo-empty"})
    assert resp.status == 400 and (await resp.json())["message"] == "USERDATA is required"


async def test_a_retried_opening_request_answers_the_opening_screen_again(client: Any, demo: Any) -> None:
    """Nalo (and Hubtel without Sequence) name no hop: the same opening request twice is a retry, not an
    empty choice on the menu."""
    first = await nalo(client, "nalo-retry", "*384*123#", True)
    assert await nalo(client, "nalo-retry", "*384*123#", True) == first
    types = await nalo(client, "nalo-retry", "1", False)
    assert "Monthly Rent" in types["MSG"]
    resp = await client.post("/ussd/hubtel", json={
        "Mobile": EN_MTN, "SessionId": "hubtel-retry", "ServiceCode": "384*123", "Type": "Initiation",
        "Message": "*384*123#", "Operator": "mtn"})
    opening = await resp.json()
    resp = await client.post("/ussd/hubtel", json={
        "Mobile": EN_MTN, "SessionId": "hubtel-retry", "ServiceCode": "384*123", "Type": "Initiation",
        "Message": "*384*123#", "Operator": "mtn"})
    assert (await resp.json())["Message"] == opening["Message"] and opening["Message"].startswith("Welcome")


async def test_hubtel_a_late_earlier_sequence_is_not_a_new_choice(client: Any, demo: Any, db: Any) -> None:
    """Hubtel numbers its hops: a copy of Sequence 2 ("1") arriving after Sequence 3 was answered is old, not
    a press of 1 on the confirmation screen."""
    phone = HubtelPhone(client, EN_MTN, "hubtel-late-seq")
    await phone.post("Initiation", "*384*123#")
    await phone.post("Response", "1")
    confirm = await phone.post("Response", "1")
    assert confirm["Message"].startswith("Pay Monthly Rent")
    for old in (2, 1):
        late = await phone.post("Response", "1", sequence=old)
        assert late["Type"] == "Response" and late["Message"] == confirm["Message"]
    assert await db.count(Payment) == 0
    done = await phone.post("Response", "1")
    assert done["Type"] == "Release" and done["Message"].startswith("Approve the prompt on your phone")
    assert await db.count(Payment) == 1


async def test_a_cooperatives_extension_on_an_aggregators_own_code(rt: Any, aiohttp_client: Any, demo: Any) -> None:
    """Members in Ghana dial Nalo's code, not the Rwandan one: with USSD_SERVICE_CODE_NALO set, the digits after
    it pick the cooperative (they were ignored: a stranger dialling a cooperative's extension was asked for its
    code, and a member of several was not narrowed to it)."""
    import dataclasses

    from app import create_app

    async with rt.sessionmaker.begin() as s:
        s.add(Cooperative(name="Accra Traders Union", short_code="ATU", country="GH", currency="GHS",
                          status="ACTIVE", ussd_extension="7", self_registration=True))
    settings = dataclasses.replace(rt.settings, ussd_service_codes={"nalo": "*920*44#"})
    client = await aiohttp_client(create_app(settings, runtime=rt))
    stranger = "233244555124"
    await nalo(client, "nalo-ghana", "*920*44*7#", True, stranger)
    join = await nalo(client, "nalo-ghana", "1", False, stranger)
    assert "Accra Traders Union" in join["MSG"], join
    # The shared code still works through the other aggregators; Nalo's own code without digits is the menu.
    home = await nalo(client, "nalo-ghana-2", "*920*44#", True)
    assert home["MSG"].startswith("Bienvenue")
    assert settings.service_code_for("africastalking") == "*384*123#"


@pytest.mark.parametrize(("aggregator", "ours", "dialled"), [
    ("hubtel", "*713*45#", "*713*45*7#"),  # our code a sub-code of Hubtel's 713: read after ours, not after 713
    ("hubtel", "*713*45#", "*713*7#"),     # not our code: after Hubtel's ServiceCode, as the opening hop reads it
    ("nalo", "*920*44#", "*920*44*7#"),
])
async def test_a_session_lost_mid_way_keeps_the_cooperative_its_code_named(
        rt: Any, aiohttp_client: Any, db: Any, aggregator: str, ours: str, dialled: str) -> None:
    """A later hop of a session Redis lost (a restart, a failover) shows the opening screen again, her key dropped,
    as before; the cooperative the code she dialled named is kept, as on Africa's Talking. It was lost: a stranger
    who dialled a cooperative's code to join it was told at Pay "You are not registered yet. Enter your
    cooperative's code" (and the one whose extension is our sub-code's last part, 45, is not read from *713*45*7#)."""
    import dataclasses

    from app import create_app

    async with rt.sessionmaker.begin() as s:
        accra = Cooperative(name="Accra Traders Union", short_code="ATU", country="GH", currency="GHS",
                            timezone="Africa/Accra", status="ACTIVE", ussd_extension="7", self_registration=True)
        s.add_all([accra, Cooperative(name="Tema Fishers Cooperative", short_code="TFC", country="GH",
                                      currency="GHS", timezone="Africa/Accra", status="ACTIVE",
                                      ussd_extension="45", self_registration=True)])
    settings = dataclasses.replace(rt.settings, ussd_service_codes={aggregator: ours})
    client = await aiohttp_client(create_app(settings, runtime=dataclasses.replace(rt, settings=settings)))
    stranger, sequence = "233244555124", 0

    async def post(first: bool, text: str) -> str:
        nonlocal sequence
        sequence += 1
        if aggregator == "nalo":
            return (await nalo(client, "lost-1", text, first, stranger, "MTN"))["MSG"]
        resp = await client.post("/ussd/hubtel", json={
            "Mobile": stranger, "SessionId": "lost-1", "ServiceCode": "713", "Type": "Initiation" if first else
            "Response", "Message": text, "Operator": "mtn", "Sequence": sequence, "ClientState": ""})
        assert resp.status == 200, await resp.text()
        return str((await resp.json())["Message"])

    home = await post(True, dialled)
    assert "Accra Traders Union" in await post(False, "1")
    await rt.redis.flushdb()  # the session is lost
    assert await post(False, "1") == home  # the opening screen again: her key is dropped
    join = await post(False, "1")
    assert "Accra Traders Union" in join, join
    row = await db.one(UssdSession)
    assert (row.cooperative_id, row.service_code, row.hops) == (accra.id, dialled, 1)
