"""`main.py migrate` and the commands that read the migration state, run as an operator would: alembic's lines
about its connection ("Context impl PostgresqlImpl.", "Will assume transactional DDL.") are not in their output;
the revisions an upgrade applies are, in the service's JSON log format."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import _base_env, make_settings, requires_pg

ROOT = Path(__file__).resolve().parent.parent


def _main(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "main.py", *args], cwd=ROOT, capture_output=True, text=True,
                          env=_base_env(), timeout=120, check=False, stdin=subprocess.DEVNULL)


@requires_pg
def test_commands_at_the_head_print_nothing_of_alembic(migrated_database):
    migrated = _main("migrate")
    assert migrated.returncode == 0, migrated.stderr
    assert (migrated.stdout, migrated.stderr) == ("", "")

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
        await asyncio.sleep(3)  # the second migrate reaches what the first is building
        await in_flight.commit()
        outputs = [await asyncio.wait_for(process.communicate(), 120) for process in processes]
        said = [(process.returncode, [json.loads(line)["msg"].split(",")[0] for line in err.decode().splitlines()
                                      if line.startswith("{")], err.decode().splitlines()[-1:] if err else [])
                for process, (_out, err) in zip(processes, outputs, strict=True)]
        steps = [f"Running upgrade {r.down_revision} -> {r.revision}" for r in reversed(list(
            ScriptDirectory.from_config(config).iterate_revisions(head, "0026")))]
        assert steps[0] == "Running upgrade 0026 -> 0027" and steps[-1].endswith(f"-> {head}"), steps
        assert said[0] == (0, steps, said[0][2]), said
        assert said[1][0] == 0 and not any(line.startswith("Running upgrade") for line in said[1][1]), said
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
