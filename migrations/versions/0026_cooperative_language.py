"""A cooperative has a language (cooperatives.language, en rw fr sw; 'en' for those there are): the language of its
members added without one (POST /v1/members, an import without a language column), of the SMS to a payer who is no
member (a payment made through the API for a number no member has), and of its USSD menu for a caller who is none
of its members and has chosen no language. A Tanzanian cooperative's members were all greeted in English unless
each was given Swahili one by one, and its payers who are no members could not be texted in Swahili at all.

A constant default: PostgreSQL adds the column without rewriting the table. Plain ALTER TABLE on both engines
(SQLite adds and, since 3.35, drops a column in place, as 0020's downgrade): a batch copy of cooperatives would
drop the table every member and payment refers to.

Revision ID: 0026
Revises: 0025
"""

import sqlalchemy as sa
from alembic import op

revision = '0026'
down_revision = '0025'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('cooperatives', sa.Column('language', sa.String(length=2), nullable=False, server_default='en'))


def downgrade() -> None:
    op.execute("ALTER TABLE cooperatives DROP COLUMN language")
