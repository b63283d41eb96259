"""The route table: each route declares access, limits and schemas once; router and OpenAPI read it."""

from __future__ import annotations

import asyncio
import logging
import math
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from aiohttp import web
from redis.exceptions import RedisError
from sqlalchemy.ext.asyncio import AsyncSession

from admin_api.errors import RATE_DECISION, REQUEST_FIELDS, ApiError
from admin_api.validation import Param, parse_json, parse_query, read_body, validate
from core import auth
from core.auth import Principal, Unauthorized
from core.cooperatives import zone_of
from core.db import Held, autocommit
from core.errors import SCOPE_MISSING, DomainError, Forbidden, ServiceUnavailable, ValidationError
from core.inbound import client_address, limit_key
from core.models import Cooperative
from core.ratelimit import Decision, Limit, RateLimiter, clock
from core.runtime import RUNTIME, Runtime

log = logging.getLogger("gateway.api")
JSON_BODY_LIMIT = 64 * 1024
# Seconds a caller has to deliver its whole JSON body once its headers are in (408 after that). The body is
# read before any database work, so a slow one holds no connection; the deadline bounds the rest: a caller
# trickling bytes (a bad link, or on purpose) must not keep a request open for good. 64 KiB in 10 s is
# 52 kbit/s, slower than any link an integration calls from.
BODY_READ_SECONDS = 10.0
RATE_MULTIPLIER = web.AppKey("rate_multiplier", float)
# The header a handler sets on an answer to an earlier request under the same idempotency key (nothing new made).
IDEMPOTENT_REPLAYED = "Idempotent-Replayed"
# Stripe's header, which many client libraries send on every POST: on a route keyed by the body's idempotencyKey it
# stands for that key (header_key), so a client keying its requests by the header alone is not answered a retry
# after a timeout with a second payment, refund, dispute or note.
IDEMPOTENCY_KEY_HEADER = "Idempotency-Key"
TOO_MANY = "Too many requests. Please try again later."


@dataclass
class Ctx:
    """What a handler gets besides the request: the runtime, one session, the caller and checked input.

    The session is made at its first use (core.db.Held): a handler that runs on a Core connection instead (an API
    payment on PostgreSQL: admin_api.payments.initiate_payment) makes none."""

    rt: Runtime
    held: Held
    principal: Principal | None
    body: Any
    query: dict[str, Any]
    request: web.Request

    @property
    def session(self) -> AsyncSession:
        return self.held.session

    @property
    def who(self) -> Principal:
        assert self.principal is not None
        return self.principal


Handler = Callable[[web.Request, Ctx], Awaitable[web.StreamResponse]]
# Whether a request names, by its idempotency key, what an earlier request already made (see Route.replay).
ReplayCheck = Callable[[Ctx], Awaitable[bool]]


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # below /v1
    handler: Handler
    summary: str
    tag: str
    scope: str | None  # None: public; else a scope the caller needs (payments:read, admin, super...)
    # Another scope that also lets a caller in, for rows of its own only (the handler narrows: auth.OWN_PAYMENTS)
    own_scope: str | None = None
    # A scope the caller needs as well as `scope` (POST /disputes: payments:read too, so a key that only makes
    # payments opens no dispute): without it 403 naming it, before the query and body are looked at.
    also_scope: str | None = None
    status: int = 200
    body: Mapping[str, Any] | None = None  # JSON Schema of the request body
    query: Mapping[str, Param] = field(default_factory=dict)
    # A query parameter it refuses that a caller may look for here (as another list takes it): where to go instead,
    # said in the 400 (validation.parse_query).
    elsewhere: Mapping[str, str] = field(default_factory=dict)
    response: Mapping[str, Any] | None = None  # JSON Schema of the success body
    limit: Limit | None = None  # None: the default bucket for the method
    body_limit: int = JSON_BODY_LIMIT
    raw_body: str | None = None  # media type when the handler reads the body itself (CSV import)
    produces: str = "application/json"
    tenants: bool = False  # may a TENANT call it at all
    # May an API key call it at all, whatever its scopes (False: signed-in users only; a key is refused 403 with
    # `key_refusal` before its scopes, query or body are looked at, and the OpenAPI document's Access line says so).
    keys: bool = True
    key_refusal: str = "Forbidden resource: signed-in users only, not an API key"
    body_optional: bool = False  # the JSON body may be left out (the schema's defaults apply)
    # An idempotent create (its handler marks a replay IDEMPOTENT_REPLAYED): whether the request's key names a
    # row already made. A replay is answered with what its key made without consuming the limit, even past it:
    # a client retrying after a lost answer (a timeout) must get its payment, not a 429 for it (see _wrap).
    replay: ReplayCheck | None = None

    @property
    def name(self) -> str:
        return self.handler.__name__

    def effective_limit(self) -> Limit:
        if self.limit is not None:
            return self.limit
        if self.method == "GET":
            return Limit(f"{self.tag}:read", 100)
        return Limit(f"{self.tag}:write", 60)


