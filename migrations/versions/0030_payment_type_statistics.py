"""The planner learns that a payment type belongs to one cooperative: extended statistics st_payments_coop_type
(dependencies) on payments (cooperative_id, payment_type_id), then ANALYZE payments to fill them.

Without them PostgreSQL multiplies the two columns' selectivities as if independent, and estimates a type's payments
at a few rows however many there are (a federation of 300 cooperatives and 900 types: 2 rows for a type of 550, of
25,000 in a large cooperative after two years). The per-member checks of the reminders, the USSD and the BALANCE SMS
(core.reminders.paid_clause: a member's payments of a type for a period) then read ix_payments_coop_type_due on
(cooperative_id, payment_type_id, due_date IS NOT NULL) alone, every payment of the type that ever named a due date,
once per member: the daily reminder fan-out's count of one 637-member cooperative took 500 ms (337,000 heap
visits), all 300 cooperatives' more than its job's 55 s, so the scan was cancelled at each attempt and parked, and
no member was reminded. With them the estimate is the type's own and the same count takes 31 ms (the due date's
range, or the member's payments by ix_payments_member_created); the whole fan-out, 200,000 members, 8.5 s.

CREATE STATISTICS and ANALYZE take SHARE UPDATE EXCLUSIVE on the table: reads and writes go on meanwhile; ANALYZE
reads a sample (30,000 rows), about a second on 2,000,000 payments. PostgreSQL only: SQLite has no such statistics
(and plans these queries by its own rules).

Revision ID: 0030
Revises: 0029
"""

from alembic import op

revision = '0030'
down_revision = '0029'
branch_labels = None
depends_on = None

NAME = 'st_payments_coop_type'


def upgrade() -> None:
    if op.get_bind().dialect.name != 'postgresql':
        return
    op.execute(f'CREATE STATISTICS IF NOT EXISTS {NAME} (dependencies) ON cooperative_id, payment_type_id '
               'FROM payments')
    op.execute('ANALYZE payments')


def downgrade() -> None:
    if op.get_bind().dialect.name != 'postgresql':
        return
    op.execute(f'DROP STATISTICS IF EXISTS {NAME}')
