"""Database plumbing: declarative base, UTC timestamps, engine and session factories."""

from __future__ import annotations

import asyncio
import json
import re
import time
import unicodedata
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import orjson
from sqlalchemy import JSON, DateTime, MetaData, String, Table, TypeDecorator, bindparam, event, func, select, update
from sqlalchemy import exc as exc_module
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.sql.expression import literal_column
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.util import await_
from sqlalchemy.util.concurrency import in_greenlet


class event_data_id(FunctionElement[str]):
    """The id in a stored webhook event's `data` (the payment, refund or dispute it tells of), from a JSON column
    holding one (webhook_deliveries.payload, a webhook.event job's outbox_jobs.payload): the expression of the
    indexes that find them by it (migration 0034), written the same in every query so that they are used."""

    type = String()
    inherit_cache = True
    name = "event_data_id"


@compiles(event_data_id, "postgresql")
def _event_data_id_postgresql(element: event_data_id, compiler: Any, **kw: Any) -> str:
    return f"({compiler.process(element.clauses, **kw)} #>> '{{data,id}}')"


@compiles(event_data_id)
def _event_data_id_sqlite(element: event_data_id, compiler: Any, **kw: Any) -> str:
    return f"json_extract({compiler.process(element.clauses, **kw)}, '$.data.id')"


_JSON_OPTIONS = orjson.OPT_NON_STR_KEYS | orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS


def json_text(value: Any) -> str:
    """JSON text of `value`, compact: a JSON column's value as sent to the database, an API answer's body. orjson (a
    tenth of the json module's time: a callback sends two job payloads, an API payment three rows' worth), or the
    json module for what orjson refuses (a lone surrogate, written \\ud800; an integer past 64 bits). A datetime, a
    set or a dataclass is refused, as json.dumps refuses it, not written in orjson's own way. orjson takes a few
    values json.dumps refused: a plain Enum (its value), a UUID (its text), such keys; and writes NaN and infinities
    as null, where json.dumps wrote NaN, which PostgreSQL refused (the API refuses them in a body: only a
    provider's raw JSON can hold one). Characters are UTF-8 where json.dumps wrote \\u escapes: the value read
    back is the same."""
    try:
        return orjson.dumps(value, option=_JSON_OPTIONS).decode()
    except TypeError:  # (orjson.JSONEncodeError is one)
        return json.dumps(value, separators=(",", ":"))


NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def table_of(model: Any) -> Table:
    """A mapped class's Table (SQLAlchemy types `__table__` as any FromClause), for Core statements."""
    return cast(Table, model.__table__)


# Seconds to add to this host's clock to read PostgreSQL's (align_clock): every timestamp a process writes
# (a payment's approval window, a job's due time, created_at, a token's issue time) is then on the one
# clock the workers measure them by, whichever host wrote it.
_clock_offset = 0.0


def wall() -> float:
    """Now, in seconds since the epoch, on the database's clock (time.time() with this host's offset)."""
    return time.time() + _clock_offset


def utcnow() -> datetime:
    """Now, UTC, on the database's clock (see wall)."""
    return datetime.fromtimestamp(time.time() + _clock_offset, UTC)


def iso_z(value: datetime | None) -> str | None:
    """An instant as the API writes every timestamp (seed 001): UTC to the second, `Z`, a four-digit year."""
    if value is None:
        return None
    return value.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def iso_ms(value: datetime | None) -> str | None:
    """An instant as webhook events write it: as iso_z, to the millisecond (the second is too coarse to order two
    changes of one payment made in the same second)."""
    if value is None:
        return None
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def clock_offset() -> float:
    return _clock_offset


CLOCK_SKEW_WARNING_SECONDS = 1.0
_CLOCK_SAMPLES = 3
_CLOCK_MAX_ROUND_TRIP = 0.5


async def align_clock(engine: AsyncEngine) -> float | None:
    """Measure this host's clock against PostgreSQL's and keep the difference (utcnow and wall add it).

    Three `SELECT clock_timestamp()`; the quickest round trip's midpoint is taken as the moment the database
    read its clock (error at most half that round trip). SQLite (embedded, one process): the local clock is
    the database's. None (offset kept) when the database cannot be read or answers too slowly to tell."""
    global _clock_offset
    if engine.dialect.name != "postgresql":
        return None
    best: tuple[float, float] | None = None  # (round trip, offset)
    async with engine.connect() as conn:
        for _ in range(_CLOCK_SAMPLES):
            before = time.time()
            db_seconds = (await conn.execute(_READ_CLOCK)).scalar_one()
            after = time.time()
            trip = after - before
            if trip <= _CLOCK_MAX_ROUND_TRIP and (best is None or trip < best[0]):
                best = (trip, float(db_seconds) - (before + after) / 2)
    if best is None:
        return None
    _clock_offset = best[1]
    return _clock_offset


