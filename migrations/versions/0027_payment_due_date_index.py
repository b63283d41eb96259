"""A period's payments that name their due date are found through an index: ix_payments_coop_type_due on payments
(cooperative_id, payment_type_id, due_date) WHERE due_date IS NOT NULL. The dues report (GET /v1/reports/dues,
dues.csv: core.reminders.period_money) reads the payments of one period of a type: those naming its due date (an API
payment's dueDate) or, naming none, made between the period's bounds (core.reminders.paid_clause). The second half
has ix_payments_coop_created; the first had no index, so each report read every payment of the cooperative, of
every type and period, and kept the period's (EXPLAIN ANALYZE, 240,000 payments, 60,000 of the cooperative: a
page and the totals each 57 to 60 ms and 2,165 buffers; 4 to 9 ms and 85 buffers with it, a BitmapOr of this index
and ix_payments_coop_created).

Partial: a payment naming no due date (every USSD payment, most API ones) is no entry, so the payment path's
inserts mostly leave it alone.

Built as 0013's are (migrations.online): CREATE INDEX CONCURRENTLY on PostgreSQL, outside the migration's
transaction; an INVALID leftover of an interrupted build is dropped and built again. SQLite builds it plainly.

Revision ID: 0027
Revises: 0026
"""

from migrations.online import build_indexes, drop_indexes

revision = '0027'
down_revision = '0026'
branch_labels = None
depends_on = None

INDEXES = (('ix_payments_coop_type_due', 'payments', ['cooperative_id', 'payment_type_id', 'due_date']),)
WHERE = {'ix_payments_coop_type_due': 'due_date IS NOT NULL'}


def upgrade() -> None:
    build_indexes(INDEXES, WHERE)


def downgrade() -> None:
    drop_indexes(INDEXES)
