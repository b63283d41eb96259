"""OAuth access tokens cached until shortly before expiry, refreshed once under concurrency."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


class TokenCache:
    """Holds one bearer token; concurrent callers share a single refresh."""

    def __init__(self, fetch: Callable[[], Awaitable[tuple[str, float]]], *, margin: float = 30.0) -> None:
        # fetch() returns (token, lifetime in seconds)
        self._fetch = fetch
        self._margin = margin
        self._token: str | None = None
        self._expires = 0.0
        self._lock = asyncio.Lock()
        self.fetches = 0

    async def get(self) -> str:
        if self._token and time.monotonic() < self._expires:
            return self._token
        async with self._lock:
            if self._token and time.monotonic() < self._expires:
                return self._token
            token, lifetime = await self._fetch()
            self.fetches += 1
            self._token = token
            # Refresh before expiry; for very short lifetimes keep at least half of it.
            self._expires = time.monotonic() + max(lifetime - self._margin, lifetime / 2)
            return token

    def invalidate(self) -> None:
        self._token = None
        self._expires = 0.0
