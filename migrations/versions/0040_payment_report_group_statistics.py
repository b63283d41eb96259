"""The planner learns how many groups the reconciliation's payment figures make: extended statistics
st_payments_report_groups (ndistinct) on payments (status, method, payment_type_id, currency, provider), the keys
core.reports.reconciliation groups a period's payments by, then ANALYZE payments to fill them.

Without them PostgreSQL multiplies the columns' distinct counts as if independent (a type is of one cooperative and
one currency, a method of one provider): a super admin's year over 1,000,000 payments of 200 cooperatives and 1,000
types was estimated at 802,152 groups for 35,205. It then sorted every payment (spilling about 100 MB to disk) instead
of hashing them, and the plan's cost passed PostgreSQL's JIT thresholds, whose compilation took seconds of its own.
With them the estimate is 88,008 groups, JIT is a fraction of a second, and the report took 2.8-3.9 s against
4.0-6.0 s without (alternating runs on the shared 2-core host, PostgreSQL 15); one cooperative's month is unchanged
(35-65 ms either way).

CREATE STATISTICS and ANALYZE take SHARE UPDATE EXCLUSIVE on the table: reads and writes go on meanwhile; ANALYZE
reads a sample (30,000 rows). ndistinct statistics on columns are PostgreSQL 10's: every version the gateway runs on.
PostgreSQL only: SQLite has no such statistics (and plans the report by its own rules).

On both databases, the same release compares a webhook domain that is an IP address in its canonical form
(core.webhooks.canonical_host: `fd00:0::5` is `fd00::5`), where the previous one compared it as typed: an IPv6 domain
approved as typed otherwise would match none of its endpoints after the upgrade (their events not recorded). Such a
domain is rewritten in its canonical form here, unless the cooperative has asked for that form too (that row then
decides, as it will). A downgrade leaves them canonical.

Revision ID: 0040
Revises: 0039
"""

import ipaddress

import sqlalchemy as sa
from alembic import op

revision = '0040'
down_revision = '0039'
branch_labels = None
depends_on = None

NAME = 'st_payments_report_groups'


def upgrade() -> None:
    _canonical_ip_domains()
    if op.get_bind().dialect.name != 'postgresql':
        return
    op.execute(f'CREATE STATISTICS IF NOT EXISTS {NAME} (ndistinct) ON status, method, payment_type_id, currency, '
               'provider FROM payments')
    op.execute('ANALYZE payments')


def downgrade() -> None:
    if op.get_bind().dialect.name != 'postgresql':
        return
    op.execute(f'DROP STATISTICS IF EXISTS {NAME}')


def _canonical_ip_domains() -> None:
    bind = op.get_bind()
    # (An IPv4 address has one written form that the gateway ever stored: only IPv6 ones, with their colons.)
    rows = bind.execute(sa.text("SELECT id, cooperative_id, domain FROM approved_domains WHERE domain LIKE '%:%'")).all()
    for row_id, cooperative_id, domain in rows:
        try:
            canonical = str(ipaddress.ip_address(domain))
        except ValueError:
            continue
        if canonical == domain:
            continue
        taken = bind.execute(sa.text("SELECT 1 FROM approved_domains WHERE cooperative_id = :c AND domain = :d"),
                             {"c": cooperative_id, "d": canonical}).first()
        if taken is None:
            bind.execute(sa.text("UPDATE approved_domains SET domain = :d WHERE id = :i"), {"d": canonical, "i": row_id})