_READ_CLOCK = select(func.date_part("epoch", func.clock_timestamp()))


def new_id() -> str:
    return str(uuid.uuid4())


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC on every backend (SQLite drops the offset, so it is put back on read)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime refused: times are UTC and timezone-aware")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# JSONB on PostgreSQL, JSON text elsewhere.
JSONType = JSON().with_variant(postgresql.JSONB(), "postgresql")
UUIDStr = String(36)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


def _make_parent_folder(url: str) -> None:
    """The folder of a SQLite file (./var for the embedded default): SQLite creates the file, not its folder."""
    path = url.split("///", 1)[-1].split("?", 1)[0]
    if path and path != ":memory:" and not path.startswith("file:"):
        Path(path).parent.mkdir(parents=True, exist_ok=True)


# Seconds a checkout waits for a pooled connection when all are in use (DB_POOL_TIMEOUT_SECONDS for serve and
# worker). SQLAlchemy's 30 s default had an exhausted pool answer the API's callers 500 after 30 s and provider
# callbacks 503 only after 30 s: past a few seconds the wait is an outage, not a queue, and the caller is better
# told at once (503 + Retry-After) to send it again. Longer than a USSD hop's 3 s budget, so a hop waiting here
# is cut by its own budget first (its "unavailable" screen), and no longer than the 5 s grace a hop that began
# a side effect gets; a provider's callback is answered 503 well within its own timeout, and it retries.
POOL_TIMEOUT_SECONDS = 5.0


