"""Process harness for integration tests: simulators, `serve` and `worker` as real processes on 127.0.0.1.

Everything here is synchronous on purpose: pytest fixtures start and stop processes, the tests
themselves talk to them over HTTP with asyncio. Only processes started here are ever signalled, by
PID (SIGTERM, then SIGKILL after a grace period). Each process writes stdout and stderr to
`<name>.log` in the harness folder; `Harness.tails()` gathers the end of every log for failure reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from glob import glob
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
PROVIDERS = ("mtn_momo", "airtel", "mpesa", "irembopay")
SIMULATORS = (*PROVIDERS, "africastalking")
# Variables of the developer's shell that would point the processes somewhere else.
_FOREIGN_PREFIXES = ("MTN_MOMO_", "AIRTEL_", "MPESA_", "IREMBOPAY_", "SMS_", "CALLBACK_SECRET_", "SIM_",
                     "PAYMENT_ROUTES", "PUBLIC_BASE_URL", "PORT", "HOST", "OUTBOX_", "POLL_AFTER",
                     "PAYMENT_TIMEOUT", "USSD_IP_ALLOWLIST", "PII_", "BLIND_INDEX_KEY", "JWT_SECRET")

# Harnesses with live processes, so the failure hook in conftest.py can print their logs.
LIVE: list[Harness] = []


def free_port() -> int:
    """A port free now, for a process started a moment later. Picked at random below Linux's ephemeral range
    (32768-60999): a port the kernel hands out for port 0 is also what it hands the next outgoing connection or
    another test's port-0 probe, and a simulator then failed to bind it ("address already in use")."""
    for _ in range(200):
        port = random.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_FOREIGN_PREFIXES)}
    # As in tests/conftest.py's _base_env: the service's 1 s wait for Redis is shorter than a pause of a loaded CI
    # machine, and a hop then answered "unavailable" with nothing wrong (a stopped Redis refuses at once anyway).
    env.setdefault("REDIS_TIMEOUT_SECONDS", "5")
    return env


