"""`main.py simulate NAME`: a provider simulator run as its own process is configured as the gateway's settings expect
it (the provider's credentials, the callback URL the provider is given), as the in-process one is."""

from __future__ import annotations

import asyncio
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

import main
from core.ports import InboundCallback
from providers.irembopay import IremboPayAdapter
from providers.simulation import STATE
from tests.providers.test_irembopay import collection, config

SECRET = "irembo-live-secret-not-the-dev-one"
CALLBACK_SECRET = "cb-secret-irembopay-0123456789ab"


@pytest.fixture
def gateway_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {"GATEWAY_ENV": "development", "IREMBOPAY_SECRET_KEY": SECRET,
                        "CALLBACK_SECRET_IREMBOPAY": CALLBACK_SECRET, "AIRTEL_CALLBACK_KEY": "airtel-hash-key",
                        "CALLBACK_SECRET_AIRTEL": "cb-secret-airtel-0123456789abcd"}.items():
        monkeypatch.setenv(name, value)
    for name in ("PROVIDERS", "SIM_CALLBACK_URL"):
        monkeypatch.delenv(name, raising=False)


async def test_a_standalone_irembopay_simulator_signs_its_webhooks_with_the_gateways_key(
        gateway_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    # Before: it signed every webhook with the development key, so a gateway with its own IREMBOPAY_SECRET_KEY
    # refused each one (401, "signature does not match") and the payment settled only by the poll; and it sent none
    # unless given --callback-url.
    webhooks: list[tuple[str, dict[str, str], bytes]] = []
    arrived = asyncio.Event()

    async def receive(request: web.Request) -> web.Response:
        webhooks.append((str(request.rel_url), dict(request.headers), await request.read()))
        arrived.set()
        return web.json_response({"ok": True})

    gateway = web.Application()
    gateway.router.add_post("/webhooks/payments/irembopay", receive)
    receiver = TestServer(gateway, host="127.0.0.1")
    await receiver.start_server()
    monkeypatch.setenv("PUBLIC_BASE_URL", str(receiver.make_url("")).rstrip("/"))
    app = main._simulator_app("irembopay", ["--delay", "0.05"])
    assert app[STATE].options.delay == 0.05  # the command's flags still apply
    simulator = TestServer(app, host="127.0.0.1")
    await simulator.start_server()
    try:
        async with httpx.AsyncClient() as http:
            adapter = IremboPayAdapter(http, config(str(simulator.make_url("")).rstrip("/"), secret=SECRET))
            await adapter.request_collection(collection(expires_at=None))
            await asyncio.wait_for(arrived.wait(), 10.0)
            url, headers, body = webhooks[0]
            assert parse_qs(urlsplit(url).query) == {"secret": [CALLBACK_SECRET]}
            await adapter.verify_callback(InboundCallback("POST", headers, {}, body))  # raised: signature
    finally:
        await simulator.close()
        await receiver.close()


def test_a_standalone_simulator_takes_the_providers_credentials_and_callback_url(gateway_env: None,
                                                                                 monkeypatch: pytest.MonkeyPatch
                                                                                 ) -> None:
    monkeypatch.setenv("PUBLIC_BASE_URL", "http://127.0.0.1:8099")
    options = main._simulator_app("airtel", [])[STATE].options
    assert options.credentials.get("callback_key") == "airtel-hash-key"  # signs its callbacks' hash
    assert options.callback_url == ("http://127.0.0.1:8099/webhooks/payments/airtel"
                                    "?secret=cb-secret-airtel-0123456789abcd")
    given = "http://127.0.0.1:9/elsewhere"
    assert main._simulator_app("airtel", ["--callback-url", given])[STATE].options.callback_url == given
