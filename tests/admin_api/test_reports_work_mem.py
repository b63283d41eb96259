"""The reconciliation's work_mem (REPORT_WORK_MEM_MB): PostgreSQL sums the period's payments into their groups
with it, in the report's read transaction only. At the server's default 4 MB a super admin's year sorted every
payment on disk; the setting must not stay on the pooled connection, whose next request (a USSD hop, a callback)
would run with it."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import text

from core import reports
from tests.admin_api.conftest import Caller
from tests.conftest import requires_pg


@pytest.fixture
def settings(migrated_database: str, settings_factory: Any) -> Any:
    # Two connections at most (DB_POOL_SIZE and as many again): the report's is one of them.
    return settings_factory(DB_POOL_SIZE="1", REPORT_WORK_MEM_MB="48")


@requires_pg
async def test_the_report_reads_with_its_work_mem_and_gives_the_connection_back_with_the_servers(
        rt: Any, superadmin: Caller, monkeypatch: pytest.MonkeyPatch) -> None:
    async with rt.engine.connect() as conn:
        server = (await conn.execute(text("SELECT reset_val FROM pg_settings WHERE name = 'work_mem'"))).scalar_one()
    assert server != str(48 * 1024)  # (kB: the test would prove nothing on a server set to 48 MB)
    seen: list[tuple[int, str]] = []
    settled = reports._settled

    async def watched(session: Any, *args: Any) -> Any:
        # A statement of the report after its payment figures, in its transaction.
        row = (await session.execute(text("SELECT pg_backend_pid(), current_setting('work_mem')"))).one()
        seen.append((row[0], row[1]))
        return await settled(session, *args)

    monkeypatch.setattr(reports, "_settled", watched)
    await superadmin.json("GET", "/v1/reports/reconciliation?from=2026-01-01&to=2027-01-01", 200)
    [(pid, during)] = seen
    assert during == "48MB"
    # The connection is back in the pool with the server's work_mem, for whichever request checks it out next
    # (the pool's two connections, both checked out: it is one of them).
    pooled = {}
    async with rt.engine.connect() as first, rt.engine.connect() as second:
        for conn in (first, second):
            row = (await conn.execute(text("SELECT pg_backend_pid(), setting FROM pg_settings "
                                           "WHERE name = 'work_mem'"))).one()
            pooled[row[0]] = row[1]
    assert pooled[pid] == server


@requires_pg
async def test_without_a_work_mem_the_report_reads_with_the_servers(rt: Any, superadmin: Caller,
                                                                   settings_factory: Any,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """REPORT_WORK_MEM_MB=0: nothing is set (nor ever on SQLite, which has no work_mem)."""
    monkeypatch.setattr(rt, "settings", settings_factory(DB_POOL_SIZE="1", REPORT_WORK_MEM_MB="0"))
    async with rt.engine.connect() as conn:
        server = (await conn.execute(text("SELECT current_setting('work_mem')"))).scalar_one()
    seen: list[str] = []
    settled = reports._settled

    async def watched(session: Any, *args: Any) -> Any:
        seen.append((await session.execute(text("SELECT current_setting('work_mem')"))).scalar_one())
        return await settled(session, *args)

    monkeypatch.setattr(reports, "_settled", watched)
    await superadmin.json("GET", "/v1/reports/reconciliation?from=2026-01-01&to=2027-01-01", 200)
    assert seen == [server]
