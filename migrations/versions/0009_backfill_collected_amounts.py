"""What a provider took, for payments recorded before the gateway kept it (collected_minor, completed_at).

Migration 0002 added `collected_minor` empty, and an empty value reads as "the whole amount was taken"
(core.refunds.collected). Two kinds of payment recorded by earlier releases were left wrong by that:

- underpaid or overpaid (`mismatch`, "provider reported 40,000 RWF, expected 50,000 RWF"): the API said
  50,000 collected and a refund of 50,000 was accepted, paying back money never received;
- money reported taken after the payment FAILED (`payment.success_after_failure`): no `completed_at`, so the
  refund the README promises was refused.

Each is filled from the audit log, which recorded both when they happened: the latest
`payment.amount_mismatch` event's `reported` amount (0 when reported in another currency: a person must
look, as the current code records it), and the first `payment.success_after_failure` event's time with the
payment's amount (those releases did not record the amount taken; the current code assumes the same).
Rows already filled are left alone, so running it again, or after a downgrade to 0001 and back, gives the
same result. Downgrading changes nothing (0002's downgrade drops the column).

Revision ID: 0009
Revises: 0008
"""

import json
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

import core.db

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql')
payments = sa.table(
    'payments',
    sa.column('id', sa.String(36)),
    sa.column('status', sa.String(24)),
    sa.column('amount_minor', sa.BigInteger),
    sa.column('currency', sa.String(3)),
    sa.column('mismatch', sa.Boolean),
    sa.column('collected_minor', sa.BigInteger),
    sa.column('completed_at', core.db.UTCDateTime()),
)
audit = sa.table(
    'audit_events',
    sa.column('entity_type', sa.String(32)),
    sa.column('entity_id', sa.String(64)),
    sa.column('action', sa.String(64)),
    sa.column('after', JSON),
    sa.column('at', core.db.UTCDateTime()),
)
COLLECTED = ('COMPLETED', 'PARTIALLY_REFUNDED', 'REFUNDED')


def _events(bind: Any, action: str, ids: list[str]) -> dict[str, list[tuple[Any, dict[str, Any]]]]:
    """Each payment's audit events of `action`, oldest first: (at, after)."""
    found: dict[str, list[tuple[Any, dict[str, Any]]]] = {}
    for start in range(0, len(ids), 500):
        rows = bind.execute(sa.select(audit.c.entity_id, audit.c.at, audit.c.after).where(
            audit.c.entity_type == 'payment', audit.c.action == action,
            audit.c.entity_id.in_(ids[start:start + 500])).order_by(audit.c.at))
        for entity_id, at, after in rows:
            if isinstance(after, str):
                after = json.loads(after)
            found.setdefault(entity_id, []).append((at, after or {}))
    return found


def upgrade() -> None:
    bind = op.get_bind()
    mismatched = {row.id: row for row in bind.execute(sa.select(payments).where(
        payments.c.mismatch.is_(True), payments.c.collected_minor.is_(None), payments.c.status.in_(COLLECTED)))}
    reported = _events(bind, 'payment.amount_mismatch', list(mismatched))
    for payment_id, events in reported.items():
        after = events[-1][1]
        if not isinstance(after.get('reported'), int):
            continue
        payment = mismatched[payment_id]
        same = after.get('reportedCurrency', payment.currency) == payment.currency
        bind.execute(payments.update().where(payments.c.id == payment_id, payments.c.collected_minor.is_(None))
                     .values(collected_minor=after['reported'] if same else 0))

    failed = {row.id: row for row in bind.execute(sa.select(payments).where(
        payments.c.status == 'FAILED', payments.c.completed_at.is_(None), payments.c.collected_minor.is_(None)))}
    taken = _events(bind, 'payment.success_after_failure', list(failed))
    for payment_id, events in taken.items():
        bind.execute(payments.update().where(payments.c.id == payment_id, payments.c.completed_at.is_(None))
                     .values(collected_minor=failed[payment_id].amount_minor, completed_at=events[0][0]))


def downgrade() -> None:
    pass  # the filled values are right for 0002-0008 too; 0002's downgrade drops the column
