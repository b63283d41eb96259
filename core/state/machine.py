"""Transition tables as data and a compare-and-set writer that audits in the same transaction."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Generic, TypeVar

from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession

from core.audit import Actor, record
from core.db import utcnow
from core.errors import BusinessRuleError, Conflict

S = TypeVar("S", bound=StrEnum)


class IllegalTransition(BusinessRuleError):
    """The table does not allow this move."""

    def __init__(self, machine: str, source: str, target: str) -> None:
        super().__init__(f"{machine}: {source} -> {target} is not allowed")
        self.machine, self.source, self.target = machine, source, target


class StaleTransition(Conflict):
    """The row was not in the expected state: another writer won the race, or it moved on."""

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

    def __post_init__(self) -> None:
        missing = set(self.states) - set(self.table)
        if missing:
            raise ValueError(f"{self.name}: states without a row in the table: {sorted(missing)}")

    @property
    def final(self) -> frozenset[S]:
        return frozenset(s for s, targets in self.table.items() if not targets - {s})

    def allowed(self, source: S, target: S) -> bool:
        return target in self.table[source]

    def is_exceptional(self, source: S, target: S) -> bool:
        return (source, target) in self.exceptional

    def check(self, source: S, target: S) -> None:
        if not self.allowed(source, target):
            raise IllegalTransition(self.name, source.value, target.value)

    def pairs(self) -> list[tuple[S, S]]:
        return [(s, t) for s, targets in self.table.items() for t in sorted(targets)]


async def transition(
    session: AsyncSession,
    machine: StateMachine[S],
    entity_id: str,
    source: S,
    target: S,
    *,
    actor: Actor,
    values: Mapping[str, Any] | None = None,
    audit: Mapping[str, Any] | None = None,
    cooperative_id: str | None = None,
) -> Any:
    """Move one row from `source` to `target` with UPDATE ... WHERE status = :source RETURNING.

    Raises IllegalTransition if the table forbids it and StaleTransition if zero rows matched.
    The audit event is written in the caller's transaction; the caller commits.
    """
    machine.check(source, target)
    model = machine.model
    now = utcnow()
    changes: dict[str, Any] = {"status": target.value, "updated_at": now}
    if values:
        changes.update(values)
    stmt = (
        update(model)
        .where(model.id == entity_id, model.status == source.value)
        .values(**changes)
        .returning(model)
        # Refresh an instance already in the session so callers never see the old status.
        .execution_options(synchronize_session=False, populate_existing=True)
    )
    row = (await session.execute(stmt)).scalar_one_or_none()
    if row is None:
        raise StaleTransition(machine.name, entity_id, source.value)
    after = {"status": target.value, **{k: _jsonable(v) for k, v in (values or {}).items()}}
    if audit:
        after.update(audit)
    if machine.is_exceptional(source, target):
        after["exceptional"] = True
    await record(
        session,
        actor=actor,
        action=f"{machine.name}.{target.value.lower()}",
        entity_type=machine.name,
        entity_id=entity_id,
        before={"status": source.value},
        after=after,
        cooperative_id=cooperative_id or getattr(row, "cooperative_id", None),
    )
    return row


def _jsonable(value: Any) -> Any:
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value
