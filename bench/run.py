"""The benchmark suite: real service, own PostgreSQL/Redis, simulators as processes, wrk as the load.

    .venv/bin/python bench/run.py [--quick] [--only ussd_hop,payments,...] [--seconds S] [--json PATH]

Starts throwaway PostgreSQL and Redis (scripts/services.sh), migrates and seeds the demo, starts the
provider and SMS simulators as separate processes and `main.py serve` in a production configuration,
measures each scenario next to its baseline (bench/baseline.py) and writes bench/RESULTS.md (a full
run) or only prints the summary (--quick). Everything it started is stopped, by PID, whatever happens.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import platform
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncpg
import httpx

from bench.harness import ROOT, Cluster, LoadResult, Proc, free_port, python, wait_ready, wrk

SCENARIOS = ("ussd_hop", "ussd_hop_2proc", "ussd_pay", "ussd_pay_2proc", "ussd_pay_rate", "payments", "payments_2proc",
             "callbacks", "callbacks_2proc", "sms", "memory")
PROVIDERS = ("mtn_momo", "airtel", "mpesa", "irembopay")
SERVICE_CODE = "*384*123#"
HOP_PHONE = "+250788000001"  # demo member: one membership, so the home menu needs no choice
AIRTEL_PAYER = "+250733000001"  # demo member with an Airtel number: the API payments and callbacks
# BENCH_CONNECTIONS: fewer, to profile on a machine that is not saturated (py-spy's samples on a full machine
# land where the kernel preempted serve, its socket writes, not where its CPU went); targets are for 32.
CONNECTIONS = int(os.environ.get("BENCH_CONNECTIONS", "32"))
# Members per pay-session connection: each session of a connection is another member's (the gateway refuses a
# member a second payment of a type and amount while her first is open, as the sessions' payments stay: no
# worker runs them). More than a connection's sessions in one run; between runs the pool's payments are
# closed (_close_pool_payments). 100 was too few once a quiet host ran 327 sessions/s with two `serve`: a
# connection's 101st session was a member's second while her first was open, an END with no payment, and the
# run's check (ENDs <= payments) failed. 300 holds up to 960 sessions/s for 10 s.
PAY_MEMBERS_PER_CONNECTION = 300
# The pay session's target rate (sessions/s), offered on schedule by bench/paced.py (scenario ussd_pay_rate).
PACED_RATE = 200.0


@dataclass
class Row:
    """One line of the results table."""

    scenario: str
    figure: str
    value: float
    unit: str
    baseline: float | None = None
    target: str = ""
    met: bool | None = None
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    checks: dict[str, Any] = field(default_factory=dict)
    notes: str = ""

    @property
    def ratio(self) -> float | None:
        return self.value / self.baseline if self.baseline else None


@dataclass
class Bench:
    args: argparse.Namespace
    cluster: Cluster
    env: dict[str, str]  # the gateway's environment
    dsn: str
    port: int
    sim_ports: dict[str, int]
    run_id: str
    rows: list[Row] = field(default_factory=list)
    load_before: str = field(default_factory=lambda: f"{os.getloadavg()[0]:.2f}")
    serve: Proc | None = None
    rss_peak: dict[str, float] = field(default_factory=dict)  # scenario -> peak RSS of serve (MB)
    demo: dict[str, Any] = field(default_factory=dict)
    phones: list[str] = field(default_factory=list)
    spare_phone: str = HOP_PHONE  # a member no other scenario dials (the session-size probe)
    token: str = ""
    form_baseline: LoadResult | None = None
    insert_base: LoadResult | None = None
    hop_one: LoadResult | None = None
    callback_bodies: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def seconds(self) -> float:
        return self.args.seconds

    def profile_path(self, scenario: str) -> Path | None:
        return self.cluster.workdir / f"profile-{scenario}.txt" if self.args.profile else None

    def log(self, message: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


# -- services and processes -------------------------------------------------------------------------

def start_services(workdir: Path) -> dict[str, str]:
    # TEST_PG_PORT / TEST_REDIS_PORT name servers that already run (a test session's): ours get free ports.
    env = {k: v for k, v in os.environ.items() if k not in ("TEST_PG_PORT", "TEST_REDIS_PORT")}
    out = subprocess.run(["bash", str(ROOT / "scripts" / "services.sh"), "start"], capture_output=True,
                         text=True, check=False, timeout=180, env=env)
    env: dict[str, str] = {}
    for line in out.stdout.splitlines():
        if line.startswith("export ") and "=" in line:
            key, _, value = line[len("export "):].partition("=")
            env[key] = value
    if out.returncode != 0 or "GATEWAY_SERVICES_DIR" not in env:
        if env.get("GATEWAY_SERVICES_DIR"):
            stop_services(env["GATEWAY_SERVICES_DIR"])
        raise RuntimeError(f"scripts/services.sh start failed: {out.stderr[-2000:]}")
    (workdir / "services.env").write_text(out.stdout)
    return env


def stop_services(directory: str) -> None:
    subprocess.run(["bash", str(ROOT / "scripts" / "services.sh"), "stop", directory], capture_output=True,
                   check=False, timeout=120)


def gateway_env(services: dict[str, str], port: int, sim_ports: dict[str, int], log_level: str) -> dict[str, str]:
    """Production configuration: every key and credential set, simulators reached over HTTP."""
    from core.config import _PROVIDER_CREDENTIALS

    kept = {k: v for k, v in os.environ.items()
            if not k.startswith(("MTN_MOMO_", "AIRTEL_", "MPESA_", "IREMBOPAY_", "SMS_", "CALLBACK_SECRET_",
                                 "SIM_", "PII_", "GATEWAY_", "DATABASE_URL", "REDIS_URL"))}
    env = {
        **kept,
        "GATEWAY_ENV": "production",
        "DATABASE_URL": services["DATABASE_URL"],
        "REDIS_URL": services["REDIS_URL"],
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "PUBLIC_BASE_URL": f"http://127.0.0.1:{port}",
        "PII_ENCRYPTION_KEYS": "bench:" + base64.b64encode(secrets.token_bytes(32)).decode(),
        "PII_ACTIVE_KEY_ID": "bench",
        "BLIND_INDEX_KEY": secrets.token_urlsafe(32),
        "JWT_SECRET": secrets.token_urlsafe(48),
        "SIMULATORS_IN_PROCESS": "0",
        # Limits on, as in production (each API call and callback counts in Redis, and a signed-in
        # caller's token revocation mark rides the same round trip), scaled so the load never reaches them.
        "RATE_LIMIT_MULTIPLIER": "100000",
        "REMINDERS_ENABLED": "0",
        "LOG_LEVEL": log_level,
        "SMS_BASE_URL": f"http://127.0.0.1:{sim_ports['africastalking']}",
        "SMS_USERNAME": "bench",
        "SMS_API_KEY": secrets.token_urlsafe(24),
        "SMS_SENDER_ID": "COOPPAY",
        "MTN_MOMO_TARGET_ENVIRONMENT": "mtnrwanda",
        "MPESA_SHORTCODE": "600981",
        "IREMBOPAY_PAYMENT_ACCOUNT": "PI-bench",
        "IREMBOPAY_PAYMENT_ITEM_CODE": "PC-bench",
        # The aggregator's send rate is a contract, not the code's speed: set high to measure the worker.
        "SMS_RATE_PER_SECOND": "10000",
        "PYTHONUNBUFFERED": "1",
    }
    for name in PROVIDERS:
        prefix = name.upper()
        env[f"{prefix}_BASE_URL"] = f"http://127.0.0.1:{sim_ports[name]}"
        for cred in _PROVIDER_CREDENTIALS[name]:
            env[f"{prefix}_{cred}"] = "bench-" + secrets.token_hex(8)
    for name in ("africastalking", "hubtel", "nalo", *PROVIDERS, "sms"):
        env[f"CALLBACK_SECRET_{name.upper()}"] = secrets.token_hex(12)
    return env


def start_simulators(b: Bench) -> None:
    procs: list[tuple[Proc, str]] = []
    for name, port in b.sim_ports.items():
        args = [python(), "main.py", "simulate", name, "--port", str(port)]
        if name != "africastalking":
            args += ["--delay", "0.5"]
        if name == "airtel":
            args += ["--callback-url", f"{b.url}/webhooks/payments/airtel?secret={b.env['CALLBACK_SECRET_AIRTEL']}"]
        procs.append((b.cluster.start(f"sim-{name}", args, b.env), f"http://127.0.0.1:{port}/"))
    for proc, url in procs:
        wait_ready(url, proc, 60)


def start_serve(b: Bench, name: str = "serve") -> Proc:
    if b.args.cprofile and name == "serve":  # the first process only (a second serve is not profiled)
        command = [python(), "bench/cprofile_serve.py", "--on-signal", str(b.cluster.workdir / "cprofile-serve.prof"),
                   "serve"]
    else:
        command = [python(), "main.py", "serve"]
    proc = b.cluster.start(name, command, b.env, ready_url=f"{b.url}/readyz")
    proc.profiled = b.args.cprofile and name == "serve"
    return proc


TWO_PROCESSES = ("two serve processes on one port (reuse_port), one per core, as the scale-out guide deploys "
                 "a 2-core machine; CPU per operation is both processes'")


@contextlib.contextmanager
def second_serve(b: Bench) -> Iterator[Proc]:
    """A second `serve` on the same port (reuse_port) for the length of a scenario, listening before the
    scenario starts (its /readyz is the first process's too: the port answers before this one binds)."""
    second = start_serve(b, "serve-2")
    try:
        wait_serving(second)
        yield second
    finally:
        second.stop()
        b.cluster.procs.remove(second)


def wait_serving(proc: Proc, timeout: float = 60) -> None:
    """Until the process logs "serving" (main.py logs it after its socket is bound and listening)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}; see {proc.log}")
        if '"msg":"serving"' in proc.log.read_text(errors="replace"):
            return
        time.sleep(0.1)
    raise RuntimeError(f"{proc.name} did not start serving within {timeout:.0f} s; see {proc.log}")


def _share(part: float, whole: float) -> float | None:
    return round(part / whole, 3) if whole else None


def second_share(first: RssSampler, second: RssSampler) -> float | None:
    """The second serve process's part of both processes' CPU during a scenario (about 0.5 when the load
    reached both; near 0 when every connection landed on the first)."""
    return _share(second.cpu, first.cpu + second.cpu)


def cpu_per_op(operations: float, *samplers: RssSampler) -> float:
    """CPU ms per operation summed over the processes sampled (each serve process of a scenario)."""
    return round(1000 * sum(s.cpu for s in samplers) / operations, 3) if operations else 0.0


class RssSampler:
    """Peak RSS of a process while a scenario runs; with --profile, py-spy samples it too."""

    def __init__(self, proc: Proc | None, profile: Path | None = None) -> None:
        self.proc, self.peak = proc, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._profile = profile
        self._spy: subprocess.Popen[bytes] | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.proc is not None:
                self.peak = max(self.peak, self.proc.rss_mb())
            self._stop.wait(0.2)

    @property
    def cpu(self) -> float:
        """CPU seconds the process used during the scenario: a figure the other load on the machine
        barely moves, unlike throughput (divide by the operations for a per-operation cost)."""
        return self._cpu_end - self._cpu_start

    def per_op_ms(self, operations: float) -> float:
        return round(1000 * self.cpu / operations, 3) if operations else 0.0

    def __enter__(self) -> RssSampler:
        if self.proc is not None and self.proc.profiled:
            self.proc.popen.send_signal(signal.SIGUSR1)  # its cProfile on for the measured load
        self._cpu_start = self._cpu_end = self.proc.cpu_seconds() if self.proc else 0.0
        self._thread.start()
        spy = Path(python()).parent / "py-spy"
        if self._profile is not None and self.proc is not None and spy.exists():
            # Blocking sampling (py-spy pauses the process for each sample): --nonblocking read the stacks
            # while they changed and gave torn ones, with most samples attributed to the wrong frames.
            self._spy = subprocess.Popen([str(spy), "record", "--pid", str(self.proc.popen.pid), "--format", "raw",
                                          "--rate", "200", "--output", str(self._profile)],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return self

    def __exit__(self, *_: object) -> None:
        self._cpu_end = self.proc.cpu_seconds() if self.proc else 0.0
        if self.proc is not None and self.proc.profiled:
            self.proc.popen.send_signal(signal.SIGUSR2)
        self._stop.set()
        self._thread.join()
        if self._spy is not None:
            self._spy.send_signal(2)  # SIGINT: py-spy writes the profile and exits
            try:
                self._spy.wait(30)
            except subprocess.TimeoutExpired:
                self._spy.kill()


# -- set-up ----------------------------------------------------------------------------------------

async def seed(env: dict[str, str], members: int) -> dict[str, Any]:
    """The demo, plus the pay sessions' MTN members (PAY_MEMBERS_PER_CONNECTION per connection, so no two sessions of
    a phone overlap, nor follow one another within a run); the first is the spare phone (session_size)."""
    from app import open_runtime
    from core.audit import Actor
    from core.config import load_settings
    from core.demo import seed_demo
    from core.members import create_member, find_memberships
    from core.phone import normalize

    settings = load_settings(env)
    async with open_runtime(settings) as rt, rt.sessionmaker.begin() as session:
        demo = await seed_demo(session, rt.cipher)
        phones = []
        for i in range(members):
            phone = normalize(f"+250788{100000 + i:06d}")
            if not await find_memberships(session, rt.cipher, phone):
                await create_member(session, rt.cipher, cooperative_id=demo["cooperative_id"],
                                    name=f"Bench Member {i}", phone=phone, language="en", unit=f"B-{i}",
                                    actor=Actor("system", "system"))
            phones.append(phone.e164)
        demo["phones"] = phones
        return demo


def login(b: Bench) -> str:
    user, password = b.demo["admin"]
    response = httpx.post(f"{b.url}/v1/auth/token", json={"username": user, "password": password}, timeout=30)
    response.raise_for_status()
    return str(response.json()["accessToken"])


async def db_fetch(dsn: str, query: str, *params: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(query, *params))
    finally:
        await conn.close()


def db(b: Bench, query: str, *params: Any) -> list[asyncpg.Record]:
    return asyncio.run(db_fetch(b.dsn, query, *params))


def settle(b: Bench, query: str, *params: Any, timeout: float = 30) -> None:
    """Wait until a count stops moving: requests wrk abandoned at its deadline still finish on the server."""
    last, deadline = None, time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = db_value(b, query, *params)
        if value == last:
            return
        last = value
        time.sleep(0.5)


def db_value(b: Bench, query: str, *params: Any) -> Any:
    rows = db(b, query, *params)
    return rows[0][0] if rows else None


def pg_sessions(b: Bench) -> int:
    """Connections PostgreSQL has accepted so far (pg_stat_database.sessions, PostgreSQL 14+; its statistics are
    flushed within a second or so): the difference across a load is how many the service opened during it (a pool
    that closes what it lends beyond its size and opens again makes every such checkout a backend fork)."""
    time.sleep(1.0)  # the previous statements' sessions flushed to the statistics
    return int(db_value(b, "SELECT coalesce(sum(sessions), 0) FROM pg_stat_database") or 0)


def opened_during(b: Bench, before: int) -> int:
    """Connections opened since `before` (pg_sessions), less the one this count itself opens."""
    return pg_sessions(b) - before - 1


# -- scenarios -------------------------------------------------------------------------------------

def _lat(row: Row, result: LoadResult) -> Row:
    row.p50_ms, row.p95_ms, row.p99_ms = result.p50_ms, result.p95_ms, result.p99_ms
    return row


def _load_errors(result: LoadResult) -> int:
    return result.errors + result.non_2xx + int(result.extra.get("bad", 0))


def form_baseline(b: Bench) -> LoadResult:
    if b.form_baseline is None:
        port = free_port()
        proc = b.cluster.start("baseline-form", [python(), "bench/baseline.py", "form", "--port", str(port)],
                               b.env, ready_url=f"http://127.0.0.1:{port}/nothing")
        try:
            b.log("baseline: bare aiohttp form handler")
            warm_up(f"http://127.0.0.1:{port}/", b)
            b.form_baseline = hop_load(f"http://127.0.0.1:{port}/", b)
        finally:
            proc.stop()
    return b.form_baseline


def redis_floor(b: Bench) -> LoadResult:
    """The bare form handler plus one Redis GET and one SET EX through redis-py: what a hop that keeps its
    session in Redis cannot go below in this stack, whatever the gateway's own code does."""
    port = free_port()
    proc = b.cluster.start("baseline-form-redis", [python(), "bench/baseline.py", "form_redis", "--port", str(port),
                                                   "--redis", b.env["REDIS_URL"]],
                           b.env, ready_url=f"http://127.0.0.1:{port}/nothing")
    try:
        b.log("floor: bare aiohttp form handler with a Redis GET and SET")
        warm_up(f"http://127.0.0.1:{port}/", b)
        return hop_load(f"http://127.0.0.1:{port}/", b)
    finally:
        proc.stop()


