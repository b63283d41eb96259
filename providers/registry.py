"""Which adapter class and simulator serve each provider name, and which provider serves each method.

Routes: by default MOBILE_MONEY_MTN -> mtn_momo, MOBILE_MONEY_AIRTEL -> airtel, MPESA -> mpesa and the
banks (BANK_BK, BANK_IM, BANK_ECOBANK) -> irembopay. PAYMENT_ROUTES overrides some or all of them, e.g.
PAYMENT_ROUTES="MOBILE_MONEY_MTN=irembopay,MOBILE_MONEY_AIRTEL=irembopay"; it is read from
settings.extra["PAYMENT_ROUTES"] when present, else from the environment, when the routes are built.

Only the providers this deployment uses (PROVIDERS: settings.providers holds those only) are built, routed to and
simulated: a default route to one left out is dropped (its methods are not available: the API refuses them, USSD
does not offer them), and its callback route answers 404 as for any name it does not know.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import httpx
from aiohttp import web

from core.config import ConfigError, Settings
from core.outbox import handler_timeout
from core.ports import PaymentProvider
from providers.airtel.adapter import AirtelAdapter
from providers.airtel.simulator import create_simulator as airtel_simulator
from providers.calls import timeout_from
from providers.irembopay.adapter import IremboPayAdapter, redis_nonce_store
from providers.irembopay.simulator import create_simulator as irembopay_simulator
from providers.mpesa.adapter import MpesaAdapter
from providers.mpesa.simulator import create_simulator as mpesa_simulator
from providers.mtn_momo.adapter import MtnMomoAdapter
from providers.mtn_momo.simulator import create_simulator as mtn_momo_simulator
from providers.routes import callback_url
from providers.simulation import SimulatorOptions, options_from_env

log = logging.getLogger("gateway.providers")

ADAPTERS: dict[str, type] = {
    "mtn_momo": MtnMomoAdapter,
    "airtel": AirtelAdapter,
    "mpesa": MpesaAdapter,
    "irembopay": IremboPayAdapter,
}

SIMULATORS: dict[str, Callable[[SimulatorOptions], web.Application]] = {
    "mtn_momo": mtn_momo_simulator,
    "airtel": airtel_simulator,
    "mpesa": mpesa_simulator,
    "irembopay": irembopay_simulator,
}

DEFAULT_ROUTES: dict[str, str] = {
    "MOBILE_MONEY_MTN": "mtn_momo",
    "MOBILE_MONEY_AIRTEL": "airtel",
    "MPESA": "mpesa",
    "BANK_BK": "irembopay",
    "BANK_IM": "irembopay",
    "BANK_ECOBANK": "irembopay",
}


def payer_sees(provider: str, provider_transaction_id: str | None) -> bool:
    """Whether `provider_transaction_id`, held by a payment through `provider`, is the id its payer sees on her own
    confirmation and statement, which her receipt SMS may name (channels.sms.templates.payer_transaction_id): an
    adapter that holds another id for a while says which by its static `payer_sees(provider_transaction_id) -> bool`
    (M-Pesa: its receipt number, not the CheckoutRequestID a payment keeps until Daraja's callback brings the
    receipt); one that does not shows every id it gives. A payment holding none shows none."""
    if not provider_transaction_id:
        return False
    rule = getattr(ADAPTERS.get(provider), "payer_sees", None)
    return bool(rule(provider_transaction_id)) if callable(rule) else True


def build_providers(settings: Settings, http: httpx.AsyncClient,
                    redis: Any = None) -> dict[str, PaymentProvider]:
    """One adapter per configured provider, sharing the process's HTTP client.

    With `redis`, IremboPay's one-time webhook check is shared by every gateway process (a webhook
    replayed to another `serve` process is refused too); without it, it is process-local.
    """
    if settings.unused_provider_variables:
        log.warning("variables of providers not in PROVIDERS are set and ignored: remove them, or add their "
                    "provider to PROVIDERS", extra={"variables": ", ".join(settings.unused_provider_variables),
                                                    "providers": ", ".join(settings.providers)})
    providers: dict[str, PaymentProvider] = {}
    for name, config in settings.providers.items():
        adapter_class = ADAPTERS.get(name)
        if adapter_class is None:
            raise ConfigError(f"{name.upper()}_BASE_URL", f"no adapter is registered for provider {name!r}")
        check_timeouts(settings, name)
        if adapter_class is IremboPayAdapter and redis is not None:
            providers[name] = IremboPayAdapter(http, config, nonce_store=redis_nonce_store(redis))
            continue
        providers[name] = adapter_class(http, config)
    return providers


def check_timeouts(settings: Settings, name: str) -> float:
    """The longest one call to `name` may take (connect + read timeout), checked against the time a worker
    gives a job (OUTBOX_LEASE_SECONDS less a margin): refused in production, a warning elsewhere. A
    collection still running then is treated as unanswered (its status is asked, it is never sent again),
    so every slow answer would cost a status round instead of a result."""
    timeouts = timeout_from(settings.providers[name])
    longest = float(timeouts.connect or 0) + float(timeouts.read or 0)
    budget = handler_timeout(settings.outbox_lease_seconds)
    if longest >= budget:
        if settings.is_production:
            raise ConfigError(f"{name.upper()}_READ_TIMEOUT",
                              f"connect + read timeout ({longest:g}s) must be shorter than the {budget:g}s a "
                              "worker gives a job (OUTBOX_LEASE_SECONDS less 5, half of it under 10): lower it or "
                              "raise the lease")
        log.warning("provider timeouts do not fit in the outbox lease; lower %s_READ_TIMEOUT / _CONNECT_TIMEOUT "
                    "or raise OUTBOX_LEASE_SECONDS", name.upper(),
                    extra={"provider": name, "call_seconds": longest, "job_seconds": budget})
    return longest


def _route_overrides(settings: Settings, env: Mapping[str, str]) -> dict[str, str]:
    raw = settings.extra.get("PAYMENT_ROUTES")
    if raw is None:
        raw = env.get("PAYMENT_ROUTES", "")
    overrides: dict[str, str] = {}
    for part in str(raw).split(","):
        if not part.strip():
            continue
        method, sep, provider = (s.strip() for s in part.partition("="))
        if not sep or not method or not provider:
            raise ConfigError("PAYMENT_ROUTES", f"expected METHOD=provider, got {part.strip()!r}")
        # Any case, as the method and PROVIDERS are read (`MOBILE_MONEY_MTN=IremboPay` was "not configured").
        method, provider = method.upper(), provider.lower()
        if overrides.get(method, provider) != provider:
            # The last one silently won: a method routed twice is a slip made while editing the list.
            raise ConfigError("PAYMENT_ROUTES", f"routes {method} twice (to {overrides[method]} and {provider}): "
                                                "give each method once")
        overrides[method] = provider
    return overrides


def build_routes(settings: Settings, providers: Mapping[str, PaymentProvider],
                 env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Payment method -> provider name; every route must land on a provider that collects that method. A default
    route to a provider this deployment does not use (PROVIDERS) is left out; PAYMENT_ROUTES naming one is refused."""
    overrides = _route_overrides(settings, os.environ if env is None else env)
    routes = {**{method: name for method, name in DEFAULT_ROUTES.items() if name in providers}, **overrides}
    for method, name in routes.items():
        provider = providers.get(name)
        if provider is None:
            why = "which is not in PROVIDERS" if name in ADAPTERS else "which is not configured"
            raise ConfigError("PAYMENT_ROUTES", f"{method} routes to {name!r}, {why}")
        if method not in provider.methods:
            raise ConfigError("PAYMENT_ROUTES", f"{name} does not collect {method}")
    return routes


def simulator_options(settings: Settings, name: str,
                      env: Mapping[str, str] | None = None) -> SimulatorOptions:
    """Options for an in-process simulator: SIM_* variables, the provider's own credentials, our callback."""
    base = options_from_env(os.environ if env is None else env)
    config = settings.providers[name]
    credentials = {key: secret.get() for key, secret in config.credentials.items() if secret}
    return SimulatorOptions(**{**vars(base), "credentials": credentials,
                               "callback_url": base.callback_url or callback_url(settings, name)})


def mount_simulators(app: web.Application, settings: Settings, **overrides: Any) -> None:
    """Each simulator at /_sim/<name>; callbacks go back to this same process over 127.0.0.1.

    `overrides` set SimulatorOptions fields for all of them (tests). The phone page asks for PIN prompts for
    the numbers it shows only (/_sim/<name>/_control/phone); every other number is decided by its script.
    """
    for name, create in SIMULATORS.items():
        if name not in settings.providers:  # not in PROVIDERS: nothing calls it
            continue
        options = replace(simulator_options(settings, name), **overrides)
        app.add_subapp(f"/_sim/{name}", create(options))
        log.info("simulator mounted", extra={"provider": name, "path": f"/_sim/{name}"})
