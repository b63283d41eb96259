"""Migration 0033 marks the jobs waiting after a failed try when it runs (after_failure), which is now all that tells
a job waiting for its retry after a failure (GET /v1/jobs?waiting=true, POST /v1/jobs/replay {"waiting": true}).

A job with attempts above 0 was listed by its attempts before: marked, it still is. A payment's poll (or a cancelled
payment's watch) waiting after a failed status query gives its attempt back (attempts 0), and 0031 left it unmarked:
neither listed nor run now until its next try after the upgrade. It is told by its last_error, the words core.jobs
writes for a failed query (after the approval window too, behind the outbox's doubt prefix too); a poll's planned
waits and other unknowns, and ended jobs, stay unmarked.
"""

from __future__ import annotations

import asyncio
from typing import Any

from core.outbox import CALL_IN_DOUBT, CALL_SENT
from tests.conftest import make_settings, requires_pg
from tests.core.test_migration_0031_waiting import LATER, T0, _after_upgrade
from tests.core.test_migration_round_trip import _execute

# id -> (kind, status, last_error, attempts), each due LATER (attempts 0: a RetryLater gave each attempt back).
JOBS = {
    990201: ("payment.poll", "PENDING", "status query failed: ProviderError: mtn_momo HTTP 500", 0),
    990202: ("payment.poll", "PENDING", "outcome unknown after the approval window: status query failed: KeyError", 0),
    990203: ("payment.watch", "PENDING", "status query failed: ProviderTimeout: airtel_money timed out", 0),
    990204: ("payment.poll", "PENDING", f"{CALL_IN_DOUBT}: status query failed: ProviderError: HTTP 502", 0),
    990205: ("payment.poll", "PENDING", f"{CALL_SENT}: outcome unknown after the approval window: status query "
                                        "failed: ProviderError: HTTP 503", 0),
    990206: ("sms.send", "PENDING", "ProviderError: africastalking HTTP 401", 3),  # its backoff after a failed attempt
    990207: ("refund.poll", "PENDING", "refund still pending", 1),  # failed once, since then planned: can't be told
    990208: ("payment.poll", "PENDING", "still pending", 0),  # a planned wait
    990209: ("payment.poll", "PENDING", "the provider has no record of the request it accepted: HTTP 404", 0),
    990210: ("payment.poll", "PENDING", "outcome unknown after the approval window: the provider cannot tell yet", 0),
    990211: ("payment.poll", "DONE", "status query failed: ProviderError: HTTP 500", 0),  # answered since
    990212: ("sms.send", "PARKED", "ProviderError: africastalking HTTP 500", 10),  # parked: not waiting
    990213: ("payment.poll", "PENDING", None, 0),  # queued, never tried
}
MARKED = {990201, 990202, 990203, 990204, 990205, 990206, 990207}
EXPECTED = ({job_id: job_id in MARKED for job_id in JOBS}, sorted(MARKED))


def _rows() -> list[str]:
    return [f"INSERT INTO outbox_jobs (id, kind, payload, status, attempts, max_attempts, run_at, last_error, "
            f"created_at, updated_at) VALUES ({job_id}, '{kind}', '{{}}', '{status}', {attempts}, 25, '{LATER}', "
            + ("NULL" if error is None else f"'{error}'") + f", '{T0}', '{T0}')"
            for job_id, (kind, status, error, attempts) in JOBS.items()]


def test_the_jobs_waiting_after_a_failed_try_are_still_waiting_after_the_upgrade_on_sqlite(tmp_path: Any) -> None:
    from alembic import command

    from main import _alembic_config, migrate

    url = f"sqlite+aiosqlite:///{tmp_path}/m.db"
    settings = make_settings(DATABASE_URL=url)
    command.upgrade(_alembic_config(settings), "0030")
    asyncio.run(_execute(url, _rows()))
    migrate(settings)
    assert asyncio.run(_after_upgrade(url, list(JOBS))) == EXPECTED
    # Down and up again (a rollback, then the release deployed again): the same, from the last_error kept.
    command.downgrade(_alembic_config(settings), "0030")
    migrate(settings)
    assert asyncio.run(_after_upgrade(url, list(JOBS))) == EXPECTED


@requires_pg
async def test_the_jobs_waiting_after_a_failed_try_are_still_waiting_after_the_upgrade_on_postgres(
        migrated_database: str) -> None:
    from alembic import command

    from main import _alembic_config

    config = _alembic_config(make_settings())
    await asyncio.to_thread(command.downgrade, config, "0032")
    try:
        # Left false by 0031 (written by the release before it, or by one of its workers meanwhile).
        await _execute(migrated_database, _rows())
        await asyncio.to_thread(command.upgrade, config, "head")
        assert await _after_upgrade(migrated_database, list(JOBS)) == EXPECTED
    finally:
        await asyncio.to_thread(command.upgrade, config, "head")
        await _execute(migrated_database, [f"DELETE FROM outbox_jobs WHERE id IN ({', '.join(map(str, JOBS))})"])
