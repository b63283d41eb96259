"""Who is calling: JWT access/refresh tokens, hashed API keys with scopes, and the one scoping rule."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import logging
import math
import unicodedata
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import OutOfMemoryError, RedisError, ResponseError
from sqlalchemy import ColumnElement, String, and_, bindparam, false, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, async_sessionmaker
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement

from core.audit import Actor, record
from core.config import Settings
from core.crypto import hash_api_key, hash_password, new_api_key, verify_password
from core.db import UNICODE_LOWER, insert_ignore, row_insert, serialise_on_sqlite, utcnow, wall
from core.errors import (
    NAME_TAKEN,
    TOKEN_EXPIRED,
    TOKEN_INVALID,
    Conflict,
    DomainError,
    Forbidden,
    NotFound,
    ValidationError,
)
from core.metrics import PREVIOUS_SECRET_USED, REDIS_EVICTED_KEYS, REDIS_EVICTING, REDIS_WRITES_REFUSED
from core.models import AdminUser, ApiKey, AuditEvent, Cooperative, Member, PaymentType, UsedRefreshToken
from core.ratelimit import subject_tag

log = logging.getLogger("gateway.auth")

ALGORITHM = "HS256"  # pinned: tokens naming any other algorithm (none, RS256...) are refused
ISSUER = "coop-gateway"
AUDIENCE = "coop-gateway-api"
REFRESH_TTL_SECONDS = 7 * 24 * 3600

SUPER_ADMIN, COOP_ADMIN, TENANT, API_KEY = "SUPER_ADMIN", "COOP_ADMIN", "TENANT", "API_KEY"
ROLES = (SUPER_ADMIN, COOP_ADMIN, TENANT)
SCOPES = ("payments:write", "payments:read", "admin")
# What a key's scope lets it read too: a key that creates payments may read the payments it made (OWN_PAYMENTS:
# GET /payments/{id} and its status, nothing else: not members, disputes, refunds or others' payments), and one
# that refunds and handles disputes sees the payments it acts on (as the roles' scopes already do).
OWN_PAYMENTS = "payments:own"
IMPLIED_SCOPES = {"payments:write": frozenset({OWN_PAYMENTS}), "admin": frozenset({"payments:read"})}


def with_implied(scopes: Iterable[str]) -> frozenset[str]:
    granted = frozenset(scopes)
    return granted.union(*(IMPLIED_SCOPES.get(s, frozenset()) for s in granted))


_ROLE_SCOPES = {
    SUPER_ADMIN: frozenset({*SCOPES, "super"}),
    COOP_ADMIN: frozenset(SCOPES),
    TENANT: frozenset({"payments:write", "payments:read"}),
}


@functools.cache
def _dummy_hash() -> str:
    """A password check that always runs, so an unknown username takes as long as a wrong password."""
    return hash_password("not-a-real-password")


class Unauthorized(DomainError):
    status = 401
    code = "UNAUTHORIZED"


class SignInRefused(Unauthorized):
    """A sign-in refused (the same answer for every failure: the message says nothing of why). `account`: the
    account the username names, when it names one (a wrong password, an account no longer usable), for the audit
    log's lockout row (admin_api.auth_routes); None for a username that names no account."""

    def __init__(self, account: AdminUser | None) -> None:
        super().__init__("invalid username or password")
        self.account = account


@dataclass(frozen=True)
class Principal:
    """An authenticated caller. `scope` is the only place rows are filtered by who may see them."""

    kind: str  # user | api_key
    id: str
    role: str  # SUPER_ADMIN | COOP_ADMIN | TENANT | API_KEY
    cooperative_id: str | None
    member_id: str | None = None
    scopes: frozenset[str] = field(default_factory=frozenset)

    @property
    def is_super(self) -> bool:
        return self.role == SUPER_ADMIN

    @property
    def is_tenant(self) -> bool:
        return self.role == TENANT

    @property
    def actor(self) -> Actor:
        """Who the audit log (and a payment's created_by, a dispute note's actor) names for this caller's acts.

        A tenant's login is the member herself, so her acts are hers, `member:<member id>`, as USSD writes
        them; the channel (api) tells them from her USSD acts. Named `admin:<user id>`, they were mixed with
        the staff's in the log read by actor, and missing from hers. Which of her logins acted is not written
        (the row has no place for it: the actor is the member, as on USSD, where no login acts at all)."""
        if self.kind == "api_key":
            return Actor(f"apikey:{self.id}", "api")
        if self.is_tenant:
            return Actor(f"member:{self.member_id}", "api")
        return Actor(f"admin:{self.id}", "api")

    @property
    def rate_key(self) -> str:
        return f"{self.kind}:{self.id}"

    def has(self, scope: str) -> bool:
        return scope in self.scopes

    def scope(self, query: Any, model: Any) -> Any:
        """Restrict a SELECT on `model` to the rows this caller may see."""
        if self.is_super:
            return query
        if model is Cooperative:
            return query.where(Cooperative.id == self.cooperative_id)
        coop_col = getattr(model, "cooperative_id", None)
        if coop_col is None:
            return query.where(false())
        query = query.where(coop_col == self.cooperative_id)
        if not self.is_tenant:
            return query
        # Tenants see their own member row and rows tied to it; payment types are shared reading.
        if model is Member:
            return query.where(Member.id == self.member_id)
        member_col = getattr(model, "member_id", None)
        if member_col is not None:
            return query.where(member_col == self.member_id)
        if model is PaymentType:
            return query
        return query.where(false())

    def target_cooperative(self, requested: str | None) -> str:
        """The cooperative a write goes to: the caller's own, or (super admin) the one named."""
        if self.is_super:
            if not requested:
                raise ValidationError("cooperativeId is required for a super admin", field="cooperativeId")
            return requested
        if requested and requested != self.cooperative_id:
            raise NotFound("cooperative not found")
        assert self.cooperative_id is not None
        return self.cooperative_id


@dataclass(frozen=True)
class TokenPair:
    access_token: str
    refresh_token: str
    expires_in: int
    role: str
    cooperative_id: str | None


# Hashed before the secret for its key id, so the id is no plain digest of the secret that might be met elsewhere.
_KID_LABEL = b"coop-gateway jwt key id\x00"


@functools.lru_cache(maxsize=16)
def key_id(secret: str) -> str:
    """The `kid` header of the tokens `secret` signs: 8 hex digits of SHA-256 over a fixed label and the secret, a
    short fingerprint that names the key (verification picks it directly, core.auth.decode_token) and tells
    nothing of it."""
    return hashlib.sha256(_KID_LABEL + secret.encode()).hexdigest()[:8]


