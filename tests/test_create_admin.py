"""`main.py create-admin`: the first administrator of an install (production too), run as an operator would,
in its own process against the test database; the password from stdin or ADMIN_PASSWORD, never argv."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from core.crypto import verify_password
from core.models import AdminUser, AuditEvent
from tests.conftest import _base_env, requires_pg

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "first-admin-password"


def _run(*args: str, stdin: str = "", **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in _base_env().items() if k != "ADMIN_PASSWORD"}
    return subprocess.run([sys.executable, "main.py", "create-admin", *args], cwd=ROOT, input=stdin,
                          capture_output=True, text=True, env={**base, **env}, timeout=120, check=False)


def _production_env() -> dict[str, str]:
    from tests.core.test_crypto_config import _production_env as complete

    env = _base_env()
    return {**complete(), "DATABASE_URL": env["DATABASE_URL"], "REDIS_URL": env["REDIS_URL"]}


async def _users(rt: Any) -> int:
    async with rt.sessionmaker() as s:
        return int((await s.execute(select(func.count()).select_from(AdminUser))).scalar_one())


def _one_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in result.stderr.splitlines() if not line.startswith("{")]  # JSON log lines
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


@requires_pg
async def test_the_first_super_admin_of_a_production_install_signs_in(rt, client):
    made = _run("--username", "root@coop.rw", stdin=PASSWORD + "\n", **_production_env())
    assert made.returncode == 0, made.stderr
    user_id = made.stdout.strip()
    async with rt.sessionmaker() as s:
        user = await s.get(AdminUser, user_id)
        [event] = (await s.execute(select(AuditEvent).where(AuditEvent.entity_id == user_id))).scalars().all()
    assert user.username == "root@coop.rw" and user.role == "SUPER_ADMIN" and user.cooperative_id is None
    assert user.is_active and verify_password(PASSWORD, user.password_hash)
    assert (event.action, event.actor, event.channel) == ("user.created", "system", "cli")
    assert event.after["username"] == "root@coop.rw" and event.after["role"] == "SUPER_ADMIN"
    assert PASSWORD not in str(event.after) and "scrypt$" not in str(event.after)

    # In through the API: signed in, it creates the first cooperative.
    resp = await client.post("/v1/auth/token", json={"username": "root@coop.rw", "password": PASSWORD})
    assert resp.status == 200
    token = (await resp.json())["accessToken"]
    coop = await client.post("/v1/cooperatives", headers={"Authorization": f"Bearer {token}"},
                             json={"name": "First Coop", "shortCode": "FIRST", "country": "RW"})
    assert coop.status == 201, await coop.text()

    # Run again: refused, and the account's password is not replaced.
    again = _run("--username", "root@coop.rw", stdin="another-password-9\n", **_production_env())
    assert again.returncode == 1 and again.stdout == ""
    assert _one_line(again) == "the username root@coop.rw is taken; nothing was changed"
    async with rt.sessionmaker() as s:
        assert verify_password(PASSWORD, (await s.get(AdminUser, user_id)).password_hash)


async def test_a_cooperative_admin_with_the_password_in_the_environment(rt, client, demo):
    made = _run("--username", "chair@kh.rw", "--role", "ADMIN", "--cooperative", demo["cooperative_id"],
                ADMIN_PASSWORD=PASSWORD)
    assert made.returncode == 0, made.stderr
    async with rt.sessionmaker() as s:
        user = await s.get(AdminUser, made.stdout.strip())
    assert user.role == "COOP_ADMIN" and user.cooperative_id == demo["cooperative_id"]
    resp = await client.post("/v1/auth/token", json={"username": "chair@kh.rw", "password": PASSWORD})
    body = await resp.json()
    assert resp.status == 200 and body["cooperativeId"] == demo["cooperative_id"]


async def test_refused_inputs_exit_2_and_create_nothing(rt, demo):
    before = await _users(rt)
    coop = demo["cooperative_id"]
    cases = [
        (("--username", "a@b.rw"), "short\n", "password must be 12 to 256 characters long"),
        (("--username", "a@b.rw"), "", "no password: give one line on stdin or set ADMIN_PASSWORD"),
        (("--username", "ab"), PASSWORD + "\n", "username must be 3 to 120 characters long"),
        (("--username", "a@b.rw", "--role", "COOP_ADMIN"), PASSWORD + "\n",
         "a cooperative admin needs --cooperative ID"),
        (("--username", "a@b.rw", "--cooperative", coop), PASSWORD + "\n",
         "a super admin belongs to no cooperative: leave out --cooperative"),
        (("--username", "a@b.rw", "--role", "ADMIN", "--cooperative", "nope"), PASSWORD + "\n",
         "cooperative nope not found"),
        (("--username", "a@b.rw", "--role", "ADMIN", "--cooperative", "00000000-0000-0000-0000-000000000000"),
         PASSWORD + "\n", "cooperative 00000000-0000-0000-0000-000000000000 not found"),
        # Control characters sign-in refuses: the account was made (exit 0) and could never sign in.
        (("--username", "a\x01b@b.rw"), PASSWORD + "\n",
         "username contains characters that are not allowed (sign-in refuses them)"),
        (("--username", "a@b.rw"), "first-admin-\x00password\n",
         "password contains characters that are not allowed (sign-in refuses them)"),
        # Names that look like another's in the users list and the audit log.
        *((("--username", name), PASSWORD + "\n", "username may not contain tabs, line breaks, spaces other than "
           "a plain one, or invisible characters") for name in ("ana\u200b@b.rw", "ana\tb@b.rw", "ana\u00a0b")),
    ]
    for args, stdin, message in cases:
        result = _run(*args, stdin=stdin)
        assert result.returncode == 2, (args, result.stderr)
        assert _one_line(result) == f"refusing to create-admin: {message}"
    # Never on the command line (it would show in `ps` and the shell's history); nor a role without rules here.
    assert _run("--username", "a@b.rw", "--password", PASSWORD).returncode == 2
    assert _run("--username", "a@b.rw", "--role", "TENANT", stdin=PASSWORD + "\n").returncode == 2
    assert await _users(rt) == before


async def test_an_empty_cooperative_names_none(rt, demo):
    # `--cooperative "$COOP"` with the variable empty: a super admin was refused by the foreign key (exit 4,
    # "cannot start: ForeignKeyViolationError"); a cooperative admin is told it needs one.
    made = _run("--username", "root@coop.rw", "--cooperative", "", stdin=PASSWORD + "\n")
    assert made.returncode == 0, made.stderr
    async with rt.sessionmaker() as s:
        user = await s.get(AdminUser, made.stdout.strip())
    assert user.role == "SUPER_ADMIN" and user.cooperative_id is None
    refused = _run("--username", "chair@kh.rw", "--role", "ADMIN", "--cooperative", " ", stdin=PASSWORD + "\n")
    assert refused.returncode == 2
    assert _one_line(refused) == "refusing to create-admin: a cooperative admin needs --cooperative ID"


def test_a_database_not_at_the_migration_head_is_refused(tmp_path):
    result = _run("--username", "root@coop.rw", stdin=PASSWORD + "\n",
                  DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path}/empty.db")
    assert result.returncode == 3
    assert "run `.venv/bin/python main.py migrate`" in _one_line(result)


def test_at_a_terminal_the_password_is_asked_twice_unseen(monkeypatch):
    import getpass

    import pytest

    import main

    answers: list[str] = []
    monkeypatch.delenv("ADMIN_PASSWORD", raising=False)
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    monkeypatch.setattr(getpass, "getpass", lambda prompt: answers.pop(0))
    answers[:] = [PASSWORD, PASSWORD]
    assert main._admin_password() == PASSWORD
    answers[:] = [PASSWORD, "a-typo-in-it"]
    with pytest.raises(main.InputError, match="the two passwords differ"):
        main._admin_password()
