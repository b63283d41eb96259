"""The provider registry, payment routes, the callback endpoint and the in-process simulators."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from aiohttp import web

from core.config import PROVIDER_NAMES, ConfigError, Settings, load_settings
from core.metrics import CALLBACK_REJECTED
from core.money import Money
from core.phone import Phone
from core.ports import CollectionRequest, EventKind, ProviderEvent, ProviderOutcome
from core.runtime import RUNTIME
from providers import routes
from providers.airtel.adapter import callback_hash
from providers.registry import (
    ADAPTERS,
    DEFAULT_ROUTES,
    SIMULATORS,
    build_providers,
    build_routes,
    mount_simulators,
    simulator_options,
)
from providers.simulation import STATE, Outcome, options_from_args, options_from_env, outcome_for
from tests.integration.procs import free_port

REF = "3f0c8a52-6a8e-4c1e-9d0b-2b7f5b1e9a01"


def settings(**env: str) -> Settings:
    return load_settings({"GATEWAY_ENV": "test", **env})


# --- registry ----------------------------------------------------------------------------------------


def test_every_provider_has_an_adapter_and_a_simulator() -> None:
    assert set(ADAPTERS) == set(SIMULATORS) == set(PROVIDER_NAMES)


async def test_build_providers_from_settings() -> None:
    async with httpx.AsyncClient() as http:
        providers = build_providers(settings(), http)
    assert set(providers) == set(PROVIDER_NAMES)
    for name, provider in providers.items():
        assert provider.name == name
        assert isinstance(provider.supports_partial_refund, bool)
        for member in (
            "request_collection",
            "collection_status",
            "request_refund",
            "refund_status",
            "verify_callback",
            "parse_callback",
        ):
            assert callable(getattr(provider, member))
    assert providers["mtn_momo"].supports_partial_refund is True
    assert providers["airtel"].supports_partial_refund is False


async def test_default_routes() -> None:
    s = settings()
    async with httpx.AsyncClient() as http:
        routes_ = build_routes(s, build_providers(s, http), env={})
    assert routes_ == DEFAULT_ROUTES
    assert routes_["MOBILE_MONEY_MTN"] == "mtn_momo" and routes_["BANK_ECOBANK"] == "irembopay"


async def test_routes_overridden_by_payment_routes() -> None:
    s = settings()
    async with httpx.AsyncClient() as http:
        providers = build_providers(s, http)
    env = {"PAYMENT_ROUTES": "mobile_money_mtn=irembopay, MOBILE_MONEY_AIRTEL=IremboPay"}
    routes_ = build_routes(s, providers, env=env)
    assert routes_["MOBILE_MONEY_MTN"] == "irembopay" and routes_["MOBILE_MONEY_AIRTEL"] == "irembopay"
    assert routes_["MPESA"] == "mpesa"
    # settings.extra wins over the environment
    from_extra = build_routes(
        replace(s, extra={"PAYMENT_ROUTES": "MOBILE_MONEY_MTN=mtn_momo"}), providers, env=env
    )
    assert from_extra["MOBILE_MONEY_MTN"] == "mtn_momo"


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("MPESA=airtel", "does not collect MPESA"),
        ("MOBILE_MONEY_MTN=nobody", "not configured"),
        ("MOBILE_MONEY_MTN", "expected METHOD=provider"),
        ("=mtn_momo", "expected METHOD=provider"),
        ("MOBILE_MONEY_MTN=irembopay,MOBILE_MONEY_MTN=mtn_momo",
         "routes MOBILE_MONEY_MTN twice \\(to irembopay and mtn_momo\\)"),
    ],
)
async def test_bad_payment_routes(value: str, words: str) -> None:
    s = settings()
    async with httpx.AsyncClient() as http:
        providers = build_providers(s, http)
    with pytest.raises(ConfigError, match=words) as err:
        build_routes(s, providers, env={"PAYMENT_ROUTES": value})
    assert err.value.variable == "PAYMENT_ROUTES"


def test_callback_url() -> None:
    s = settings(PUBLIC_BASE_URL="https://pay.example.rw", CALLBACK_SECRET_MTN_MOMO="s3cr&t")
    assert (
        routes.callback_url(s, "mtn_momo")
        == "https://pay.example.rw/webhooks/payments/mtn_momo?secret=s3cr%26t"
    )
    assert routes.callback_url(s, "airtel") == "https://pay.example.rw/webhooks/payments/airtel"
    # Daraja refuses a URL with "mpesa" in it: M-Pesa is told a path without it.
    assert routes.callback_url(s, "mpesa") == "https://pay.example.rw/webhooks/payments/daraja"


def test_simulator_options_carry_credentials_and_callback(monkeypatch: pytest.MonkeyPatch) -> None:
    s = settings(AIRTEL_CLIENT_ID="cid", CALLBACK_SECRET_AIRTEL="abc")
    options = simulator_options(s, "airtel", env={"SIM_DELAY": "0.5", "SIM_DROP_CALLBACK": "1"})
    assert options.delay == 0.5 and options.drop_callback is True
    assert options.credentials["client_id"] == "cid"
    assert options.callback_url == "http://127.0.0.1:8080/webhooks/payments/airtel?secret=abc"
    with pytest.raises(ConfigError, match="SIM_DELAY"):
        simulator_options(s, "airtel", env={"SIM_DELAY": "soon"})


def test_simulator_options_from_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIM_DELAY", "3")
    monkeypatch.setenv("SIM_DUPLICATE_CALLBACK", "true")
    options = options_from_args(["--drop-callback", "--hang-request", "2.5", "--pending-forever",
                                 "+250788000009, 250733000009", "--callback-method", "POST"])
    assert options.delay == 3 and options.duplicate_callback is True  # from the environment
    assert options.drop_callback is True and options.hang_request == 2.5 and options.callback_method == "POST"
    assert options.pending_forever == frozenset({"250788000009", "250733000009"})
    assert outcome_for("+250788000009", options) is Outcome.PENDING
    assert outcome_for("+250788000002", options) is Outcome.FAIL
    assert outcome_for("+250788777777", options) is Outcome.SUCCEED
    with pytest.raises(SystemExit):
        options_from_args(["--delay", "soon"])
    with pytest.raises(ConfigError, match="--hang-request"):
        options_from_args(["--hang-request", "-1"])
    with pytest.raises(ConfigError, match="SIM_CALLBACK_METHOD"):
        options_from_env({"SIM_CALLBACK_METHOD": "GET"})


# --- the callback endpoint ---------------------------------------------------------------------------


class Recorder:
    """Stands in for core.provider_events.handle_provider_event: these tests are about the edge, not the core."""

    def __init__(self) -> None:
        self.events: list[ProviderEvent] = []
        self.arrived = asyncio.Event()

    async def __call__(self, _rt: Any, event: ProviderEvent) -> str:
        self.events.append(event)
        self.arrived.set()
        return "applied"

    async def wait_for(self, count: int) -> list[ProviderEvent]:
        async def enough() -> None:
            while len(self.events) < count:
                self.arrived.clear()
                await self.arrived.wait()

        await asyncio.wait_for(enough(), 30)  # patience for a loaded machine
        return self.events


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    import core.provider_events

    rec = Recorder()
    monkeypatch.setattr(core.provider_events, "handle_provider_event", rec)
    return rec


@pytest.fixture
async def gateway(aiohttp_server: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The callback routes and all four simulators in one process, as in the embedded default."""
    monkeypatch.setenv("SIM_DELAY", "0.02")
    port = free_port()
    s = settings(
        PORT=str(port),
        CALLBACK_SECRET_MTN_MOMO="mtn-cb",
        CALLBACK_SECRET_AIRTEL="airtel-cb",
        AIRTEL_CALLBACK_KEY="airtel-key-1",
    )
    http = httpx.AsyncClient()
    app = web.Application()
    app[RUNTIME] = SimpleNamespace(settings=s, providers=build_providers(s, http))  # type: ignore[assignment]
    routes.setup(app)
    mount_simulators(app, s)
    await aiohttp_server(app, host="127.0.0.1", port=port)
    yield app[RUNTIME], f"http://127.0.0.1:{port}"
    await http.aclose()


