"""Shared pieces for provider tests: a fail-closed fake provider, recorded fixtures, a callback receiver."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def load(provider: str, name: str) -> Any:
    return json.loads((FIXTURES / provider / name).read_text())


@dataclass
class Expected:
    method: str
    path: str
    answer: Callable[[httpx.Request], Awaitable[httpx.Response] | httpx.Response]


@dataclass
class FakeProvider:
    """httpx.MockTransport that answers only the requests a test declared, in any order, each once.

    Anything else raises AssertionError inside the client call, so the test fails at the call site.
    """

    base: str
    expected: list[Expected] = field(default_factory=list)
    seen: list[httpx.Request] = field(default_factory=list)

    def expect(
        self,
        method: str,
        path: str,
        status: int = 200,
        body: Any = None,
        *,
        raises: Exception | None = None,
        delay: float = 0.0,
        times: int = 1,
    ) -> None:
        async def answer(_request: httpx.Request) -> httpx.Response:
            if delay:
                await asyncio.sleep(delay)
            if raises is not None:
                raise raises
            if body is None:
                return httpx.Response(status)
            return httpx.Response(status, json=body)

        for _ in range(times):
            self.expected.append(Expected(method, path, answer))

    async def handle(self, request: httpx.Request) -> httpx.Response:
        assert request.url.host == httpx.URL(self.base).host, f"request to an unexpected host: {request.url}"
        for i, exp in enumerate(self.expected):
            if exp.method == request.method and exp.path == request.url.path:
                del self.expected[i]
                self.seen.append(request)
                result = exp.answer(request)
                return await result if asyncio.iscoroutine(result) else result
        raise AssertionError(f"unexpected request {request.method} {request.url}")

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.MockTransport(self.handle))

    def assert_done(self) -> None:
        assert not self.expected, f"requests never sent: {[(e.method, e.path) for e in self.expected]}"

    def requests_to(self, path: str) -> list[httpx.Request]:
        return [r for r in self.seen if r.url.path == path]


@dataclass
class Received:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class CallbackReceiver:
    """A small app standing in for the gateway's webhook endpoint; records every callback."""

    def __init__(self) -> None:
        self.calls: list[Received] = []
        self._changed = asyncio.Condition()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._record)
        return app

    async def _record(self, request: web.Request) -> web.Response:
        body = await request.read()
        async with self._changed:
            self.calls.append(
                Received(request.method, request.path, dict(request.query), dict(request.headers), body)
            )
            self._changed.notify_all()
        return web.json_response({"status": "accepted"})

    async def wait_for(self, count: int, within: float = 30.0) -> list[Received]:
        """The calls once `count` have arrived; `within` is patience for a loaded machine, not a bound tested."""
        async def enough() -> None:
            async with self._changed:
                await self._changed.wait_for(lambda: len(self.calls) >= count)

        await asyncio.wait_for(enough(), within)
        return self.calls


@pytest.fixture
async def receiver(aiohttp_server: Any) -> tuple[CallbackReceiver, str]:
    recv = CallbackReceiver()
    server = await aiohttp_server(recv.app(), host="127.0.0.1")
    return recv, str(server.make_url("/webhooks/payments"))
