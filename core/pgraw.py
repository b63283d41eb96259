"""A few hot statements run straight on the session's asyncpg connection (PostgreSQL only).

SQLAlchemy still builds each statement (from the models, once) and owns the connection, its pool and
its transaction; only the execution skips its layers. Through the session a statement cost about
three times the CPU of the asyncpg call itself (a greenlet per execute, the ORM's compile state, result
processing), and BEGIN and COMMIT were two more round trips around a statement that is atomic alone.

A raw statement joins the session's transaction when one is open (something ran through SQLAlchemy
before it); otherwise it runs on its own, in autocommit, and the session's commit has nothing to send.
Use it only for a statement that is atomic by itself or whose caller opened the transaction. Errors
come out as SQLAlchemy's (IntegrityError, DBAPIError), as callers and the outage handling expect.
"""

from __future__ import annotations

import asyncio
import functools
import json
import operator
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg
from sqlalchemy.dialects.postgresql.asyncpg import PGDialect_asyncpg
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
from sqlalchemy.sql import sqltypes

from core.db import json_text

_DIALECT = PGDialect_asyncpg()


def _is_json(type_: Any) -> bool:
    return isinstance(type_.dialect_impl(_DIALECT), sqltypes.JSON)


@dataclass(frozen=True)
class RawStatement:
    """A Core statement compiled for asyncpg: its SQL text and its parameters' order."""

    sql: str
    names: tuple[str, ...]
    json_names: frozenset[str]  # JSON parameters: sent as text (the dialect's jsonb codec takes text)
    fixed: dict[str, Any]  # values the statement carries itself (literal() binds)

    def __post_init__(self) -> None:
        # The values in order in one C call (operator.itemgetter), then the JSON ones encoded by position, instead
        # of a Python loop over the names (70 parameters with one JSON value: 4.8 us against 6.1).
        object.__setattr__(self, "_pick", _picker(self.names))
        object.__setattr__(self, "_json_at", tuple(i for i, name in enumerate(self.names) if name in self.json_names))

    def args(self, params: dict[str, Any]) -> list[Any]:
        """The parameters in the statement's order: `params` over the statement's own values; KeyError names one the
        caller forgot. JSON ones (not None) as text."""
        out = list(self._pick({**self.fixed, **params} if self.fixed else params))  # type: ignore[attr-defined]
        for i in self._json_at:  # type: ignore[attr-defined]
            if out[i] is not None:
                out[i] = json_text(out[i])
        return out


def _picker(names: tuple[str, ...]) -> Callable[[Mapping[str, Any]], tuple[Any, ...]]:
    """The values of `names` from a mapping, in order, as a tuple (KeyError for a missing one)."""
    if not names:
        return lambda _values: ()
    get = operator.itemgetter(*names)
    if len(names) == 1:
        return lambda values: (get(values),)
    return get


@functools.lru_cache(maxsize=256)
def compiled(stmt: Any, column_keys: tuple[str, ...] | None = None) -> RawStatement:
    """`stmt` compiled once. Keyed by the statement object: pass statements that are built once (module
    constants, or from a cached builder), not one built per call. `column_keys`: for an INSERT without
    values, the columns it sets (the others keep their defaults)."""
    done = stmt.compile(dialect=_DIALECT, column_keys=list(column_keys) if column_keys else None)
    if "__[POSTCOMPILE_" in str(done):
        # An expanding parameter (IN of a list, even a fixed one) is rendered per execution by SQLAlchemy: sent as it
        # is, the placeholder would be a syntax error at the server.
        raise ValueError("a statement with an expanding IN parameter cannot run raw: run it through SQLAlchemy")
    json_names = frozenset(name for name, bind in done.binds.items() if _is_json(bind.type))
    # Columns whose Python-side default or onupdate SQLAlchemy would compute (updated_at): nothing here
    # computes them, so the caller must pass them (a KeyError in args) instead of NULL being written.
    computed = {column.key for column in (*done.insert_prefetch, *done.update_prefetch)}
    fixed = {name: bind.effective_value for name, bind in done.binds.items()
             if not bind.required and bind.callable is None and name not in computed}
    return RawStatement(str(done), tuple(done.positiontup or ()), json_names, fixed)


_HELD = "pgraw.driver"  # session.info: (the session's transaction, its Connection, their asyncpg connection)


