"""Indexes for the reads that still went through a whole table as it grows: the reminder scan's member chunks, a
cooperative admin's member list, and a super admin's payments export by completion.

- members (cooperative_id, id): the reminder scan reads a cooperative's members CHUNK (500) at a time in id order
  after the last one read (core.reminders). The only index beginning with cooperative_id was the unique
  (cooperative_id, phone_index): each chunk read and sorted all the cooperative's members, or walked the primary key
  through every cooperative's. Members are written rarely (sign-up, a status change): no cost on the payment path.
- members (cooperative_id, name, id): a cooperative's member list (`GET /v1/members`) sorted by name, page after
  page; each page sorted the whole cooperative to find its 50.
- payments (completed_at) WHERE completed_at IS NOT NULL: a super admin's payments export by completion
  (`payments.csv?basis=completed`, the lines behind the reconciliation) read in keyset batches by (completed_at, id)
  across cooperatives (core.reports): each batch of 500 read and sorted every payment of the gateway. Partial: a
  payment enters it when its money moves, an UPDATE that already writes ix_payments_coop_completed (not HOT), so
  the payment path pays one index entry per collected payment and nothing at its INSERT.

Built as 0013's are (migrations.online): CREATE INDEX CONCURRENTLY on PostgreSQL, outside the migration's
transaction, an INVALID leftover of an interrupted build dropped and built again; SQLite builds them plainly.

Revision ID: 0014
Revises: 0013
"""

from migrations.online import build_indexes, drop_indexes

revision = '0014'
down_revision = '0013'
branch_labels = None
depends_on = None


# (name, table, columns), in build order.
INDEXES = (
    ('ix_members_coop_id', 'members', ['cooperative_id', 'id']),
    ('ix_members_coop_name', 'members', ['cooperative_id', 'name', 'id']),
    ('ix_payments_completed', 'payments', ['completed_at']),
)
WHERE = {'ix_payments_completed': 'completed_at IS NOT NULL'}


def upgrade() -> None:
    build_indexes(INDEXES, WHERE)


def downgrade() -> None:
    drop_indexes(INDEXES)
