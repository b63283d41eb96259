"""A member's disputes are found through an index: ix_disputes_member on disputes (member_id) WHERE member_id IS NOT
NULL. The support desk lists the disputes of a member who calls about hers (GET /v1/disputes?member=), and
disputes.member_id had no index: each such list read every dispute of the cooperative (of every cooperative for a
super admin's) and kept hers.

Partial: a dispute of a payment no member made (an unregistered number paid) is no entry. A dispute takes its
member once, when it is opened (core.disputes.open_dispute).

Built as 0013's are (migrations.online): CREATE INDEX CONCURRENTLY on PostgreSQL, outside the migration's
transaction; an INVALID leftover of an interrupted build is dropped and built again. SQLite builds it plainly.

Revision ID: 0025
Revises: 0024
"""

from migrations.online import build_indexes, drop_indexes

revision = '0025'
down_revision = '0024'
branch_labels = None
depends_on = None

INDEXES = (('ix_disputes_member', 'disputes', ['member_id']),)
WHERE = {'ix_disputes_member': 'member_id IS NOT NULL'}


def upgrade() -> None:
    build_indexes(INDEXES, WHERE)


def downgrade() -> None:
    drop_indexes(INDEXES)
