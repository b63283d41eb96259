"""Fixtures for the USSD tests: the app's channel object and database helpers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import func, select


@pytest.fixture
def db(rt: Any) -> Any:
    """Small read helpers over the test database."""

    class Db:
        async def count(self, model: Any, *where: Any) -> int:
            async with rt.sessionmaker() as s:
                return (await s.execute(select(func.count()).select_from(model).where(*where))).scalar_one()

        async def all(self, model: Any, *where: Any) -> list[Any]:
            async with rt.sessionmaker() as s:
                return list((await s.execute(select(model).where(*where))).scalars())

        async def one(self, model: Any, *where: Any) -> Any:
            rows = await self.all(model, *where)
            assert len(rows) == 1, rows
            return rows[0]

    return Db()


@pytest.fixture
async def dead_redis() -> AsyncIterator[Any]:
    """A client for a port nobody listens on: every command fails at once."""
    import socket

    from redis.asyncio import Redis

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = Redis.from_url(f"redis://127.0.0.1:{port}/0", socket_timeout=1.0, socket_connect_timeout=1.0)
    yield client
    await client.aclose()


@pytest.fixture
async def hanging_redis() -> AsyncIterator[Any]:
    """A server that accepts connections and never answers: Redis that is up but stuck."""
    import asyncio

    from redis.asyncio import Redis

    writers: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        while await reader.read(1024):
            pass

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = Redis.from_url(f"redis://127.0.0.1:{port}/0")  # no client timeout: only the hop budget
    yield client
    for writer in writers:
        writer.close()
    server.close()
    await client.aclose()
