"""The operations page while Redis is down: the figures kept in the database still come, the USSD funnel (whose
counters live in Redis) is answered as unavailable, and the outage is one warning, not a 500 and a traceback."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from core.models import OutboxJob
from tests.admin_api.conftest import login, redis_unreachable
from tests.web.conftest import page_client


async def _ops_data(client: Any, token: str) -> tuple[int, Any]:
    resp = await client.get("/ops/data", headers={"Authorization": f"Bearer {token}"})
    return resp.status, await resp.json()


async def test_ops_data_answers_without_the_funnel_while_redis_is_down(aiohttp_client: Any, rt: Any, demo: Any,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    client = await page_client(aiohttp_client, rt, rt.settings)
    token = (await login(client, *demo["admin"]))["accessToken"]
    async with rt.sessionmaker.begin() as s:
        s.add(OutboxJob(kind="sms.send", payload={}, cooperative_id=demo["cooperative_id"], status="PARKED"))
    status, healthy = await _ops_data(client, token)
    assert status == 200 and healthy["funnelUnavailable"] is False
    assert [step["step"] for step in healthy["ussdFunnel"]] == ["home", "pay_type", "pay_confirm", "pay_done"]

    async with redis_unreachable(rt):
        with caplog.at_level(logging.WARNING):
            status, body = await _ops_data(client, token)

    assert status == 200, body
    assert body["ussdFunnel"] is None and body["funnelUnavailable"] is True
    # What the operator watches during the outage, from the database as before.
    assert body["outbox"]["parked"] == 1 and body["outbox"] == healthy["outbox"]
    assert body["sms"] == healthy["sms"] and body["scope"]["name"] == healthy["scope"]["name"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "USSD funnel unavailable: Redis unreachable" in warnings, warnings
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


async def test_the_ops_page_says_the_funnel_is_unavailable(aiohttp_client: Any, rt: Any) -> None:
    client = await page_client(aiohttp_client, rt, rt.settings)
    script = await (await client.get("/static/ops.js")).text()
    assert "data.funnelUnavailable" in script and "Unavailable: Redis cannot be reached." in script


async def test_ops_data_while_the_database_is_away_is_a_503_to_ask_again(aiohttp_client: Any, rt: Any, demo: Any,
                                                                         monkeypatch: pytest.MonkeyPatch,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    """The page's figures come from the database: while it cannot be reached the page is told 503, in the API's
    shape with Retry-After (its script asks again), and the log has one warning, not a 500 and a traceback."""
    from core import ops

    client = await page_client(aiohttp_client, rt, rt.settings)
    token = (await login(client, *demo["admin"]))["accessToken"]

    async def away(*_args: Any, **_kwargs: Any) -> Any:
        raise ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 5432)")

    monkeypatch.setattr(ops, "dashboard", away)
    with caplog.at_level(logging.WARNING):
        resp = await client.get("/ops/data", headers={"Authorization": f"Bearer {token}"})
        body = await resp.json()
    assert (resp.status, resp.headers["Retry-After"], body["code"], body["path"]) == (
        503, "1", "SERVICE_UNAVAILABLE", "/ops/data")
    assert "dependency unavailable on GET /ops/data: ConnectionRefusedError" in [r.getMessage() for r in caplog.records]
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_database_refusing_connections_is_logged_with_its_reason(aiohttp_client: Any, rt: Any, demo: Any,
                                                                         monkeypatch: pytest.MonkeyPatch,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    """PostgreSQL refusing the connection (here: a database it does not have; in production max_connections
    reached, "sorry, too many clients already") is a 503, and the warning names the server's reason: "DBAPIError"
    alone told an operator nothing of what to fix."""
    from sqlalchemy import text
    from sqlalchemy.engine import make_url

    from core import ops
    from core.db import make_engine

    client = await page_client(aiohttp_client, rt, rt.settings)
    token = (await login(client, *demo["admin"]))["accessToken"]
    url = make_url(str(rt.engine.url.render_as_string(hide_password=False)))
    if not url.drivername.startswith("postgresql"):
        pytest.skip("a PostgreSQL server's refusal")
    refusing = make_engine(url.set(database="gateway_no_such_database").render_as_string(hide_password=False))

    async def refused(*_args: Any, **_kwargs: Any) -> Any:
        async with refusing.connect() as conn:
            await conn.execute(text("SELECT 1"))

    monkeypatch.setattr(ops, "dashboard", refused)
    try:
        with caplog.at_level(logging.WARNING):
            resp = await client.get("/ops/data", headers={"Authorization": f"Bearer {token}"})
    finally:
        await refusing.dispose()
    assert resp.status == 503 and (await resp.json())["code"] == "SERVICE_UNAVAILABLE"
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("dependency unavailable")]
    assert said == ['dependency unavailable on GET /ops/data: DBAPIError: database "gateway_no_such_database" '
                    'does not exist'], said