def warm_up(url: str, b: Bench) -> None:
    """The same hops for a moment first, not measured: a process's first hops open its database pool's
    connections (32 sessions opening at once, each connect and its first ping), which a running service
    has long done. The baseline is warmed the same way."""
    wrk(url, "ussd_hop.lua", seconds=1 if b.args.quick else 2, connections=CONNECTIONS,
        env={"BENCH_PHONE": HOP_PHONE, "BENCH_RUN": b.run_id + "w" + secrets.token_hex(2), "BENCH_HOPS": "50"})


def hop_load(url: str, b: Bench) -> LoadResult:
    return wrk(url, "ussd_hop.lua", seconds=b.seconds(), connections=CONNECTIONS,
               env={"BENCH_PHONE": HOP_PHONE, "BENCH_RUN": b.run_id + secrets.token_hex(2),
                    "BENCH_HOPS": "50"})


def ussd_path(b: Bench) -> str:
    return f"{b.url}/ussd/africastalking?secret={b.env['CALLBACK_SECRET_AFRICASTALKING']}"


def scenario_ussd_hop(b: Bench) -> None:
    base = form_baseline(b)
    b.log("USSD menu hop, 1 serve process, 32 connections")
    warm_up(ussd_path(b), b)
    with RssSampler(b.serve, b.profile_path("ussd_hop")) as rss:
        result = hop_load(ussd_path(b), b)
    b.rss_peak["ussd_hop"] = rss.peak
    b.hop_one = result
    floor = redis_floor(b)
    errors = _load_errors(result)
    b.rows.append(_lat(Row("USSD menu hop (1 process, 32 conn.)", "hops/s", result.rps, "/s", baseline=base.rps,
                           target=">=40% of baseline; p99 <=15 ms",
                           met=errors == 0 and result.rps >= 0.4 * base.rps and result.p99_ms <= 15,
                           checks={"errors": errors, "requests": result.requests,
                                   "serve_cpu_ms_per_hop": rss.per_op_ms(result.requests),
                                   "baseline_p50_ms": base.p50_ms, "baseline_p99_ms": base.p99_ms,
                                   # The bare handler with the session's Redis GET and SET, nothing else.
                                   "redis_floor_rps": round(floor.rps), "redis_floor_p99_ms": floor.p99_ms,
                                   "redis_floor_share_of_baseline": _share(floor.rps, base.rps),
                                   "share_of_redis_floor": _share(result.rps, floor.rps)},
                           notes="sessions of 40-60 hops, 50 on average (Language, Back, ...): about 1 in 50 "
                                 "opens a session (membership read, session row); after 2 s of the same load, "
                                 "not measured"), result))


