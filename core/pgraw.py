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

import json
from dataclasses import dataclass
from typing import Any

import asyncpg
from sqlalchemy.dialects.postgresql.asyncpg import PGDialect_asyncpg
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql import sqltypes

_DIALECT = PGDialect_asyncpg()
_MISSING = object()


@dataclass(frozen=True)
class RawStatement:
    """A Core statement compiled once for asyncpg: its SQL text and its parameters' order."""

    sql: str
    names: tuple[str, ...]
    json_names: frozenset[str]  # JSON parameters: sent as text (the dialect's jsonb codec takes text)
    fixed: dict[str, Any]  # values the statement carries itself (literal() binds)

    @classmethod
    def of(cls, stmt: Any, *, column_keys: list[str] | None = None) -> RawStatement:
        """`column_keys`: for an INSERT without values, the columns it sets (the others keep defaults)."""
        compiled = stmt.compile(dialect=_DIALECT, column_keys=column_keys)
        names = tuple(compiled.positiontup or ())
        json_names = frozenset(name for name, bind in compiled.binds.items()
                               if isinstance(bind.type.dialect_impl(_DIALECT), sqltypes.JSON))
        fixed = {name: bind.effective_value for name, bind in compiled.binds.items()
                 if not bind.required and bind.callable is None}
        return cls(str(compiled), names, json_names, fixed)

    def args(self, params: dict[str, Any]) -> list[Any]:
        out = []
        for name in self.names:
            value = params.get(name, _MISSING)
            if value is _MISSING:
                value = self.fixed[name]  # KeyError: the caller forgot a parameter
            if name in self.json_names and value is not None:
                value = json.dumps(value)
            out.append(value)
        return out


async def driver(session: AsyncSession) -> asyncpg.Connection:
    """The asyncpg connection under the session (checked out from the pool if it had none yet)."""
    connection = await session.connection()
    fairy = await connection.get_raw_connection()
    return fairy.driver_connection  # type: ignore[return-value]


async def fetchrow(session: AsyncSession, statement: RawStatement, params: dict[str, Any]) -> asyncpg.Record | None:
    conn = await driver(session)
    try:
        return await conn.fetchrow(statement.sql, *statement.args(params))
    except asyncpg.IntegrityConstraintViolationError as exc:
        raise IntegrityError(statement.sql, None, exc) from exc
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        raise DBAPIError(statement.sql, None, exc) from exc


async def executemany(session: AsyncSession, statement: RawStatement, rows: list[dict[str, Any]]) -> None:
    conn = await driver(session)
    try:
        await conn.executemany(statement.sql, [statement.args(row) for row in rows])
    except asyncpg.IntegrityConstraintViolationError as exc:
        raise IntegrityError(statement.sql, None, exc) from exc
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        raise DBAPIError(statement.sql, None, exc) from exc


async def in_transaction(session: AsyncSession) -> bool:
    """Whether the session's connection has a transaction open on the server (raw statements join it)."""
    return (await driver(session)).is_in_transaction()


def decoded(table: Any, record: asyncpg.Record) -> tuple[Any, ...]:
    """A raw row of `table`'s columns (in table order) as SQLAlchemy would give it: JSON parsed (the
    dialect's codec hands JSON over as text)."""
    return tuple(json.loads(value) if isinstance(value, str) and name in _json_columns(table) else value
                 for name, value in zip((c.name for c in table.c), record, strict=True))


_JSON_COLUMNS: dict[Any, frozenset[str]] = {}


def _json_columns(table: Any) -> frozenset[str]:
    found = _JSON_COLUMNS.get(table)
    if found is None:
        found = _JSON_COLUMNS[table] = frozenset(c.name for c in table.c
                                                 if isinstance(c.type.dialect_impl(_DIALECT), sqltypes.JSON))
    return found