def make_engine(url: str, *, pool_size: int = 10, echo: bool = False,
                command_timeout: float | None = 10.0, pool_timeout: float = POOL_TIMEOUT_SECONDS) -> AsyncEngine:
    """`command_timeout`: seconds a statement may run (a request must not hang on one); None for migrations,
    whose index builds and lock waits behind live traffic may rightly take longer. `pool_timeout`: seconds to
    wait for a free connection before sqlalchemy.exc.TimeoutError (the API answers it 503, see
    admin_api.errors)."""
    if url.startswith("sqlite"):
        _make_parent_folder(url)
        engine = create_async_engine(url, echo=echo, connect_args={"timeout": 30}, json_serializer=json_text)

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()
            dbapi_conn.create_function(UNACCENT_LOWER, 1, unaccent_lower_text, deterministic=True)
            dbapi_conn.create_function(UNICODE_LOWER, 1, unicode_lower_text, deterministic=True)

        @event.listens_for(engine.sync_engine, "invalidate")
        def _rolled_back_before_close(_dbapi_conn: Any, record: Any, _exc: Any) -> None:
            """A connection SQLAlchemy discards (a statement of it cancelled: a request cut mid-write) rolled back
            before its close. Closed with a statement still open (a write with RETURNING whose row was not read yet),
            the sqlite3 connection became a "zombie" that kept its transaction, and the database's write lock, until
            the garbage collector freed the cursor: 30 to 60 s in which every write waited busy_timeout, then failed
            "database is locked" (a 503). ROLLBACK ends the transaction whatever is still open. Queued on the
            connection's thread ahead of the close (after a write still running there), shielded: a second
            cancellation does not stop it, nor the close SQLAlchemy goes on to."""
            if record.driver_connection is None or not in_greenlet():
                return  # (the garbage collector's clean-up: no loop to wait on)
            # Closed already, or cancelled again (the rollback goes on): the close follows either way.
            with suppress(Exception, asyncio.CancelledError):
                await_(asyncio.shield(record.driver_connection.rollback()))

        @event.listens_for(engine.sync_engine, "reset")
        def _rolled_back_when_collected(_dbapi_conn: Any, record: Any, state: Any) -> None:
            """A connection the garbage collector finds checked out (its session never closed: a task destroyed
            while pending) rolled back before SQLAlchemy terminates it. The pool cannot await there (no loop to
            wait on: its reset is skipped, `asyncio_safe` false) and terminates it with aiosqlite's stop(), a close
            without a rollback on the connection's thread: with a write's statement still open (its cursor alive
            elsewhere, a kept traceback's), the sqlite3 connection became the zombie _rolled_back_before_close
            describes, holding the write lock for as long as that cursor lived. The ROLLBACK is queued on that
            thread without a future (nothing to wait on or answer), ahead of the stop SQLAlchemy queues next; the
            thread runs them in order. aiosqlite's queue is its own (`_tx`, `_connection`): the test
            (tests/core/test_sqlite_cancelled_write.py) says so if a release renames them; before its stop()
            (0.22.1) the worker took no job without a future, and SQLAlchemy dropped the connection unclosed."""
            if state.asyncio_safe or record is None:
                return  # checked in, invalidated or closed by SQLAlchemy: its own rollback or the listener above
            driver = record.driver_connection
            queue, sqlite_conn = getattr(driver, "_tx", None), getattr(driver, "_connection", None)
            if queue is None or sqlite_conn is None or not hasattr(driver, "stop"):
                return
            queue.put_nowait((None, sqlite_conn.rollback))

        return engine
    engine = create_async_engine(
        url,
        echo=echo,
        json_serializer=json_text,
        # Up to twice `pool_size` connections, each kept once opened (no overflow). SQLAlchemy closes an
        # overflow connection as soon as it is given back, so a process with more requests in flight than
        # `pool_size` for a while opened and closed connections all along, PostgreSQL forking a backend for
        # each (the bench's 32 connections against the default 20: 7 to 40 a second, 1.2 against 0.87 ms of
        # CPU an API payment). The ceiling is what it was (DB_POOL_SIZE and as many again); a process keeps
        # the connections its busiest moment needed, recycled after pool_recycle.
        pool_size=2 * pool_size,
        max_overflow=0,
        pool_timeout=pool_timeout,
        pool_recycle=1800,
        # Last in, first out: the connections in use stay the same few, so a checkout under steady load
        # gets one used milliseconds ago (no ping, see below) instead of rotating through the whole pool
        # and pinging each one that sat idle past PING_AFTER_IDLE_SECONDS (a tenth of the opening USSD
        # hops paid a ping's round trip, 77 ms at p90 under load).
        pool_use_lifo=True,
        # Every session in UTC, whatever the server's default (initdb writes the host's zone, Africa/Kigali on
        # a server set up there): date_trunc and to_char of a timestamptz follow the session's zone, and the
        # ops page's minutes and any date computed in SQL must not move with the server's configuration.
        connect_args={"command_timeout": command_timeout,
                      "server_settings": {"application_name": "coop-gateway", "timezone": "UTC"}},
    )
    _ping_on_checkout(engine)
    return engine


# A connection back in the pool for less than this is not pinged when checked out again. Under load every
# checkout follows a checkin by milliseconds, and the ping was one round trip (and ~10% of the CPU) of every
# transaction. A connection the server closed is still caught on checkout when asyncpg has seen it close
# (a restart or a terminated backend: the socket's end arrives at once). One that died unseen in that
# window fails its first statement as a disconnect, and SQLAlchemy then invalidates the whole pool.
PING_AFTER_IDLE_SECONDS = 2.0


