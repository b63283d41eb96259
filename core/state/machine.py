"""Transition tables as data and a compare-and-set writer that audits in the same transaction."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from types import SimpleNamespace
from typing import Any, Generic, TypeVar

from sqlalchemy import bindparam, cast, exists, func, insert, inspect, literal_column, select, update
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, async_sessionmaker
from sqlalchemy.orm.attributes import instance_state, set_committed_value
from sqlalchemy.orm.util import identity_key

from core import pgraw
from core.audit import Actor, formatted, record
from core.db import table_of, utcnow
from core.errors import INVALID_STATE, BusinessRuleError, Conflict
from core.models import AuditEvent
from core.outbox import (
    Job,
    NewJob,
    enqueue_many,
    finish_in,
    finish_values,
    finished,
    finished_after,
    job_params,
    queued_after,
)

S = TypeVar("S", bound=StrEnum)


class IllegalTransition(BusinessRuleError):
    """The table does not allow this move."""

    code = INVALID_STATE

    def __init__(self, machine: str, source: str, target: str, recovery: str | None = None) -> None:
        named = "" if recovery is None else f" (recovery {recovery!r})"
        super().__init__(f"{machine}: {source} -> {target}{named} is not allowed")
        self.machine, self.source, self.target, self.recovery = machine, source, target, recovery


class StaleTransition(Conflict):
    """The row was not in the expected state: another writer won the race, or it moved on."""

    code = INVALID_STATE

    def __init__(self, machine: str, entity_id: str, source: str) -> None:
        super().__init__(f"{machine} {entity_id} is no longer {source}")
        self.machine, self.entity_id, self.source = machine, entity_id, source


@dataclass(frozen=True)
class StateMachine(Generic[S]):
    name: str
    states: type[S]
    model: Any  # ORM class with id and status columns
    table: Mapping[S, frozenset[S]]
    # Moves out of a final state that are allowed but must be flagged (money taken after we gave up).
    exceptional: frozenset[tuple[S, S]] = field(default_factory=frozenset)
    # (audit key, column): columns of the moved row that every audit row of its moves carries in `after`, read
    # from the row the move returned (so each caller need not know them, and none can give a stale value).
    audit_columns: tuple[tuple[str, str], ...] = ()
    # Named recovery moves, {name: the (source, target) pairs it may make}: moves the table forbids (out of a final
    # state, backwards) that one writer makes to correct a row another wrote without knowing what it knew (a text
    # that went after a person marked it "not sent"). `transition` makes one only when its caller names it
    # (recovery=name), never for a caller that does not (a delivery report cannot reopen a FAILED text); its audit
    # row's action is `<machine>.<name>` and its after says {"recovery": name}.
    recoveries: Mapping[str, frozenset[tuple[S, S]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        missing = set(self.states) - set(self.table)
        if missing:
            raise ValueError(f"{self.name}: states without a row in the table: {sorted(missing)}")
        unknown = {s for pairs in self.recoveries.values() for pair in pairs for s in pair} - set(self.states)
        if unknown:
            raise ValueError(f"{self.name}: recoveries name unknown states: {sorted(unknown)}")

    @property
    def final(self) -> frozenset[S]:
        return frozenset(s for s, targets in self.table.items() if not targets - {s})

    def allowed(self, source: S, target: S) -> bool:
        return target in self.table[source]

    def is_exceptional(self, source: S, target: S) -> bool:
        return (source, target) in self.exceptional

    def check(self, source: S, target: S, recovery: str | None = None) -> None:
        """Refuse a move the table does not allow; or, for a named `recovery`, one that recovery does not make."""
        if recovery is None:
            if not self.allowed(source, target):
                raise IllegalTransition(self.name, source.value, target.value)
        elif (source, target) not in self.recoveries.get(recovery, ()):
            raise IllegalTransition(self.name, source.value, target.value, recovery)

    def pairs(self) -> list[tuple[S, S]]:
        """The table's moves: those `transition` makes unnamed."""
        return [(s, t) for s, targets in self.table.items() for t in sorted(targets)]

    def recovery_pairs(self) -> list[tuple[str, S, S]]:
        """The recovery moves, (name, source, target): each made only when its caller names it."""
        return [(name, s, t) for name, pairs in self.recoveries.items() for s, t in sorted(pairs)]


