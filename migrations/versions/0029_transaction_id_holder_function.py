"""A success callback's probe for another payment holding its transaction id rides on the statement that stores the
callback and locks its payment: `gateway_id_holder(key, provider, txn, exclude)` takes the id's advisory lock, then
looks for another payment of the provider holding the id, and returns its id (NULL: none).

The probe must see what was committed up to the moment the lock was taken (two completions of one id take turns on
the lock, and the second must see the first's payment: core.transaction_ids._held_elsewhere). A statement's own
snapshot is taken when it starts, before its lock; a VOLATILE function takes a fresh snapshot for each query it runs
(READ COMMITTED), so the function's probe, run after its lock, sees what the lock waited for. PL/pgSQL, whose
statements' plans are kept for the connection's life (a SQL function's are made again at each call). Until now that probe
was a statement of its own: a callback was BEGIN, store-and-lock, probe, move, COMMIT; with this, four round trips.

PostgreSQL only (the embedded SQLite default takes no locks and probes as before). A new function, nothing rewritten:
built in place. Downgrading drops it; the code before this revision does not call it.

Revision ID: 0029
Revises: 0028
"""

from alembic import op

revision = '0029'
down_revision = '0028'
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(
        """
        CREATE FUNCTION gateway_id_holder(lock_key text, id_provider text, txn text, exclude text)
        RETURNS text LANGUAGE plpgsql VOLATILE AS $$
        DECLARE
            holder text;
        BEGIN
            PERFORM pg_advisory_xact_lock(hashtext(lock_key));
            SELECT id INTO holder FROM payments
             WHERE provider = id_provider AND provider_transaction_id = txn AND id <> exclude
             LIMIT 1;
            RETURN holder;
        END
        $$
        """
    )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP FUNCTION IF EXISTS gateway_id_holder(text, text, text, text)")