def scenario_ussd_hop_2proc(b: Bench) -> None:
    one = b.hop_one
    if one is None:
        one = hop_load(ussd_path(b), b)
        b.hop_one = one
    with second_serve(b) as second:
        b.log("USSD menu hop, 2 serve processes (reuse_port), 32 connections")
        warm_up(ussd_path(b), b)
        with RssSampler(second) as rss:
            result = hop_load(ussd_path(b), b)
    b.rss_peak["ussd_hop_2proc(second)"] = rss.peak
    errors = _load_errors(result)
    b.rows.append(_lat(Row("USSD menu hop (2 processes, 32 conn.)", "hops/s", result.rps, "/s",
                           baseline=one.rps, target=">=1.6x one process",
                           met=errors == 0 and result.rps >= 1.6 * one.rps,
                           checks={"errors": errors, "requests": result.requests, "cpus": os.cpu_count()},
                           notes="baseline column = one serve process; wrk, PostgreSQL and Redis share "
                                 f"the same {os.cpu_count()} CPUs"), result))


def scenario_ussd_pay(b: Bench) -> None:
    pay_sessions(b, "Full USSD pay session (32 conn.)", "ussd_pay")


def scenario_ussd_pay_2proc(b: Bench) -> None:
    with second_serve(b) as second:
        pay_sessions(b, "Full USSD pay session (2 processes, 32 conn.)", "ussd_pay_2proc", second,
                     notes=TWO_PROCESSES)


