"""The hop path's multiplexed Redis connection (core.redis_mux): against the real Redis server of REDIS_URL, and
against servers on 127.0.0.1 that misbehave (never answer, hang up mid-command)."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import AuthenticationError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from core.redis_mux import MuxRedis

URL = os.environ.get("REDIS_URL", "")
needs_tcp_redis = pytest.mark.skipif(not URL.startswith("redis://"),
                                     reason="needs a Redis server on TCP (REDIS_URL=redis://...)")


@pytest.fixture
async def mux() -> AsyncIterator[MuxRedis]:
    client = MuxRedis.from_url(URL, timeout=5.0)
    assert client is not None
    yield client
    await client.aclose()


@pytest.fixture
async def plain() -> AsyncIterator[Redis]:
    client = Redis.from_url(URL)
    yield client
    await client.aclose()


def _key() -> str:
    return f"test:mux:{uuid.uuid4().hex}"


@needs_tcp_redis
async def test_the_hop_path_commands_answer_as_redis_py_does(mux: MuxRedis, plain: Redis) -> None:
    key, other = _key(), _key()
    assert await mux.set(key, b"value", ex=60) is True
    assert await plain.get(key) == b"value" and 0 < await plain.ttl(key) <= 60
    assert await mux.get(key) == b"value"
    assert await mux.get(_key()) is None
    assert await mux.mget(key, other) == [b"value", None]
    assert await mux.eval("return redis.call('GET', KEYS[1])", 1, key) == b"value"
    assert await mux.eval("return tonumber(ARGV[1]) + 1", 0, 41) == 42
    assert await mux.delete(key, other) == 1
    assert await plain.exists(key) == 0


@needs_tcp_redis
async def test_the_rate_limiters_mget_of_a_list_and_zrem_answer_as_redis_py_does(mux: MuxRedis, plain: Redis) -> None:
    """core.ratelimit's other calls (peek: MGET of a list; end: ZREM in a pipeline), on both clients."""
    key, other, flying = _key(), _key(), _key()
    await plain.set(key, b"3")
    for client in (plain, mux):
        assert await client.mget([key, other]) == [b"3", None]
        assert await client.mget([key], other) == [b"3", None]
        assert await client.mget(key, other) == [b"3", None]
    await plain.zadd(flying, {"a": 1.0, "b": 2.0, "c": 3.0})
    assert await mux.zrem(flying, "a") == 1 == await plain.zrem(flying, "b")
    assert await mux.zrem(flying, "a", "nothing") == 0 == await plain.zrem(flying, "a")
    pipe = mux.pipeline(transaction=False)
    pipe.zrem(flying, "c").mget([key, other])
    assert await pipe.execute() == [1, [b"3", None]]
    assert await plain.exists(flying) == 0


@needs_tcp_redis
async def test_a_pipeline_answers_each_command_in_order(mux: MuxRedis, plain: Redis) -> None:
    key, other = _key(), _key()
    await plain.set(other, b"there")
    pipe = mux.pipeline(transaction=False)
    pipe.set(key, b"one", ex=30)
    pipe.get(key)
    pipe.execute_command("MGET", key, other)
    pipe.delete(other)
    assert await pipe.execute() == [True, b"one", [b"one", b"there"], 1]
    assert await plain.get(other) is None
    with pytest.raises(NotImplementedError):
        mux.pipeline(transaction=True)


@needs_tcp_redis
async def test_concurrent_callers_share_one_connection_and_each_gets_its_own_reply(mux: MuxRedis,
                                                                                  plain: Redis) -> None:
    keys = [_key() for _ in range(300)]
    await plain.mset({k: f"v{i}".encode() for i, k in enumerate(keys)})
    clients_before = (await plain.info("clients"))["connected_clients"]
    replies = await asyncio.gather(*(mux.get(k) for k in keys))
    assert replies == [f"v{i}".encode() for i in range(len(keys))]
    ids = await asyncio.gather(*(mux.execute_command("CLIENT", "ID") for _ in range(20)))
    assert len(set(ids)) == 1  # one connection for all of them
    assert (await plain.info("clients"))["connected_clients"] == clients_before + 1
    await plain.delete(*keys)


