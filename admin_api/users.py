"""Sign-in accounts over the API: a super admin adds cooperative admins; admins add tenant logins, turn
accounts off and on again and set a forgotten password (each ending the account's sessions). Nobody sets
their own password or turns themselves off here: that is POST /auth/password, which asks for the current one."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from sqlalchemy import select

from admin_api.common import (
    DATETIME,
    ID,
    iso,
    json_response,
    obj,
    one,
    out,
    out_plus,
    page_of,
    paged,
    target_cooperative,
)
from admin_api.routing import Ctx, Route, end_sessions
from admin_api.validation import LIMIT, PAGE, Param
from core import auth
from core import users as accounts
from core.audit import record
from core.db import lock_row
from core.errors import (
    INVALID_STATE,
    MEMBER_NOT_FOUND,
    NAME_TAKEN,
    Conflict,
    Forbidden,
    NotFound,
    ValidationError,
)
from core.members import PHONE_RELEASED
from core.models import AdminUser, ApiKey, Member

USER = out(
    {
        "id": ID,
        "username": {"type": "string"},
        "role": {"enum": list(auth.ROLES)},
        "cooperativeId": {"type": ["string", "null"]},
        "memberId": {"type": ["string", "null"]},
        "isActive": {"type": "boolean"},
        "createdAt": DATETIME,
    }
)
DEACTIVATED = out_plus(
    USER, apiKeysRevoked={"type": "array", "items": ID,
                          "description": "the API keys it created, revoked now (when it was deactivated or "
                                         "given a new password)"}
)
# The rules of core.users, for every route that takes a password.
PASSWORD = {"type": "string", "minLength": accounts.PASSWORD_MIN, "maxLength": accounts.PASSWORD_MAX}
CREATE = obj(
    {
        "username": {"type": "string", "minLength": accounts.USERNAME_MIN, "maxLength": accounts.USERNAME_MAX,
                     "description": "kept as given (surrounding spaces dropped) and shown so; taken when an "
                                    "account has it in any case (409), and signed in with in any case; no tabs, "
                                    "line breaks, spaces but the plain one, or invisible characters (400)"},
        "password": PASSWORD,
        "role": {"enum": list(auth.ROLES)},
        "cooperativeId": {"type": "string", "format": "uuid", "description": "super admin only"},
        "memberId": {"type": "string", "format": "uuid",
                     "description": "required for TENANT: the member whose login it is; one whose number was "
                                    "released (she left, or was erased) is 409 INVALID_STATE, she can never sign in"},
    },
    ["username", "password", "role"],
)
UPDATE = obj(
    {
        "isActive": {"type": "boolean", "description": "false: as DELETE (tokens end, its API keys are revoked); "
                     "true: turn a deactivated account on again (a tenant login of a member whose number was "
                     "released, who left or was erased, is 409 INVALID_STATE: it could never sign in)"},
        "password": {**PASSWORD, "description": "a new password (not your own: POST /auth/password); the "
                     "account's tokens and refresh tokens stop working and the API keys it created are revoked. "
                     "A cooperative admin sets tenants' passwords; another admin's, only a super admin"},
    },
    min_properties=1,
)


def present(u: AdminUser) -> dict[str, Any]:
    return {
        "id": u.id,
        "username": u.username,
        "role": u.role,
        "cooperativeId": u.cooperative_id,
        "memberId": u.member_id,
        "isActive": u.is_active,
        "createdAt": iso(u.created_at),
    }


# A key makes, changes and removes no account: a leaked key could otherwise make one to sign in with (Route.keys).
ACCOUNTS_BY_PEOPLE = "accounts are managed by signed-in administrators"


async def create_user(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    body, who = ctx.body, ctx.who
    role = body["role"]
    if role == auth.SUPER_ADMIN and not who.is_super:
        raise Forbidden("only a super admin can create a super admin")
    coop_id = None
    if role != auth.SUPER_ADMIN:
        coop_id = (await target_cooperative(ctx, body.get("cooperativeId"))).id
    elif body.get("cooperativeId") or body.get("memberId"):
        raise ValidationError("a super admin belongs to no cooperative", field="cooperativeId")
    member_id = body.get("memberId")
    if role == auth.TENANT:
        if not member_id:
            raise ValidationError("memberId is required for a TENANT", field="memberId")
        member = await lock_row(ctx.session, Member, member_id, coop_id)  # (SQLite: the write lock too)
        if member is None:
            raise NotFound("member not found", field="memberId", code=MEMBER_NOT_FOUND)
        if member.phone_enc is None:
            raise _never_signs_in("memberId")
    elif member_id:
        raise ValidationError("memberId is only for a TENANT", field="memberId")
    username = accounts.check_username(body["username"])
    await _refuse_taken(ctx, username)
    user = await auth.create_user(
        ctx.session,
        username=username,
        password=body["password"],
        role=role,
        cooperative_id=coop_id,
        member_id=member_id,
    )
    await record(
        ctx.session,
        actor=who.actor,
        action="user.created",
        entity_type="user",
        entity_id=user.id,
        # A tenant's username is often her e-mail: it stays out of the append-only log, which an erasure of the
        # member cannot clear (core.members.erase_member); an administrator's names who acts in the log.
        after={**({} if role == auth.TENANT else {"username": username}), "role": role, "memberId": member_id},
        cooperative_id=coop_id,
    )
    await ctx.session.commit()
    return json_response(present(user), status=201)


def _never_signs_in(field: str) -> Conflict:
    """A tenant login for a member whose number was released (she left, or was erased: core.members.erase_member)
    would never sign in: her membership cannot be made active again (core.members.REGISTER_AGAIN). Made or turned on
    anyway, it answered 201 or isActive true, and a new one tied her e-mail to her erased record again. The member's
    row is read under a lock (core.db.lock_row: on SQLite the write lock, where FOR UPDATE alone locked nothing and
    a read saw the number an erasure under way had not yet cleared): an erasure committing meanwhile comes first
    (refused here) or finds the login."""
    return Conflict(f"{PHONE_RELEASED} (the member left, or was erased): a login of hers could never sign in; "
                    "register the person again as a new member and give that member a login", field=field,
                    code=INVALID_STATE)


async def _refuse_taken(ctx: Ctx, username: str) -> None:
    """409 when an account has this username in any case (sign-in does not tell them apart: auth.username_is)."""
    taken = (await ctx.session.execute(select(AdminUser).where(auth.username_is(username)))).scalars().first()
    if taken is None:
        return
    # A deactivated account keeps its username (its audit trail names it): say how to have it back, to a
    # caller who may see that account.
    visible = (await ctx.session.execute(
        ctx.who.scope(select(AdminUser.id).where(AdminUser.id == taken.id), AdminUser))).first() is not None
    taken_message = accounts.username_taken(username, taken.username)
    if visible and not taken.is_active:
        raise Conflict(f"{taken_message} by a deactivated account: turn it on again with PATCH "
                       f"/v1/users/{taken.id} {{\"isActive\": true}}", field="username", code=NAME_TAKEN)
    raise Conflict(taken_message, field="username", code=NAME_TAKEN)


async def list_users(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    query = ctx.who.scope(select(AdminUser), AdminUser)
    if ctx.query.get("role"):
        query = query.where(AdminUser.role == ctx.query["role"])
    return await paged(ctx, query.order_by(AdminUser.username, AdminUser.id), present)


async def deactivate_user(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    user = await one(ctx, AdminUser, request.match_info["id"], "user")
    if user.id == ctx.who.id:
        raise Conflict("you cannot deactivate your own account")
    # The API keys the account made go with it (each revoked and audited), also on a repeated call.
    keys = await accounts.deactivate(ctx.session, user, actor=ctx.who.actor)
    await _end_sessions(ctx, user)
    return json_response({**present(user), "apiKeysRevoked": [k.id for k in keys]})


async def update_user(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    """Turn an account off or on again, or set a new password for someone who forgot theirs."""
    user = await one(ctx, AdminUser, request.match_info["id"], "user")
    body = ctx.body
    if user.id == ctx.who.id:
        # A stolen token must not be enough to lock out the owner or take the account for good.
        if "password" in body:
            raise Conflict("change your own password with POST /v1/auth/password (it asks for the current one)")
        raise Conflict("you cannot turn your own account off or on")
    await _refuse_above_a_coop_admin(ctx, user)
    keys: list[ApiKey] = []
    if body.get("isActive") is False:
        keys = await accounts.deactivate(ctx.session, user, actor=ctx.who.actor)
    elif body.get("isActive") is True:
        if not user.is_active and user.member_id is not None and (
                await lock_row(ctx.session, Member, user.member_id)).phone_enc is None:
            raise _never_signs_in("isActive")
        await accounts.reactivate(ctx.session, user, actor=ctx.who.actor)
    if "password" in body:
        # The keys it created go too (a repeated call finds none left): listed in the answer, as DELETE does.
        keys += await accounts.set_password(ctx.session, user, body["password"], actor=ctx.who.actor,
                                            action="user.password_reset")
    if body.get("isActive") is False or "password" in body:
        await _end_sessions(ctx, user)  # commits
    await ctx.session.commit()
    return json_response({**present(user), "apiKeysRevoked": [k.id for k in keys]})


async def _refuse_above_a_coop_admin(ctx: Ctx, user: AdminUser) -> None:
    """What a cooperative admin may not do to an account of their cooperative: set a fellow admin's password
    (they would sign in as them), or turn on again an account a super admin turned off (undoing the platform's
    decision). Tenants' passwords, and accounts a cooperative admin turned off, are theirs to handle."""
    if ctx.who.is_super:
        return
    if "password" in ctx.body and user.role != auth.TENANT:
        raise Forbidden("only a super admin can set another administrator's password; they change their own "
                        "with POST /v1/auth/password")
    reactivating = ctx.body.get("isActive") is True and not user.is_active
    if reactivating and await accounts.deactivated_by_super_admin(ctx.session, user):
        raise Forbidden("only a super admin can turn this account on again: a super admin turned it off")


