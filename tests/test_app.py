"""create_app(settings) owns its resources: one cleanup context per resource, opened and closed by aiohttp."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from app import ENGINE, HTTP, REDIS, create_app
from core.auth import MARKS_RESTORED
from core.runtime import RUNTIME
from tests.conftest import make_settings, readiness


async def test_app_opens_and_closes_each_resource(aiohttp_client: Any, rt: Any) -> None:
    app = create_app(make_settings())
    # database, Redis, httpx, the runtime over them, then the revocation marks' guard and the provider health record
    assert len(app.cleanup_ctx) == 6
    await rt.redis.delete(MARKS_RESTORED)
    client = await aiohttp_client(app)
    status, ready = await readiness(client)
    assert status == 200 and ready["checks"] == {"database": "ok", "redis": "ok"}
    runtime = app[RUNTIME]
    assert runtime.engine is app[ENGINE] and runtime.redis is app[REDIS] and runtime.http is app[HTTP]
    for _ in range(1000):  # the guard's first check runs at start: the marks are known to be complete (20 s at most)
        if await runtime.redis.exists(MARKS_RESTORED):
            break
        await asyncio.sleep(0.02)
    assert await runtime.redis.exists(MARKS_RESTORED)
    # This serve's view of the providers, recorded at start where every process's /ops reads it...
    from providers import health as provider_health

    for _ in range(250):
        if await runtime.redis.exists(provider_health.process_key(provider_health.PROCESS)):
            break
        await asyncio.sleep(0.02)
    assert json.loads(await runtime.redis.get(provider_health.process_key(provider_health.PROCESS)))["role"] == "serve"
    redis = runtime.redis
    http = app[HTTP]
    await client.close()  # runs the cleanup contexts in reverse
    assert http.is_closed
    # ...and taken away as it stops (rt's client: the app's is closed).
    assert not await rt.redis.exists(provider_health.process_key(provider_health.PROCESS)) and redis is not rt.redis


async def test_request_metrics_keep_their_labels_bounded(client: Any) -> None:
    from core import metrics

    assert (await client.get("/healthz")).status == 200
    invented = await client.request("PROPFIND", "/healthz")
    assert invented.status == 405
    text = metrics.render()[0].decode()
    assert 'gateway_http_requests_total{method="GET",route="/healthz",status="200"}' in text \
        or 'gateway_http_requests_total{route="/healthz",method="GET",status="200"}' in text
    # A method a client makes up is counted, as OTHER: a label set per invented word would grow forever.
    assert 'method="OTHER"' in text and "PROPFIND" not in text


def test_development_without_the_simulators_says_which_urls_nothing_answers(caplog: Any) -> None:
    """On PostgreSQL in development SIMULATORS_IN_PROCESS is off unless set, and the provider and SMS URLs left at
    their defaults name this service's /_sim/...: every payment failed and every SMS was parked, nothing said."""
    from core.config import load_settings

    pg = {"DATABASE_URL": "postgresql+asyncpg://gw@127.0.0.1:5432/gw", "PROVIDERS": "mtn_momo,airtel"}
    with caplog.at_level("WARNING", logger="gateway"):
        create_app(load_settings({**pg, "AIRTEL_BASE_URL": "http://127.0.0.1:9002"}))
    said = [r.getMessage() for r in caplog.records if "SIMULATORS_IN_PROCESS" in r.getMessage()]
    assert said == ["MTN_MOMO_BASE_URL, SMS_BASE_URL left at the in-process simulators' address, but "
                    "SIMULATORS_IN_PROCESS is off: nothing answers there, so payments fail and SMS are not sent. Set "
                    "SIMULATORS_IN_PROCESS=1, or run `main.py simulate NAME --port N` and point the variable at it"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="gateway"):
        create_app(load_settings({**pg, "SIMULATORS_IN_PROCESS": "1"}))
        create_app(load_settings({**pg, "MTN_MOMO_BASE_URL": "http://127.0.0.1:9001",
                                  "AIRTEL_BASE_URL": "http://127.0.0.1:9002", "SMS_BASE_URL": "http://127.0.0.1:9004"}))
    assert not [r for r in caplog.records if "SIMULATORS_IN_PROCESS" in r.getMessage()]
