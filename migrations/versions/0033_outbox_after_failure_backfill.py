"""The outbox jobs waiting after a failed try when this runs are marked so (outbox_jobs.after_failure), which is now
all that tells a job waiting for its retry after a failure (core.outbox.waiting) from one waiting on purpose.

This release's worker writes after_failure at every retry: true after a failed attempt (one its attempts count) as
after a failure its handler retries with the attempt given back (RetryLater's `failed`), false after a try that only
planned its wait. Before, a job was waiting when its attempts were above 0 or it had after_failure: a job that had
failed once and whose later tries were only planned waits (a refund's poll told "still pending" for days after one
failed query, its attempts still 1) was listed by GET /v1/jobs?waiting=true and run now by POST /v1/jobs/replay
{"waiting": true}. The previous releases never wrote it for a failed attempt, so two kinds of PENDING jobs are marked:

- those with attempts above 0, each failed by an earlier try; some of them since planned their wait, which this
  cannot tell (as before this release, they are listed until their next try writes the column);
- a payment's status poll (payment.poll) or a cancelled payment's watch (payment.watch) whose status query failed,
  its attempt given back (attempts 0), which 0031 left false: neither listed nor run now until its next try (up to
  30 minutes, a poll's cadence after its window), when an operator who has just fixed a provider asks for exactly
  those. Its last_error tells it: core.jobs writes "status query failed: <error>" exactly when the query failed (the
  same words in the release before 0031), after the approval window "outcome unknown after the approval window:
  status query failed: <error>", either behind the outbox's prefix for a try that may have reached its provider
  (core.outbox._doubt_kept: CALL_SENT, CALL_IN_DOUBT). A poll's other waits say something else ("still pending",
  "the provider has no record of the request it accepted: ...", a provider's AMBIGUOUS reason, which no adapter
  starts so). A job marked wrongly would only be listed until its next try writes the column again.

Run as 0031's backfill is: one UPDATE of the PENDING jobs (ix_outbox_due's status), on PostgreSQL in a transaction
of its own. A job marked no longer matches, so it may be run again (a `migrate` cut short resumes; a downgrade and
an upgrade mark those still so). Downgrading changes nothing: the previous release lists a job by its attempts or
the column, so the jobs marked read as they did to it.

Revision ID: 0033
Revises: 0032
"""

from alembic import op

revision = '0033'
down_revision = '0032'
branch_labels = None
depends_on = None

# The SQL is written out whole (a released revision never changes): how core.jobs's last_error for a failed status
# query starts, alone or after the approval window, each bare or behind core.outbox's CALL_SENT or CALL_IN_DOUBT.
FAILED_QUERY = "status query failed: "
AFTER_WINDOW = "outcome unknown after the approval window: "
DOUBTS = ("", "provider call sent, may have arrived: ",
          "provider call sent, may have arrived, its outcome unknown (ask, never send it again): ")
STARTS = [f"{doubt}{window}{FAILED_QUERY}" for doubt in DOUBTS for window in ("", AFTER_WINDOW)]
BACKFILL = """
UPDATE outbox_jobs SET after_failure = true
WHERE status = 'PENDING' AND after_failure = false
  AND (attempts > 0
       OR kind IN ('payment.poll', 'payment.watch') AND (""" + "\n            OR ".join(
    f"last_error LIKE '{start}%'" for start in STARTS) + "))"


def upgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        with op.get_context().autocommit_block():
            op.execute(BACKFILL)
    else:
        op.execute(BACKFILL)


def downgrade() -> None:
    pass
