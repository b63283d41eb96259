"""Operator mistakes at start-up, run as an operator would (`python main.py ...` in its own process): one line
that says what to do and the README's exit code, never a traceback."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

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
              "or stop its serve and worker processes and downgrade with it "
              f"(`.venv/bin/alembic downgrade {head}` run from the newer release)")
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


def test_a_deployment_without_a_provider_starts_without_its_variables():
    # A Rwandan federation has no M-Pesa account: production required every MPESA_* variable all the same (and
    # CALLBACK_SECRET_MPESA), so it made them up. Leaving mpesa out of PROVIDERS, none is needed: `serve` gets past
    # its configuration to the database (out of reach here: exit 4, not 2).
    env = {k: v for k, v in _production_env().items() if not k.startswith(("MPESA_", "CALLBACK_SECRET_MPESA"))}
    refused = _main("serve", **env)
    assert refused.returncode == 2 and "configuration error: MPESA_CONSUMER_KEY: " in refused.stderr
    started = _main("serve", **{**env, "PROVIDERS": "mtn_momo,airtel,irembopay",
                                "DATABASE_URL": "postgresql+asyncpg://gw@127.0.0.1:1/gw"})
    assert started.returncode == 4, started.stderr
    assert started.stderr.strip().splitlines()[-1].startswith("cannot start: ")
    typo = _main("serve", **{**env, "PROVIDERS": "mtn_momo,airtel,irembo"})
    assert typo.returncode == 2
    assert _one_line(typo) == ("configuration error: PROVIDERS: 'irembo' is not a provider (these are: mtn_momo, "
                               "airtel, mpesa, irembopay)")


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


def test_a_duration_past_its_bound_is_refused_at_start_not_at_its_first_use():
    # POLL_AFTER_SECONDS=400000000000 started: every payment's first poll, utcnow() + that, overflowed (a 500 to the
    # payer); RATE_LIMIT_MULTIPLIER=1e308 made every API request a 500 (int(inf)).
    for variable, value, says in (("POLL_AFTER_SECONDS", "400000000000", "must be at most 86400"),
                                  ("JWT_TTL_SECONDS", "99999999999", "must be at most 604800"),
                                  ("RATE_LIMIT_MULTIPLIER", "1e308", "must be at most 1000000")):
        result = _main("serve", **{variable: value})
        assert result.returncode == 2, (variable, result.stderr)
        assert _one_line(result) == f"configuration error: {variable}: {says}"


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


def test_a_huge_worker_concurrency_or_reference_margin_is_refused_naming_the_option():
    # `worker --concurrency 100000000` started a worker with that many slots; `advance-references --by` took any
    # number, and refused one too large only after reading (and moving) the database's sequence.
    for args, says in ((("worker", "--concurrency", "1001"), "argument --concurrency: must be at most 1000"),
                       (("worker", "--concurrency", "99999999999999999999"),
                        "argument --concurrency: must be at most 1000"),
                       (("advance-references", "--by", "1000000000"), "argument --by: must be at most 999999999")):
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


def test_simulate_help_names_the_provider_simulators_options():
    # `simulate --help` showed --host and --port alone, while README sends operators to --callback-url, --delay, ...
    # (main() hands them to providers.simulation unparsed). Every option that module takes is named.
    import argparse

    from providers.simulation import add_arguments

    taken = argparse.ArgumentParser()
    add_arguments(taken)
    flags = [flag for action in taken._actions for flag in action.option_strings if flag not in ("-h", "--help")]
    assert "--callback-url" in flags and "--delay" in flags
    result = _main("simulate", "--help")
    assert result.returncode == 0, result.stderr
    # Each one by its own line, and no other: a flag named inside a longer one's (--drop in --drop-callback) or
    # one the module no longer takes passed a search of the text.
    listed = re.findall(r"^  (--[a-z0-9-]+)", result.stdout.partition("also takes")[2], re.MULTILINE)
    assert sorted(listed) == sorted(flags), result.stdout


def test_a_simulator_says_when_it_serves():
    # It logged nothing once its port was bound (aiohttp's banner is silenced): whoever started it could not tell
    # it was up, where `serve` logs "serving".
    port = free_port()
    proc = subprocess.Popen([sys.executable, "main.py", "simulate", "mtn_momo", "--port", str(port)], cwd=ROOT,
                            env=_base_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                httpx.get(f"http://127.0.0.1:{port}/_control/phone", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.3)
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert '"msg":"simulator serving"' in out + err, out + err
    assert f'"listen":"127.0.0.1:{port}"' in out + err, out + err


def test_dial_refuses_a_caller_that_is_not_a_phone_number():
    # A traceback from core.phone (exit 1) before: now argparse's usage error, exit 2, and nothing is dialled.
    result = _main("dial", "*384*123#", "notaphone", "--url", "http://127.0.0.1:1")
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines()[-1] == "main.py dial: error: argument phone: 'notaphone': not a phone number"
    assert "Traceback" not in result.stderr and result.stdout == ""


def _dial_module(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`python -m channels.ussd.dial ...`, the terminal phone's entry point when main.py is not at hand."""
    return subprocess.run([sys.executable, "-m", "channels.ussd.dial", *args], cwd=ROOT, capture_output=True,
                          text=True, env={**_base_env(), **env}, timeout=120, check=False, stdin=subprocess.DEVNULL)


