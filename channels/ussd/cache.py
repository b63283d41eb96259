"""Short-lived per-process copies of the rows every USSD session reads, and one-round-trip connections.

Every pay session of a cooperative reads the same cooperative row and the same active payment types;
under load that was a database session per hop for data that changes a few times a year. They are
kept here for TTL seconds per database engine (rows are found by their random ids, so a test never
sees another's).

Correctness: a cooperative renamed, suspended, given a new contact or closed to self-registration, or
a payment type deactivated or repriced, may still be shown for at most TTL seconds in this process; so may a
country's first cooperative be missed by the shared code's check of a stranger's number
(flows.no_cooperative_of_her_country: told that no cooperative here takes her country's numbers, she dials again).
A member is never taken in from a cached row: a session resumed at the name prompt reads the cooperative from
the database (flows.cooperative_now), and a name typed reads it in the transaction that creates the member,
held FOR SHARE (flows.name_entered). A payment is never created from a cached row: create_payment
reads the cooperative and the type again in its own transaction and refuses an inactive type, a
changed price or a suspended cooperative (the user is then told the type was closed or its amount
changed, that nothing was charged and, for a new amount, to dial again: flows.TypeChanged).
"""

from __future__ import annotations

import time
import weakref
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from contextvars import ContextVar
from typing import Any

from core import db

TTL_SECONDS = 5.0
MISSING: Any = object()


class TtlCache:
    """A small dict whose entries expire; bounded so a flood of unknown keys cannot grow it."""

    def __init__(self, ttl: float = TTL_SECONDS, size: int = 2048) -> None:
        self.ttl, self.size = ttl, size
        self._items: dict[Any, tuple[float, Any]] = {}

    def get(self, key: Any) -> Any:
        found = self._items.get(key)
        if found is None or found[0] < time.monotonic():
            return MISSING
        return found[1]

    def put(self, key: Any, value: Any) -> None:
        if len(self._items) >= self.size:
            now = time.monotonic()
            self._items = {k: v for k, v in self._items.items() if v[0] >= now}
            if len(self._items) >= self.size:
                self._items.clear()
        self._items[key] = (time.monotonic() + self.ttl, value)

    def clear(self) -> None:
        self._items.clear()


class Caches:
    def __init__(self) -> None:
        self.coops = TtlCache()  # cooperative id -> CoopRow | None
        self.types = TtlCache()  # cooperative id -> tuple[TypeRow, ...] (active, ordered by name)
        self.countries = TtlCache()  # None -> frozenset of the cooperatives' countries


_BY_RUNTIME: weakref.WeakKeyDictionary[Any, Caches] = weakref.WeakKeyDictionary()


def of(rt: Any) -> Caches:
    """The caches of this runtime's database (keyed by its engine: a Runtime is not hashable)."""
    engine = _engine(rt).sync_engine
    caches = _BY_RUNTIME.get(engine)
    if caches is None:
        caches = _BY_RUNTIME[engine] = Caches()
    return caches


def _engine(rt: Any) -> Any:
    # The engine the runtime's sessions use (what every other read and write of the channel goes through).
    return rt.sessionmaker.kw.get("bind") or rt.engine


class _Shared:
    __slots__ = ("conn", "engine", "stack")
    conn: Any

    def __init__(self, engine: Any, stack: AsyncExitStack) -> None:
        self.engine, self.stack, self.conn = engine, stack, None


_SHARED: ContextVar[_Shared | None] = ContextVar("ussd_shared_connection", default=None)


@asynccontextmanager
async def autocommit(rt: Any) -> AsyncIterator[Any]:
    """A connection without BEGIN/COMMIT: for one read, or one single-statement write.

    A session's transaction costs two extra round trips (BEGIN, then COMMIT or ROLLBACK) around the
    statement, and the hop's CPU goes mostly into socket writes. One statement is atomic on its own.
    Inside `one_connection` every call gets the same connection (one checkout and ping for them all).
    """
    engine = _engine(rt)
    shared = _SHARED.get()
    if shared is not None and shared.engine is engine:
        if shared.conn is None:
            shared.conn = await shared.stack.enter_async_context(db.autocommit(engine))
        yield shared.conn
        return
    async with db.autocommit(engine) as conn:
        yield conn


@asynccontextmanager
async def one_connection(rt: Any) -> AsyncIterator[None]:
    """Within the block, autocommit() hands out one connection, checked out on first use only."""
    async with AsyncExitStack() as stack:
        token = _SHARED.set(_Shared(_engine(rt), stack))
        try:
            yield
        finally:
            _SHARED.reset(token)
