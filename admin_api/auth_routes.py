"""Authentication endpoints: password login for a JWT pair, refresh with rotation, and API keys."""

from __future__ import annotations

import hashlib
from typing import Any

from aiohttp import web
from sqlalchemy import select

from admin_api.common import (
    DATETIME,
    ID,
    NULL_DATETIME,
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
from admin_api.errors import ApiError
from admin_api.routing import RATE_MULTIPLIER, Ctx, Route
from admin_api.validation import LIMIT, PAGE
from core import auth
from core.errors import Forbidden
from core.models import ApiKey
from core.ratelimit import Limit, RateLimiter

TOKEN = out(
    {
        "accessToken": {"type": "string"},
        "refreshToken": {"type": "string"},
        "tokenType": {"const": "Bearer"},
        "expiresIn": {"type": "integer"},
        "role": {"enum": list(auth.ROLES)},
        "cooperativeId": {"type": ["string", "null"]},
    }
)
LOGIN = obj(
    {
        "username": {"type": "string", "minLength": 1, "maxLength": 120},
        "password": {"type": "string", "minLength": 1, "maxLength": 256},
    },
    ["username", "password"],
)
REFRESH = obj({"refreshToken": {"type": "string", "minLength": 10, "maxLength": 4096}}, ["refreshToken"])
API_KEY = out(
    {
        "id": ID,
        "cooperativeId": ID,
        "name": {"type": "string"},
        "prefix": {"type": "string"},
        "scopes": {"type": "array", "items": {"enum": list(auth.SCOPES)}},
        "createdAt": DATETIME,
        "revokedAt": NULL_DATETIME,
        "lastUsedAt": NULL_DATETIME,
    }
)
API_KEY_CREATED = out_plus(API_KEY, key={"type": "string"})
API_KEY_CREATE = obj(
    {
        "name": {"type": "string", "minLength": 1, "maxLength": 120},
        "scopes": {"type": "array", "minItems": 1, "uniqueItems": True, "items": {"enum": list(auth.SCOPES)}},
        "cooperativeId": {"type": "string", "format": "uuid", "description": "super admin only"},
    },
    ["name", "scopes"],
)


def _tokens(pair: auth.TokenPair) -> dict[str, Any]:
    return {
        "accessToken": pair.access_token,
        "refreshToken": pair.refresh_token,
        "tokenType": "Bearer",
        "expiresIn": pair.expires_in,
        "role": pair.role,
        "cooperativeId": pair.cooperative_id,
    }


# Password guessing is also limited per username, so spreading attempts over many addresses does not help.
PER_USERNAME = Limit("auth:username", 10)


async def issue_token(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    multiplier = request.config_dict[RATE_MULTIPLIER]
    if multiplier > 0:
        subject = hashlib.sha256(ctx.body["username"].strip().lower().encode()).hexdigest()[:32]
        decision = await RateLimiter(ctx.rt.redis, multiplier=multiplier).hit(PER_USERNAME, subject)
        if not decision.allowed:
            raise ApiError(
                429,
                "Too many sign-in attempts for this user. Please try again later.",
                headers={"Retry-After": str(decision.retry_after)},
            )
    user = await auth.login(ctx.session, ctx.body["username"], ctx.body["password"])
    s = ctx.rt.settings
    response = json_response(
        _tokens(auth.issue_tokens(user, secret=s.jwt_secret.get(), ttl_seconds=s.jwt_ttl_seconds))
    )
    response.headers["Cache-Control"] = "no-store"
    return response


async def refresh_token(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    s = ctx.rt.settings
    pair = await auth.refresh(
        ctx.session,
        ctx.rt.redis,
        ctx.body["refreshToken"],
        secret=s.jwt_secret.get(),
        ttl_seconds=s.jwt_ttl_seconds,
    )
    response = json_response(_tokens(pair))
    response.headers["Cache-Control"] = "no-store"
    return response


def present_key(k: ApiKey) -> dict[str, Any]:
    return {
        "id": k.id,
        "cooperativeId": k.cooperative_id,
        "name": k.name,
        "prefix": k.prefix,
        "scopes": list(k.scopes or []),
        "createdAt": iso(k.created_at),
        "revokedAt": iso(k.revoked_at),
        "lastUsedAt": iso(k.last_used_at),
    }


def _people_only(ctx: Ctx) -> None:
    # A key must not mint or revoke keys: a leaked key could otherwise make itself permanent.
    if ctx.who.kind != "user":
        raise Forbidden("API keys are managed by signed-in administrators")


async def create_api_key(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    _people_only(ctx)
    coop_id = (await target_cooperative(ctx, ctx.body.get("cooperativeId"))).id
    key, clear = await auth.create_api_key(
        ctx.session,
        cooperative_id=coop_id,
        name=ctx.body["name"],
        scopes=ctx.body["scopes"],
        actor=ctx.who.actor,
        created_by=ctx.who.id,
    )
    await ctx.session.commit()
    response = json_response({**present_key(key), "key": clear}, status=201)
    response.headers["Cache-Control"] = "no-store"
    return response


async def list_api_keys(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    _people_only(ctx)
    query = ctx.who.scope(select(ApiKey), ApiKey).order_by(ApiKey.created_at.desc(), ApiKey.id)
    return await paged(ctx, query, present_key)


async def revoke_api_key(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    _people_only(ctx)
    key = await one(ctx, ApiKey, request.match_info["id"], "API key")
    key = await auth.revoke_api_key(ctx.session, key, actor=ctx.who.actor)
    await ctx.session.commit()
    return json_response(present_key(key))


ROUTES = [
    Route(
        "POST",
        "/auth/token",
        issue_token,
        "Sign in with username and password",
        "auth",
        None,
        body=LOGIN,
        response=TOKEN,
        limit=Limit("auth:token", 20),
    ),
    Route(
        "POST",
        "/auth/refresh",
        refresh_token,
        "Trade a refresh token for a new token pair",
        "auth",
        None,
        body=REFRESH,
        response=TOKEN,
        limit=Limit("auth:refresh", 30),
    ),
    Route(
        "POST",
        "/api-keys",
        create_api_key,
        "Create an API key (the key is shown once)",
        "api-keys",
        "admin",
        status=201,
        body=API_KEY_CREATE,
        response=API_KEY_CREATED,
    ),
    Route(
        "GET",
        "/api-keys",
        list_api_keys,
        "List API keys",
        "api-keys",
        "admin",
        query={"page": PAGE, "limit": LIMIT},
        response=page_of(API_KEY),
    ),
    Route(
        "DELETE", "/api-keys/{id}", revoke_api_key, "Revoke an API key", "api-keys", "admin", response=API_KEY
    ),
]