def client_ip(request: web.Request) -> str:
    """The caller's address for per-address limits: behind our own load balancers (TRUSTED_PROXIES) the nearest
    untrusted X-Forwarded-For hop, so callers do not share the balancer's bucket; an IPv6 caller by its /64
    (core.inbound.limit_key)."""
    return limit_key(client_address(request, request.config_dict[RUNTIME].settings.trusted_proxies))


API_KEY_PREFIX = "cpk_"  # core.crypto.new_api_key's


async def authenticate(request: web.Request, rt: Runtime) -> tuple[Principal, dict[str, Any] | None]:
    """The caller, and a signed-in user's token claims (None for an API key: its row was just read).

    An API key is looked up on a connection of its own, in autocommit, and that connection goes back to the
    pool at once. In the request's session the lookup kept a transaction open for the handler's whole run (and
    the once-a-minute last-used stamp kept the key's row locked: the key's other requests, and its revocation,
    waited behind it)."""
    api_key = request.headers.get("X-API-Key")
    header = request.headers.get("Authorization", "")
    if api_key:
        async with autocommit(rt.engine) as conn:
            return await auth.principal_from_api_key(conn, api_key.strip()), None
    scheme, _, token = header.strip().partition(" ")
    if not header.strip() or (scheme.lower() == "bearer" and not token.strip()):
        # Said what is missing: the README's calls read $TOKEN from the sign-in, and a sign-in that failed (a
        # mistyped password) leaves it empty, which a bare "Unauthorized" did not tell from a wrong token.
        raise Unauthorized("no credentials: send Authorization: Bearer <accessToken> (from POST /v1/auth/token) "
                           "or an API key in X-API-Key")
    if scheme.lower() != "bearer":
        # Sent, in another form (a token without "Bearer ", Basic, Token): not "no credentials". The header's value
        # is not repeated (the caller's secret, or bytes of any kind).
        if (token.strip() or scheme).startswith(API_KEY_PREFIX):
            raise Unauthorized("an API key goes in the X-API-Key header, not Authorization: Bearer")
        raise Unauthorized("Authorization takes Bearer <accessToken> (from POST /v1/auth/token); an API key goes "
                           "in X-API-Key")
    if token.strip().startswith(API_KEY_PREFIX):
        # The README's calls all show a bearer token: "invalid token" did not say where a key goes.
        raise Unauthorized("an API key goes in the X-API-Key header, not Authorization: Bearer")
    claims = auth.decode_token(token.strip(), secret=rt.settings.jwt_secret.get(), previous=rt.settings.jwt_previous,
                               expected_type="access")
    return auth.principal_from_access(claims), claims


REDIS_DOWN = (RedisError, OSError, TimeoutError)


async def end_sessions(ctx: Ctx, whose: str, mark: Callable[[], Awaitable[Any]]) -> None:
    """Mark the tokens revoked, commit the change, then mark them again.

    The first mark goes before the commit: if Redis cannot take it, the request fails (503) and nothing
    changed; the admin sends it again. The second, after the commit: a sign-in or refresh that read the
    account between the first mark and the commit still saw it as it was (old password, still active) and
    got a pair dated after the first mark; the second mark is later than any such read (a pair is dated
    when its account was read). If Redis fails only for the second, the first still ends everything else."""
    try:
        await mark()
    except REDIS_DOWN as exc:
        raise ServiceUnavailable(f"{whose} sessions could not be ended (Redis unavailable); nothing was "
                                 "changed, send it again") from exc
    await ctx.session.commit()
    try:
        await mark()
    except REDIS_DOWN as exc:
        log.warning("sessions ended before the commit; the mark after it could not be written",
                    extra={"error": type(exc).__name__})


