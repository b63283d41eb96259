"""Mobile number portability: a number keeps its first operator's range when its holder moves to another network
(Ghana, Kenya, Rwanda, Uganda and Tanzania all allow it). The network every USSD hop carries (Africa's Talking's
networkCode, Hubtel's Operator, Nalo's NETWORK) decides the method offered and the payment's account check; an
unknown or missing one falls back to the range.

Found: a member who ported from Telecel to MTN Ghana was told no method was available; one who ported away from
MTN was offered MTN MoMo, whose prompt then failed."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

from core.models import AuditEvent, Payment, UssdSession
from tests.admin_api.conftest import Caller, bearer
from tests.channels.ussd.helpers import AtPhone
from tests.channels.ussd.test_ghana_susu_walk import CODE, COOP, SENT, approve, kejetia, mtn

PORTED = "+233201234567"  # a Telecel range, on MTN now
NO_METHOD = f"No payment method is available for your number. Please contact {COOP}."


@pytest.fixture
async def operator(client: Any, demo: dict[str, Any]) -> Caller:
    return await bearer(client, *demo["super_admin"])


async def with_ported_member(operator: Caller) -> dict[str, Any]:
    made = await kejetia(operator)
    resp = await operator.req("POST", "/v1/members", json={
        "name": "Efua Ported", "phone": "020 123 4567", "cooperativeId": made["coop"]["id"]})
    assert resp.status == 201, await resp.text()
    return made


async def hubtel(client: Any, mobile: str, session: str, operator: str | None, *keys: str) -> list[str]:
    screens, sequence = [], 0
    for kind, message in (("Initiation", CODE), *(("Response", key) for key in keys)):
        sequence += 1
        body: dict[str, Any] = {"Mobile": mobile, "SessionId": session, "ServiceCode": "384", "Type": kind,
                                "Message": message, "Sequence": sequence, "ClientState": ""}
        if operator is not None:
            body["Operator"] = operator
        resp = await client.post("/ussd/hubtel", json=body)
        assert resp.status == 200, await resp.text()
        screens.append((await resp.json())["Message"])
    return screens


async def nalo(client: Any, msisdn: str, session: str, network: str | None, *keys: str) -> list[str]:
    screens = []
    for first, data in ((True, CODE), *((False, key) for key in keys)):
        body: dict[str, Any] = {"USERID": "NALO_KEJ", "MSISDN": msisdn, "USERDATA": data, "MSGTYPE": first,
                                "SESSIONID": session}
        if network is not None:
            body["NETWORK"] = network
        resp = await client.post("/ussd/nalo", json=body)
        assert resp.status == 200, await resp.text()
        screens.append((await resp.json())["MSG"])
    return screens


async def paid_from_mtn(rt: Any, worker: Any, db: Any, app: Any) -> Payment:
    await approve(rt, worker, app, PORTED[1:])
    [(path, asked)] = app[SENT]
    assert path == "/collection/v1_0/requesttopay"
    assert (asked["amount"], asked["currency"], asked["payer"]["partyId"]) == ("50.00", "GHS", PORTED[1:])
    payment = await db.one(Payment)
    assert (payment.status, payment.method, payment.provider) == ("COMPLETED", "MOBILE_MONEY_MTN", "mtn_momo")
    async with rt.sessionmaker() as session:
        audit = (await session.execute(select(AuditEvent).where(AuditEvent.action == "payment.created"))).scalar_one()
    assert audit.after["operatorFrom"] == "network"  # support sees why MTN collected from a Telecel range
    return payment


async def test_a_number_ported_to_mtn_pays_with_mtn_momo_through_hubtel(
        operator: Caller, client: Any, rt: Any, db: Any, worker: Any, aiohttp_server: Any) -> None:
    await with_ported_member(operator)
    async with mtn(rt, aiohttp_server) as app:
        *_, confirm, done = await hubtel(client, "0201234567", "hub-ported", "mtn", "1", "1", "1")
        assert confirm.startswith("Pay Monthly susu\nAmount: GHS 50.00\nFee: GHS 0.00\nVia MTN MoMo\n"), confirm
        assert done.startswith("Approve the prompt on your phone to pay GHS 50.00."), done
        await paid_from_mtn(rt, worker, db, app)
    assert (await db.one(UssdSession)).network_code == "mtn"


async def test_a_number_ported_to_mtn_pays_with_mtn_momo_through_nalo(
        operator: Caller, client: Any, rt: Any, db: Any, worker: Any, aiohttp_server: Any) -> None:
    await with_ported_member(operator)
    async with mtn(rt, aiohttp_server) as app:
        *_, confirm, done = await nalo(client, "233201234567", "nalo-ported", "MTN", "1", "1", "1")
        assert confirm.endswith("\nMTN MoMo\n1. Confirm\n2. Cancel\n0. Back\n00. Home"), confirm
        assert done.startswith("Approve the prompt"), done
        await paid_from_mtn(rt, worker, db, app)


@pytest.mark.parametrize("network", [None, "", "ORANGE", "VODAFONE", "62002", "63510"])
async def test_without_a_network_we_know_the_range_decides(operator: Caller, client: Any, db: Any,
                                                           network: str | None) -> None:
    """None or an empty one, a name nobody uses, her range's own network, or another country's code (MTN Rwanda's
    63510 for a Ghanaian number): her Telecel range decides, as before."""
    await with_ported_member(operator)
    *_, end = await nalo(client, "233201234567", "nalo-range", network, "1", "1")
    assert end == NO_METHOD[:120]
    assert await db.count(Payment) == 0


@pytest.mark.parametrize("network", ["vodafone", "telecel", "airteltigo", "at", "tigo"])
async def test_an_mtn_range_on_another_network_is_not_offered_mtn(operator: Caller, client: Any, db: Any,
                                                                  network: str) -> None:
    """Ported away from MTN: MTN MoMo would prompt a number MTN no longer serves (AT is not Airtel Money)."""
    await kejetia(operator)
    *_, end = await hubtel(client, "0244123456", "hub-away", network, "1", "1")
    assert end == NO_METHOD
    assert await db.count(Payment) == 0


async def test_africas_talking_network_code_decides_in_rwanda(client: Any, demo: Any, db: Any) -> None:
    """An Airtel-range number on MTN Rwanda (63510) is offered MTN MoMo, and its payment is made with it; an
    MTN-range one on Airtel (63514) Airtel Money."""
    airtel_range = AtPhone(client, "+250733000001", network="63510", service_code="*384*123#")
    await airtel_range.dial()
    await airtel_range.send("1")
    confirm = await airtel_range.send("1")
    assert "MTN MoMo" in confirm and "Airtel" not in confirm, confirm
    assert (await airtel_range.send("1")).startswith("END ")
    made = await db.one(Payment)
    assert (made.method, made.payment_account_masked) == ("MOBILE_MONEY_MTN", "+25073****001")

    mtn_range = AtPhone(client, "+250788000002", network="63514")
    await mtn_range.dial()
    await mtn_range.send("1")
    assert "Airtel Money" in await mtn_range.send("1")


@pytest.mark.parametrize("network", ["", "99999", "63902", "6351"])
async def test_an_unknown_network_code_falls_back_to_the_range(client: Any, demo: Any, network: str) -> None:
    """No code, one nobody has, Safaricom's (Kenya's, for a Rwandan number) or a cut one: the Airtel range decides."""
    phone = AtPhone(client, "+250733000001", network=network)
    await phone.dial()
    await phone.send("1")
    confirm = await phone.send("1")
    assert "Airtel" in confirm and "MTN" not in confirm, confirm


@pytest.mark.parametrize("network", ["Vodafone Ghana Limited", "AIRTELTIGO GHANA LTD.", "x" * 40])
async def test_a_long_network_name_is_not_a_reason_to_end_her_session(operator: Caller, client: Any, db: Any,
                                                                      network: str) -> None:
    """The network is a hint (the range decides without it): a name longer than we keep (16 characters on the
    session row) answered 400 on Hubtel and Nalo, which ended her session before the menu."""
    await with_ported_member(operator)
    *_, end = await hubtel(client, "0201234567", "hub-long", network, "1", "1")
    assert end == NO_METHOD  # her Telecel range decides
    *_, end = await nalo(client, "233201234567", "nalo-long", network, "1", "1")
    assert end == NO_METHOD[:120]
    assert {row.network_code for row in await db.all(UssdSession)} == {network[:16]}
    phone = AtPhone(client, "+250733000001", network="6" * 40)
    assert (await phone.dial()).startswith("CON ")


@pytest.mark.parametrize(("network", "offered"), [("mtn-gh", True), ("MTN GH", True), ("vodafone-gh", False),
                                                  ("Telecel Ghana", False), ("AirtelTigo Ghana", False)])
async def test_a_network_named_with_its_country_is_read(operator: Caller, client: Any, db: Any,
                                                        network: str, offered: bool) -> None:
    """Ghana's networks named with the country (as Hubtel's own channel names write them: mtn-gh, vodafone-gh):
    the network, not the range, decides. Read as unknown, an MTN range ported away was offered MTN MoMo."""
    await with_ported_member(operator)  # a Telecel range
    *_, end = await hubtel(client, "0201234567", "hub-gh", network, "1", "1")
    assert ("Via MTN MoMo" in end) is offered, end
    await kejetia_member_on_mtn_range_checked(client, network, offered)


async def kejetia_member_on_mtn_range_checked(client: Any, network: str, offered: bool) -> None:
    """The MTN range (Akosua's) on the network named: MTN MoMo only when it says MTN."""
    *_, end = await hubtel(client, "0244123456", "hub-gh-mtn", network, "1", "1")
    assert (end == NO_METHOD) is not offered, end
