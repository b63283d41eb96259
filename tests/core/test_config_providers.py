"""PROVIDERS: the mobile-money providers a deployment uses. A Rwandan federation has no M-Pesa account and a Kenyan
one no IremboPay account: production required every provider's credentials, base URL and options all the same, so
they made values up, and a payment routed to such a provider was then sent to it and failed."""

from __future__ import annotations

import logging

import httpx
import pytest

from core.config import PROVIDER_NAMES, ConfigError, load_settings
from tests.core.test_crypto_config import _main, _production_env


def _without(provider: str) -> dict[str, str]:
    """A complete production configuration less every variable of `provider` (its credentials, base URL, options
    and callback secret): what a deployment that has no account with it can give."""
    prefix = provider.upper() + "_"
    return {k: v for k, v in _production_env().items()
            if not k.startswith(prefix) and k != f"CALLBACK_SECRET_{provider.upper()}"}


@pytest.mark.parametrize(("providers", "left_out"), [
    ("mtn_momo,airtel,irembopay", "mpesa"),  # a Rwandan federation
    ("mtn_momo, airtel, MPESA", "irembopay"),  # a Kenyan one (spaces and case as typed)
    ("airtel,mpesa,irembopay", "mtn_momo"),
    ("mtn_momo,mpesa,irembopay", "airtel"),
])
def test_production_needs_only_the_providers_it_uses(providers: str, left_out: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(_without(left_out))
    assert info.value.variable.startswith((left_out.upper(), "CALLBACK_SECRET_"))
    s = load_settings({**_without(left_out), "PROVIDERS": providers})
    assert s.is_production
    assert set(s.providers) == set(PROVIDER_NAMES) - {left_out}
    assert left_out not in s.callback_secrets


def test_unset_every_provider_is_used_in_production_and_elsewhere() -> None:
    assert tuple(load_settings(_production_env()).providers) == PROVIDER_NAMES
    assert tuple(load_settings({}).providers) == PROVIDER_NAMES  # the embedded default and its simulators
    assert tuple(load_settings({"PROVIDERS": ""}).providers) == PROVIDER_NAMES


def test_development_may_use_some_providers_only() -> None:
    s = load_settings({"PROVIDERS": "mtn_momo,airtel"})
    assert tuple(s.providers) == ("mtn_momo", "airtel")
    assert s.providers["airtel"].base_url.endswith("/_sim/airtel")


@pytest.mark.parametrize(("value", "says"), [
    ("mtn,airtel", "'mtn' is not a provider (these are: mtn_momo, airtel, mpesa, irembopay)"),
    ("mtn_momo,,airtel", "has an empty item (a comma too many?)"),
    (" , ", "has an empty item (a comma too many?)"),
])
def test_a_providers_mistake_is_named(value: str, says: str) -> None:
    for env in ({"PROVIDERS": value}, {**_production_env(), "PROVIDERS": value}):
        with pytest.raises(ConfigError) as info:
            load_settings(env)
        assert str(info.value) == f"configuration error: PROVIDERS: {says}"


def test_a_disabled_providers_variables_are_not_checked_and_are_listed() -> None:
    # Left over from before (or made up): never checked, never used, but named so the operator can remove them.
    env = {**_without("mpesa"), "PROVIDERS": "mtn_momo,airtel,irembopay", "MPESA_SHORTCODE": "174379",
           "MPESA_BASE_URL": "ftp://nowhere", "MPESA_CONSUMER_KEY": "made-up", "CALLBACK_SECRET_MPESA_PREVIOUS": "x"}
    s = load_settings(env)
    assert "mpesa" not in s.providers and "mpesa" not in s.callback_previous_secrets
    assert s.unused_provider_variables == ("CALLBACK_SECRET_MPESA_PREVIOUS", "MPESA_BASE_URL",
                                           "MPESA_CONSUMER_KEY", "MPESA_SHORTCODE")
    assert load_settings(_production_env()).unused_provider_variables == ()


async def test_the_unused_variables_are_warned_about_once_at_start(caplog: pytest.LogCaptureFixture) -> None:
    from providers.registry import build_providers

    s = load_settings({"PROVIDERS": "mtn_momo,airtel", "MPESA_CONSUMER_KEY": "k", "IREMBOPAY_SECRET_KEY": "s"})
    with caplog.at_level(logging.WARNING, logger="gateway.providers"):
        async with httpx.AsyncClient() as http:
            built = build_providers(s, http)
    assert set(built) == {"mtn_momo", "airtel"}
    [warning] = [r for r in caplog.records if "PROVIDERS" in r.getMessage()]
    assert warning.variables == "IREMBOPAY_SECRET_KEY, MPESA_CONSUMER_KEY"  # type: ignore[attr-defined]


def test_production_names_only_the_used_providers_missing_variables() -> None:
    # A Rwandan first install: PROVIDERS and GATEWAY_ENV only. Every M-Pesa line was there too.
    result = _main("migrate", GATEWAY_ENV="production", PROVIDERS="mtn_momo,airtel,irembopay",
                   DATABASE_URL="postgresql+asyncpg://gw@127.0.0.1:1/gw", REDIS_URL="redis://127.0.0.1:1/0")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    named = [line.split(":")[1].strip() for line in lines]
    assert "MTN_MOMO_API_USER" in named and "IREMBOPAY_PAYMENT_ACCOUNT" in named and "AIRTEL_CLIENT_ID" in named
    assert not [name for name in named if "MPESA" in name], named
    # Unset, each provider's line says how to leave it out.
    result = _main("migrate", GATEWAY_ENV="production", DATABASE_URL="postgresql+asyncpg://gw@127.0.0.1:1/gw",
                   REDIS_URL="redis://127.0.0.1:1/0")
    assert ("configuration error: MPESA_CONSUMER_KEY: is required in production (PROVIDERS is unset: every provider "
            "is used; list only yours, e.g. PROVIDERS=mtn_momo,airtel,irembopay)") in result.stderr.splitlines()