@dataclass(frozen=True)
class _Counted:
    """A request's rate-limit decision, and what taking it back needs (RateLimiter.uncount): the limiter, the
    subject and the instant it was counted at."""

    decision: Decision
    limiter: RateLimiter
    limit: Limit
    subject: str
    at: float

    async def uncount(self) -> Decision:
        """Take this counted request back: the decision as if it had not been counted (one more remaining, and
        so the next allowed now)."""
        await self.limiter.uncount(self.limit, self.subject, now=self.at)
        d = self.decision
        return replace(d, remaining=d.remaining + 1, used=d.used - 1, reset=math.ceil(self.at))

    async def replay_allowed(self) -> bool:
        """Whether a request past the limit may be looked at as a replay: those are counted in a bucket of their
        own (`<bucket>:past-limit`, as many a window as the route's own), so a client repeating one key, or
        posing as a retry with keys nothing was made with, cannot make every request past the limit a database
        read (or a bank payment's wait for its URL). Redis failing here lets it be looked at (as the limit
        itself lets requests through without Redis)."""
        past = replace(self.limit, name=f"{self.limit.name}:past-limit")
        try:
            return (await self.limiter.hit(past, self.subject, now=self.at)).allowed
        except REDIS_DOWN as exc:
            log.warning("the replay budget past the limit is unavailable in Redis; the replay is looked at",
                        extra={"error": type(exc).__name__})
            return True


async def _limit_and_revocation(request: web.Request, rt: Runtime, route: Route, principal: Principal | None,
                                claims: dict[str, Any] | None, held: Held) -> _Counted | None:
    """The rate limit and a user token's revocation mark, read in one Redis round trip. A request the limit
    refuses is answered 429 here, unless its route answers replays (Route.replay): `_wrap` decides then, once
    it has the body. The decision (None: no limit applied).

    Every API request makes this round trip: on Runtime.hot_redis (the multiplexed connection where there is one;
    `_Counted`'s uncount and replay budget too), whose failures are redis-py's classes, caught here alike.
    Redis slow or down: the database is the system of record, so the API keeps answering without a
    limit rather than failing every request, and a token's account is checked on its row instead.
    """
    multiplier = request.config_dict[RATE_MULTIPLIER]
    mark = auth.revoked_key(principal.id) if claims is not None and principal is not None else None
    counted = None
    stamp: bytes | str | None = None
    redis_ok = True
    redis = rt.hot_redis
    try:
        if multiplier > 0:
            subject = principal.rate_key if principal else f"ip:{client_ip(request)}"
            limiter = RateLimiter(redis, multiplier=multiplier)
            limit, at = route.effective_limit(), clock()
            if mark:  # the mark is tagged like the user's limits: one command (see auth.revoked_key)
                decision, stamp = await limiter.hit_and_read(limit, subject, mark, now=at)
            else:
                decision = await limiter.hit(limit, subject, now=at)
            counted = _Counted(decision, limiter, limit, subject, at)
        elif mark:
            stamp = await redis.get(mark)
    except REDIS_DOWN as exc:
        redis_ok = False
        log.warning("rate limit and token revocation unavailable in Redis; limit skipped, account checked "
                    "in the database", extra={"route": route.name, "error": type(exc).__name__})
    if mark is not None and claims is not None and principal is not None:
        if redis_ok:
            auth.check_not_revoked(claims, stamp)
        else:
            # The rows, and when the account's sessions were last ended (what the mark would say).
            await auth.check_still_active(held.session, principal.id, claims)
    if counted is not None:
        request[RATE_DECISION] = counted.decision
        if not counted.decision.allowed and route.replay is None:
            raise ApiError(429, TOO_MANY)
    return counted


def _let_in(principal: Principal | None, route: Route) -> None:
    """Forbidden unless the caller has the route's scope (or its own scope) and any scope it needs as well, and, a
    tenant, the route takes tenants; a key, the route takes keys. All of it before the query and body are checked: a
    caller the route refuses is told so (403), not that its body lacks a field (400) it could then never send."""
    if principal is None:
        return
    if principal.is_tenant and not route.tenants:
        raise Forbidden("Forbidden resource: not open to tenants")
    if principal.kind == "api_key" and not route.keys:
        # Whatever its scopes: a key lacking admin was told to get it, and then refused all the same.
        raise Forbidden(route.key_refusal)
    if not (principal.has(route.scope or "") or (route.own_scope and principal.has(route.own_scope))):
        raise refusal(principal, route.scope or "")
    if route.also_scope and not principal.has(route.also_scope):
        raise refusal(principal, route.also_scope)


def refusal(principal: Principal, scope: str) -> Forbidden:
    """The 403 of a caller without `scope`, saying what it lacks: an integrator's key is told the scope to ask for
    (its admin makes a key with it; code SCOPE_MISSING), an admin that the route is a super admin's."""
    if scope == "super":
        return Forbidden("Forbidden resource: super admins only")
    if principal.kind == "api_key":
        return Forbidden(f"Forbidden resource: this API key lacks the {scope} scope", code=SCOPE_MISSING)
    return Forbidden("Forbidden resource")


