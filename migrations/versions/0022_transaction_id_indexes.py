"""A provider's transaction id finds its payment, and its refund: the provider's own id (MTN's financialTransactionId,
Airtel's transaction id, M-Pesa's CheckoutRequestID then its receipt number, IremboPay's invoice number) had no index,
yet every M-Pesa callback finds its payment by it (core.provider_events._find_payment), a refund's callback its refund
(core.refunds._refund_of_event), a statement line recorded (POST /v1/payments/recorded, /outcome) and every completion
probe it (core.transaction_ids.transaction_id_free, _held_elsewhere), a recorded reversal its refund
(core.refunds), and the support desk searches it (GET /v1/payments?gatewayTransactionId=): each read the whole
table (50 to 115 ms at 200,000 payments, EXPLAIN ANALYZE; 0.1 ms with these).

- ix_payments_transaction_id on payments (provider_transaction_id, provider) WHERE provider_transaction_id IS NOT NULL:
  the id first, so that the support desk's search (no provider named) reads it too; partial, as a payment asked for
  has none until the provider answers.
- ix_refunds_transaction_id on refunds (provider_transaction_id) WHERE provider_transaction_id IS NOT NULL: refunds
  carry no provider column (it is their payment's, joined).

Built as 0013's are (migrations.online): CREATE INDEX CONCURRENTLY on PostgreSQL, outside the migration's
transaction; an INVALID leftover of an interrupted build is dropped and built again. SQLite builds them plainly.

Revision ID: 0022
Revises: 0021
"""

from migrations.online import build_indexes, drop_indexes

revision = '0022'
down_revision = '0021'
branch_labels = None
depends_on = None

INDEXES = (
    ('ix_payments_transaction_id', 'payments', ['provider_transaction_id', 'provider']),
    ('ix_refunds_transaction_id', 'refunds', ['provider_transaction_id']),
)
WHERE = {
    'ix_payments_transaction_id': 'provider_transaction_id IS NOT NULL',
    'ix_refunds_transaction_id': 'provider_transaction_id IS NOT NULL',
}


def upgrade() -> None:
    build_indexes(INDEXES, where=WHERE)


def downgrade() -> None:
    drop_indexes(INDEXES)
