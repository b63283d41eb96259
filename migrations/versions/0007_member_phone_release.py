"""A suspended member's phone number can be released (POST /v1/members/{id}/release-phone): its ciphertext
and blind index are cleared (NULL), so the unique (cooperative, phone) index no longer holds the number and
the operator's next holder of it can be registered. The member row, its payments and disputes stay; the
masked form stays for the record.

Downgrading gives a released member placeholders the old NOT NULL columns accept and nothing matches: an
empty ciphertext and 'released:<member id>' as its blind index. Upgrading again turns them back into NULL: left,
the member read as holding a number (phoneReleased false) whose empty ciphertext no key opens.

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None

members = sa.table(
    'members',
    sa.column('id', sa.String(36)),
    sa.column('phone_enc', sa.String(255)),
    sa.column('phone_index', sa.String(64)),
)


def upgrade() -> None:
    with op.batch_alter_table('members') as batch:
        batch.alter_column('phone_enc', existing_type=sa.String(length=255), nullable=True)
        batch.alter_column('phone_index', existing_type=sa.String(length=64), nullable=True)
    # A downgrade's placeholders (below), on a database that went down past this revision and comes back up.
    op.get_bind().execute(members.update().where(members.c.phone_index == sa.literal('released:') + members.c.id)
                          .values(phone_enc=None, phone_index=None))


def downgrade() -> None:
    bind = op.get_bind()
    bind.execute(members.update().where(members.c.phone_enc.is_(None)).values(phone_enc=''))
    bind.execute(members.update().where(members.c.phone_index.is_(None))
                 .values(phone_index=sa.literal('released:') + members.c.id))
    with op.batch_alter_table('members') as batch:
        batch.alter_column('phone_enc', existing_type=sa.String(length=255), nullable=False)
        batch.alter_column('phone_index', existing_type=sa.String(length=64), nullable=False)
