"""Provider calls fit inside the worker's lease, and a provider's Retry-After is read as it is written."""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import UTC, datetime

import httpx
import pytest

from core.config import ConfigError, load_settings
from providers.calls import MAX_RETRY_AFTER, retry_after
from providers.registry import build_providers, check_timeouts

NOW = datetime(2026, 11, 22, 5, 0, 0, tzinfo=UTC)


def test_default_timeouts_fit_in_the_default_lease(caplog: pytest.LogCaptureFixture) -> None:
    settings = load_settings({"GATEWAY_ENV": "test"})
    with caplog.at_level(logging.WARNING, logger="gateway.providers"):
        assert check_timeouts(settings, "mpesa") == 13.0  # connect 3 s + read 10 s, under 55 s
    assert not caplog.records


async def test_timeouts_longer_than_the_lease_are_refused_in_production(caplog: pytest.LogCaptureFixture) -> None:
    short = load_settings({"GATEWAY_ENV": "test", "OUTBOX_LEASE_SECONDS": "15"})  # jobs get 10 s
    with caplog.at_level(logging.WARNING, logger="gateway.providers"):
        async with httpx.AsyncClient() as http:
            build_providers(short, http)  # development and tests: said, not refused
    assert {r.__dict__["provider"] for r in caplog.records} == {"mtn_momo", "airtel", "mpesa", "irembopay"}
    with pytest.raises(ConfigError) as err:
        check_timeouts(replace(short, environment="production"), "mpesa")
    assert err.value.variable == "MPESA_READ_TIMEOUT" and "13s" in str(err.value)
    fitting = load_settings({"GATEWAY_ENV": "test", "OUTBOX_LEASE_SECONDS": "15", "MPESA_READ_TIMEOUT": "5"})
    assert check_timeouts(replace(fitting, environment="production"), "mpesa") == 8.0


@pytest.mark.parametrize(("header", "seconds"), [
    ("7", 7.0), ("0", 0.0), ("1.5", 1.5), ("Sun, 22 Nov 2026 05:01:00 GMT", 60.0), ("999999", MAX_RETRY_AFTER),
    ("", None), ("soon", None), ("-3", None), ("Sun, 22 Nov 2026 04:59:00 GMT", None), ("nan", None),
])
def test_retry_after(header: str, seconds: float | None) -> None:
    response = httpx.Response(429, headers={"Retry-After": header} if header else {})
    assert retry_after(response, now=NOW) == seconds
