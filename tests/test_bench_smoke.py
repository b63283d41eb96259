"""A short run of the benchmark suite (bench/run.py --quick) so it cannot rot: every scenario runs against
the real service and must report sane figures and pass its database checks. No timing is asserted."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = {
    "USSD menu hop (1 process, 32 conn.)",
    "USSD menu hop (2 processes, 32 conn.)",
    "Full USSD pay session (32 conn.)",
    "Full USSD pay session (2 processes, 32 conn.)",
    "Full USSD pay session at 20 sessions/s (1 process, paced)",
    "POST /v1/payments (idempotency key, 32 conn.)",
    "POST /v1/payments (2 processes, 32 conn.)",
    "Provider callbacks (Airtel, signed)",
    "Provider callbacks (2 processes)",
    "SMS receipts (outbox -> simulator -> delivery report)",
    "Memory: serve RSS under load",
    "Memory: one USSD session in Redis",
}


def _why_skip() -> str | None:
    if shutil.which("wrk") is None:
        return "wrk is not installed"
    postgres = os.environ.get("TEST_PG_BIN") or os.environ.get("DATABASE_URL", "").startswith("postgres")
    if not postgres:
        return "needs PostgreSQL (TEST_PG_BIN or a PostgreSQL DATABASE_URL)"
    if not glob.glob("/usr/lib/postgresql/*/bin/initdb") or shutil.which("redis-server") is None:
        return "PostgreSQL or Redis server binaries are absent (the benchmark starts its own)"
    return None


pytestmark = pytest.mark.skipif(_why_skip() is not None, reason=_why_skip() or "")


def test_quick_benchmark_runs_every_scenario_with_sane_figures(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    python = ROOT / ".venv" / "bin" / "python"
    proc = subprocess.run(
        [str(python if python.exists() else sys.executable), "bench/run.py", "--quick", "--seconds", "1",
         "--callbacks", "100", "--json", str(out), "--clean"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    data = json.loads(out.read_text())
    assert data["failure"] is None
    rows = {r["scenario"]: r for r in data["rows"]}
    assert set(rows) == SCENARIOS

    for row in rows.values():
        assert row["value"] > 0, row
        if row["p99_ms"] is not None:
            assert 0 < row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"], row

    for name in ("USSD menu hop (1 process, 32 conn.)", "USSD menu hop (2 processes, 32 conn.)"):
        assert rows[name]["checks"]["errors"] == 0, rows[name]
        assert rows[name]["baseline"] > 0
    hop = rows["USSD menu hop (1 process, 32 conn.)"]["checks"]
    assert hop["serve_cpu_ms_per_hop"] > 0 and hop["redis_floor_rps"] > 0, hop

    for name in ("Full USSD pay session (32 conn.)", "Full USSD pay session (2 processes, 32 conn.)"):
        pay = rows[name]["checks"]
        assert pay["errors"] == 0 and pay["consistent"] and pay["sessions_ended"] > 0, pay
    paced = rows["Full USSD pay session at 20 sessions/s (1 process, paced)"]["checks"]
    assert paced["errors"] == 0 and paced["consistent"] and paced["sessions_ended"] == paced["sessions_started"] > 0, \
        paced
    for name in ("Full USSD pay session (2 processes, 32 conn.)", "POST /v1/payments (2 processes, 32 conn.)"):
        share = rows[name]["checks"]["second_process_cpu_share"]
        assert share is not None and share > 0.1, rows[name]  # the load reached the second process

    for name in ("POST /v1/payments (idempotency key, 32 conn.)", "POST /v1/payments (2 processes, 32 conn.)"):
        api = rows[name]
        assert api["baseline"] > 0
        assert api["checks"]["errors"] == 0 and api["checks"]["baseline_errors"] == 0, api
        assert api["checks"]["consistent"] and api["checks"]["replay_ok"], api

    for name in ("Provider callbacks (Airtel, signed)", "Provider callbacks (2 processes)"):
        callbacks = rows[name]["checks"]
        assert callbacks["errors"] == 0 and callbacks["sent"] == 100, callbacks
        assert callbacks["exactly_once"] and callbacks["db_unchanged_after_replay"], callbacks
        assert callbacks["replayed_as_duplicates"] == 100, callbacks
    share = rows["Provider callbacks (2 processes)"]["checks"]["second_process_cpu_share"]
    assert share is not None and share > 0.1, share  # the callbacks reached the second process

    sms = rows["SMS receipts (outbox -> simulator -> delivery report)"]["checks"]
    assert sms["jobs"] > 0 and sms["sent"] == sms["delivered"] == sms["jobs"], sms
    assert sms["doubled"] == 0 and sms["jobs_not_done"] == 0, sms

    assert 0 < rows["Memory: one USSD session in Redis"]["value"] < 64 * 1024
    assert rows["Memory: serve RSS under load"]["value"] > 10
