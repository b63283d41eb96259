"""When a number's latest STOP or START was sent (`phone_opt_out_words`): a STOP and a START texted seconds apart were
taken in whatever order their handlers ran (two at once, or a retried one after the other), and the one taken last
won: she sent STOP then START and stayed opted out. The row keeps the aggregator's date of the latest word taken, and
a word sent before it changes nothing (core.members.set_number_opt_out). A new, small table: built plainly, empty
(the words taken before it are in order as they stand). Downgrading drops it.

Revision ID: 0028
Revises: 0027
"""

import sqlalchemy as sa
from alembic import op

import core.db

revision = '0028'
down_revision = '0027'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'phone_opt_out_words',
        sa.Column('phone_index', sa.String(length=64), nullable=False),
        sa.Column('said_at', core.db.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('phone_index', name=op.f('pk_phone_opt_out_words')),
    )


def downgrade() -> None:
    op.drop_table('phone_opt_out_words')