def _ping_on_checkout(engine: AsyncEngine) -> None:
    """What pool_pre_ping does, in one round trip instead of three, and only after the connection idled.

    SQLAlchemy's asyncpg ping wraps ';' in BEGIN ... ROLLBACK (for pgbouncer's transaction mode), which
    made the ping three of the five round trips of a one-query read. A dead connection still raises
    DisconnectionError here, and the pool replaces it before the caller sees it.
    """

    @event.listens_for(engine.sync_engine, "checkin")
    def _returned(dbapi_conn: Any, record: Any) -> None:
        if dbapi_conn is not None:
            # Never in the pool in autocommit (core.db.autocommit's flag), however the connection came back (a block
            # that closed it itself, a path autocommit's exit did not see): a later session on it would begin no
            # transaction, each of its statements committed alone. An attribute, no I/O.
            dbapi_conn.autocommit = False
        if record is not None:
            record.info["checked_in"] = time.monotonic()

    @event.listens_for(engine.sync_engine, "checkout")
    def _ping(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        if dbapi_conn.driver_connection.is_closed():
            # The server closed it (a restart, an idle timeout) and asyncpg saw it go: no round trip needed.
            raise exc_module.DisconnectionError("connection closed by the server")
        returned = record.info.get("checked_in")
        if returned is not None and time.monotonic() - returned < PING_AFTER_IDLE_SECONDS:
            return
        try:
            await_(dbapi_conn.driver_connection.fetchrow(";"))
        except Exception as exc:  # any failure here means the connection is unusable
            raise exc_module.DisconnectionError(f"connection failed its ping: {type(exc).__name__}") from exc


@asynccontextmanager
async def autocommit(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A connection without BEGIN/COMMIT: for one read, or one single-statement write (atomic alone).

    On PostgreSQL autocommit is the DBAPI connection's own `autocommit` attribute (SQLAlchemy's asyncpg adapter's),
    set for the block and cleared before the connection goes back: no I/O, no greenlet (about 25 us of CPU less a
    checkout than AsyncConnection.execution_options, which every USSD hop and SMS send makes). Not the
    isolation_level execution option: the pool's reset of that set the adapter's isolation level to the dialect's
    default_isolation_level ("READ COMMITTED", read once from the server) where a connection never in autocommit has
    none, and every later transaction on it began with BEGIN ISOLATION LEVEL READ COMMITTED, overriding a role's or
    database's default_transaction_isolation. Cleared, the adapter begins as it did before the block (plain BEGIN).

    Given back on PostgreSQL as core.pgraw.transaction gives its connection back: straight to the pool, without the
    greenlet and the shielded task of AsyncConnection's close (about 30 us of CPU a checkout), when nothing is left to
    send (no transaction open, the connection not invalidated: the pool's reset is then attributes only). Otherwise,
    and whenever the block raises, closed the shielded way, as before.

    One whose block left a transaction open on the server that neither SQLAlchemy nor its adapter tracks (BEGIN sent
    straight on asyncpg and never ended) is invalidated, raised or not: no reset would end that transaction, and the
    next checkout's autocommit writes would join it and never be committed."""
    conn = await engine.connect()
    sync = conn.sync_connection
    postgresql = engine.dialect.name == "postgresql"
    try:
        if postgresql and sync is not None:
            sync.connection.dbapi_connection.autocommit = True  # type: ignore[union-attr]
        else:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
        yield conn
    except BaseException:
        await asyncio.shield(_close(conn))
        raise
    if postgresql and sync is not None and not (sync.invalidated or sync.in_transaction()
                                                or _untracked_transaction(sync)):
        _autocommit_off(sync)
        sync.close()
    else:
        await asyncio.shield(_close(conn))


def _autocommit_off(sync: Any) -> None:
    """The adapter out of autocommit, back to the isolation level it had before (none: plain BEGIN), on a PostgreSQL
    Connection that still has its DBAPI connection (an invalidated one is discarded, its adapter with it). The pool's
    checkin clears it too (_ping_on_checkout's listener), for a connection given back another way."""
    if not sync.closed and not sync.invalidated:
        sync.connection.dbapi_connection.autocommit = False


def _untracked_transaction(sync: Any) -> bool:
    """Whether asyncpg's connection under `sync`, a PostgreSQL Connection in autocommit's block, is inside a transaction
    (attributes only, no I/O): one neither SQLAlchemy's adapter nor the pool's reset would end, since the adapter
    in autocommit begins none (a BEGIN sent straight on asyncpg)."""
    if sync.closed or sync.invalidated or sync.dialect.name != "postgresql":
        return False
    return bool(sync.connection.driver_connection.is_in_transaction())


async def _close(conn: AsyncConnection) -> None:
    """AsyncConnection's close; invalidated first when its block left a transaction the pool's reset cannot end."""
    sync = conn.sync_connection
    if sync is not None and _untracked_transaction(sync):
        await conn.invalidate()
    if sync is not None and sync.dialect.name == "postgresql":
        _autocommit_off(sync)
    await conn.close()


def parse_aware(value: Any) -> datetime | None:
    """An ISO 8601 moment with its offset, as job payloads carry them; None for anything else."""
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else None


# PostgreSQL's transaction-scoped advisory lock on a text key (parameter `key`, hashed by the server): the lock two
# writers that must take turns without a row to lock take (a transaction id being recorded, a chargeback's
# reversal, a member's confirmation of a type), released at the commit or rollback. Built once (pgraw.compiled).
ADVISORY_XACT_LOCK = select(func.pg_advisory_xact_lock(func.hashtext(bindparam("key", type_=String))))
# Its shared form: its holders do not wait for each other, only for a holder of ADVISORY_XACT_LOCK on the same key,
# and it for them (create-only member imports of a cooperative beside an existing=update one: core.member_import).
ADVISORY_XACT_LOCK_SHARED = select(func.pg_advisory_xact_lock_shared(func.hashtext(bindparam("key", type_=String))))


async def serialise_on_sqlite(session: AsyncSession, model: Any, row_id: str | int) -> None:
    """Make the rest of this transaction wait for any other that did the same on this row, on SQLite.

    PostgreSQL callers lock the row (SELECT ... FOR UPDATE); SQLite ignores FOR UPDATE, and the driver
    runs reads outside any transaction until the first write, so two check-then-write transactions (two
    refunds of one payment) both read "50,000 refundable" and both write. A no-op UPDATE of the row is a
    write: it begins the transaction and takes the database's write lock (SQLite serialises writers; the
    second waits up to busy_timeout), so what this transaction reads afterwards includes what the other
    committed. Call it before the reads it guards. No-op on PostgreSQL."""
    if session.get_bind().dialect.name != "sqlite":
        return
    table = model.__table__
    # updated_at set to itself too: left out, its onupdate would stamp the row as changed (a webhook endpoint's
    # failing streak counts from it).
    keep = {"updated_at": table.c.updated_at} if "updated_at" in table.c else {}
    await session.execute(update(table).where(table.c.id == row_id).values(id=table.c.id, **keep))


async def lock_row(session: AsyncSession, model: Any, row_id: str | int, cooperative_id: str | None = None) -> Any:
    """The row, locked for the rest of the transaction and read fresh (None when it does not exist, or belongs
    to another cooperative than `cooperative_id`): SELECT ... FOR UPDATE, and on SQLite the write lock first
    (serialise_on_sqlite). For check-then-write paths: two at once wait for each other, the second sees the
    first's write."""
    await serialise_on_sqlite(session, model, row_id)
    query = select(model).where(model.id == row_id).with_for_update()
    if cooperative_id is not None:
        query = query.where(model.cooperative_id == cooperative_id)
    return (await session.execute(query.execution_options(populate_existing=True))).scalar_one_or_none()


def make_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


class Held:
    """`async with Held(maker) as session`: `async with maker()`, closed for less when the session holds nothing.

    AsyncSession's own exit runs close() in a task of its own under asyncio.shield, so a cancellation cannot
    abandon a connection half given back. A session whose work was committed (or that never checked one out)
    has no transaction and no connection: its close only forgets its instances, with no I/O to protect, and
    runs here without the task (about 25 us of CPU less per request). One with a transaction still open (an
    error left it, or nothing committed it) is closed the shielded way, as before.

    The session is made at its first use (`session`; `async with` asks for it at once): a request whose handler
    runs on a Core connection (admin_api.payments' create on PostgreSQL) makes none; `made` is it, if it was, and
    close() closes it as the exit does."""

    __slots__ = ("_maker", "made")

    def __init__(self, maker: async_sessionmaker[AsyncSession]) -> None:
        self._maker = maker
        self.made: AsyncSession | None = None

    @property
    def session(self) -> AsyncSession:
        if self.made is None:
            self.made = self._maker()
        return self.made

    async def __aenter__(self) -> AsyncSession:
        return self.session

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        session = self.made
        if session is None:
            return
        if session.in_transaction():
            await session.__aexit__(None, None, None)  # (its close in a shielded task; the arguments are unused)
        else:
            session.sync_session.close()


# Name search ignores case and accents: "zoe" finds Zoë, "eric" Éric, and a name stored with its accent as a mark of
# its own (e + U+0301, as some phones write it) is the one with the precomposed é. Both sides are decomposed
# (NFD), stripped of the combining diacritical marks, the letters no decomposition reaches mapped (_LETTERS) and then
# lower-cased, at query time (no stored column to backfill: a change here applies to every row at once).
# SQLite's lower() folds A-Z only ("Éric" stayed "Éric"): its own function, not lower() overridden, since the unique
# index on lower(username) (migration 0017) was built with the built-in.
UNACCENT_LOWER = "unaccent_lower"
_MARKS = "[\u0300-\u036f]"
_MARKS_RE = re.compile(_MARKS)
# Letters with a stroke, ligatures and the like are letters of their own to Unicode, not a letter and a mark: NFD
# leaves Ł, Ø, Æ, ß as they are, and a keyboard without them types the letters they are read as ("lukasz" for
# Łukasz, "soren" for Søren). Both cases, each to lower-case ASCII: on PostgreSQL lower() runs last and, under a C
# LC_CTYPE, would leave a non-ASCII capital as it is. (Ð is Icelandic's eth, drawn as Đ and typed for it.)
_LETTERS = {"Ø": "o", "ø": "o", "Ł": "l", "ł": "l", "Đ": "d", "đ": "d", "Ð": "d", "ð": "d", "Ħ": "h", "ħ": "h",
            "ı": "i", "Æ": "ae", "æ": "ae", "Œ": "oe", "œ": "oe", "ß": "ss", "ẞ": "ss", "Þ": "th", "þ": "th"}
_LETTERS_TABLE = str.maketrans(_LETTERS)
_ONE_FOR_ONE = {letter: plain for letter, plain in _LETTERS.items() if len(plain) == 1}
_ONE_FOR_TWO = {letter: plain for letter, plain in _LETTERS.items() if len(plain) > 1}


# A username's fold on SQLite (core.auth.username_is): Python's lower(), every letter of every script, where SQLite's
# lower() folds A-Z only ("JOSÉ" stays "josÉ"). A function of its own, as UNACCENT_LOWER is, not lower() overridden.
UNICODE_LOWER = "unicode_lower"


def unicode_lower_text(value: Any) -> Any:
    """`value` lower-cased by Python (a str; anything else as it is): SQLite's UNICODE_LOWER."""
    return value.lower() if isinstance(value, str) else value


def unaccent_lower_text(value: Any) -> Any:
    """`value` lower-cased and without its accents (a str; anything else as it is), as unaccent_lower folds a
    column: what is typed into a name search."""
    if not isinstance(value, str):
        return value
    return _MARKS_RE.sub("", unicodedata.normalize("NFD", value)).translate(_LETTERS_TABLE).lower()


def unaccent_lower(dialect_name: str, column: Any) -> Any:
    """`column` folded as unaccent_lower_text folds a str, for the session's dialect: on PostgreSQL by normalize()
    (13 and later, a UTF-8 database), a regular expression, translate() and replace() for _LETTERS and then
    lower(), which on a database whose LC_CTYPE is plain C folds A-Z only: run on the letters without their marks,
    "É" is "E" by then ("ÉRIC" lowered first stayed "Éric", not found by "eric"); on SQLite by unaccent_lower_text
    itself."""
    if dialect_name == "postgresql":
        folded = func.regexp_replace(func.normalize(column, literal_column("NFD")), _MARKS, "", "g")
        folded = func.translate(folded, "".join(_ONE_FOR_ONE), "".join(_ONE_FOR_ONE.values()))
        for letter, plain in _ONE_FOR_TWO.items():
            folded = func.replace(folded, letter, plain)
        return func.lower(folded)
    return getattr(func, UNACCENT_LOWER)(column)


def insert_ignore(dialect_name: str, table: Any) -> Any:
    """INSERT ... ON CONFLICT DO NOTHING for the session's dialect."""
    if dialect_name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)


_INSERTS: dict[tuple[Any, ...], Any] = {}


def row_insert(dialect_name: str, model: Any, *, ignore_conflict: tuple[str, ...] | None = None,
               returning: str | None = None) -> Any:
    """One INSERT statement per table, run as `session.execute(stmt, values)` with the row as parameters.

    `insert(Model).values(**row)` built per call coerced every value into a bind parameter and hashed
    them all into the statement cache key: for the 30-column payment row that cost more CPU than the
    database round trip. A statement built once compiles once per set of columns. `ignore_conflict`
    adds ON CONFLICT (columns) DO NOTHING; `returning` names one column to return.
    """
    key = (dialect_name, model, ignore_conflict, returning)
    stmt = _INSERTS.get(key)
    if stmt is None:
        table = model.__table__  # the table, not the entity: plain Core execution, no ORM bulk path
        stmt = insert_ignore(dialect_name, table)
        if ignore_conflict is not None:
            stmt = stmt.on_conflict_do_nothing(index_elements=list(ignore_conflict))
        if returning is not None:
            stmt = stmt.returning(table.c[returning])
        _INSERTS[key] = stmt
    return stmt
