"""Migration 0036: the webhook.deliver jobs queued before core.webhooks.fan_out wrote their subject (payment_id or
refund_id) in their payload, whose event id is a digest (a flag's, a review's, reported money's), showed `subject:
null` in GET /v1/jobs and were missed by ?paymentId= / ?refundId=. The upgrade writes it from their delivery row's
event (its data's id); a job whose event id names its subject already, a dispute's, one whose delivery is gone and
one that has its subject are left as they were.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from typing import Any

from sqlalchemy import select

from core.db import make_engine
from core.models import OutboxJob
from core.outbox import job_subject, subject_filter
from tests.conftest import make_settings, requires_pg
from tests.core.test_migration_0031_waiting import LATER, T0
from tests.core.test_migration_round_trip import _execute

COOP, ENDPOINT = "c0000000-0000-4000-8000-000000000036", "e0000000-0000-4000-8000-000000000036"
PAYMENT, REFUND = "a0000000-0000-4000-8000-000000000036", "b0000000-0000-4000-8000-000000000036"
DISPUTE = "d0000000-0000-4000-8000-000000000036"


def digest(made: str) -> str:
    """core.webhooks.stored_event_id of an event id too long for the column."""
    return "evt_" + hashlib.sha256(made.encode()).hexdigest()[:48]


FLAGGED = digest(f"evt_payment_flagged_{PAYMENT}_{'0' * 16}")
REVIEWED = digest(f"evt_refund_reported_{REFUND}_{'1' * 16}")
DISPUTED = digest(f"evt_dispute_opened_{DISPUTE}_{'2' * 16}")
GONE = digest(f"evt_payment_flag_cleared_{PAYMENT}_{'3' * 16}")
NAMED = f"evt_payment_completed_{PAYMENT}"
# id -> (status, event id, extra payload, its delivery's (event type, data id), or None: no delivery row)
JOBS: dict[int, tuple[str, str, dict[str, str], tuple[str, str] | None]] = {
    990361: ("PARKED", FLAGGED, {}, ("payment.flagged", PAYMENT)),
    990362: ("DONE", REVIEWED, {}, ("refund.reported", REFUND)),  # listed too
    990363: ("PENDING", DISPUTED, {}, ("dispute.opened", DISPUTE)),  # no payment's nor refund's: none
    990364: ("PENDING", GONE, {}, None),  # its delivery deleted by retention: cannot be told
    990365: ("PENDING", NAMED, {}, ("payment.completed", PAYMENT)),  # named by its event id already
    990366: ("PENDING", digest("evt_other"), {"payment_id": PAYMENT}, ("payment.flagged", "another")),  # has it
}
EXPECTED_PAYLOADS = {
    990361: {"endpoint_id": ENDPOINT, "event_id": FLAGGED, "payment_id": PAYMENT},
    990362: {"endpoint_id": ENDPOINT, "event_id": REVIEWED, "refund_id": REFUND},
    990363: {"endpoint_id": ENDPOINT, "event_id": DISPUTED},
    990364: {"endpoint_id": ENDPOINT, "event_id": GONE},
    990365: {"endpoint_id": ENDPOINT, "event_id": NAMED},
    990366: {"endpoint_id": ENDPOINT, "event_id": digest("evt_other"), "payment_id": PAYMENT},
}
# What GET /v1/jobs shows (job_subject), and which jobs ?paymentId= / ?refundId= find (subject_filter).
EXPECTED = (
    {990361: ("payment", PAYMENT), 990362: ("refund", REFUND), 990363: None, 990364: None,
     990365: ("payment", PAYMENT), 990366: ("payment", PAYMENT)},
    [990361, 990365, 990366], [990362],
)


def _rows(postgres: bool) -> list[str]:
    rows = ["SET LOCAL session_replication_role = replica"] if postgres else [  # PostgreSQL: no such rows needed
        f"INSERT INTO cooperatives (id, name, short_code, country, currency, timezone, status, self_registration, "
        f"created_at, updated_at) VALUES ('{COOP}', 'Coop', 'C0036', 'RW', 'RWF', 'Africa/Kigali', 'ACTIVE', 1, "
        f"'{T0}', '{T0}')",
        f"INSERT INTO webhook_endpoints (id, cooperative_id, url, secret_enc, previous_secrets, events, status, "
        f"consecutive_failures, created_at, updated_at) VALUES ('{ENDPOINT}', '{COOP}', 'https://hooks.example/h', "
        f"'x', '[]', '[]', 'ACTIVE', 0, '{T0}', '{T0}')"]
    for job_id, (status, event_id, extra, delivery) in JOBS.items():
        payload = json.dumps({"endpoint_id": ENDPOINT, "event_id": event_id, **extra})
        rows.append(f"INSERT INTO outbox_jobs (id, kind, payload, status, attempts, max_attempts, run_at, created_at, "
                    f"updated_at) VALUES ({job_id}, 'webhook.deliver', '{payload}', '{status}', 1, 8, '{LATER}', "
                    f"'{T0}', '{T0}')")
        if delivery is not None:
            event_type, data_id = delivery
            body = json.dumps({"id": event_id, "type": event_type, "cooperativeId": COOP, "data": {"id": data_id}})
            rows.append(f"INSERT INTO webhook_deliveries (id, cooperative_id, endpoint_id, event_id, event_type, "
                        f"payload, status, attempts, created_at, updated_at) VALUES ('f0000000-0000-4000-8000-"
                        f"{job_id:012d}', '{COOP}', '{ENDPOINT}', '{event_id}', '{event_type}', '{body}', 'DELIVERED', "
                        f"'[]', '{T0}', '{T0}')")
    return rows


async def _after_upgrade(url: str) -> tuple[dict[int, Any], dict[int, Any], list[int], list[int]]:
    engine = make_engine(url)
    try:
        async with engine.begin() as conn:
            rows = (await conn.execute(select(OutboxJob.id, OutboxJob.kind, OutboxJob.payload).where(
                OutboxJob.id.in_(list(JOBS))))).all()
            payments, refunds = [list((await conn.execute(select(OutboxJob.id).where(
                OutboxJob.id.in_(list(JOBS)), subject_filter(subject, subject_id)).order_by(OutboxJob.id))).scalars())
                for subject, subject_id in (("payment", PAYMENT), ("refund", REFUND))]
    finally:
        await engine.dispose()
    payloads = {row.id: dict(row.payload) for row in rows}
    return payloads, {row.id: job_subject(row.kind, row.payload) for row in rows}, payments, refunds


def test_old_delivery_jobs_name_their_subject_after_the_upgrade_on_sqlite(tmp_path: Any) -> None:
    from alembic import command

    from main import _alembic_config, migrate

    url = f"sqlite+aiosqlite:///{tmp_path}/m.db"
    settings = make_settings(DATABASE_URL=url)
    command.upgrade(_alembic_config(settings), "0035")
    asyncio.run(_execute(url, _rows(False)))
    migrate(settings)
    payloads, *found = asyncio.run(_after_upgrade(url))
    assert payloads == EXPECTED_PAYLOADS and tuple(found) == EXPECTED
    # Down and up again: the same.
    command.downgrade(_alembic_config(settings), "0035")
    migrate(settings)
    payloads, *found = asyncio.run(_after_upgrade(url))
    assert payloads == EXPECTED_PAYLOADS and tuple(found) == EXPECTED


@requires_pg
async def test_old_delivery_jobs_name_their_subject_after_the_upgrade_on_postgres(migrated_database: str) -> None:
    from alembic import command

    from main import _alembic_config

    config = _alembic_config(make_settings())
    await asyncio.to_thread(command.downgrade, config, "0035")
    try:
        await _execute(migrated_database, _rows(True))
        await asyncio.to_thread(command.upgrade, config, "head")
        payloads, *found = await _after_upgrade(migrated_database)
        assert payloads == EXPECTED_PAYLOADS and tuple(found) == EXPECTED
    finally:
        await asyncio.to_thread(command.upgrade, config, "head")
        await _execute(migrated_database, [
            f"DELETE FROM outbox_jobs WHERE id IN ({', '.join(map(str, JOBS))})",
            f"DELETE FROM webhook_deliveries WHERE endpoint_id = '{ENDPOINT}'"])
