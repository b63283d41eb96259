"""`main.py prune`, run as an operator's cron would, in its own process against the test database."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.conftest import _base_env
from tests.core.test_retention import _left, _seed

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "main.py", "prune", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**_base_env(), **env}, timeout=120, check=False)


def _run_into_a_closed_pipe(**env: str) -> subprocess.CompletedProcess[str]:
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line
    try:
        # Without PYTHONUNBUFFERED, as cron runs it: its stdout, a pipe, is then buffered to the exit.
        plain = {k: v for k, v in _base_env().items() if k != "PYTHONUNBUFFERED"}
        return subprocess.run([sys.executable, "main.py", "prune"], cwd=ROOT, stdout=write, stderr=subprocess.PIPE,
                              text=True, env={**plain, **env}, timeout=120, check=False)
    finally:
        os.close(write)


async def test_prune_prints_one_line_per_table_and_exits_0(rt: Any) -> None:
    await _seed(rt)
    before = await _left(rt)

    dry = _run("--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert [line.split(" (")[0] for line in dry.stdout.splitlines()] == [
        "outbox_jobs: 2 would be deleted", "ussd_sessions: 2 would be deleted", "provider_events: 1 would be deleted",
        "webhook_deliveries: 3 would be deleted", "webhook_deliveries held: 0 would be given up",
        "webhook_deliveries held for a domain: 0 would be given up",
        "used_refresh_tokens: 1 would be deleted",
        "sms_messages: 2 would be cleared"]
    assert await _left(rt) == before

    done = _run(RETENTION_SMS_BODY_DAYS="0")
    assert done.returncode == 0, done.stderr
    assert [line.split(" (")[0] for line in done.stdout.splitlines()] == [
        "outbox_jobs: 2 deleted", "ussd_sessions: 2 deleted", "provider_events: 1 deleted",
        "webhook_deliveries: 3 deleted", "webhook_deliveries held: 0 given up",
        "webhook_deliveries held for a domain: 0 given up",
        "used_refresh_tokens: 1 deleted", "sms_messages: kept"]
    assert done.stdout.splitlines()[-1] == "sms_messages: kept (RETENTION_SMS_BODY_DAYS=0)"
    left = await _left(rt)
    assert len(left["outbox_jobs"]) == len(before["outbox_jobs"]) - 2
    assert left["sms_messages"] == before["sms_messages"]


async def test_a_bad_period_is_refused_with_exit_2(rt: Any) -> None:
    refused = _run(RETENTION_OUTBOX_DONE_DAYS="thirty")
    assert refused.returncode == 2 and refused.stdout == ""
    assert "configuration error: RETENTION_OUTBOX_DONE_DAYS: must be a whole number" in refused.stderr


async def test_a_reader_that_leaves_early_ends_it_quietly_after_the_work(rt: Any) -> None:
    """`prune | head -1` from cron: the rows were deleted, then the first line past what head read ended it with
    "cannot start: BrokenPipeError" and exit 4, as if it had not run. It exits as a Unix tool killed by SIGPIPE
    does (141), saying nothing, with the work done."""
    await _seed(rt)
    before = await _left(rt)
    done = _run_into_a_closed_pipe(RETENTION_SMS_BODY_DAYS="0")
    assert (done.returncode, done.stderr) == (141, ""), done.stderr
    left = await _left(rt)
    assert len(left["outbox_jobs"]) == len(before["outbox_jobs"]) - 2
