"""The service's own secrets rotated with an overlap: JWT_PREVIOUS_SECRETS and CALLBACK_SECRET_<NAME>_PREVIOUS, and
the providers' signing keys: AIRTEL_CALLBACK_KEY_PREVIOUS, IREMBOPAY_SECRET_KEY_PREVIOUS.

Start-up refuses the mistakes of editing those lists. A callback carrying a previous secret (a payment requested
before the deploy calls back with the URL it was given then) is accepted as with the current one, through the real
routes, and counted; one with neither secret is refused and changes nothing; every URL the gateway hands out after
the rotation carries the current secret."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from core import auth, metrics
from core.config import DEV_CREDENTIAL, ConfigError, Settings, load_settings
from core.models import Payment, ProviderEvent, SmsMessage, UssdSession
from core.payments import create_payment
from providers.airtel.adapter import callback_hash
from providers.irembopay.adapter import signature_header
from providers.registry import build_providers
from providers.routes import callback_url
from tests.channels.sms.test_routes import sent_message, status_of
from tests.channels.ussd.helpers import AtPhone
from tests.conftest import make_settings
from tests.core.test_crypto_config import _production_env
from tests.providers.wires import ADMIN, mtn_adapter, mtn_payment, mtn_wire
from tests.security.conftest import pending_payment
from tests.web.conftest import page_client

OLD, NEW, WRONG = "callback-old-0123456789abcdef", "callback-new-fedcba9876543210", "callback-guess-00000000000"
RTP = "/collection/v1_0/requesttopay"


def _used(name: str) -> float:
    return metrics.REGISTRY.get_sample_value("gateway_previous_secret_used_total", {"name": name}) or 0.0


# --- start-up ------------------------------------------------------------------------------------------------


def test_previous_secrets_are_read_per_name() -> None:
    settings = load_settings({**_production_env(), "JWT_PREVIOUS_SECRETS": f" {'p' * 32} ,{'q' * 40}",
                              "CALLBACK_SECRET_MTN_MOMO_PREVIOUS": "old-mtn", "CALLBACK_SECRET_SMS_PREVIOUS": " "})
    assert settings.jwt_previous == ("p" * 32, "q" * 40)
    assert {name: [s.get() for s in old] for name, old in settings.callback_previous_secrets.items()} == {
        "mtn_momo": ["old-mtn"]}
    assert settings.callback_secrets["mtn_momo"].get() == "t" * 24  # the URLs' secret is still the current one
    unset = load_settings(_production_env())
    assert unset.jwt_previous_secrets == () and unset.callback_previous_secrets == {}


@pytest.mark.parametrize(("change", "variable", "problem"), [
    ({"JWT_PREVIOUS_SECRETS": "j" * 32}, "JWT_PREVIOUS_SECRETS", "holds the current secret"),
    ({"JWT_PREVIOUS_SECRETS": f"{'p' * 32},,{'q' * 32}"}, "JWT_PREVIOUS_SECRETS", "has an empty item"),
    ({"JWT_PREVIOUS_SECRETS": f"{'p' * 32},"}, "JWT_PREVIOUS_SECRETS", "has an empty item"),
    ({"JWT_PREVIOUS_SECRETS": f"{'p' * 32}, {'p' * 32}"}, "JWT_PREVIOUS_SECRETS", "lists a secret twice"),
    ({"JWT_PREVIOUS_SECRETS": f"{'p' * 32},{'q' * 31}"}, "JWT_PREVIOUS_SECRETS",
     "each secret must be at least 32 bytes in production"),
    ({"CALLBACK_SECRET_MTN_MOMO_PREVIOUS": "t" * 24}, "CALLBACK_SECRET_MTN_MOMO_PREVIOUS", "holds the current secret"),
    ({"CALLBACK_SECRET_SMS_PREVIOUS": "old-sms-one,,old-sms-two"}, "CALLBACK_SECRET_SMS_PREVIOUS", "has an empty item"),
    ({"CALLBACK_SECRET_IREMBOPAY_PREVIOUS": "old-irembopay"}, "CALLBACK_SECRET_IREMBOPAY_PREVIOUS",
     "is set but CALLBACK_SECRET_IREMBOPAY is not"),
])
def test_start_up_refuses_a_bad_previous_secret(change: dict[str, str], variable: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({**_production_env(), **change})
    assert info.value.variable == variable
    assert str(info.value).startswith(f"configuration error: {variable}: {problem}")
    for value in change.values():  # no message shows a secret
        for item in filter(None, (part.strip() for part in value.split(","))):
            assert item not in str(info.value)


def test_previous_provider_keys_are_read_for_verification_only() -> None:
    settings = load_settings({**_production_env(), "AIRTEL_CALLBACK_KEY_PREVIOUS": " old-airtel-1 ,old-airtel-2",
                              "IREMBOPAY_SECRET_KEY_PREVIOUS": "old-irembo"})
    airtel, irembo = settings.providers["airtel"], settings.providers["irembopay"]
    assert airtel.previous_secrets("callback_key") == ("old-airtel-1", "old-airtel-2")
    assert irembo.previous_secrets("secret_key") == ("old-irembo",)
    # The current keys are what the gateway sends and signs with; the previous ones are not credentials.
    assert (airtel.secret("callback_key"), irembo.secret("secret_key")) == ("airtel-callback_key-value",
                                                                            "irembopay-secret_key-value")
    assert "callback_key_previous" not in airtel.credentials and "secret_key_previous" not in irembo.credentials
    unset = load_settings(_production_env())
    assert unset.providers["airtel"].previous == {} and unset.providers["irembopay"].previous == {}
    # A provider left out of PROVIDERS: its variables are not read, only named as unused.
    left_out = load_settings({**_production_env(), "PROVIDERS": "mtn_momo,airtel,mpesa",
                              "IREMBOPAY_SECRET_KEY_PREVIOUS": "irembopay-secret_key-value"})
    assert "IREMBOPAY_SECRET_KEY_PREVIOUS" in left_out.unused_provider_variables


@pytest.mark.parametrize(("change", "variable", "problem"), [
    ({"AIRTEL_CALLBACK_KEY_PREVIOUS": "airtel-callback_key-value"}, "AIRTEL_CALLBACK_KEY_PREVIOUS",
     "holds the current secret"),
    ({"AIRTEL_CALLBACK_KEY_PREVIOUS": "old-airtel,"}, "AIRTEL_CALLBACK_KEY_PREVIOUS", "has an empty item"),
    ({"AIRTEL_CALLBACK_KEY_PREVIOUS": "old-airtel, old-airtel"}, "AIRTEL_CALLBACK_KEY_PREVIOUS",
     "lists a secret twice"),
    ({"AIRTEL_CALLBACK_KEY": "", "CALLBACK_SECRET_AIRTEL": "c" * 24, "AIRTEL_CALLBACK_KEY_PREVIOUS": "old-airtel"},
     "AIRTEL_CALLBACK_KEY_PREVIOUS", "is set but AIRTEL_CALLBACK_KEY is not"),
    ({"IREMBOPAY_SECRET_KEY_PREVIOUS": " irembopay-secret_key-value "}, "IREMBOPAY_SECRET_KEY_PREVIOUS",
     "holds the current secret"),
    ({"IREMBOPAY_SECRET_KEY_PREVIOUS": "old-irembo,,older-irembo"}, "IREMBOPAY_SECRET_KEY_PREVIOUS",
     "has an empty item"),
    # The published development placeholder: a callback hashed with it (anyone can) completed its payment.
    ({"AIRTEL_CALLBACK_KEY_PREVIOUS": f"old-airtel, {DEV_CREDENTIAL}"}, "AIRTEL_CALLBACK_KEY_PREVIOUS",
     "holds the development placeholder"),
    ({"IREMBOPAY_SECRET_KEY_PREVIOUS": DEV_CREDENTIAL}, "IREMBOPAY_SECRET_KEY_PREVIOUS",
     "holds the development placeholder"),
    # The current key the placeholder (Airtel: callback authentication off, the list ignored): as unset.
    ({"AIRTEL_CALLBACK_KEY": DEV_CREDENTIAL, "AIRTEL_CALLBACK_KEY_PREVIOUS": "old-airtel"},
     "AIRTEL_CALLBACK_KEY_PREVIOUS", "is set but AIRTEL_CALLBACK_KEY is not"),
    ({"IREMBOPAY_SECRET_KEY": DEV_CREDENTIAL, "IREMBOPAY_SECRET_KEY_PREVIOUS": "old-irembo"},
     "IREMBOPAY_SECRET_KEY_PREVIOUS", "is set but IREMBOPAY_SECRET_KEY is not"),
])
def test_start_up_refuses_a_bad_previous_provider_key(change: dict[str, str], variable: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({**_production_env(), **change})
    assert info.value.variable == variable
    assert str(info.value).startswith(f"configuration error: {variable}: {problem}")
    for item in filter(None, (part.strip() for part in change[variable].split(","))):
        assert item not in str(info.value)  # no message shows a key


@pytest.mark.parametrize("variable", ["MTN_MOMO_API_KEY_PREVIOUS", "AIRTEL_CLIENT_SECRET_PREVIOUS",
                                      "IREMBOPAY_SECRET_PREVIOUS", "AIRTEL_CALLBACK_KEYS_PREVIOUS"])
def test_start_up_refuses_a_previous_list_the_gateway_does_not_read(variable: str) -> None:
    """A provider credential the gateway sends has no previous list, and a slip in the name of one that has was
    read by nothing: the start went on, the operator believing the old key still took callbacks (refused, 401)."""
    with pytest.raises(ConfigError) as info:
        load_settings({**_production_env(), variable: "old-key-value"})
    assert info.value.variable == variable
    assert str(info.value).startswith(f"configuration error: {variable}: is not a variable the gateway reads")
    assert "old-key-value" not in str(info.value)
    # A provider left out of PROVIDERS: its variables are not read, only named as unused.
    left_out = load_settings({**_production_env(), "PROVIDERS": "mpesa", variable: "old-key-value"})
    assert variable in left_out.unused_provider_variables


def test_outside_production_a_previous_irembopay_key_needs_a_current_one() -> None:
    with pytest.raises(ConfigError) as info:  # the current would be the development placeholder
        make_settings(IREMBOPAY_SECRET_KEY_PREVIOUS="old-irembo")
    assert info.value.variable == "IREMBOPAY_SECRET_KEY_PREVIOUS"
    assert make_settings(IREMBOPAY_SECRET_KEY="new-irembo", IREMBOPAY_SECRET_KEY_PREVIOUS="old-irembo").providers[
        "irembopay"].previous_secrets("secret_key") == ("old-irembo",)


def test_outside_production_a_short_previous_jwt_secret_is_taken_and_the_rest_refused() -> None:
    assert make_settings(JWT_SECRET="now", JWT_PREVIOUS_SECRETS="before").jwt_previous == ("before",)
    with pytest.raises(ConfigError) as info:
        make_settings(JWT_SECRET="now", JWT_PREVIOUS_SECRETS="now")
    assert info.value.variable == "JWT_PREVIOUS_SECRETS"
    with pytest.raises(ConfigError) as info:
        make_settings(JWT_PREVIOUS_SECRETS=",")
    assert info.value.variable == "JWT_PREVIOUS_SECRETS"


# --- a provider's callback, through the real route -------------------------------------------------------------


@pytest.fixture
def settings(migrated_database: str) -> Settings:
    """The service before the rotation: MTN's callback URLs carry the old secret."""
    return make_settings(CALLBACK_SECRET_MTN_MOMO=OLD)


