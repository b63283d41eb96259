"""MTN and Airtel accounts collect in their own currency and country; M-Pesa declares its amount rule."""

from __future__ import annotations

import json

import httpx
import pytest

from core.config import ConfigError, ProviderConfig, Secret, load_settings
from core.money import Money
from core.phone import normalize
from core.ports import CollectionRequest, ProviderError, amount_refusal
from providers.airtel.adapter import AirtelAdapter
from providers.mpesa.adapter import MpesaAdapter
from providers.mtn_momo.adapter import MtnMomoAdapter

REF = "3f0c8a52-6a8e-4c1e-9d0b-2b7f5b1e9a01"


def settings_options(**env: str) -> tuple[dict[str, str], dict[str, str]]:
    settings = load_settings(env)
    return dict(settings.providers["mtn_momo"].options), dict(settings.providers["airtel"].options)


def test_each_account_currency_comes_from_its_configuration() -> None:
    mtn, airtel = settings_options()
    assert mtn["currency"] == "" and airtel == {"country": "RW", "currency": "RWF"}  # sandbox: any
    mtn, airtel = settings_options(MTN_MOMO_TARGET_ENVIRONMENT="mtnuganda", AIRTEL_COUNTRY="ug")
    assert mtn["currency"] == "UGX" and airtel == {"country": "UG", "currency": "UGX"}
    mtn, _ = settings_options(MTN_MOMO_CURRENCY="EUR")  # MTN's own sandbox collects EUR
    assert mtn["currency"] == "EUR"


@pytest.mark.parametrize(("env", "variable"), [
    ({"MTN_MOMO_TARGET_ENVIRONMENT": "mtnrwanda", "MTN_MOMO_CURRENCY": "UGX"}, "MTN_MOMO_CURRENCY"),
    ({"AIRTEL_COUNTRY": "UG", "AIRTEL_CURRENCY": "RWF"}, "AIRTEL_CURRENCY"),
    ({"AIRTEL_COUNTRY": "Uganda"}, "AIRTEL_COUNTRY"),
    ({"AIRTEL_COUNTRY": "CD"}, "AIRTEL_CURRENCY"),  # no default known: must be named
])
def test_a_currency_the_account_cannot_collect_is_refused_at_start_up(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        load_settings(env)


def adapter_config(**options: str) -> ProviderConfig:
    return ProviderConfig(base_url="https://provider.test", options=options, credentials={
        name: Secret("x") for name in ("client_id", "client_secret", "callback_key", "api_user", "api_key",
                                       "subscription_key")})


def test_mtn_currencies_follow_the_market() -> None:
    http = httpx.AsyncClient()
    assert MtnMomoAdapter(http, adapter_config(target_environment="mtnrwanda")).currencies == {"RWF"}
    assert MtnMomoAdapter(http, adapter_config(target_environment="mtnghana", currency="GHS")).currencies == {"GHS"}
    assert MtnMomoAdapter(http, adapter_config(target_environment="sandbox", currency="")).currencies is None
    rwanda = MtnMomoAdapter(http, adapter_config(target_environment="mtnrwanda"))
    assert amount_refusal(rwanda, Money(15000, "GHS"), "MOBILE_MONEY_MTN") == (
        "paymentMethod", "MOBILE_MONEY_MTN collects RWF only; this payment is in GHS")
    assert amount_refusal(rwanda, Money(15000, "RWF"), "MOBILE_MONEY_MTN") is None


def collection(amount: Money, payer: str) -> CollectionRequest:
    phone = normalize(payer, "RW")
    return CollectionRequest(provider_reference=REF, payment_reference="PAY_1", amount=amount, payer=phone,
                             payer_account=phone.e164, description="Levy", callback_url="",
                             method="MOBILE_MONEY_AIRTEL")


def recording() -> tuple[httpx.AsyncClient, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path.endswith("/token"):
            return httpx.Response(200, json={"access_token": "t", "expires_in": "180", "token_type": "bearer"})
        return httpx.Response(200, json={"data": {"transaction": {"id": REF, "status": "Success."}},
                                         "status": {"code": "200", "success": True, "result_code": "ESB000010"}})

    return httpx.AsyncClient(transport=httpx.MockTransport(answer)), seen


async def test_airtel_sends_one_country_the_accounts_on_the_whole_wire() -> None:
    http, seen = recording()
    adapter = AirtelAdapter(http, adapter_config(country="UG", currency="UGX"))
    assert adapter.currencies == {"UGX"}
    await adapter.request_collection(collection(Money(20000, "UGX"), "+256701234567"))
    await http.aclose()
    [collect] = [r for r in seen if "payments" in r.url.path]
    body = json.loads(collect.content)
    assert collect.headers["X-Country"] == "UG" and collect.headers["X-Currency"] == "UGX"
    assert body["subscriber"]["country"] == body["transaction"]["country"] == "UG"
    assert body["subscriber"]["msisdn"] == "701234567"


@pytest.mark.parametrize(("amount", "payer", "code"), [
    (Money(20000, "UGX"), "+250733000001", "CURRENCY_UNSUPPORTED"),  # a Rwandan account asked for UGX
    (Money(20000, "RWF"), "+256701234567", "COUNTRY_UNSUPPORTED"),  # ... or for a Ugandan wallet
])
async def test_airtel_refuses_what_its_account_cannot_collect_without_calling(amount: Money, payer: str,
                                                                             code: str) -> None:
    http, seen = recording()
    adapter = AirtelAdapter(http, adapter_config(country="RW", currency="RWF"))
    with pytest.raises(ProviderError) as raised:
        await adapter.request_collection(collection(amount, payer))
    await http.aclose()
    assert raised.value.code == code and not raised.value.retryable
    assert not [r for r in seen if "payments" in r.url.path]


async def test_mtn_refuses_another_currency_without_calling() -> None:
    http, seen = recording()
    adapter = MtnMomoAdapter(http, adapter_config(target_environment="mtnrwanda"))
    with pytest.raises(ProviderError) as raised:
        await adapter.request_collection(collection(Money(15000, "GHS"), "+250788000001"))
    await http.aclose()
    assert raised.value.code == "CURRENCY_UNSUPPORTED" and not seen


def test_mpesa_declares_whole_shillings() -> None:
    mpesa = MpesaAdapter(httpx.AsyncClient(), adapter_config(shortcode="174379"))
    assert amount_refusal(mpesa, Money(150050, "KES"), "MPESA") == (
        "amount", "M-Pesa takes whole shillings; 1,500.50 KES has cents")
    assert amount_refusal(mpesa, Money(150000, "KES"), "MPESA") is None
    # Safaricom's ceiling for one transaction: at it, taken; a shilling over, refused when asked for.
    assert amount_refusal(mpesa, Money(25_000_000, "KES"), "MPESA") is None
    assert amount_refusal(mpesa, Money(25_000_100, "KES"), "MPESA") == (
        "amount", "M-Pesa takes at most 250,000.00 KES in one transaction; 250,001.00 KES is more")
    assert amount_refusal(mpesa, Money(1500, "RWF"), "MPESA") == (
        "paymentMethod", "MPESA collects KES only; this payment is in RWF")
