"""Fixtures for the SMS tests: the simulator behind rt.sms, and an HTTP client on the gateway's routes."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import web

from tests.channels.sms.helpers import start_simulator


@pytest.fixture
async def sim(rt: Any, aiohttp_server: Any) -> Any:
    _server, state = await start_simulator(aiohttp_server, rt)
    return state


def gateway_app(rt: Any, settings: Any = None) -> web.Application:
    """The real application when every edge is importable; else just the SMS routes on a bare app."""
    settings = settings or rt.settings
    try:
        from app import create_app

        return create_app(settings, runtime=rt)
    except ImportError:
        from channels.sms.routes import setup
        from core.runtime import RUNTIME, SETTINGS

        app = web.Application()
        app[SETTINGS] = settings
        app[RUNTIME] = rt
        setup(app)
        return app


@pytest.fixture
async def sms_client(rt: Any, aiohttp_client: Any) -> Any:
    return await aiohttp_client(gateway_app(rt))
