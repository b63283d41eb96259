"""Schemathesis against the running app over HTTP: generated requests for every operation, answers checked
against the OpenAPI document (status codes, content types, response schemas) and never a 5xx."""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any

import pytest
import requests

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given  # noqa: E402
from hypothesis import settings as hsettings  # noqa: E402
from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


class LiveServer:
    """The real app on 127.0.0.1 in its own thread and event loop, with the demo data seeded."""

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.port = 0
        self.demo: dict[str, Any] = {}
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # surfaced to the test thread
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        from aiohttp import web

        from app import create_app, open_runtime
        from core.demo import seed_demo
        from tests.conftest import clean_database

        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with open_runtime(self.settings) as rt:
            await clean_database(rt)
            await rt.redis.flushdb()
            async with rt.sessionmaker.begin() as s:
                self.demo = await seed_demo(s, rt.cipher)
            runner = web.AppRunner(create_app(self.settings, runtime=rt))
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self.port = runner.addresses[0][1]
            self._ready.set()
            await self._stop.wait()
            await runner.cleanup()

    def __enter__(self) -> LiveServer:
        self._thread.start()
        self._ready.wait(60)
        if self._error:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop and self._stop:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)


@pytest.mark.parametrize("role", ["admin", "super_admin", "tenant"])
def test_every_operation_conforms_to_the_document(settings, monkeypatch, role):
    # Generated traffic must reach the handlers rather than the rate limiter.
    monkeypatch.setenv("RATE_LIMIT_MULTIPLIER", "1000")
    with LiveServer(settings) as server:
        base = f"http://127.0.0.1:{server.port}"
        login = requests.post(
            f"{base}/v1/auth/token",
            timeout=10,
            json=dict(zip(("username", "password"), server.demo[role], strict=True)),
        )
        headers = {"Authorization": f"Bearer {login.json()['accessToken']}"}
        schema = schemathesis.openapi.from_url(f"{base}/v1/openapi.json")
        http = requests.Session()
        tested = 0
        for result in schema.get_all_operations():
            operation = result.ok()

            @given(case=operation.as_strategy())
            @hsettings(
                max_examples=int(os.environ.get("SCHEMATHESIS_EXAMPLES", "12")),
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            def check(case: Any) -> None:
                response = case.call(base_url=base, session=http, headers=headers, timeout=10)
                case.validate_response(response, checks=CHECKS)

            check()
            tested += 1
        from admin_api import all_routes

        # Schemathesis leaves out the document's own URL (GET /v1/openapi.json); everything else ran.
        assert tested == len(all_routes()) - 1
