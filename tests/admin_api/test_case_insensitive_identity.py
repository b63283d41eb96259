"""A cooperative's short code and an admin's username are each one whatever its case: a second one differing
only in case is refused (409, and by the unique indexes of migration 0017 when two requests come at once),
members type a code and admins their username in any case, and the migration names the clashes it meets."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import async_sessionmaker

from admin_api import users as user_routes
from core import cooperatives
from core import users as accounts
from core.audit import Actor
from core.errors import Conflict
from core.models import AdminUser, Cooperative, Member
from tests.admin_api.conftest import Caller, login
from tests.admin_api.test_admin_races import _both_read
from tests.channels.ussd.helpers import AtPhone
from tests.conftest import _base_env, make_settings, requires_pg

ROOT = Path(__file__).resolve().parent.parent.parent
NSG = {"name": "Nairobi Savings Group", "shortCode": "NSG", "country": "KE", "ussdExtension": "44"}
WANJIRU = {"username": "Wanjiru@NSG.co.ke", "password": "first-password-123", "role": "COOP_ADMIN"}


async def _codes(rt: Any, code: str) -> list[str]:
    """The short codes stored that are `code` in some case."""
    async with rt.sessionmaker() as s:
        return sorted((await s.execute(select(Cooperative.short_code).where(
            func.upper(Cooperative.short_code) == code.upper()))).scalars())


async def _usernames(rt: Any, name: str) -> list[str]:
    async with rt.sessionmaker() as s:
        return sorted((await s.execute(select(AdminUser.username).where(
            func.lower(AdminUser.username) == name.lower()))).scalars())


# --------------------------------------------------------------------------------------------------- short codes


async def test_a_short_code_in_another_case_is_taken_and_members_join_the_cooperative_whose_it_is(
        superadmin: Caller, client: Any, rt: Any, demo: dict[str, Any], coop_b: dict[str, Any]) -> None:
    """'khhc' beside the demo's 'KHHC' was created (201): USSD registration, which finds a code in any case,
    then sent a Kenyan member typing her own cooperative's code into Kigali Heights."""
    refused = await superadmin.json("POST", "/v1/cooperatives", 409, json={**NSG, "shortCode": "khhc"})
    assert refused["message"] == "shortCode 'khhc' is already used (as 'KHHC': codes are the same whatever their case)"
    patched = await superadmin.json("PATCH", f"/v1/cooperatives/{coop_b['cooperative_id']}", 409,
                                    json={"shortCode": "Khhc"})
    assert patched["message"] == "shortCode 'Khhc' is already used (as 'KHHC': codes are the same whatever their case)"
    assert await _codes(rt, "KHHC") == ["KHHC"]
    # A cooperative may change the case of its own code.
    own = await superadmin.json("PATCH", f"/v1/cooperatives/{coop_b['cooperative_id']}", 200,
                                json={"shortCode": "Other"})
    assert own["shortCode"] == "Other"

    phone = AtPhone(client, "+250788555101")
    await phone.dial()
    await phone.send("1")
    assert (await phone.send("khhc")).startswith("CON Enter your full name to join Kigali Heights Housing Cooperative")
    await phone.send("Achieng Otieno")
    async with rt.sessionmaker() as s:
        joined = (await s.execute(select(Member.cooperative_id).where(Member.name == "Achieng Otieno"))).scalar_one()
    assert joined == demo["cooperative_id"]


async def test_two_codes_differing_only_in_case_at_once_one_is_refused(superadmin: Caller, rt: Any,
                                                                      demo: dict[str, Any], monkeypatch: Any) -> None:
    """Both pass the check before either writes: the unique index on upper(short_code) refuses the second,
    which gets the check's 409."""
    _both_read(monkeypatch, cooperatives, "_unique")
    answers = await asyncio.gather(
        superadmin.req("POST", "/v1/cooperatives", json={**NSG, "ussdExtension": None}),
        superadmin.req("POST", "/v1/cooperatives", json={**NSG, "shortCode": "nsg", "ussdExtension": None}))
    assert sorted(r.status for r in answers) == [201, 409], [await r.json() for r in answers]
    [refused] = [await r.json() for r in answers if r.status == 409]
    assert refused["message"].startswith("shortCode ")
    assert "codes are the same whatever their case" in refused["message"]
    assert len(await _codes(rt, "NSG")) == 1


