"""A Ugandan (UGX) and a Tanzanian (TZS, Swahili) cooperative paying on USSD and through the API.

Found walking both through Africa's Talking: an amount typed as the screens write it ("usual: 1,000 UGX", "usual:
1,000.00 TZS", and "10,000" as Tanzanians write ten thousand) was asked again as "a whole amount, e.g. 5000"; and
a TZS amount with cents ("1,500.50 TZS", a type priced so, or "12.50" typed, as the error's own example "mfano
10.50" invited) was offered and sent to Airtel Money, whose Tanzanian wallets hold whole shillings only."""

from __future__ import annotations

import json
from typing import Any

import pytest

from core.models import Payment
from core.money import Money
from core.ports import ProviderError, amount_refusal
from providers.airtel.adapter import AirtelAdapter
from tests.admin_api.conftest import Caller, bearer, idem
from tests.channels.ussd.helpers import AtPhone
from tests.providers.test_account_currency import adapter_config, collection, recording

NAKATO = "+256772000001"  # MTN Uganda, English
BARAKA = "+255682000001"  # Airtel Tanzania, Swahili


@pytest.fixture
def settings(migrated_database: str) -> Any:
    from tests.conftest import make_settings

    # A deployment whose Airtel Money account is Tanzania's (TZS); MTN's sandbox takes any currency.
    return make_settings(AIRTEL_COUNTRY="TZ")


@pytest.fixture
async def operator(client: Any, demo: dict[str, Any]) -> Caller:
    return await bearer(client, *demo["super_admin"])


async def coop(operator: Caller, country: str, extension: str, price: str, member: tuple[str, str, str]) -> str:
    made = await operator.json("POST", "/v1/cooperatives", 201, json={
        "name": f"{country} Savings", "shortCode": f"S{country}", "country": country, "ussdExtension": extension})
    await operator.json("POST", "/v1/payment-types", 201, json={
        "name": "Mchango", "amount": price, "allowCustomAmount": True, "cooperativeId": made["id"]})
    name, phone, language = member
    await operator.json("POST", "/v1/members", 201, json={
        "name": name, "phone": phone, "language": language, "cooperativeId": made["id"]})
    return str(made["id"])


async def test_a_ugx_amount_typed_as_the_screen_writes_it_is_paid(operator: Caller, client: Any, db: Any) -> None:
    await coop(operator, "UG", "256", "1000", ("Nakato Sarah", "0772000001", "en"))
    phone = AtPhone(client, NAKATO, service_code="*384*123*256#")
    await phone.dial()
    await phone.send("1")
    prompt = await phone.send("1")
    assert prompt.startswith("CON Enter amount in UGX (usual: 1,000 UGX):"), prompt
    # Not thousands grouped as the screens group them: still asked again.
    for bad in ("1,00", "1,0000", "1,000.5", ",000"):
        answer = await phone.send(bad)
        assert answer.startswith("CON Enter a whole amount in UGX, e.g. 5000:"), (bad, answer)
    confirm = await phone.send("1,025,000")
    assert "Amount: 1,025,000 UGX" in confirm and "Via MTN MoMo" in confirm, confirm
    done = await phone.send("1")
    assert "pay 1,025,000 UGX" in done, done
    payment = await db.one(Payment)
    assert (payment.amount_minor, payment.currency, payment.method) == (1_025_000, "UGX", "MOBILE_MONEY_MTN")


async def test_a_tzs_amount_in_swahili_is_whole_shillings_as_tanzanians_write_them(operator: Caller, client: Any,
                                                                                   db: Any) -> None:
    await coop(operator, "TZ", "255", "1000.00", ("Baraka Mwita", "0682000001", "sw"))
    phone = AtPhone(client, BARAKA, service_code="*384*123*255#")
    await phone.dial()
    await phone.send("1")
    prompt = await phone.send("1")
    assert prompt.startswith("CON Weka kiasi kwa TZS (kawaida: 1,000.00 TZS):"), prompt
    # Not an amount: the example she is given is a whole one, as her wallet takes (it said "mfano 10.50").
    answer = await phone.send("elfu")
    assert answer.startswith("CON Weka kiasi kamili kwa TZS, mfano 5000:"), answer
    # The prompt's own usual amount, copied.
    confirm = await phone.send("1,000.00")
    assert "Kiasi: 1,000.00 TZS" in confirm and "Kupitia Airtel Money" in confirm, confirm
    await phone.send("0")  # back to the amount
    # Shillings and cents: Airtel Money Tanzania takes whole shillings, so she is asked for a whole amount.
    again = await phone.send("12.50")
    assert again.startswith("CON Weka kiasi kamili kwa TZS, mfano 5000:"), again
    confirm = await phone.send("10,000")
    assert "Kiasi: 10,000.00 TZS" in confirm, confirm
    done = await phone.send("1")
    assert done.startswith("END Idhinisha ombi") and "10,000.00 TZS" in done, done
    payment = await db.one(Payment)
    assert (payment.amount_minor, payment.currency, payment.method) == (1_000_000, "TZS", "MOBILE_MONEY_AIRTEL")


