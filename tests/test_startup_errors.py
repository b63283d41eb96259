"""Operator mistakes at start-up, run as an operator would (`python main.py ...` in its own process): one line
that says what to do and the README's exit code, never a traceback."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.conftest import _base_env, requires_pg
from tests.core.test_crypto_config import _production_env
from tests.integration.procs import free_port

ROOT = Path(__file__).resolve().parent.parent


def _main(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "main.py", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**_base_env(), **env}, timeout=120, check=False, stdin=subprocess.DEVNULL)


def _one_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in result.stderr.splitlines() if not line.startswith("{")]  # JSON log lines
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_a_database_url_port_mistake_is_a_configuration_error():
    for command, url in (("serve", "postgresql+asyncpg://gw:pw@127.0.0.1:5432x/gw"),
                         ("migrate", "postgresql+asyncpg://gw:pw@127.0.0.1:99999/gw")):
        result = _main(command, DATABASE_URL=url)
        assert result.returncode == 2, result.stderr
        assert _one_line(result) == "configuration error: DATABASE_URL: has an invalid port (a number from 1 to 65535)"


@requires_pg
def test_a_managed_postgresql_url_with_sslmode_reaches_the_database(migrated_database):
    # postgres://...?sslmode=... as managed services give it: asyncpg got `sslmode` and refused it (TypeError).
    # create-admin reads the migration state, then refuses the username: the database was reached.
    url = migrated_database.replace("postgresql+asyncpg://", "postgres://", 1)
    result = _main("create-admin", "--username", "ab", DATABASE_URL=f"{url}?sslmode=disable",
                   ADMIN_PASSWORD="first-admin-password")
    assert result.returncode == 2, result.stderr
    assert _one_line(result) == "refusing to create-admin: username must be 3 to 120 characters long"


def test_an_unknown_sslmode_is_a_configuration_error():
    result = _main("migrate", DATABASE_URL="postgres://gw@127.0.0.1:1/gw?sslmode=required")
    assert result.returncode == 2, result.stderr
    assert _one_line(result).startswith("configuration error: DATABASE_URL: has ssl/sslmode 'required'")


def test_a_url_the_driver_refuses_anyway_is_one_line_not_a_traceback():
    # Past load_settings's checks (here: they are skipped), the driver's TypeError/ValueError on the URL's parts.
    script = ("import dataclasses, sys, main\n"
              "real = main.load_settings\n"
              "main.load_settings = lambda: dataclasses.replace(real(), database_url="
              "'postgresql+asyncpg://gw@127.0.0.1:1/gw?sslmode=require')\n"
              "sys.exit(main.main(['migrate']))\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                            env=_base_env(), timeout=120, check=False)
    assert result.returncode == 2, result.stderr
    assert _one_line(result).startswith("configuration error: DATABASE_URL: the database driver refuses it (TypeError")


def _database_at(path: Path, revision: str) -> str:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL PRIMARY KEY)")
        db.execute("INSERT INTO alembic_version VALUES (?)", (revision,))
    return f"sqlite+aiosqlite:///{path}"


def test_a_database_newer_than_the_code_says_how_to_roll_back(tmp_path):
    # The code was rolled back after `migrate` ran a newer release's revisions: `migrate` cannot help.
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "migrations"))
    [head] = ScriptDirectory.from_config(config).get_heads()
    url = _database_at(tmp_path / "ahead.db", "0099")
    advice = (f"the database is at revision 0099, newer than this code (head {head}): deploy the newer release, "
              f"or downgrade with it (`.venv/bin/alembic downgrade {head}` run from the newer release)")
    for command, verb in (("serve", "start"), ("worker", "start"), ("migrate", "migrate")):
        result = _main(command, DATABASE_URL=url)
        assert result.returncode == 3, (command, result.stderr)
        assert _one_line(result) == f"refusing to {verb}: {advice}"
    assert sqlite3.connect(tmp_path / "ahead.db").execute("SELECT version_num FROM alembic_version").fetchall() == [
        ("0099",)]


def test_a_database_behind_the_code_still_says_run_migrate(tmp_path):
    result = _main("serve", DATABASE_URL=_database_at(tmp_path / "behind.db", "0001"))
    assert result.returncode == 3
    assert _one_line(result).endswith("run `.venv/bin/python main.py migrate`")


def test_production_refuses_a_base_url_without_a_host_and_a_short_blind_index_key():
    for variable, value, says in (
            ("PUBLIC_BASE_URL", "https:pay.example.rw", "must be a URL with scheme http/https and a host"),
            ("MTN_MOMO_BASE_URL", "https:/proxy.momodeveloper.mtn.com", "must be a URL with scheme http/https"),
            ("PUBLIC_BASE_URL", "https://pay.example.rw/?x=1", "must not have a query"),
            ("BLIND_INDEX_KEY", "x", "must be at least 32 bytes in production")):
        result = _main("serve", **{**_production_env(), variable: value})
        assert result.returncode == 2, (variable, result.stderr)
        assert _one_line(result).startswith(f"configuration error: {variable}: {says}")


def test_a_misspelt_per_aggregator_or_callback_variable_is_refused():
    # USSD_IP_ALLOWLIST_AFRICAS_TALKING was read by nothing: `serve` started and took USSD hops from any address
    # while the operator believed Africa's Talking's gateways were the only ones let in (and in production, with
    # the callback secret set, nothing said the allowlist was off).
    for variable, value, names in (
            ("USSD_IP_ALLOWLIST_AFRICAS_TALKING", "196.201.214.0/24", "USSD_IP_ALLOWLIST_AFRICASTALKING, "),
            ("USSD_SERVICE_CODE_NALLO", "*920*44#", "USSD_SERVICE_CODE_NALO"),
            ("CALLBACK_SECRET_MTN", "t" * 24, "CALLBACK_SECRET_MTN_MOMO, ")):
        result = _main("serve", **{**_production_env(), variable: value})
        assert result.returncode == 2, (variable, result.stderr)
        line = _one_line(result)
        assert line.startswith(f"configuration error: {variable}: is not a variable the gateway reads"), line
        assert names in line


def test_a_redis_database_that_is_not_a_number_is_refused():
    result = _main("worker", REDIS_URL="redis://127.0.0.1:6379/abc")
    assert result.returncode == 2
    assert _one_line(result).startswith("configuration error: REDIS_URL: names the database 'abc'")


@requires_pg
def test_serve_runs_degraded_while_redis_cannot_be_reached(migrated_database):
    # As the README says: an unreachable Redis does not stop `serve` (no exit 4); /readyz names it but answers 200
    # ("degraded"): the API and provider callbacks work without Redis, and every serve shares it, so a 503 would
    # take them all out of the balancer at once. Only the database gates readiness.
    port = free_port()
    env = {**_base_env(), "REDIS_URL": "redis://127.0.0.1:1/0", "PORT": str(port)}
    proc = subprocess.Popen([sys.executable, "main.py", "serve"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        deadline, ready = time.monotonic() + 60, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
                break
            except httpx.TransportError:
                time.sleep(0.3)
        assert proc.poll() is None, proc.communicate()[1]
        assert ready is not None and ready.status_code == 200 and ready.json()["status"] == "degraded"
        checks = ready.json()["checks"]
        assert checks["database"] == "ok" and checks["redis"].startswith("error")
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr


def test_a_port_past_65535_is_refused_not_taken_modulo_65536():
    # `simulate airtel --port 70000` listened on 4464 and `worker --metrics-port 83627` on 18091 (logging :83627).
    for args, says in ((("simulate", "airtel", "--port", "70000"), "argument --port: must be at most 65535"),
                       (("simulate", "airtel", "--port", "0"), "argument --port: must be at least 1"),
                       (("worker", "--metrics-port", "83627"), "argument --metrics-port: must be at most 65535")):
        result = _main(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.splitlines()[-1].endswith(says), result.stderr
        assert "Traceback" not in result.stderr


def test_a_simulator_on_a_port_taken_says_so_in_one_line():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _main("simulate", "mtn_momo", "--port", str(port))
    assert result.returncode == 4, result.stderr
    assert _one_line(result).startswith("cannot start: OSError: ")
    assert "address already in use" in result.stderr


def test_dial_refuses_a_caller_that_is_not_a_phone_number():
    # A traceback from core.phone (exit 1) before: now argparse's usage error, exit 2, and nothing is dialled.
    result = _main("dial", "*384*123#", "notaphone", "--url", "http://127.0.0.1:1")
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines()[-1] == "main.py dial: error: argument phone: 'notaphone': not a phone number"
    assert "Traceback" not in result.stderr and result.stdout == ""
