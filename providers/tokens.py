"""OAuth access tokens cached until shortly before expiry, refreshed once under concurrency."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from core.ports import ProviderError


class TokenCache:
    """Holds one bearer token; concurrent callers share a single refresh, and its outcome.

    Single-flight: the callers that find no valid token while a fetch is in progress wait for that fetch and
    take its answer, a token or its failure; none starts a fetch of its own. (With a lock, each waiter would
    fetch again in turn after a failure: behind a slow token endpoint, ten waiters wait ten read timeouts, and
    the jobs among them run out of time before their request is ever sent.) The fetch runs as its own task: a
    caller that stops waiting (its job's deadline) does not cancel it for the others, and a token it brings
    after all callers left is kept for the next one. Since no caller's deadline ends it, the fetch has its own
    (`deadline`, seconds): a token endpoint that trickles its answer a byte at a time never trips a read timeout,
    and one fetch that never ended would have held every later caller, and so the provider's every payment and
    refund, until a restart. Past it the fetch fails (retryable: a token request creates nothing at the
    provider) and the next caller starts a new one.
    """

    def __init__(self, fetch: Callable[[], Awaitable[tuple[str, float]]], *, margin: float = 30.0,
                 deadline: float = 20.0) -> None:
        # fetch() returns (token, lifetime in seconds)
        self._fetch = fetch
        self._margin = margin
        self._deadline = deadline
        self._token: str | None = None
        self._expires = 0.0
        self._pending: asyncio.Task[str] | None = None  # the fetch in progress, shared by every caller
        self.fetches = 0  # fetches that brought a token

    async def get(self) -> str:
        if self._token and time.monotonic() < self._expires:
            return self._token
        pending = self._pending
        if pending is None or pending.done() or pending.get_loop() is not asyncio.get_running_loop():
            # (A fetch of another event loop - a test's, now closed - is never waited for.)
            pending = self._pending = asyncio.get_running_loop().create_task(self._refresh())
            pending.add_done_callback(self._fetched)
        # shield: a caller cancelled (its deadline) stops waiting; the fetch goes on for the others.
        return await asyncio.shield(pending)

    async def _refresh(self) -> str:
        try:
            async with asyncio.timeout(self._deadline):
                token, lifetime = await self._fetch()
        except TimeoutError:
            raise ProviderError(f"the token request did not end within {self._deadline:.0f} s; nothing was sent",
                                retryable=True, code="TOKEN_TIMEOUT") from None
        self.fetches += 1
        self._token = token
        # Refresh before expiry; for very short lifetimes keep at least half of it.
        self._expires = time.monotonic() + max(lifetime - self._margin, lifetime / 2)
        return token

    def _fetched(self, task: asyncio.Task[str]) -> None:
        if self._pending is task:
            self._pending = None  # the next caller without a valid token fetches afresh (after a failure too)
        if not task.cancelled():
            task.exception()  # read here: a failure whose callers all left is not reported as never retrieved

    def invalidate(self, token: str) -> None:
        """`token` was refused (a 401): dropped, unless another caller has already replaced it. Each caller that
        sent with the revoked token gets its 401; were each to drop whatever is cached, one answered after the
        new token arrived would drop that fresh one too, and every such caller would fetch a token of its own."""
        if self._token == token:
            self._token = None
            self._expires = 0.0
