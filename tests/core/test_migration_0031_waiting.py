"""Migration 0031 marks the webhook deliveries already waiting after a failure, so an operator who has just fixed a
receiver still finds them (GET /v1/jobs?waiting=true) and runs them now (POST /v1/jobs/replay {"waiting": true}).

The previous release told them by their last_error ("webhook attempt N failed: ..."); 0031's column starts false.
Left so, a delivery failing when the release was deployed was neither listed nor run now until its next try, up to 6
hours later: exactly the deliveries a receiver's outage leaves, when the operator asks for them. Planned waits (a
never-tried job, a delivery held, a poll told "still pending") and ended jobs stay unmarked.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select

from core.db import make_engine
from core.models import OutboxJob
from core.outbox import waiting
from tests.conftest import make_settings, requires_pg
from tests.core.test_migration_round_trip import _execute

LATER = (datetime.now(UTC) + timedelta(hours=5)).strftime("%Y-%m-%d %H:%M:%S.000000")
T0 = "2026-01-01 00:00:00.000000"
# id -> (kind, status, last_error), each due LATER, attempts 0 (a RetryLater gave each attempt back).
JOBS = {
    990101: ("webhook.deliver", "PENDING", "webhook attempt 3 failed: HTTP 503"),  # waiting after a failure
    990102: ("webhook.deliver", "DONE", "webhook attempt 1 failed: HTTP 500"),  # delivered since
    990103: ("webhook.deliver", "PENDING", None),  # queued, never tried
    990104: ("payment.poll", "PENDING", "still pending"),  # a planned wait
}


def _rows() -> list[str]:
    return [f"INSERT INTO outbox_jobs (id, kind, payload, status, attempts, max_attempts, run_at, last_error, "
            f"created_at, updated_at) VALUES ({job_id}, '{kind}', '{{}}', '{status}', 0, 8, '{LATER}', "
            + ("NULL" if error is None else f"'{error}'") + f", '{T0}', '{T0}')"
            for job_id, (kind, status, error) in JOBS.items()]


async def _after_upgrade(url: str, seeded: list[int] | None = None) -> tuple[dict[int, bool], list[int]]:
    """Each seeded job's after_failure, and those GET /v1/jobs?waiting=true lists (its condition, core.outbox)."""
    seeded = list(JOBS) if seeded is None else seeded
    engine = make_engine(url)
    try:
        async with engine.begin() as conn:
            marked = {job_id: after_failure for job_id, after_failure in await conn.execute(
                select(OutboxJob.id, OutboxJob.after_failure).where(OutboxJob.id.in_(seeded)))}
            listed = list((await conn.execute(select(OutboxJob.id).where(
                OutboxJob.id.in_(seeded), waiting(datetime.now(UTC))).order_by(OutboxJob.id))).scalars())
            return marked, listed
    finally:
        await engine.dispose()


EXPECTED = ({990101: True, 990102: False, 990103: False, 990104: False}, [990101])


def test_a_webhook_delivery_waiting_after_a_failure_is_still_waiting_after_the_upgrade_on_sqlite(tmp_path: Any
                                                                                                 ) -> None:
    from alembic import command

    from main import _alembic_config, migrate

    url = f"sqlite+aiosqlite:///{tmp_path}/m.db"
    settings = make_settings(DATABASE_URL=url)
    command.upgrade(_alembic_config(settings), "0030")
    asyncio.run(_execute(url, _rows()))
    migrate(settings)
    assert asyncio.run(_after_upgrade(url)) == EXPECTED
    # Down and up again (a rollback, then the release deployed again): the same, from the last_error kept.
    command.downgrade(_alembic_config(settings), "0030")
    migrate(settings)
    assert asyncio.run(_after_upgrade(url)) == EXPECTED


@requires_pg
async def test_a_webhook_delivery_waiting_after_a_failure_is_still_waiting_after_the_upgrade_on_postgres(
        migrated_database: str) -> None:
    from alembic import command

    from main import _alembic_config

    config = _alembic_config(make_settings())
    await asyncio.to_thread(command.downgrade, config, "0030")
    try:
        await _execute(migrated_database, _rows())
        await asyncio.to_thread(command.upgrade, config, "head")
        assert await _after_upgrade(migrated_database) == EXPECTED
    finally:
        await asyncio.to_thread(command.upgrade, config, "head")
        await _execute(migrated_database, [f"DELETE FROM outbox_jobs WHERE id IN ({', '.join(map(str, JOBS))})"])
