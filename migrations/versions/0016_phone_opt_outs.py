"""Numbers that sent STOP, by blind index (`phone_opt_outs`): the opt-out was only a flag on the memberships the
number had at that moment, so a number that sent STOP before it was registered, or that joined another
cooperative, or that a CSV import added later, got reminders again. The row is the number's; a membership
made afterwards starts opted out (core.members), START deletes it, and so does releasing the number from its last
membership.

Filled from the memberships opted out today: each one's number is an opted-out number (a STOP was only ever
applied to every membership of the number). The other memberships of those numbers, made after the STOP and so
getting reminders against it, are opted out too, as STOP promised. A new, small table: built plainly. Downgrading
drops it; the memberships keep their flags.

Revision ID: 0016
Revises: 0015
"""

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

import core.db

revision = '0016'
down_revision = '0015'
branch_labels = None
depends_on = None

members = sa.table(
    'members',
    sa.column('phone_index', sa.String(64)),
    sa.column('reminders_opt_out', sa.Boolean),
)
CHUNK = 500


def upgrade() -> None:
    table = op.create_table(
        'phone_opt_outs',
        sa.Column('phone_index', sa.String(length=64), nullable=False),
        sa.Column('created_at', core.db.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('phone_index', name=op.f('pk_phone_opt_outs')),
    )
    bind = op.get_bind()
    indexes = sorted(bind.execute(sa.select(members.c.phone_index).distinct().where(
        members.c.reminders_opt_out.is_(True), members.c.phone_index.is_not(None))).scalars())
    now = datetime.now(UTC)
    for start in range(0, len(indexes), CHUNK):
        chunk = indexes[start:start + CHUNK]
        bind.execute(table.insert(), [{'phone_index': index, 'created_at': now} for index in chunk])
        bind.execute(members.update().where(members.c.phone_index.in_(chunk),
                                            members.c.reminders_opt_out.is_(False))
                     .values(reminders_opt_out=True))


def downgrade() -> None:
    op.drop_table('phone_opt_outs')
