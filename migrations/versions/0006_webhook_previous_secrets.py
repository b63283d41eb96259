"""Webhook endpoints keep every secret a rotation replaced while its overlap lasts, not only the last one:
rotating twice within an overlap used to stop the first secret early, and a receiver still on it refused
every event. The one previous secret (previous_secret_enc, previous_secret_expires_at) moves into a list,
newest first, of {"secret_enc", "expires_at"} (core.webhooks.previous_secret); an expired one is dropped.

Downgrading keeps only the newest previous secret still signing (all the old columns can hold): the earlier
ones stop signing at once.

Revision ID: 0006
Revises: 0005
"""

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

import core.db

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql')
# The table as both sides of the move see it; the same types as the models (UTC-aware on SQLite too).
endpoints = sa.table(
    'webhook_endpoints',
    sa.column('id', sa.String(36)),
    sa.column('previous_secret_enc', sa.String(255)),
    sa.column('previous_secret_expires_at', core.db.UTCDateTime(timezone=True)),
    sa.column('previous_secrets', JSON),
)


def upgrade() -> None:
    with op.batch_alter_table('webhook_endpoints') as batch:
        batch.add_column(sa.Column('previous_secrets', JSON, nullable=True))
    bind = op.get_bind()
    now = datetime.now(UTC)
    rows = bind.execute(
        sa.select(endpoints.c.id, endpoints.c.previous_secret_enc, endpoints.c.previous_secret_expires_at).where(
            endpoints.c.previous_secret_enc.is_not(None), endpoints.c.previous_secret_expires_at > now
        )
    ).all()
    for row_id, secret_enc, until in rows:
        entry = {"secret_enc": secret_enc, "expires_at": until.astimezone(UTC).isoformat()}
        bind.execute(endpoints.update().where(endpoints.c.id == row_id).values(previous_secrets=[entry]))
    bind.execute(endpoints.update().where(endpoints.c.previous_secrets.is_(None)).values(previous_secrets=[]))
    with op.batch_alter_table('webhook_endpoints') as batch:
        batch.alter_column('previous_secrets', existing_type=JSON, nullable=False)
        batch.drop_column('previous_secret_expires_at')
        batch.drop_column('previous_secret_enc')


def downgrade() -> None:
    with op.batch_alter_table('webhook_endpoints') as batch:
        batch.add_column(sa.Column('previous_secret_enc', sa.String(length=255), nullable=True))
        batch.add_column(sa.Column('previous_secret_expires_at', core.db.UTCDateTime(timezone=True), nullable=True))
    bind = op.get_bind()
    now = datetime.now(UTC)
    for row_id, entries in bind.execute(sa.select(endpoints.c.id, endpoints.c.previous_secrets)).all():
        newest = _newest_still_signing(entries, now)
        if newest is not None:
            bind.execute(endpoints.update().where(endpoints.c.id == row_id).values(
                previous_secret_enc=newest[0], previous_secret_expires_at=newest[1]))
    with op.batch_alter_table('webhook_endpoints') as batch:
        batch.drop_column('previous_secrets')


def _newest_still_signing(entries: object, now: datetime) -> tuple[str, datetime] | None:
    """(ciphertext, expiry) of the first entry (newest first) not yet expired; None when none is."""
    for entry in entries if isinstance(entries, list) else []:
        try:
            until = datetime.fromisoformat(entry["expires_at"])
        except (TypeError, KeyError, ValueError):
            continue
        if entry.get("secret_enc") and until.tzinfo is not None and until > now:
            return entry["secret_enc"], until
    return None