async def transition(
    session: AsyncSession | AsyncConnection,
    machine: StateMachine[S],
    entity_id: str,
    source: S,
    target: S,
    *,
    actor: Actor,
    values: Mapping[str, Any] | None = None,
    audit: Mapping[str, Any] | None = None,
    was: Mapping[str, Any] | None = None,
    cooperative_id: str | None = None,
    jobs: Sequence[NewJob] = (),
    alongside: tuple[Any, dict[str, Any]] | None = None,
    recovery: str | None = None,
    where: Any | None = None,
) -> Any:
    """Move one row from `source` to `target` with UPDATE ... WHERE status = :source RETURNING.

    Raises IllegalTransition if the table forbids it and StaleTransition if zero rows matched. `recovery`: the name
    of the machine's recovery move this is (StateMachine.recoveries), checked against it instead of the table, and
    the audit row's action. `where`: more the row must hold to move (a condition on the machine's table, built once:
    the statement is cached with it), as a recovery's guard; not matched is StaleTransition too.
    The audit event is written in the caller's transaction; the caller commits. `audit`: more for its after,
    `was`: for its before (what the move clears, e.g. the ids a voided recording releases).

    `jobs`: outbox jobs the move queues (a receipt, a webhook event), and `alongside`: another write made
    with it (a Core UPDATE built once, its parameters). On PostgreSQL they travel in the move's statement
    and happen only if the row moved (jobs whose dedupe key exists are skipped, as with enqueue_many);
    elsewhere, or for a job without a dedupe key, enqueue_many writes them once the row has moved.

    `session` may be a Core connection inside a transaction on PostgreSQL (core.pgraw.Transaction's: a callback's
    common path, with no ORM session): the move is the same statement, no instance is refreshed (the moved values
    are returned by attribute name), and every job must carry a dedupe key (ValueError otherwise).
    """
    machine.check(source, target, recovery)
    model = machine.model
    orm = session if isinstance(session, AsyncSession) else None
    if orm is not None:
        # The connection first, then the stamp: a move that waited for a pooled connection would otherwise commit an
        # updated_at older than its transaction, behind a payment sync's horizon (admin_api.common.sync_horizon).
        # (A Core connection is held already.)
        await orm.connection()
    elif pgraw.dialect_name(session) != "postgresql" or any(job.dedupe_key is None for job in jobs):
        raise ValueError("a move on a Core connection is PostgreSQL's one statement, its jobs with dedupe keys")
    changes, before, after, action = _describe(machine, source, target, values, audit, recovery)
    before.update(was or {})
    before, after = formatted(before), formatted(after)  # the log's one format (core.audit.formatted)
    if orm is not None:
        sync = orm.sync_session
        if sync.autoflush and (sync.new or sync.dirty or sync.deleted):
            await orm.flush()  # what the ORM UPDATE's autoflush did: pending changes go first
    if pgraw.dialect_name(session) == "postgresql":
        # One statement: the UPDATE ... RETURNING and the audit INSERT fed by it (a data-modifying CTE),
        # so the audit row exists exactly when the row moved, in one round trip instead of two; the jobs
        # and the write alongside ride along the same way.
        params = _cte_params(machine, entity_id, source, changes, actor, action, before, after, cooperative_id)
        keys = tuple(changes)
        carried = all(job.dedupe_key is not None for job in jobs)
        if carried:
            params.update(job_params(list(jobs)))
            if alongside is not None:
                if params.keys() & alongside[1].keys():  # one namespace: a clash would overwrite the move's
                    raise ValueError(f"parameters of the write alongside clash: {params.keys() & alongside[1].keys()}")
                params.update(alongside[1])
        shown = machine.audit_columns
        statement = (_moved_and_audited(model, keys, False, len(jobs), None if alongside is None else alongside[0],
                                        shown, where)
                     if carried and (jobs or alongside is not None)
                     else _moved_and_audited(model, keys, shown=shown, where=where))
        if await pgraw.in_transaction(session):
            # The caller's transaction is open (an earlier statement began it): the statement joins it
            # straight on asyncpg. As the first statement it goes through SQLAlchemy, which begins one.
            raw = await pgraw.fetchrow(session, pgraw.compiled(statement), params)
            returned = None if raw is None else pgraw.decoded(model.__table__, raw)
        else:
            returned = (await session.execute(statement, params)).first()
        if returned is None:
            raise StaleTransition(machine.name, entity_id, source.value)
        if orm is None:
            return SimpleNamespace(**dict(zip(_attr_keys(model), returned, strict=True)))
        row = _refresh_loaded(orm, model, entity_id, returned)
        if not carried:
            await enqueue_many(orm, list(jobs), alongside=alongside)
        return row
    assert orm is not None  # (a Core connection was refused above)
    session = orm
    table = model.__table__
    stmt = update(table).where(table.c.id == entity_id, table.c.status == source.value).values(changes)
    if where is not None:
        stmt = stmt.where(where)
    returned = (await session.execute(stmt.returning(*table.c))).first()
    if returned is None:
        raise StaleTransition(machine.name, entity_id, source.value)
    row = _refresh_loaded(session, model, entity_id, returned)
    after.update(_audited_columns(machine, returned))
    await record(
        session,
        actor=actor,
        action=action,
        entity_type=machine.name,
        entity_id=entity_id,
        before=before,
        after=after,
        cooperative_id=cooperative_id or getattr(row, "cooperative_id", None),
    )
    if jobs or alongside is not None:
        await enqueue_many(session, list(jobs), alongside=alongside)
    return row


