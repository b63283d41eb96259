"""A payment's SMS found by their key's prefix: GET /v1/payments/{id}/messages (admin_api.messages) lists the texts
about a payment by their idempotency keys, which carry its id: "<template>:<payment id>" (its receipt and updates,
found by the key's unique index), "reply:<payment id>:<origin>" (a RECEIPT or STATUS keyword's reply, a receipt the
support desk sent again) and "ussd-receipt:<payment id>:<session>" (a receipt asked for on USSD), found with LIKE.

- ix_sms_messages_key_prefix on sms_messages (idempotency_key text_pattern_ops). PostgreSQL answers LIKE 'prefix%'
  from a btree only when the index compares in byte order: the unique index compares in the database's collation
  (en_US.UTF-8, C.UTF-8: not "C" to the planner), so each look-up read the whole table (the texts are kept for
  good; ~110 ms at 100,000 rows, 0.3 ms with this index). On SQLite (the embedded default) a plain index of the
  column, as the model declares it there.

Built as 0013's are (migrations.online): CREATE INDEX CONCURRENTLY on PostgreSQL, outside the migration's
transaction; an INVALID leftover of an interrupted build is dropped and built again.

Revision ID: 0021
Revises: 0020
"""

from migrations.online import build_indexes, drop_indexes

revision = '0021'
down_revision = '0020'
branch_labels = None
depends_on = None

INDEXES = (('ix_sms_messages_key_prefix', 'sms_messages', ['idempotency_key']),)
OPS = {'ix_sms_messages_key_prefix': {'idempotency_key': 'text_pattern_ops'}}


def upgrade() -> None:
    build_indexes(INDEXES, ops=OPS)


def downgrade() -> None:
    drop_indexes(INDEXES)