def rejected(source: str) -> float:
    return CALLBACK_REJECTED.labels(source=source)._value.get()


def mtn_body(status: str = "SUCCESSFUL") -> dict[str, Any]:
    return {
        "financialTransactionId": "1843215792",
        "externalId": REF,
        "amount": "15000",
        "currency": "RWF",
        "payer": {"partyIdType": "MSISDN", "partyId": "250788000001"},
        "status": status,
    }


async def test_mtn_callback_accepted_with_put_and_post(gateway: Any, recorder: Recorder) -> None:
    _, base = gateway
    async with httpx.AsyncClient() as http:
        put = await http.put(f"{base}/webhooks/payments/mtn_momo?secret=mtn-cb&ref={REF}", json=mtn_body())
        post = await http.post(
            f"{base}/webhooks/payments/mtn_momo?secret=mtn-cb&ref={REF}", json=mtn_body("FAILED")
        )
    assert put.status_code == 200 and put.json() == {"status": "accepted", "result": "applied"}
    assert post.status_code == 200
    first, second = recorder.events
    assert first.outcome is ProviderOutcome.SUCCEEDED and first.reference == REF
    assert second.outcome is ProviderOutcome.FAILED
    assert first.needs_confirmation is True


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/webhooks/payments/mtn_momo?ref=x", 401),  # secret missing
        ("/webhooks/payments/mtn_momo?secret=guess", 401),
        ("/webhooks/payments/mtn_momo?secret=MTN-CB", 401),
    ],
)
async def test_wrong_secret_is_refused(gateway: Any, recorder: Recorder, path: str, status: int) -> None:
    _, base = gateway
    before = rejected("mtn_momo")
    async with httpx.AsyncClient() as http:
        answer = await http.post(f"{base}{path}", json=mtn_body())
    assert answer.status_code == status
    body = answer.json()
    assert body["statusCode"] == status and body["path"] == "/webhooks/payments/mtn_momo" and body["message"]
    assert rejected("mtn_momo") == before + 1
    assert recorder.events == []