async def test_the_database_refuses_a_code_in_another_case(rt: Any, demo: dict[str, Any]) -> None:
    with pytest.raises(IntegrityError):
        async with rt.sessionmaker.begin() as s:
            s.add(Cooperative(name="Nairobi", short_code="kHhC", country="KE", currency="KES",
                              timezone="Africa/Nairobi", status="ACTIVE", self_registration=True))


async def test_a_suspended_cooperatives_codes_stay_taken_and_the_409_says_how_to_free_them(
        superadmin: Caller, rt: Any, demo: dict[str, Any]) -> None:
    """DELETE only suspends: its shortCode and ussdExtension stay taken. The 409 said only "is already used"
    of a cooperative the super admin no longer sees among the active ones."""
    old = await superadmin.json("POST", "/v1/cooperatives", 201, json={**NSG, "shortCode": "NSG2"})
    await superadmin.json("DELETE", f"/v1/cooperatives/{old['id']}", 200)
    code = await superadmin.json("POST", "/v1/cooperatives", 409, json={**NSG, "shortCode": "nsg2"})
    assert code["message"] == (
        "shortCode 'nsg2' is already used (as 'NSG2': codes are the same whatever their case) by a suspended "
        f"cooperative, which keeps its codes: PATCH /v1/cooperatives/{old['id']} with another shortCode frees it")
    extension = await superadmin.json("POST", "/v1/cooperatives", 409, json={**NSG, "shortCode": "NSG3"})
    assert extension["message"] == (
        "ussdExtension '44' is already used by a suspended cooperative, which keeps its codes: "
        f"PATCH /v1/cooperatives/{old['id']} with another ussdExtension or null frees it")
    # As the message says.
    await superadmin.json("PATCH", f"/v1/cooperatives/{old['id']}", 200,
                          json={"shortCode": "NSG2-OLD", "ussdExtension": None})
    made = await superadmin.json("POST", "/v1/cooperatives", 201, json={**NSG, "shortCode": "nsg2"})
    assert (made["shortCode"], made["ussdExtension"]) == ("nsg2", "44")
    # An active holder's 409 stays as it was.
    taken = await superadmin.json("POST", "/v1/cooperatives", 409, json={**NSG, "shortCode": "KHHC"})
    assert taken["message"] == "shortCode 'KHHC' is already used"


# ----------------------------------------------------------------------------------------------------- usernames


async def test_an_admin_signs_in_with_her_username_in_any_case(superadmin: Caller, client: Any,
                                                              demo: dict[str, Any]) -> None:
    """Invited as 'Wanjiru@NSG.co.ke', she typed 'wanjiru@nsg.co.ke' (a phone keyboard's): 401. Spaces around
    it, which the account's creation drops, were not dropped at sign-in either."""
    made = await superadmin.json("POST", "/v1/users", 201, json={**WANJIRU, "cooperativeId": demo["cooperative_id"]})
    for typed in ("wanjiru@nsg.co.ke", " WANJIRU@nsg.CO.KE ", "Wanjiru@NSG.co.ke"):
        tokens = await login(client, typed, WANJIRU["password"])
        assert (tokens["role"], tokens["cooperativeId"]) == ("COOP_ADMIN", demo["cooperative_id"]), typed
    wrong = await client.post("/v1/auth/token", json={"username": "wanjiru@nsg.co.ke", "password": "not-her-password"})
    assert wrong.status == 401
    # Kept and shown as it was given.
    listed = await superadmin.json("GET", "/v1/users", 200)
    assert [u["username"] for u in listed["data"] if u["id"] == made["id"]] == ["Wanjiru@NSG.co.ke"]


async def test_a_username_in_another_case_is_taken(superadmin: Caller, rt: Any, demo: dict[str, Any],
                                                   coop_b: dict[str, Any]) -> None:
    """A second account 'wanjiru@nsg.co.ke' was created beside 'Wanjiru@NSG.co.ke' (in another cooperative);
    sign-in could then find either."""
    made = await superadmin.json("POST", "/v1/users", 201, json={**WANJIRU, "cooperativeId": demo["cooperative_id"]})
    second = {**WANJIRU, "username": " wanjiru@nsg.co.ke ", "password": "other-password-123",
              "cooperativeId": coop_b["cooperative_id"]}
    refused = await superadmin.json("POST", "/v1/users", 409, json=second)
    assert refused["message"] == "this username is taken (usernames are the same whatever their case)"
    await superadmin.json("DELETE", f"/v1/users/{made['id']}", 200)
    off = await superadmin.json("POST", "/v1/users", 409, json=second)
    assert off["message"] == ("this username is taken (usernames are the same whatever their case) by a deactivated "
                              f"account: turn it on again with PATCH /v1/users/{made['id']} {{\"isActive\": true}}")
    # The command line's create-admin, too.
    with pytest.raises(Conflict) as cli:
        async with rt.sessionmaker.begin() as s:
            await accounts.create_admin(s, username="WANJIRU@nsg.co.ke", password="third-password-123",
                                        role="COOP_ADMIN", cooperative_id=demo["cooperative_id"],
                                        actor=Actor("system", "cli"))
    assert cli.value.message == ("the username WANJIRU@nsg.co.ke is taken (as Wanjiru@NSG.co.ke: usernames are the "
                                 "same whatever their case)")
    assert await _usernames(rt, "wanjiru@nsg.co.ke") == ["Wanjiru@NSG.co.ke"]