async def driver(session: AsyncSession | AsyncConnection) -> asyncpg.Connection:
    """The asyncpg connection under the session (checked out from the pool if it had none yet), or under
    a Core connection (core.db.autocommit's: raw statements on it run in autocommit too).

    A session's is kept in its `info` with the SessionTransaction it was found in (the innermost: a
    begin_nested()'s, whose SAVEPOINT SQLAlchemy sends only when the session is asked for its connection), and
    handed out again while that transaction is the session's innermost and active: a request's second raw statement
    does not go through the session and its greenlets again (about 20 us of CPU). A commit, a rollback or a close
    ends that transaction (the connection goes back to the pool), a begin_nested() opens another, and a failed
    flush deactivates it: the next call goes through the session as the first did, which checks a connection out,
    sends the SAVEPOINT, or raises. So does an invalidated connection (a disconnect SQLAlchemy saw)."""
    if isinstance(session, AsyncConnection):
        return await _under(session)
    sync = session.sync_session
    held = sync.info.get(_HELD)
    if held is not None:
        transaction = _innermost(sync)
        if (held[0] is transaction and transaction is not None and transaction.is_active
                and not held[1].invalidated):
            return held[2]  # type: ignore[no-any-return]
    connection = await session.connection()
    found = await _under(connection)
    sync.info[_HELD] = (_innermost(sync), connection.sync_connection, found)
    return found


async def begin(session: AsyncSession) -> asyncpg.Connection:
    """The session's asyncpg connection with its transaction open on the server, for a transaction whose first
    statement is raw: BEGIN sent now, as SQLAlchemy's asyncpg adapter sends it before the first statement that goes
    through it (its _start_transaction), and tracked by that adapter, so that the session's commit or rollback, or
    the pool's reset of the connection, ends it as it ends one SQLAlchemy began. A transaction already open is
    joined. Raises DBAPIError when BEGIN fails (the server gone), and RuntimeError when the adapter sent none (a
    connection in autocommit, or an adapter without the method: a SQLAlchemy this was not written for)."""
    conn = await driver(session)
    await _begin_on(session.sync_session.info[_HELD][1], conn)
    return conn


# SQLAlchemy's asyncpg adapter (AsyncAdapt_asyncpg_connection, 2.1) is reached through public attributes
# (PoolProxiedConnection.dbapi_connection, .driver_connection), but two of its private members remain in use, for
# want of a public equivalent at no extra cost (checked against SQLAlchemy 2.1.9; tests/core/test_pgraw.py fails if
# either goes):
# - `_start_transaction()` (begin, transaction): the BEGIN the adapter sends lazily, before the first statement that
#   goes through it, sent now and recorded by the adapter. Neither Connection.begin() nor AsyncConnection.begin()
#   sends anything on asyncpg, and a statement through SQLAlchemy to make it send BEGIN is a round trip more; a BEGIN
#   sent straight on asyncpg is one the adapter does not track, which its commit, rollback and the pool's reset
#   would never end.
# - `_transaction` (read in _begin_on; read and cleared in _commit): whether the adapter holds a transaction, and
#   the one COMMIT is sent on without a greenlet. The public route, AsyncConnection.commit(), runs the adapter's
#   commit through greenlet_spawn: about 15 us of CPU more a transaction (bench: 3,000 BEGIN-COMMIT pairs on
#   127.0.0.1, 141-144 us against 156-160 us), on every callback. Connection.in_transaction() is SQLAlchemy's own
#   record (true before BEGIN is sent), not the adapter's.
# core.db.autocommit needs neither: the adapter's public `autocommit` attribute, and in autocommit any transaction
# open on the server is one the adapter did not begin.
async def _begin_on(connection: Connection, conn: asyncpg.Connection) -> None:
    """BEGIN sent on `connection`'s asyncpg connection `conn` through SQLAlchemy's adapter (begin's), unless the
    adapter's transaction is open already."""
    adapted = connection.connection.dbapi_connection
    if getattr(adapted, "_transaction", None) is not None:
        return  # SQLAlchemy's adapter began it (or this did): the session's to end
    if conn.is_in_transaction():
        # Open on the server, yet not the adapter's: the session's commit would send no COMMIT, and every write made
        # here would be lost with the connection. Never handed on.
        connection.invalidate()
        raise RuntimeError("the session's connection holds a transaction the session does not track")
    start = getattr(adapted, "_start_transaction", None)
    if start is not None:
        try:
            await start()
        except Exception as exc:  # the adapter's own error for a failed BEGIN: SQLAlchemy's, as callers expect
            raise DBAPIError("BEGIN", None, exc) from exc
        except BaseException:
            # Cancelled with BEGIN sent and its answer not read: asyncpg holds a transaction the adapter never
            # recorded, so no rollback would end it, and the pool would hand the connection on inside it. Closed
            # instead, as SQLAlchemy closes a connection whose statement was cancelled.
            connection.invalidate()
            raise
    if not conn.is_in_transaction():
        raise RuntimeError("no transaction could be begun on the session's connection")