@dataclass
class Proc:
    name: str
    args: list[str]
    popen: subprocess.Popen[bytes]
    log: Path
    port: int | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def url(self) -> str:
        assert self.port is not None, f"{self.name} has no port"
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log.read_bytes().decode("utf-8", "replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


def _http_ok(url: str, timeout: float = 1.0) -> bool:
    """True when something answers below 500 at `url`."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status < 500
    except urllib.error.HTTPError as exc:
        return exc.code < 500
    except (OSError, ValueError):
        return False


class Harness:
    """Starts and stops the processes of one test module; every log lives in `folder`."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.procs: list[Proc] = []
        LIVE.append(self)

    def spawn(self, name: str, args: list[str], env: Mapping[str, str], *, port: int | None = None,
              ready_path: str | None = None, timeout: float = 40.0) -> Proc:
        """Start `python main.py <args>`; with `ready_path`, wait until it answers there."""
        log = self.folder / f"{name}.log"
        handle = log.open("ab")
        try:
            popen = subprocess.Popen([PYTHON, "main.py", *args], cwd=ROOT, env=dict(env), stdout=handle,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        finally:
            handle.close()
        proc = Proc(name, args, popen, log, port)
        self.procs.append(proc)
        if ready_path is not None:
            self.wait_ready(proc, ready_path, timeout)
        return proc

    def wait_ready(self, proc: Proc, path: str, timeout: float = 40.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.tail()}")
            if _http_ok(proc.url + path):
                return
            time.sleep(0.1)
        raise RuntimeError(f"{proc.name} not ready at {path} within {timeout}s:\n{proc.tail()}")

    def wait_started(self, proc: Proc, marker: str, timeout: float = 40.0) -> None:
        """For processes without a port (the worker): wait for a line in the log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.tail()}")
            with contextlib.suppress(OSError):
                if marker in proc.log.read_text(errors="replace"):
                    return
            time.sleep(0.1)
        raise RuntimeError(f"{proc.name} did not log {marker!r} within {timeout}s:\n{proc.tail()}")

    @staticmethod
    def stop(proc: Proc, grace: float = 8.0) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds; only this process, by its PID."""
        if not proc.alive():
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.popen.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.popen.wait(5)

    @staticmethod
    def kill(proc: Proc) -> None:
        """SIGKILL at once: a crash, not a shutdown."""
        if proc.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.popen.wait(5)

    def stop_all(self) -> None:
        # Gateway processes first (they call the simulators), simulators last.
        order = sorted(self.procs, key=lambda p: p.name.startswith("sim-"))
        for proc in order:
            with contextlib.suppress(ProcessLookupError):
                if proc.alive():
                    os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30.0  # a loaded machine's patience: a clean exit can take seconds there
        for proc in order:
            try:
                proc.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill(proc)
        if self in LIVE:
            LIVE.remove(self)

    def tails(self, lines: int = 30) -> str:
        parts = []
        for proc in self.procs:
            state = "running" if proc.alive() else f"exited {proc.popen.returncode}"
            parts.append(f"----- {proc.name} (pid {proc.pid}, {state}) {proc.log}\n{proc.tail(lines)}")
        return "\n".join(parts)


def run_main(args: list[str], env: Mapping[str, str], log: Path, timeout: float = 120.0) -> None:
    """`python main.py <args>` to completion (migrate, seed-demo); its output is appended to `log`."""
    with log.open("ab") as handle:
        result = subprocess.run([PYTHON, "main.py", *args], cwd=ROOT, env=dict(env), stdout=handle,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=timeout, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"main.py {' '.join(args)} failed ({result.returncode}):\n"
                           + "\n".join(log.read_text(errors="replace").splitlines()[-40:]))


def reset_database(database_url: str) -> None:
    """Empty every table of an already migrated database (the same as the suite's `rt` fixture)."""
    from sqlalchemy import text

    import core.models  # noqa: F401 - registers every table on Base.metadata
    from core.db import Base, make_engine

    async def truncate() -> None:
        engine = make_engine(database_url)
        try:
            tables = ", ".join(t.name for t in reversed(Base.metadata.sorted_tables))
            async with engine.begin() as conn:
                await conn.execute(text("SET LOCAL session_replication_role = replica"))  # see clean_database
                await conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
        finally:
            await engine.dispose()

    asyncio.run(truncate())


def flush_redis(redis_url: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url, socket_timeout=3)
    try:
        client.flushdb()
    finally:
        client.close()


@dataclass
class Stack:
    """Simulators, `serve` and `worker` processes of one gateway against one PostgreSQL and Redis.

    Ports are chosen before anything starts so that every process knows every other one: providers'
    base URLs point at the simulator processes, PUBLIC_BASE_URL at a serve process (callbacks and
    delivery reports come back to the gateway), SIMULATORS_IN_PROCESS=0.
    """

    harness: Harness
    database_url: str
    redis_url: str
    serves: int = 1
    workers: int = 1
    env_overrides: dict[str, str] = field(default_factory=dict)
    sim_args: dict[str, list[str]] = field(default_factory=dict)
    sim_ports: dict[str, int] = field(default_factory=dict)
    serve_ports: list[int] = field(default_factory=list)
    sims: dict[str, Proc] = field(default_factory=dict)
    serve_procs: list[Proc] = field(default_factory=list)
    worker_procs: list[Proc] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.sim_ports = {name: free_port() for name in SIMULATORS}
        self.serve_ports = [free_port() for _ in range(self.serves)]

    # addresses ---------------------------------------------------------------------------------
    def serve_url(self, index: int = 0) -> str:
        return f"http://127.0.0.1:{self.serve_ports[index]}"

    @property
    def serve_urls(self) -> list[str]:
        return [self.serve_url(i) for i in range(self.serves)]

    def sim_url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.sim_ports[name]}"

    def env(self, *, public: int = 0, port: int | None = None) -> dict[str, str]:
        """The environment of a gateway process whose callbacks come back to serve number `public`."""
        env = base_env()
        env.update({
            "DATABASE_URL": self.database_url,
            "REDIS_URL": self.redis_url,
            "GATEWAY_ENV": "test",
            "SIMULATORS_IN_PROCESS": "0",
            "PUBLIC_BASE_URL": self.serve_url(public),
            "HOST": "127.0.0.1",
            "PORT": str(port if port is not None else self.serve_ports[public]),
            "SMS_BASE_URL": self.sim_url("africastalking"),
            "SMS_USERNAME": "sandbox",
            "SMS_API_KEY": "integration-sms-api-key",
            "SMS_RATE_PER_SECOND": "500",
            "POLL_AFTER_SECONDS": "2",
            "PAYMENT_TIMEOUT_SECONDS": "60",
            "OUTBOX_LEASE_SECONDS": "10",
            "RATE_LIMIT_MULTIPLIER": "0",
            "REMINDERS_ENABLED": "0",  # the tests count SMS per phone exactly
            "LOG_LEVEL": "INFO",
            "PYTHONUNBUFFERED": "1",
        })
        for name in PROVIDERS:
            env[f"{name.upper()}_BASE_URL"] = self.sim_url(name)
        env.update(self.env_overrides)
        return env

    def settings(self):  # type: ignore[no-untyped-def]
        """The gateway's Settings as its processes see them (for a Runtime inside the test)."""
        from core.config import load_settings

        return load_settings(self.env())

    # life cycle --------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Migrate, empty, seed the demo cooperative, and empty this Redis database."""
        log = self.harness.folder / "setup.log"
        run_main(["migrate"], self.env(), log)
        reset_database(self.database_url)
        flush_redis(self.redis_url)
        run_main(["seed-demo"], self.env(), log)

    def start(self, *, prepare: bool = True) -> Stack:
        # Simulators need no database: they boot while the migration and the seed run.
        for name in SIMULATORS:
            self.start_simulator(name, wait=False)
        if prepare:
            self.prepare()
        for name in SIMULATORS:
            self.harness.wait_ready(self.sims[name], _SIM_READY[name])
        for index in range(self.serves):
            self.start_serve(index, wait=False)
        for _ in range(self.workers):
            self.start_worker(wait=False)
        for proc in self.serve_procs:
            self.harness.wait_ready(proc, "/healthz")
        for proc in self.worker_procs:
            self.harness.wait_started(proc, "worker started")
        return self

    def start_simulator(self, name: str, *, wait: bool = True) -> Proc:
        port = self.sim_ports[name]
        args = ["simulate", name, "--port", str(port)]
        if name != "africastalking":
            args += ["--delay", "0.3"]
            if name in ("airtel", "irembopay"):  # their callback URL is configured, not sent
                args += ["--callback-url", f"{self.serve_url(0)}/webhooks/payments/{name}"]
        args += self.sim_args.get(name, [])
        proc = self.harness.spawn(f"sim-{name}", args, self.env(), port=port)
        self.sims[name] = proc
        if wait:
            self.harness.wait_ready(proc, _SIM_READY[name])
        return proc

    def start_serve(self, index: int, *, wait: bool = True) -> Proc:
        port = self.serve_ports[index]
        proc = self.harness.spawn(f"serve{index}", ["serve"], self.env(public=index, port=port), port=port)
        if index < len(self.serve_procs):
            self.serve_procs[index] = proc
        else:
            self.serve_procs.append(proc)
        if wait:
            self.harness.wait_ready(proc, "/healthz")
        return proc

    def start_worker(self, *, wait: bool = True, concurrency: int = 16) -> Proc:
        number = len(self.worker_procs)
        # Worker n asks providers to call back serve n (mod serves): callbacks land on every server.
        proc = self.harness.spawn(f"worker{number}", ["worker", "--concurrency", str(concurrency)],
                                  self.env(public=number % self.serves))
        self.worker_procs.append(proc)
        if wait:
            self.harness.wait_started(proc, "worker started")
        return proc

    def stop(self) -> None:
        self.harness.stop_all()


# What a simulator answers once it listens (they have no /healthz).
_SIM_READY = {name: "/_control/pending?msisdn=1" for name in PROVIDERS} | {"africastalking": "/_inbox"}


# ------------------------------------------------------------------------- private PostgreSQL and Redis


def pg_bin() -> str | None:
    candidates = [os.environ.get("TEST_PG_BIN", ""), *sorted(glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    for folder in candidates:
        if folder and Path(folder, "initdb").exists() and Path(folder, "pg_ctl").exists():
            return folder
    return None


def private_services_available() -> bool:
    return pg_bin() is not None and shutil.which("redis-server") is not None


class PrivateServices:
    """A throwaway PostgreSQL and Redis that a fault test may stop and restart (never the shared ones).

    PostgreSQL runs as the `postgres` user when we are root (initdb refuses root), in a folder under
    /tmp that user can reach; Redis is a child process without persistence, restarted on the same port.
    """

    def __init__(self, log_folder: Path) -> None:
        folder = pg_bin()
        if folder is None:
            raise RuntimeError("PostgreSQL binaries not found (set TEST_PG_BIN)")
        self.bin = folder
        self.logs = log_folder
        self.dir = Path(tempfile.mkdtemp(prefix="gw-faults-"))
        self.dir.chmod(0o755)
        self.pg_port = free_port()
        self.redis_port = free_port()
        self.redis: subprocess.Popen[bytes] | None = None
        self._pg_started = False

    @property
    def database_url(self) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.pg_port}/gateway_faults"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def _as_pg(self, args: list[str], **kwargs: object) -> subprocess.CompletedProcess[bytes]:
        if os.geteuid() == 0:
            args = ["runuser", "-u", "postgres", "--", *args]
        return subprocess.run(args, check=False, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,  # type: ignore[call-overload]
                              stdin=subprocess.DEVNULL, **kwargs)

    def _checked(self, args: list[str], what: str) -> None:
        result = self._as_pg(args, timeout=90)
        if result.returncode != 0:
            raise RuntimeError(f"{what} failed: {result.stdout.decode(errors='replace')[-2000:]}")

    def start(self) -> PrivateServices:
        pg = self.dir / "pg"
        pg.mkdir()
        if os.geteuid() == 0:
            shutil.chown(pg, "postgres")
        self._checked([f"{self.bin}/initdb", "-D", str(pg / "data"), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                       "--locale=C.UTF-8"], "initdb")
        self.start_postgres()
        self._checked([f"{self.bin}/createdb", "-h", "127.0.0.1", "-p", str(self.pg_port), "-U", "postgres",
                       "gateway_faults"], "createdb")
        self.start_redis()
        return self

    def start_postgres(self) -> None:
        options = (f"-p {self.pg_port} -k {self.dir / 'pg'} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c full_page_writes=off -c max_connections=200")
        self._checked([f"{self.bin}/pg_ctl", "-D", str(self.dir / "pg" / "data"), "-l",
                       str(self.dir / "pg" / "server.log"), "-w", "-t", "60", "start", "-o", options],
                      "pg_ctl start")
        self._pg_started = True

    def stop_postgres(self, mode: str = "fast") -> None:
        self._checked([f"{self.bin}/pg_ctl", "-D", str(self.dir / "pg" / "data"), "-m", mode, "-w", "-t", "60",
                       "stop"], "pg_ctl stop")
        self._pg_started = False

    def start_redis(self) -> None:
        log = (self.logs / "redis.log").open("ab")
        try:
            self.redis = subprocess.Popen(
                ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(self.dir)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            log.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.redis_port), 0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return
            time.sleep(0.05)
        raise RuntimeError("private redis-server did not start")

    def stop_redis(self) -> None:
        if self.redis is not None and self.redis.poll() is None:
            os.kill(self.redis.pid, signal.SIGTERM)
            try:
                self.redis.wait(5)
            except subprocess.TimeoutExpired:
                os.kill(self.redis.pid, signal.SIGKILL)
                self.redis.wait(5)
        self.redis = None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.stop_redis()
        if self._pg_started:
            with contextlib.suppress(Exception):
                self.stop_postgres("immediate")
        for name in ("server.log",):
            with contextlib.suppress(OSError):
                shutil.copy(self.dir / "pg" / name, self.logs / f"postgres-{name}")
        shutil.rmtree(self.dir, ignore_errors=True)


def all_tails(harnesses: Iterable[Harness] | None = None, lines: int = 30) -> str:
    return "\n".join(h.tails(lines) for h in (LIVE if harnesses is None else harnesses))