def pay_sessions(b: Bench, label: str, name: str, second: Proc | None = None, notes: str = "") -> None:
    run = b.run_id + secrets.token_hex(2)
    b.log(f"{label}: 4 hops, END creates the payment")
    # Warm-up, not measured (as for the menu hops): the first confirmations of 32 sessions at once open
    # most of the database pool. Its payments are older than `started`, so the checks leave them out.
    warmed = datetime.now(UTC)
    phones = {"BENCH_PHONE_FIRST": b.phones[0], "BENCH_PHONES_PER_CONNECTION": str(PAY_MEMBERS_PER_CONNECTION)}
    _close_pool_payments(b)
    wrk(ussd_path(b), "ussd_pay.lua", seconds=1 if b.args.quick else 2, connections=CONNECTIONS,
        env={**phones, "BENCH_RUN": run + "w"})
    settle(b, "SELECT count(*) FROM payments WHERE channel = 'ussd' AND created_at >= $1", warmed)
    forget_resume_routes(b)  # sessions the warm-up left mid-way would offer "resume" instead of the menu
    _close_pool_payments(b)
    started = datetime.now(UTC)
    sessions_before = pg_sessions(b)
    with RssSampler(b.serve, b.profile_path(name)) as rss, RssSampler(second) as rss2:
        # At least 3 s: the first hops of 32 new sessions come at once, and a smoke run must see ENDs.
        result = wrk(ussd_path(b), "ussd_pay.lua", seconds=max(3.0, b.seconds()), connections=CONNECTIONS,
                     env={**phones, "BENCH_RUN": run})
    b.rss_peak[name] = max(rss.peak, rss2.peak)
    opened = opened_during(b, sessions_before)
    ends = int(result.extra.get("ends", 0))
    settle(b, "SELECT count(*) FROM payments WHERE channel = 'ussd' AND created_at >= $1", started)
    payments, jobs = db(b, """
        SELECT (SELECT count(*) FROM payments WHERE channel = 'ussd' AND created_at >= $1),
               (SELECT count(*) FROM outbox_jobs j JOIN payments p ON p.id = j.payload->>'payment_id'
                 WHERE j.kind = 'payment.collect' AND p.channel = 'ussd' AND p.created_at >= $1)""", started)[0]
    errors = _load_errors(result)
    sessions = ends / max(result.seconds, 1e-9)
    consistent = ends <= payments <= ends + CONNECTIONS and jobs == payments
    b.rows.append(_lat(Row(label, "sessions/s", sessions, "/s",
                           target=">=200 sessions/s; p99 per hop <=50 ms",
                           met=errors == 0 and consistent and sessions >= 200 and result.p99_ms <= 50,
                           checks={"errors": errors, "hops": result.requests, "sessions_ended": ends,
                                   "serve_cpu_ms_per_hop": cpu_per_op(result.requests, rss, rss2),
                                   "second_process_cpu_share": second_share(rss, rss2) if second else None,
                                   "payments_in_db": payments, "collect_jobs": jobs, "consistent": consistent,
                                   "db_connections_opened": opened},
                           notes="latency columns are per hop; after 2 s of the same load, not measured"
                                 + (f"; {notes}" if notes else "")),
                       result))


def scenario_ussd_pay_rate(b: Bench) -> None:
    """The pay session at the rate its target names, started on schedule (bench/paced.py), one `serve`: what a
    member waits a hop when 200 sessions a second come, where the 32-connection runs above measure the most the
    service takes, each hop's latency then mostly the queue of the other 31 connections' hops."""
    # The smoke run (--quick) offers a tenth of it: it checks that the scenario works, and an open loop at the
    # target's rate overloads a busy CI machine (sessions shed, "END service unavailable"), where wrk's closed loop
    # only slows down.
    rate = PACED_RATE / 10 if b.args.quick else PACED_RATE
    label = f"Full USSD pay session at {rate:g} sessions/s (1 process, paced)"
    b.log(f"{label}: sessions started on schedule, 4 hops each")
    run = b.run_id + secrets.token_hex(2)

    def paced(seconds: float, run: str) -> LoadResult:
        return _python_load("paced.py", ussd_path(b), "--rate", f"{rate:g}", "--seconds", f"{seconds:g}",
                            "--phone-first", b.phones[0], "--phones", str(len(b.phones)), "--run", run)

    if not b.args.quick:
        # Warm-up, not measured, as for the runs above (when this one runs alone, its first confirmations open the
        # database pool).
        _close_pool_payments(b)
        paced(2.0, run + "w")
    forget_resume_routes(b)
    _close_pool_payments(b)
    started = datetime.now(UTC)
    with RssSampler(b.serve, b.profile_path("ussd_pay_rate")) as rss:
        result = paced(b.seconds() if b.args.quick else max(3.0, b.seconds()), run)
    b.rss_peak["ussd_pay_rate"] = rss.peak
    ends, late = int(result.extra.get("ends", 0)), int(result.extra.get("late_starts", 0))
    settle(b, "SELECT count(*) FROM payments WHERE channel = 'ussd' AND created_at >= $1", started)
    payments, jobs = db(b, """
        SELECT (SELECT count(*) FROM payments WHERE channel = 'ussd' AND created_at >= $1),
               (SELECT count(*) FROM outbox_jobs j JOIN payments p ON p.id = j.payload->>'payment_id'
                 WHERE j.kind = 'payment.collect' AND p.channel = 'ussd' AND p.created_at >= $1)""", started)[0]
    errors = _load_errors(result) + int(result.extra.get("bad", 0))
    sessions = ends / max(result.seconds, 1e-9)
    consistent = ends == payments == jobs == int(result.extra.get("sessions", -1))
    b.rows.append(_lat(Row(label, "sessions/s", sessions, "/s", target=">=200 sessions/s; p99 per hop <=50 ms",
                           met=(rate == PACED_RATE and errors == 0 and consistent and sessions >= 0.98 * rate
                                and result.p99_ms <= 50),
                           checks={"errors": errors, "hops": result.requests, "sessions_started": result.extra.get(
                                       "sessions"), "sessions_ended": ends, "late_starts": late,
                                   "serve_cpu_ms_per_hop": cpu_per_op(result.requests, rss),
                                   "loadgen_cpu_ms_per_hop": result.extra.get("loadgen_cpu_ms"),
                                   "payments_in_db": payments, "collect_jobs": jobs, "consistent": consistent},
                           notes=f"open loop: session i starts at i/{rate:g} s whatever the others are doing, its "
                                 "first hop timed from then; latency columns are per hop; each session another member"),
                       result))