class Transaction:
    """A transaction on a pooled Core connection (`conn`), begun and committed straight on asyncpg (transaction()),
    with an ORM session joined to it only once a caller asks for one (session()).

    A callback's common path (its event stored, its payment locked and moved: core.provider_events) is raw
    statements only, and an AsyncSession around them cost more than they did: its creation, its SessionTransaction,
    its commit and close through greenlets (about 200 us of a callback's 1.4 ms of CPU, bench/README.md's
    forty-sixth round). Its rare branches (a flag, an audit row of its own, an unmatched callback) use the ORM:
    the session they get is joined to this connection's transaction ("rollback_only": its commit and close leave the
    transaction alone, its rollback rolls it back), so everything is still one transaction, committed or rolled back
    once, by transaction()."""

    __slots__ = ("_attached", "_session", "conn")

    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn
        self._session: AsyncSession | None = None
        self._attached: list[Any] = []

    @property
    def joined(self) -> AsyncSession | None:
        """The ORM session joined to the transaction, if a caller asked for one."""
        return self._session

    def attach(self, instance: Any) -> None:
        """A detached instance built from a row this transaction read (and locked): persistent in the session once
        there is one, as a load in it would have made it (its changes flushed there, a move's values laid on it)."""
        if self._session is None:
            self._attached.append(instance)
        else:
            self._session.add(instance)

    def session(self) -> AsyncSession:
        """The ORM session joined to the transaction, made at the first call (no I/O: the connection and its
        transaction are there), holding the attached instances. Its pending changes are flushed before the commit."""
        if self._session is None:
            self._session = AsyncSession(bind=self.conn, join_transaction_mode="rollback_only",
                                         expire_on_commit=False)
            self._session.add_all(self._attached)
            self._attached.clear()
        return self._session


@asynccontextmanager
async def transaction(engine: AsyncEngine) -> AsyncIterator[Transaction]:
    """A Transaction on a connection checked out of `engine`'s pool (PostgreSQL): BEGIN sent at once, COMMIT at the
    end (the joined session flushed first, if there is one), everything rolled back if the block raises.

    SQLAlchemy's Connection records the transaction (its begin() sends nothing on asyncpg: the adapter begins on the
    first statement) and the adapter tracks the one BEGIN opened (_begin_on), so a rollback, an invalidation or the
    pool's reset ends it as it ends one SQLAlchemy began. Ended well, the connection goes back to the pool without
    the greenlet and the shielded task AsyncConnection's close runs (nothing is open, nothing to send)."""
    conn = await engine.connect()
    try:
        sync = conn.sync_connection
        assert sync is not None
        sync.begin()  # SQLAlchemy's record of it, no I/O; BEGIN itself is the adapter's, now
        await _begin_on(sync, sync.connection.driver_connection)
        tx = Transaction(conn)
        yield tx
        if tx.joined is not None:
            await tx.joined.flush()  # what its commit would have written
            await tx.joined.close()  # (rollback_only: the transaction is left alone)
        await _commit(sync)
    except BaseException:
        # Rolled back and closed as AsyncConnection's exit does (shielded: a cancellation cannot leave it half done).
        await asyncio.shield(conn.close())
        raise
    sync.close()


async def _commit(connection: Connection) -> None:
    """COMMIT of transaction()'s transaction straight on asyncpg, then SQLAlchemy's record of it ended (with the
    adapter's transaction done, its commit has nothing to send). A COMMIT the server refused (it rolled the
    transaction back) raises as SQLAlchemy's error; one without an answer (the connection lost, or cancelled in
    flight) closes the connection, whose state is unknown."""
    adapted = connection.connection.dbapi_connection
    begun = adapted._transaction  # type: ignore[union-attr]
    if begun is not None:
        adapted._transaction = None  # type: ignore[union-attr]  # done whatever the answer (as the adapter's own)
        try:
            with _as_sqlalchemy_errors("COMMIT"):
                await begun.commit()
        except BaseException as exc:
            if not isinstance(exc.__cause__, asyncpg.PostgresError):
                connection.invalidate()
            raise
    connection.commit()