def _status_answer(request: httpx.Request) -> httpx.Response:
    """MTN's status lookup (which confirms every unsigned callback): the payment was approved."""
    reference = request.url.path.rsplit("/", 1)[-1]
    return httpx.Response(200, json={"amount": "50000", "currency": "RWF", "externalId": reference,
                                     "financialTransactionId": f"FT-{reference[:8]}", "status": "SUCCESSFUL",
                                     "payer": {"partyIdType": "MSISDN", "partyId": "250788000001"}})


async def _requested(rt: Any, demo: dict[str, Any], worker: Any, wire: Any, key: str) -> tuple[Payment, str]:
    """A payment whose request MTN accepted, and the callback URL that request gave MTN (path and query)."""
    async with rt.sessionmaker.begin() as s:
        payment, _ = await create_payment(s, rt, mtn_payment(demo, key), actor=ADMIN)
    await worker.run_once()  # the collect job: the request to pay
    [sent] = [r for r in wire.sent("POST", RTP) if r.headers["X-Reference-Id"] == payment.provider_reference]
    url = httpx.URL(sent.headers["X-Callback-Url"])
    assert (url.host, url.path) == ("127.0.0.1", "/webhooks/payments/mtn_momo")
    return await _payment(rt, payment.id), url.raw_path.decode()