async def transition_alone(
    sessionmaker: async_sessionmaker[AsyncSession],
    machine: StateMachine[S],
    entity_id: str,
    source: S,
    target: S,
    *,
    actor: Actor,
    values: Mapping[str, Any] | None = None,
    finish: Job | None = None,
    jobs: Sequence[NewJob] = (),
) -> bool:
    """`transition` as a unit of work of its own, committed when this returns; True when the job ended.

    `finish`: the outbox job this move ends (the handler's last write, see outbox.finish_in): it is
    marked DONE with the move, and `finished(job)` is recorded. `jobs`: outbox jobs the move queues, each with a
    dedupe key (ValueError otherwise), written only if the row moved (one whose key exists is skipped), as
    transition's. On PostgreSQL the move, its audit row, the job's end and the jobs are one statement in autocommit
    (one round trip, no BEGIN or COMMIT); elsewhere a short transaction. Raises StaleTransition, as transition does,
    with nothing written.
    """
    machine.check(source, target)
    if any(job.dedupe_key is None for job in jobs):
        raise ValueError("the jobs a move queues on its own carry dedupe keys")
    engine = sessionmaker.kw.get("bind")
    if engine is None or engine.dialect.name != "postgresql":
        async with sessionmaker.begin() as session:
            await transition(session, machine, entity_id, source, target, actor=actor, values=values, jobs=jobs)
            done = finish is not None and await finish_in(session, finish)
    else:
        # A bare pooled connection (no ORM session around one statement); nothing else runs on it, so the
        # statement runs alone, in autocommit. Stamped once it is held (see transition).
        async with engine.connect() as conn:
            changes, before, after, action = _describe(machine, source, target, values, None)
            before, after = formatted(before), formatted(after)  # the log's one format, as transition writes it
            params = _cte_params(machine, entity_id, source, changes, actor, action, before, after, None)
            ends = finish is not None and finish.locked_by is not None
            if ends:
                params.update(finish_values(finish))  # type: ignore[arg-type]
            params.update(job_params(list(jobs)))
            statement = pgraw.compiled(_moved_and_audited(machine.model, tuple(changes), ends, len(jobs),
                                                          shown=machine.audit_columns))
            raw = await pgraw.fetchrow(conn, statement, params)
        if raw is None:
            raise StaleTransition(machine.name, entity_id, source.value)
        done = ends and bool(raw["finished"])
    if done:
        finished(finish)  # type: ignore[arg-type]
    return done


def _describe(
    machine: StateMachine[S], source: S, target: S, values: Mapping[str, Any] | None, audit: Mapping[str, Any] | None,
    recovery: str | None = None,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], str]:
    """The columns a move sets, and its audit row's before, after and action (a recovery's: its name)."""
    changes: dict[str, Any] = {"status": target.value, "updated_at": utcnow()}
    if values:
        changes.update(values)
    after = {"status": target.value, **{k: _jsonable(v) for k, v in (values or {}).items()}}
    if audit:
        after.update(audit)
    if machine.is_exceptional(source, target):
        after["exceptional"] = True
    if recovery is not None:
        after["recovery"] = recovery
        return changes, {"status": source.value}, after, f"{machine.name}.{recovery}"
    return changes, {"status": source.value}, after, f"{machine.name}.{target.value.lower()}"


def _cte_params(
    machine: StateMachine[S], entity_id: str, source: S, changes: dict[str, Any], actor: Actor, action: str,
    before: dict[str, Any], after: dict[str, Any], cooperative_id: str | None,
) -> dict[str, Any]:
    params = {f"v_{k}": v for k, v in changes.items()}
    params.update(t_id=entity_id, t_source=source.value, a_coop=cooperative_id or None, a_actor=actor.id,
                  a_channel=actor.channel, a_action=action, a_type=machine.name, a_entity=entity_id,
                  a_before=before, a_after=after, a_at=utcnow())
    return params