@needs_tcp_redis
async def test_a_cancelled_caller_leaves_the_others_replies_matched(mux: MuxRedis, plain: Redis) -> None:
    keys = [_key() for _ in range(60)]
    await plain.mset({k: k.encode() for k in keys})
    await mux.get(keys[0])  # connected: the commands below are written at once
    tasks = [asyncio.ensure_future(mux.get(k)) for k in keys]
    await asyncio.sleep(0)  # every command written
    for task in tasks[::2]:
        task.cancel()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    for i, (key, outcome) in enumerate(zip(keys, outcomes, strict=True)):
        if i % 2:
            assert outcome == key.encode()
        else:
            assert isinstance(outcome, asyncio.CancelledError)
    assert await mux.get(keys[-1]) == keys[-1].encode()
    await plain.delete(*keys)


@needs_tcp_redis
async def test_an_error_reply_is_raised_as_redis_py_raises_it_and_the_connection_goes_on(mux: MuxRedis) -> None:
    key = _key()
    with pytest.raises(ResponseError, match="boom"):
        await mux.eval("return redis.error_reply('boom')", 0)
    pipe = mux.pipeline()
    pipe.set(key, b"x", ex=30)
    pipe.eval("return redis.error_reply('second')", 0)
    with pytest.raises(ResponseError, match="second"):
        await pipe.execute()
    assert await mux.get(key) == b"x"  # the pipeline's other command ran, as in redis-py
    await mux.delete(key)


@needs_tcp_redis
async def test_a_connection_the_server_closed_is_replaced_at_the_next_command(mux: MuxRedis, plain: Redis) -> None:
    first = await mux.execute_command("CLIENT", "ID")
    assert await plain.client_kill_filter(_id=first) == 1
    for _ in range(50):  # until this process has read the hang-up
        if mux._conn is None:
            break
        await asyncio.sleep(0.02)
    second = await mux.execute_command("CLIENT", "ID")
    assert second != first


@needs_tcp_redis
async def test_credentials_and_database_of_the_url_are_used(plain: Redis) -> None:
    user, password = f"mux{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    base = URL.split("://", 1)[1].split("/", 1)[0].rsplit("@", 1)[-1]
    await plain.acl_setuser(user, enabled=True, passwords=[f"+{password}"], keys=["*"], commands=["+@all"])
    client = MuxRedis.from_url(f"redis://{user}:{password}@{base}/7")
    wrong = MuxRedis.from_url(f"redis://{user}:not-it@{base}/7")
    assert client is not None and wrong is not None
    key = _key()
    try:
        assert await client.set(key, b"in seven", ex=30) is True
        seven = Redis.from_url(f"redis://{base}/7")
        try:
            assert await seven.get(key) == b"in seven"
            await seven.delete(key)
        finally:
            await seven.aclose()
        with pytest.raises(AuthenticationError):
            await wrong.get(key)
    finally:
        await client.aclose()
        await wrong.aclose()
        await plain.acl_deluser(user)


def test_only_plain_redis_urls_are_taken() -> None:
    assert MuxRedis.from_url("rediss://127.0.0.1:6380/0") is None
    assert MuxRedis.from_url("unix:///tmp/redis.sock") is None
    assert MuxRedis.from_url("redis://127.0.0.1:6379/0?socket_timeout=2") is None
    assert MuxRedis.from_url("redis://127.0.0.1:6379/cache") is None
    taken = MuxRedis.from_url("redis://user:p%40ss@127.0.0.1:6390/4", timeout=2.5)
    assert taken is not None
    assert (taken.host, taken.port, taken._username, taken._password, taken._db, taken.timeout) == \
        ("127.0.0.1", 6390, "user", "p@ss", 4, 2.5)