def insert_baseline(b: Bench) -> LoadResult:
    port = free_port()
    dsn = b.dsn
    proc = b.cluster.start("baseline-insert",
                           [python(), "bench/baseline.py", "insert", "--port", str(port), "--dsn", dsn], b.env,
                           ready_url=f"http://127.0.0.1:{port}/nothing")
    try:
        b.log("baseline: bare asyncpg single-row INSERT handler")
        return wrk(f"http://127.0.0.1:{port}/", "insert.lua", seconds=b.seconds(), connections=CONNECTIONS,
                   env={"BENCH_RUN": "base" + secrets.token_hex(3)})
    finally:
        proc.stop()


def api_payments_load(b: Bench, seconds: float, run: str) -> LoadResult:
    return wrk(f"{b.url}/v1/payments", "insert.lua", seconds=seconds, connections=CONNECTIONS,
               env={"BENCH_PATH": "/v1/payments", "BENCH_TOKEN": b.token, "BENCH_RUN": run,
                    "BENCH_PAYMENT_TYPE": b.demo["payment_types"]["Water"], "BENCH_METHOD": "MOBILE_MONEY_AIRTEL",
                    "BENCH_ACCOUNT": AIRTEL_PAYER, "BENCH_AMOUNT": "5000"})


def scenario_payments(b: Bench) -> None:
    b.insert_base = insert_baseline(b)
    api_payments(b, "POST /v1/payments (idempotency key, 32 conn.)", "payments")


def scenario_payments_2proc(b: Bench) -> None:
    if b.insert_base is None:
        b.insert_base = insert_baseline(b)
    with second_serve(b) as second:
        api_payments_load(b, 1.0 if b.args.quick else 2.0, "warm" + secrets.token_hex(3))  # not measured
        api_payments(b, "POST /v1/payments (2 processes, 32 conn.)", "payments_2proc", second, notes=TWO_PROCESSES)


def api_payments(b: Bench, label: str, name: str, second: Proc | None = None, notes: str = "") -> None:
    base = b.insert_base
    assert base is not None
    run = b.run_id + secrets.token_hex(2)
    b.log(f"{label}: POST /v1/payments with idempotency keys")
    sessions_before = pg_sessions(b)
    with RssSampler(b.serve, b.profile_path(name)) as rss, RssSampler(second) as rss2:
        result = api_payments_load(b, b.seconds(), run)
    b.rss_peak[name] = max(rss.peak, rss2.peak)
    opened = opened_during(b, sessions_before)
    created = int(result.extra.get("created", 0))
    like = f"bench-{run}-%"
    settle(b, "SELECT count(*) FROM payments WHERE idempotency_key LIKE $1", like)
    # One statement, one snapshot: the three counts see the same committed payments.
    rows, audit, jobs = db(b, """
        SELECT (SELECT count(*) FROM payments WHERE idempotency_key LIKE $1),
               (SELECT count(*) FROM audit_events a JOIN payments p ON p.id = a.entity_id
                 WHERE a.action = 'payment.created' AND p.idempotency_key LIKE $1),
               (SELECT count(*) FROM outbox_jobs j JOIN payments p ON p.id = j.payload->>'payment_id'
                 WHERE j.kind IN ('payment.collect', 'payment.poll') AND p.idempotency_key LIKE $1)""", like)[0]
    replay = replay_check(b, run)
    errors = _load_errors(result)
    consistent = created <= rows <= created + CONNECTIONS and audit == rows and jobs == 2 * rows and replay
    b.rows.append(_lat(Row(label, "payments/s", result.rps, "/s",
                           baseline=base.rps, target=">=40% of baseline and >=1,000/s",
                           met=errors == 0 and consistent and result.rps >= max(1000, 0.4 * base.rps),
                           checks={"errors": errors, "created_201": created, "payment_rows": rows,
                                   "serve_cpu_ms_per_payment": cpu_per_op(result.requests, rss, rss2),
                                   "second_process_cpu_share": second_share(rss, rss2) if second else None,
                                   "audit_rows": audit, "outbox_jobs": jobs, "replay_ok": replay,
                                   "consistent": consistent, "baseline_p99_ms": base.p99_ms,
                                   "baseline_errors": _load_errors(base), "db_connections_opened": opened},
                           notes="payment + audit + 2 outbox rows in one transaction; JWT auth, schema check"
                                 + (f"; {notes}" if notes else "")),
                       result))


def replay_check(b: Bench, run: str) -> bool:
    """The same key and body again: 201 (as the first answer) with the same payment, marked replayed, no new row."""
    body = {"paymentTypeId": b.demo["payment_types"]["Water"], "amount": 5000, "paymentMethod": "MOBILE_MONEY_AIRTEL",
            "paymentAccount": AIRTEL_PAYER, "description": "bench", "idempotencyKey": f"bench-{run}-0-5"}
    headers = {"Authorization": f"Bearer {b.token}"}
    first = httpx.post(f"{b.url}/v1/payments", json=body, headers=headers, timeout=30)
    second = httpx.post(f"{b.url}/v1/payments", json=body, headers=headers, timeout=30)
    return first.status_code == 201 and second.status_code == 201 \
        and first.json()["id"] == second.json()["id"] and second.headers.get("Idempotent-Replayed") == "true"


def pending_airtel(b: Bench, count: int) -> list[asyncpg.Record]:
    return db(b, "SELECT id, provider_reference FROM payments WHERE provider = 'airtel' AND status = 'PENDING' "
                 "ORDER BY created_at LIMIT $1", count)


def ensure_airtel_payments(b: Bench, count: int) -> list[asyncpg.Record]:
    found = pending_airtel(b, count)
    rate = 100.0  # payments/s the API managed; the first top-up measures it
    while len(found) < count:
        missing = count - len(found)
        b.log(f"creating {missing} Airtel payments through the API for the callbacks")
        result = api_payments_load(b, max(1.0, min(60.0, 1.2 * missing / rate)), "top" + secrets.token_hex(3))
        rate = max(20.0, result.extra.get("created", 0) / max(result.seconds, 1e-9))
        found = pending_airtel(b, count)
    return found


