"""A cooperative's short code and an admin's username are each one whatever its case: unique indexes on
upper(short_code) and lower(username).

Both were unique only as typed. USSD registration finds a code whatever its case, so a second cooperative given
'khhc' beside 'KHHC' took the registrations of members typing their own cooperative's code; and
'Wanjiru@NSG.co.ke' could neither sign in as 'wanjiru@nsg.co.ke' (a phone keyboard's) nor stop a second account
of that name being made. The code now compares them so (core.cooperatives, core.auth, core.users); these
indexes hold it against two requests at once. The case-sensitive unique constraints of 0001 stay: the new indexes
imply them, and dropping one on SQLite means rebuilding the table.

Rows that already clash stop the migration before anything is built, with a message naming each clash and how
to end it (nothing is changed: which code or account is to change is the operator's choice). Both tables are
small and written by administrators only: on PostgreSQL they are locked against writes (SHARE) for the check
and the build, so no clash can come between the two, and the indexes are built plainly, in the migration's
transaction. SQLite builds them plainly too (IF NOT EXISTS: its DDL commits at once, see migrations.online).
During the deploy a previous-release process making a cooperative or an account whose code or name is taken in
another case is refused by the index with a 500 (its check compares as typed); nothing is written.

Revision ID: 0017
Revises: 0016
"""

import logging

import sqlalchemy as sa
from alembic import op
from alembic.util.exc import CommandError

revision = '0017'
down_revision = '0016'
branch_labels = None
depends_on = None

log = logging.getLogger('alembic.runtime.migration')

cooperatives = sa.table('cooperatives', sa.column('id', sa.String(36)), sa.column('short_code', sa.String(32)),
                        sa.column('status', sa.String(16)))
admin_users = sa.table('admin_users', sa.column('id', sa.String(36)), sa.column('username', sa.String(120)),
                       sa.column('is_active', sa.Boolean))

# (name, table, expression): the models' declarations (core.models).
INDEXES = (
    ('ux_cooperatives_upper_short_code', 'cooperatives', 'upper(short_code)'),
    ('ux_admin_users_lower_username', 'admin_users', 'lower(username)'),
)


def _clashes(column: sa.ColumnClause[str], folded: sa.ColumnElement[str], state: sa.ColumnElement[str],
             kind: str) -> list[tuple[str, str]]:
    """Each group of rows whose `column` is the same once `folded` by the database (as its index will fold it):
    its values as stored, and every row of it with its id and `state`."""
    table = column.table
    same = sa.select(folded).group_by(folded).having(sa.func.count() > 1)
    rows = op.get_bind().execute(
        sa.select(folded, column, table.c.id, state)
        .where(folded.in_(same)).order_by(folded, column, table.c.id)).all()
    groups: dict[str, list[tuple[str, str]]] = {}
    for key, value, row_id, row_state in rows:
        groups.setdefault(key, []).append((repr(value), f"{value!r} ({kind} {row_id}, {row_state})"))
    return [(' = '.join(v for v, _ in group), ' and '.join(d for _, d in group)) for group in groups.values()]


def _check() -> None:
    """Refuse the rows the indexes would refuse (CommandError: `migrate` prints it and exits 3), each clash
    named in the message and, with its rows' ids and how to end it, in an ERROR log line (`migrate` shortens
    the message to a line)."""
    found = {
        'short codes': _clashes(cooperatives.c.short_code, sa.func.upper(cooperatives.c.short_code),
                                cooperatives.c.status, 'cooperative'),
        'usernames': _clashes(admin_users.c.username, sa.func.lower(admin_users.c.username),
                              sa.case((admin_users.c.is_active.is_(True), 'active'), else_='deactivated'),
                              'account'),
    }
    if not any(found.values()):
        return
    fix = {'short codes': 'give all but one another code: PATCH /v1/cooperatives/{id} {"shortCode": ...}',
           'usernames': "rename all but one (UPDATE admin_users SET username = '<new name>' WHERE id = '<id>') "
                        "and tell its owner"}
    for what, groups in found.items():
        for _values, rows in groups:
            log.error(f"migration 0017: {what} that differ only in case: {rows}; {fix[what]}")
    clashes = '; '.join(f"{what} {', '.join(values for values, _rows in groups)}"
                        for what, groups in found.items() if groups)
    raise CommandError(f"migration 0017 cannot be applied (nothing was changed): make these different in more "
                       f"than case, then run migrate again (each is in the log above with its ids): {clashes}")


def upgrade() -> None:
    postgres = op.get_bind().dialect.name == 'postgresql'
    if postgres:
        # Writes wait (administrators' edits only, for the milliseconds of the check and two small builds).
        op.execute('LOCK TABLE cooperatives, admin_users IN SHARE MODE')
    _check()
    for name, table, expression in INDEXES:
        op.create_index(name, table, [sa.text(expression)], unique=True, if_not_exists=not postgres)


def downgrade() -> None:
    for name, table, _expression in reversed(INDEXES):
        op.drop_index(name, table_name=table, if_exists=True)
