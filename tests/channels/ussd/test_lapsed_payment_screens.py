"""A payment she let lapse (TIMEOUT, "not approved in time") on the screens where room is short: the Swahili list
line beside a 13-character amount kept the payment type whole only by taking the list's short status (the whole
"Haikuthibitishwa kwa wakati" cut "Monthly Rent" to "Monthly.."), and Nalo's English detail kept the type (its
short form dropped it once "Expired" became "Not approved in time")."""

from __future__ import annotations

import re
from typing import Any

import pytest
from sqlalchemy import select

from core.models import Payment
from tests.admin_api.conftest import Caller, bearer
from tests.channels.ussd.helpers import AtPhone
from tests.channels.ussd.test_hubtel_nalo_flows import nalo

WANJIKU = "+254712000041"  # Safaricom
KWAME = "0244123456"  # MTN Ghana


@pytest.fixture
async def operator(client: Any, demo: dict[str, Any]) -> Caller:
    return await bearer(client, *demo["super_admin"])


async def _lapsed(rt: Any) -> Payment:
    async with rt.sessionmaker.begin() as s:
        payment = (await s.execute(select(Payment).order_by(Payment.created_at.desc()).limit(1))).scalar_one()
        # Test set-up only; the app moves status through core.state.
        payment.status, payment.failure_reason = "TIMEOUT", "not approved in time"
    return payment


async def _coop(operator: Caller, country: str, extension: str, amount: str, member: dict[str, str]) -> None:
    coop = await operator.json("POST", "/v1/cooperatives", 201, json={
        "name": "Umoja Housing", "shortCode": f"U{extension}", "country": country, "ussdExtension": extension})
    await operator.json("POST", "/v1/payment-types", 201, json={
        "name": "Monthly Rent", "amount": amount, "cooperativeId": coop["id"]})
    await operator.json("POST", "/v1/members", 201, json={**member, "cooperativeId": coop["id"]})


async def test_the_swahili_list_keeps_the_type_whole_beside_a_long_amount(operator: Caller, client: Any,
                                                                          rt: Any) -> None:
    await _coop(operator, "KE", "47", "12345", {"name": "Wanjiku Njeri", "phone": WANJIKU, "language": "sw"})
    pay = AtPhone(client, WANJIKU, service_code="*384*123*47#")
    await pay.dial()
    await pay.send("1")  # Pay
    await pay.send("1")  # Monthly Rent
    assert (await pay.send("1")).startswith("END Idhinisha ombi")  # Confirm
    payment = await _lapsed(rt)
    phone = AtPhone(client, WANJIKU, service_code="*384*123*47#")
    await phone.dial()
    listing = await phone.send("2")
    assert listing == ("CON Malipo yako ya karibuni:\n"
                       f"1. 12,345.00 KES Monthly Rent Muda wa idhini umeisha {payment.reference}\n0. Rudi")
    # The detail has a line for the status: the whole wording, the SMS's ("hayakuthibitishwa kwa wakati").
    detail = (await phone.send("1")).split("\n")
    assert detail[:4] == ["CON " + payment.reference, "Monthly Rent: 12,345.00 KES",
                          "Hali: Haikuthibitishwa kwa wakati", detail[3]], detail
    assert re.fullmatch(r"Tarehe: \d\d/\d\d/\d{4}", detail[3]) and detail[4:] == [
        "1. Tuma hali kwa SMS", "0. Rudi", "00. Mwanzo"], detail


async def _lapsed_by_nalo(client: Any, rt: Any, session: str, extension: str) -> Payment:
    """Kwame pays the cooperative's (USSD extension) first payment type through Nalo and lets its prompt lapse
    (_lapsed): the payment."""
    await nalo(client, session, f"*384*123*{extension}#", True, KWAME)
    await nalo(client, session, "1", False, KWAME)  # Pay
    await nalo(client, session, "1", False, KWAME)  # its first type
    assert (await nalo(client, session, "1", False, KWAME))["MSG"].startswith("Approve the prompt")
    return await _lapsed(rt)


async def test_nalos_english_detail_keeps_the_payment_type(operator: Caller, client: Any, rt: Any) -> None:
    await _coop(operator, "GH", "7", "1234.56", {"name": "Kwame Mensah", "phone": KWAME, "language": "en"})
    payment = await _lapsed_by_nalo(client, rt, "nalo-lapsed-1", "7")  # Monthly Rent
    await nalo(client, "nalo-lapsed-2", "*384*123*7#", True, KWAME)
    listing = (await nalo(client, "nalo-lapsed-2", "2", False, KWAME))["MSG"]
    assert listing == (f"Your recent payments:\n1. GHS 1,234.56 Monthly Rent Not approved in time {payment.reference}"
                       "\n0. Back")
    # "Status: Not approved in time" and "Date: " leave no room for the options on 120 characters: the short form,
    # the payment type still in it (it showed only the reference, the amount, the status and the date).
    detail = (await nalo(client, "nalo-lapsed-2", "1", False, KWAME))["MSG"].split("\n")
    assert detail[:3] == [payment.reference, "Monthly Rent: GHS 1,234.56", "Not approved in time"], detail
    assert re.fullmatch(r"\d\d/\d\d/\d{4}", detail[3]) and detail[4:] == [
        "1. Send status by SMS", "0. Back", "00. Home"], detail


async def test_nalos_detail_shortens_a_long_payment_type_rather_than_dropping_it(operator: Caller, client: Any,
                                                                                  rt: Any) -> None:
    """The detail's short form with the type did not fit beside a 29-character type, and the shorter form (no type
    at all) was taken before the type was shortened, though "Security and mai..: GHS 1,234.56" leaves the screen
    room (the list beside it shows "Security and maintena.."): names are shortened where the screen has no room for
    them whole, not dropped."""
    coop = await operator.json("POST", "/v1/cooperatives", 201, json={
        "name": "Umoja Housing", "shortCode": "U8", "country": "GH", "ussdExtension": "8"})
    await operator.json("POST", "/v1/payment-types", 201, json={
        "name": "Security and maintenance levy", "amount": "1234.56", "cooperativeId": coop["id"]})
    await operator.json("POST", "/v1/members", 201, json={"name": "Kwame Mensah", "phone": KWAME,
                                                          "language": "en", "cooperativeId": coop["id"]})
    payment = await _lapsed_by_nalo(client, rt, "nalo-levy-1", "8")  # the levy
    await nalo(client, "nalo-levy-2", "*384*123*8#", True, KWAME)
    await nalo(client, "nalo-levy-2", "2", False, KWAME)  # My payments
    screen = (await nalo(client, "nalo-levy-2", "1", False, KWAME))["MSG"]
    detail = screen.split("\n")
    assert len(screen) <= 120, screen
    assert detail[0] == payment.reference and detail[2] == "Not approved in time", detail
    assert re.fullmatch(r"Security and m[a-z ]*\.\.: GHS 1,234\.56", detail[1]), detail
    assert detail[4:] == ["1. Send status by SMS", "0. Back", "00. Home"], detail