async def _end_sessions(ctx: Ctx, user: AdminUser) -> None:
    """Its tokens stop working now, not when they expire (marked around the commit: see end_sessions). Its
    refresh tokens are refused on the audit row written with the change."""
    await end_sessions(ctx, "the account's", lambda: auth.revoke_tokens(
        ctx.rt.redis, user.id, ttl_seconds=ctx.rt.settings.jwt_ttl_seconds))


ROUTES = [
    Route(
        "POST",
        "/users",
        create_user,
        "Create a sign-in account",
        "users",
        "admin",
        status=201,
        body=CREATE,
        response=USER,
        keys=False,
        key_refusal=ACCOUNTS_BY_PEOPLE,
    ),
    Route(
        "GET",
        "/users",
        list_users,
        "List sign-in accounts",
        "users",
        "admin",
        response=page_of(USER),
        query={"page": PAGE, "limit": LIMIT, "role": Param(enum=auth.ROLES)},
        keys=False,
        key_refusal=ACCOUNTS_BY_PEOPLE,
    ),
    Route(
        "PATCH",
        "/users/{id}",
        update_user,
        "Turn a sign-in account off or on again, or set a new password for it (its sessions end)",
        "users",
        "admin",
        body=UPDATE,
        response=DEACTIVATED,
        keys=False,
        key_refusal=ACCOUNTS_BY_PEOPLE,
    ),
    Route(
        "DELETE",
        "/users/{id}",
        deactivate_user,
        "Deactivate a sign-in account (its tokens stop working and the API keys it created are revoked)",
        "users",
        "admin",
        response=DEACTIVATED,
        keys=False,
        key_refusal=ACCOUNTS_BY_PEOPLE,
    ),
]
