"""The running process's resources, built by app.py from settings and handed to every edge."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
from aiohttp import web
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from core.config import Settings
from core.crypto import PiiCipher

if TYPE_CHECKING:
    from core.ports import PaymentProvider, SmsSender


@dataclass
class Runtime:
    """Everything with a socket or a secret, built once per process (never at import time)."""

    settings: Settings
    engine: AsyncEngine
    sessionmaker: async_sessionmaker[AsyncSession]
    redis: Redis
    http: httpx.AsyncClient
    cipher: PiiCipher
    providers: Mapping[str, PaymentProvider] = field(default_factory=dict)
    # payment method (MOBILE_MONEY_MTN, ...) -> provider name
    routes: Mapping[str, str] = field(default_factory=dict)
    sms: SmsSender | None = None
    # Calls to customers' webhook URLs: connects only to public addresses outside the embedded default.
    webhook_http: httpx.AsyncClient | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    # The multiplexed Redis connection of the hot paths' plain commands (core.redis_mux.MuxRedis); None: redis-py.
    redis_mux: Any = None

    @property
    def hot_redis(self) -> Any:
        """What the hot paths send their plain commands with (a USSD hop's session read and save, an SMS send's rate
        slot, lock and kept answer, an API request's rate limit and revocation mark, a provider callback's rate
        limit): the multiplexed connection where there is one, else the redis-py client (same server, same keys).
        Everything else uses `redis`."""
        return self.redis if self.redis_mux is None else self.redis_mux

    def provider_for(self, method: str) -> PaymentProvider:
        from core.errors import PAYMENT_METHOD_NOT_AVAILABLE, ValidationError

        name = self.routes.get(method)
        if name is None or name not in self.providers:
            raise ValidationError(f"payment method {method!r} is not available", field="paymentMethod",
                                  code=PAYMENT_METHOD_NOT_AVAILABLE)
        return self.providers[name]


SETTINGS = web.AppKey("settings", Settings)
RUNTIME = web.AppKey("runtime", Runtime)
