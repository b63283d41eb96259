"""The pages' test clients: the service as tests run it, and with the simulators in process (phone page on)."""

from __future__ import annotations

from typing import Any

import pytest

from admin_api.pages import setup_pages
from tests.conftest import make_settings


async def page_client(aiohttp_client: Any, rt: Any, settings: Any) -> Any:
    from app import create_app

    app = create_app(settings, runtime=rt)
    if not any(r.canonical == "/ops" for r in app.router.resources()):
        setup_pages(app)  # until app.py calls setup_pages itself
    return await aiohttp_client(app)


@pytest.fixture
async def pages(aiohttp_client: Any, rt: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The service as tests run it: simulators not in process, so no phone page."""
    monkeypatch.delenv("PHONE_SIMULATOR_ENABLED", raising=False)
    return await page_client(aiohttp_client, rt, rt.settings)


@pytest.fixture
async def sim(aiohttp_client: Any, rt: Any, monkeypatch: pytest.MonkeyPatch, migrated_database: str) -> Any:
    monkeypatch.delenv("PHONE_SIMULATOR_ENABLED", raising=False)
    return await page_client(aiohttp_client, rt, make_settings(SIMULATORS_IN_PROCESS="1"))
