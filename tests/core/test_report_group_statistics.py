"""Migration 0040: the planner knows how many groups the reconciliation's payment figures make (ndistinct statistics
on the keys core.reports.reconciliation groups payments by). Its figures are the tests of the report's; here, that the
statistics come with the revision and go with its downgrade."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.conftest import make_settings, requires_pg
from tests.core.test_payment_type_statistics import statistics_come_and_go

KEYS = ["currency", "method", "payment_type_id", "provider", "status"]


@requires_pg
async def test_0040_statistics_come_and_go_with_the_revision(migrated_database: str) -> None:
    """Created at head (filled by the migration's ANALYZE), gone at 0039, created again at 0040."""
    await statistics_come_and_go(migrated_database, "st_payments_report_groups", (["d"], KEYS), "0039", "0040")


# Migration 0040's other part: IPv6 webhook domains approved as typed are rewritten in their canonical form, which the
# release compares endpoints' hosts in (core.webhooks.canonical_host).
COOP, OTHER = "c0000000-0000-4000-8000-000000000040", "c1000000-0000-4000-8000-000000000040"
# id -> (cooperative, domain as stored by the previous release, after the upgrade)
DOMAINS = {
    "a0000000-0000-4000-8000-000000000401": (COOP, "fd00:0::5", "fd00::5"),  # rewritten
    "a0000000-0000-4000-8000-000000000402": (COOP, "fd00:0000::0007", "fd00::7"),
    "a0000000-0000-4000-8000-000000000403": (COOP, "fd00::9", "fd00::9"),  # canonical already
    "a0000000-0000-4000-8000-000000000404": (OTHER, "fd00:0::9", "fd00:0::9"),  # its cooperative has fd00::9: kept
    "a0000000-0000-4000-8000-000000000405": (OTHER, "fd00::9", "fd00::9"),
    "a0000000-0000-4000-8000-000000000406": (COOP, "hooks.example.rw", "hooks.example.rw"),  # a name
    "a0000000-0000-4000-8000-000000000407": (COOP, "192.168.10.5", "192.168.10.5"),
}


def domain_rows(postgres: bool, coops: tuple[str, ...], domains: dict[str, tuple[str, str, str]],
                code: str) -> list[str]:
    """The statements storing `domains` (id -> (cooperative, domain as stored, expected after)) as the previous
    release did, with their cooperatives (`coops`, short codes `code`0, 1, ...) on SQLite (PostgreSQL's foreign keys
    are off for them: session_replication_role)."""
    from tests.core.test_migration_0031_waiting import T0

    rows = ["SET LOCAL session_replication_role = replica"] if postgres else [
        f"INSERT INTO cooperatives (id, name, short_code, country, currency, timezone, status, self_registration, "
        f"created_at, updated_at) VALUES ('{c}', 'Coop', '{code}{n}', 'RW', 'RWF', 'Africa/Kigali', 'ACTIVE', 1, "
        f"'{T0}', '{T0}')" for n, c in enumerate(coops)]
    rows += [f"INSERT INTO approved_domains (id, cooperative_id, domain, status, created_at) VALUES ('{i}', '{c}', "
             f"'{d}', 'APPROVED', '{T0}')" for i, (c, d, _) in domains.items()]
    return rows


async def stored_domains(url: str, ids: list[str]) -> dict[str, str]:
    """The domains of the approved_domains rows `ids`, by id."""
    from sqlalchemy import select

    from core.db import make_engine
    from core.models import ApprovedDomain

    engine = make_engine(url)
    try:
        async with engine.connect() as conn:
            return dict((await conn.execute(select(ApprovedDomain.id, ApprovedDomain.domain).where(
                ApprovedDomain.id.in_(ids)))).all())
    finally:
        await engine.dispose()


def _domain_rows(postgres: bool) -> list[str]:
    return domain_rows(postgres, (COOP, OTHER), DOMAINS, "C004")


async def _domains(url: str) -> dict[str, str]:
    return await stored_domains(url, list(DOMAINS))


def test_0040_writes_ipv6_domains_in_their_canonical_form_on_sqlite(tmp_path: Any) -> None:
    from alembic import command

    from main import _alembic_config, migrate
    from tests.core.test_migration_round_trip import _execute

    url = f"sqlite+aiosqlite:///{tmp_path}/m.db"
    settings = make_settings(DATABASE_URL=url)
    command.upgrade(_alembic_config(settings), "0039")
    asyncio.run(_execute(url, _domain_rows(False)))
    migrate(settings)
    assert asyncio.run(_domains(url)) == {i: after for i, (_, _, after) in DOMAINS.items()}


@requires_pg
async def test_0040_writes_ipv6_domains_in_their_canonical_form_on_postgres(migrated_database: str) -> None:
    from alembic import command

    from main import _alembic_config
    from tests.core.test_migration_round_trip import _execute

    config = _alembic_config(make_settings())
    await asyncio.to_thread(command.downgrade, config, "0039")
    try:
        await _execute(migrated_database, _domain_rows(True))
        await asyncio.to_thread(command.upgrade, config, "head")
        assert await _domains(migrated_database) == {i: after for i, (_, _, after) in DOMAINS.items()}
    finally:
        await asyncio.to_thread(command.upgrade, config, "head")
        await _execute(migrated_database, [f"DELETE FROM approved_domains WHERE id IN "
                                           f"({', '.join(repr(i) for i in DOMAINS)})"])