@functools.cache
def _moved_and_audited(model: Any, keys: tuple[str, ...], finishes: bool = False, jobs: int = 0,
                       alongside: Any | None = None, shown: tuple[tuple[str, str], ...] = (),
                       where: Any | None = None) -> Any:
    """WITH moved AS (UPDATE ... WHERE id AND status RETURNING *), audited AS (INSERT INTO audit_events
    SELECT ... FROM moved) SELECT * FROM moved; built once per model and set of changed columns (and
    count of `jobs` queued, write `alongside`: both only when the row moved). `shown`: the machine's
    audit_columns, added to the audit row's after from the moved row (after || jsonb_build_object(...)).
    `where`: transition's, in the UPDATE's WHERE."""
    table, audit_table = table_of(model), table_of(AuditEvent)
    guarded = update(table).where(table.c.id == bindparam("t_id"), table.c.status == bindparam("t_source"))
    if where is not None:
        guarded = guarded.where(where)
    moved = (
        guarded
        .values({k: bindparam(f"v_{k}", type_=table.c[k].type) for k in keys})
        .returning(*table.c)
        .cte("moved")
    )
    coop: Any = bindparam("a_coop", type_=audit_table.c.cooperative_id.type)
    if "cooperative_id" in table.c:
        coop = func.coalesce(coop, moved.c.cooperative_id)
    audited = insert(audit_table).from_select(
        ["cooperative_id", "actor", "channel", "action", "entity_type", "entity_id", "before", "after", "at"],
        select(
            coop,
            bindparam("a_actor", type_=audit_table.c.actor.type),
            bindparam("a_channel", type_=audit_table.c.channel.type),
            bindparam("a_action", type_=audit_table.c.action.type),
            bindparam("a_type", type_=audit_table.c.entity_type.type),
            bindparam("a_entity", type_=audit_table.c.entity_id.type),
            bindparam("a_before", type_=audit_table.c.before.type),
            _after(moved, shown, bindparam("a_after", type_=audit_table.c.after.type)),
            bindparam("a_at", type_=audit_table.c.at.type),
        ).select_from(moved),
    ).cte("audited")
    stmt = select(*(moved.c[c.name] for c in table.c)).add_cte(audited)
    if finishes and alongside is not None:  # the job's end binds b_id and bare column names too
        raise ValueError("a move that ends its job takes no write alongside")
    if jobs:
        stmt = stmt.add_cte(queued_after(moved, jobs))
    if alongside is not None:
        stmt = stmt.add_cte(alongside.where(exists(select(1).select_from(moved))).cte("alongside"))
    if finishes:  # the outbox job's end, when the row moved; `finished` says whether the lease still held
        ended = finished_after(moved)
        stmt = stmt.add_cte(ended).add_columns(
            exists(select(ended.c.id)).label("finished"))
    return stmt


def _after(moved: Any, shown: tuple[tuple[str, str], ...], given: Any) -> Any:
    """The audit row's after: what the move gives, with the moved row's `shown` columns (PostgreSQL: jsonb)."""
    if not shown:
        return given
    pairs: list[Any] = []
    for key, column in shown:
        pairs += [literal_column(f"'{key}'"), moved.c[column]]
    return cast(given, JSONB).op("||")(func.jsonb_build_object(*pairs))


def _audited_columns(machine: StateMachine[Any], returned: Any) -> dict[str, Any]:
    """The machine's audit_columns of the row a move returned (the path without PostgreSQL's one statement)."""
    values = returned._mapping
    return {key: _jsonable(values[column]) for key, column in machine.audit_columns}


def _refresh_loaded(session: AsyncSession, model: Any, entity_id: str, returned: Sequence[Any]) -> Any:
    """The session's instance refreshed from the returned values (table column order, as populate_existing
    did), so callers never see the old status; when it is not loaded, the values by attribute name."""
    keys = _attr_keys(model)
    instance = session.sync_session.identity_map.get(identity_key(model, (entity_id,)))
    if instance is None:
        return SimpleNamespace(**dict(zip(keys, returned, strict=True)))
    state = instance_state(instance)
    if state.modified or state.expired or state.expired_attributes:
        # Changes not flushed (each column's committed value set, its change dropped), or an instance expired whole
        # or in part (a rollback, session.expire): column by column as before, which also clears its expired flag.
        for key, value in zip(keys, returned, strict=True):
            set_committed_value(instance, key, value)
    else:  # nothing pending: the values go straight into its state, as a load does (39 columns: 1.4 us against 34)
        state.dict.update(zip(keys, returned, strict=True))
    state.expired_attributes.difference_update(keys)
    return instance


@functools.cache
def _attr_keys(model: Any) -> tuple[str, ...]:
    """Mapped attribute names in the table's column order (the RETURNING order), once per model."""
    by_column = {col.name: attr.key for attr in inspect(model).column_attrs for col in attr.columns}
    return tuple(by_column[c.name] for c in model.__table__.c)


def _jsonable(value: Any) -> Any:
    """A moved column's value for the audit row: a datetime as it is (core.audit.formatted writes it as the API
    does, whatever its key), a date or a time as its ISO text."""
    if hasattr(value, "isoformat") and not isinstance(value, datetime):
        return value.isoformat()
    return value
