"""`main.py advance-references`, after PostgreSQL was restored from a backup: its reference sequence went back to
the restore point, and the references issued since (on receipts already sent) would be handed out again. Run as
an operator would, in its own process against the test database."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from core.references import next_reference
from tests.conftest import _base_env, is_postgres, requires_pg

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "main.py", "advance-references", *args], cwd=ROOT, capture_output=True,
                          text=True, env=_base_env(), timeout=120, check=False)


def _number(reference: str) -> int:
    return int(reference.rsplit("_", 1)[1])


@requires_pg
async def test_references_issued_before_a_restore_are_not_handed_out_again(rt: Any) -> None:
    async with rt.engine.connect() as conn:
        issued = [await next_reference(conn, "PAY") for _ in range(3)]  # on receipts, then lost with a restore
        await conn.execute(text("SELECT setval('human_reference_seq', :n)"), {"n": _number(issued[0])})

        done = _run("--by", "5000")
        assert done.returncode == 0, done.stderr
        at = _number(issued[0])
        assert f"was at {at}, now at {at + 5000}; the next reference number is {at + 5001}" in done.stdout, done.stdout

        after = await next_reference(conn, "PAY")
    assert _number(after) == at + 5001 and after not in issued  # moved by --by, as it says


@requires_pg
async def test_a_margin_past_the_nine_digits_of_a_reference_is_refused(rt: Any) -> None:
    async with rt.engine.connect() as conn:
        before = _number(await next_reference(conn, "PAY"))
        refused = _run("--by", "999999999")
        assert refused.returncode == 2 and refused.stdout == ""
        assert refused.stderr.startswith(f"refusing to advance-references: the sequence is at {before}: 999999999 "
                                         "more would pass 999999999, the largest number a reference may carry"), \
            refused.stderr
        # Refused before a number was taken: the next reference follows the last one (one was burnt).
        assert _number(await next_reference(conn, "PAY")) == before + 1
    assert _run("--by", "0").returncode == 2  # argparse: must be at least 1


@pytest.mark.skipif(is_postgres(), reason="the embedded default (SQLite) only")
async def test_sqlite_has_no_sequence_to_advance(rt: Any) -> None:
    refused = _run()
    assert refused.returncode == 2
    assert "SQLite numbers references per day" in refused.stderr
