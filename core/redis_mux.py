"""Redis commands of many coroutines over one connection: the hot paths' plain commands (Runtime.hot_redis: a USSD
hop's session read and save, an SMS send's rate slot, lock and kept answer, an API request's rate limit and
revocation mark, a provider callback's rate limit).

redis-py checks a pooled connection out for each command and writes and reads it alone: about 125 µs of CPU per
command in a `serve` process under load (bench/README.md). Here the commands asked for in one turn of the event loop
(the hops that ran in it) are written together at its end, on one shared connection, and each reply is matched to
its command by order (Redis answers a connection's commands in the order they came): the commands of concurrent
hops leave in one send and come back in one read, about 10 µs each. Encoding and parsing are hiredis's (what
redis[hiredis] parses with); errors are redis-py's exception classes, so callers handle both clients alike.

Only the commands the hot paths send (GET, SET, MGET, DEL, EXISTS, EVAL, ZREM, and pipelines of them without MULTI:
every command core.ratelimit.RateLimiter sends, for the API's and provider callbacks' limits); blocking
commands, pub/sub and transactions stay on redis-py. Used for a plain `redis://` server (not a cluster, TLS, or a
Unix socket: those keep redis-py). A caller cancelled while waiting leaves its reply to be read and dropped: the
replies of the others stay matched. A command unanswered a timeout after its write fails every command in flight and the
connection is dropped (later replies could not be matched); the next command connects again.
"""

from __future__ import annotations

import asyncio
import collections
import math
import socket
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import hiredis
from redis.commands.helpers import list_or_args
from redis.connection import parse_url
from redis.exceptions import (
    AuthenticationError,
    BusyLoadingError,
    DataError,
    NoScriptError,
    ReadOnlyError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

_ERRORS: tuple[tuple[str, type[ResponseError] | type[RedisConnectionError]], ...] = (
    ("NOSCRIPT", NoScriptError), ("LOADING", BusyLoadingError), ("READONLY", ReadOnlyError),
    ("WRONGPASS", AuthenticationError), ("NOAUTH", AuthenticationError),
    ("ERR invalid password", AuthenticationError), ("ERR max number of clients reached", RedisConnectionError))


# Probes after 30 s of quiet, every 10 s, 3 unanswered: the connection goes (Linux names; elsewhere the system's).
KEEPALIVE: tuple[tuple[int, int], ...] = tuple(
    (getattr(socket, name), value) for name, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3))
    if hasattr(socket, name))


def _reply_error(message: str) -> Exception:
    """An error reply as the exception redis-py raises for it (returned by the reader, raised by the caller)."""
    for prefix, cls in _ERRORS:
        if message.startswith(prefix):
            return cls(message)
    return ResponseError(message)


class _Batch:
    """Commands written together and the future their replies complete."""

    __slots__ = ("deadline", "expected", "future", "replies")

    def __init__(self, future: asyncio.Future[list[Any]], expected: int) -> None:
        self.future = future
        self.expected = expected
        self.replies: list[Any] = []
        self.deadline = math.inf  # set when its bytes are written: the timeout counts from there, as a socket's does