async def _names_earlier(route: Route, ctx: Ctx) -> bool:
    """Whether a request the limit refused names by its idempotency key a row an earlier request made (its
    route's `replay`): only such a request goes on to its handler past the limit, which then can only answer
    with that row (the key is unique) or refuse; any other is refused 429, as is one that would be refused
    for its caller's scope or its body (what a first check on it would say)."""
    if route.replay is None:
        return False
    try:
        return await route.replay(ctx)
    except DomainError:
        return False


_DATE_ONLY = re.compile(r"^\d{4}-\d{2}-\d{2}$")


async def _period(request: web.Request, held: Held, principal: Principal | None,
                  query: dict[str, Any]) -> None:
    """A `from`/`to` period, the same on every route that takes one (lists, reports, exports). A bare date
    (2025-10-01) is midnight in the cooperative's own time zone for a caller of one cooperative, as its receipts
    and reminders show dates: October of a Kigali cooperative runs from 1 October 00:00 to 1 November 00:00 in
    Kigali (22:00 UTC the day before); a super admin's too when the query names the cooperative (`cooperativeId`),
    UTC days across cooperatives. A date-time without an offset is UTC; with an offset, as given. An empty
    or reversed period is refused rather than answered with nothing."""
    start, end = query.get("from"), query.get("to")
    # Stripped as parse_query strips it: `2026-11-01 ` is the date it was read as, so a local day too.
    bare = [name for name in ("from", "to") if query.get(name) is not None
            and _DATE_ONLY.match(request.query.get(name, "").strip())]
    coop_id = (principal.cooperative_id or query.get("cooperativeId")) if principal is not None else None
    if bare and coop_id:
        coop = await held.session.get(Cooperative, coop_id)
        zone = zone_of(coop.timezone if coop else None)
        for name in bare:
            query[name] = _local_midnight(query[name], zone)
        start, end = query.get("from"), query.get("to")
    if start is not None and end is not None and start >= end:
        if len(bare) == 2 and start == end:
            # One day asked for as a person writes it (from and to the same date): `to` is the end, not in it.
            day = date.fromisoformat(request.query["from"].strip())
            if day < date.max:
                raise ValidationError(f"from must be before to: to is the day after the period (for {day} alone, "
                                      f"from={day}&to={day + timedelta(days=1)})", field="from")
        raise ValidationError("from must be before to", field="from")


def _local_midnight(day: datetime, zone: ZoneInfo) -> datetime:
    try:
        return datetime.combine(day.date(), time(), tzinfo=zone).astimezone(UTC)
    except OverflowError:
        return day  # 0001-01-01 or 9999-12-31 in a zone that moves it out of range: keep the UTC bound


async def _read_raw_body(request: web.Request, route: Route) -> bytes | None:
    """The request's JSON body, whole and size-checked (413), within BODY_READ_SECONDS (408); None when the
    route takes none and the request has none to check. Read before the session is opened: a request whose
    body trickles in holds no pooled connection while it does (a few such requests once held every one, and
    USSD, provider callbacks and /readyz waited behind them). A route with `raw_body` reads its own."""
    if route.body is None and not (
        route.raw_body is None and request.body_exists and request.method in ("POST", "PUT", "PATCH")
    ):
        return None
    try:
        async with asyncio.timeout(BODY_READ_SECONDS):
            return await read_body(request, route.body_limit)
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {BODY_READ_SECONDS:g} seconds; "
                            "nothing was changed, send it again") from None


def header_key(request: web.Request, body: Any) -> None:
    """The Idempotency-Key header put in the body as its `idempotencyKey` (on a route whose body takes one), checked
    first as the body's key would be: 8 to 128 characters. Both given: the same key, or 400 naming both (which one
    the client meant cannot be told); nothing is made either way."""
    key = request.headers.get(IDEMPOTENCY_KEY_HEADER)
    if key is None or not isinstance(body, dict):
        return
    if "idempotencyKey" in body:
        if body["idempotencyKey"] != key:
            raise ValidationError(f"the {IDEMPOTENCY_KEY_HEADER} header and idempotencyKey in the body differ: send "
                                  "the key in one of them, or the same key in both", field="idempotencyKey")
        return
    if not 8 <= len(key) <= 128:
        raise ValidationError(f"the {IDEMPOTENCY_KEY_HEADER} header must be 8 to 128 characters (the idempotency "
                              "key, as idempotencyKey in the body)", field="idempotencyKey")
    body["idempotencyKey"] = key


