"""Indexes for reading a member's SMS and USSD session rows: erasing a member (core.members.erase_member) clears
her number from them by member_id (or by her number's blind index, already indexed), and neither table had an
index on member_id, so each erasure read both whole tables (90 days of USSD sessions: millions of rows) inside
the transaction that holds her payments locked, and failed at the statement timeout on a large deployment.

- sms_messages (member_id) WHERE member_id IS NOT NULL;
- ussd_sessions (member_id) WHERE member_id IS NOT NULL.

Partial: texts and sessions of no member (unregistered numbers) are no entry. An SMS is written once with its
member; a session row takes its member when it is written or closed.

Built as 0013's are (migrations.online): CREATE INDEX CONCURRENTLY on PostgreSQL, outside the migration's
transaction, an INVALID leftover of an interrupted build dropped and built again; SQLite builds them plainly.

Revision ID: 0018
Revises: 0017
"""

from migrations.online import build_indexes, drop_indexes

revision = '0018'
down_revision = '0017'
branch_labels = None
depends_on = None


# (name, table, columns), in build order.
INDEXES = (
    ('ix_sms_messages_member', 'sms_messages', ['member_id']),
    ('ix_ussd_sessions_member', 'ussd_sessions', ['member_id']),
)
WHERE = {name: 'member_id IS NOT NULL' for name, _table, _columns in INDEXES}


def upgrade() -> None:
    build_indexes(INDEXES, WHERE)


def downgrade() -> None:
    drop_indexes(INDEXES)