class _Protocol(asyncio.Protocol):
    """One connection: batches in the order written, each completed as its replies arrive."""

    def __init__(self, on_lost: Any, timeout: float, address: str) -> None:
        self.transport: Any = None  # asyncio's or uvloop's TCP transport (not an asyncio.Transport subclass)
        self.reader = hiredis.Reader(replyError=_reply_error)
        self.pending: collections.deque[_Batch] = collections.deque()
        self.closed = False
        self.timer: asyncio.TimerHandle | None = None  # at the oldest command's deadline
        # Commands asked for in this turn of the event loop, written together at its end (one send for the hops
        # that ran in the same turn; their order kept, as their batches' in `pending`).
        self.unsent: list[bytes] = []  # one entry per batch: the last len(unsent) of `pending`
        self._on_lost = on_lost
        self._timeout = timeout
        self._address = address

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # A peer gone without a word (a firewall's idle entry dropped, a host lost) found within about a minute
            # of quiet, not at the next hop (which would wait out the timeout, with every hop then in flight).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            for option, value in KEEPALIVE:
                sock.setsockopt(socket.IPPROTO_TCP, option, value)

    def data_received(self, data: bytes) -> None:
        reader, pending = self.reader, self.pending
        try:
            reader.feed(data)
            while (reply := reader.gets()) is not False:
                batch = pending[0]
                batch.replies.append(reply)
                if len(batch.replies) == batch.expected:
                    pending.popleft()
                    if not batch.future.done():  # (its caller was cancelled)
                        batch.future.set_result(batch.replies)
        except Exception as exc:  # a reply nobody asked for, or bytes that are not RESP: nothing can be matched now
            self.fail(RedisConnectionError(f"Redis reply not understood: {type(exc).__name__}: {exc}"))

    def flush(self) -> None:
        """Write what this turn asked for (called soon after the first of it); its commands' time starts now."""
        data, self.unsent = self.unsent, []
        if self.closed or not data:
            return
        try:
            self.transport.write(data[0] if len(data) == 1 else b"".join(data))
        except Exception as exc:  # the transport refused (closed under it): what was written of it is unknown
            self.fail(RedisConnectionError(f"Connection lost: {exc}"))
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        pending = self.pending
        for i in range(1, min(len(data), len(pending)) + 1):  # the newest batches are these (none answered yet)
            pending[-i].deadline = deadline
        if self.timer is None:
            self.timer = loop.call_at(deadline, self.check_timeouts)

    def check_timeouts(self) -> None:
        """The oldest command past its deadline fails the connection; else look again at its deadline."""
        self.timer = None
        if not self.pending or self.pending[0].deadline == math.inf:
            return  # nothing sent waits: the next flush starts the timer
        loop = asyncio.get_running_loop()
        oldest = self.pending[0].deadline
        if self.closed or oldest <= loop.time():
            self.fail(RedisTimeoutError(f"Timeout reading from {self._address}"))
            return
        self.timer = loop.call_at(oldest, self.check_timeouts)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(RedisConnectionError("Connection closed by server." if exc is None else f"Connection lost: {exc}"))

    def fail(self, error: Exception) -> None:
        """Every command in flight fails with `error`, and the connection goes."""
        if not self.closed:
            self.closed = True
            self._on_lost(self)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.unsent.clear()
        while self.pending:
            batch = self.pending.popleft()
            if not batch.future.done():
                batch.future.set_exception(error)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()


class _Commands:
    """The commands the hot paths send, each through `execute_command`: sent at once by the client (awaited), queued
    by a pipeline (returned for chaining)."""

    def execute_command(self, *args: Any) -> Any:
        raise NotImplementedError

    def get(self, name: str | bytes) -> Any:
        return self.execute_command("GET", name)

    def set(self, name: str | bytes, value: Any, ex: int | None = None, nx: bool = False) -> Any:
        return self.execute_command("SET", name, value, *(("EX", ex) if ex is not None else ()),
                                    *(("NX",) if nx else ()))

    def mget(self, keys: Any, *args: str | bytes) -> Any:
        """As redis-py's: the keys as arguments, or a list of them (RateLimiter.peek) followed by any more."""
        return self.execute_command("MGET", *list_or_args(keys, args))

    def delete(self, *names: str | bytes) -> Any:
        return self.execute_command("DEL", *names)

    def exists(self, *names: str | bytes) -> Any:
        return self.execute_command("EXISTS", *names)

    def eval(self, script: str, numkeys: int, *keys_and_args: Any) -> Any:
        return self.execute_command("EVAL", script, numkeys, *keys_and_args)

    def zrem(self, name: str | bytes, *values: Any) -> Any:
        return self.execute_command("ZREM", name, *values)


