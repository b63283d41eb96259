"""`main.py prune` and callbacks for no payment of ours: one saying money was taken stays, however old, until a
person has resolved it (it is the only record of a member's money at the provider); resolved ones and those
reporting no money taken go after RETENTION_UNKNOWN_CALLBACKS_DAYS as before. One under which money may have moved
(AMBIGUOUS, PENDING) stays until resolved too: only a final word that none moved (FAILED, EXPIRED, CANCELLED) ages
out unresolved.

Callbacks for no refund of ours (outcome "unknown_refund") the same: one saying the refund was paid out (money out of
the cooperative's account) stays until resolved. Before, their outcome was never set and none was ever pruned."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import insert, select

from core.audit import Actor
from core.models import ProviderEvent
from core.retention import UNKNOWN_CALLBACKS, UNKNOWN_CALLBACKS_RESOLVED, RetentionPolicy, prune
from core.unmatched_callbacks import RESOLVED_OF, UNMATCHED_OF, resolve_unmatched
from tests.core.test_retention import _ago


async def _unmatched(s: Any, name: str, *, days: float, status: str, outcome: str | None = "unknown_payment",
                     kind: str = "collection") -> str:
    row_id = str(uuid.uuid4())
    await s.execute(insert(ProviderEvent).values(
        id=row_id, provider="mtn_momo", event_id=name, payment_id=None, kind=kind, status=status,
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
    assert counted["provider_events"] == 2
    report = {p.table: p for p in await prune(rt.engine, RetentionPolicy())}
    assert report["provider_events"].count == 2
    assert "not unresolved ones saying money was taken" in report["provider_events"].line(dry_run=False)
    # PENDING: the member may have approved after it (test_money_that_may_have_moved_stays_until_resolved).
    assert await _left(rt) == {"taken-old", "taken-old-resolved-later", "taken-resolved-new", "failed-new",
                               "pending-old"}

    # Once a person has accounted for it, it ages out as the others do.
    async with rt.sessionmaker.begin() as s:
        await resolve_unmatched(s, resolve_later, "credited by hand from MTN's statement",
                                actor=Actor("admin:test", "api"))
    assert {p.table: p.count for p in await prune(rt.engine, RetentionPolicy())}["provider_events"] == 1
    assert await _left(rt) == {"taken-old", "taken-resolved-new", "failed-new", "pending-old"}


async def test_a_refund_paid_out_for_no_refund_stays_until_resolved(rt: Any) -> None:
    async with rt.sessionmaker.begin() as s:
        for name, days, status, outcome in (
                ("paid-old", 400, "SUCCEEDED", "unknown_refund"),
                ("paid-old-resolved-later", 45, "SUCCEEDED", "unknown_refund"),
                ("paid-resolved-old", 31, "SUCCEEDED", "unknown_refund_resolved"),
                ("paid-resolved-new", 29, "SUCCEEDED", "unknown_refund_resolved"),
                ("refund-failed-old", 31, "FAILED", "unknown_refund"),
                ("refund-failed-new", 29, "FAILED", "unknown_refund")):
            row_id = await _unmatched(s, name, days=days, status=status, outcome=outcome, kind="refund")
            if name == "paid-old-resolved-later":
                resolve_later = row_id
        # A refund callback of a known refund (its outcome never set) is the money trail: never pruned.
        await _unmatched(s, "known-refund-old", days=400, status="SUCCEEDED", outcome=None, kind="refund")

    assert {p.table: p.count for p in await prune(rt.engine, RetentionPolicy(), dry_run=True)}[
        "provider_events"] == 2
    assert {p.table: p.count for p in await prune(rt.engine, RetentionPolicy())}["provider_events"] == 2
    assert await _left(rt) == {"paid-old", "paid-old-resolved-later", "paid-resolved-new", "refund-failed-new",
                               "known-refund-old"}

    async with rt.sessionmaker.begin() as s:
        resolved = await resolve_unmatched(s, resolve_later, "paid back per MTN's statement, booked by hand",
                                           actor=Actor("admin:test", "api"))
    assert resolved.outcome == "unknown_refund_resolved"
    assert {p.table: p.count for p in await prune(rt.engine, RetentionPolicy())}["provider_events"] == 1
    assert await _left(rt) == {"paid-old", "paid-resolved-new", "refund-failed-new", "known-refund-old"}


def test_prune_names_the_outcomes_core_payments_gives() -> None:
    # core.retention spells them itself (prune reads no payment code); they must stay the same strings.
    assert set(UNKNOWN_CALLBACKS) == set(RESOLVED_OF) == set(UNMATCHED_OF.values())
    assert set(UNKNOWN_CALLBACKS_RESOLVED) == set(RESOLVED_OF.values())


async def test_money_that_may_have_moved_stays_until_resolved(rt: Any) -> None:
    # AMBIGUOUS (the provider could not tell) and PENDING (the member may approve after it, and its final callback
    # may never come) callbacks for no payment or refund of ours: money may have moved, and nothing of ours will
    # ever ask the provider about them (no payment polls). Only a final word that no money moved (FAILED, EXPIRED,
    # CANCELLED) ages out unresolved.
    async with rt.sessionmaker.begin() as s:
        resolve_later = await _unmatched(s, "ambiguous-old", days=400, status="AMBIGUOUS")
        await _unmatched(s, "pending-old", days=400, status="PENDING")
        await _unmatched(s, "refund-ambiguous-old", days=400, status="AMBIGUOUS", outcome="unknown_refund",
                         kind="refund")
        await _unmatched(s, "refund-pending-old", days=400, status="PENDING", outcome="unknown_refund", kind="refund")
        for status in ("FAILED", "EXPIRED", "CANCELLED"):
            await _unmatched(s, f"{status.lower()}-old", days=31, status=status)
            await _unmatched(s, f"refund-{status.lower()}-old", days=31, status=status, outcome="unknown_refund",
                             kind="refund")

    assert {p.table: p.count for p in await prune(rt.engine, RetentionPolicy(), dry_run=True)}[
        "provider_events"] == 6
    assert {p.table: p.count for p in await prune(rt.engine, RetentionPolicy())}["provider_events"] == 6
    assert await _left(rt) == {"ambiguous-old", "pending-old", "refund-ambiguous-old", "refund-pending-old"}

    # Resolved, it ages out as the others do.
    async with rt.sessionmaker.begin() as s:
        await resolve_unmatched(s, resolve_later, "MTN's statement shows no debit for it",
                                actor=Actor("admin:test", "api"))
    assert {p.table: p.count for p in await prune(rt.engine, RetentionPolicy())}["provider_events"] == 1
    assert await _left(rt) == {"pending-old", "refund-ambiguous-old", "refund-pending-old"}