async def test_bad_airtel_hash_and_unknown_status_are_refused(gateway: Any, recorder: Recorder) -> None:
    _, base = gateway
    tx = {"id": REF, "message": "ok", "status_code": "TS", "airtel_money_id": "MP1"}
    url = f"{base}/webhooks/payments/airtel?secret=airtel-cb"
    before = rejected("airtel")
    async with httpx.AsyncClient() as http:
        forged = await http.post(url, json={"transaction": tx, "hash": callback_hash(tx, "not-the-key")})
        unsigned = await http.post(url, json={"transaction": tx})
        weird = {**tx, "status_code": "TZ"}
        unknown = await http.post(
            url, json={"transaction": weird, "hash": callback_hash(weird, "airtel-key-1")}
        )
        good = await http.post(url, json={"transaction": tx, "hash": callback_hash(tx, "airtel-key-1")})
    assert (forged.status_code, unsigned.status_code, unknown.status_code) == (401, 401, 400)
    assert rejected("airtel") == before + 3
    assert good.status_code == 200
    (event,) = recorder.events
    assert event.needs_confirmation is False and event.event_id == f"{REF}:TS"


async def test_unknown_provider_bad_body_and_size(gateway: Any, recorder: Recorder) -> None:
    _, base = gateway
    async with httpx.AsyncClient() as http:
        unknown = await http.post(f"{base}/webhooks/payments/paypal", json={})
        not_json = await http.post(f"{base}/webhooks/payments/mtn_momo?secret=mtn-cb", content=b"<xml/>")
        unknown_status = await http.post(
            f"{base}/webhooks/payments/mtn_momo?secret=mtn-cb&ref={REF}", json=mtn_body("MAYBE")
        )
        huge = await http.post(
            f"{base}/webhooks/payments/mtn_momo?secret=mtn-cb",
            content=b"{" + b" " * (routes.MAX_CALLBACK_BODY + 10) + b"}",
        )
        get = await http.get(f"{base}/webhooks/payments/mtn_momo")
    assert unknown.status_code == 404 and "paypal" in unknown.json()["message"]
    assert not_json.status_code == 400 and unknown_status.status_code == 400
    assert huge.status_code == 413
    assert get.status_code == 405
    assert recorder.events == []


async def test_a_callback_body_in_two_tcp_segments_is_read_whole(gateway: Any, recorder: Recorder) -> None:
    """aiohttp's read(n) returns what has arrived so far: the body's second half must not be dropped."""
    import json

    from tests.rawhttp import post_in_two_parts

    _, base = gateway
    port = int(base.rsplit(":", 1)[1])
    body = json.dumps(mtn_body()).encode()
    status, answer = await post_in_two_parts("127.0.0.1", port, f"/webhooks/payments/mtn_momo?secret=mtn-cb&ref={REF}",
                                             body, content_type="application/json", split_at=40)
    assert status == 200, answer
    (event,) = recorder.events
    assert event.outcome is ProviderOutcome.SUCCEEDED and event.reference == REF
    # Over the limit in pieces is still refused, and nothing reaches the core.
    huge = b"{" + b" " * (routes.MAX_CALLBACK_BODY + 10) + b"}"
    status, _ = await post_in_two_parts("127.0.0.1", port, "/webhooks/payments/mtn_momo?secret=mtn-cb", huge,
                                        content_type="application/json", split_at=1000)
    assert status == 413 and len(recorder.events) == 1


async def test_mpesa_gets_its_own_acknowledgement(gateway: Any, recorder: Recorder) -> None:
    _, base = gateway
    body = {
        "Body": {
            "stkCallback": {
                "MerchantRequestID": "29115-34620561-1",
                "CheckoutRequestID": "ws_CO_191220191020363925",
                "ResultCode": 1032,
                "ResultDesc": "Request cancelled by user",
            }
        }
    }
    async with httpx.AsyncClient() as http:
        # The path M-Pesa is told (callback_url), and its name's, which requests sent before that still name.
        answers = [await http.post(f"{base}/webhooks/payments/{word}", json=body) for word in ("daraja", "mpesa")]
    for answer in answers:
        assert answer.status_code == 200 and answer.json() == {"ResultCode": 0, "ResultDesc": "Accepted"}
    assert [event.provider for event in recorder.events] == ["mpesa", "mpesa"]


