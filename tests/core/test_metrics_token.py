"""/metrics behind METRICS_TOKEN: unset, it answers anyone (as before) and a production start says so once; set, a
scrape without `Authorization: Bearer <the token>` is refused with the API's error shape."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import pytest

from tests.conftest import make_settings

TOKEN = "scrape-token-0123456789abcdef"


async def _metrics_client(aiohttp_client: Any, rt: Any, **env: str) -> Any:
    from app import create_app

    rt.settings = make_settings(**env)
    return await aiohttp_client(create_app(rt.settings, runtime=rt))


async def test_without_a_token_metrics_answer_as_before(client: Any) -> None:
    response = await client.get("/metrics")
    assert response.status == 200
    assert "gateway_outbox_gauges_ok" in await response.text()


async def test_with_a_token_a_scrape_needs_it(rt: Any, aiohttp_client: Any) -> None:
    client = await _metrics_client(aiohttp_client, rt, METRICS_TOKEN=TOKEN)
    for headers in ({}, {"Authorization": "Bearer wrong-token"}, {"Authorization": f"Basic {TOKEN}"},
                    {"Authorization": f"Bearer {TOKEN}x"}, {"Authorization": "Bearer é"}):
        refused = await client.get("/metrics", headers=headers)
        assert refused.status == 401, headers
        body = await refused.json()
        assert {k: body[k] for k in ("statusCode", "error", "code", "path")} == {
            "statusCode": 401, "error": "Unauthorized", "code": "UNAUTHORIZED", "path": "/metrics"}
        assert "METRICS_TOKEN" in body["message"] and TOKEN not in await refused.text()
        assert refused.headers["WWW-Authenticate"] == "Bearer"
        assert "gateway_outbox" not in await refused.text()

    scraped = await client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert scraped.status == 200
    assert "gateway_outbox_gauges_ok" in await scraped.text()
    assert (await client.get("/metrics", headers={"Authorization": f"bearer {TOKEN}"})).status == 200


async def test_a_workers_metrics_take_the_same_token(rt: Any, aiohttp_client: Any) -> None:
    from app import create_worker, worker_app

    rt.settings = make_settings(METRICS_TOKEN=TOKEN)
    client = await aiohttp_client(worker_app(rt, create_worker(rt), stale_after=120))
    assert (await client.get("/metrics")).status == 401
    assert (await client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})).status == 200
    assert (await client.get("/healthz")).status == 200  # the supervisor's check needs no token


def test_a_production_start_with_metrics_open_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    from main import _warn_if_metrics_open

    production = dataclasses.replace(make_settings(), environment="production")
    guarded = dataclasses.replace(make_settings(METRICS_TOKEN=TOKEN), environment="production")
    with caplog.at_level(logging.WARNING, logger="gateway.main"):
        _warn_if_metrics_open(make_settings())  # development, test: nothing to say
        _warn_if_metrics_open(guarded)
        assert caplog.records == []
        _warn_if_metrics_open(production)
    [line] = caplog.records
    assert line.levelno == logging.WARNING and "METRICS_TOKEN" in line.getMessage()


def test_the_token_is_kept_as_a_secret() -> None:
    settings = make_settings(METRICS_TOKEN=TOKEN)
    assert settings.metrics_token.get() == TOKEN and TOKEN not in repr(settings)
    assert not make_settings().metrics_token


async def test_a_token_not_in_utf8_is_refused_not_an_error(rt: Any, aiohttp_client: Any) -> None:
    """A scrape whose Authorization header holds bytes that are not UTF-8 (a latin-1 é: aiohttp reads it as a lone
    surrogate) is refused 401 as any wrong token: it was a 500 and an error logged with a traceback."""
    import asyncio

    client = await _metrics_client(aiohttp_client, rt, METRICS_TOKEN=TOKEN)
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer caf\xe9\r\nConnection: close\r\n\r\n")
    await writer.drain()
    answer = await reader.read()
    writer.close()
    assert answer.split(b"\r\n")[0] == b"HTTP/1.1 401 Unauthorized"
    assert b'"code": "UNAUTHORIZED"' in answer or b'"code":"UNAUTHORIZED"' in answer


def test_production_refuses_a_short_token_and_still_takes_none() -> None:
    """A scrape token is a bearer secret as JWT_SECRET is: in production one shorter than 32 bytes (a word, a
    placeholder left in) is refused at start, naming the variable and never the value. Unset or blank stays
    allowed: /metrics is then open, and the start warns (test_a_production_start_with_metrics_open_warns_once)."""
    from core.config import ConfigError, load_settings
    from tests.core.test_crypto_config import _production_env

    for short in ("changeme", "m" * 31, "é" * 15 + "x"):  # 31 bytes: the length is counted in bytes, as the others
        with pytest.raises(ConfigError) as info:
            load_settings({**_production_env(), "METRICS_TOKEN": short})
        assert info.value.variable == "METRICS_TOKEN"
        assert str(info.value) == ("configuration error: METRICS_TOKEN: must be at least 32 bytes in production "
                                   "(e.g. the output of openssl rand -hex 24)")
        assert short not in str(info.value)
    assert load_settings({**_production_env(), "METRICS_TOKEN": " " + "m" * 32}).metrics_token.get() == "m" * 32
    for unset in ("", "   "):
        assert not load_settings({**_production_env(), "METRICS_TOKEN": unset}).metrics_token
    assert not load_settings(_production_env()).metrics_token
    assert make_settings(METRICS_TOKEN="short").metrics_token.get() == "short"  # development and tests: any length
