"""Authentication endpoints: password login for a JWT pair, refresh with rotation, changing one's own password,
and API keys."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

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
from admin_api.routing import RATE_MULTIPLIER, REDIS_DOWN, Ctx, Route, authenticate, client_ip, end_sessions
from admin_api.users import PASSWORD
from admin_api.validation import LIMIT, PAGE
from core import auth
from core import users as accounts
from core.audit import Actor, record
from core.auth import Unauthorized
from core.db import utcnow, wall
from core.errors import ACCOUNT_LOCKED, TOKEN_INVALID, ValidationError
from core.models import AdminUser, ApiKey, AuditEvent
from core.ratelimit import Decision, Flight, Limit, LocalCounts, LocalLimiter, RateLimiter, Tally

log = logging.getLogger("gateway.api")
_T = TypeVar("_T")

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
        "username": {"type": "string", "minLength": 1, "maxLength": 120,
                     "description": "in any case (usernames are unique whatever their case); surrounding "
                                    "spaces are ignored"},
        "password": {"type": "string", "minLength": 1, "maxLength": 256},
    },
    ["username", "password"],
)
PASSWORD_CHANGE = obj(
    {
        "currentPassword": {"type": "string", "minLength": 1, "maxLength": 256},
        "newPassword": PASSWORD,
    },
    ["currentPassword", "newPassword"],
)
# The new pair, and the API keys the account had created: revoked with the old password (a key made from a
# stolen session must not outlast the owner taking the account back).
PASSWORD_CHANGED = out_plus(
    TOKEN, apiKeysRevoked={"type": "array", "items": ID, "description": "the API keys you created, revoked now"}
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


# Wrong passwords are limited, not sign-ins, so knowing an admin's username (an e-mail address) is not enough
# to keep them out:
# - per (username, address): 10 a minute, the guesser's own bucket;
# - per username across every address: 100 an hour, so guessing spread over many addresses stays bounded.
#   It refuses only addresses that have failed for this username within the hour (their hourly bucket), so
#   the real user signing in from an address that has not failed is not refused by someone else's guesses.
# A full bucket refuses (429) before the password is checked. Only confirmed failures fill a bucket; attempts
# still being checked are kept apart (a Tally's requests in flight). Counting each attempt as failed until its
# password proved right refused a burst of right passwords (the 11th of them at once) though none had failed;
# counting only after the check let a burst of wrong ones all past the check before any was counted (20
# guesses, not 10). So an attempt is checked only while the confirmed failures and the attempts in flight
# leave room for it; one that finds no room only because of attempts in flight waits for them (WAIT_FOR_FLIGHTS
# at most) and then decides on what they turned out to be.
FAILED_PER_ADDRESS = Limit("auth:failed", 10)
FAILED_PER_ADDRESS_HOUR = Limit("auth:failed-hour", 600, window=3600)  # read as: has this address failed
FAILED_PER_USERNAME = Limit("auth:failed-any", 100, window=3600)
# Redis down: the same counts in this process's memory, so guessing is still slowed rather than the limit
# lapsing (or sign-in answering 503 and locking everyone out once their access tokens expire).
LOCAL_FAILURES = LocalCounts()
# A password check takes tens of milliseconds (scrypt) and may wait for a password change to commit: an
# attempt waits this long at most for those in flight, looking again after each pause (a round trip each, and
# one more to leave the in-flight sets it joined meanwhile). Ten checks at once on two busy CPUs took more
# than 2 s on CI; a waiter is one held request, and the route lets 20 a minute in from an address.
WAIT_FOR_FLIGHTS = 5.0
_PAUSES = (0.02, 0.05, 0.1, 0.2)  # then 0.2 s on


def _sign_in_subjects(request: web.Request, username: str) -> tuple[str, str]:
    """The per-(username, address) subject and the per-username one; the username digested, so keys do not
    hold e-mail addresses."""
    user = hashlib.sha256(username.strip().lower().encode()).hexdigest()[:32]
    return f"signin:{user}:{client_ip(request)}", f"signin:{user}"


async def _with_fallback(request: web.Request, ctx: Ctx,
                         use: Callable[[RateLimiter | LocalLimiter], Awaitable[_T]]) -> _T:
    """`use` on Redis's counts, or on this process's when Redis cannot answer."""
    multiplier = request.config_dict[RATE_MULTIPLIER]
    try:
        return await use(RateLimiter(ctx.rt.redis, multiplier=multiplier))
    except REDIS_DOWN as exc:
        log.warning("sign-in failure counts unavailable in Redis; counted in this process",
                    extra={"error": type(exc).__name__})
        return await use(LocalLimiter(LOCAL_FAILURES, multiplier=multiplier))


@dataclass(frozen=True)
class _Attempt:
    """A password attempt in flight (this address's tally, then the username's), and where (Redis, or this
    process's memory)."""

    limiter: RateLimiter | LocalLimiter
    flights: list[Flight]


def _refusal(here: Flight, everywhere: Flight) -> Decision | None:
    """The bucket that confirmed failures have filled for this attempt, if any."""
    minute, hour = here.confirmed
    if not minute.allowed:
        return minute
    if hour.used > 0 and not everywhere.confirmed[0].allowed:  # this address has failed within the hour
        return everywhere.confirmed[0]
    return None


def _must_wait(here: Flight, everywhere: Flight) -> bool:
    """Whether attempts in flight could fill a bucket before this one is checked: this address's attempts
    being checked leave it no room (it did not join them), or the username's leave none and this address has
    failed or has an attempt that may."""
    could_have_failed_here = here.confirmed[1].used > 0 or here.in_flight > 0
    return not here.joined or (could_have_failed_here and not everywhere.joined)


async def _begin_attempt(request: web.Request, ctx: Ctx, username: str) -> _Attempt:
    """Begin a password attempt for the username from this address: refused (429) when confirmed failures have
    filled a bucket; while only attempts still being checked stand in the way, it waits for them. One round
    trip when nothing stands in the way (see WAIT_FOR_FLIGHTS for the looks while waiting). `_end` it once
    the password is checked."""
    address, anywhere = _sign_in_subjects(request, username)
    tallies = (Tally(address, (FAILED_PER_ADDRESS, FAILED_PER_ADDRESS_HOUR)), Tally(anywhere, (FAILED_PER_USERNAME,)))

    async def begin(limiter: RateLimiter | LocalLimiter) -> _Attempt:
        return _Attempt(limiter, await limiter.begin(tallies))

    deadline = asyncio.get_running_loop().time() + WAIT_FOR_FLIGHTS
    for pause in itertools.chain(_PAUSES, itertools.repeat(_PAUSES[-1])):
        attempt = await _with_fallback(request, ctx, begin)
        here, everywhere = attempt.flights
        refusing = _refusal(here, everywhere)
        if refusing is None and not _must_wait(here, everywhere):
            return attempt
        await _end(request, attempt, failed=False)  # out of the way of the attempts it waits for
        if refusing is not None:
            raise ApiError(
                429,
                "Too many failed sign-in attempts for this user. Please try again later.",
                headers={"Retry-After": str(refusing.retry_after)},
                code=ACCOUNT_LOCKED,
            )
        if asyncio.get_running_loop().time() + pause > deadline:
            raise ApiError(
                429,
                "Too many sign-in attempts for this user are being checked at once. Please try again.",
                headers={"Retry-After": "1"},
            )
        await asyncio.sleep(pause)
    raise AssertionError("unreachable: the pauses never end")


async def _end(request: web.Request, attempt: _Attempt, *, failed: bool) -> None:
    """The attempt's password is checked (or it gave up): counted when the password was wrong, and out of
    flight. Redis failing now counts a wrong password in this process instead (its place in flight in Redis
    lapses with its lease), rather than failing the sign-in or forgetting the failure."""
    try:
        await attempt.limiter.end(attempt.flights, count=failed)
    except REDIS_DOWN as exc:
        log.warning("could not end a sign-in attempt in Redis", extra={"error": type(exc).__name__, "failed": failed})
        if failed:
            local = LocalLimiter(LOCAL_FAILURES, multiplier=request.config_dict[RATE_MULTIPLIER])
            await local.end(attempt.flights, count=True)


def _lockouts(attempt: _Attempt) -> list[dict[str, Any]]:
    """The buckets this attempt's failure fills, each as its lockout's audit row says it: the last failure this
    address had room for (10 a minute), or the last the username had across addresses (100 an hour). Judged on
    the counts as the attempt began (confirmed failures and attempts in flight): of a burst, the one that took
    the last place."""
    here, everywhere = attempt.flights
    filled = []
    for flight, per, limit in ((here, "address", FAILED_PER_ADDRESS), (everywhere, "account", FAILED_PER_USERNAME)):
        bucket = flight.confirmed[0]
        if flight.joined and bucket.used + flight.in_flight + 1 >= bucket.limit:
            filled.append({"per": per, "failedAttempts": bucket.limit, "windowSeconds": limit.window})
    return filled


async def _locked_out_lately(ctx: Ctx, account_id: str, after: dict[str, Any]) -> bool:
    """Whether the account's lockout of this kind (`per`) is audited already within its window. The buckets
    slide: once full, one more attempt fits each few seconds as old failures weigh less, and its wrong password
    fills the bucket again; a guesser keeping at it is one lockout, not a row per guess."""
    since = utcnow() - timedelta(seconds=after["windowSeconds"])
    noted = (await ctx.session.execute(
        select(AuditEvent.after).where(AuditEvent.entity_type == "user", AuditEvent.entity_id == account_id,
                                       AuditEvent.action == "user.locked_out", AuditEvent.at >= since))).scalars()
    return any((row or {}).get("per") == after["per"] for row in noted)


async def _record_lockouts(ctx: Ctx, attempt: _Attempt | None, account: AdminUser | None) -> None:
    """A `user.locked_out` audit row for each bucket a wrong password for a known account filled (committed: the
    attempt's answer is an error, whose transaction is rolled back). Never the password tried, nor the username
    typed: the row names the account by id; a username that names no account is not audited at all."""
    if attempt is None or account is None:
        return
    filled = [after for after in _lockouts(attempt) if not await _locked_out_lately(ctx, account.id, after)]
    for after in filled:
        await record(ctx.session, actor=Actor.system("api"), action="user.locked_out", entity_type="user",
                     entity_id=account.id, after=after, cooperative_id=account.cooperative_id)
    if filled:
        await ctx.session.commit()


async def issue_token(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    limited = request.config_dict[RATE_MULTIPLIER] > 0
    username = ctx.body["username"]
    attempt = await _begin_attempt(request, ctx, username) if limited else None
    failed, refused = False, None
    try:
        user, read_at = await auth.login(ctx.session, username, ctx.body["password"])
    except Unauthorized as exc:
        failed, refused = True, exc
        raise
    finally:
        if attempt is not None:
            await _end(request, attempt, failed=failed)
        if isinstance(refused, auth.SignInRefused):
            await _record_lockouts(ctx, attempt, refused.account)
    s = ctx.rt.settings
    response = json_response(_tokens(auth.issue_tokens(user, secret=s.jwt_secret.get(),
                                                       ttl_seconds=s.jwt_ttl_seconds, issued_at=read_at)))
    response.headers["Cache-Control"] = "no-store"
    return response


async def refresh_token(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    s = ctx.rt.settings
    pair = await auth.refresh(
        ctx.session,
        ctx.rt.redis,
        ctx.body["refreshToken"],
        secret=s.jwt_secret.get(),
        previous=s.jwt_previous,
        ttl_seconds=s.jwt_ttl_seconds,
    )
    response = json_response(_tokens(pair))
    response.headers["Cache-Control"] = "no-store"
    return response


async def change_own_password(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    """A signed-in user sets a new password, proving they know the current one (a token alone is not enough).
    Every session of theirs ends, this one too, and the API keys they created are revoked; the answer is a new
    pair for this one, issued after the end (to the microsecond: see auth.check_not_revoked)."""
    user = await ctx.session.get(AdminUser, ctx.who.id)
    if user is None:
        raise Unauthorized("token has been revoked", code=TOKEN_INVALID)
    # A wrong current password counts as a wrong password at sign-in, in the same buckets: a stolen token
    # gives no more guesses at the password than the sign-in page does.
    limited = request.config_dict[RATE_MULTIPLIER] > 0
    attempt = await _begin_attempt(request, ctx, user.username) if limited else None
    failed = False
    try:
        failed = not await accounts.password_matches(user, ctx.body["currentPassword"])
    finally:
        if attempt is not None:
            await _end(request, attempt, failed=failed)
    if failed:
        await _record_lockouts(ctx, attempt, user)
        raise ValidationError("currentPassword is not your current password", field="currentPassword")
    if ctx.body["newPassword"] == ctx.body["currentPassword"]:
        raise ValidationError("newPassword must differ from the current password", field="newPassword")
    keys = await accounts.set_password(ctx.session, user, ctx.body["newPassword"], actor=ctx.who.actor,
                                       action="user.password_changed")
    s = ctx.rt.settings
    ended = 0.0

    async def mark() -> None:
        nonlocal ended
        ended = wall()  # after the audit row's instant, which a mark restored from the log takes
        await auth.revoke_tokens(ctx.rt.redis, user.id, ttl_seconds=s.jwt_ttl_seconds, now=ended)

    await end_sessions(ctx, "your", mark)
    # Issued now, after the marks and the audit row: the only pair left working, and not dated ahead, so a reset
    # or deactivation from now on ends it as any other. (Past the mark even if the clock stepped back meanwhile.)
    pair = auth.issue_tokens(user, secret=s.jwt_secret.get(), ttl_seconds=s.jwt_ttl_seconds,
                             issued_at=max(wall(), math.nextafter(ended, math.inf)))
    response = json_response({**_tokens(pair), "apiKeysRevoked": [k.id for k in keys]})
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


# A key must not mint or revoke keys: a leaked key could otherwise make itself permanent (Route.keys).
KEYS_BY_PEOPLE = "API keys are managed by signed-in administrators"


async def create_api_key(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    coop_id = (await target_cooperative(ctx, ctx.body.get("cooperativeId"))).id
    # The caller's token claims (verified already, so read from the cache): a password change or deactivation
    # that ends this session while the key is being made refuses it (see auth.create_api_key).
    _, claims = await authenticate(request, ctx.rt)
    key, clear = await auth.create_api_key(
        ctx.session,
        cooperative_id=coop_id,
        name=ctx.body["name"],
        scopes=ctx.body["scopes"],
        actor=ctx.who.actor,
        created_by=ctx.who.id,
        claims=claims,
    )
    await ctx.session.commit()
    response = json_response({**present_key(key), "key": clear}, status=201)
    response.headers["Cache-Control"] = "no-store"
    return response


async def list_api_keys(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    query = ctx.who.scope(select(ApiKey), ApiKey).order_by(ApiKey.created_at.desc(), ApiKey.id)
    return await paged(ctx, query, present_key)


async def revoke_api_key(request: web.Request, ctx: Ctx) -> web.StreamResponse:
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
        "/auth/password",
        change_own_password,
        "Change your own password (any signed-in user; all your sessions end, this one gets a new token pair)",
        "auth",
        "payments:read",
        body=PASSWORD_CHANGE,
        response=PASSWORD_CHANGED,
        # The sign-in buckets' 10 a minute (they count only wrong current passwords), for every call.
        limit=Limit("auth:password", 10),
        tenants=True,
        keys=False,
        key_refusal="an API key has no password; sign in as the account whose password it is",
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
        keys=False,
        key_refusal=KEYS_BY_PEOPLE,
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
        keys=False,
        key_refusal=KEYS_BY_PEOPLE,
    ),
    Route(
        "DELETE", "/api-keys/{id}", revoke_api_key, "Revoke an API key", "api-keys", "admin", response=API_KEY,
        keys=False,
        key_refusal=KEYS_BY_PEOPLE,
    ),
]
