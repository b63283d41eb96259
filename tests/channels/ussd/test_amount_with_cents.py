"""An amount the member types for a type that takes any amount, in a currency with cents (GHS, KES).

Found walking a Ghanaian cooperative through Nalo: the prompt said "usual: 20.50 GHS", and typing 20.50 (or the
French screen's 20,50) was refused with "Enter a whole amount in GHS, e.g. 5000": a type taking any amount could
not be paid its own usual amount, nor any amount with pesewas."""

from __future__ import annotations

from typing import Any

import pytest

from core.models import Payment
from tests.admin_api.conftest import Caller, bearer
from tests.channels.ussd.helpers import AtPhone
from tests.channels.ussd.test_hubtel_nalo_flows import nalo

KWAME, AKOSUA = "0244123456", "0244123457"  # MTN Ghana
SAFARICOM = "+254712000001"


@pytest.fixture
async def operator(client: Any, demo: dict[str, Any]) -> Caller:
    return await bearer(client, *demo["super_admin"])


async def ghana_coop(operator: Caller) -> None:
    coop = await operator.json("POST", "/v1/cooperatives", 201, json={
        "name": "Kejetia Traders", "shortCode": "KJT", "country": "GH", "ussdExtension": "7"})
    await operator.json("POST", "/v1/payment-types", 201, json={
        "name": "Donation", "amount": "20.50", "allowCustomAmount": True, "cooperativeId": coop["id"]})
    for name, phone, language in (("Kwame Mensah", KWAME, "en"), ("Akosua Dufie", AKOSUA, "fr")):
        await operator.json("POST", "/v1/members", 201, json={
            "name": name, "phone": phone, "language": language, "cooperativeId": coop["id"]})


async def to_the_amount(client: Any, session: str, msisdn: str) -> str:
    await nalo(client, session, "*384*123*7#", True, msisdn)
    await nalo(client, session, "1", False, msisdn)  # Pay
    return (await nalo(client, session, "1", False, msisdn))["MSG"]  # its one type


async def test_an_amount_with_pesewas_is_paid(operator: Caller, client: Any, db: Any) -> None:
    await ghana_coop(operator)
    prompt = await to_the_amount(client, "nalo-cents-1", KWAME)
    assert prompt.startswith("Enter amount in GHS (usual: GHS 20.50):"), prompt
    # Not amounts: the error names the form an amount takes in this currency, not "a whole amount, e.g. 5000".
    for bad in ("abc", "1,0000", "12.", "0.001", "0.00", "-5", "12.5.0", "²⁰"):
        answer = (await nalo(client, "nalo-cents-1", bad, False, KWAME))["MSG"]
        assert answer.startswith("Enter an amount in GHS, e.g. 10.50:\nEnter amount in GHS"), (bad, answer)
    confirm = (await nalo(client, "nalo-cents-1", "20.50", False, KWAME))["MSG"]
    assert "GHS 20.50" in confirm and "1. Confirm" in confirm, confirm
    done = await nalo(client, "nalo-cents-1", "1", False, KWAME)
    assert done["MSGTYPE"] is False and "pay GHS 20.50" in done["MSG"], done
    payment = await db.one(Payment)
    assert (payment.amount_minor, payment.currency) == (2050, "GHS")


async def test_a_french_decimal_comma_is_read_as_its_screens_write_it(operator: Caller, client: Any,
                                                                      db: Any) -> None:
    await ghana_coop(operator)
    prompt = await to_the_amount(client, "nalo-cents-2", AKOSUA)
    assert "GHS 20,50" in prompt, prompt
    refused = (await nalo(client, "nalo-cents-2", "douze", False, AKOSUA))["MSG"]
    assert refused.startswith("Entrez un montant en GHS, ex. 10,50 :"), refused
    confirm = (await nalo(client, "nalo-cents-2", "12,5", False, AKOSUA))["MSG"]
    assert "GHS 12,50" in confirm, confirm
    await nalo(client, "nalo-cents-2", "1", False, AKOSUA)
    assert (await db.one(Payment)).amount_minor == 1250


