"""The USSD sweep reads the sessions still open alone: ix_ussd_sessions_open on ussd_sessions (started_at) WHERE
status = 'OPEN'.

The worker's sweep (ussd.sessions.sweep every 5 minutes: channels.ussd.records.close_abandoned) closes the sessions
no aggregator reported ended, asking for `status = 'OPEN' AND started_at < :before [AND started_at >= :since] ORDER
BY started_at LIMIT :batch`. Through ix_ussd_sessions_started it read every session of its window (a day) and kept
the few OPEN ones, and the day's first sweep (and a worker's first), which has no window, read the whole table (90
days of sessions), each of its batches: 0.43 s at 2 million rows. This partial index holds the OPEN rows only (a
session is OPEN for minutes; the ended ones are nearly all of the table) in started_at order: a sweep reads the rows
it closes and stops (EXPLAIN ANALYZE, 2 million ended sessions and 300 OPEN: the day's first sweep's batch 260 ms, a
sequential scan of 36,000 pages, and 7 ms with it, most of it the UPDATE; a windowed one's 10 ms and 5 ms).

Keyed as the sweep reads them, by started_at alone: its batches go on from the latest start the one before closed,
and the id would make every entry larger for nothing (each row is read from the table anyway, to be locked). The
sweep writes the predicate out (`status = 'OPEN'`, not bound): a plan PostgreSQL reuses uses the index too.

Built as 0013's are (migrations.online): CREATE INDEX CONCURRENTLY on PostgreSQL, outside the migration's
transaction; an INVALID leftover of an interrupted build is dropped and built again. SQLite builds it plainly (its
sweep has the same shape).

Revision ID: 0028
Revises: 0027
"""

from migrations.online import build_indexes, drop_indexes

revision = '0028'
down_revision = '0027'
branch_labels = None
depends_on = None

INDEXES = (('ix_ussd_sessions_open', 'ussd_sessions', ['started_at']),)
WHERE = {'ix_ussd_sessions_open': "status = 'OPEN'"}


def upgrade() -> None:
    build_indexes(INDEXES, WHERE)


def downgrade() -> None:
    drop_indexes(INDEXES)
