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