@functools.lru_cache(maxsize=16)
def _keys_by_id(secret: str, previous: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """kid -> the configured secrets with that id, the current one first: one each, unless two secrets' 32-bit
    fingerprints collide, when both are tried (never more than the secrets configured)."""
    keys: dict[str, tuple[str, ...]] = {}
    for candidate in (secret, *previous):
        kid = key_id(candidate)
        keys[kid] = (*keys.get(kid, ()), candidate)
    return keys


def _encode(secret: str, claims: dict[str, Any]) -> str:
    return jwt.encode(claims, secret, algorithm=ALGORITHM, headers={"kid": key_id(secret)})


def issue_tokens(user: AdminUser, *, secret: str, ttl_seconds: int, issued_at: float | None = None) -> TokenPair:
    """`issued_at` (epoch seconds, default now; never later than now). `iat` is that instant to the microsecond
    (a JWT NumericDate may be non-integer), so a pair handed out right after the account's sessions were ended
    is told apart from one issued earlier in the same second (see check_not_revoked): it needs no future date,
    which would also let it outlive a reset or deactivation made before that date."""
    iat = wall() if issued_at is None else issued_at
    now = datetime.fromtimestamp(iat, UTC)
    base = {
        "sub": user.id,
        "role": user.role,
        "coop": user.cooperative_id,
        "mid": user.member_id,
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": iat,
    }
    access = _encode(
        secret,
        {**base, "typ": "access", "jti": uuid.uuid4().hex, "exp": now + timedelta(seconds=ttl_seconds)},
    )
    refresh = _encode(
        secret,
        {
            "sub": user.id,
            "iss": ISSUER,
            "aud": AUDIENCE,
            "iat": iat,
            "typ": "refresh",
            "jti": uuid.uuid4().hex,
            "exp": now + timedelta(seconds=REFRESH_TTL_SECONDS),
        },
    )
    return TokenPair(access, refresh, ttl_seconds, user.role, user.cooperative_id)


# Verified access tokens, so a client sending the same token on every call pays the HMAC and claim
# checks once per token life: (token, secret, previous secrets) -> (claims, exp, signed with a previous secret).
# Only successful checks are kept; expiry is still checked on every hit, with the same leeway.
_VERIFIED: dict[tuple[str, str, tuple[str, ...]], tuple[dict[str, Any], float, bool]] = {}
_VERIFIED_MAX = 4096
LEEWAY = 5


def decode_token(token: str, *, secret: str, expected_type: str, previous: tuple[str, ...] = ()) -> dict[str, Any]:
    """Verify signature, algorithm, issuer, audience, expiry and token type; 401 on any failure.

    Tokens are signed with `secret` (JWT_SECRET); one signed with a `previous` secret (JWT_PREVIOUS_SECRETS, the
    overlap of a rotation) verifies as well, and is counted each time it is used (previous_secret_used)."""
    if not token.isascii():  # (a JWT is ASCII; a header's bytes that are not UTF-8 come as lone surrogates)
        raise Unauthorized("invalid token", code=TOKEN_INVALID)
    cache_key = (token, secret, previous)
    if expected_type == "access":
        hit = _VERIFIED.get(cache_key)
        if hit is not None:
            claims, exp, old_key = hit
            if wall() > exp + LEEWAY:
                _VERIFIED.pop(cache_key, None)
                raise Unauthorized("token has expired", code=TOKEN_EXPIRED)
            if old_key:
                previous_secret_used("jwt")
            return dict(claims)
    claims, signed_with = _decode(token, secret=secret, previous=previous, expected_type=expected_type)
    old_key = signed_with != secret
    if old_key:
        previous_secret_used("jwt")
    if expected_type == "access":
        if len(_VERIFIED) >= _VERIFIED_MAX:
            _VERIFIED.pop(next(iter(_VERIFIED)))  # the oldest entry
        _VERIFIED[cache_key] = (dict(claims), float(claims["exp"]), old_key)
    return claims


def _candidate_secrets(token: str, secret: str, previous: tuple[str, ...]) -> tuple[str, ...]:
    """The secrets a token may have been signed with: the one its `kid` header names. A token with no kid was
    issued before this release wrote them: it is tried against the current secret, then each previous one. A kid
    that names no configured secret (a removed one, a forgery) gets none: the token is refused as any bad token
    is, with nothing said of which keys exist."""
    try:
        kid = jwt.get_unverified_header(token).get("kid")
    except jwt.InvalidTokenError:
        raise Unauthorized("invalid token", code=TOKEN_INVALID) from None
    if kid is None:
        return (secret, *previous)
    return _keys_by_id(secret, previous).get(kid, ()) if isinstance(kid, str) else ()


def _verified_claims(token: str, secret: str, previous: tuple[str, ...]) -> tuple[dict[str, Any], str]:
    """The token's claims and the secret that signed it, checked with that secret: signature, algorithm (pinned),
    issuer, audience and the required claims. A wrong signature moves on to the next candidate (only a token
    with no kid, or a colliding kid, has more than one); any other fault refuses the token at once."""
    for candidate in _candidate_secrets(token, secret, previous):
        try:
            claims = jwt.decode(
                token,
                candidate,
                algorithms=[ALGORITHM],
                audience=AUDIENCE,
                issuer=ISSUER,
                # The times are checked by _decode on the clock they were issued by (core.db.wall: PostgreSQL's,
                # the same on every host), not by PyJWT on this host's: a host whose clock runs behind would refuse
                # every token as issued in the future, one ahead would cut their lives short.
                options={"require": ["exp", "iat", "sub", "typ", "jti"], "verify_exp": False, "verify_iat": False},
                leeway=LEEWAY,
            )
        except jwt.InvalidSignatureError:
            continue
        except jwt.InvalidTokenError:
            break
        return claims, candidate
    raise Unauthorized("invalid token", code=TOKEN_INVALID)


def _decode(token: str, *, secret: str, previous: tuple[str, ...],
            expected_type: str) -> tuple[dict[str, Any], str]:
    """The token's claims, every check passed, and the secret that signed it."""
    claims, signed_with = _verified_claims(token, secret, previous)
    now = wall()
    try:
        expires, issued = float(claims["exp"]), float(claims["iat"])
    except (TypeError, ValueError):
        raise Unauthorized("invalid token", code=TOKEN_INVALID) from None
    if now > expires + LEEWAY:
        raise Unauthorized("token has expired", code=TOKEN_EXPIRED)
    if issued > now + LEEWAY:
        raise Unauthorized("invalid token", code=TOKEN_INVALID)
    if claims.get("typ") != expected_type:
        raise Unauthorized("invalid token", code=TOKEN_INVALID)
    return claims, signed_with


# The names whose previous secret this process has seen used, each logged once (previous_secret_used).
_PREVIOUS_LOGGED: set[str] = set()


def previous_secret_used(name: str, variable: str | None = None) -> None:
    """Count a token (name "jwt") or a callback (its name) accepted with a rotated-out secret, and say so at INFO
    the first time in this process for the name: an operator removes the previous secret once the counter
    (gateway_previous_secret_used_total) stops growing. Once, not per request: a busy overlap would flood the log.
    `variable`: the list it came from, when not the name's JWT_PREVIOUS_SECRETS or CALLBACK_SECRET_<NAME>_PREVIOUS (a
    provider's signing key: name "airtel_callback_key", variable AIRTEL_CALLBACK_KEY_PREVIOUS)."""
    PREVIOUS_SECRET_USED.labels(name=name).inc()
    if name in _PREVIOUS_LOGGED:
        return
    _PREVIOUS_LOGGED.add(name)
    if variable is None:
        variable = "JWT_PREVIOUS_SECRETS" if name == "jwt" else f"CALLBACK_SECRET_{name.upper()}_PREVIOUS"
    log.info("a previous secret was used; remove it once gateway_previous_secret_used_total stops growing",
             extra={"secret_for": name, "variable": variable})


def callback_secret_ok(settings: Settings, name: str, given: str) -> bool:
    """Whether a callback's URL secret (`given`) is one `name` accepts: its CALLBACK_SECRET_<NAME>, or one of the
    CALLBACK_SECRET_<NAME>_PREVIOUS it replaced (a payment requested before a rotation calls back with the URL it
    was given then). Each is compared in constant time, every one of them whatever matched, so the time taken
    tells nothing of which did. No current secret configured: nothing to check (True), as before."""
    current = settings.callback_secrets.get(name)
    if not current:
        return True
    sent = given.encode()
    previous = settings.callback_previous_secrets.get(name, ())
    matches = [hmac.compare_digest(sent, secret.get().encode()) for secret in (current, *previous)]
    if matches[0]:
        return True
    if any(matches):
        previous_secret_used(name)
        return True
    return False


def principal_from_access(claims: dict[str, Any]) -> Principal:
    role = claims.get("role")
    if role not in ROLES:
        raise Unauthorized("invalid token", code=TOKEN_INVALID)
    if role != SUPER_ADMIN and not claims.get("coop"):
        raise Unauthorized("invalid token", code=TOKEN_INVALID)
    if role == TENANT and not claims.get("mid"):
        raise Unauthorized("invalid token", code=TOKEN_INVALID)
    return Principal(
        "user", str(claims["sub"]), role, claims.get("coop"), claims.get("mid"), _ROLE_SCOPES[role]
    )


def revoked_key(user_id: str) -> str:
    """Tagged like the user's rate limits (`rl:{user:ID}:…`), so one Redis command reads both."""
    return f"auth:{subject_tag(f'user:{user_id}')}:revoked"


async def revoke_tokens(redis: Redis, user_id: str, *, ttl_seconds: int, now: float | None = None) -> None:
    """Every access token of this user issued up to now stops working at once (tokens are otherwise
    stateless until they expire). The mark outlives the longest token; refresh tokens check the row."""
    await redis.set(revoked_key(user_id), _stamp(wall() if now is None else now),
                    ex=_mark_lifetime(ttl_seconds))


def _stamp(instant: float) -> bytes:
    """A mark's value: the instant to the microsecond, always with a point (`repr` of a float), which tells it
    from a mark of whole seconds written by earlier code (see revoked_at)."""
    return repr(float(instant)).encode()


def revoked_at(stamp: bytes | str) -> float:
    """The instant a mark ended the account's sessions: a token issued at or before it is refused. A mark of
    whole seconds (no point: written before marks had microseconds) covers its whole second, as it did then:
    the revocation may have been late in it."""
    text = stamp.decode() if isinstance(stamp, bytes) else stamp
    if "." in text:
        return float(text)
    return math.nextafter(int(text) + 1, -math.inf)


def issued_by(claims: dict[str, Any], instant: float) -> bool:
    """Was the token issued at or before `instant` (epoch seconds)? Tokens carry their `iat` to the microsecond;
    one of earlier code has whole seconds, the start of the second it was issued in, so it is refused for any
    instant in that second: it may have come before (safe side; its owner signs in again)."""
    return float(claims["iat"]) <= instant


# The audit actions after which an account's earlier tokens are refused: its access tokens by the revocation
# mark (written from these rows again when Redis loses it), its refresh tokens on these rows at each refresh
# (they outlive the mark, and a deactivated account may be turned on again).
SESSIONS_ENDED = ("user.deactivated", "user.password_reset", "user.password_changed", "user.sessions_ended")

# Set by each guard cycle once every mark is in Redis. No longer what the guard goes by (it checks the marks
# themselves, every cycle: a replica promoted after missing the last writes has the marker but not the newest
# marks); kept for restore_revocations and as a sign, for an operator, that the guard runs.
MARKS_RESTORED = "auth:revocations-restored"
RESTORE_CHECK_SECONDS = 5.0


def _mark_lifetime(ttl_seconds: int) -> int:
    return ttl_seconds + LEEWAY + 60


@dataclass(frozen=True)
class Marks:
    """One check of the revocation marks: how many accounts need one now, how many were written (missing, or
    older than the account's last end of sessions)."""

    accounts: int
    written: int


async def restore_revocations(redis: Redis, sessionmaker: async_sessionmaker[AsyncSession], *, ttl_seconds: int,
                              now: float | None = None, force: bool = False) -> int | None:
    """Put back the revocation marks Redis lost, when its marker key is gone (`force`: whatever it says). None
    when it is there; otherwise how many accounts need a mark (see ensure_revocations, which the guard runs every
    cycle without looking at the marker)."""
    if not force and await redis.exists(MARKS_RESTORED):
        return None
    return (await ensure_revocations(redis, sessionmaker, ttl_seconds=ttl_seconds, now=now)).accounts


async def ensure_revocations(redis: Redis, sessionmaker: async_sessionmaker[AsyncSession], *, ttl_seconds: int,
                             now: float | None = None) -> Marks:
    """Check that Redis holds every revocation mark the database says it should, and write those it lacks: one per
    account deactivated or given a new password within a token's lifetime, from the audit log (the system of
    record), stamped with that change's time; one per account of a cooperative or member suspended meanwhile.

    The marks themselves are read (one pipelined GET), not a marker key: a Redis that failed over to a replica
    which missed the last writes, or a Cluster shard that lost its data, keeps the marker (or the shard holding
    it) and lacks the newest marks. The cost is two indexed reads of a token's lifetime of rows (~16 minutes of
    deactivations, new passwords and suspensions: a handful) and one Redis round trip, twice when a mark is
    missing.

    A mark already there is kept (written NX), unless it is older than the audit row (a mark of an earlier end of
    sessions, the newer one lost): then it is set to the audit row's instant. Should a change's own mark land
    between the read and that write, the write puts back an older instant; the next cycle reads that change's
    audit row and sets its instant again. A suspended account's mark is stamped now, and only when missing: its
    tokens are refused on the rows anyway (sign-in, refresh), and re-stamping it every cycle would refuse a token
    issued just after the cooperative or member was made active again."""
    current = wall() if now is None else now
    lifetime = _mark_lifetime(ttl_seconds)
    since = datetime.fromtimestamp(current - lifetime, UTC)
    async with sessionmaker() as session:
        rows = (await session.execute(
            select(AuditEvent.entity_id, func.max(AuditEvent.at))
            .where(AuditEvent.action.in_(SESSIONS_ENDED), AuditEvent.entity_type == "user", AuditEvent.at >= since)
            .group_by(AuditEvent.entity_id))).all()
        # Accounts of a cooperative suspended, or of a member suspended, within a token's lifetime (and still
        # so): no token of theirs can be valid now, so the mark is stamped now.
        held = list((await session.execute(
            select(AdminUser.id)
            .outerjoin(Cooperative, Cooperative.id == AdminUser.cooperative_id)
            .outerjoin(Member, Member.id == AdminUser.member_id)
            .where(or_(and_(Cooperative.status != "ACTIVE", Cooperative.updated_at >= since),
                       and_(Member.status == "SUSPENDED", Member.updated_at >= since))))).scalars())
    # The audit row's instant: written just before the mark was, in the same request, and before any token the
    # change handed out (POST /auth/password's new pair), which therefore keeps working.
    ended = {user_id: at.timestamp() for user_id, at in rows if at.timestamp() + lifetime - current >= 1}
    accounts = list(ended) + [user_id for user_id in held if user_id not in ended]
    async with redis.pipeline(transaction=False) as pipe:
        for user_id in accounts:
            pipe.get(revoked_key(user_id))
        marks = await pipe.execute() if accounts else []
    writes: list[tuple[str, float, int, bool]] = []  # (account, instant, seconds to live, only if missing)
    for user_id, mark in zip(accounts, marks, strict=True):
        instant = ended.get(user_id)
        if instant is not None:
            if mark is None or _older(mark, instant):
                writes.append((user_id, instant, int(instant + lifetime - current), mark is None))
        elif mark is None:
            writes.append((user_id, current, lifetime, True))
    async with redis.pipeline(transaction=False) as pipe:
        for user_id, instant, remaining, nx in writes:
            pipe.set(revoked_key(user_id), _stamp(instant), ex=remaining, nx=nx)
        pipe.set(MARKS_RESTORED, b"1")
        done = await pipe.execute()
    return Marks(len(accounts), sum(1 for result in done[:-1] if result))


def _older(mark: bytes, instant: float) -> bool:
    """Does the mark end the account's sessions before `instant` (or is it unreadable: set anew)?"""
    try:
        return revoked_at(mark) < instant
    except (UnicodeDecodeError, ValueError):
        return True


async def _masters(redis: RedisCluster) -> list[Any]:
    if not redis.get_primaries():
        await redis.initialize()  # the client learns the nodes at its first command
    return list(redis.get_primaries())


async def _each(redis: Redis, command: Any) -> list[Any]:
    """`command(**target)` once for one server; on a Redis Cluster once for each master (target_nodes), whose
    client would otherwise ask one node (its default) for the whole cluster: a full or evicting node among the
    others would go unseen."""
    if not isinstance(redis, RedisCluster):
        return [await command()]
    return [await command(target_nodes=node) for node in await _masters(redis)]


async def eviction_policy(redis: Redis) -> str | None:
    """The policy under which this Redis evicts keys when its memory is full, or None when it never does
    (`noeviction`, or no memory limit) or will not say. Read with CONFIG, else (some managed services disable it)
    from INFO memory, which says the same. A cluster evicts if any of its masters does."""
    try:
        configs = await _each(redis, lambda **target: redis.config_get("maxmemory*", **target))
    except ResponseError:
        try:
            memories = await _each(redis, lambda **target: redis.info("memory", **target))
        except ResponseError:
            return None
        configs = [{"maxmemory": memory.get("maxmemory", 0),
                    "maxmemory-policy": memory.get("maxmemory_policy", "noeviction")} for memory in memories]
    for config in configs:
        policy = str(config.get("maxmemory-policy", "noeviction"))
        limited = str(config.get("maxmemory", "0")).strip() not in ("", "0")
        if limited and policy != "noeviction":
            return policy
    return None


async def evicted_keys(redis: Redis) -> int | None:
    """How many keys Redis has evicted since it started (INFO stats; a cluster's masters together), or None when
    it will not say."""
    try:
        return sum(int(stats["evicted_keys"])
                   for stats in await _each(redis, lambda **target: redis.info("stats", **target)))
    except (ResponseError, KeyError, TypeError, ValueError):
        return None


async def server_run_id(redis: Redis) -> str | None:
    """The id Redis draws at each start (INFO server run_id): another one is another server (restarted, or a replica
    a failover promoted), whose configuration may differ. A cluster's: its masters' ids, one changes with any of
    them. None when it will not say."""
    try:
        servers = await _each(redis, lambda **target: redis.info("server", **target))
    except ResponseError:
        return None
    run_ids = [server.get("run_id") for server in servers]
    return None if None in run_ids else ",".join(sorted(str(run_id) for run_id in run_ids))


# Written (one byte, a minute's life) to learn whether Redis takes writes: see redis_memory.
WRITE_PROBE = "health:write-probe"


async def _write_probes(redis: Redis) -> list[str]:
    """WRITE_PROBE, or on a cluster one probe key per master (WRITE_PROBE tagged with one of its slots): a full
    master refuses the writes of its own slots only."""
    if not isinstance(redis, RedisCluster):
        return [WRITE_PROBE]
    masters = {node.name for node in await _masters(redis)}
    probes: dict[str, str] = {}
    # Tags until every master has one (CRC16 spreads them: a master holding 1% of the slots is missed by 2,000 tags
    # once in 10^8); bounded, so that a master holding no slots (mid-reshard), with no writes to refuse, does not
    # keep every check hashing tags on the event loop.
    for tag in range(2_000):
        if len(probes) == len(masters):
            break
        key = f"{WRITE_PROBE}:{{{tag}}}"
        probes.setdefault(redis.get_node_from_key(key).name, key)
    return list(probes.values())


@dataclass(frozen=True)
class RedisMemory:
    """How Redis copes with a full memory: the policy under which it evicts keys (None: it does not, or will not
    say), and whether it refused a write for want of memory (OOM: full under noeviction, or past what evicting
    frees)."""

    policy: str | None
    writes_refused: bool

    def problem(self) -> str | None:
        """What is wrong, in a few words (what /readyz says of Redis after "degraded: "); None when nothing is."""
        if self.writes_refused:
            return "out of memory, writes refused"
        if self.policy is not None:
            return f"evicts keys (maxmemory-policy {self.policy})"
        return None


async def redis_memory(redis: Redis) -> RedisMemory:
    """Try a write and read the eviction policy, and set gateway_redis_writes_refused and gateway_redis_evicting
    from them (NaN when Redis cannot be asked: the error is raised). A PING tells neither: a Redis that refuses
    every write, or evicts USSD sessions mid-menu, still answers it."""
    try:
        refused = False
        for probe in await _write_probes(redis):
            try:
                await redis.set(probe, b"1", ex=60)
            except OutOfMemoryError:
                refused = True
        policy = await eviction_policy(redis)
    except Exception:
        REDIS_WRITES_REFUSED.set(math.nan)
        REDIS_EVICTING.set(math.nan)
        raise
    REDIS_WRITES_REFUSED.set(1 if refused else 0)
    REDIS_EVICTING.set(0 if policy is None else 1)
    return RedisMemory(policy, refused)


class RedisWatch:
    """What a process last found of Redis's memory, looked at every cycle (guard_revocations in each serve,
    watch_redis in each worker): each change is logged once, not every cycle, and evictions are counted
    (gateway_redis_evicted_keys_total). Read every cycle, not once at start: a failover to a replica configured
    otherwise, or a CONFIG SET while serving, changes it under a running process. A Redis with another run_id is
    another server: an evicting policy is reported again for it, the same one too."""

    def __init__(self) -> None:
        self.said: tuple[str | None, str | None] | None = None  # (run_id, policy) last reported
        self.writes_refused = False
        self.counted: tuple[str | None, int] | None = None  # (run_id, INFO's eviction count) at the last look

    async def check(self, redis: Redis) -> int | None:
        """Look at Redis's memory now (four small commands); returns INFO's count of evicted keys (None: it will
        not say). Raises when Redis cannot be asked."""
        memory = await redis_memory(redis)  # first: Redis out of reach sets its gauges to NaN
        run_id = await server_run_id(redis)
        evicted = await evicted_keys(redis)
        self._report_policy(run_id, memory.policy)
        self._report_writes(memory.writes_refused)
        self._count(run_id, evicted)
        return evicted

    def _report_policy(self, run_id: str | None, policy: str | None) -> None:
        if self.said == (run_id, policy):
            return
        evicted_before = self.said is not None and self.said[1] is not None
        self.said = (run_id, policy)
        if policy is not None:
            log.error("Redis evicts keys when its memory is full: USSD sessions, rate-limit counts and token "
                      "revocation marks can vanish; run it with maxmemory-policy noeviction",
                      extra={"policy": policy, "redis_run_id": run_id})
        elif evicted_before:
            log.info("Redis no longer evicts keys", extra={"redis_run_id": run_id})

    def _report_writes(self, refused: bool) -> None:
        if refused == self.writes_refused:
            return
        self.writes_refused = refused
        if refused:
            log.error("Redis refuses writes: its memory is full (maxmemory) and its policy frees none; every USSD "
                      "hop answers \"service unavailable\" until memory is freed or the limit raised")
        else:
            log.info("Redis takes writes again")

    def _count(self, run_id: str | None, evicted: int | None) -> None:
        """Add the keys evicted since the last look. The first look, another server's or a lower count (Redis
        restarted) only set where counting starts: what it counted before may predate this process."""
        if evicted is None:
            return
        last, self.counted = self.counted, (run_id, evicted)
        if last is not None and last[0] == run_id and evicted > last[1]:
            REDIS_EVICTED_KEYS.inc(evicted - last[1])


async def guard_revocations(redis: Redis, sessionmaker: async_sessionmaker[AsyncSession], *, ttl_seconds: int,
                            every: float = RESTORE_CHECK_SECONDS, stop: asyncio.Event | None = None) -> None:
    """Run for the life of a `serve` process: every few seconds (`every`), check the revocation marks against the
    database and write back those Redis lost (ensure_revocations), so a deactivated account's tokens stop working
    again within seconds instead of at their expiry.

    Every cycle, whatever the marker key says: Redis may lose marks and keep the marker in several ways. It lost
    its data (restarted without persistence, flushed): the marker is gone too. It failed over to a replica that
    missed the last writes (replication is asynchronous): the marker, written long ago, is there, the mark written
    a moment before is not. A Redis Cluster shard lost its data: the marker lives on another shard. Redis evicted
    keys to stay under its memory limit (`volatile-*` policies take the marks, which expire, and leave the marker,
    which does not): INFO's eviction count is watched too, to say so in the log.

    Each cycle also looks at Redis's memory (RedisWatch: an evicting policy, writes refused for want of memory,
    evictions; logged once per change, exported as metrics). While Redis refuses writes, no mark can be written
    back: the cycle stops there (said once, by the watch) instead of failing every 5 s.

    Ends once `stop` is set: at once while waiting for the next check, else after the check under way. A
    cancel alone is not enough: one that lands as redis-py finishes sending a command is lost (Python 3.11's
    asyncio.wait_for returns the finished send instead of raising), and the loop would go on for good."""
    stop = stop if stop is not None else asyncio.Event()  # none given: until cancelled (tests)
    watch = RedisWatch()
    seen = 0  # evictions before this process started may have taken marks as well
    failing = False  # said once per outage (as a worker's watch_redis does), not every 5 s for as long as it lasts
    while not stop.is_set():
        try:
            evicted = await watch.check(redis)
            if not watch.writes_refused:
                newly = 0 if evicted is None else evicted - seen
                marks = await ensure_revocations(redis, sessionmaker, ttl_seconds=ttl_seconds)
                if newly > 0 and marks.written:
                    log.warning("Redis evicted keys; token revocation marks re-written from the audit log",
                                extra={"evicted": newly, "accounts": marks.written})
                elif marks.written:  # a Redis that lost its data, failed over, or a shard that did
                    log.warning("token revocation marks were missing in Redis; restored from the audit log",
                                extra={"accounts": marks.written})
                if evicted is not None:
                    seen = evicted  # (lower after a Redis restart: the marks are checked every cycle anyway)
            if failing:
                log.info("checking the token revocation marks works again")
            failing = False
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # Redis or the database down: the request path falls back to the row
            if not failing:
                log.warning("could not check the token revocation marks (said once until it works again)",
                            extra={"error": type(exc).__name__})
            failing = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(every):
                await stop.wait()


async def watch_redis(redis: Redis, *, stop: asyncio.Event, every: float = RESTORE_CHECK_SECONDS) -> None:
    """A worker's look at Redis's memory every `every` seconds until `stop` (RedisWatch; each serve's
    guard_revocations does the same every cycle). A worker needs Redis too (every SMS's send rate and lock): an
    evicting or full Redis is reported from its logs and /metrics as well. Redis out of reach is said once, until
    it answers again (its gateway_redis_up reads 0 meanwhile)."""
    watch = RedisWatch()
    reachable = True
    while not stop.is_set():
        try:
            await watch.check(redis)
        except Exception as exc:
            if reachable:
                log.warning("could not look at Redis's memory", extra={"error": type(exc).__name__})
            reachable = False
        else:
            reachable = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(every):
                await stop.wait()


def check_not_revoked(claims: dict[str, Any], stamp: bytes | str | None) -> None:
    """`stamp` is the user's revocation mark (None: none). A token issued at or before its instant is revoked;
    one issued after it (a new sign-in, the pair POST /auth/password hands out) works."""
    if stamp is not None and issued_by(claims, revoked_at(stamp)):
        raise Unauthorized("token has been revoked", code=TOKEN_INVALID)


# An account signs in and keeps working only while it is active, its cooperative is ACTIVE (a suspended
# cooperative's API keys are refused too) and, for a tenant login, its member is not suspended.
_USABLE = (
    select(AdminUser.id)
    .outerjoin(Cooperative, Cooperative.id == AdminUser.cooperative_id)
    .outerjoin(Member, Member.id == AdminUser.member_id)
    .where(AdminUser.id == bindparam("user_id"), AdminUser.is_active.is_(True),
           or_(AdminUser.cooperative_id.is_(None), Cooperative.status == "ACTIVE"),
           or_(AdminUser.member_id.is_(None), Member.status != "SUSPENDED"))
)


# The same, with when the account's sessions were last ended (SESSIONS_ENDED: deactivated, password set), in
# one query on the audit log's (entity_type, entity_id) index: what a revocation mark says, read from the rows.
_USABLE_SINCE = _USABLE.add_columns(
    select(func.max(AuditEvent.at))
    .where(AuditEvent.entity_type == "user", AuditEvent.entity_id == AdminUser.id,
           AuditEvent.action.in_(SESSIONS_ENDED))
    .correlate(AdminUser).scalar_subquery().label("ended"))


async def usable(session: AsyncSession, user_id: str) -> bool:
    return (await session.execute(_USABLE, {"user_id": user_id})).first() is not None


async def check_still_active(session: AsyncSession, user_id: str, claims: dict[str, Any] | None = None) -> None:
    """The revocation check when Redis cannot answer (one query): the account, its cooperative and member and,
    given the token's `claims`, the end of its sessions the mark would hold: a token issued at or before the
    account's last deactivation or new password is refused, also once the account is active again."""
    if claims is None:
        if not await usable(session, user_id):
            raise Unauthorized("token has been revoked", code=TOKEN_INVALID)
        return
    row = (await session.execute(_USABLE_SINCE, {"user_id": user_id})).first()
    if row is None or _ended_since(row, claims):
        raise Unauthorized("token has been revoked", code=TOKEN_INVALID)


def _ended_since(row: Any, claims: dict[str, Any]) -> bool:
    """Were the account's sessions ended (a _USABLE_SINCE row) at or after the token was issued?"""
    return row.ended is not None and issued_by(claims, row.ended.timestamp())


async def check_token(redis: Redis, session: AsyncSession, principal: Principal, claims: dict[str, Any]) -> None:
    """A user token's revocation check on its own (the API reads the mark with its rate limit instead):
    the mark in Redis, or the account's rows when Redis cannot answer."""
    try:
        stamp = await redis.get(revoked_key(principal.id))
    except (RedisError, OSError, TimeoutError) as exc:
        log.warning("token revocation unavailable in Redis; account checked in the database",
                    extra={"error": type(exc).__name__})
        await check_still_active(session, principal.id, claims)
        return
    check_not_revoked(claims, stamp)


async def record_sessions_ended(session: AsyncSession, *, actor: Actor, because: str,
                                cooperative_id: str | None = None, member_id: str | None = None) -> None:
    """A `user.sessions_ended` audit row for each account of the cooperative (or the member's tenant logins),
    in the transaction that suspends it: what refuses their earlier refresh tokens (and, without Redis, access
    tokens) on the rows also once the cooperative or member is made active again, as for a deactivated account
    (SESSIONS_ENDED). The row names only why (`because`); tokens issued after it (a sign-in once active again)
    work.

    The accounts are held for the change first (FOR NO KEY UPDATE, as hold_account_for_change holds one), and
    the rows dated once they are: a sign-in or refresh that holds an account (hold_account) finishes first and
    its pair is dated before these rows; one that comes later waits for the commit and finds the account no
    longer usable. Unheld, a sign-in that read the cooperative ACTIVE while the suspension was written but not
    committed got a pair dated after these rows, whose refresh token worked again once it was ACTIVE again."""
    users = select(AdminUser.id, AdminUser.cooperative_id)
    users = users.where(AdminUser.member_id == member_id) if member_id else users.where(
        AdminUser.cooperative_id == cooperative_id)
    # (SQLite: the suspension's own write, made before, holds the database's write lock already.)
    rows = (await session.execute(users.order_by(AdminUser.id).with_for_update(key_share=True))).all()
    if not rows:
        return
    at = utcnow()
    await session.execute(row_insert(session.get_bind().dialect.name, AuditEvent), [
        {"cooperative_id": coop_id, "actor": actor.id, "channel": actor.channel, "action": "user.sessions_ended",
         "entity_type": "user", "entity_id": user_id, "before": None, "after": {"because": because}, "at": at}
        for user_id, coop_id in rows])


async def revoke_cooperative_tokens(session: AsyncSession, redis: Redis, cooperative_id: str, *,
                                    ttl_seconds: int) -> int:
    """Every access token of the cooperative's accounts (admins and tenant logins) stops working now; how many
    accounts. Their refresh tokens and new sign-ins are refused on the rows while the cooperative is not ACTIVE."""
    users = list((await session.execute(
        select(AdminUser.id).where(AdminUser.cooperative_id == cooperative_id))).scalars())
    await _mark_all(redis, users, ttl_seconds=ttl_seconds)
    return len(users)


async def revoke_member_tokens(session: AsyncSession, redis: Redis, member_id: str, *, ttl_seconds: int) -> int:
    """The same for the tenant logins of one member (suspended)."""
    users = list((await session.execute(select(AdminUser.id).where(AdminUser.member_id == member_id))).scalars())
    await _mark_all(redis, users, ttl_seconds=ttl_seconds)
    return len(users)


async def _mark_all(redis: Redis, user_ids: list[str], *, ttl_seconds: int) -> None:
    if not user_ids:
        return
    stamp = _stamp(wall())
    async with redis.pipeline(transaction=False) as pipe:
        for user_id in user_ids:
            pipe.set(revoked_key(user_id), stamp, ex=_mark_lifetime(ttl_seconds))
        await pipe.execute()


class _FoldedName(FunctionElement[str]):
    """A username folded to lower case: PostgreSQL's lower(), as its unique index on lower(username) (migration 0017)
    folds it, which is then used; SQLite's UNICODE_LOWER (Python's lower()), whose own lower() folds A-Z only: the
    stored "ÉRIC" stayed "Éric", and typed "éric" did not find it (the typed name only was lowered by Python)."""

    type = String()
    name = "folded_name"
    inherit_cache = True


@compiles(_FoldedName)
def _folded_name(element: _FoldedName, compiler: Any, **kw: Any) -> str:
    return f"lower({compiler.process(element.clauses, **kw)})"


@compiles(_FoldedName, "sqlite")
def _folded_name_sqlite(element: _FoldedName, compiler: Any, **kw: Any) -> str:
    return f"{UNICODE_LOWER}({compiler.process(element.clauses, **kw)})"


def folded(value: Any) -> ColumnElement[str]:
    """`value` (a column, or a str as a bound value) lower-cased as a username is (_FoldedName): every letter on
    SQLite, whose lower() folds A-Z only. Another name unique whatever its case (a payment type's) compares so."""
    return _FoldedName(value)


def username_is(username: str) -> ColumnElement[bool]:
    """Where an account's username is `username`, as it is signed in with: surrounding spaces dropped (as they are when
    an account is made) and whatever the case of either (a phone keyboard capitalises an e-mail address, an
    invitation may not). The unique index on lower(username) (migration 0017) holds one account per such name;
    the name is stored, and shown, as it was typed (its accented letters composed: core.users.check_username), and
    found typed either way ("José" with é as one character, or as e and a combining accent: a phone's keyboard and a
    desktop's differ), an account of a release before that by the form it was stored in too. Where the index folds A-Z
    only (SQLite; PostgreSQL under a plain C LC_CTYPE) two accounts may differ only in the case of other letters
    ("ÉRIC", "éric", made before this check): both match, and sign-in takes the one spelled as typed (login)."""
    typed = username.strip()
    names = dict.fromkeys((unicodedata.normalize("NFC", typed), typed))
    # Lowered by Python too: a PostgreSQL database whose LC_CTYPE is plain C folds A-Z only, as SQLite's lower() does.
    return or_(*(_FoldedName(AdminUser.username) == folded
                 for name in names for folded in (_FoldedName(name), name.lower())))


async def login(session: AsyncSession, username: str, password: str) -> tuple[AdminUser, float]:
    """Check a username and password with the slow KDF; the same answer for every failure. With the account,
    the instant the pair is to be dated: once the account is held (hold_account), after the KDF.

    A new password or a deactivation holds the account's row from before it is written until it is committed
    (hold_account_for_change). A sign-in that read the account meanwhile saw the old password (or the account
    still on) and, dated at that read, got a pair dated after the change's audit row: the mark after the commit
    ended its access token, but its refresh token, judged on the audit row alone, outlived the change. So the
    account is held once the password checks out, which waits for such a change to commit, and read again: a
    password changed since the read (the password checked is no longer the account's) or an account no longer
    usable is refused as a wrong password is; otherwise the pair is dated after the hold, and a change from
    then on waits for this transaction and is dated after it (see admin_api.routing.end_sessions)."""
    exact = AdminUser.username == unicodedata.normalize("NFC", username.strip())
    query = select(AdminUser).where(username_is(username)).order_by(exact.desc(), AdminUser.created_at).limit(1)
    user = (await session.execute(query)).scalar_one_or_none()
    # scrypt takes tens of milliseconds of CPU: keep it off the event loop.
    stored = user.password_hash if user else None
    ok = await asyncio.to_thread(lambda: verify_password(password, stored or _dummy_hash()))
    if user is None or not ok or not user.is_active:
        raise SignInRefused(user)
    held = await hold_account(session, user.id)
    if held is None or held.password_hash != stored or not held.is_active or not await usable(session, held.id):
        raise SignInRefused(user)
    read_at = wall()
    # Who signed in and when, for the cooperative's auditor: one insert in this transaction (committed with the
    # answer), as the account itself (a tenant's login is the member herself: Principal.actor).
    await record(session, actor=account_actor(held), action="user.signed_in", entity_type="user",
                 entity_id=held.id, cooperative_id=held.cooperative_id)
    return held, read_at


def account_actor(user: AdminUser) -> Actor:
    """Who the audit log names for an account's own acts, as for its tokens' (Principal.actor)."""
    return Principal("user", user.id, user.role, user.cooperative_id, user.member_id).actor


async def hold_account(session: AsyncSession, user_id: str) -> AdminUser | None:
    """The account read fresh, its row held until the transaction ends (FOR SHARE; None: no such account).

    What ends an account's sessions (a new password, a deactivation) holds the row for writing first
    (hold_account_for_change), so the two take turns: a sign-in, a refresh or an API key made meanwhile either
    comes before the change, which then ends or revokes it (its audit row is dated after this transaction
    ended), or after it, and sees the change committed. Without the turn, one that read the account while the
    change was written but not committed got a pair dated after the change's audit row: the mark ends its
    access token, but its refresh token, judged on the audit row alone, outlived the change for good.
    SQLite has no row locks: the database's write lock instead (serialise_on_sqlite), taken before any read."""
    await serialise_on_sqlite(session, AdminUser, user_id)
    query = select(AdminUser).where(AdminUser.id == user_id).with_for_update(read=True)
    return (await session.execute(query.execution_options(populate_existing=True))).scalar_one_or_none()


async def hold_account_for_change(session: AsyncSession, user_id: str) -> None:
    """Hold the account's row for a change that ends its sessions, before the change reads or writes anything
    (FOR NO KEY UPDATE, as the UPDATE of the row takes anyway): refreshes and key creations under way finish
    first, and those that come later wait for the commit (see hold_account)."""
    await serialise_on_sqlite(session, AdminUser, user_id)
    await session.execute(select(AdminUser.id).where(AdminUser.id == user_id).with_for_update(key_share=True))


async def refresh(session: AsyncSession, redis: Redis, token: str, *, secret: str, ttl_seconds: int,
                  previous: tuple[str, ...] = ()) -> TokenPair:
    """Trade a refresh token for a new pair; each refresh token works once (rotation). One signed with a `previous`
    secret (a JWT_SECRET rotation) is taken too: the new pair is signed with `secret`, as every token issued is."""
    claims = decode_token(token, secret=secret, previous=previous, expected_type="refresh")
    if not await _spend(session, claims):
        raise Unauthorized("refresh token already used", code=TOKEN_INVALID)
    # Taking turns with a change that ends the account's sessions (see hold_account): after one, its audit row
    # is read below and refuses this token; before one, the pair is dated before the change's audit row.
    user = await hold_account(session, str(claims["sub"]))
    read_at = wall()  # the pair is dated when the account was read (see login), once it is held
    # The account, its cooperative and member, and when its sessions were last ended: one query. A refresh
    # token outlives the revocation mark, so it is judged on the rows.
    row = (await session.execute(_USABLE_SINCE, {"user_id": user.id})).first() if user is not None else None
    if user is None or row is None:
        raise Unauthorized("invalid token", code=TOKEN_INVALID)
    if _ended_since(row, claims):
        raise Unauthorized("token has been revoked", code=TOKEN_INVALID)
    if not await _spend_in_redis(redis, claims):
        raise Unauthorized("refresh token already used", code=TOKEN_INVALID)
    # Dated at the read, not carried forward from the refresh token: a reset or deactivation from now on ends it.
    return issue_tokens(user, secret=secret, ttl_seconds=ttl_seconds, issued_at=read_at)


def _used_key(jti: str) -> str:
    """The previous release's record of a refresh token's use (cc79f48 and before), the key and expiry it wrote."""
    return f"auth:{{refresh:{jti}}}:used"


async def _spend_in_redis(redis: Redis, claims: dict[str, Any]) -> bool:
    """Record the use where the previous release looks too (SET NX); False when that release spent it first.

    Expand/contract across a rolling deploy and a rollback (`alembic downgrade`): a process of the previous
    release checks only this key, this one the database row (_spend). Written here as well, a token spent on
    either release is refused by the other, and one spent on this release stays spent after a rollback; of an
    old and a new refresh with one token at once, the SET NX picks the one winner. Written last, once every
    check has passed, so a refused refresh (its row rolled back) does not spend the token here either.
    Redis down or failing: the database row alone decides (refresh works without Redis).
    The write and its check go one release later: by then no process of a release before 0015 is left, and
    the release rolled back to records the use in the database itself."""
    try:
        used = await redis.set(_used_key(str(claims["jti"])), b"1", nx=True, ex=REFRESH_TTL_SECONDS + 60)
    except (RedisError, OSError, TimeoutError) as exc:
        log.warning("refresh token's use not recorded in Redis; the database's record decides",
                    extra={"error": type(exc).__name__})
        return True
    return bool(used)


async def _spend(session: AsyncSession, claims: dict[str, Any]) -> bool:
    """Record the refresh token's use in the database; False when it was used before.

    Its row (used_refresh_tokens, by the token's jti) is the single use, in the system of record: kept in Redis,
    a Redis that lost its data (flushed, restarted without persistence, failed over to a replica that missed the
    write) let a spent token mint pairs again for the rest of its week. The primary key decides, not a read
    before: of two refreshes with one token at once, the second's INSERT waits for the first's transaction
    (PostgreSQL; SQLite has one writer at a time) and then inserts nothing; only if the first rolled back (its
    refresh refused, e.g. revoked) does it go on, to the same checks. The row is written in the request's
    transaction (committed with the answer): a refresh that fails after it is not counted as a use."""
    stmt = (insert_ignore(session.get_bind().dialect.name, UsedRefreshToken)
            .values(id=str(claims["jti"]), expires_at=datetime.fromtimestamp(float(claims["exp"]), UTC))
            .on_conflict_do_nothing(index_elements=["id"]).returning(UsedRefreshToken.id))
    return (await session.execute(stmt)).first() is not None


async def create_user(
    session: AsyncSession,
    *,
    username: str,
    password: str,
    role: str,
    cooperative_id: str | None = None,
    member_id: str | None = None,
) -> AdminUser:
    if role not in ROLES:
        raise ValidationError(f"role must be one of {', '.join(ROLES)}", field="role")
    if role != SUPER_ADMIN and not cooperative_id:
        raise ValidationError("cooperative is required for this role", field="cooperativeId")
    if role == TENANT and not member_id:
        raise ValidationError("a tenant must be linked to a member", field="memberId")
    user = AdminUser(
        username=username,
        # scrypt takes tens of milliseconds of CPU: off the event loop, as the check at sign-in.
        password_hash=await asyncio.to_thread(hash_password, password),
        role=role,
        cooperative_id=cooperative_id,
        member_id=member_id,
        is_active=True,
    )
    try:
        async with session.begin_nested():  # a savepoint: a lost race must not end the caller's transaction
            session.add(user)
            await session.flush()
    except IntegrityError:
        # Two requests for one username at once: the callers' check saw it free, the unique index did not.
        from core.users import username_taken  # core.users builds on this module

        taken = await session.execute(select(AdminUser.id).where(username_is(username)).limit(1))
        if taken.scalar_one_or_none() is not None:
            raise Conflict(username_taken(username), field="username", code=NAME_TAKEN) from None
        raise
    return user


# --- API keys ---------------------------------------------------------------------------------------


async def create_api_key(
    session: AsyncSession,
    *,
    cooperative_id: str,
    name: str,
    scopes: list[str],
    actor: Actor,
    created_by: str | None = None,
    claims: dict[str, Any] | None = None,
) -> tuple[ApiKey, str]:
    """Returns the row and the clear key; the clear key is never stored and never shown again.

    `created_by` (a signed-in account) takes turns with a change that ends its sessions and revokes its keys
    (hold_account): a key made before the change is revoked by it; one asked for after it, with `claims` (the
    caller's access token) from a session it ended, is refused as that session is (401, token revoked)."""
    bad = sorted(set(scopes) - set(SCOPES))
    if bad or not scopes:
        raise ValidationError(f"scopes must be a non-empty subset of {', '.join(SCOPES)}", field="scopes")
    if not name.strip():  # stored trimmed: spaces alone named the key "" in every list
        raise ValidationError("name must not be blank", field="name")
    if created_by is not None:
        # The cooperative's row first, as the key's foreign key takes it (FOR KEY SHARE), then the account: the
        # order a suspension takes them in (its UPDATE, then record_sessions_ended). The other way round, one that
        # also changed the short code (FOR UPDATE) waited for the account while the key's insert waited for it.
        await session.execute(select(Cooperative.id).where(Cooperative.id == cooperative_id)
                              .with_for_update(read=True, key_share=True))
        await hold_account(session, created_by)
        if claims is not None:
            await check_still_active(session, created_by, claims)
    clear = new_api_key()
    key = ApiKey(
        cooperative_id=cooperative_id,
        name=name.strip(),
        prefix=clear[:12],
        key_hash=hash_api_key(clear),
        scopes=sorted(set(scopes)),
        created_by=created_by,
    )
    session.add(key)
    await session.flush()
    await record(
        session,
        actor=actor,
        action="api_key.created",
        entity_type="api_key",
        entity_id=key.id,
        after={"name": key.name, "scopes": key.scopes, "prefix": key.prefix},
        cooperative_id=cooperative_id,
    )
    return key, clear


async def revoke_api_key(session: AsyncSession, key: ApiKey, *, actor: Actor,
                         reason: str | None = None) -> ApiKey:
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        await session.flush()
        await record(
            session,
            actor=actor,
            action="api_key.revoked",
            entity_type="api_key",
            entity_id=key.id,
            after={"reason": reason} if reason else None,
            cooperative_id=key.cooperative_id,
        )
    return key


async def revoke_api_keys_created_by(session: AsyncSession, user_id: str, *, actor: Actor,
                                     reason: str = "creator deactivated") -> list[ApiKey]:
    """A deactivated account's keys go with it: an admin who leaves must not keep admin access through a
    key they made (and may have kept). So do they when its password is set anew (`reason`): one who took
    the account (a stolen session, a phished password) must not keep it through a key made meanwhile.
    Each key is revoked and audited as `DELETE /api-keys/{id}` does.

    The account's row is held first (hold_account_for_change), so a key being made at this moment is committed
    before the keys are read, and revoked with them; the caller writes the change in the same transaction."""
    await hold_account_for_change(session, user_id)
    keys = (await session.execute(
        select(ApiKey).where(ApiKey.created_by == user_id, ApiKey.revoked_at.is_(None))
        .order_by(ApiKey.created_at, ApiKey.id))).scalars().all()
    return [await revoke_api_key(session, key, actor=actor, reason=reason) for key in keys]


# The key, its cooperative's status and its creator's: Core columns, so it reads the same on a Core connection
# (the API's autocommit lookup) as in a session.
_KEY_LOOKUP = (
    select(ApiKey.id, ApiKey.cooperative_id, ApiKey.scopes, ApiKey.revoked_at, ApiKey.last_used_at,
           Cooperative.status, AdminUser.is_active)
    .join(Cooperative, Cooperative.id == ApiKey.cooperative_id)
    .outerjoin(AdminUser, AdminUser.id == ApiKey.created_by)
    .where(ApiKey.key_hash == bindparam("key_hash"))
)
LAST_USED_EVERY = timedelta(minutes=1)
# The last-used stamp, at most once a minute per key, and never waited for: a row locked by another request's
# stamp or by a revocation being written is skipped (SKIP LOCKED; SQLite has no row locks and writes it), and
# the condition is read again under the lock, so requests that all saw an old stamp write it once.
_STAMP_LAST_USED = (
    update(ApiKey)
    .where(ApiKey.id.in_(
        select(ApiKey.id)
        .where(ApiKey.id == bindparam("key_id"),
               or_(ApiKey.last_used_at.is_(None), ApiKey.last_used_at <= bindparam("stale_before")))
        .with_for_update(skip_locked=True)
        .scalar_subquery()))
    .values(last_used_at=bindparam("now"))
)


async def principal_from_api_key(conn: AsyncConnection | AsyncSession, clear: str) -> Principal:
    """Look the key up by its hash; revoked keys, suspended cooperatives and keys whose creator's account
    is deactivated are refused (deactivation revokes them too: this is the second line, one column more in
    the same query).

    `conn`: the API passes an autocommit connection (admin_api.routing.authenticate), so neither the lookup
    nor the last-used stamp keeps a transaction open, or the key's row locked, while the request runs; in a
    session both join its transaction."""
    # (Keys are ASCII; a header's bytes that are not UTF-8 come as lone surrogates, which the hash cannot encode.)
    if not clear or len(clear) > 200 or not clear.isascii():
        raise Unauthorized("invalid or inactive API key")
    row = (await conn.execute(_KEY_LOOKUP, {"key_hash": hash_api_key(clear)})).first()
    # A key made by no account (created_by NULL: the CLI, older rows) has no creator to check.
    if row is None or row.revoked_at is not None or row.status != "ACTIVE" or row.is_active is False:
        raise Unauthorized("invalid or inactive API key")
    # Best effort and cheap: one UPDATE per call, skipped when used in the last minute.
    now = utcnow()
    if row.last_used_at is None or now - row.last_used_at > LAST_USED_EVERY:
        await conn.execute(_STAMP_LAST_USED, {"key_id": row.id, "stale_before": now - LAST_USED_EVERY, "now": now})
    return Principal("api_key", row.id, API_KEY, row.cooperative_id, None, with_implied(row.scopes))


def require(principal: Principal, scope: str) -> None:
    if not principal.has(scope):
        raise Forbidden("insufficient permissions")