async def test_whole_shillings_are_asked_for_where_the_wallet_takes_no_cents(operator: Caller, client: Any,
                                                                             db: Any) -> None:
    """M-Pesa takes whole shillings: an amount with cents is asked again, whole, instead of ending the session on
    "this amount cannot be paid by M-Pesa" after she typed it."""
    coop = await operator.json("POST", "/v1/cooperatives", 201, json={
        "name": "Nairobi Savings Group", "shortCode": "NSG", "country": "KE", "ussdExtension": "44"})
    await operator.json("POST", "/v1/payment-types", 201, json={
        "name": "Harambee", "amount": "100.00", "allowCustomAmount": True, "cooperativeId": coop["id"]})
    await operator.json("POST", "/v1/members", 201, json={"name": "Achieng Otieno", "phone": SAFARICOM,
                                                          "cooperativeId": coop["id"]})
    phone = AtPhone(client, SAFARICOM, service_code="*384*123*44#")
    await phone.dial()
    await phone.send("1")
    assert (await phone.send("1")).startswith("CON Enter amount in KES")
    again = await phone.send("150.50")
    assert again.startswith("CON Enter a whole amount in KES, e.g. 5000:"), again
    confirm = await phone.send("150.00")
    assert "Amount: 150.00 KES" in confirm and "Via M-Pesa" in confirm, confirm
    assert await db.count(Payment) == 0


async def test_what_is_no_amount_asks_for_whole_shillings_where_the_wallet_takes_no_cents(
        operator: Caller, client: Any, db: Any) -> None:
    """Found walking a Kenyan SACCO: a member who typed what is no amount was told "Enter an amount in
    KES, e.g. 10.50", an amount with cents her M-Pesa wallet cannot pay (typed, it was refused in turn)."""
    coop = await operator.json("POST", "/v1/cooperatives", 201, json={
        "name": "Nyeri Teachers SACCO", "shortCode": "NTS", "country": "KE", "ussdExtension": "45"})
    await operator.json("POST", "/v1/payment-types", 201, json={
        "name": "Loan repayment", "amount": "500", "allowCustomAmount": True, "cooperativeId": coop["id"]})
    await operator.json("POST", "/v1/members", 201, json={"name": "Wanjiru Kamau", "phone": "0110000021",
                                                          "language": "sw", "cooperativeId": coop["id"]})
    phone = AtPhone(client, "+254110000021", service_code="*384*123*45#")
    await phone.dial()
    await phone.send("1")
    assert (await phone.send("1")).startswith("CON Weka kiasi kwa KES")
    for bad in ("1,5000", "abc", "0.00", "12."):
        again = await phone.send(bad)
        assert again.startswith("CON Weka kiasi kamili kwa KES, mfano 5000:\nWeka kiasi kwa KES"), (bad, again)
    confirm = await phone.send("1500")
    assert "Kiasi: 1,500.00 KES" in confirm and "Kupitia M-Pesa" in confirm, confirm
    assert await db.count(Payment) == 0


async def test_a_comma_outside_french_groups_thousands_and_is_no_decimal_mark(operator: Caller, client: Any,
                                                                             db: Any) -> None:
    """Where the screens group thousands with commas ("usual: 1,000.00 KES"), "1,000" is a thousand shillings: the
    same comma before two digits was read as cents, so "1,00" (a thousand mistyped) confirmed 1.00 KES and "50,00"
    50.00 KES, where UGX asks again for "1,00" and M-Pesa's prompt asks for a whole amount."""
    coop = await operator.json("POST", "/v1/cooperatives", 201, json={
        "name": "Kisumu Fishers SACCO", "shortCode": "KFS", "country": "KE", "ussdExtension": "46"})
    await operator.json("POST", "/v1/payment-types", 201, json={
        "name": "Savings", "amount": "1000", "allowCustomAmount": True, "cooperativeId": coop["id"]})
    await operator.json("POST", "/v1/members", 201, json={"name": "Otieno Odhiambo", "phone": "0712000031",
                                                          "cooperativeId": coop["id"]})
    phone = AtPhone(client, "+254712000031", service_code="*384*123*46#")
    await phone.dial()
    await phone.send("1")
    assert (await phone.send("1")).startswith("CON Enter amount in KES (usual: 1,000.00 KES)")
    for bad in ("1,00", "50,00", "1,000,00"):
        again = await phone.send(bad)
        assert again.startswith("CON Enter a whole amount in KES, e.g. 5000:"), (bad, again)
    confirm = await phone.send("1,000")
    assert "Amount: 1,000.00 KES" in confirm and "Via M-Pesa" in confirm, confirm
    await phone.send("1")
    assert (await db.one(Payment)).amount_minor == 100_000