@contextlib.contextmanager
def _endpoint(reply: dict[str, object] | str, host: str = "127.0.0.1",
              reached: list[tuple[str, str]] | None = None) -> Iterator[tuple[str, list[bytes]]]:
    """An HTTP server on this machine (`host`) answering every POST with `reply` (JSON, or CON/END text): its URL and
    the bodies it was sent; `reached`, if given, gets each POST's Host header and path."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    sent: list[bytes] = []

    class Endpoint(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            sent.append(self.rfile.read(int(self.headers["Content-Length"])))
            if reached is not None:
                reached.append((self.headers["Host"], self.path))
            body = reply.encode() if isinstance(reply, str) else json.dumps(reply).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args: object) -> None:
            pass

    server = ThreadingHTTPServer((host, 0), Endpoint)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://{host}:{server.server_address[1]}", sent
    finally:
        server.shutdown()
        server.server_close()


def test_dial_refuses_a_caller_of_a_country_the_aggregator_does_not_serve():
    # Hubtel and Nalo are Ghana's: a Rwandan number through them was dialled (the gateway takes it).
    for aggregator in ("hubtel", "nalo"):
        result = _main("dial", "*384*123#", "+250788000001", "--aggregator", aggregator, "--url", "http://127.0.0.1:1")
        assert result.returncode == 2 and result.stdout == "", result.stderr
        assert result.stderr.splitlines()[-1] == (
            f"main.py dial: error: argument phone: '+250788000001': a number of RW; {aggregator} carries calls from "
            "GH numbers only (dial another country's number through africastalking)")


def test_the_dial_modules_entry_point_checks_the_caller_as_main_py_does():
    # `python -m channels.ussd.dial` with a number it cannot read was core.phone's traceback, exit 1.
    for args, says in ((("*384*123#", "notaphone"), "'notaphone': not a phone number"),
                       (("*384*123#", "+250788000001", "http://127.0.0.1:1", "", "nalo"),
                        "'+250788000001': a number of RW; nalo carries calls from GH numbers only (dial another "
                        "country's number through africastalking)")):
        result = _dial_module(*args)
        assert result.returncode == 2 and result.stdout == "", result.stderr
        assert "Traceback" not in result.stderr, result.stderr
        assert result.stderr.splitlines() == [
            "usage: dial SERVICE_CODE PHONE [BASE_URL] [SECRET] [africastalking|hubtel|nalo] [--allow-remote]",
            f"dial: error: argument phone: {says}"]
    with _endpoint({"USERID": "dial", "MSISDN": "233244123456", "MSG": "Bye", "MSGTYPE": False}) as (url, sent):
        result = _dial_module("*384*123*233#", "024 412 3456", url, "", "nalo")
    assert result.returncode == 0 and result.stdout.splitlines()[1] == "Bye", result.stderr
    assert [json.loads(body)["MSISDN"] for body in sent] == ["233244123456"]


def test_dial_refuses_another_machine_unless_allowed():
    # Each entry point, before any connection: the environment's proxy (httpx would send a call to another machine
    # through it) is a server on this machine, which nothing must reach. Another machine is a name (never looked
    # up): an address such as 192.0.2.1 is this machine where an interface holds it, as a CI host's may.
    elsewhere = "http://gateway.example:9"
    with _endpoint("END proxied") as (proxy, sent):
        env = {"HTTP_PROXY": proxy, "ALL_PROXY": proxy, "NO_PROXY": ""}
        for result in (_main("dial", "*384*123#", "+250788000001", "--url", elsewhere, "--secret", "k", **env),
                       _dial_module("*384*123#", "+250788000001", elsewhere, "k", **env)):
            # On standard error: the screens alone are standard output's (`dial ... | tee`).
            assert result.returncode == 2 and result.stdout == "", result.stdout
            assert result.stderr == (
                "[cannot call http://gateway.example:9/ussd/africastalking: gateway.example is not this machine "
                "(localhost, 127.0.0.0/8, ::1, 0.0.0.0, ::, an address it holds), and dial sends the aggregator's "
                "callback secret and a member's number: --allow-remote to dial a gateway elsewhere]\n")
        assert sent == []
        # Allowed, it goes as the environment says (the proxy here), for each entry point.
        for result in (_main("dial", "*384*123#", "+250788000001", "--url", elsewhere, "--allow-remote", **env),
                       _dial_module("*384*123#", "+250788000001", elsewhere, "--allow-remote", **env)):
            assert result.returncode == 0 and result.stdout.splitlines()[1] == "proxied", result.stderr
            assert result.stderr == ""
        assert len(sent) == 2


def test_dial_refuses_an_empty_secret():
    # `--secret "$CALLBACK_SECRET_NALO"` with the variable unset sent none, and the 403 was said to be a wrong one.
    result = _main("dial", "*384*123#", "+250788000001", "--secret", "", "--url", "http://127.0.0.1:1")
    assert result.returncode == 2 and result.stdout == "", result.stderr
    assert result.stderr.splitlines()[-1] == (
        "main.py dial: error: argument --secret: is empty: give the gateway's CALLBACK_SECRET_<AGGREGATOR>, or "
        "leave --secret out for a gateway without one")


def test_dial_started_without_stdin_hangs_up():
    # `dial ... <&-`: descriptor 0 was then one of the process's own (the event loop's): reading it failed with
    # EINVAL, a traceback.
    with _endpoint("CON Welcome\n1. Pay") as (url, sent):
        result = subprocess.run([sys.executable, "main.py", "dial", "*384*123#", "+250788000001", "--url", url],
                                cwd=ROOT, capture_output=True, text=True, env=_base_env(), timeout=120, check=False,
                                stdin=subprocess.DEVNULL, preexec_fn=lambda: os.close(0))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stdout.rstrip().endswith("> [cancelled]"), result.stdout
    assert len(sent) == 1


def test_dial_whose_reader_left_hangs_up_quietly():
    # `dial ... | head -1`: the screens' reader gone, dial's next line was a BrokenPipeError traceback (exit 1) and
    # Hubtel's session was never released. Now: released, and SIGPIPE's exit status as a Unix tool's.
    with _endpoint({"Type": "Response", "Message": "Welcome\n1. Pay", "ClientState": "s1"}) as (url, sent):
        proc = subprocess.Popen([sys.executable, "main.py", "dial", "*713*45#", "0244123456", "--aggregator",
                                 "hubtel", "--url", url], cwd=ROOT, env=_base_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()  # before the first screen
        try:
            proc.wait(timeout=60)
            err = proc.stderr.read().decode()
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGPIPE and err == "", err
    assert [json.loads(body)["Type"] for body in sent] == ["Initiation", "Release"]


def _reader_gone(args: list[str], reply: dict[str, object] | str) -> tuple[int, str, list[bytes]]:
    """`args` (a dial) run with its standard output a pipe nobody reads, stdout buffered as a terminal user's
    Python buffers a pipe (no PYTHONUNBUFFERED, which the test run may set): its exit code, stderr, what was sent."""
    env = {k: v for k, v in _base_env().items() if k != "PYTHONUNBUFFERED"}
    with _endpoint(reply) as (url, sent):
        read_end, write_end = os.pipe()
        os.close(read_end)
        try:
            result = subprocess.run([sys.executable, *args, url], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                    stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120, check=False)
        finally:
            os.close(write_end)
    return result.returncode, result.stderr, sent


def test_the_dial_modules_reader_gone_is_sigpipes_exit_too():
    # `python -m channels.ussd.dial ... | head -0`: its stdout was block-buffered, written at the interpreter's exit
    # past run()'s handling: "Exception ignored ... BrokenPipeError" and exit 120 (main.py's line-buffered 141).
    for reply, args in (("END Bye", ["-m", "channels.ussd.dial", "*384*123#", "+250788000001"]),
                        ("END Bye", ["main.py", "dial", "*384*123#", "+250788000001", "--url"])):
        code, err, sent = _reader_gone(args, reply)
        assert code == 128 + signal.SIGPIPE and err == "", (args, code, err)
        assert len(sent) == 1
    # A URL refused: nothing sent, and no "Exception ignored". Said on standard error, which is still there: it was
    # written to the pipe nobody read, and `dial ... | head` ended with 141 and nothing said.
    env = {k: v for k, v in _base_env().items() if k != "PYTHONUNBUFFERED"}
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run([sys.executable, "-m", "channels.ussd.dial", "*384*123#", "+250788000001",
                                 "http://gateway.example:9"], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120, check=False)
    finally:
        os.close(write_end)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("[cannot call http://gateway.example:9/ussd/africastalking: gateway.example is "
                                    "not this machine "), result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr


def test_dial_whose_reader_left_at_the_last_screen_does_not_release_an_ended_session():
    # Hubtel's Release ends a session the phone hangs up; one the gateway ended (its reply's Type Release) is over,
    # and a Release after it is a hang-up Hubtel never sends.
    code, err, sent = _reader_gone(["main.py", "dial", "*713*45#", "0244123456", "--aggregator", "hubtel", "--url"],
                                   {"Type": "Release", "Message": "Bye", "ClientState": ""})
    assert code == 128 + signal.SIGPIPE and err == "", err
    assert [json.loads(body)["Type"] for body in sent] == ["Initiation"]


def test_dial_started_without_stdout_sends_nothing():
    # `dial ... >&-`: sys.stdout is None, and the prompt's write was an AttributeError traceback from the reading
    # thread, Hubtel's session opened and never released. Nowhere to show a screen: refused before anything is sent.
    for args in (["main.py", "dial", "*713*45#", "0244123456", "--aggregator", "hubtel", "--url"],
                 ["-m", "channels.ussd.dial", "*713*45#", "0244123456"]):
        with _endpoint({"Type": "Response", "Message": "Welcome\n1. Pay", "ClientState": "s1"}) as (url, sent):
            if args[0] == "-m":
                args = [*args, url, "", "hubtel"]
            else:
                args = [*args, url]
            result = subprocess.run([sys.executable, *args], cwd=ROOT, env=_base_env(),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=120,
                                    check=False, preexec_fn=lambda: os.close(1), input="1\n")
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr == ("dial: standard output is closed: nowhere to show the gateway's screens "
                                 "(nothing sent)\n"), result.stderr
        assert sent == []


def test_dial_reads_a_local_number_in_the_aggregators_country():
    # Through Hubtel or Nalo (Ghana's) 024 412 3456 is a Ghanaian number, sent as Nalo sends it; through Africa's
    # Talking (the default) it is read as the default region's, which has no such number.
    result = _main("dial", "*384*123*233#", "024 412 3456", "--aggregator", "nalo", "--url", "http://127.0.0.1:1")
    assert result.returncode == 1 and result.stdout == "", result.stdout
    assert result.stderr.startswith("[network error calling http://127.0.0.1:1/ussd/nalo: "), result.stderr
    result = _main("dial", "*384*123*233#", "024 412 3456", "--url", "http://127.0.0.1:1")
    assert result.returncode == 2 and result.stdout == "", result.stderr
    assert result.stderr.splitlines()[-1].startswith(
        "main.py dial: error: argument phone: '024 412 3456': not a valid phone number of RW")


def test_a_redis_url_query_the_client_refuses_is_a_configuration_error():
    # redis-py reads REDIS_URL's query only when it connects: `?db=abc` and a parameter it does not take (a typo,
    # or a TLS option on a redis:// URL) were a traceback from the first command (exit 1), not the README's line.
    for query, says in (("db=abc", "has an invalid value for the query parameter 'db'"),
                        ("socket_timeout=abc", "has an invalid value for the query parameter 'socket_timeout'"),
                        ("sockettimeout=1", "has the query parameter 'sockettimeout', which the Redis client does "
                                            "not take"),
                        ("ssl_ca_certs=/etc/ca.pem", "has the query parameter 'ssl_ca_certs', which the Redis client "
                                                     "does not take")):
        result = _main("worker", REDIS_URL=f"redis://127.0.0.1:6379/0?{query}")
        assert result.returncode == 2, (query, result.stderr)
        assert _one_line(result).startswith(f"configuration error: REDIS_URL: {says}"), query


def test_two_encryption_keys_with_the_same_id_are_refused():
    # `k1:<old>,k1:<new>` (a rotation that forgot to rename the new key): the second silently replaced the first,
    # so every phone number stored under the old k1 could no longer be decrypted, and nothing said why.
    old, new = base64.b64encode(b"o" * 32).decode(), base64.b64encode(b"n" * 32).decode()
    result = _main("serve", **{**_production_env(), "PII_ENCRYPTION_KEYS": f"k1:{old},k1:{new}"})
    assert result.returncode == 2, result.stderr
    assert _one_line(result) == ("configuration error: PII_ENCRYPTION_KEYS: lists the key id 'k1' twice: give each "
                                 "key its own id (keyid:base64key)")
    assert old not in result.stderr and new not in result.stderr


def _redis_url_with(url: str, *, db: str, user: str = "") -> str:
    from urllib.parse import urlparse

    parsed = urlparse(url)
    return parsed._replace(netloc=f"{user}@{parsed.netloc}" if user else parsed.netloc, path=f"/{db}").geturl()


@requires_pg
def test_a_redis_that_refuses_the_urls_database_or_user_stops_the_start(migrated_database):
    # Redis answers, but never for this REDIS_URL: a database past its `databases` (16 by default) or credentials
    # it refuses. `serve` and `worker` started "degraded" and stayed so for good, /readyz saying only
    # "error: ResponseError": a configuration mistake, not an outage to ride out.
    redis_url = _base_env()["REDIS_URL"]
    if not redis_url.startswith("redis://"):
        import pytest

        pytest.skip("needs a Redis over TCP (REDIS_URL)")
    for url, says in ((_redis_url_with(redis_url, db="99"), "Redis refuses its database 99 (DB index is out of range)"),
                      (_redis_url_with(redis_url, db="0", user="nobody:wrong-password"),
                       "Redis refuses its credentials (AuthenticationError")):
        for command in ("serve", "worker"):
            result = _main(command, REDIS_URL=url, PORT=str(free_port()))
            assert result.returncode == 2, (command, url, result.stderr)
            line = _one_line(result)
            assert line.startswith(f"configuration error: REDIS_URL: {says}"), line
            assert "wrong-password" not in result.stderr


@requires_pg
def test_a_payment_routes_mistake_stops_serve_in_one_line(migrated_database):
    # PAYMENT_ROUTES is read as the runtime is assembled, after the database, Redis and HTTP clients opened: those
    # were left to asyncio's shutdown, which logged three ERROR lines with tracebacks after the one line.
    for command in ("serve", "worker"):
        result = _main(command, PAYMENT_ROUTES="MOBILE_MONEY_MTN", PORT=str(free_port()))
        assert result.returncode == 2, (command, result.stderr)
        assert _one_line(result) == ("configuration error: PAYMENT_ROUTES: expected METHOD=provider, got "
                                     "'MOBILE_MONEY_MTN'"), result.stderr
        assert '"level":"ERROR"' not in result.stderr, result.stderr


@requires_pg
def test_redis_cluster_on_a_redis_without_cluster_mode_stops_the_start(migrated_database):
    # The node answers "This instance has cluster support disabled": the cluster client's failure was taken for an
    # outage, and serve and worker started degraded for good (/readyz "error: ConnectionError", every USSD hop
    # "unavailable") with Redis up.
    redis_url = _base_env()["REDIS_URL"]
    if not redis_url.startswith("redis://"):
        import pytest

        pytest.skip("needs a Redis over TCP (REDIS_URL)")
    for command in ("serve", "worker"):
        result = _main(command, REDIS_CLUSTER="1", REDIS_URL=_redis_url_with(redis_url, db="0"),
                       PORT=str(free_port()))
        assert result.returncode == 2, (command, result.stderr)
        assert _one_line(result).startswith("configuration error: REDIS_CLUSTER: is on, but the Redis at REDIS_URL "
                                            "is not in cluster mode"), result.stderr


def test_a_simulator_option_mistake_is_one_line():
    # A negative --delay or an unreadable SIM_* variable was a traceback (exit 1); an unknown simulator exit 1
    # while every other argument mistake is 2.
    for args, env, says in ((("simulate", "mtn_momo", "--port", "1", "--delay", "-1"), {},
                             "configuration error: --delay: must not be negative"),
                            (("simulate", "airtel", "--port", "1"), {"SIM_DELAY": "abc"},
                             "configuration error: SIM_DELAY: "),
                            # nan and inf were taken: each payer's decision then failed in the simulator (a
                            # traceback logged), every payment PENDING for ever.
                            (("simulate", "mtn_momo", "--port", "1"), {"SIM_DELAY": "nan"},
                             "configuration error: SIM_DELAY: must be a finite number, got 'nan'"),
                            (("simulate", "airtel", "--port", "1"), {"SIM_HANG_REQUEST": "inf"},
                             "configuration error: SIM_HANG_REQUEST: must be a finite number, got 'inf'"),
                            (("simulate", "mpesa", "--port", "1", "--prompt-timeout", "nan"), {},
                             "configuration error: --prompt-timeout: must be a finite number, got 'nan'"),
                            (("simulate", "mtn", "--port", "1"), {},
                             "unknown simulator 'mtn'; choose from mtn_momo, airtel, mpesa, irembopay, "
                             "africastalking")):
        result = _main(*args, **env)
        assert result.returncode == 2, (args, result.stderr)
        assert _one_line(result).startswith(says), result.stderr
    # The SMS simulator takes no option: one given was dropped without a word and the simulator served.
    result = _main("simulate", "africastalking", "--port", "1", "--delay", "2")
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines()[-1] == "main.py: error: unrecognized arguments: --delay 2", result.stderr


def test_a_url_with_an_unclosed_ipv6_bracket_is_a_configuration_error():
    # urllib's "Invalid IPv6 URL" (a ValueError) escaped load_settings: a traceback, exit 1.
    for variable, value in (("PUBLIC_BASE_URL", "https://[2001:db8::1"), ("MTN_MOMO_BASE_URL", "https://[::1:8443"),
                            ("REDIS_URL", "redis://[::1/0")):
        result = _main("serve", **{**_production_env(), variable: value})
        assert result.returncode == 2, (variable, result.stderr)
        assert _one_line(result).startswith(f"configuration error: {variable}: "), result.stderr


def test_a_tls_option_redis_does_not_know_is_a_configuration_error():
    result = _main("worker", REDIS_URL="rediss://127.0.0.1:6379/0?ssl_cert_reqs=bogus")
    assert result.returncode == 2, result.stderr
    assert _one_line(result).startswith("configuration error: REDIS_URL: has an invalid value for the query "
                                        "parameter 'ssl_cert_reqs'"), result.stderr


def test_a_host_name_that_does_not_resolve_says_which_variable_holds_it():
    # "cannot start: gaierror: [Errno -2] Name or service not known": nothing said which name failed.
    result = _main("migrate", DATABASE_URL="postgresql+asyncpg://gw@db.nowhere.invalid:5432/gw")
    assert result.returncode == 4, result.stderr
    line = _one_line(result)
    assert line.startswith("cannot start: the database host db.nowhere.invalid in DATABASE_URL cannot be "
                           "resolved"), line


def test_a_socket_folder_without_the_server_says_which_folder(tmp_path):
    # "cannot start: FileNotFoundError: [Errno 2] No such file or directory": no path, no variable.
    folder = tmp_path / "run-postgresql"
    folder.mkdir()
    result = _main("prune", "--dry-run", DATABASE_URL=f"postgresql+asyncpg://gw@/gw?host={folder}")
    assert result.returncode == 4, result.stderr
    assert _one_line(result) == (
        f"cannot start: no PostgreSQL socket in {folder} (the host= of DATABASE_URL): is the server running, and is "
        "that its socket folder? (FileNotFoundError: [Errno 2] No such file or directory)")


@requires_pg
def test_serve_on_an_address_it_cannot_listen_on_names_host_and_port(migrated_database):
    port = free_port()
    # An address no interface here holds (192.0.2.1 is one a CI host may hold: `serve` then listened), where the
    # kernel refuses a listener an address not its own.
    from channels.ussd.dial import is_this_machine

    if Path("/proc/sys/net/ipv4/ip_nonlocal_bind").exists() and \
            Path("/proc/sys/net/ipv4/ip_nonlocal_bind").read_text().strip() != "0":
        pytest.skip("this machine lets a socket listen on any address (net.ipv4.ip_nonlocal_bind)")
    elsewhere = next(host for host in ("192.0.2.1", "198.51.100.1", "203.0.113.1") if not is_this_machine(host))
    for host, says in (("listen.nowhere.invalid", "Name or service not known"),
                       (elsewhere, "cannot assign requested address")):
        # Redis out of reach (a degraded start): no reference mark a test before left in it to compare with.
        result = _main("serve", HOST=host, PORT=str(port), REDIS_URL="redis://127.0.0.1:1/0")
        assert result.returncode == 4, result.stderr
        line = _one_line(result)
        assert line.startswith(f"cannot start: OSError: cannot listen on {host}:{port} (HOST, PORT): "), line
        assert says in line


@requires_pg
def test_serve_and_worker_stopped_by_sigterm_say_so_last(migrated_database):
    # The operator's `kill -TERM <pid>` (systemd's stop): each process finishes what it was doing, exits 0 and its
    # last log line says it stopped, so a log read after a deploy tells a clean stop from a killed or hung one.
    import json

    import redis

    # An earlier test's reference mark, above this database's sequence, would stop the start (exit 2).
    redis.Redis.from_url(_base_env()["REDIS_URL"]).delete("references:high-water")

    ports = {"serve": free_port(), "worker": free_port()}
    procs = {
        "serve": subprocess.Popen([sys.executable, "main.py", "serve"], cwd=ROOT,
                                  env={**_base_env(), "PORT": str(ports["serve"])}, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL),
        "worker": subprocess.Popen([sys.executable, "main.py", "worker", "--metrics-port", str(ports["worker"])],
                                   cwd=ROOT, env=_base_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                   text=True, stdin=subprocess.DEVNULL),
    }
    try:
        for name, path in (("serve", "/readyz"), ("worker", "/healthz")):
            deadline, answered = time.monotonic() + 60, False
            while not answered and time.monotonic() < deadline and procs[name].poll() is None:
                try:
                    answered = httpx.get(f"http://127.0.0.1:{ports[name]}{path}", timeout=5).status_code == 200
                except httpx.TransportError:
                    time.sleep(0.3)
            assert answered, procs[name].communicate()[1]
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
        stderr = {name: proc.communicate(timeout=90)[1] for name, proc in procs.items()}
    for name, last in (("serve", "stopped"), ("worker", "worker stopped")):
        assert procs[name].returncode == 0, stderr[name]
        lines = [json.loads(line) for line in stderr[name].splitlines() if line.startswith("{")]
        assert lines[-1]["msg"] == last, stderr[name]
        if name == "serve":  # where it listens, not only the public URL the providers call back to
            [serving] = [line for line in lines if line["msg"] == "serving"]
            assert serving["listen"] == f"127.0.0.1:{ports['serve']}", serving


def test_the_readme_lists_every_command():
    # An operator reads the README's table of commands, not the code: `prune`, `advance-references` and
    # `sync-opt-outs` were missing from it while the README's own procedures told her to run them.
    import argparse
    import re

    from main import build_parser

    [sub] = [action for action in build_parser()._actions if isinstance(action, argparse._SubParsersAction)]
    readme = (ROOT / "README.md").read_text()
    table = readme.split("| command | what it does |", 1)[1].split("\n\n", 1)[0]
    listed = {match.group(1) for match in re.finditer(r"^\| `([a-z-]+)", table, re.MULTILINE)}
    assert listed == set(sub.choices), set(sub.choices) ^ listed


def test_the_readme_commands_take_the_flags_it_gives_them():
    # Each row's usage (`worker [--concurrency N]`, `dial CODE PHONE [--url URL] ...`) and the flags its text
    # names (`simulate`'s `--callback-url`): each is one of that command's options (the provider simulators' own
    # flags are parsed by the simulator, providers.simulation.add_arguments).
    import argparse
    import re

    from main import build_parser
    from providers.simulation import add_arguments

    [sub] = [action for action in build_parser()._actions if isinstance(action, argparse._SubParsersAction)]
    simulator = argparse.ArgumentParser()
    add_arguments(simulator)
    readme = (ROOT / "README.md").read_text()
    table = readme.split("| command | what it does |", 1)[1].split("\n\n", 1)[0]
    checked = 0
    for row in re.finditer(r"^\| `([a-z-]+)([^|]*(?:\\\|[^|]*)*)` \|(.*)$", table, re.MULTILINE):
        command, usage, text = row.groups()
        options = set(sub.choices[command]._option_string_actions)
        if command == "simulate":
            options |= set(simulator._option_string_actions)
        flags = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", usage))
        flags |= {flag for flag in re.findall(r"`(--[a-z][a-z-]*)", text) if command in ("simulate", "dial")}
        assert flags <= options, (command, flags - options)
        checked += len(flags)
    assert checked >= 10


def test_dial_calls_the_port_the_gateway_was_started_on():
    # `PORT=8090 bash scripts/run.sh` serves on 8090; `dial` without --url called 8080 all the same.
    result = _main("dial", "*384*123#", "+250788000001", PORT="1", HOST="")
    assert result.returncode == 1 and result.stdout == "", result.stdout
    assert result.stderr.startswith("[network error calling http://127.0.0.1:1/ussd/africastalking: "), result.stderr


def test_dial_calls_the_address_and_port_the_gateway_listens_on():
    # HOST=127.0.0.2 (another loopback address) and PORT: `dial` without a URL called 127.0.0.1, where nothing
    # listened, and `python -m channels.ussd.dial` called 127.0.0.1:8080 whatever PORT said.
    reached: list[tuple[str, str]] = []
    with _endpoint("END Bye", host="127.0.0.2", reached=reached) as (url, _sent):
        port = int(url.rsplit(":", 1)[1])
        env = {"HOST": "127.0.0.2", "PORT": str(port)}
        results = [_main("dial", "*384*123#", "+250788000001", **env),
                   _dial_module("*384*123#", "+250788000001", **env)]
    for result in results:
        assert result.returncode == 0 and result.stderr == "", result.stderr
        assert result.stdout.splitlines()[1] == "Bye", result.stdout
    assert reached == [(f"127.0.0.2:{port}", "/ussd/africastalking")] * 2


def test_a_bracketed_ipv6_host_is_told_to_drop_the_brackets_by_dial_and_the_service():
    # HOST=[::1], as a URL writes it: dial said "Invalid IPv6 address: '[[::1]]'", serve (PUBLIC_BASE_URL set)
    # "cannot listen on [::1]:8080 (HOST, PORT): Name or service not known" after opening the database and Redis.
    says = ("configuration error: HOST: must be the address without brackets: HOST=::1 (a URL writes it [::1], and "
            "the gateway's own URLs do)")
    for result in (_main("dial", "*384*123#", "+250788000001", HOST="[::1]"),
                   _dial_module("*384*123#", "+250788000001", HOST="[::1]"),
                   _main("serve", HOST="[::1]", PUBLIC_BASE_URL="http://127.0.0.1:8080",
                         REDIS_URL="redis://127.0.0.1:1/0")):
        assert result.returncode == 2 and result.stdout == "", result.stdout
        assert _one_line(result) == says


def test_a_worker_given_another_host_is_told_to_set_public_base_url():
    # `HOST=10.0.0.5 main.py worker --metrics-port 9100`: PUBLIC_BASE_URL unset became http://10.0.0.5:8080, where
    # the service (HOST unset) does not listen; providers were given callback URLs there.
    result = _main("worker", "--metrics-port", "9100", HOST="10.0.0.5", PUBLIC_BASE_URL="",
                   REDIS_URL="redis://127.0.0.1:1/0")
    assert result.returncode == 2, result.stderr
    assert _one_line(result) == (
        "configuration error: PUBLIC_BASE_URL: is unset, and a worker would take it from its HOST: "
        "http://10.0.0.5:8080, where `serve` listens only if its HOST is the same (a worker listens on HOST for its "
        "metrics only): set PUBLIC_BASE_URL to the address `serve` listens on")


def test_dial_to_a_url_it_cannot_call_says_so_in_one_line():
    # A PORT or --url whose port is no number (httpx's InvalidURL is no HTTPError) or past 65535 (an OverflowError
    # in the connection) was a traceback, exit 1; `default_url` leaves it to the dial's own URL error.
    for env, args, says in (({"PORT": "abc"}, (),
                             "[cannot call http://127.0.0.1:abc/ussd/africastalking: Invalid port"),
                            ({}, ("--url", "http://127.0.0.1:99999"),
                             "[cannot call http://127.0.0.1:99999/ussd/africastalking: invalid port 99999"),
                            ({}, ("--url", "127.0.0.1:8080"), "[cannot call 127.0.0.1:8080/ussd/africastalking: ")):
        result = _main("dial", "*384*123#", "+250788000001", *args, **env)
        assert result.returncode == 2 and result.stdout == "", (env, args, result.stdout)
        assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1, result.stderr
        assert result.stderr.startswith(says), result.stderr


def test_a_webhook_private_network_mistake_is_a_configuration_error():
    result = _main("serve", WEBHOOK_PRIVATE_NETWORKS="10.20.0.0/16,10.30.0.0/33")
    assert result.returncode == 2, result.stderr
    assert _one_line(result) == ("configuration error: WEBHOOK_PRIVATE_NETWORKS: '10.30.0.0/33' is not an IP address "
                                 "or network")


def test_a_webhook_private_network_of_all_addresses_is_a_configuration_error():
    result = _main("serve", WEBHOOK_PRIVATE_NETWORKS="0.0.0.0/0")
    assert result.returncode == 2, result.stderr
    assert _one_line(result) == ("configuration error: WEBHOOK_PRIVATE_NETWORKS: '0.0.0.0/0' takes in public "
                                 "addresses, which need no listing: list only the private networks the receivers "
                                 "are on (e.g. 192.168.10.0/24)")


def test_dial_interrupted_at_the_prompt_hangs_up_at_once():
    # Ctrl-C at dial's prompt (a terminal user's hang-up) waited for a line on stdin (asyncio.run waited for the
    # thread blocked in input()), then was a traceback, exit 130, and Hubtel's session was never released.
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    hops: list[dict[str, object]] = []

    class Hubtel(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            hops.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            body = json.dumps({"Type": "Response", "Message": "Welcome\n1. Pay", "ClientState": "s1"}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hubtel)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    proc = subprocess.Popen([sys.executable, "main.py", "dial", "*713*45#", "0244123456", "--aggregator", "hubtel",
                             "--url", f"http://127.0.0.1:{server.server_address[1]}"], cwd=ROOT, env=_base_env(),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not hops and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # at the prompt
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=10)  # stdin still open (communicate would close it): no line, no EOF
        out, err = proc.stdout.read(), proc.stderr.read()  # type: ignore[union-attr]
    finally:
        proc.kill()
        proc.wait()
        server.shutdown()
    assert proc.returncode == 1 and "Traceback" not in err, err
    assert out.rstrip().endswith("[cancelled]"), out
    assert [(hop["Type"], hop["Sequence"], hop["ClientState"]) for hop in hops] == [
        ("Initiation", 1, ""), ("Release", 2, "s1")]


def test_dial_whose_error_reader_is_gone_is_no_hang_up():
    # `dial ... 2>` a pipe nobody reads: its own error line raised BrokenPipeError, which dial took for the screens'
    # reader gone: "[cancelled]" on standard output (still read), Hubtel's session released by a second request,
    # exit 141 whatever happened (a refused URL too). Nobody to tell: the exit code alone says it (not 120, the
    # interpreter's failed flush of the line at exit, stderr buffered as a terminal user's: no PYTHONUNBUFFERED).
    env = {k: v for k, v in _base_env().items() if k != "PYTHONUNBUFFERED"}

    def run(args: list[str]) -> subprocess.CompletedProcess[str]:
        read_end, write_end = os.pipe()
        os.close(read_end)
        try:
            return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=write_end, text=True, timeout=120, check=False)
        finally:
            os.close(write_end)

    for entry in (["-m", "channels.ussd.dial", "*384*123*233#", "0244123456"],
                  ["main.py", "dial", "*384*123*233#", "0244123456", "--url"]):
        aggregator = ["hubtel"] if entry[0] == "-m" else ["--aggregator", "hubtel"]
        secret = [""] if entry[0] == "-m" else []
        # A reply not in Hubtel's form: "[HTTP 200] ..." on the closed stderr, exit 1, one request, no Release.
        with _endpoint("END Bye") as (url, sent):
            result = run([*entry, url, *secret, *aggregator])
        assert (result.returncode, result.stdout) == (1, ""), (entry, result)
        assert len(sent) == 1, sent
        # Nothing listening: exit 1, nothing on standard output.
        result = run([*entry, "http://127.0.0.1:1", *secret, *aggregator])
        assert (result.returncode, result.stdout) == (1, ""), (entry, result)
        # A URL refused (another machine, a name never looked up): exit 2, nothing sent.
        result = run([*entry, "http://gateway.example:9", *secret, *aggregator])
        assert (result.returncode, result.stdout) == (2, ""), (entry, result)