@asynccontextmanager
async def orm(db: AsyncSession | AsyncConnection) -> AsyncIterator[AsyncSession]:
    """`db` itself when it is a session; else an ORM session on the Core connection `db` for a rare branch that
    reads through the ORM (a payment's due date checked against its type: core.payments.create_payment on an API
    payment's connection in autocommit), closed after it. Its reads run on that connection, as they come (each its
    own in autocommit, as each statement of a READ COMMITTED transaction sees what is committed when it starts);
    nothing it would write is held back for a commit, so it is for reads."""
    if isinstance(db, AsyncSession):
        yield db
        return
    session = AsyncSession(bind=db, expire_on_commit=False)
    try:
        yield session
    finally:
        await session.close()


def _innermost(sync: Any) -> Any:
    """The session's innermost transaction: its begin_nested()'s if one is open, else its own (None: none)."""
    return sync.get_nested_transaction() or sync.get_transaction()


async def _under(connection: AsyncConnection) -> asyncpg.Connection:
    """The asyncpg connection of a Core connection. A checked-out, valid one is read from the pool's proxy
    (Connection.connection) without the greenlet AsyncConnection.get_raw_connection spawns around the same
    read, which does I/O only to replace an invalidated connection: that case (and a closed one) goes through
    get_raw_connection as before, to reconnect or raise as SQLAlchemy does."""
    sync = connection.sync_connection
    if sync is not None and not sync.closed and not sync.invalidated:
        return sync.connection.driver_connection  # type: ignore[return-value]
    fairy = await connection.get_raw_connection()
    return fairy.driver_connection  # type: ignore[return-value]


@contextmanager
def _as_sqlalchemy_errors(sql: str) -> Iterator[None]:
    try:
        yield
    except asyncpg.IntegrityConstraintViolationError as exc:
        raise IntegrityError(sql, None, exc) from exc
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        raise DBAPIError(sql, None, exc) from exc


async def fetchrow(
    session: AsyncSession | AsyncConnection, statement: RawStatement, params: dict[str, Any]
) -> asyncpg.Record | None:
    conn = await driver(session)
    with _as_sqlalchemy_errors(statement.sql):
        return await conn.fetchrow(statement.sql, *statement.args(params))


async def fetch(
    session: AsyncSession | AsyncConnection, statement: RawStatement, params: dict[str, Any]
) -> list[asyncpg.Record]:
    conn = await driver(session)
    with _as_sqlalchemy_errors(statement.sql):
        return await conn.fetch(statement.sql, *statement.args(params))


async def first(
    conn: AsyncSession | AsyncConnection, stmt: Any, params: dict[str, Any], column_keys: tuple[str, ...] | None = None
) -> Any:
    """The first row of `stmt` (built once; see `compiled`), or None, by position: on PostgreSQL straight on
    asyncpg, in the connection's transaction if one is open and in autocommit otherwise; on other
    databases through SQLAlchemy."""
    if dialect_name(conn) == "postgresql":
        return await fetchrow(conn, compiled(stmt, column_keys), params)
    result = await conn.execute(stmt, params)
    return result.first() if result.returns_rows else None  # type: ignore[attr-defined]


def dialect_name(db: AsyncSession | AsyncConnection) -> str:
    """The database of a session or a Core connection ("postgresql", "sqlite")."""
    return db.dialect.name if isinstance(db, AsyncConnection) else db.get_bind().dialect.name


async def in_transaction(session: AsyncSession | AsyncConnection) -> bool:
    """Whether the session's connection has a transaction open on the server (raw statements join it)."""
    return (await driver(session)).is_in_transaction()


def decoded(table: Any, record: asyncpg.Record) -> tuple[Any, ...]:
    """A raw row of `table`'s columns (in table order) as SQLAlchemy would give it: JSON parsed (the
    dialect's codec hands JSON over as text)."""
    json_columns = _json_columns(table)
    return tuple(json.loads(value) if isinstance(value, str) and name in json_columns else value
                 for name, value in zip((c.name for c in table.c), record, strict=True))


@functools.cache
def _json_columns(table: Any) -> frozenset[str]:
    return frozenset(c.name for c in table.c if _is_json(c.type))
