"""Process and load-generator plumbing for the benchmarks: servers on 127.0.0.1, wrk runs, RSS readings."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
LUA = Path(__file__).resolve().parent / "lua"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path
    profiled: bool = False  # under bench/cprofile_serve.py --on-signal: RssSampler turns its profile on and off

    def rss_mb(self) -> float:
        try:
            for line in Path(f"/proc/{self.popen.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except FileNotFoundError:
            pass
        return 0.0

    def cpu_seconds(self) -> float:
        """User + system CPU time used so far (from /proc/<pid>/stat)."""
        try:
            fields = Path(f"/proc/{self.popen.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (FileNotFoundError, IndexError, ValueError):
            return 0.0

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(20)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


@dataclass
class Cluster:
    """Every process a benchmark started; stopped together, by PID, whatever happens."""

    workdir: Path
    procs: list[Proc] = field(default_factory=list)

    def start(self, name: str, args: list[str], env: dict[str, str], ready_url: str | None = None,
              timeout: float = 60) -> Proc:
        log = self.workdir / f"{name}.log"
        popen = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        if ready_url:
            wait_ready(ready_url, proc, timeout)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()


def wait_ready(url: str, proc: Proc, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited: {proc.log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{proc.name} not ready at {url}: {proc.log.read_text()[-3000:]}")


@dataclass
class LoadResult:
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    errors: int
    non_2xx: int
    extra: dict[str, float] = field(default_factory=dict)


_SUMMARY = re.compile(r"^BENCH (\{.*\})$", re.M)


def wrk(url: str, script: str, *, seconds: float, connections: int, threads: int | None = None,
        env: dict[str, str] | None = None) -> LoadResult:
    """Run wrk with one of bench/lua/*.lua; the script's done() prints one 'BENCH {json}' line.

    One connection per thread by default: the USSD scripts need a session's hops in order.
    """
    if shutil.which("wrk") is None:
        raise RuntimeError("wrk is not installed (apt-get install wrk)")
    threads = threads or connections
    args = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{max(1, round(seconds))}s",
            "--timeout", "10s", "-s", str(LUA / script), url]
    full_env = {**os.environ, "BENCH_LUA_DIR": str(LUA), "BENCH_THREADS": str(threads), **(env or {})}
    started = time.monotonic()
    out = subprocess.run(args, capture_output=True, text=True, env=full_env, check=False, timeout=seconds + 120)
    wall = time.monotonic() - started
    match = _SUMMARY.search(out.stdout)
    if not match:
        raise RuntimeError(f"wrk gave no summary: {out.stdout[-2000:]} {out.stderr[-2000:]}")
    data = json.loads(match.group(1))
    extra = {k: float(v) for k, v in data.items()
             if k not in ("requests", "seconds", "p50", "p95", "p99", "errors", "non2xx")}
    extra["wall_seconds"] = wall
    return LoadResult(requests=int(data["requests"]), seconds=float(data["seconds"]),
                      rps=data["requests"] / max(data["seconds"], 1e-9), p50_ms=data["p50"] / 1000,
                      p95_ms=data["p95"] / 1000, p99_ms=data["p99"] / 1000, errors=int(data["errors"]),
                      non_2xx=int(data["non2xx"]), extra=extra)


def python() -> str:
    venv = ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable
