"""MTN MoMo's X-Target-Environment: production sends the configured live environment, never the sandbox
default, and the simulator refuses a name MTN does not know (as MTN refuses every call made with one)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from core.config import load_settings
from core.ports import ProviderError
from providers.mtn_momo.adapter import MtnMomoAdapter
from providers.mtn_momo.simulator import create_simulator
from providers.simulation import SimulatorOptions
from tests.core.test_crypto_config import _production_env
from tests.providers.test_mtn_momo import CREDS, collection, config
from tests.providers.wires import MTN_BASE, mtn_wire

PAY = "/collection/v1_0/requesttopay"


async def test_production_settings_send_the_configured_environment() -> None:
    settings = load_settings({**_production_env(), "MTN_MOMO_BASE_URL": MTN_BASE,
                              "MTN_MOMO_TARGET_ENVIRONMENT": "mtnrwanda"})
    wire = mtn_wire().on("POST", PAY, 202)
    await MtnMomoAdapter(wire.client(), settings.providers["mtn_momo"]).request_collection(collection())
    [sent] = wire.sent("POST", PAY)
    assert sent.headers["X-Target-Environment"] == "mtnrwanda"


@pytest.mark.parametrize(("environment", "known"), [
    ("sandbox", True), ("mtnrwanda", True), ("mtnrwnda", False), ("production", False)])
async def test_simulator_accepts_only_known_environments(aiohttp_server: Any, environment: str,
                                                        known: bool) -> None:
    server = await aiohttp_server(create_simulator(SimulatorOptions(delay=0.02, credentials=CREDS)),
                                  host="127.0.0.1")
    async with httpx.AsyncClient() as http:
        adapter = MtnMomoAdapter(http, config(str(server.make_url("")).rstrip("/"),
                                              target_environment=environment))
        if known:
            await adapter.request_collection(collection(callback=""))
            return
        with pytest.raises(ProviderError) as err:
            await adapter.request_collection(collection(callback=""))
    assert (err.value.code, err.value.retryable) == ("HTTP_400", False)
    assert f"Unknown X-Target-Environment '{environment}'" in str(err.value)
