"""Sign-in accounts over the API: a super admin adds cooperative admins; admins add tenant logins."""

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
from core.audit import record
from core.errors import Conflict, Forbidden, NotFound, ValidationError
from core.models import AdminUser, Member

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
    USER, apiKeysRevoked={"type": "array", "items": ID, "description": "the API keys it created, revoked now"}
)
CREATE = obj(
    {
        "username": {"type": "string", "minLength": 3, "maxLength": 120},
        "password": {"type": "string", "minLength": 12, "maxLength": 256},
        "role": {"enum": list(auth.ROLES)},
        "cooperativeId": {"type": "string", "format": "uuid", "description": "super admin only"},
        "memberId": {"type": "string", "format": "uuid", "description": "required for TENANT"},
    },
    ["username", "password", "role"],
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


def _people_only(ctx: Ctx) -> None:
    if ctx.who.kind != "user":
        raise Forbidden("accounts are managed by signed-in administrators")


async def create_user(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    _people_only(ctx)
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
        found = await ctx.session.execute(
            who.scope(
                select(Member.id).where(Member.id == member_id, Member.cooperative_id == coop_id), Member
            )
        )
        if found.scalar_one_or_none() is None:
            raise NotFound("member not found")
    elif member_id:
        raise ValidationError("memberId is only for a TENANT", field="memberId")
    username = body["username"].strip()
    taken = await ctx.session.execute(select(AdminUser.id).where(AdminUser.username == username))
    if taken.scalar_one_or_none() is not None:
        raise Conflict("this username is taken", field="username")
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
        after={"username": username, "role": role, "memberId": member_id},
        cooperative_id=coop_id,
    )
    await ctx.session.commit()
    return json_response(present(user), status=201)


async def list_users(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    _people_only(ctx)
    query = ctx.who.scope(select(AdminUser), AdminUser)
    if ctx.query.get("role"):
        query = query.where(AdminUser.role == ctx.query["role"])
    return await paged(ctx, query.order_by(AdminUser.username, AdminUser.id), present)


async def deactivate_user(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    _people_only(ctx)
    user = await one(ctx, AdminUser, request.match_info["id"], "user")
    if user.id == ctx.who.id:
        raise Conflict("you cannot deactivate your own account")
    # The API keys the account made go with it (each revoked and audited); also on a repeated call, which
    # thereby cleans up after an account deactivated before keys were revoked with it.
    keys = await auth.revoke_api_keys_created_by(ctx.session, user.id, actor=ctx.who.actor)
    if user.is_active:
        user.is_active = False
        await ctx.session.flush()
        await record(
            ctx.session,
            actor=ctx.who.actor,
            action="user.deactivated",
            entity_type="user",
            entity_id=user.id,
            after={"apiKeysRevoked": [k.id for k in keys]},
            cooperative_id=user.cooperative_id,
        )
    # Its tokens stop working now, not when they expire. Marked before the commit: if Redis cannot take
    # the mark, the request fails and nothing changed; the admin sends it again.
    await end_sessions("the account's", auth.revoke_tokens(ctx.rt.redis, user.id,
                                                           ttl_seconds=ctx.rt.settings.jwt_ttl_seconds))
    await ctx.session.commit()
    return json_response({**present(user), "apiKeysRevoked": [k.id for k in keys]})


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
    ),
    Route(
        "DELETE",
        "/users/{id}",
        deactivate_user,
        "Deactivate a sign-in account (its tokens stop working and the API keys it created are revoked)",
        "users",
        "admin",
        response=DEACTIVATED,
    ),
]
