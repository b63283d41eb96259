"""Migration 0006: the one previous webhook secret of 0005 (previous_secret_enc, previous_secret_expires_at)
moves into WebhookEndpoint.previous_secrets, a list, while its overlap lasts; downgrading keeps the newest
one still signing. On SQLite (a scratch file) and on the suite's PostgreSQL, left at head afterwards."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from alembic import command
from sqlalchemy.ext.asyncio import AsyncSession

from core.db import JSONType, UTCDateTime, make_engine, new_id, parse_aware, utcnow
from core.models import Cooperative, WebhookEndpoint
from main import _alembic_config, migrate
from tests.conftest import make_settings, requires_pg

# webhook_endpoints as revision 0005 has it (the models are at head).
AT_0005 = sa.table(
    "webhook_endpoints",
    sa.column("id", sa.String(36)),
    sa.column("cooperative_id", sa.String(36)),
    sa.column("url", sa.String(500)),
    sa.column("secret_enc", sa.String(255)),
    sa.column("events", JSONType),
    sa.column("status", sa.String(16)),
    sa.column("consecutive_failures", sa.Integer),
    sa.column("created_at", UTCDateTime),
    sa.column("updated_at", UTCDateTime),
    sa.column("previous_secret_enc", sa.String(255)),
    sa.column("previous_secret_expires_at", UTCDateTime),
)


COOPERATIVES_AT_0005 = sa.table(
    "cooperatives",
    *(sa.column(name, sa.String(200)) for name in ("id", "name", "short_code", "country", "currency", "timezone",
                                                   "status")),
    sa.column("self_registration", sa.Boolean),
    sa.column("created_at", UTCDateTime),
    sa.column("updated_at", UTCDateTime),
)


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _at_0005(url: str) -> dict[str, Any]:
    """Endpoints at revision 0005: one whose previous secret still signs, one whose overlap is over, one never
    rotated."""
    now = utcnow()
    ids = {"live": new_id(), "expired": new_id(), "never": new_id()}
    previous = {"live": ("k1:live", now + timedelta(hours=2)), "expired": ("k1:gone", now - timedelta(seconds=1)),
                "never": (None, None)}
    engine = make_engine(url)
    try:
        async with AsyncSession(engine) as session, session.begin():
            coop_id = new_id()  # a cooperative as 0005 has it (the model's later columns are not there yet)
            await session.execute(sa.insert(COOPERATIVES_AT_0005).values(
                id=coop_id, name="Test Coop", short_code=coop_id[:8], country="RW", currency="RWF",
                timezone="Africa/Kigali", status="ACTIVE", self_registration=True, created_at=now, updated_at=now))
            for name, row_id in ids.items():
                await session.execute(sa.insert(AT_0005).values(
                    id=row_id, cooperative_id=coop_id, url=f"https://hooks.example.rw/{name}",
                    secret_enc=f"k1:current-{name}", events=["payment.completed"], status="ACTIVE",
                    consecutive_failures=0, created_at=now, updated_at=now, previous_secret_enc=previous[name][0],
                    previous_secret_expires_at=previous[name][1]))
    finally:
        await engine.dispose()
    return {"ids": ids, "previous": previous, "cooperative_id": coop_id}


async def _read(url: str, query: Any) -> list[Any]:
    engine = make_engine(url)
    try:
        async with engine.connect() as conn:
            return list((await conn.execute(query)).all())
    finally:
        await engine.dispose()


async def _write(url: str, *statements: Any) -> None:
    engine = make_engine(url)
    try:
        async with engine.begin() as conn:
            for statement in statements:
                await conn.execute(statement)
    finally:
        await engine.dispose()


def _round_trip(url: str) -> None:
    settings = make_settings(DATABASE_URL=url)
    made: dict[str, Any] = {"ids": {}, "cooperative_id": None}
    try:
        command.downgrade(_alembic_config(settings), "0005")
        made = _run(_at_0005(url))
        ids, previous = made["ids"], made["previous"]
        migrate(settings)
        rows = dict(_run(_read(url, sa.select(WebhookEndpoint.id, WebhookEndpoint.previous_secrets))))
        [entry] = rows[ids["live"]]
        assert entry["secret_enc"] == "k1:live"
        assert parse_aware(entry["expires_at"]) == previous["live"][1]
        assert rows[ids["expired"]] == [] and rows[ids["never"]] == []  # an expired one signed nothing already

        # Down again: the newest previous secret still signing is kept, the others cannot be.
        now = utcnow()
        two = [{"secret_enc": "k1:newer", "expires_at": (now + timedelta(hours=1)).isoformat()},
               {"secret_enc": "k1:older", "expires_at": (now + timedelta(hours=5)).isoformat()}]
        lapsed = [{"secret_enc": "k1:lapsed", "expires_at": (now - timedelta(seconds=1)).isoformat()},
                  {"secret_enc": "k1:second", "expires_at": (now + timedelta(hours=3)).isoformat()}]
        table = WebhookEndpoint.__table__
        _run(_write(url, table.update().where(table.c.id == ids["live"]).values(previous_secrets=two),
                    table.update().where(table.c.id == ids["expired"]).values(previous_secrets=lapsed)))
        command.downgrade(_alembic_config(settings), "0005")
        back = {row[0]: row[1:] for row in _run(_read(url, sa.select(
            AT_0005.c.id, AT_0005.c.previous_secret_enc, AT_0005.c.previous_secret_expires_at)))
            if row[0] in ids.values()}
        assert back[ids["live"]] == ("k1:newer", parse_aware(two[0]["expires_at"]))
        assert back[ids["expired"]] == ("k1:second", parse_aware(lapsed[1]["expires_at"]))
        assert back[ids["never"]] == (None, None)
    finally:
        migrate(settings)  # at head again, whatever happened
        _run(_write(url, sa.delete(WebhookEndpoint.__table__).where(WebhookEndpoint.id.in_(made["ids"].values())),
                    sa.delete(Cooperative.__table__).where(Cooperative.id == made["cooperative_id"])))
    rows = dict(_run(_read(url, sa.select(WebhookEndpoint.id, WebhookEndpoint.previous_secrets))))
    assert not set(made["ids"].values()) & set(rows)


def test_previous_secret_moves_into_the_list_and_back_on_sqlite(tmp_path: Any) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/m.db"
    migrate(make_settings(DATABASE_URL=url))
    _round_trip(url)


@requires_pg
def test_previous_secret_moves_into_the_list_and_back_on_postgres(migrated_database: str) -> None:
    _round_trip(migrated_database)
