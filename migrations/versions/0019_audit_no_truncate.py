"""The audit log refuses TRUNCATE too: 0001's trigger refuses UPDATE and DELETE row by row, and row triggers
never fire on TRUNCATE, so `TRUNCATE audit_events` (or a TRUNCATE of a table it references, with CASCADE)
emptied the append-only log. A statement trigger on TRUNCATE raises the same error.

PostgreSQL only, as 0001's trigger is; SQLite has no TRUNCATE. Emptying a test database goes around it as a
superuser's session may (`session_replication_role = replica`: ordinary triggers do not fire).

Revision ID: 0019
Revises: 0018
"""

from alembic import op

revision = '0019'
down_revision = '0018'
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("CREATE TRIGGER audit_events_no_truncate BEFORE TRUNCATE ON audit_events "
                   "FOR EACH STATEMENT EXECUTE FUNCTION audit_events_append_only()")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS audit_events_no_truncate ON audit_events")
