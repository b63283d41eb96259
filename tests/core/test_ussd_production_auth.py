"""Production refuses to start with a USSD callback open to anyone.

Each aggregator's callback (/ussd/<name>) is guarded by its URL secret (CALLBACK_SECRET_<NAME>) or by a
source-address allowlist that applies to it (USSD_IP_ALLOWLIST, or USSD_IP_ALLOWLIST_<NAME>, which
replaces the shared list for that aggregator). With neither, anyone could POST any phoneNumber: read a
member's menus and set off PIN prompts on their phone. Development and test keep the warning only.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from typing import Any

import pytest

from core.config import ConfigError, load_settings
from tests.conftest import make_settings
from tests.core.test_crypto_config import _production_env

SECRETS = ("CALLBACK_SECRET_AFRICASTALKING", "CALLBACK_SECRET_HUBTEL", "CALLBACK_SECRET_NALO")


def _open_ussd_env(**extra: str) -> dict[str, str]:
    """A complete production configuration but for the USSD aggregators' secrets."""
    env = {k: v for k, v in _production_env().items() if k not in SECRETS}
    return {**env, **extra}


def _refused(env: dict[str, str]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_settings(env)
    return info.value


def test_production_without_any_ussd_guard_is_refused() -> None:
    error = _refused(_open_ussd_env())
    assert error.variable == "CALLBACK_SECRET_AFRICASTALKING"
    assert "USSD_IP_ALLOWLIST" in str(error) and "USSD_IP_ALLOWLIST_AFRICASTALKING" in str(error)


@pytest.mark.parametrize("missing", SECRETS)
def test_each_aggregator_needs_its_own_guard(missing: str) -> None:
    env = {**_production_env(), missing: ""}
    error = _refused(env)
    assert error.variable == missing
    name = missing.removeprefix("CALLBACK_SECRET_")
    assert f"USSD_IP_ALLOWLIST_{name}" in str(error)


def test_the_shared_allowlist_guards_every_aggregator() -> None:
    settings = load_settings(_open_ussd_env(USSD_IP_ALLOWLIST="196.201.214.0/24, 41.186.0.10"))
    assert settings.is_production
    assert settings.ussd_ip_allowlist == ("196.201.214.0/24", "41.186.0.10")
    assert not any(settings.callback_secrets[name] for name in ("africastalking", "hubtel", "nalo"))


def test_a_per_aggregator_allowlist_guards_only_its_aggregator() -> None:
    only_at = _open_ussd_env(USSD_IP_ALLOWLIST_AFRICASTALKING="196.201.214.0/24")
    assert _refused(only_at).variable == "CALLBACK_SECRET_HUBTEL"
    assert _refused({**only_at, "CALLBACK_SECRET_HUBTEL": "h" * 24}).variable == "CALLBACK_SECRET_NALO"
    settings = load_settings({**only_at, "CALLBACK_SECRET_HUBTEL": "h" * 24,
                              "USSD_IP_ALLOWLIST_NALO": "102.176.0.0/16"})
    assert settings.ussd_ip_allowlists == {"africastalking": ("196.201.214.0/24",), "nalo": ("102.176.0.0/16",)}
    # Secrets and allowlists together are fine too (the complete configuration has every secret).
    load_settings({**_production_env(), "USSD_IP_ALLOWLIST": "196.201.214.0/24"})


def test_blank_values_do_not_count_as_a_guard() -> None:
    error = _refused(_open_ussd_env(USSD_IP_ALLOWLIST=" , ", USSD_IP_ALLOWLIST_AFRICASTALKING="  "))
    assert error.variable == "CALLBACK_SECRET_AFRICASTALKING"


def test_development_and_test_still_start_open_with_a_warning(
        caplog: pytest.LogCaptureFixture) -> None:
    from aiohttp import web

    from channels.ussd import routes
    from core.runtime import SETTINGS

    for environment in ("development", "test"):
        settings = load_settings({"GATEWAY_ENV": environment})
        assert not any(settings.callback_secrets[name] for name in ("africastalking", "hubtel", "nalo"))
    app = web.Application()
    app[SETTINGS] = make_settings()
    with caplog.at_level(logging.WARNING, logger="gateway.ussd"):
        routes.setup(app)
    assert any("without a URL secret" in r.getMessage() for r in caplog.records), caplog.records


def test_serve_stops_with_a_line_naming_each_variable() -> None:
    clean: dict[str, Any] = {k: v for k, v in os.environ.items()
                             if not k.startswith(("CALLBACK_SECRET_", "USSD_IP_ALLOWLIST", "WORKER_METRICS_PORT"))}
    result = subprocess.run([sys.executable, "main.py", "serve"], capture_output=True, text=True,
                            env={**clean, **_open_ussd_env()}, timeout=60, check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"configuration error: CALLBACK_SECRET_{name}: is required in production unless "
        f"USSD_IP_ALLOWLIST or USSD_IP_ALLOWLIST_{name} is set "
        "(USSD callbacks would otherwise be accepted from anyone)" for name in ("AFRICASTALKING", "HUBTEL", "NALO")]
