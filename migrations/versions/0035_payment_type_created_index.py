"""A payment type's payments are found through an index: ix_payments_type_created on payments (payment_type_id,
created_at, cooperative_id). GET /v1/payments?paymentTypeId=<a type> (a cooperative admin's "who paid the rent",
newest first) had no index naming the type but 0027's, partial (payments naming a due date): its count read every
payment (a sequential scan, since it counts up to COUNT_CAP matches and a type has fewer), and its page walked the
cooperative's payments (a super admin's: everyone's) from the newest until twenty matched, all of them for a type
not paid lately (EXPLAIN ANALYZE, 400,000 payments of 4 cooperatives, 8 types each: the count of a type with 316
payments 94-118 ms, 2,044 payments 86-123 ms, with status=COMPLETED 97-112 ms; its page 6-9 ms, 10-12 ms with the
status; with the index 0.1-1 ms for the count and 0.04-0.13 ms for the page, a cooperative admin's or a super
admin's, as PostgreSQL plans the statement or caches it (generic); the count with a status 8-10 ms in a cached
plan, which joins the status index in).

The type leads: a super admin's list names the type alone and reads it in created_at order. cooperative_id comes
last: a type is one cooperative's, so a cooperative admin's list (its cooperative and the type) reads the same
entries, in the same order, its count from the index alone (with the cooperative second, a super admin's page
would sort the type's payments or walk ix_payments_created again). Not partial: every payment names a type, so
each payment's insert writes it, one of the table's nineteen indexes: on loops of single-row inserts (runs of 3,000
to 20,000, with and without it in turn, on the shared 2-core host) the difference stayed within the host's noise
(medians 7% less to 40% more, the fastest runs 83 and 93 µs an insert), its WAL about a tenth more (2.0 to 2.2 kB
an insert); 43 MB at 400,000 payments (the table 231 MB, its other indexes 417 MB).

Built as 0013's are (migrations.online): CREATE INDEX CONCURRENTLY on PostgreSQL, outside the migration's
transaction; an INVALID leftover of an interrupted build is dropped and built again. SQLite builds it plainly.

Revision ID: 0035
Revises: 0034
"""

from migrations.online import build_indexes, drop_indexes

revision = '0035'
down_revision = '0034'
branch_labels = None
depends_on = None

INDEXES = (('ix_payments_type_created', 'payments', ['payment_type_id', 'created_at', 'cooperative_id']),)


def upgrade() -> None:
    build_indexes(INDEXES)


def downgrade() -> None:
    drop_indexes(INDEXES)
