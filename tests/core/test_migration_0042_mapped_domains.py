"""Migration 0042: a webhook domain that is an IPv4-mapped IPv6 address is written `::ffff:1.2.3.4` on every Python
(core.webhooks.canonical_host), where the previous release (0040 included) wrote it as str() did on the interpreter:
`::ffff:102:304` on Python 3.11 and 3.12. A downgrade writes it again as str() does, as the previous release compares
it on the Python running it."""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Any

from tests.conftest import make_settings, requires_pg
from tests.core.test_report_group_statistics import domain_rows, stored_domains

COOP, OTHER = "c0000000-0000-4000-8000-000000000042", "c1000000-0000-4000-8000-000000000042"
# id -> (cooperative, domain as stored by the previous release, after the upgrade)
DOMAINS = {
    "a0000000-0000-4000-8000-000000000421": (COOP, "::ffff:7f00:1", "::ffff:127.0.0.1"),  # 3.11's form: rewritten
    "a0000000-0000-4000-8000-000000000422": (COOP, "::ffff:127.0.0.2", "::ffff:127.0.0.2"),  # 3.13's: kept
    "a0000000-0000-4000-8000-000000000423": (OTHER, "::ffff:7f00:3", "::ffff:7f00:3"),  # its cooperative has
    "a0000000-0000-4000-8000-000000000424": (OTHER, "::ffff:127.0.0.3", "::ffff:127.0.0.3"),  # ... this one: kept
    "a0000000-0000-4000-8000-000000000425": (COOP, "::ffff:0:7f00:1", "::ffff:0:7f00:1"),  # not mapped
    "a0000000-0000-4000-8000-000000000426": (COOP, "fd00::5", "fd00::5"),
    "a0000000-0000-4000-8000-000000000427": (COOP, "hooks.example.rw", "hooks.example.rw"),
    "a0000000-0000-4000-8000-000000000428": (COOP, "127.0.0.1", "127.0.0.1"),
    # A second request of one address 0040 left as typed (its canonical form was taken), stored before the row the
    # previous release compared (str()'s form on this Python): that row is rewritten, and goes on deciding.
    "a0000000-0000-4000-8000-000000000429": (COOP, "0:0:0:0:0:ffff:7f00:4", "0:0:0:0:0:ffff:7f00:4"),
    "a0000000-0000-4000-8000-00000000042a": (COOP, str(ipaddress.ip_address("::ffff:7f00:4")), "::ffff:127.0.0.4"),
}
# After a downgrade: as str() writes a mapped address on this Python, where that is not taken in its cooperative.
DOWNGRADED = {
    i: str(ipaddress.ip_address(after)) if ":" in after and ipaddress.IPv6Address(after).ipv4_mapped else after
    for i, (_, _, after) in DOMAINS.items()
}
# OTHER has both forms: each stays (one of them is str()'s, the other's is taken), whatever the Python.
DOWNGRADED.update({i: before for i, (c, before, _) in DOMAINS.items() if c == OTHER})
DOWNGRADED["a0000000-0000-4000-8000-000000000429"] = "0:0:0:0:0:ffff:7f00:4"  # str()'s form goes back to the other


def _domain_rows(postgres: bool) -> list[str]:
    return domain_rows(postgres, (COOP, OTHER), DOMAINS, "C042")


async def _domains(url: str) -> dict[str, str]:
    return await stored_domains(url, list(DOMAINS))


def test_0042_writes_ipv4_mapped_domains_one_way_on_sqlite(tmp_path: Any) -> None:
    from alembic import command

    from main import _alembic_config, migrate
    from tests.core.test_migration_round_trip import _execute

    url = f"sqlite+aiosqlite:///{tmp_path}/m.db"
    settings = make_settings(DATABASE_URL=url)
    command.upgrade(_alembic_config(settings), "0041")
    asyncio.run(_execute(url, _domain_rows(False)))
    migrate(settings)
    assert asyncio.run(_domains(url)) == {i: after for i, (_, _, after) in DOMAINS.items()}
    command.downgrade(_alembic_config(settings), "0041")
    assert asyncio.run(_domains(url)) == DOWNGRADED


@requires_pg
async def test_0042_writes_ipv4_mapped_domains_one_way_on_postgres(migrated_database: str) -> None:
    from alembic import command

    from main import _alembic_config
    from tests.core.test_migration_round_trip import _execute

    config = _alembic_config(make_settings())
    await asyncio.to_thread(command.downgrade, config, "0041")
    try:
        await _execute(migrated_database, _domain_rows(True))
        await asyncio.to_thread(command.upgrade, config, "head")
        assert await _domains(migrated_database) == {i: after for i, (_, _, after) in DOMAINS.items()}
        await asyncio.to_thread(command.downgrade, config, "0041")
        assert await _domains(migrated_database) == DOWNGRADED
    finally:
        await asyncio.to_thread(command.upgrade, config, "head")
        await _execute(migrated_database, [f"DELETE FROM approved_domains WHERE id IN "
                                           f"({', '.join(repr(i) for i in DOMAINS)})"])