def write_callbacks(b: Bench, payments: list[asyncpg.Record]) -> Path:
    from providers.airtel.adapter import callback_hash

    key = b.env["AIRTEL_CALLBACK_KEY"]
    path = b.cluster.workdir / f"callbacks-{secrets.token_hex(3)}.jsonl"
    with path.open("w") as out:
        for row in payments:
            tx = {"id": row["provider_reference"], "message": "Paid", "status_code": "TS",
                  "airtel_money_id": "MP" + uuid.uuid4().hex[:12]}
            out.write(json.dumps({"transaction": tx, "hash": callback_hash(tx, key)}, separators=(",", ":")) + "\n")
    return path


def loadgen(url: str, path: Path, *, connections: int) -> LoadResult:
    """bench/loadgen.py in its own process: each body once (wrk runs for a duration, not a count)."""
    return _python_load("loadgen.py", url, str(path), "--connections", str(connections))


def _python_load(script: str, *args: str) -> LoadResult:
    """One of the benchmark's Python load generators in its own process, read from its 'BENCH {json}' line. Its own
    CPU time a request is kept (loadgen_cpu_ms): it shares the machine's CPUs with the service."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run([python(), str(ROOT / "bench" / script), *args], capture_output=True, text=True,
                         check=False, timeout=900)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    line = next((x for x in out.stdout.splitlines() if x.startswith("BENCH ")), None)
    if line is None:
        raise RuntimeError(f"{script} gave no summary: {out.stdout[-2000:]} {out.stderr[-2000:]}")
    data = json.loads(line[len("BENCH "):])
    extra = {k: float(v) for k, v in data.items()
             if k not in ("requests", "seconds", "p50", "p95", "p99", "errors", "non2xx")}
    extra["loadgen_cpu_ms"] = round(cpu * 1000 / max(int(data["requests"]), 1), 3)
    return LoadResult(requests=int(data["requests"]), seconds=float(data["seconds"]),
                      rps=data["requests"] / max(data["seconds"], 1e-9), p50_ms=data["p50"] / 1000,
                      p95_ms=data["p95"] / 1000, p99_ms=data["p99"] / 1000, errors=int(data["errors"]),
                      non_2xx=int(data["non2xx"]), extra=extra)


def callback_counts(b: Bench, ids: list[str]) -> dict[str, int]:
    rows = db(b, """
        SELECT
          (SELECT count(*) FROM payments WHERE id = ANY($1::text[]) AND status = 'COMPLETED'),
          (SELECT count(*) FROM provider_events WHERE payment_id = ANY($1::text[])),
          (SELECT count(*) FROM audit_events WHERE action = 'payment.completed' AND entity_id = ANY($1::text[])),
          (SELECT count(*) FROM outbox_jobs WHERE kind = 'sms.send'
             AND payload->'context'->>'payment_id' = ANY($1::text[])),
          (SELECT count(*) FROM outbox_jobs WHERE kind = 'webhook.event' AND payload->'data'->>'id' = ANY($1::text[]))
    """, ids)
    names = ("completed", "provider_events", "audit_completed", "sms_jobs", "webhook_jobs")
    return dict(zip(names, (int(v) for v in rows[0]), strict=True))


def scenario_callbacks(b: Bench, *, report: bool = True) -> None:
    callbacks(b, "Provider callbacks (Airtel, signed)", "callbacks", report=report)


def scenario_callbacks_2proc(b: Bench) -> None:
    with second_serve(b) as second:
        callbacks(b, "Provider callbacks (2 processes)", "callbacks_2proc", second, notes=TWO_PROCESSES)


def callbacks(b: Bench, label: str, name: str, second: Proc | None = None, *, report: bool = True,
              notes: str = "") -> None:
    count = b.args.callbacks
    payments = ensure_airtel_payments(b, count)
    ids = [str(r["id"]) for r in payments]
    path = write_callbacks(b, payments)
    b.callback_bodies = len(payments)
    url = f"{b.url}/webhooks/payments/airtel?secret={b.env['CALLBACK_SECRET_AIRTEL']}"
    b.log(f"{label}: {len(payments)} signed Airtel callbacks, 32 connections")
    sessions_before = pg_sessions(b)
    with RssSampler(b.serve, b.profile_path(name)) as rss, RssSampler(second) as rss2:
        result = loadgen(url, path, connections=min(CONNECTIONS, count))
    b.rss_peak[name] = max(rss.peak, rss2.peak)
    opened = opened_during(b, sessions_before)
    first = callback_counts(b, ids)
    # Every callback again: all must be answered as duplicates and change nothing.
    replay = loadgen(url, path, connections=min(CONNECTIONS, count))
    second_counts = callback_counts(b, ids)
    n = len(ids)
    exact = all(v == n for v in first.values()) and second_counts == first
    replay_ok = int(replay.extra.get("duplicate", 0)) == n and _load_errors(replay) == 0
    if not report:
        return
    errors = _load_errors(result)
    completed = int(result.extra.get("completed", 0))
    rate = completed / max(result.seconds, 1e-9)
    b.rows.append(_lat(Row(label, "callbacks/s", rate, "/s",
                           target=">=1,000/s, none lost or doubled",
                           met=errors == 0 and exact and replay_ok and rate >= 1000,
                           checks={"errors": errors, "sent": n, "answered_completed": completed,
                                   "serve_cpu_ms_per_callback": cpu_per_op(n, rss, rss2),
                                   "loadgen_cpu_ms_per_callback": result.extra.get("loadgen_cpu_ms"),
                                   "second_process_cpu_share": second_share(rss, rss2) if second else None,
                                   **{f"db_{k}": v for k, v in first.items()}, "replayed_as_duplicates":
                                   int(replay.extra.get("duplicate", 0)), "db_unchanged_after_replay":
                                   second_counts == first, "exactly_once": exact, "db_connections_opened": opened},
                           notes="HMAC verify, event stored once, PENDING->COMPLETED with audit, receipt SMS "
                                 "and webhook jobs; every callback then replayed; load from bench/loadgen.py "
                                 "(asyncio streams: each body once)" + (f"; {notes}" if notes else "")), result))


def scenario_sms(b: Bench) -> None:
    pending = db_value(b, "SELECT count(*) FROM outbox_jobs WHERE kind = 'sms.send' AND status = 'PENDING'")
    if not pending:
        scenario_callbacks(b, report=False)
    # Only receipts: the provider jobs of the payments made above would talk to the provider simulators.
    db(b, "DELETE FROM outbox_jobs WHERE kind <> 'sms.send' AND status <> 'DONE'")
    count = int(db_value(b, "SELECT count(*) FROM outbox_jobs WHERE kind = 'sms.send' AND status = 'PENDING'"))
    b.log(f"SMS receipts: {count} sms.send jobs, 1 worker process, simulator with delivery reports")
    started = datetime.now(UTC)
    worker = b.cluster.start("worker", [python(), "main.py", "worker"], b.env)
    deadline = time.monotonic() + max(60, count / 20)
    spy = RssSampler(worker, b.profile_path("sms-worker"))
    spy.__enter__()
    serve_cpu_start = b.serve.cpu_seconds()  # serve takes the delivery reports meanwhile
    try:
        sent = delivered = 0
        cpu_mark: tuple[float, int] | None = None  # worker CPU and messages sent when the first was seen
        cpu_end = (0.0, 0)
        while time.monotonic() < deadline:
            if worker.popen.poll() is not None:
                raise RuntimeError(f"worker exited: {worker.log.read_text()[-2000:]}")
            rows = db(b, "SELECT status, count(*) FROM sms_messages WHERE created_at >= $1 "
                         "AND template = 'payment_receipt' GROUP BY status", started)
            by = {r[0]: int(r[1]) for r in rows}
            sent, delivered = by.get("SENT", 0) + by.get("DELIVERED", 0), by.get("DELIVERED", 0)
            if sent and cpu_mark is None:
                cpu_mark = (worker.cpu_seconds(), sent)
            if sent < count or cpu_end[1] < count:
                cpu_end = (worker.cpu_seconds(), sent)
            if delivered >= count:
                break
            time.sleep(0.3)
        worker_rss = worker.rss_mb()
        serve_cpu = b.serve.cpu_seconds() - serve_cpu_start
    finally:
        spy.__exit__()
        worker.stop()
        b.cluster.procs.remove(worker)
    span = db(b, "SELECT min(created_at), max(sent_at), max(delivered_at), count(*) FROM sms_messages "
                 "WHERE created_at >= $1 AND template = 'payment_receipt'", started)[0]
    first, last_sent, last_delivered, rows = span
    jobs_left = db_value(b, "SELECT count(*) FROM outbox_jobs WHERE kind = 'sms.send' AND status <> 'DONE'")
    seconds = (last_sent - first).total_seconds() if first and last_sent else 0.0
    rate = sent / seconds if seconds > 0 else 0.0
    # What left: the simulator's inboxes hold every message it accepted, receipts name their payment.
    inboxes = httpx.get(f"http://127.0.0.1:{b.sim_ports['africastalking']}/_inbox", timeout=30).json()["inboxes"]
    refs = [m.get("message", "") for msgs in inboxes.values() for m in msgs]
    receipts = [m for m in refs if "PAY_" in m]
    doubled = len(receipts) - len(set(receipts))
    templates = {r[0]: int(r[1]) for r in db(b, "SELECT template, count(*) FROM sms_messages WHERE created_at >= $1 "
                                                "GROUP BY 1", started)}
    ok = sent == count == len(receipts) and delivered == count and jobs_left == 0 and doubled == 0
    b.rows.append(Row("SMS receipts (outbox -> simulator -> delivery report)", "messages/s per worker", rate, "/s",
                      target=">=200 messages/s per worker process", met=ok and rate >= 200,
                      checks={"jobs": count, "sent": sent, "delivered": delivered, "rows": int(rows),
                              "templates": templates, "simulator_receipts": len(receipts),
                              "jobs_not_done": int(jobs_left), "doubled": int(doubled),
                              "worker_rss_mb": round(worker_rss, 1),
                              "worker_cpu_ms_per_message": round(1000 * (cpu_end[0] - cpu_mark[0])
                                                                 / max(1, cpu_end[1] - cpu_mark[1]), 3)
                              if cpu_mark else None,
                              "serve_cpu_ms_per_delivery_report": round(1000 * serve_cpu / max(1, delivered), 3),
                              "last_delivery_after_s": round((last_delivered - first).total_seconds(), 2)
                              if first and last_delivered else None},
                      notes="first message created to last sent (DB timestamps); worker --concurrency 16; "
                            "simulator reports delivery after 0.5 s"))


def scenario_memory(b: Bench) -> None:
    if not b.rss_peak:
        with RssSampler(b.serve, b.profile_path("memory")) as rss:
            hop_load(ussd_path(b), b)
        b.rss_peak["ussd_hop"] = rss.peak
    peak = max(v for k, v in b.rss_peak.items())
    b.rows.append(Row("Memory: serve RSS under load", "peak RSS", peak, "MB", target="<=150 MB", met=peak <= 150,
                      checks={k: round(v, 1) for k, v in b.rss_peak.items()}))
    size, screen = session_size(b)
    b.rows.append(Row("Memory: one USSD session in Redis", "MEMORY USAGE", size, "bytes", target="<=1 KB",
                      met=0 < size <= 1024, checks={"screen": screen},
                      notes="a pay session stopped at the confirmation screen (the most state it keeps)"))


def _close_pool_payments(b: Bench) -> None:
    """The open payments the pay sessions made so far, dated past their approval window: as if each member's had
    ended (nothing runs them), so the next run's sessions of the same members each make a payment, as the
    first did (a member's second payment of a type and amount is refused while her first is open)."""
    db(b, "UPDATE payments SET expires_at = now() - interval '1 second' "
          "WHERE channel = 'ussd' AND status IN ('PENDING', 'PROCESSING') AND expires_at > now()")


def forget_resume_routes(b: Bench) -> None:
    import redis

    client = redis.Redis.from_url(b.env["REDIS_URL"])
    try:
        for key in client.scan_iter(match="ussd:{ph:*}:resume", count=1000):
            client.delete(key)
    finally:
        client.close()


def session_size(b: Bench) -> tuple[int, str]:
    import redis

    from channels.ussd.sessions import session_key

    session_id = f"mem{b.run_id}{secrets.token_hex(3)}"
    phone = b.spare_phone
    last = ""
    for text in ("", "1", "1*1"):
        last = httpx.post(ussd_path(b), data={"sessionId": session_id, "serviceCode": SERVICE_CODE,
                                              "phoneNumber": phone, "networkCode": "63510", "text": text},
                          timeout=30).text
    client = redis.Redis.from_url(b.env["REDIS_URL"])
    try:
        size = client.memory_usage(session_key("africastalking", session_id), samples=0) or 0
    finally:
        client.close()
    return int(size), last.split("\n", 1)[0][:60]


# -- report ----------------------------------------------------------------------------------------

def _fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    text = f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.1f}" if abs(value) >= 10 else f"{value:,.2f}"
    return f"{text} {unit}".strip()