def _wrap(route: Route) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    fields = frozenset((route.body or {}).get("properties", {})) | frozenset(route.query)
    keyed = "idempotencyKey" in (route.body or {}).get("properties", {})

    async def endpoint(request: web.Request) -> web.StreamResponse:
        request[REQUEST_FIELDS] = fields  # what an error's `field` may name (admin_api.errors)
        rt = request.config_dict[RUNTIME]
        raw = await _read_raw_body(request, route)
        held = Held(rt.sessionmaker)  # its session made at the first use (a payment on a Core connection makes none)
        try:
            principal: Principal | None = None
            claims: dict[str, Any] | None = None
            if route.scope is not None:
                principal, claims = await authenticate(request, rt)
            # A revoked token is refused (401) before its scope is looked at (403).
            counted = await _limit_and_revocation(request, rt, route, principal, claims, held)
            # Refused by the limit, on a route that answers replays (else refused already): 429 unless it is one.
            refused = counted is not None and not counted.decision.allowed
            try:
                _let_in(principal, route)
                query = parse_query(request.query, route.query, route.elsewhere)
                if "from" in route.query and "to" in route.query:
                    await _period(request, held, principal, query)
                body: Any = None
                if route.body is not None:
                    body = parse_json(raw or b"", request)
                    if keyed:
                        header_key(request, body)
                    validate(body, route.body)
                elif raw is not None and raw.strip() and parse_json(raw, request) not in ({}, None):
                    raise ApiError(400, ["this endpoint takes no request body"])
                ctx = Ctx(rt=rt, held=held, principal=principal, body=body, query=query, request=request)
                if refused and not (counted is not None and await counted.replay_allowed()
                                    and await _names_earlier(route, ctx)):
                    raise ApiError(429, TOO_MANY)
                response = await route.handler(request, ctx)
            except (ApiError, DomainError) as exc:
                if refused and not (isinstance(exc, ApiError) and exc.status == 429):
                    # Past the limit, anything but the earlier answer (another request under the key: 409) is
                    # what the limit says; the handler's transaction is rolled back with the session.
                    raise ApiError(429, TOO_MANY) from None
                raise
            if held.made is not None and held.made.in_transaction():
                await held.made.commit()
            if counted is not None and route.replay is not None and response.headers.get(IDEMPOTENT_REPLAYED):
                request[RATE_DECISION] = await _not_counted(counted, route)
            return response
        finally:
            await held.close()

    endpoint.__name__ = route.name
    endpoint.__doc__ = route.summary
    return endpoint


async def _not_counted(counted: _Counted, route: Route) -> Decision:
    """The decision to answer a replay with: one counted is taken back (a replay consumes nothing of the limit);
    one answered past the limit is not refused (no Retry-After), its headers still saying none remain and when
    the next is allowed. Redis failing to take it back leaves it counted (logged): the answer stands."""
    if not counted.decision.allowed:
        return replace(counted.decision, allowed=True, retry_after=0)
    try:
        return await counted.uncount()
    except REDIS_DOWN as exc:
        log.warning("a replay's count could not be taken back (Redis unavailable); it stays counted",
                    extra={"route": route.name, "error": type(exc).__name__})
        return counted.decision


async def not_found(request: web.Request) -> web.StreamResponse:
    """Anything under /v1 that no route matches, answered in the API's error shape. A path some route has with
    another method is a 405 whose Allow lists every method of the path: each route is its own resource (its own
    name), so each one resolved gives its own method only (before: Allow named the first found, POST of GET, POST)."""
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource.canonical.endswith("{tail}"):
            continue
        match, methods = await resource.resolve(request)
        if match is None:
            allowed |= methods
    if allowed:
        raise web.HTTPMethodNotAllowed(request.method, allowed)
    raise web.HTTPNotFound()


def register(app: web.Application, routes: list[Route]) -> None:
    seen: set[tuple[str, str]] = set()
    for route in routes:
        key = (route.method, route.path)
        if key in seen:
            raise RuntimeError(f"route declared twice: {key}")
        seen.add(key)
        app.router.add_route(route.method, route.path, _wrap(route), name=route.name)
    app.router.add_route("*", "/{tail:.*}", not_found, name="not_found")


def rate_multiplier(settings_extra: Mapping[str, Any]) -> float:
    """RATE_LIMIT_MULTIPLIER (validated by load_settings) scales every limit; 0 turns limits off."""
    return float(settings_extra.get("rate_limit_multiplier", 1.0))