# --- in-process simulators end to end ----------------------------------------------------------------


def collection(payer: str, method: str, callback_url: str) -> CollectionRequest:
    return CollectionRequest(
        provider_reference=REF,
        payment_reference="PAY_8K2M4Q",
        amount=Money(15000, "RWF"),
        payer=Phone(payer),
        payer_account=payer,
        description="Rent",
        callback_url=callback_url,
        method=method,
    )


async def test_in_process_mtn_simulator_calls_back_the_gateway(gateway: Any, recorder: Recorder) -> None:
    rt, _ = gateway
    mtn = rt.providers["mtn_momo"]
    await mtn.request_collection(
        collection("+250788000001", "MOBILE_MONEY_MTN", routes.callback_url(rt.settings, "mtn_momo"))
    )
    (event,) = await recorder.wait_for(1)
    assert event.provider == "mtn_momo" and event.kind is EventKind.COLLECTION and event.reference == REF
    assert event.outcome is ProviderOutcome.SUCCEEDED and event.amount == Money(15000, "RWF")
    assert (await mtn.collection_status(REF, None, "RWF")).outcome is ProviderOutcome.SUCCEEDED


async def test_in_process_airtel_simulator_signs_its_callback(gateway: Any, recorder: Recorder) -> None:
    rt, base = gateway
    airtel = rt.providers["airtel"]
    await airtel.request_collection(collection("+250733000002", "MOBILE_MONEY_AIRTEL", ""))
    (event,) = await recorder.wait_for(1)
    assert event.provider == "airtel" and event.outcome is ProviderOutcome.FAILED
    assert event.needs_confirmation is False  # the simulator signed with the configured callback key
    async with httpx.AsyncClient() as http:
        answer = await http.get(f"{base}/_sim/airtel/_control/pending", params={"msisdn": "+250733000002"})
    assert answer.status_code == 200 and answer.json() == {"prompts": []}


async def test_callback_logs_hold_no_secret_or_number(
    gateway: Any, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    _, base = gateway
    caplog.set_level("DEBUG")
    async with httpx.AsyncClient() as http:
        await http.put(f"{base}/webhooks/payments/mtn_momo?secret=mtn-cb&ref={REF}", json=mtn_body())
        await http.put(f"{base}/webhooks/payments/mtn_momo?secret=wrong-guess", json=mtn_body())
    # Our own records only: aiohttp's access log shows the query string, and core.logs.configure keeps
    # that logger at WARNING for exactly this reason.
    ours = [r for r in caplog.records if r.name.startswith("gateway")]
    everything = " ".join(r.getMessage() + str(vars(r)) for r in ours)
    assert "provider callback handled" in everything and "provider callback refused" in everything
    for secret in ("mtn-cb", "wrong-guess", "250788000001"):
        assert secret not in everything


def test_mount_simulators_with_overrides() -> None:
    app = web.Application()
    mount_simulators(app, settings(), interactive=True, delay=0.5)
    mounted = {r.get_info()["prefix"]: r.get_info()["app"] for r in app.router.resources()
               if "app" in r.get_info()}
    assert set(mounted) == {f"/_sim/{name}" for name in PROVIDER_NAMES}
    for sub in mounted.values():
        options = sub[STATE].options
        assert options.interactive is True and options.delay == 0.5


@pytest.mark.parametrize(("provider", "seen", "unseen"), [
    ("mpesa", "SKL3ABC123", "ws_CO_03122026105846540253785904"),  # the receipt, not the CheckoutRequestID
    ("mtn_momo", "1839201057", None),  # financialTransactionId
    ("airtel", "MP210603.1234.L06941", None),  # airtel_money_id
    ("irembopay", "880419623157", None),  # invoice number
])
def test_each_provider_says_which_transaction_id_its_payer_sees(provider: str, seen: str, unseen: str | None) -> None:
    """The hook an SMS receipt asks (channels.sms.templates.payer_transaction_id) without naming a provider: the
    id on the payer's own confirmation and statement is shown; M-Pesa's CheckoutRequestID, held until Daraja's
    callback brings the receipt, is not; a payment holding none shows none."""
    from providers.registry import payer_sees

    assert set(ADAPTERS) == set(PROVIDER_NAMES)
    assert payer_sees(provider, seen) is True
    assert payer_sees(provider, None) is False and payer_sees(provider, "") is False
    if unseen is not None:
        assert payer_sees(provider, unseen) is False