async def test_french_keeps_its_decimal_comma(operator: Caller, client: Any, db: Any) -> None:
    """A French screen writes "1 000 UGX": its "1,000" is one unit and a decimal, not a thousand."""
    await coop(operator, "UG", "256", "1000", ("Nakato Sarah", "0772000001", "fr"))
    phone = AtPhone(client, NAKATO, service_code="*384*123*256#")
    await phone.dial()
    await phone.send("1")
    assert "1 000 UGX" in await phone.send("1")
    answer = await phone.send("1,000")
    assert answer.startswith("CON Entrez un montant entier en UGX, ex. 5000 :"), answer
    assert await db.count(Payment) == 0


async def test_a_tzs_amount_with_cents_is_refused_for_airtel_when_asked(operator: Caller, client: Any,
                                                                       db: Any) -> None:
    """A type priced with cents is refused when made (no method of Tanzania can collect it), and an API payment
    with cents is a 400, not a request Airtel's wallet cannot carry out."""
    coop_id = await coop(operator, "TZ", "255", "1000.00", ("Baraka Mwita", "0682000001", "sw"))
    refused = await operator.json("POST", "/v1/payment-types", 400, json={
        "name": "Senti", "amount": "1500.50", "cooperativeId": coop_id})
    assert refused["message"] == ["no payment method can collect 1,500.50 TZS: Airtel Money takes whole units of "
                                  "TZS; 1,500.50 TZS has cents"], refused
    ptype = await operator.json("POST", "/v1/payment-types", 201, json={
        "name": "Ada", "amount": "1500", "allowCustomAmount": True, "cooperativeId": coop_id})
    body = {"cooperativeId": coop_id, "paymentTypeId": ptype["id"], "paymentMethod": "MOBILE_MONEY_AIRTEL",
            "paymentAccount": "0682000001"}
    answer = await operator.json("POST", "/v1/payments", 400, json={
        **body, "amount": "1500.50", "idempotencyKey": idem()})
    assert answer["message"] == ["Airtel Money takes whole units of TZS; 1,500.50 TZS has cents"], answer
    assert await db.count(Payment) == 0
    made = await operator.json("POST", "/v1/payments", 201, json={
        **body, "amount": "1500.00", "idempotencyKey": idem()})
    assert (made["amount"], made["currency"]) == ("1500.00", "TZS")


async def test_airtel_sends_whole_shillings_for_tzs() -> None:
    http, seen = recording()
    adapter = AirtelAdapter(http, adapter_config(country="TZ", currency="TZS"))
    assert amount_refusal(adapter, Money(150050, "TZS"), "MOBILE_MONEY_AIRTEL") == (
        "amount", "Airtel Money takes whole units of TZS; 1,500.50 TZS has cents")
    assert amount_refusal(adapter, Money(150000, "TZS"), "MOBILE_MONEY_AIRTEL") is None
    await adapter.request_collection(collection(Money(2_500_000, "TZS"), BARAKA))
    with pytest.raises(ProviderError) as raised:  # the worker's guard: never sent
        await adapter.request_collection(collection(Money(150050, "TZS"), BARAKA))
    await http.aclose()
    assert raised.value.code == "AMOUNT_HAS_CENTS" and not raised.value.retryable
    [collect] = [r for r in seen if "payments" in r.url.path]
    body = json.loads(collect.content)
    assert body["transaction"]["amount"] == 25000  # a number of shillings, not "25000.00"
    assert collect.headers["X-Country"] == "TZ" and collect.headers["X-Currency"] == "TZS"


@pytest.mark.parametrize("number", ["0742000001", "0652000001"])  # Vodacom M-Pesa, Yas (formerly Tigo)
async def test_a_wallet_no_method_takes_is_told_before_she_types_an_amount(operator: Caller, client: Any, db: Any,
                                                                          number: str) -> None:
    """The gateway's M-Pesa is Safaricom's Daraja, not Vodacom's, and Tanzania has no MTN: a Vodacom or Yas member
    was asked for an amount, then told that no method takes her number."""
    await coop(operator, "TZ", "255", "1000.00", ("Neema Juma", number, "sw"))
    phone = AtPhone(client, "+255" + number[1:], service_code="*384*123*255#")
    await phone.dial()
    await phone.send("1")
    answer = await phone.send("1")
    assert answer == "END Hakuna njia ya malipo kwa namba yako. Wasiliana na TZ Savings.", answer
    assert await db.count(Payment) == 0


async def test_a_wallet_whose_account_takes_another_currency_is_told_before_she_types_an_amount(
        operator: Caller, client: Any, db: Any) -> None:
    """This deployment's Airtel Money account is Tanzania's (TZS): a Ugandan Airtel member was asked for an amount
    in UGX, then told that no method takes her number."""
    await coop(operator, "UG", "256", "1000", ("Okello James", "0702000001", "en"))
    phone = AtPhone(client, "+256702000001", service_code="*384*123*256#")
    await phone.dial()
    await phone.send("1")
    answer = await phone.send("1")
    assert answer == "END No payment method is available for your number. Please contact UG Savings.", answer
    assert await db.count(Payment) == 0
