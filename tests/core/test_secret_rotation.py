"""The service's own secrets rotated with an overlap: JWT_PREVIOUS_SECRETS and CALLBACK_SECRET_<NAME>_PREVIOUS.

Start-up refuses the mistakes of editing those lists. A callback carrying a previous secret (a payment requested
before the deploy calls back with the URL it was given then) is accepted as with the current one, through the real
routes, and counted; one with neither secret is refused and changes nothing; every URL the gateway hands out after
the rotation carries the current secret."""

from __future__ import annotations

import logging
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from core import auth, metrics
from core.config import ConfigError, Settings, load_settings
from core.models import Payment, ProviderEvent, SmsMessage, UssdSession
from core.payments import create_payment
from providers.routes import callback_url
from tests.channels.sms.test_routes import sent_message, status_of
from tests.channels.ussd.helpers import AtPhone
from tests.conftest import make_settings
from tests.core.test_crypto_config import _production_env
from tests.providers.wires import ADMIN, mtn_adapter, mtn_payment, mtn_wire
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
