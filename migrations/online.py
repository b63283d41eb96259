"""What migrations share to change a live database: indexes built and dropped without blocking writes.

CREATE INDEX CONCURRENTLY on PostgreSQL, outside the migration's transaction (`migrate` runs on the live
database; a plain build blocks every INSERT and UPDATE of the table while it runs); an INVALID leftover of an
interrupted build is dropped and built again, a valid index of that name is kept. SQLite builds them plainly.
Used by revisions 0004, 0010, 0011, 0013, 0014, 0017, 0018, 0020 to 0023, 0025, 0027, 0032, 0034, 0035, 0039 and
0043 (each keeps its own list: a revision's indexes never change once released). A partial index names its predicate
in `where` (index name -> SQL), the same text on both databases; an index whose columns compare by another operator
class on PostgreSQL names it in `ops` (index name -> {column: class}, text_pattern_ops for LIKE prefixes), a plain
index of the columns on SQLite.
"""

from collections.abc import Mapping, Sequence

import sqlalchemy as sa
from alembic import op

# (name, table, columns), in build order.
IndexSpec = tuple[str, str, list[str]]


def _index_state(name: str) -> bool | None:
    """PostgreSQL: True when index `name` exists and is valid, False when a build left it INVALID, None when absent
    (or unknown: offline SQL, `alembic upgrade --sql`, which then emits CREATE INDEX CONCURRENTLY IF NOT EXISTS)."""
    if op.get_context().as_sql:
        return None
    row = op.get_bind().execute(sa.text(
        "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
        "WHERE c.relname = :name AND pg_catalog.pg_table_is_visible(c.oid)"), {"name": name}).first()
    return None if row is None else bool(row[0])


def _partial(name: str, where: Mapping[str, str]) -> dict[str, sa.TextClause]:
    """The keyword arguments that make index `name` partial, if `where` gives it a predicate."""
    if name not in where:
        return {}
    return {'postgresql_where': sa.text(where[name]), 'sqlite_where': sa.text(where[name])}


def build_indexes(indexes: Sequence[IndexSpec], where: Mapping[str, str] | None = None,
                  ops: Mapping[str, Mapping[str, str]] | None = None) -> None:
    where, ops = where or {}, ops or {}
    if op.get_bind().dialect.name != 'postgresql':
        # IF NOT EXISTS: SQLite's DDL is not in the migration's transaction here (each CREATE commits at once), so a
        # migrate cut short leaves the indexes built so far under the old revision; the next one goes on.
        for name, table, columns in indexes:
            op.create_index(name, table, columns, if_not_exists=True, **_partial(name, where))
        return
    # Outside a transaction (CONCURRENTLY requires it); the revisions before this one are committed first.
    with op.get_context().autocommit_block():
        for name, table, columns in indexes:
            state = _index_state(name)
            if state is False:  # an interrupted concurrent build's leftover: neither used nor complete
                op.drop_index(name, table_name=table, postgresql_concurrently=True, if_exists=True)
            if state is not True:
                op.create_index(name, table, columns, postgresql_concurrently=True, if_not_exists=True,
                                postgresql_ops=dict(ops.get(name, {})), **_partial(name, where))


def drop_indexes(indexes: Sequence[IndexSpec]) -> None:
    if op.get_bind().dialect.name != 'postgresql':
        for name, table, _columns in reversed(indexes):
            op.drop_index(name, table_name=table, if_exists=True)  # (as above: a re-run after a cut-off)
        return
    with op.get_context().autocommit_block():
        for name, table, _columns in reversed(indexes):
            op.drop_index(name, table_name=table, postgresql_concurrently=True, if_exists=True)
