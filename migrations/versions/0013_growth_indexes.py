"""Indexes for the queries that read a whole table with a year of traffic: the payment sync, the flagged-payment
lists, the audit log's actor and action filters, and the SMS text pruning.

- payments (cooperative_id, updated_at, id): a cooperative's sync (`GET /v1/payments?updatedFrom=` / `after=`) reads
  `cooperative_id = ? AND updated_at >= ? AND updated_at < horizon` in (updated_at, id) order: the page is the next
  `limit` entries and the count (capped, admin_api.common) a range of the index. Without it every page read every
  payment of the gateway (ix_payments_updated holds all cooperatives' changes; 0010 judged the pair not worth a
  third index on the payment path before the sync existed). A super admin's sync has ix_payments_updated.
- payments (cooperative_id, created_at) WHERE mismatch IS true, and the same WHERE late IS true: the lists an
  operator is told to check (`mismatch=true`, `late=true`), newest first. Flagged payments are few, so the two
  indexes are small and written only when a payment is flagged; a super admin's list reads one whole. The
  predicate is the list's own filter (`IS true`, as SQLAlchemy writes `is_(True)`), so the planner can prove it.
- audit_events (cooperative_id, actor, at), (cooperative_id, action, at): a cooperative admin's log filtered by
  actor or action, newest first; (actor, at), (action, at): a super admin's, across cooperatives (PostgreSQL 15
  has no skip scan, so the scoped index cannot serve it). The single-column (cooperative_id) index of 0001 goes:
  both scoped composites begin with it (as 0011 dropped payments' and others'), so a row costs three index
  writes more, not four.
- sms_messages (created_at) WHERE body <> '': the rows whose text `main.py prune` still has to empty, by age, the
  order it walks them in (core.retention). It walked ix_sms_messages_created from the oldest SMS on each run,
  reading again every row whose text an earlier run had emptied; a row leaves this index when its text is emptied.
  (created_at) alone, as ix_sms_messages_created is: the planner, which cannot know that the emptied rows are the
  old ones, then prefers the smaller index. An SMS's status updates do not change `body` and stay HOT.

- refunds (created_at), (completed_at): a super admin's refunds export (refunds.csv, either basis) across
  cooperatives, read in keyset batches by (moment, id) (core.reports): without them each batch of 500 read and
  sorted the whole table. Refunds are few and written rarely. (A super admin's payments export by completion
  has no such index: a payment's index writes are on the payment path; it reads its batches slower.)

Built as 0004's and 0010's are: CREATE INDEX CONCURRENTLY on PostgreSQL, outside the migration's transaction (an
INVALID leftover of an interrupted build is dropped and built again); the dropped index goes with DROP INDEX
CONCURRENTLY, after the composites that cover it are built. Each build reads its table twice while writes go on:
on a year of traffic (1.8M audit rows, 600k payments, 900k SMS) the revision took 66 s on two busy shared cores,
and the indexes take about 550 MB (the four audit ones 415 MB of it, less the 0001 index dropped). SQLite builds
them plainly, the partial ones with the same predicate.

Revision ID: 0013
Revises: 0012
"""

from migrations.online import build_indexes, drop_indexes

revision = '0013'
down_revision = '0012'
branch_labels = None
depends_on = None


# (name, table, columns), in build order.
INDEXES = (
    ('ix_payments_coop_updated', 'payments', ['cooperative_id', 'updated_at', 'id']),
    ('ix_payments_coop_mismatch', 'payments', ['cooperative_id', 'created_at']),
    ('ix_payments_coop_late', 'payments', ['cooperative_id', 'created_at']),
    ('ix_audit_events_coop_actor', 'audit_events', ['cooperative_id', 'actor', 'at']),
    ('ix_audit_events_coop_action', 'audit_events', ['cooperative_id', 'action', 'at']),
    ('ix_audit_events_actor', 'audit_events', ['actor', 'at']),
    ('ix_audit_events_action', 'audit_events', ['action', 'at']),
    ('ix_sms_messages_body_kept', 'sms_messages', ['created_at']),
    ('ix_refunds_created', 'refunds', ['created_at']),
    ('ix_refunds_completed', 'refunds', ['completed_at']),
)
# The partial ones' predicates (PostgreSQL and SQLite alike).
WHERE = {
    'ix_payments_coop_mismatch': 'mismatch IS true',
    'ix_payments_coop_late': 'late IS true',
    'ix_sms_messages_body_kept': "body <> ''",
}
# Revision 0001's name: covered by ix_audit_events_coop_actor and ix_audit_events_coop_action.
DROPPED = (('ix_audit_events_cooperative_id', 'audit_events', ['cooperative_id']),)


def upgrade() -> None:
    build_indexes(INDEXES, WHERE)
    drop_indexes(DROPPED)


def downgrade() -> None:
    build_indexes(DROPPED)
    drop_indexes(INDEXES)