def machine() -> dict[str, str]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    pg = subprocess.run(["bash", "-c", "ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1"],
                        capture_output=True, text=True, check=False).stdout.strip()
    redis_v = subprocess.run(["redis-server", "--version"], capture_output=True, text=True, check=False).stdout
    return {"cpu": cpu, "cpus": str(os.cpu_count()), "memory": mem, "kernel": platform.release(),
            "python": platform.python_version(), "postgresql": pg.split("/")[-2] if pg else "?",
            "redis": redis_v.split()[2].removeprefix("v=") if redis_v else "?",
            "wrk": subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False).stdout[:30].strip()}


def table(rows: list[Row]) -> str:
    lines = ["| scenario | figure | result | p50 / p95 / p99 ms | baseline | ratio | target | met? | CPU ms/op |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lat = "-" if r.p99_ms is None else f"{r.p50_ms:.1f} / {r.p95_ms:.1f} / {r.p99_ms:.1f}"
        met = "yes" if r.met else "no" if r.met is not None else "-"
        cpu = next((v for k, v in r.checks.items() if "_cpu_ms_per_" in k and v), None)
        lines.append(f"| {r.scenario} | {r.figure} | {_fmt(r.value, r.unit)} | {lat} | {_fmt(r.baseline, r.unit)} | "
                     f"{'-' if r.ratio is None else f'{r.ratio:.0%}'} | {r.target} | {met} | "
                     f"{'-' if cpu is None else f'{cpu:.2f}'} |")
    return "\n".join(lines)


def markdown(b: Bench, info: dict[str, str], started: datetime, elapsed: float) -> str:
    lines = [
        "# Benchmark results",
        "",
        f"Run {started.strftime('%Y-%m-%d %H:%M UTC')} by `.venv/bin/python bench/run.py"
        f"{' --quick' if b.args.quick else ''}` ({elapsed:.0f} s; {b.args.seconds:g} s per load scenario, "
        f"{CONNECTIONS} connections, wrk one connection per thread).",
        "",
        f"Machine: {info['cpu']}, {info['cpus']} CPUs, {info['memory']}, Linux {info['kernel']}; "
        f"Python {info['python']}, PostgreSQL {info['postgresql']} (fsync off, throwaway), Redis {info['redis']}, "
        f"{info['wrk']}. The load generator, the service, PostgreSQL, Redis and the simulators share these CPUs; "
        f"load average {b.load_before} at the start, {os.getloadavg()[0]:.2f} at the end (other work on the machine "
        "shows there). CPU ms/op: CPU time of `serve` (the worker for SMS) per operation, from /proc.",
        "",
        table(b.rows),
        "",
        "Checks made after each scenario (database and Redis, not the load generator's word):",
        "",
    ]
    for r in b.rows:
        checks = ", ".join(f"{k}={v}" for k, v in r.checks.items())
        lines.append(f"- **{r.scenario}**: {checks}." + (f" {r.notes}." if r.notes else ""))
    return "\n".join(lines) + "\n"


def _terminate(_signum: int, _frame: object) -> None:
    raise SystemExit(143)  # so the finally blocks stop every process and server this run started


def run(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, _terminate)
    started_at, t0 = datetime.now(UTC), time.monotonic()
    only = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else list(SCENARIOS)
    unknown = [s for s in only if s not in SCENARIOS]
    if unknown:
        print(f"unknown scenario(s) {unknown}; choose from {', '.join(SCENARIOS)}", file=sys.stderr)
        return 2
    if shutil.which("wrk") is None:
        print("wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    services = start_services(workdir)
    cluster = Cluster(workdir)
    failure: BaseException | None = None
    b: Bench | None = None
    try:
        port = free_port()
        sim_ports = {name: free_port() for name in (*PROVIDERS, "africastalking")}
        env = gateway_env(services, port, sim_ports, args.log_level)
        b = Bench(args=args, cluster=cluster, env=env, dsn=services["DATABASE_URL"].replace("+asyncpg", ""),
                  port=port, sim_ports=sim_ports, run_id=secrets.token_hex(3))
        b.log(f"services in {services['GATEWAY_SERVICES_DIR']}; logs in {workdir}")
        subprocess.run([python(), "main.py", "migrate"], cwd=ROOT, env=env, check=True, capture_output=True,
                       timeout=300)
        b.demo = asyncio.run(seed(env, 1 + CONNECTIONS * PAY_MEMBERS_PER_CONNECTION))
        b.spare_phone = b.demo["phones"][0]
        b.phones = b.demo["phones"][1:]
        start_simulators(b)
        b.serve = start_serve(b)
        b.token = login(b)
        if args.hold:
            (workdir / "gateway.env").write_text("".join(f"export {k}='{v}'\n" for k, v in env.items()))
            (workdir / "bench.json").write_text(json.dumps({"url": b.url, "token": b.token, "demo": b.demo},
                                                           default=str))
            b.log(f"holding {args.hold:g} s: {workdir}/gateway.env, {workdir}/bench.json")
            time.sleep(args.hold)
        for name in only:
            globals()[f"scenario_{name}"](b)
    except BaseException as exc:
        failure = exc
    finally:
        cluster.stop_all()
        stop_services(services["GATEWAY_SERVICES_DIR"])
    elapsed = time.monotonic() - t0
    if b is None or (failure is not None and not b.rows):
        if failure is not None:
            raise failure
        return 1
    info = machine()
    text = markdown(b, info, started_at, elapsed)
    print()
    print(table(b.rows))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "quick": args.quick, "machine": info, "elapsed": elapsed, "failure": repr(failure) if failure else None,
            "rows": [{**asdict(r), "ratio": r.ratio} for r in b.rows]}, indent=2, default=str))
    if not args.quick and failure is None and set(only) == set(SCENARIOS):
        (ROOT / "bench" / "RESULTS.md").write_text(text)
        print(f"\nwritten {ROOT / 'bench' / 'RESULTS.md'}")
    else:
        (workdir / "RESULTS.md").write_text(text)
        print(f"\nwritten {workdir / 'RESULTS.md'} (bench/RESULTS.md is only written by a full run of everything)")
    if failure is not None:
        raise failure
    if args.clean:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="about 2 s per scenario (smoke run)")
    parser.add_argument("--only", default="", help=f"comma list of {', '.join(SCENARIOS)}")
    parser.add_argument("--seconds", type=float, default=None, help="seconds per load scenario (10; quick 2)")
    parser.add_argument("--callbacks", type=int, default=None, help="callbacks sent (3000; quick 200)")
    parser.add_argument("--log-level", default="INFO", help="the service's LOG_LEVEL (INFO, as in production)")
    parser.add_argument("--profile", action="store_true",
                        help="sample the serve process with py-spy during each scenario (profile-*.txt in the logs)")
    parser.add_argument("--cprofile", action="store_true",
                        help="run the first serve under cProfile on its CPU clock, on during the measured loads only "
                             "(cprofile-serve.prof in the logs: "
                             "written when it stops; see bench/cprofile_serve.py)")
    parser.add_argument("--json", default="", help="also write the results as JSON to this file")
    parser.add_argument("--hold", type=float, default=0, help="after set-up, wait this long (to poke by hand)")
    parser.add_argument("--clean", action="store_true", help="remove the logs folder after a successful run")
    args = parser.parse_args(argv)
    if args.seconds is None:
        args.seconds = 2.0 if args.quick else 10.0
    if args.callbacks is None:
        args.callbacks = 200 if args.quick else 3000
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
