"""The embedded default boots from nothing: `python main.py run` migrates, seeds and answers /readyz."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.integration.procs import free_port

ROOT = Path(__file__).resolve().parent.parent


def test_run_boots_embedded_default_and_is_ready(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "PUBLIC_BASE_URL")}
    env.update({"PORT": str(port), "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/gateway.db",
                "REDIS_URL": "embedded", "GATEWAY_ENV": "development"})
    # As tests/conftest.py's _base_env: /readyz says "degraded" (a 200) when its Redis PING outlasts the 1 s a
    # service waits, which a loaded machine's pause does; the check below wants "ok".
    env.setdefault("REDIS_TIMEOUT_SECONDS", "5")
    proc = subprocess.Popen([sys.executable, str(ROOT / "main.py"), "run"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
                if ready.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        assert proc.poll() is None, proc.stderr.read()
        assert ready is not None and ready.status_code == 200
        assert ready.json() == {"status": "ok", "checks": {"database": "ok", "redis": "ok"}}
        types = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
        assert types.json() == {"status": "ok"}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    assert proc.returncode == 0, err[-2000:]
    assert f"http://127.0.0.1:{port}/simulator" in out
    assert "+250788000001" in out
    assert "250788000001" not in err  # no full phone number in the logs


def test_worker_serves_its_own_metrics(tmp_path):
    """A separate worker process exports what only it counts (jobs, provider calls, SMS)."""
    db = tmp_path / "gateway.db"
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "PUBLIC_BASE_URL")}
    env.update({"DATABASE_URL": f"sqlite+aiosqlite:///{db}", "REDIS_URL": "embedded", "GATEWAY_ENV": "development"})
    subprocess.run([sys.executable, str(ROOT / "main.py"), "migrate"], cwd=tmp_path, env=env, check=True,
                   capture_output=True, timeout=120)
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "main.py"), "worker", "--metrics-port", str(port)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        body = ""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                answer = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2)
                if answer.status_code == 200 and "gateway_outbox_jobs_total" in answer.text:
                    body = answer.text
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        assert proc.poll() is None, proc.stderr.read()
        # The worker scheduled the reminder scans when it started: its own gauges show the queue.
        assert 'gateway_outbox_depth{status="PENDING"}' in body
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).json() == {"status": "ok"}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _out, err = proc.communicate()
    assert proc.returncode == 0, err[-2000:]
