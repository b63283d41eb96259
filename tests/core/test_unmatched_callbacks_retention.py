"""`main.py prune` and callbacks for no payment of ours: one saying money was taken stays, however old, until a
person has resolved it (it is the only record of a member's money at the provider); resolved ones and those
reporting no money taken go after RETENTION_UNKNOWN_CALLBACKS_DAYS as before."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import insert, select

from core.audit import Actor
from core.models import ProviderEvent
from core.payments import resolve_unmatched
from core.retention import RetentionPolicy, prune
from tests.core.test_retention import _ago


async def _unmatched(s: Any, name: str, *, days: float, status: str, outcome: str = "unknown_payment") -> str:
    row_id = str(uuid.uuid4())
    await s.execute(insert(ProviderEvent).values(
        id=row_id, provider="mtn_momo", event_id=name, payment_id=None, kind="collection", status=status,
        payload={"n": name}, outcome=outcome, received_at=_ago(days)))
    return row_id


async def _left(rt: Any) -> set[str]:
    async with rt.sessionmaker() as s:
        return set((await s.execute(select(ProviderEvent.event_id))).scalars())


async def test_money_taken_stays_until_resolved(rt: Any) -> None:
    async with rt.sessionmaker.begin() as s:
        await _unmatched(s, "taken-old", days=400, status="SUCCEEDED")
        resolve_later = await _unmatched(s, "taken-old-resolved-later", days=45, status="SUCCEEDED")
        await _unmatched(s, "taken-resolved-old", days=31, status="SUCCEEDED", outcome="unknown_payment_resolved")
        await _unmatched(s, "taken-resolved-new", days=29, status="SUCCEEDED", outcome="unknown_payment_resolved")
        await _unmatched(s, "failed-old", days=31, status="FAILED")
        await _unmatched(s, "pending-old", days=31, status="PENDING")
        await _unmatched(s, "failed-new", days=29, status="FAILED")

    counted = {p.table: p.count for p in await prune(rt.engine, RetentionPolicy(), dry_run=True)}
    assert counted["provider_events"] == 3
    report = {p.table: p for p in await prune(rt.engine, RetentionPolicy())}
    assert report["provider_events"].count == 3
    assert "not unresolved ones saying money was taken" in report["provider_events"].line(dry_run=False)
    assert await _left(rt) == {"taken-old", "taken-old-resolved-later", "taken-resolved-new", "failed-new"}

    # Once a person has accounted for it, it ages out as the others do.
    async with rt.sessionmaker.begin() as s:
        await resolve_unmatched(s, resolve_later, "credited by hand from MTN's statement",
                                actor=Actor("admin:test", "api"))
    assert {p.table: p.count for p in await prune(rt.engine, RetentionPolicy())}["provider_events"] == 1
    assert await _left(rt) == {"taken-old", "taken-resolved-new", "failed-new"}
