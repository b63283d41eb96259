"""The simulators' callback sender (providers.simulation.CallbackPoster): what it delivers, how long it waits for
the gateway, and what its failure line says. A full CI run once lost a callback when the gateway took more than the
5 s it waited then, and its warning ("simulator callback failed") could not tell a timeout from a refused
connection."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
from typing import Any

import pytest
from aiohttp import web

from providers.simulation import CallbackPoster


async def _receiver(aiohttp_server: Any, pause: float = 0.0) -> tuple[Any, list[dict[str, Any]]]:
    got: list[dict[str, Any]] = []

    async def take(request: web.Request) -> web.Response:
        await asyncio.sleep(pause)
        got.append(await request.json())
        return web.json_response({"ok": True}, status=202)

    app = web.Application()
    app.router.add_post("/cb", take)
    return await aiohttp_server(app, host="127.0.0.1"), got


async def test_a_callback_is_delivered_once_with_the_receivers_status(aiohttp_server: Any) -> None:
    server, got = await _receiver(aiohttp_server)
    poster = CallbackPoster()
    try:
        status = await poster.send(str(server.make_url("/cb?secret=s3")), {"status": "SUCCESSFUL"})
    finally:
        await poster.close()
    assert (status, got, poster.sent) == (202, [{"status": "SUCCESSFUL"}], 1)


async def test_the_gateway_is_given_thirty_seconds_and_a_slow_answer_is_taken(aiohttp_server: Any) -> None:
    """Waited for up to 30 s by default (it was 5 s): a stalled machine's slow answer is not a lost callback."""
    poster = CallbackPoster()
    assert poster._timeout >= 30
    server, got = await _receiver(aiohttp_server, pause=0.3)
    try:
        assert await poster.send(str(server.make_url("/cb")), {"n": 1}) == 202
    finally:
        await poster.close()
    assert got == [{"n": 1}]


async def test_a_timeout_is_named_with_the_time_waited(aiohttp_server: Any, caplog: pytest.LogCaptureFixture) -> None:
    server, _ = await _receiver(aiohttp_server, pause=2.0)
    poster = CallbackPoster(timeout=0.2)
    caplog.set_level(logging.WARNING, "gateway.simulator")
    try:
        assert await poster.send(str(server.make_url("/cb?secret=hush")), {"n": 1}) is None
    finally:
        await poster.close()
    [line] = [r for r in caplog.records if r.name == "gateway.simulator"]
    assert re.fullmatch(r"simulator callback failed after \d+\.\d s: TimeoutError", line.getMessage()), \
        line.getMessage()
    assert 0.2 <= line.waited_s < 2.0  # type: ignore[attr-defined]
    assert "hush" not in line.getMessage()


async def test_a_refused_connection_is_named_at_once(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    poster = CallbackPoster()
    caplog.set_level(logging.WARNING, "gateway.simulator")
    try:
        assert await poster.send(f"http://127.0.0.1:{port}/cb?secret=hush", {"n": 1}) is None
    finally:
        await poster.close()
    [line] = [r for r in caplog.records if r.name == "gateway.simulator"]
    assert re.fullmatch(r"simulator callback failed after \d+\.\d s: ClientConnector\w*Error", line.getMessage()), \
        line.getMessage()
    assert line.waited_s < 2.0  # type: ignore[attr-defined]
    assert "hush" not in line.getMessage()


async def test_a_host_off_this_machine_is_never_called(caplog: pytest.LogCaptureFixture) -> None:
    poster = CallbackPoster()
    caplog.set_level(logging.WARNING, "gateway.simulator")
    assert await poster.send("http://203.0.113.9/cb", {"n": 1}) is None
    assert poster.sent == 0
    assert [r.getMessage() for r in caplog.records] == ["simulator callback refused: not a loopback host"]