class MuxRedis(_Commands):
    """The subset of redis.asyncio.Redis the hot paths call, on one multiplexed connection."""

    def __init__(self, host: str, port: int, *, username: str | None = None, password: str | None = None,
                 db: int = 0, timeout: float = 1.0, connect_timeout: float | None = None) -> None:
        self.host, self.port = host, port
        self._username, self._password, self._db = username, password, db
        self.timeout = timeout
        self.connect_timeout = timeout if connect_timeout is None else connect_timeout
        self._conn: _Protocol | None = None
        self._connecting: asyncio.Future[_Protocol] | None = None
        self._closing = False

    @classmethod
    def from_url(cls, url: str, *, timeout: float = 1.0) -> MuxRedis | None:
        """A client for a plain `redis://host:port/db` URL; None for any other (rediss://, unix://, options in its
        query string): those stay with redis-py."""
        split = urlsplit(url)
        database = split.path.strip("/")
        if split.scheme != "redis" or split.query or (database and not database.isdigit()):
            return None  # (a database that is not a number is refused at start: core.config)
        parts = parse_url(url)  # redis-py's own reading of it: user, password, host, port, database
        if not parts.get("host"):
            return None
        return cls(parts["host"], parts.get("port") or 6379, username=parts.get("username") or None,
                   password=parts.get("password") or None, db=int(parts.get("db") or 0), timeout=timeout)

    # -- the commands ----------------------------------------------------------------------------------------

    async def execute_command(self, *args: Any) -> Any:
        reply = (await self._send((args,)))[0]
        if isinstance(reply, Exception):
            raise reply
        return _as_redis_py(args, reply)

    def pipeline(self, transaction: bool = False) -> MuxPipeline:
        if transaction:
            raise NotImplementedError("MULTI/EXEC pipelines go through redis-py")
        return MuxPipeline(self)

    async def aclose(self) -> None:
        """Close the connection, and one still being opened (it is closed when it opens)."""
        self._closing = True
        connecting = self._connecting
        if connecting is not None and not connecting.done():
            await asyncio.wait({connecting})
        if self._conn is not None:
            self._conn.fail(RedisConnectionError("client closed"))

    # -- the connection --------------------------------------------------------------------------------------

    async def _send(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        conn = self._conn
        if conn is None or conn.closed:
            conn = await self._connected()
        return await self._write(conn, commands)

    async def _write(self, conn: _Protocol, commands: Sequence[Sequence[Any]]) -> list[Any]:
        if conn.closed or conn.transport is None or conn.transport.is_closing():
            # (lost between its opening and this caller's turn): asyncio's transport would drop the bytes unsaid
            raise RedisConnectionError("Connection closed by server.")
        try:
            if len(commands) == 1:
                data = hiredis.pack_command(tuple(commands[0]))
            else:
                data = b"".join(hiredis.pack_command(tuple(c)) for c in commands)
        except Exception as exc:  # a value hiredis cannot encode: nothing was written
            raise DataError(f"command not sent: {exc}") from exc
        loop = asyncio.get_running_loop()
        batch = _Batch(loop.create_future(), len(commands))
        if not conn.unsent:
            loop.call_soon(conn.flush)
        conn.unsent.append(data)
        conn.pending.append(batch)
        return await batch.future

    async def _connected(self) -> _Protocol:
        connecting = self._connecting
        if connecting is None or connecting.done():
            # One opening at a time, whoever waits for it: its outcome is read (and forgotten) when it ends, even
            # if every caller waiting for it was cancelled meanwhile (a later caller opens a new one).
            connecting = self._connecting = asyncio.ensure_future(self._connect())
            connecting.add_done_callback(self._opened)
        # shield: a cancelled caller must not cancel the opening the others wait for
        return await asyncio.shield(connecting)

    def _opened(self, connecting: asyncio.Future[_Protocol]) -> None:
        if self._connecting is connecting:
            self._connecting = None
        if not connecting.cancelled():
            connecting.exception()  # read: an opening nobody awaited any more is not logged as never retrieved

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Protocol(self._lost, self.timeout, f"{self.host}:{self.port}"), self.host, self.port)
        except TimeoutError:
            raise RedisTimeoutError(f"Timeout connecting to {self.host}:{self.port}") from None
        except OSError as exc:
            raise RedisConnectionError(f"Error connecting to {self.host}:{self.port}: {exc}") from exc
        hello: list[tuple[Any, ...]] = []
        if self._password is not None:
            hello.append(("AUTH", self._username, self._password) if self._username else ("AUTH", self._password))
        if self._db:
            hello.append(("SELECT", self._db))
        if hello:
            try:
                for reply in await self._write(conn, hello):
                    if isinstance(reply, Exception):
                        raise reply
            except BaseException:
                conn.fail(RedisConnectionError("connection set-up failed"))
                raise
        if self._closing:
            conn.fail(RedisConnectionError("client closed"))
            raise RedisConnectionError("client closed")
        self._conn = conn
        return conn

    def _lost(self, conn: _Protocol) -> None:
        if self._conn is conn:
            self._conn = None


class MuxPipeline(_Commands):
    """Commands written in one go, replies in order (no MULTI): what the hot paths' pipelines need."""

    def __init__(self, client: MuxRedis) -> None:
        self._client = client
        self._commands: list[tuple[Any, ...]] = []

    def execute_command(self, *args: Any) -> MuxPipeline:
        self._commands.append(args)
        return self

    async def execute(self) -> list[Any]:
        """The replies in order; the first error reply raised, as redis-py's pipeline does (the other commands ran)."""
        commands, self._commands = self._commands, []
        if not commands:
            return []
        replies = await self._client._send(commands)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return [_as_redis_py(command, reply) for command, reply in zip(commands, replies, strict=True)]


def _as_redis_py(command: Sequence[Any], reply: Any) -> Any:
    """A reply as redis-py gives it: SET's OK as True (None when NX kept it from writing); others as they are."""
    return True if command[0] == "SET" and reply == b"OK" else reply
