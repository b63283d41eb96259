"""`main.py migrate` and the commands that read the migration state, run as an operator would: alembic's lines
about its connection ("Context impl PostgresqlImpl.", "Will assume transactional DDL.") are not in their output;
the revisions an upgrade applies are, in the service's JSON log format."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import _base_env, make_settings, requires_pg

ROOT = Path(__file__).resolve().parent.parent


def _main(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "main.py", *args], cwd=ROOT, capture_output=True, text=True,
                          env=_base_env(), timeout=120, check=False, stdin=subprocess.DEVNULL)


@requires_pg
def test_commands_at_the_head_print_nothing_of_alembic(migrated_database):
    from alembic.script import ScriptDirectory

    from main import _alembic_config

    head = ScriptDirectory.from_config(_alembic_config(make_settings())).get_current_head()
    migrated = _main("migrate")
    assert migrated.returncode == 0, migrated.stderr
    # One line of its own (at the head, nothing of alembic's): an operator re-running it saw no output at all.
    assert (migrated.stdout, migrated.stderr) == (f"migrate: the database is at {head}, the head; nothing to do\n",
                                                  "")

    pruned = _main("prune", "--dry-run")  # reads the migration state first, as serve, worker and the admin commands
    assert pruned.returncode == 0, pruned.stderr
    assert pruned.stderr == ""
    assert pruned.stdout.splitlines()[0].startswith("outbox_jobs: ")


@requires_pg
def test_an_upgrade_logs_the_revisions_it_applied_and_only_those(migrated_database):
    from alembic import command
    from alembic.script import ScriptDirectory

    from main import _alembic_config

    config = _alembic_config(make_settings())
    head = ScriptDirectory.from_config(config).get_revision("head")
    command.downgrade(config, "-1")
    upgraded = _main("migrate")
    assert upgraded.returncode == 0, upgraded.stderr
    lines = [json.loads(line) for line in upgraded.stderr.splitlines()]
    assert [(line["level"], line["logger"], line["msg"].split(",")[0]) for line in lines] == [
        ("INFO", "alembic.runtime.migration", f"Running upgrade {head.down_revision} -> {head.revision}")]
    assert upgraded.stdout == f"migrate: the database went from {head.down_revision} to {head.revision}, the head\n"
    assert _main("migrate").stderr == ""


@requires_pg
def test_seed_demo_on_a_database_behind_the_code_says_run_migrate(migrated_database):
    # As serve, worker and the admin commands: not a "cannot start: ProgrammingError: column ... does not exist"
    # (the exit code of a database that cannot be reached) from the first query the seed makes.
    from alembic import command

    from main import _alembic_config

    command.downgrade(_alembic_config(make_settings()), "0025")  # before cooperatives.language (0026)
    try:
        seeded = _main("seed-demo")
        assert seeded.returncode == 3, seeded.stderr
        assert seeded.stderr.strip().startswith("refusing to start: database is at ['0025'], code expects ")
        assert seeded.stderr.strip().endswith("run `.venv/bin/python main.py migrate`")
    finally:
        assert _main("migrate").returncode == 0


@requires_pg
async def test_two_migrates_at_once_apply_each_revision_once_and_both_succeed(migrated_database):
    """A deploy tool that runs `migrate` on every machine at once: the second waits for the first (an advisory
    lock) and then finds nothing left to do. Without it both ran 0027: the second found the first's index build
    in progress (INVALID, as an interrupted build leaves it), dropped it to build it again, and one of them died
    with "cannot start: Error: deadlock detected" (exit 4), or the other's version stamp found no row to move."""
    import asyncio

    import asyncpg
    from alembic import command
    from alembic.script import ScriptDirectory

    from main import _alembic_config, migrate

    settings = make_settings()
    config = _alembic_config(settings)
    head = ScriptDirectory.from_config(config).get_current_head()
    dsn = migrated_database.replace("postgresql+asyncpg://", "postgresql://")

    async def start() -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable, "main.py", "migrate", cwd=ROOT, env=_base_env(), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    async def building() -> bool:
        return bool(await watcher.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE query ILIKE 'CREATE INDEX%' AND datname = current_database()"))

    await asyncio.to_thread(command.downgrade, config, "0026")  # before 0027's index, built CONCURRENTLY
    writer, watcher = await asyncpg.connect(dsn), await asyncpg.connect(dsn)
    processes = []
    try:
        in_flight = writer.transaction()  # a payment's transaction: the first build waits for it
        await in_flight.start()
        await writer.execute("UPDATE payments SET status = status WHERE false")
        processes.append(await start())
        for _ in range(300):
            if await building():
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the first migrate never started its index build")
        processes.append(await start())
        # The second migrate reaches what the first is building: until it says it waits for it, not a fixed pause
        # (a loaded host's second migrate, slower to start, came once the first was done: nothing was tested).
        # 60 s at most: never waiting fails the test (two at once, without the lock).
        said_first: list[bytes] = []
        while not (said_first and b"another migrate is running" in said_first[-1]):
            line = await asyncio.wait_for(processes[1].stderr.readline(), 60)  # type: ignore[union-attr]
            assert line, b"".join(said_first).decode()  # ended without waiting for the first
            said_first.append(line)
        await in_flight.commit()
        outputs = [await asyncio.wait_for(process.communicate(), 120) for process in processes]
        outputs[1] = (outputs[1][0], b"".join(said_first) + outputs[1][1])
        said = [(process.returncode, [json.loads(line)["msg"].split(",")[0] for line in err.decode().splitlines()
                                      if line.startswith("{")], err.decode().splitlines()[-1:] if err else [])
                for process, (_out, err) in zip(processes, outputs, strict=True)]
        steps = [f"Running upgrade {r.down_revision} -> {r.revision}" for r in reversed(list(
            ScriptDirectory.from_config(config).iterate_revisions(head, "0026")))]
        assert steps[0] == "Running upgrade 0026 -> 0027" and steps[-1].endswith(f"-> {head}"), steps
        assert said[0] == (0, steps, said[0][2]), said
        assert said[1][0] == 0 and not any(line.startswith("Running upgrade") for line in said[1][1]), said
        # Each says what it did: the second found the database at the head once the first was done (it said "went
        # from 0026" as the first did, having read where the database was before it waited).
        assert [out.decode() for out, _err in outputs] == [
            f"migrate: the database went from 0026 to {head}, the head\n",
            f"migrate: the database is at {head}, the head; nothing to do\n"]
        assert await watcher.fetchval("SELECT version_num FROM alembic_version") == head
        assert await watcher.fetchval("SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                                      "WHERE c.relname = 'ix_payments_coop_type_due'") is True
    finally:
        for process in processes:
            if process.returncode is None:
                process.kill()
                await process.wait()
        await writer.close()
        await watcher.close()
        await asyncio.to_thread(migrate, settings)


def _dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://")


async def _start_migrate(**env: str):  # type: ignore[no-untyped-def]
    import asyncio

    return await asyncio.create_subprocess_exec(
        sys.executable, "main.py", "migrate", cwd=ROOT, env={**_base_env(), **env}, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)


async def _an_export_holding_payments(dsn: str):  # type: ignore[no-untyped-def]
    """A CSV export streaming in one transaction: it holds its lock on payments until it ends."""
    import asyncpg

    export = await asyncpg.connect(dsn, server_settings={"application_name": "csv-export"})
    in_flight = export.transaction()
    await in_flight.start()
    await export.fetchval("SELECT count(*) FROM payments")
    return export, in_flight


@requires_pg
async def test_migrate_behind_a_long_transaction_retries_short_lock_waits_and_then_succeeds(migrated_database):
    """An ALTER TABLE waiting for its ACCESS EXCLUSIVE lock behind an export queues every later read and write of
    the table behind it: the whole gateway stalled for as long as the export ran. With MIGRATE_LOCK_TIMEOUT_SECONDS
    it gives up the wait after that long, logs a WARNING naming the table and the transaction it waited for, and
    tries again (payments are served in between); once the export ends, the migration goes through."""
    import asyncio
    import time

    import asyncpg
    from alembic import command
    from alembic.script import ScriptDirectory

    from main import _alembic_config, migrate

    settings = make_settings()
    config = _alembic_config(settings)
    head = ScriptDirectory.from_config(config).get_current_head()
    dsn = _dsn(migrated_database)
    await asyncio.to_thread(command.downgrade, config, "0023")  # before 0024's ALTER TABLE payments
    export, in_flight = await _an_export_holding_payments(dsn)
    payer = await asyncpg.connect(dsn)
    process = None
    try:
        export_pid = await export.fetchval("SELECT pg_backend_pid()")
        process = await _start_migrate(MIGRATE_LOCK_TIMEOUT_SECONDS="0.5", MIGRATE_LOCK_RETRIES="20")
        assert process.stderr is not None
        warnings: list[str] = []
        while len(warnings) < 2:
            line = await asyncio.wait_for(process.stderr.readline(), 30)
            assert line, "migrate ended before it retried"
            record = json.loads(line)
            if record["level"] == "WARNING":
                warnings.append(record["msg"])
        for warning in warnings:
            assert "payments" in warning and f"pid {export_pid}" in warning, warning
            assert "csv-export" in warning and "idle in transaction" in warning, warning
        # Meanwhile a payment is written: it waits at most the migration's lock timeout, not the export's length.
        started = time.monotonic()
        await payer.execute("UPDATE payments SET status = status WHERE false", timeout=10)
        assert time.monotonic() - started < 3
        await in_flight.commit()
        _out, err = await asyncio.wait_for(process.communicate(), 120)
        assert process.returncode == 0, err.decode()
        assert await payer.fetchval("SELECT version_num FROM alembic_version") == head
        assert await payer.fetchval("SELECT count(*) FROM information_schema.columns "
                                    "WHERE table_name = 'payments' AND column_name = 'reviewed_at'") == 1
    finally:
        if process is not None and process.returncode is None:
            process.kill()
            await process.wait()
        if not export.is_closed():
            await export.close()
        await payer.close()
        await asyncio.to_thread(migrate, settings)


@requires_pg
@pytest.mark.parametrize("log_level", ["INFO", "WARNING"])  # WARNING: alembic's "Running upgrade" line is not logged
async def test_migrate_behind_a_transaction_that_never_ends_fails_naming_it(migrated_database, log_level):
    import asyncio

    import asyncpg
    from alembic import command

    from main import _alembic_config, migrate

    settings = make_settings()
    dsn = _dsn(migrated_database)
    await asyncio.to_thread(command.downgrade, _alembic_config(settings), "0023")
    export, _in_flight = await _an_export_holding_payments(dsn)
    watcher = await asyncpg.connect(dsn)
    try:
        export_pid = await export.fetchval("SELECT pg_backend_pid()")
        process = await _start_migrate(MIGRATE_LOCK_TIMEOUT_SECONDS="0.2", MIGRATE_LOCK_RETRIES="2",
                                       LOG_LEVEL=log_level)
        _out, err = await asyncio.wait_for(process.communicate(), 60)
        lines = err.decode().splitlines()
        assert process.returncode == 3, lines
        warnings = [json.loads(line)["msg"] for line in lines if line.startswith("{")
                    and json.loads(line)["level"] == "WARNING"]
        assert len(warnings) == 2, lines  # the two retries
        last = lines[-1]
        assert last.startswith("refusing to migrate: CommandError: migration upgrade 0023 -> 0024 never got "), last
        assert all(w.startswith("migration upgrade 0023 -> 0024 waited ") for w in warnings), warnings
        for words in ("0024", "payments", f"pid {export_pid}", "csv-export", "idle in transaction",
                      "MIGRATE_LOCK_TIMEOUT_SECONDS"):
            assert words in last, (words, last)
        assert await watcher.fetchval("SELECT version_num FROM alembic_version") == "0023"
        assert await watcher.fetchval("SELECT count(*) FROM information_schema.columns "
                                      "WHERE table_name = 'payments' AND column_name = 'reviewed_at'") == 0
    finally:
        await export.close()
        await watcher.close()
        await asyncio.to_thread(migrate, settings)


@requires_pg
async def test_migrate_as_the_databases_owner_names_another_roles_transaction_as_it_is(migrated_database):
    """The README has `migrate` run as the database's owner (`createuser gateway`), not a superuser. PostgreSQL hides
    the state and age of another role's session (an admin's psql as `postgres`) from such a role: the blocker was
    then named "a prepared transaction: pg_prepared_xacts", sending the operator to look for one that is not there."""
    import asyncio
    import uuid

    import asyncpg
    from alembic import command
    from sqlalchemy.engine import make_url

    from main import _alembic_config, migrate

    settings = make_settings()
    dsn = _dsn(migrated_database)
    await asyncio.to_thread(command.downgrade, _alembic_config(settings), "0023")
    admin = await asyncpg.connect(dsn)
    role = f"owner_{uuid.uuid4().hex[:10]}"
    owner = await admin.fetchval("SELECT tableowner FROM pg_tables WHERE tablename = 'payments'")
    await admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'pw'")
    await admin.execute(f"ALTER TABLE payments OWNER TO {role}")  # what 0024 alters
    await admin.execute(f"GRANT ALL ON alembic_version TO {role}")
    await admin.execute(f"GRANT ALL ON SCHEMA public TO {role}")
    export, _in_flight = await _an_export_holding_payments(dsn)  # as the superuser: another role's session
    try:
        export_pid = await export.fetchval("SELECT pg_backend_pid()")
        as_owner = make_url(migrated_database).set(username=role, password="pw")
        process = await _start_migrate(DATABASE_URL=as_owner.render_as_string(hide_password=False),
                                       MIGRATE_LOCK_TIMEOUT_SECONDS="0.2", MIGRATE_LOCK_RETRIES="0")
        _out, err = await asyncio.wait_for(process.communicate(), 60)
        lines = err.decode().splitlines()
        assert process.returncode == 3, lines
        last = lines[-1]
        assert last.startswith("refusing to migrate: CommandError: migration upgrade 0023 -> 0024 never got "), last
        assert "prepared transaction" not in last, last
        for words in (f"pid {export_pid}", "csv-export", repr(owner)):
            assert words in last, (words, last)
    finally:
        await export.close()
        await admin.execute(f"ALTER TABLE payments OWNER TO {owner}")
        await admin.execute(f"DROP OWNED BY {role}")
        await admin.execute(f"DROP ROLE {role}")
        await admin.close()
        await asyncio.to_thread(migrate, settings)


@requires_pg
async def test_migrate_with_a_lock_timeout_still_lets_a_concurrent_index_build_wait(migrated_database):
    """CREATE INDEX CONCURRENTLY waits for the transactions open when it starts, by design and without holding up
    writes: the lock timeout is for the migrations' transactions, not for their autocommit blocks."""
    import asyncio

    import asyncpg
    from alembic import command
    from alembic.script import ScriptDirectory

    from main import _alembic_config, migrate

    settings = make_settings()
    config = _alembic_config(settings)
    head = ScriptDirectory.from_config(config).get_current_head()
    dsn = _dsn(migrated_database)
    await asyncio.to_thread(command.downgrade, config, "0026")  # before 0027's index, built CONCURRENTLY
    writer, watcher = await asyncpg.connect(dsn), await asyncpg.connect(dsn)
    process = None
    try:
        in_flight = writer.transaction()
        await in_flight.start()
        await writer.execute("UPDATE payments SET status = status WHERE false")
        process = await _start_migrate(MIGRATE_LOCK_TIMEOUT_SECONDS="0.2", MIGRATE_LOCK_RETRIES="0")
        for _ in range(300):
            if await watcher.fetchval("SELECT count(*) FROM pg_stat_activity WHERE query ILIKE 'CREATE INDEX%' "
                                      "AND wait_event_type = 'Lock' AND datname = current_database()"):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the index build never waited")
        await asyncio.sleep(1.5)  # far past the lock timeout
        assert process.returncode is None
        await in_flight.commit()
        _out, err = await asyncio.wait_for(process.communicate(), 120)
        assert process.returncode == 0, err.decode()
        assert "WARNING" not in err.decode()
        assert await watcher.fetchval("SELECT version_num FROM alembic_version") == head
        assert await watcher.fetchval("SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                                      "WHERE c.relname = 'ix_payments_coop_type_due'") is True
    finally:
        if process is not None and process.returncode is None:
            process.kill()
            await process.wait()
        await writer.close()
        await watcher.close()
        await asyncio.to_thread(migrate, settings)


@pytest.mark.parametrize(("name", "raw", "said"), [
    ("MIGRATE_LOCK_TIMEOUT_SECONDS", "61", "must be at most 60"),
    ("MIGRATE_LOCK_TIMEOUT_SECONDS", "nan", "must be a finite number"),
    ("MIGRATE_LOCK_TIMEOUT_SECONDS", "-1", "must not be negative"),
    ("MIGRATE_LOCK_RETRIES", "101", "must be at most 100"),
    ("MIGRATE_LOCK_RETRIES", "-1", "must be at least 0"),
])
def test_migrate_lock_settings_out_of_range_are_refused(name: str, raw: str, said: str) -> None:
    from core.config import ConfigError, load_settings

    with pytest.raises(ConfigError) as refused:
        load_settings({name: raw})
    assert name in str(refused.value) and said in str(refused.value)
    unlimited = load_settings({"MIGRATE_LOCK_TIMEOUT_SECONDS": "0", "MIGRATE_LOCK_RETRIES": "0"})
    assert (unlimited.migrate_lock_timeout_seconds, unlimited.migrate_lock_retries) == (0.0, 0)
    assert (load_settings({}).migrate_lock_timeout_seconds, load_settings({}).migrate_lock_retries) == (5.0, 5)