async def test_a_username_that_looks_like_another_is_refused(superadmin: Caller, rt: Any,
                                                             demo: dict[str, Any]) -> None:
    """'Wanjiru@NSG.co.ke' with a zero-width space, a tab or a no-break space in it was made (201): in the users
    list and the audit log it passed for the real Wanjiru."""
    await superadmin.json("POST", "/v1/users", 201, json={**WANJIRU, "cooperativeId": demo["cooperative_id"]})
    for look_alike in ("Wanjiru\u200b@NSG.co.ke", "Wanjiru@NSG.co.ke\u2060", "Wanjiru\t@NSG.co.ke",
                       "Wanjiru\u00a0Kamau", "Wanjiru\u2028Kamau", "\u202eWanjiru@NSG.co.ke"):
        refused = await superadmin.json("POST", "/v1/users", 400, json={
            **WANJIRU, "username": look_alike, "cooperativeId": demo["cooperative_id"]})
        assert (refused["code"], refused["message"]) == ("VALIDATION_FAILED", [
            "username may not contain tabs, line breaks, spaces other than a plain one, or invisible characters"]), \
            repr(look_alike)
    # A plain space inside, and letters of any script, are names.
    await superadmin.json("POST", "/v1/users", 201, json={
        **WANJIRU, "username": "Wanjiru Kamau", "cooperativeId": demo["cooperative_id"]})
    await superadmin.json("POST", "/v1/users", 201, json={
        **WANJIRU, "username": "Amélie Uwase", "cooperativeId": demo["cooperative_id"]})
    async with rt.sessionmaker() as s:
        names = set((await s.execute(select(AdminUser.username))).scalars())
    assert {"Wanjiru@NSG.co.ke", "Wanjiru Kamau", "Amélie Uwase"} <= names
    assert not any("\u200b" in n or "\t" in n or "\u00a0" in n for n in names)


async def test_a_username_with_its_accents_typed_another_way_is_the_same_name(superadmin: Caller, client: Any,
                                                                               rt: Any, demo: dict[str, Any]) -> None:
    """'José' with é as one character and 'José' as e and a combining accent look the same and were two accounts
    (the unique index on lower(username) tells them apart); and she could sign in only as her keyboard first typed
    it."""
    composed, decomposed = "Jos\u00e9@kigali.rw", "Jose\u0301@kigali.rw"
    made = await superadmin.json("POST", "/v1/users", 201, json={**WANJIRU, "username": decomposed,
                                                                 "cooperativeId": demo["cooperative_id"]})
    assert made["username"] == composed  # stored composed
    refused = await superadmin.json("POST", "/v1/users", 409, json={**WANJIRU, "username": composed,
                                                                    "cooperativeId": demo["cooperative_id"]})
    assert refused["code"] == "NAME_TAKEN"
    for typed in (composed, decomposed, "JOSE\u0301@KIGALI.RW"):
        tokens = await login(client, typed, WANJIRU["password"])
        assert tokens["role"] == "COOP_ADMIN", typed
    async with rt.sessionmaker() as s:
        assert (await s.execute(select(func.count()).select_from(AdminUser).where(
            AdminUser.username.in_([composed, decomposed])))).scalar_one() == 1


