"""A provider whose calls keep failing is reported once per outage (one error line, a gauge), not once per job."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import httpx
import pytest

from core.metrics import REGISTRY
from core.ports import ProviderError
from providers import calls


@pytest.fixture(autouse=True)
def fresh_outages() -> Iterator[None]:
    getattr(calls, "_outages", {}).clear()  # what this process saw of earlier tests' calls
    yield
    getattr(calls, "_outages", {}).clear()


def _failing(provider: str) -> float | None:
    return REGISTRY.get_sample_value("gateway_provider_failing", {"provider": provider})


async def _call(answers: list[str], provider: str = "mtn_momo") -> None:
    """One call through providers.calls.send whose transport answers the next of `answers`: a status code or
    "timeout" (the provider hangs past the read timeout)."""

    def handle(request: httpx.Request) -> httpx.Response:
        answer = answers.pop(0)
        if answer == "timeout":
            raise httpx.ReadTimeout("hung", request=request)
        return httpx.Response(int(answer), json={})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handle)) as http:
        try:
            await calls.send(http, provider=provider, operation="status", method="GET", url="http://127.0.0.1:9/x",
                             timeouts=httpx.Timeout(1.0), creates=False)
        except ProviderError:
            pass


async def test_one_line_when_calls_start_failing_and_one_when_they_are_answered(caplog) -> None:
    answers = ["503", "timeout", "timeout", "504", "timeout", "timeout", "503", "timeout", "404", "200", "503"]
    with caplog.at_level(logging.INFO, logger="gateway.providers"):
        for _ in range(4):
            await _call(answers)
        await _call(["200"], provider="airtel")  # another provider answering says nothing about this one
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert not _failing("mtn_momo")
        for _ in range(4):  # the fifth failure in a row, and three more
            await _call(answers)
        assert _failing("mtn_momo") == 1
        await _call(answers)  # a 404 is an answer: the provider is back
        assert _failing("mtn_momo") == 0
        await _call(answers)
        await _call(answers)  # one 503 after it is not an outage
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 2, lines
    assert lines[0][0] == "ERROR" and lines[0][1].startswith("mtn_momo calls failing since 20")
    assert lines[1] == ("WARNING", "mtn_momo calls succeed again")
    assert caplog.records[-1].failures_in_a_row == 8
    assert _failing("mtn_momo") == 0 and not _failing("airtel")
