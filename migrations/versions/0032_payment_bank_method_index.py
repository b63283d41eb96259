"""A bank method's payments are found through an index: ix_payments_bank_method on payments (method, cooperative_id,
created_at) WHERE method IN ('BANK_BK', 'BANK_IM', 'BANK_ECOBANK'). GET /v1/payments?paymentMethod=<a bank method>
(newest first) had no index naming the method: its count read every payment (a sequential scan, since it counts up to
COUNT_CAP matches and a bank method has fewer), and its page walked a cooperative's payments from the newest until
twenty matched, all of them when the cooperative has none of that method (EXPLAIN ANALYZE, 400,000 payments, 0.5%
BANK_ECOBANK: the count 153 to 160 ms, a cooperative's page 7 ms, 147 ms for a method it never used; 0.1 to 1 ms
with it, for the count and the page, a cooperative admin's or a super admin's).

Partial: only bank payments (IremboPay, asked for through the API: USSD offers the payer's wallet) are entries, a few
in a hundred, so the payment path's inserts (every USSD and wallet payment, the callbacks' updates, which never
change method, cooperative_id or created_at) leave it alone. A wallet method is most of a deployment's payments, and
its list fills a page at once by ix_payments_coop_created. The list names the method inline in its SQL
(admin_api.payments.filtered), so that a cached generic plan proves the predicate too.

Built as 0013's are (migrations.online): CREATE INDEX CONCURRENTLY on PostgreSQL, outside the migration's
transaction; an INVALID leftover of an interrupted build is dropped and built again. SQLite builds it plainly.

Revision ID: 0032
Revises: 0031
"""

from migrations.online import build_indexes, drop_indexes

revision = '0032'
down_revision = '0031'
branch_labels = None
depends_on = None

INDEXES = (('ix_payments_bank_method', 'payments', ['method', 'cooperative_id', 'created_at']),)
# core.payments.BANK_METHODS, as they are at this revision (a bank method added later needs a migration of its own).
WHERE = {'ix_payments_bank_method': "method IN ('BANK_BK', 'BANK_IM', 'BANK_ECOBANK')"}


def upgrade() -> None:
    build_indexes(INDEXES, WHERE)


def downgrade() -> None:
    drop_indexes(INDEXES)