async def _payment(rt: Any, payment_id: str) -> Payment:
    async with rt.sessionmaker() as s:
        return await s.get(Payment, payment_id)


async def _events(rt: Any) -> int:
    async with rt.sessionmaker() as s:
        return int((await s.execute(select(func.count()).select_from(ProviderEvent))).scalar_one())


async def test_a_callback_with_the_previous_secret_completes_the_payment_and_a_wrong_one_changes_nothing(
        rt: Any, demo: dict[str, Any], worker: Any, aiohttp_client: Any, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from app import create_app

    monkeypatch.setattr(auth, "_PREVIOUS_LOGGED", set())
    wire = mtn_wire().on("POST", RTP, 202)
    mtn_adapter(rt, wire)
    before, before_url = await _requested(rt, demo, worker, wire, "rotation-before-0001")
    assert before.status == "PROCESSING" and f"secret={OLD}" in before_url

    # The deploy: the new secret is current, the old one kept as previous; every process restarted.
    rt.settings = make_settings(CALLBACK_SECRET_MTN_MOMO=NEW, CALLBACK_SECRET_MTN_MOMO_PREVIOUS=OLD)
    client = await aiohttp_client(create_app(rt.settings, runtime=rt))
    after, after_url = await _requested(rt, demo, worker, wire, "rotation-after-0001")
    assert f"secret={NEW}" in after_url and OLD not in after_url  # handed out after: the current secret only
    assert callback_url(rt.settings, "mtn_momo") == f"http://127.0.0.1:9/webhooks/payments/mtn_momo?secret={NEW}"
    wire.on("GET", RTP + "/*", _status_answer)

    # Neither secret (or none at all): refused, nothing stored, MTN not even asked.
    used, events = _used("mtn_momo"), await _events(rt)
    for query in (f"secret={WRONG}&", "", f"secret={OLD}x&", f"secret={OLD[:-1]}&"):
        resp = await client.put(f"/webhooks/payments/mtn_momo?{query}ref={before.provider_reference}",
                                json={"status": "SUCCESSFUL", "externalId": before.provider_reference})
        assert resp.status == 401, query
        assert (await resp.json())["message"] == "callback secret is missing or wrong"
    assert (await _payment(rt, before.id)).status == "PROCESSING"
    assert await _events(rt) == events and wire.sent("GET", RTP + "/*") == []
    assert _used("mtn_momo") == used

    # The callback MTN makes to the URL it was given before the deploy: accepted, the payment completed.
    with caplog.at_level(logging.INFO, logger="gateway.auth"):
        resp = await client.put(before_url, json={"status": "SUCCESSFUL", "externalId": before.provider_reference})
        assert resp.status == 200, await resp.text()
        again = await client.put(before_url, json={"status": "SUCCESSFUL", "externalId": before.provider_reference})
        assert again.status == 200  # MTN's resend: taken once (the event is a duplicate), counted again
    done = await _payment(rt, before.id)
    assert (done.status, done.provider_transaction_id) == ("COMPLETED", f"FT-{before.provider_reference[:8]}")
    assert _used("mtn_momo") == used + 2
    [line] = [r for r in caplog.records if r.name == "gateway.auth" and "previous secret" in r.getMessage()]
    assert (line.levelno, line.__dict__["secret_for"], line.__dict__["variable"]) == (
        logging.INFO, "mtn_momo", "CALLBACK_SECRET_MTN_MOMO_PREVIOUS")
    assert OLD not in caplog.text and NEW not in caplog.text

    # The current secret, as before the change; not counted.
    resp = await client.put(after_url, json={"status": "SUCCESSFUL", "externalId": after.provider_reference})
    assert resp.status == 200
    assert (await _payment(rt, after.id)).status == "COMPLETED"
    assert _used("mtn_momo") == used + 2
    scrape = await (await client.get("/metrics")).text()
    assert f'gateway_previous_secret_used_total{{name="mtn_momo"}} {used + 2}' in scrape

    # The previous secret removed (the overlap over): a late callback carrying it is refused.
    rt.settings = make_settings(CALLBACK_SECRET_MTN_MOMO=NEW)
    done_client = await aiohttp_client(create_app(rt.settings, runtime=rt))
    assert (await done_client.put(before_url, json={"status": "SUCCESSFUL"})).status == 401


# --- the SMS and USSD callbacks ------------------------------------------------------------------------------


async def test_sms_callbacks_take_the_previous_secret_and_its_simulator_is_given_the_current(
        rt: Any, aiohttp_client: Any) -> None:
    from app import create_app
    from channels.sms.simulator import STATE, simulator_from_settings

    rt.settings = make_settings(CALLBACK_SECRET_SMS=NEW, CALLBACK_SECRET_SMS_PREVIOUS=OLD)
    client = await aiohttp_client(create_app(rt.settings, runtime=rt))
    sms_id = await sent_message(rt)
    form = {"id": "ATXid_X", "status": "Success"}
    for query in ("", f"?secret={WRONG}"):
        assert (await client.post(f"/sms/africastalking/delivery{query}", data=form)).status == 403
    assert (await status_of(rt, sms_id)).status == "SENT"
    used = _used("sms")
    assert (await client.post(f"/sms/africastalking/delivery?secret={OLD}", data=form)).status == 200
    assert (await status_of(rt, sms_id)).status == "DELIVERED"
    assert _used("sms") == used + 1
    async with rt.sessionmaker() as s:
        assert (await s.execute(select(func.count()).select_from(SmsMessage))).scalar_one() == 1
    delivery_url = simulator_from_settings(rt.settings)[STATE].delivery_url
    assert delivery_url == f"http://127.0.0.1:9/sms/africastalking/delivery?secret={NEW}"


async def test_ussd_hops_take_the_previous_secret_and_the_phone_page_is_given_the_current(
        rt: Any, demo: dict[str, Any], aiohttp_client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PHONE_SIMULATOR_ENABLED", raising=False)
    rt.settings = make_settings(SIMULATORS_IN_PROCESS="1", CALLBACK_SECRET_AFRICASTALKING=NEW,
                                CALLBACK_SECRET_AFRICASTALKING_PREVIOUS=OLD)
    client = await page_client(aiohttp_client, rt, rt.settings)
    for query in ("", f"?secret={WRONG}", f"?secret={NEW[:-1]}"):
        resp = await client.post(f"/ussd/africastalking{query}", data=AtPhone(client, "+250788000002").form())
        assert resp.status == 403, query
    async with rt.sessionmaker() as s:
        assert (await s.execute(select(func.count()).select_from(UssdSession))).scalar_one() == 0
    used = _used("africastalking")
    assert (await AtPhone(client, "+250788000002", query=f"?secret={OLD}").dial()).startswith("CON Welcome")
    assert _used("africastalking") == used + 1
    assert (await AtPhone(client, "+250788000002", query=f"?secret={NEW}").dial()).startswith("CON Welcome")
    assert _used("africastalking") == used + 1
    body = await (await client.get("/simulator/config")).json()
    assert body["ussdUrl"] == f"/ussd/africastalking?secret={NEW}"


# --- the providers' signing keys: Airtel's callback hash, IremboPay's webhook signature ---------------------------

OLD_KEY, NEW_KEY, WRONG_KEY = "provider-key-old-0123456789", "provider-key-new-9876543210", "provider-key-guess-000000"


async def _with_keys(rt: Any, aiohttp_client: Any, **env: str) -> Any:
    """The service restarted with `env` (its providers built from it, as a start does): its test client."""
    from app import create_app

    rt.settings = make_settings(**env)
    rt.providers = {**rt.providers, **build_providers(rt.settings, rt.http, rt.redis)}
    return await aiohttp_client(create_app(rt.settings, runtime=rt))


def _airtel_callback(payment: Payment, key: str) -> dict[str, Any]:
    """Airtel's callback for the payment, hashed with `key` as Airtel (and its simulator) hashes it."""
    tx = {"id": payment.provider_reference, "message": "Paid", "status_code": "TS",
          "airtel_money_id": f"MP{payment.provider_reference[:8]}"}
    return {"transaction": tx, "hash": callback_hash(tx, key)}


def _irembo_webhook(payment: Payment, key: str) -> tuple[bytes, dict[str, str]]:
    """IremboPay's webhook that the payment was paid, signed with `key` as IremboPay (and its simulator) signs it."""
    body = json.dumps({"success": True, "message": "ok", "data": {
        "transactionId": payment.provider_reference, "invoiceNumber": f"88{payment.provider_reference[:8]}",
        "paymentStatus": "PAID", "amount": payment.amount_minor, "currency": "RWF",
        "paymentReference": f"MTN-{payment.provider_reference[:8]}"}}).encode()
    header = signature_header(key, int(time.time() * 1000), body)
    return body, {"Content-Type": "application/json", "irembopay-signature": header}


async def test_an_airtel_callback_hashed_with_the_previous_key_completes_the_payment(
        rt: Any, demo: dict[str, Any], aiohttp_client: Any, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: AIRTEL_CALLBACK_KEY changed, Airtel still hashed with the old key until it was changed there, and
    every callback in between was refused (401), its payment left to the status polls."""
    monkeypatch.setattr(auth, "_PREVIOUS_LOGGED", set())
    client = await _with_keys(rt, aiohttp_client, AIRTEL_CALLBACK_KEY=NEW_KEY, AIRTEL_CALLBACK_KEY_PREVIOUS=OLD_KEY)
    before, after = [await pending_payment(rt, demo, provider="airtel", method="MOBILE_MONEY_AIRTEL") for _ in range(2)]
    url = "/webhooks/payments/airtel"

    # Hashed with neither key (or a key rotated out and then some): refused, nothing stored.
    used, events = _used("airtel_callback_key"), await _events(rt)
    for key in (WRONG_KEY, OLD_KEY[:-1], NEW_KEY + "x"):
        resp = await client.post(url, json=_airtel_callback(before, key))
        assert resp.status == 401, key
        assert (await resp.json())["message"] == "Airtel Money callback hash does not match"
    assert (await _payment(rt, before.id)).status == "PENDING"
    assert await _events(rt) == events and _used("airtel_callback_key") == used

    # Hashed with the previous key: taken as with the current one (no status query: a verified hash), and counted.
    with caplog.at_level(logging.INFO, logger="gateway.auth"):
        resp = await client.post(url, json=_airtel_callback(before, OLD_KEY))
        assert resp.status == 200, await resp.text()
    done = await _payment(rt, before.id)
    assert (done.status, done.provider_transaction_id) == ("COMPLETED", f"MP{before.provider_reference[:8]}")
    assert _used("airtel_callback_key") == used + 1
    [line] = [r for r in caplog.records if r.name == "gateway.auth" and "previous secret" in r.getMessage()]
    assert (line.__dict__["secret_for"], line.__dict__["variable"]) == (
        "airtel_callback_key", "AIRTEL_CALLBACK_KEY_PREVIOUS")
    assert OLD_KEY not in caplog.text and NEW_KEY not in caplog.text

    # The current key: as before, not counted.
    assert (await client.post(url, json=_airtel_callback(after, NEW_KEY))).status == 200
    assert (await _payment(rt, after.id)).status == "COMPLETED"
    assert _used("airtel_callback_key") == used + 1

    # Without AIRTEL_CALLBACK_KEY_PREVIOUS (the overlap over), the old key is refused again.
    late = await pending_payment(rt, demo, provider="airtel", method="MOBILE_MONEY_AIRTEL")
    client = await _with_keys(rt, aiohttp_client, AIRTEL_CALLBACK_KEY=NEW_KEY)
    assert (await client.post(url, json=_airtel_callback(late, OLD_KEY))).status == 401
    assert (await _payment(rt, late.id)).status == "PENDING"


async def test_an_irembopay_webhook_signed_with_the_previous_key_completes_the_payment(
        rt: Any, demo: dict[str, Any], aiohttp_client: Any, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth, "_PREVIOUS_LOGGED", set())
    client = await _with_keys(rt, aiohttp_client, IREMBOPAY_SECRET_KEY=NEW_KEY, IREMBOPAY_SECRET_KEY_PREVIOUS=OLD_KEY)
    before, after = [await pending_payment(rt, demo, provider="irembopay", method="MOBILE_MONEY_MTN") for _ in range(2)]
    url = "/webhooks/payments/irembopay"

    used, events = _used("irembopay_secret_key"), await _events(rt)
    for key in (WRONG_KEY, OLD_KEY[:-1]):
        body, headers = _irembo_webhook(before, key)
        resp = await client.post(url, data=body, headers=headers)
        assert resp.status == 401, key
        assert (await resp.json())["message"] == "irembopay signature does not match"
    assert (await _payment(rt, before.id)).status == "PENDING"
    assert await _events(rt) == events and _used("irembopay_secret_key") == used

    body, headers = _irembo_webhook(before, OLD_KEY)
    with caplog.at_level(logging.INFO, logger="gateway.auth"):
        resp = await client.post(url, data=body, headers=headers)
        assert resp.status == 200, await resp.text()
    done = await _payment(rt, before.id)
    assert (done.status, done.provider_transaction_id) == ("COMPLETED", f"88{before.provider_reference[:8]}")
    assert _used("irembopay_secret_key") == used + 1
    [line] = [r for r in caplog.records if r.name == "gateway.auth" and "previous secret" in r.getMessage()]
    assert line.__dict__["variable"] == "IREMBOPAY_SECRET_KEY_PREVIOUS"
    # The same signed webhook again is still a replay (409), counted once only: the one-time check is the same.
    assert (await client.post(url, data=body, headers=headers)).status == 409
    assert _used("irembopay_secret_key") == used + 1

    body, headers = _irembo_webhook(after, NEW_KEY)
    assert (await client.post(url, data=body, headers=headers)).status == 200
    assert (await _payment(rt, after.id)).status == "COMPLETED"
    assert _used("irembopay_secret_key") == used + 1

    late = await pending_payment(rt, demo, provider="irembopay", method="MOBILE_MONEY_MTN")
    client = await _with_keys(rt, aiohttp_client, IREMBOPAY_SECRET_KEY=NEW_KEY)
    body, headers = _irembo_webhook(late, OLD_KEY)
    assert (await client.post(url, data=body, headers=headers)).status == 401
    assert (await _payment(rt, late.id)).status == "PENDING"