async def test_a_username_with_capital_accented_letters_is_one_name_in_any_case(superadmin: Caller, client: Any,
                                                                               rt: Any, demo: dict[str, Any]) -> None:
    """'ÉRIC@kigali.rw' typed 'éric@kigali.rw': on SQLite (the embedded default), whose lower() folds A-Z only, the
    stored name was folded by it ('Éric@kigali.rw') and the typed one by Python too ('éric@kigali.rw'): 401, and a
    second account 'éric@kigali.rw' was made beside hers (201)."""
    made = await superadmin.json("POST", "/v1/users", 201, json={**WANJIRU, "username": "ÉRIC@kigali.rw",
                                                                 "cooperativeId": demo["cooperative_id"]})
    for typed in ("ÉRIC@kigali.rw", "éric@kigali.rw", "Éric@KIGALI.rw"):
        tokens = await login(client, typed, WANJIRU["password"])
        assert tokens["role"] == "COOP_ADMIN", typed
    refused = await superadmin.json("POST", "/v1/users", 409, json={
        **WANJIRU, "username": "éric@kigali.rw", "password": "other-password-123",
        "cooperativeId": demo["cooperative_id"]})
    assert refused["code"] == "NAME_TAKEN"
    async with rt.sessionmaker() as s:
        assert list((await s.execute(select(AdminUser.id).where(
            AdminUser.username.in_(["ÉRIC@kigali.rw", "éric@kigali.rw"])))).scalars()) == [made["id"]]


def test_two_sqlite_accounts_differing_only_in_the_case_of_accented_letters_each_sign_in(tmp_path: Any) -> None:
    """Made before the fold above, on SQLite (its index on lower(username) folds A-Z only and let both in): 'ÉRIC' and
    'éric'. Each signs in as spelled; sign-in as 'ÉRIC' matched both (500), a third spelling's check too."""
    from core import auth
    from core.crypto import hash_password
    from core.db import make_engine
    from main import migrate

    url = f"sqlite+aiosqlite:///{tmp_path}/m.db"
    migrate(make_settings(DATABASE_URL=url))

    async def run() -> None:
        engine = make_engine(url)
        maker = async_sessionmaker(engine, expire_on_commit=False)
        try:
            async with maker.begin() as s:
                for user_id, name, password in [("u1", "ÉRIC@kigali.rw", "first-password-123"),
                                                ("u2", "éric@kigali.rw", "other-password-123")]:
                    await s.execute(AdminUser.__table__.insert().values(
                        id=user_id, username=name, password_hash=hash_password(password), role="SUPER_ADMIN"))
            for typed, password, user_id in [("ÉRIC@kigali.rw", "first-password-123", "u1"),
                                             ("éric@kigali.rw", "other-password-123", "u2")]:
                async with maker.begin() as s:
                    user, _ = await auth.login(s, typed, password)
                    assert user.id == user_id, typed
            with pytest.raises(Conflict):
                async with maker.begin() as s:
                    await accounts.create_admin(s, username="Éric@kigali.rw", password="third-password-123",
                                                role="SUPER_ADMIN", cooperative_id=None, actor=Actor("system", "cli"))
        finally:
            await engine.dispose()

    asyncio.run(run())


async def test_two_usernames_differing_only_in_case_at_once_one_is_refused(
        superadmin: Caller, rt: Any, demo: dict[str, Any], monkeypatch: Any) -> None:
    """Both pass the check before either writes: the unique index on lower(username) refuses the second, which
    gets the 409 (auth.create_user reads again in any case)."""
    _both_read(monkeypatch, user_routes, "_refuse_taken")
    body = {**WANJIRU, "cooperativeId": demo["cooperative_id"]}
    answers = await asyncio.gather(superadmin.req("POST", "/v1/users", json=body),
                                   superadmin.req("POST", "/v1/users", json={**body, "username": "wanjiru@nsg.co.ke"}))
    assert sorted(r.status for r in answers) == [201, 409], [await r.json() for r in answers]
    [refused] = [await r.json() for r in answers if r.status == 409]
    assert refused["message"] == "this username is taken"
    assert len(await _usernames(rt, "wanjiru@nsg.co.ke")) == 1


# ---------------------------------------------------------------------------------------------------- migration


def _clashing_rows(conn: Any) -> None:
    """Rows written before 0017: two short codes and two usernames each differing only in case."""
    for coop_id, code, status in [("c1", "KHHC2", "ACTIVE"), ("c2", "khhc2", "SUSPENDED")]:
        conn.execute(Cooperative.__table__.insert().values(
            id=coop_id, name=code, short_code=code, country="RW", currency="RWF", timezone="Africa/Kigali",
            status=status))
    for user_id, name in [("u1", "Wanjiru@NSG.co.ke"), ("u2", "wanjiru@nsg.co.ke")]:
        conn.execute(AdminUser.__table__.insert().values(id=user_id, username=name, password_hash="x",
                                                         role="SUPER_ADMIN"))