async def _server(handler: Any) -> tuple[asyncio.AbstractServer, int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_commands_unanswered_past_the_timeout_fail_and_the_next_connects_again() -> None:
    """A server that reads and never answers (hung, or a network gone quiet): every command in flight fails with
    redis-py's TimeoutError after the timeout, and the next command opens a new connection."""
    connections: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        while await reader.read(4096):
            if len(connections) > 1:  # the second connection answers
                writer.write(b"$2\r\nok\r\n")
                await writer.drain()

    server, port = await _server(silent)
    client = MuxRedis("127.0.0.1", port, timeout=0.3)
    try:
        started = asyncio.get_running_loop().time()
        outcomes = await asyncio.gather(client.get("a"), client.get("b"), return_exceptions=True)
        assert all(isinstance(o, RedisTimeoutError) for o in outcomes), outcomes
        assert 0.25 <= asyncio.get_running_loop().time() - started < 2.0
        assert await client.get("c") == b"ok"
        assert len(connections) == 2
    finally:
        await client.aclose()
        server.close()


async def test_a_hang_up_mid_command_fails_the_commands_in_flight_with_a_connection_error() -> None:
    async def hangs_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(4096)
        writer.close()

    server, port = await _server(hangs_up)
    client = MuxRedis("127.0.0.1", port, timeout=5.0)
    try:
        with pytest.raises(RedisConnectionError):
            await client.get("a")
    finally:
        await client.aclose()
        server.close()


async def test_a_reply_nobody_asked_for_drops_the_connection() -> None:
    """A reply past the commands in flight (a server or proxy gone wrong): nothing after it could be matched to its
    command, so the connection goes instead of answering a later command with another's reply."""
    async def answers_twice(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(4096):
            writer.write(b"+one\r\n+two\r\n")
            await writer.drain()

    server, port = await _server(answers_twice)
    client = MuxRedis("127.0.0.1", port, timeout=2.0)
    try:
        first = await client.execute_command("PING")
        assert first == b"one"
        conn = client._conn
        for _ in range(50):
            if conn is None or conn.closed:
                break
            await asyncio.sleep(0.02)
        assert conn is None or conn.closed
        assert await client.execute_command("PING") == b"one"  # on a new connection
    finally:
        await client.aclose()
        server.close()


async def test_no_server_is_a_connection_error_at_once() -> None:
    server, port = await _server(lambda r, w: None)
    server.close()
    await server.wait_closed()
    client = MuxRedis("127.0.0.1", port, timeout=1.0)
    with pytest.raises(RedisConnectionError, match="Error connecting"):
        await client.get("a")
    await client.aclose()


@needs_tcp_redis
def test_under_uvloop_as_serve_runs_it() -> None:
    """`serve` runs on uvloop, whose transports are not asyncio's: the same commands, a hang-up, a new connection."""
    import uvloop

    async def scenario() -> None:
        mux, plain = MuxRedis.from_url(URL, timeout=5.0), Redis.from_url(URL)
        assert mux is not None
        keys = [_key() for _ in range(50)]
        try:
            pipe = mux.pipeline()
            for i, key in enumerate(keys):
                pipe.set(key, str(i), ex=30)
            assert await pipe.execute() == [True] * len(keys)
            assert await asyncio.gather(*(mux.get(k) for k in keys)) == [str(i).encode() for i in range(len(keys))]
            first = await mux.execute_command("CLIENT", "ID")
            await plain.client_kill_filter(_id=first)
            await asyncio.sleep(0.1)
            assert await mux.execute_command("CLIENT", "ID") != first
            await plain.delete(*keys)
        finally:
            await mux.aclose()
            await plain.aclose()

    uvloop.run(scenario())


@needs_tcp_redis
async def test_an_opening_whose_callers_were_all_cancelled_is_not_reused_after_the_connection_goes(
        plain: Redis) -> None:
    """A hop cut by its budget while the connection opened: the opening finished for nobody. When that connection
    later goes, the next command opens a new one (it was handed the dead one and waited forever)."""
    mux = MuxRedis.from_url(URL, timeout=0.5)
    assert mux is not None
    try:
        first = asyncio.ensure_future(mux.get(_key()))
        await asyncio.sleep(0)
        first.cancel()
        for _ in range(50):
            if mux._conn is not None:
                break
            await asyncio.sleep(0.02)
        killed = await mux.execute_command("CLIENT", "ID")
        await plain.client_kill_filter(_id=killed)
        await asyncio.sleep(0.1)
        assert await asyncio.wait_for(mux.get(_key()), 3) is None
        assert await mux.execute_command("CLIENT", "ID") != killed
    finally:
        await mux.aclose()


async def test_a_connection_lost_before_its_first_command_is_a_connection_error_not_a_silent_drop() -> None:
    """A server that refuses at once (Redis at maxclients answers an error and hangs up): the command fails at once
    with a connection error, and is not written to a closed transport to wait forever."""
    async def full(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"-ERR max number of clients reached\r\n")
        await writer.drain()
        writer.close()

    server, port = await _server(full)
    client = MuxRedis("127.0.0.1", port, timeout=0.5)
    try:
        for _ in range(3):
            with pytest.raises(RedisConnectionError):
                await asyncio.wait_for(client.get("a"), 3)
    finally:
        await client.aclose()
        server.close()


async def test_closing_while_the_connection_opens_leaves_no_connection_open() -> None:
    hung_up = asyncio.Event()

    async def answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(4096):
            writer.write(b"+OK\r\n")
        hung_up.set()

    server, port = await _server(answers)
    client = MuxRedis("127.0.0.1", port, db=2, timeout=2.0)
    try:
        pending = asyncio.ensure_future(client.get("a"))
        await asyncio.sleep(0)  # opening (and selecting the database)
        await client.aclose()
        with pytest.raises(RedisConnectionError, match="client closed"):
            await pending
        assert client._conn is None
        await asyncio.wait_for(hung_up.wait(), 3)  # the connection it opened was closed
    finally:
        server.close()


@needs_tcp_redis
async def test_a_quiet_connection_is_probed_so_a_silently_dropped_one_is_found(mux: MuxRedis) -> None:
    import socket

    await mux.get(_key())
    assert mux._conn is not None
    sock = mux._conn.transport.get_extra_info("socket")
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    if hasattr(socket, "TCP_KEEPIDLE"):
        assert (sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
                sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT)) == (30, 10, 3)


@needs_tcp_redis
async def test_the_commands_of_one_turn_of_the_loop_leave_in_one_write(mux: MuxRedis, plain: Redis) -> None:
    keys = [_key() for _ in range(20)]
    await plain.mset({k: k.encode() for k in keys})
    await mux.get(keys[0])  # connected
    assert mux._conn is not None
    transport = mux._conn.transport
    writes: list[bytes] = []
    real_write = transport.write

    def write(data: bytes) -> None:
        writes.append(data)
        real_write(data)

    mux._conn.transport = type("Counted", (), {"write": staticmethod(write),
                                               "is_closing": staticmethod(transport.is_closing)})()
    try:
        replies = await asyncio.gather(*(mux.get(k) for k in keys), mux.mget(keys[0], keys[1]))
    finally:
        mux._conn.transport = transport
    assert replies == [k.encode() for k in keys] + [[keys[0].encode(), keys[1].encode()]]
    assert len(writes) == 1 and writes[0].count(b"GET") == 21
    await plain.delete(*keys)


@needs_tcp_redis
async def test_a_commands_time_counts_from_its_write_not_from_its_request() -> None:
    """The loop held up past the timeout between the request and the turn's write (another task's blocking step):
    the command is answered. Counted from the request, it failed, and every command in flight with it."""
    import time

    mux = MuxRedis.from_url(URL, timeout=0.3)
    assert mux is not None
    try:
        await mux.get(_key())  # connected

        async def blocking_step() -> None:
            time.sleep(0.5)  # noqa: ASYNC251 - the point: the loop held up

        asked = asyncio.ensure_future(mux.get(_key()))
        held = asyncio.ensure_future(blocking_step())
        assert await asked is None
        await held
    finally:
        await mux.aclose()
