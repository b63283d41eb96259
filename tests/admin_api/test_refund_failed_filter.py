"""GET /v1/disputes?refundFailed=: what it lists against its definition, on disputes and refunds in every state, and
how PostgreSQL reads it (from the indexes of migration 0043, the disputes listed otherwise asked whether they were
paid back since; not every refund per list, compiled)."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from core.models import Dispute, Refund
from tests.admin_api.conftest import complete_payment, make_payment
from tests.admin_api.test_rare_filters import _plans, _statements
from tests.conftest import requires_pg

STATUSES = ("PENDING", "PROCESSING", "COMPLETED", "FAILED")
DISPUTES = ("OPEN", "UNDER_REVIEW", "RESOLVED", "REJECTED", "WITHDRAWN")


def _refund_failed(dispute: Dispute, refunds: list[Refund]) -> bool:
    """The definition (README, Disputes), asked of one dispute: its own refund FAILED, or it was RESOLVED without one on
    linked refunds that all FAILED; and no refund of its payment made since it was resolved did not fail."""
    by_id = {r.id: r for r in refunds}
    own = dispute.refund_id is not None and dispute.refund_id in by_id and by_id[dispute.refund_id].status == "FAILED"
    linked = [r for r in refunds if r.dispute_id == dispute.id]
    relied = (dispute.status == "RESOLVED" and dispute.refund_id is None and bool(linked)
              and all(r.status == "FAILED" for r in linked))
    paid_back = dispute.resolved_at is not None and any(
        r.payment_id == dispute.payment_id and r.status != "FAILED" and r.created_at > dispute.resolved_at
        for r in refunds)
    return (own or relied) and not paid_back


async def _random_books(rt: Any, demo: dict[str, Any], payments: list[str], seed: int) -> tuple[list[Dispute],
                                                                                             list[Refund]]:
    """Disputes and refunds of `payments` in every state the filter tells apart: own refunds (of another payment
    too, or gone), linked ones (to a dispute of any status), refunds before and after a resolution, at its instant."""
    pick = random.Random(seed)
    start = datetime(2026, 11, 1, tzinfo=UTC)
    disputes, refunds = [], []
    for n in range(40):
        status = pick.choices(DISPUTES, weights=(1, 1, 6, 1, 1))[0]  # (mostly RESOLVED: the ones it tells apart)
        opened = start + timedelta(hours=n)
        resolved = opened + timedelta(hours=pick.randint(1, 20)) if status in ("RESOLVED", "REJECTED") else None
        disputes.append(Dispute(
            id=str(uuid.uuid4()), cooperative_id=demo["cooperative_id"], payment_id=pick.choice(payments),
            reference=f"DSP_T{seed}_{n:03d}", reason="OTHER", status=status, channel="USSD", notes=[],
            created_at=opened, updated_at=resolved or opened, resolved_at=resolved))
    for n in range(90):
        dispute = pick.choice(disputes + [None] * 20)
        payment = dispute.payment_id if dispute is not None and pick.random() < 0.8 else pick.choice(payments)
        when = pick.random()
        if dispute is None:  # mostly before the disputes of its payment were resolved, a few since
            made = start + timedelta(hours=pick.randint(0, 5) if when < 0.8 else pick.randint(0, 70))
        elif dispute.resolved_at is not None and when < 0.3:  # at its resolution's instant (not "since"), or since
            made = dispute.resolved_at + timedelta(hours=0 if when < 0.15 else pick.randint(1, 10))
        else:  # while it was open, or before it was
            made = dispute.created_at + timedelta(hours=pick.randint(-5, 1))
        refunds.append(Refund(
            id=str(uuid.uuid4()), cooperative_id=demo["cooperative_id"], payment_id=payment,
            reference=f"RFD_T{seed}_{n:03d}", amount_minor=100, currency="RWF",
            status=pick.choices(STATUSES, (1, 1, 2, 4))[0],  # (mostly FAILED, or the lists hold few)
            idempotency_key=f"random-{seed}-{n}", provider_reference=f"random-{seed}-{n}",
            dispute_id=dispute.id if dispute is not None and pick.random() < 0.6 else None,
            created_at=made, updated_at=made))
    for dispute in disputes:  # a resolution's own refund: one linked to it mostly, else any, or one since erased
        if dispute.status == "RESOLVED" and pick.random() < 0.5:
            linked = [r.id for r in refunds if r.dispute_id == dispute.id]
            dispute.refund_id = (pick.choice(linked) if linked and pick.random() < 0.8
                                 else pick.choice([r.id for r in refunds] + [str(uuid.uuid4())]))
    async with rt.sessionmaker.begin() as s:
        s.add_all(disputes + refunds)
    return disputes, refunds


async def test_refund_failed_lists_what_its_definition_says_on_random_books(admin, superadmin, rt, demo):
    """Both answers, for a cooperative's admin and a super admin, against the definition asked of each dispute."""
    payments = []
    for _ in range(8):
        payment = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
        await complete_payment(rt, payment["id"])
        payments.append(payment["id"])
    disputes, refunds = [], []
    for seed in range(3):
        more = await _random_books(rt, demo, payments, seed)
        disputes, refunds = disputes + more[0], refunds + more[1]
        expected = {d.id for d in disputes if _refund_failed(d, refunds)}
        assert 3 <= len(expected) <= len(disputes) - 3, (seed, len(expected))  # (the books tell both apart)
        for caller in (admin, superadmin):
            for flag, found in (("true", expected), ("false", {d.id for d in disputes} - expected)):
                listed: list[str] = []
                for page in (1, 2):
                    answer = await caller.json("GET", f"/v1/disputes?refundFailed={flag}&limit=100&page={page}", 200)
                    listed += [d["id"] for d in answer["data"]]
                assert len(listed) == len(set(listed)) and set(listed) == found, (seed, flag)


@requires_pg
async def test_refund_failed_reads_indexes_and_asks_only_the_disputes_listed_whether_they_were_paid_back(
        admin, rt, demo):
    """At 100,000 disputes and 400,000 refunds the list took 0.15-0.7 s: PostgreSQL read the whole refunds table for
    the FAILED ones, for the linked ones and for every one that did not fail (hashed), planned ?refundFailed=false as
    asking each dispute in turn whether it was paid back since, and compiled the query (JIT) on that estimate. Its
    count and its page read the indexes of migration 0043 (sequential scans ruled out: a missing index shows on a
    small table), and ?refundFailed=false is the disputes but the listed ones (an anti-join)."""
    payment = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    await complete_payment(rt, payment["id"])
    await _random_books(rt, demo, [payment["id"]], 7)
    for flag in ("true", "false"):
        with _statements(rt) as seen:
            await admin.json("GET", f"/v1/disputes?refundFailed={flag}", 200)
        lists = [(sql, parameters) for sql, parameters in seen if "FROM disputes" in sql and "refunds" in sql]
        assert len(lists) == 2, seen  # its count and its page
        for plan in await _plans(rt, lists, custom=True):
            for index in ("ix_refunds_failed", "ix_refunds_dispute_status", "ix_refunds_payment_unfailed"):
                assert index in plan, (flag, index, plan)
            if flag == "false":
                assert "Anti Join" in plan, plan