REFUSAL = ("migration 0017 cannot be applied (nothing was changed): make these different in more than case, "
           "then run migrate again (each is in the log above with its ids): short codes 'KHHC2' = 'khhc2'; "
           "usernames 'Wanjiru@NSG.co.ke' = 'wanjiru@nsg.co.ke'")


def test_0017_names_the_clashes_it_meets_and_builds_its_indexes_once_they_are_gone_on_sqlite(tmp_path: Any) -> None:
    """`migrate`, as an operator runs it: exit 3, the clashes named (and each row's id in the log), nothing
    changed; once they differ, the indexes are built and refuse another case; a downgrade drops them."""
    from alembic import command

    from main import _alembic_config, migrate

    url = f"sqlite+aiosqlite:///{tmp_path}/m.db"
    settings = make_settings(DATABASE_URL=url)
    migrate(settings)
    command.downgrade(_alembic_config(settings), "0016")
    engine = sa.create_engine(f"sqlite:///{tmp_path}/m.db")

    def state() -> tuple[str, list[str]]:
        with engine.connect() as c:
            return (c.execute(sa.text("SELECT version_num FROM alembic_version")).scalar_one(),
                    sorted(c.execute(sa.text("SELECT name FROM sqlite_master WHERE name LIKE 'ux_%'")).scalars()))

    try:
        with engine.begin() as conn:
            _clashing_rows(conn)
        result = subprocess.run([sys.executable, "main.py", "migrate"], cwd=ROOT, capture_output=True, text=True,
                                env={**_base_env(), "DATABASE_URL": url}, timeout=120, check=False)
        assert result.returncode == 3, result.stderr
        assert f"refusing to migrate: CommandError: {REFUSAL}" in result.stderr
        assert "'KHHC2' (cooperative c1, ACTIVE) and 'khhc2' (cooperative c2, SUSPENDED)" in result.stderr
        assert "'Wanjiru@NSG.co.ke' (account u1, active) and 'wanjiru@nsg.co.ke' (account u2, active)" in result.stderr
        assert state() == ("0016", [])

        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE cooperatives SET short_code = 'KHHC3' WHERE id = 'c2'"))
            conn.execute(sa.text("UPDATE admin_users SET username = 'wanjiru2@nsg.co.ke' WHERE id = 'u2'"))
        migrate(settings)
        version, built = state()
        assert version >= "0017" and built == ["ux_admin_users_lower_username", "ux_cooperatives_upper_short_code"]
        for statement in ("UPDATE cooperatives SET short_code = 'khhc2' WHERE id = 'c2'",
                          "UPDATE admin_users SET username = 'WANJIRU@nsg.co.ke' WHERE id = 'u2'"):
            with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
                conn.execute(sa.text(statement))
        command.downgrade(_alembic_config(settings), "0016")
        assert state() == ("0016", [])
    finally:
        engine.dispose()


@requires_pg
async def test_0017_names_the_clashes_it_meets_on_postgres(migrated_database: str) -> None:
    from alembic import command
    from alembic.util.exc import CommandError

    from core.db import make_engine
    from main import _alembic_config, migrate

    cfg = _alembic_config(make_settings())
    engine = make_engine(migrated_database)

    async def indexes() -> list[str]:
        async with engine.connect() as c:
            return sorted((await c.execute(sa.text(
                "SELECT indexname FROM pg_indexes WHERE indexname LIKE 'ux_%'"))).scalars())

    try:
        await asyncio.to_thread(command.downgrade, cfg, "0016")
        assert await indexes() == []
        async with engine.begin() as conn:
            await conn.execute(sa.text("TRUNCATE cooperatives, admin_users CASCADE"))
            await conn.run_sync(_clashing_rows)
        with pytest.raises(CommandError) as refused:
            await asyncio.to_thread(migrate, make_settings())
        assert str(refused.value) == REFUSAL
        assert await indexes() == []
        async with engine.begin() as conn:
            await conn.execute(sa.text("UPDATE cooperatives SET short_code = 'KHHC3' WHERE id = 'c2'"))
            await conn.execute(sa.text("UPDATE admin_users SET username = 'wanjiru2@nsg.co.ke' WHERE id = 'u2'"))
        await asyncio.to_thread(migrate, make_settings())
        assert await indexes() == ["ux_admin_users_lower_username", "ux_cooperatives_upper_short_code"]
    finally:
        async with engine.begin() as conn:
            await conn.execute(sa.text("TRUNCATE cooperatives, admin_users CASCADE"))
        await engine.dispose()
        await asyncio.to_thread(migrate, make_settings())  # at head again, whatever happened
