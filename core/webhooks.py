"""Signed webhooks to cooperatives' systems: endpoints, domains, fan-out, delivery, retries, disabling.

Every delivery is signed Stripe-style: header `X-Gateway-Signature: t=<unix seconds>,v1=<hex>` where
`<hex> = HMAC-SHA256(endpoint secret, f"{t}.{raw body}")`. The event id (`X-Gateway-Event-Id` and the
body's `id`) is the same on every attempt, so receivers drop duplicates; retries run with exponential
backoff for up to three days, each attempt recorded with its status code and latency. A delivery given up
on (its job parked) is sent again when an admin replays the job: its three days start again from the replay.

A secret is rotated without refusing anything: for ROTATION_OVERLAP after a rotation every delivery is
signed with the new secret and the previous one (`t=..,v1=<new>,v1=<old>`), so a receiver still on the old
secret accepts them while it switches over. Rotating again before that overlap ends does not cut it short:
each replaced secret signs until its own overlap ends (`v1=<newest>,v1=<previous>,v1=<the one before>`), so a
receiver that never learned the middle secret (the first rotation's answer lost) still accepts every event.

An endpoint that has failed every attempt for a day (DISABLE_AFTER_FAILING_FOR, and at least DISABLE_AFTER attempts
in a row) is switched off and the cooperative's contact told; nothing is lost by it. While it is off its deliveries
are held PENDING and new events are still recorded for it (for RETRY_FOR after the switch-off); enabling it again
sends them all, oldest first. Held for long they are given up: `prune` marks FAILED those of an endpoint off for
RETENTION_WEBHOOK_HELD_DAYS, recorded as long ago (core.retention). An endpoint an admin DELETEs is off on purpose:
it records nothing new, and what it still held is marked FAILED. Both are status DISABLED; which one is read from
the endpoint's last `webhook_endpoint.disabled` audit event (`after.reason`: "failures" or "deleted"). An endpoint's
events and URL can be changed (PATCH, update_endpoint): what it held or was retrying of an event it no longer gets
is marked FAILED the same way; the rest goes to the URL as it is when sent.

A delivery is sent only while its endpoint's domain is approved for the cooperative, checked again at each
send: once a super admin rejects the domain (or it is asked for again, pending), its deliveries are held PENDING
as a switched-off endpoint's are, whether first tries, retries or resumed: not sent, no attempt recorded, their
three days not running. Approving the domain again queues them (resume_for_domain), with three fresh days; the
admin actions that end deliveries (DELETE, a change of events) end them too, and `prune` gives up (FAILED) those
recorded more than RETENTION_WEBHOOK_HELD_DAYS ago once the domain has not been approved for as long
(core.retention). One already being sent when the
domain is rejected finishes (a 2xx is DELIVERED, never sent again).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import random
import re
import secrets
import socket
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse, urlsplit

import httpx
from sqlalchemy import and_, case, func, literal, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from core.audit import Actor, formatted, record
from core.crypto import PiiCipher
from core.db import (
    UTCDateTime,
    event_data_id,
    insert_ignore,
    iso_ms,
    iso_z,
    lock_row,
    new_id,
    parse_aware,
    serialise_on_sqlite,
    utcnow,
)
from core.errors import INVALID_STATE, WEBHOOK_URL_TAKEN, Conflict, Forbidden, NotFound, ValidationError
from core.http import STATUS_ONLY, in_networks, refused_address
from core.models import ApprovedDomain, AuditEvent, Cooperative, OutboxJob, WebhookDelivery, WebhookEndpoint
from core.outbox import (
    SUBJECT_KEYS,
    Job,
    NewJob,
    PermanentJobError,
    RetryLater,
    end_waiting,
    enqueue,
    enqueue_many,
    finish_unsent,
)
from core.text import is_number

if TYPE_CHECKING:
    from core.runtime import Runtime

log = logging.getLogger("gateway.webhooks")

# A flag on a payment told on its own (core.provider_events.flagged_job), and the event FLAG_EVENTS also reach.
FLAGGED = "payment.flagged"
# A payment's flags cleared by a person (core.payments.review_flags, core.provider_events.flag_cleared_job): sent only
# to the endpoints that asked for it.
FLAG_CLEARED = "payment.flag_cleared"
EVENTS = (
    "payment.completed",
    "payment.failed",
    "payment.taken_after_failure",
    "payment.paid_twice",
    "payment.unconfirmed_success",
    "payment.timeout",
    "payment.voided",
    "payment.taken_after_void",
    FLAGGED,
    FLAG_CLEARED,
    "refund.completed",
    "refund.failed",
    "dispute.opened",
    "dispute.updated",
)
# What an event is about (the first word of its type); its data's `id` is that entity's.
SUBJECT_TYPES = ("payment", "refund", "dispute")
# A delivery's status: waiting (or retrying, or held while its endpoint is switched off), done, given up.
DELIVERY_STATUSES = ("PENDING", "DELIVERED", "FAILED")
SIGNATURE_HEADER = "X-Gateway-Signature"
EVENT_ID_HEADER = "X-Gateway-Event-Id"
EVENT_HEADER = "X-Gateway-Event"
ATTEMPT_HEADER = "X-Gateway-Delivery-Attempt"  # 1 on a delivery's first attempt, then one more on each
TOLERANCE_SECONDS = 300
DELIVERY_TIMEOUT = 10.0
RETRY_FOR = timedelta(days=3)
FIRST_RETRY_SECONDS = 30.0
MAX_RETRY_SECONDS = 6 * 3600.0
# An endpoint is switched off (and the admin told) only when both hold: at least DISABLE_AFTER failed
# attempts in a row (across events) and the first of them DISABLE_AFTER_FAILING_FOR ago. A busy cooperative
# makes twenty failed attempts in a minute of 500s; the time keeps a short outage from switching it off.
DISABLE_AFTER = 20
DISABLE_AFTER_FAILING_FOR = timedelta(hours=24)
# Why an endpoint is DISABLED, in its `webhook_endpoint.disabled` audit event's `after.reason`.
REASON_FAILURES = "failures"  # switched off by the worker: deliveries held and recorded, resumed on enable
REASON_DELETED = "deleted"  # DELETE by an admin: nothing new recorded, held deliveries marked FAILED
# Why a PENDING delivery is held rather than sent (GET .../deliveries `heldReason`): its endpoint was switched off
# after failures (sent when it is enabled), or its URL's domain is not approved for the cooperative (rejected, or
# asked for again and pending: sent when a super admin approves it).
HELD_SWITCHED_OFF = "endpoint_switched_off"
HELD_DOMAIN_NOT_APPROVED = "domain_not_approved"
# The warning that an endpoint's domain is not approved, its new events not recorded (fan_out): at most once in
# this many seconds per endpoint and process, saying how many events it skipped since (a busy cooperative's
# rejected domain was a warning per payment). The endpoint's domainStatus and the ops page say it all along.
DOMAIN_SKIP_LOG_SECONDS = 3600.0
_domain_skip_said: dict[str, tuple[float, int]] = {}  # endpoint id -> (time.monotonic() of the line, skipped since)
# Held deliveries sent again when an endpoint is enabled: this many a second, oldest first, so that a day's
# backlog neither floods the receiver that just came back nor holds up the outbox's other jobs.
RESUME_PER_SECOND = 20
_RESUME_BATCH = 500  # rows per INSERT when re-queuing (PostgreSQL's bind-parameter limit)
MAX_ENDPOINTS_PER_COOPERATIVE = 10
MAX_EVENT_ID = 64  # WebhookDelivery.event_id column width
# After a rotation the previous secret still signs deliveries (second v1=) for this long, by default.
ROTATION_OVERLAP = timedelta(hours=24)
MAX_ROTATION_OVERLAP = timedelta(days=7)
# At most this many replaced secrets sign at once. A rotation that would keep one more is refused rather than
# dropping one before its overlap ends (that is what a receiver still on it could not tell from an attack).
MAX_PREVIOUS_SECRETS = 5
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$"
)


# ---------------------------------------------------------------------------------------------- signing


def sign(secret: str, body: bytes, timestamp: int, *previous: str) -> str:
    """`t=<timestamp>,v1=<hex>`; with `previous` secrets (a rotation's overlap) one more `v1=` for each,
    the current secret's first."""
    digests = [
        hmac.new(key.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
        for key in (secret, *previous)
    ]
    return f"t={timestamp}," + ",".join(f"v1={digest}" for digest in digests)


def verify_signature(
    secret: str, header: str, body: bytes, tolerance: int = TOLERANCE_SECONDS, *, now: float | None = None
) -> bool:
    """Receiver side: True when `header` signs `body` with `secret` and its timestamp is recent.

    Accepts several `v1=` values (sent while a secret is being rotated); compares in constant time.
    """
    timestamp: int | None = None
    candidates: list[str] = []
    for part in (header or "").split(","):
        key, _, value = part.strip().partition("=")
        if key == "t" and is_number(value) and len(value) <= 15:
            timestamp = int(value)
        elif key == "v1" and value:
            candidates.append(value)
    if timestamp is None or not candidates:
        return False
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance:
        return False
    expected = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return any(hmac.compare_digest(expected, c) for c in candidates)


# ------------------------------------------------------------------------------------ domains, endpoints


def _inet_aton(host: str) -> bool:
    """Whether the system resolver reads `host` as an IPv4 address (inet_aton: any short or hex form)."""
    try:
        socket.inet_aton(host)
    except OSError:
        return False
    return True


def canonical_host(host: str) -> str:
    """An IP literal in its one written form (ipaddress: `fd00:0::5` and `FD00::0005` are `fd00::5`), so that a
    domain asked for and an endpoint's URL on it compare equal however each was written; a name as it is.
    An IPv4-mapped address is written with its IPv4 address, `::ffff:1.2.3.4` (RFC 5952's form): str() gives it from
    Python 3.13 on, `::ffff:102:304` before, and the form stored must not depend on the interpreter (migration 0042
    rewrote the other one)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return f"::ffff:{address.ipv4_mapped}" + (f"%{address.scope_id}" if address.scope_id else "")
    return str(address)


def normalize_domain(domain: str, *, embedded: bool = False, private: tuple[str, ...] = ()) -> str:
    """Lower-case host name; IP literals (canonical_host) and localhost only in the embedded default (no SSRF into a
    LAN), and outside it an IP address in one of the operator's `private` networks (WEBHOOK_PRIVATE_NETWORKS: a
    cooperative's system on the gateway's own LAN; localhost stays refused, its address may be listed)."""
    host = (domain or "").strip().lower().rstrip(".")
    if "://" in host:
        try:
            host = urlparse(host).hostname or ""
        except ValueError:  # "Invalid IPv6 URL" (an unclosed "["), a port that is no number
            raise ValidationError(f"{host!r} is not a valid domain name", field="domain") from None
    if not host:
        raise ValidationError("domain is required", field="domain")
    if host.startswith("[") or host.endswith("]"):
        # An IPv6 address as a URL writes it ("[fd00::5]", copied from http://[fd00::5]/h): the address, stored
        # without its brackets, as the endpoint's host is compared. Only an IPv6 address is written so in a URL.
        bracketed, host = host, host[1:-1] if host.startswith("[") and host.endswith("]") else ""
        if not _is_ip(host, version=6):
            raise ValidationError(
                f"{bracketed!r} is not a valid domain name: brackets enclose an IPv6 address, as in [fd00::5]",
                field="domain",
            )
    try:
        ipaddress.ip_address(host)
        is_ip = True
    except ValueError:
        is_ip = False
    if is_ip or host == "localhost":
        if not embedded and not (is_ip and in_networks(host, private)):
            listed = ", except an address of the networks the operator allows" if private else ""
            raise ValidationError(
                f"webhook domains must be public host names, not IP addresses or localhost{listed}", field="domain"
            )
        return canonical_host(host)
    if not _HOSTNAME.match(host) or "." not in host:
        raise ValidationError(f"{host!r} is not a valid domain name", field="domain")
    if not embedded and (host.rsplit(".", 1)[1].isdigit() or _inet_aton(host)):
        # No top-level domain is all digits: "127.1" or "10.1" is an IP address in the short form the system
        # resolver reads (127.0.0.1, 10.0.0.1), which ipaddress does not take; so is "127.0x1" (its parts in hex).
        raise ValidationError(
            "webhook domains must be public host names, not IP addresses or localhost", field="domain"
        )
    return host


def endpoint_secret_context(cooperative_id: str) -> str:
    """The encryption context of an endpoint's signing secrets (bound to its cooperative)."""
    return f"webhook:{cooperative_id}"


def endpoint_secret(cipher: PiiCipher, endpoint: WebhookEndpoint) -> str:
    return cipher.decrypt(endpoint.secret_enc, context=endpoint_secret_context(endpoint.cooperative_id))


def previous_secret(secret_enc: str, until: datetime) -> dict[str, Any]:
    """An entry of WebhookEndpoint.previous_secrets: a replaced secret (still sealed) and when it stops signing."""
    return {"secret_enc": secret_enc, "expires_at": until.astimezone(UTC).isoformat()}


def secret_expiry(entry: Any) -> datetime | None:
    """When a previous_secrets entry stops signing; None for an entry that is not one (never signs)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("secret_enc"), str) or not entry["secret_enc"]:
        return None
    return parse_aware(entry.get("expires_at"))


def live_previous_secrets(endpoint: WebhookEndpoint, now: datetime | None = None) -> list[dict[str, Any]]:
    """The replaced secrets still inside their overlap, newest first (as stored); expired ones are left out
    here and dropped at the next rotation."""
    moment = now or utcnow()
    return [
        entry for entry in endpoint.previous_secrets or []
        if (until := secret_expiry(entry)) is not None and until > moment
    ]


def signing_secrets(cipher: PiiCipher, endpoint: WebhookEndpoint, now: datetime | None = None) -> list[str]:
    """The secrets a delivery is signed with now: the current one, then every one a rotation replaced whose
    overlap lasts, newest first."""
    context = endpoint_secret_context(endpoint.cooperative_id)
    return [
        endpoint_secret(cipher, endpoint),
        *(cipher.decrypt(entry["secret_enc"], context=context) for entry in live_previous_secrets(endpoint, now)),
    ]


def new_secret() -> str:
    return "whsec_" + secrets.token_urlsafe(32)


async def request_domain(
    session: AsyncSession, *, cooperative_id: str, domain: str, actor: Actor, embedded: bool = False,
    private: tuple[str, ...] = (),
) -> ApprovedDomain:
    """A cooperative asks for a domain; a super admin decides. Asking again returns the same request."""
    host = normalize_domain(domain, embedded=embedded, private=private)
    # ON CONFLICT DO NOTHING, then read the row: of two requests for one domain at once (a call retried on a
    # timeout) the second gets the first's row, where a read-then-insert failed on the unique constraint (a 500).
    table = ApprovedDomain.__table__
    inserted = (
        await session.execute(
            insert_ignore(session.get_bind().dialect.name, table)
            .values(cooperative_id=cooperative_id, domain=host, status="PENDING")
            .on_conflict_do_nothing(index_elements=[table.c.cooperative_id, table.c.domain])
            .returning(table.c.id)
        )
    ).scalar_one_or_none()
    row = (
        await session.execute(
            select(ApprovedDomain)
            .where(ApprovedDomain.cooperative_id == cooperative_id, ApprovedDomain.domain == host)
            .execution_options(populate_existing=True)
        )
    ).scalar_one()
    before = None
    if inserted is None:  # asked before: the same request
        if row.status != "REJECTED":
            return row
        # Asked again after a rejection: PENDING again, for a super admin to decide anew. Under the row's lock, read
        # fresh (an approval at this moment locks it: that decision stands, never overwritten with PENDING), and
        # audited as the move it is (REJECTED -> PENDING), as a decision is.
        row = await lock_row(session, ApprovedDomain, row.id)
        if row.status != "REJECTED":
            return row
        row.status, row.decided_by, row.decided_at = "PENDING", None, None
        await session.flush()
        before = {"status": "REJECTED"}
    await record(
        session,
        actor=actor,
        action="webhook_domain.requested",
        entity_type="approved_domain",
        entity_id=row.id,
        before=before,
        after={"domain": host, "status": "PENDING"},
        cooperative_id=cooperative_id,
    )
    return row


async def approve_domain(
    session: AsyncSession, *, domain_id: str, actor: Actor, is_super_admin: bool, approve: bool = True
) -> ApprovedDomain:
    """Only a super admin approves or rejects a cooperative's webhook domain."""
    if not is_super_admin:
        raise Forbidden("only a super admin can approve webhook domains")
    # Locked and read fresh: an approval and a rejection at once (two super admins, two serve processes) take turns,
    # and the second's audit row says what it replaced (the first's decision, not the PENDING both had read).
    row = await lock_row(session, ApprovedDomain, domain_id)
    if row is None:
        raise NotFound("domain request not found")
    before = row.status
    row.status = "APPROVED" if approve else "REJECTED"
    row.decided_by = actor.id
    row.decided_at = utcnow()
    await session.flush()  # the row locked (PostgreSQL; SQLite's write lock) until commit: see _hold_for_domain
    after: dict[str, Any] = {"status": row.status, "domain": row.domain}
    if approve:
        # What was held while it was not approved goes out now (rejecting needs nothing: each delivery is held
        # when its turn comes, deliver).
        after["resumedDeliveries"] = await resume_for_domain(session, row)
    await record(
        session,
        actor=actor,
        action=f"webhook_domain.{row.status.lower()}",
        entity_type="approved_domain",
        entity_id=row.id,
        before={"status": before},
        after=after,
        cooperative_id=row.cooperative_id,
    )
    return row


def endpoint_host(url: str) -> str:
    """The domain an endpoint's URL is on, as check_url read it: lower case, the root's dot ("hooks.example.rw.")
    dropped, as the domain's was, an IP literal in its canonical form (canonical_host)."""
    try:
        return canonical_host((urlparse(url).hostname or "").lower().rstrip("."))
    except ValueError:  # stored before check_url refused it: on no domain
        return ""


def _status_of_domain(cooperative_id: str, host: str) -> Any:
    return select(ApprovedDomain.status).where(
        ApprovedDomain.cooperative_id == cooperative_id, ApprovedDomain.domain == host
    )


async def domain_status(session: AsyncSession, cooperative_id: str, url: str) -> str | None:
    """The status of the cooperative's request for the domain `url` is on (APPROVED, PENDING, REJECTED), None
    when there is none."""
    return (await session.execute(_status_of_domain(cooperative_id, endpoint_host(url)))).scalar_one_or_none()


async def held_reason(session: AsyncSession, endpoint: WebhookEndpoint) -> str | None:
    """Why the endpoint's PENDING deliveries are held, not sent (as deliver finds it): HELD_SWITCHED_OFF,
    HELD_DOMAIN_NOT_APPROVED, or None (sent, or retried, when due; a deleted endpoint holds nothing)."""
    return (await held_reasons(session, [endpoint]))[endpoint.id]


async def held_reasons(session: AsyncSession, endpoints: list[WebhookEndpoint]) -> dict[str, str | None]:
    """held_reason of each of `endpoints`, by id, in at most two queries whatever their number (the ops page counts
    the held deliveries of every endpoint with some pending: one held_reason each was two or three queries an
    endpoint). A switched-off endpoint holds them when its last `webhook_endpoint.disabled` row is the worker's
    (disabled_for_failures); an active one, when its domain is not APPROVED for its cooperative (domain_status)."""
    reasons: dict[str, str | None] = {e.id: None for e in endpoints}
    off = [e.id for e in endpoints if e.status != "ACTIVE"]
    if off:
        last = (select(AuditEvent.entity_id, func.max(AuditEvent.id).label("last_id"))
                .where(AuditEvent.entity_type == "webhook_endpoint", AuditEvent.entity_id.in_(off),
                       AuditEvent.action == "webhook_endpoint.disabled")
                .group_by(AuditEvent.entity_id).subquery())
        rows = await session.execute(select(AuditEvent.entity_id, AuditEvent.actor, AuditEvent.after)
                                     .join(last, AuditEvent.id == last.c.last_id))
        for endpoint_id, actor, after in rows.all():
            if _disabled_by_failures(actor, after):
                reasons[endpoint_id] = HELD_SWITCHED_OFF
    on = [e for e in endpoints if e.status == "ACTIVE"]
    if on:
        wanted = {(e.cooperative_id, endpoint_host(e.url)) for e in on}
        rows = await session.execute(select(ApprovedDomain.cooperative_id, ApprovedDomain.domain, ApprovedDomain.status)
                                     .where(ApprovedDomain.cooperative_id.in_({c for c, _ in wanted}),
                                            ApprovedDomain.domain.in_({d for _, d in wanted})))
        approved = {(c, d) for c, d, status in rows.all() if status == "APPROVED"}
        for endpoint in on:
            if (endpoint.cooperative_id, endpoint_host(endpoint.url)) not in approved:
                reasons[endpoint.id] = HELD_DOMAIN_NOT_APPROVED
    return reasons


async def resume_for_domain(session: AsyncSession, domain: ApprovedDomain) -> int:
    """Queue the deliveries held while `domain` was not approved: of each ACTIVE endpoint of its cooperative on
    it, those PENDING with no job waiting or running (_resume_unqueued). One switched off after failures keeps
    holding until it is enabled."""
    endpoints = (
        await session.execute(
            select(WebhookEndpoint).where(
                WebhookEndpoint.cooperative_id == domain.cooperative_id, WebhookEndpoint.status == "ACTIVE"
            )
        )
    ).scalars().all()
    resumed = 0
    for endpoint in endpoints:
        if endpoint_host(endpoint.url) == domain.domain:
            resumed += await _resume_unqueued(session, endpoint)
    return resumed


# An event also sent to the endpoints of the event it follows: a system told a payment failed is told when the
# provider took the money after all, and one told a payment completed when that recording was voided
# (core.recorded_payments.void_recording) (it was never told, unless it had asked for an event it did not know of).
FOLLOWS = {"payment.taken_after_failure": "payment.failed", "payment.voided": "payment.completed"}


# The events that tell a flag of their own (the payment flagged `mismatch` for a person, with what the provider
# reported): the flag is not told again as payment.flagged (one alert for one flag to a receiver asking for both), and
# they go to the endpoints that asked for payment.flagged too, so that those hear of every flag.
FLAG_EVENTS = ("payment.taken_after_failure", "payment.paid_twice", "payment.unconfirmed_success",
               "payment.taken_after_void")


def subscribed(events: list[str], event_type: str, told: tuple[str, ...] = ()) -> bool:
    """Whether an endpoint asking for `events` gets `event_type`: it asked for it, or for an event it follows
    (FOLLOWS), or for one the event says its system was told of the same payment (`told`, the job's "follows":
    payment.paid_twice follows the payment.completed or payment.taken_after_failure of its payment,
    payment.unconfirmed_success its payment.failed or payment.timeout, payment.taken_after_void its
    payment.voided), with what those follow; or for payment.flagged, an event telling a flag (FLAG_EVENTS)."""
    wanted = {event_type, *told}
    wanted.update(FOLLOWS[event] for event in tuple(wanted) if event in FOLLOWS)
    if event_type in FLAG_EVENTS:
        wanted.add(FLAGGED)
    return not wanted.isdisjoint(events)


# What an event's `follows` can name (core.provider_events._told: the outcome a system was last told of the payment),
# for the events queued with one (core.provider_events._emit_reported). A delivery does not keep its event's `follows`.
TOLD = ("payment.completed", "payment.taken_after_failure", "payment.failed", "payment.voided", "payment.timeout")
# Every event _emit_reported queues: one left out here is given up at delivery (deliver) and by any change of events.
# payment.taken_after_void is only ever queued for a VOIDED payment, which _told names payment.voided.
MAY_FOLLOW = {"payment.paid_twice": TOLD, "payment.unconfirmed_success": TOLD,
              "payment.taken_after_void": ("payment.voided",)}


def still_subscribed(events: list[str], event_type: str) -> bool:
    """Whether an endpoint asking for `events` may still be sent a recorded event of `event_type`: subscribed,
    with any `follows` such an event can carry (not kept with its delivery, so none of them is ruled out).
    Deliveries of the others are given up when an endpoint's events change (update_endpoint)."""
    return subscribed(events, event_type, MAY_FOLLOW.get(event_type, ()))


def check_events(events: Any) -> list[str]:
    if not isinstance(events, list | tuple) or not events or not all(isinstance(e, str) for e in events):
        raise ValidationError(
            f"events must be a non-empty list drawn from {', '.join(EVENTS)}", field="events"
        )
    unknown = sorted(set(events) - set(EVENTS))
    if unknown:
        raise ValidationError(f"unknown events {unknown}; allowed: {', '.join(EVENTS)}", field="events")
    return [e for e in EVENTS if e in events]


def check_url(url: str, *, embedded: bool = False, private: tuple[str, ...] = ()) -> tuple[str, str]:
    """Returns (url, host). https is required outside the embedded default, except to an IP address of one of
    the `private` networks (WEBHOOK_PRIVATE_NETWORKS: a LAN's receiver seldom has a certificate for it)."""
    if not isinstance(url, str) or not url.strip() or len(url) > 500:
        raise ValidationError("url is required (at most 500 characters)", field="url")
    try:
        parsed = urlparse(url.strip())
        port = parsed.port
        # As the client that sends the deliveries reads it: a URL it refuses (a control character, a port
        # that is no number) would fail every delivery unrecorded, never counted towards switching it off.
        httpx.URL(url.strip())
    except (ValueError, httpx.InvalidURL) as exc:  # an unclosed "[", a port past 65535, a "\r"
        raise ValidationError(f"webhook url is not a valid URL: {exc}", field="url") from None
    if port == 0:
        raise ValidationError("webhook url port must be 1-65535", field="url")
    allowed = ("https", "http") if embedded or private else ("https",)
    if parsed.scheme not in allowed:
        raise ValidationError("webhook url must use https", field="url")
    if parsed.username or parsed.password:
        raise ValidationError("webhook url must not carry credentials", field="url")
    if parsed.fragment:
        raise ValidationError("webhook url must not have a #fragment", field="url")
    host = normalize_domain(parsed.hostname or "", embedded=embedded, private=private)
    if parsed.scheme == "http" and not embedded and not _is_ip(host):  # a name: https, wherever it resolves
        raise ValidationError("webhook url must use https", field="url")
    return url.strip(), host


_DEFAULT_PORTS = {"https": 443, "http": 80}


def url_key(url: str) -> str:
    """`url` as two registrations of one receiver compare: scheme and host whatever their case (an IP literal in
    its canonical form, canonical_host: [fd00:0::5] is [fd00::5]), the scheme's default port as none, a trailing
    slash of the path as none; the path (case included) and query as typed.
    The URL is stored and called as it was given. One stored before check_url refused it (a port past 65535) is
    its own key, as typed: it matches no other, and the cooperative's registrations do not fail on it."""
    # urlsplit: urlparse takes a ";params" off the path, and /hook;tenant=a and /hook;tenant=b compared the same.
    parsed = urlsplit(url.strip())
    scheme, host = parsed.scheme.lower(), canonical_host((parsed.hostname or "").rstrip("."))
    try:
        port = parsed.port
    except ValueError:
        return url.strip()
    netloc = f"[{host}]" if ":" in host else host
    if port is not None and port != _DEFAULT_PORTS.get(scheme):
        netloc += f":{port}"
    query = f"?{parsed.query}" if parsed.query else ""
    return f"{scheme}://{netloc}{parsed.path.rstrip('/')}{query}"


async def _check_url_free(
    session: AsyncSession, cooperative_id: str, url: str, other_than: str | None = None
) -> None:
    """Conflict when another ACTIVE endpoint of the cooperative has `url` (url_key): each event goes to every
    endpoint, so a second one at a URL (a setup script's registration retried after a lost answer) has the
    receiver sent every event twice, one copy signed with a secret it never kept. The Conflict names the endpoint
    that has it: its secret, if lost, is rotated. Called under _lock_cooperative, so that two at once take turns."""
    key = url_key(url)
    rows = (
        await session.execute(
            select(WebhookEndpoint.id, WebhookEndpoint.url).where(
                WebhookEndpoint.cooperative_id == cooperative_id, WebhookEndpoint.status == "ACTIVE"
            )
        )
    ).all()
    for endpoint_id, held in rows:
        if endpoint_id != other_than and url_key(held) == key:
            raise Conflict(
                f"{held} is registered already for this cooperative: webhook endpoint {endpoint_id} (ACTIVE), "
                "which is sent every event it asked for; a second endpoint at this URL would be sent each of them "
                "twice. Its secret was shown once: if it was lost, rotate it (POST "
                f"/v1/webhook-endpoints/{endpoint_id}/rotate-secret); change its events with PATCH "
                f"/v1/webhook-endpoints/{endpoint_id}",
                field="url",
                code=WEBHOOK_URL_TAKEN,
            )


async def _lock_cooperative(session: AsyncSession, cooperative_id: str) -> None:
    """Two registrations (or a registration, an enable and a change of URL) of one cooperative take turns, the
    second's checks (_check_room, _check_url_free) seeing the first's endpoint: the cooperative's row locked (FOR
    NO KEY UPDATE: inserts pointing at it are not held), on SQLite the database's write lock."""
    await serialise_on_sqlite(session, Cooperative, cooperative_id)
    await session.execute(
        select(Cooperative.id).where(Cooperative.id == cooperative_id).with_for_update(key_share=True)
    )


async def _refuse_deleted(session: AsyncSession, endpoint: WebhookEndpoint) -> None:
    """Conflict for an endpoint an admin deleted (one switched off after failures is changed and rotated: its URL
    fixed before it is enabled again). GET still shows it, DISABLED, and enable brings it back: so 409, not 404."""
    if endpoint.status != "ACTIVE" and not await disabled_for_failures(session, endpoint.id):
        raise Conflict(
            f"webhook endpoint {endpoint.id} was deleted (DELETE): it is sent nothing and is not changed; enable it "
            f"first (POST /v1/webhook-endpoints/{endpoint.id}/enable)",
            code=INVALID_STATE,
        )


async def register_endpoint(
    session: AsyncSession,
    cipher: PiiCipher,
    *,
    cooperative_id: str,
    url: str,
    events: list[str],
    actor: Actor,
    embedded: bool = False,
    private: tuple[str, ...] = (),
) -> tuple[WebhookEndpoint, str]:
    """Create an endpoint on an approved domain; the signing secret is returned once and stored encrypted."""
    url, host = check_url(url, embedded=embedded, private=private)
    chosen = check_events(events)
    await _check_approved(session, cooperative_id, host)
    await _check_room(session, cooperative_id)
    await _check_url_free(session, cooperative_id, url)
    secret = new_secret()
    endpoint = WebhookEndpoint(
        cooperative_id=cooperative_id,
        url=url,
        events=chosen,
        status="ACTIVE",
        consecutive_failures=0,
        secret_enc=cipher.encrypt(secret, context=endpoint_secret_context(cooperative_id)),
    )
    session.add(endpoint)
    await session.flush()
    await record(
        session,
        actor=actor,
        action="webhook_endpoint.created",
        entity_type="webhook_endpoint",
        entity_id=endpoint.id,
        after={"url": url, "events": chosen},
        cooperative_id=cooperative_id,
    )
    return endpoint, secret


async def _check_approved(session: AsyncSession, cooperative_id: str, host: str) -> None:
    """Forbidden unless `host` is a domain approved for the cooperative (registration, and a URL changed)."""
    approved = (
        await session.execute(
            select(ApprovedDomain.status).where(
                ApprovedDomain.cooperative_id == cooperative_id, ApprovedDomain.domain == host
            )
        )
    ).scalar_one_or_none()
    # What is left to do, said for each: a pending domain was told "request it", which its admin had done (asking
    # again answers the same PENDING request): what it waits for is a super admin's approval.
    if approved == "PENDING":
        raise Forbidden(f"domain {host} is pending approval: it was requested; have a super admin approve it "
                        "(POST /v1/webhook-domains/{id}/approve) first")
    if approved == "REJECTED":
        raise Forbidden(f"domain {host} was rejected: request it again (POST /v1/webhook-domains) and have a super "
                        "admin approve it first")
    if approved != "APPROVED":
        raise Forbidden(f"domain {host} is not approved: request it and have a super admin approve it first")


async def update_endpoint(
    session: AsyncSession,
    *,
    endpoint_id: str,
    cooperative_id: str,
    actor: Actor,
    url: str | None = None,
    events: list[str] | None = None,
    embedded: bool = False,
    private: tuple[str, ...] = (),
) -> WebhookEndpoint:
    """PATCH: change which events an endpoint is sent, or where, keeping its secret, its status and its
    deliveries. Both are checked as at registration (the event list; https, no credentials, a domain approved
    for the cooperative).

    Deliveries still pending (retrying, or held while the endpoint is switched off after failures or its domain
    is not approved) of an event it no longer gets (still_subscribed) are given up, marked FAILED as DELETE marks
    all of them: taking an event off the list is how a cooperative stops receiving it, those already queued
    included. The others stay pending and go to the URL as it is when each is sent (deliver reads it then),
    signed as before; those held for the old URL's domain are queued again for the new one. A new URL
    starts a new streak of failures (those counted were the old URL's); the status is left as it is, so one
    switched off stays off until it is enabled.

    The deliveries are written before the endpoint, as in delete_endpoint (the order a delivery's end takes
    them, see _finish), so that the two cannot wait on each other."""
    if url is None and events is None:
        raise ValidationError("send url or events (or both)")
    host = None
    if url is not None:
        url, host = check_url(url, embedded=embedded, private=private)
    chosen = check_events(events) if events is not None else None
    exists = (
        await session.execute(
            select(WebhookEndpoint.id).where(
                WebhookEndpoint.id == endpoint_id, WebhookEndpoint.cooperative_id == cooperative_id
            )
        )
    ).scalar_one_or_none()
    if exists is None:
        raise NotFound("webhook endpoint not found")
    if host is not None:
        await _check_approved(session, cooperative_id, host)
    dropped = 0
    gone = [] if chosen is None else [event for event in EVENTS if not still_subscribed(chosen, event)]
    if gone:
        result = await session.execute(
            update(WebhookDelivery)
            .where(
                WebhookDelivery.endpoint_id == endpoint_id,
                WebhookDelivery.status == "PENDING",
                WebhookDelivery.event_type.in_(gone),
            )
            .values(status="FAILED", updated_at=utcnow())
        )
        dropped = int(result.rowcount)  # type: ignore[attr-defined]
    endpoint = await lock_row(session, WebhookEndpoint, endpoint_id, cooperative_id)  # two at once: in turn
    if endpoint is None:
        raise NotFound("webhook endpoint not found")
    await _refuse_deleted(session, endpoint)
    if url is not None and url_key(url) != url_key(endpoint.url):
        await _lock_cooperative(session, cooperative_id)  # after the endpoint's lock, as enable_endpoint takes them
        await _check_url_free(session, cooperative_id, url, other_than=endpoint.id)
    before = {"url": endpoint.url, "events": list(endpoint.events or [])}
    values: dict[str, Any] = {"events": chosen if chosen is not None else before["events"]}
    if url is not None and url != endpoint.url:
        values.update(url=url, consecutive_failures=0, updated_at=utcnow())
    else:
        # As rotate_secret: while the endpoint is failing, updated_at says since when (see _finish), and a change
        # of its events must not push back its switching off.
        values["updated_at"] = WebhookEndpoint.updated_at
    await session.execute(update(WebhookEndpoint).where(WebhookEndpoint.id == endpoint.id).values(**values))
    await session.refresh(endpoint)
    after: dict[str, Any] = {"url": endpoint.url, "events": list(endpoint.events or []), "droppedDeliveries": dropped}
    if "url" in values and endpoint.status == "ACTIVE":
        # Those held while the old URL's domain was not approved go to the new one, approved (checked above).
        resumed = await _resume_unqueued(session, endpoint)
        if resumed:
            after["resumedDeliveries"] = resumed
    await record(
        session,
        actor=actor,
        action="webhook_endpoint.updated",
        entity_type="webhook_endpoint",
        entity_id=endpoint.id,
        before=before,
        after=after,
        cooperative_id=cooperative_id,
    )
    return endpoint


async def _check_room(session: AsyncSession, cooperative_id: str, enabling: str | None = None) -> None:
    """Room for one more live endpoint, or Conflict. Live: ACTIVE, or switched off after failures within
    RETRY_FOR (each event still records a delivery held for it: not counting those let a cooperative whose
    endpoints kept failing add new ones without end, each event stored once per endpoint). Deleted ones (DELETE
    only disables) and ones switched off longer ago do not count. Re-enabling one is checked here too. The
    cooperative's row is locked (FOR NO KEY UPDATE: inserts pointing at it are not held) so that two
    registrations at once cannot both take the last place."""
    await _lock_cooperative(session, cooperative_id)
    rows = (
        await session.execute(
            select(WebhookEndpoint.id, WebhookEndpoint.status, WebhookEndpoint.disabled_at).where(
                WebhookEndpoint.cooperative_id == cooperative_id, WebhookEndpoint.status.in_(("ACTIVE", "DISABLED"))
            )
        )
    ).all()
    active = 0
    for endpoint_id, status, disabled_at in rows:
        if endpoint_id == enabling:
            continue  # the one being enabled again: it takes the place it may already hold
        if status == "ACTIVE" or (_still_held(disabled_at) and await disabled_for_failures(session, endpoint_id)):
            active += 1
    if active >= MAX_ENDPOINTS_PER_COOPERATIVE:
        raise Conflict(
            f"a cooperative may have at most {MAX_ENDPOINTS_PER_COOPERATIVE} active webhook endpoints (one "
            "switched off after failures counts while its deliveries are held); disable (DELETE) one first"
        )


async def enable_endpoint(
    session: AsyncSession, *, endpoint_id: str, cooperative_id: str, actor: Actor
) -> WebhookEndpoint:
    endpoint = (
        await session.execute(
            select(WebhookEndpoint)
            .where(WebhookEndpoint.id == endpoint_id, WebhookEndpoint.cooperative_id == cooperative_id)
            .with_for_update()
            .execution_options(populate_existing=True)  # as it is under the lock
        )
    ).scalar_one_or_none()
    if endpoint is None:
        raise NotFound("webhook endpoint not found")
    was_active = endpoint.status == "ACTIVE"
    if not was_active:
        await _check_room(session, cooperative_id, enabling=endpoint.id)
        await _check_url_free(session, cooperative_id, endpoint.url, other_than=endpoint.id)
    endpoint.status, endpoint.consecutive_failures, endpoint.disabled_at = "ACTIVE", 0, None
    await session.flush()
    # What it held while switched off goes out now (an active one's pending deliveries have their jobs).
    resumed = 0 if was_active else await _resume_held(session, endpoint)
    await record(
        session,
        actor=actor,
        action="webhook_endpoint.enabled",
        entity_type="webhook_endpoint",
        entity_id=endpoint.id,
        after={"status": "ACTIVE", "resumedDeliveries": resumed},
        cooperative_id=cooperative_id,
    )
    return endpoint


async def delete_endpoint(
    session: AsyncSession, *, endpoint_id: str, cooperative_id: str, actor: Actor
) -> WebhookEndpoint:
    """DELETE: the endpoint is switched off on purpose. Nothing new is recorded for it and the deliveries
    it still has pending are marked FAILED (a job of one still running finds it so). Deleting one the worker
    switched off after failures makes it deleted; deleting twice changes nothing.

    The deliveries are written before the endpoint, the order a delivery's end takes them (see _finish),
    so that the two cannot wait on each other."""
    endpoint = (
        await session.execute(
            select(WebhookEndpoint).where(
                WebhookEndpoint.id == endpoint_id, WebhookEndpoint.cooperative_id == cooperative_id
            )
        )
    ).scalar_one_or_none()
    if endpoint is None:
        raise NotFound("webhook endpoint not found")
    before = endpoint.status
    if before != "ACTIVE" and not await disabled_for_failures(session, endpoint.id):
        return endpoint  # deleted already
    result = await session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.endpoint_id == endpoint.id, WebhookDelivery.status == "PENDING")
        .values(status="FAILED", updated_at=utcnow())
    )
    dropped = int(result.rowcount)  # type: ignore[attr-defined]
    # Read again under its lock, after the deliveries: an enable committed meanwhile (it locks the row) is seen and
    # undone. Read once before, unlocked, a DELETE racing an enable of an endpoint switched off after failures
    # changed nothing on it and answered DISABLED, and the enable left it ACTIVE, sent every event.
    endpoint = await lock_row(session, WebhookEndpoint, endpoint.id)
    before = endpoint.status
    if before == "ACTIVE":
        endpoint.status, endpoint.disabled_at = "DISABLED", utcnow()
        await session.flush()
    await record(
        session,
        actor=actor,
        action="webhook_endpoint.disabled",
        entity_type="webhook_endpoint",
        entity_id=endpoint.id,
        before={"status": before},
        after={"status": "DISABLED", "reason": REASON_DELETED, "droppedDeliveries": dropped},
        cooperative_id=cooperative_id,
    )
    return endpoint


async def rotate_secret(
    session: AsyncSession,
    cipher: PiiCipher,
    *,
    endpoint_id: str,
    cooperative_id: str,
    actor: Actor,
    overlap: timedelta = ROTATION_OVERLAP,
) -> tuple[WebhookEndpoint, str]:
    """A new signing secret, returned once and stored encrypted. The one it replaces keeps signing (one more
    `v1=`) for `overlap`, so the receiver can switch at its own pace; zero stops it, and every earlier one
    still signing, at once (a leaked secret). Deliveries still pending go out signed with whatever signs when
    they are sent.

    Rotating again during an overlap cuts no earlier secret short: each keeps signing until its own overlap
    ends (a receiver may never have learned the secrets in between). Beyond MAX_PREVIOUS_SECRETS of them at
    once the rotation is refused (Conflict) rather than stop one early."""
    if not timedelta(0) <= overlap <= MAX_ROTATION_OVERLAP:
        raise ValidationError(
            f"the overlap must be between 0 and {MAX_ROTATION_OVERLAP.days * 24} hours", field="overlapHours"
        )
    endpoint = await lock_row(session, WebhookEndpoint, endpoint_id, cooperative_id)  # two at once: in turn
    if endpoint is None:
        raise NotFound("webhook endpoint not found")
    await _refuse_deleted(session, endpoint)
    now = utcnow()
    kept = _previous_after_rotation(endpoint, overlap, now)
    secret = new_secret()
    # A Core UPDATE that leaves updated_at as it is: while the endpoint is failing it says since when (see
    # _finish), and a rotation must not push back its switching off.
    await session.execute(
        update(WebhookEndpoint)
        .where(WebhookEndpoint.id == endpoint.id)
        .values(
            secret_enc=cipher.encrypt(secret, context=endpoint_secret_context(cooperative_id)),
            previous_secrets=kept,
            updated_at=WebhookEndpoint.updated_at,
        )
    )
    await session.refresh(endpoint)
    await record(
        session,
        actor=actor,
        action="webhook_endpoint.secret_rotated",
        entity_type="webhook_endpoint",
        entity_id=endpoint.id,
        after={
            "previousSecretValidUntil": kept[0]["expires_at"] if kept else None,
            "previousSecretsValidUntil": [entry["expires_at"] for entry in kept],
            "overlapSeconds": int(overlap.total_seconds()),
        },
        cooperative_id=cooperative_id,
    )
    return endpoint, secret


def _previous_after_rotation(endpoint: WebhookEndpoint, overlap: timedelta, now: datetime) -> list[dict[str, Any]]:
    """previous_secrets once `endpoint` is rotated with `overlap`: the secret it replaces first (newest first),
    then those still inside their own overlap; expired ones dropped. None at all for a zero overlap."""
    if overlap <= timedelta(0):
        return []
    live = live_previous_secrets(endpoint, now)
    if len(live) >= MAX_PREVIOUS_SECRETS:
        first_free = min(until for entry in live if (until := secret_expiry(entry)) is not None)
        raise Conflict(
            f"{len(live)} earlier secrets of this webhook endpoint still sign deliveries (at most "
            f"{MAX_PREVIOUS_SECRETS}); rotate again after {iso_ms(first_free)}, when the first of them "
            "stops, or with overlapHours 0 to stop them all at once"
        )
    # The current secret is stored as it was: the same key and context as previous secrets.
    return [previous_secret(endpoint.secret_enc, now + overlap), *live]


def _still_held(disabled_at: datetime | None) -> bool:
    """An endpoint switched off after failures records new events (held for when it is enabled) for RETRY_FOR
    from then, as long as a delivery is ever tried; past that, nothing more is kept for it."""
    return disabled_at is None or utcnow() - disabled_at < RETRY_FOR


async def disabled_for_failures(session: AsyncSession, endpoint_id: str) -> bool:
    """True when a DISABLED endpoint was switched off by the worker after failures (its deliveries are held
    and new events recorded), False when an admin deleted it (or it was never switched off by the worker).

    Read from its last `webhook_endpoint.disabled` audit event; those written before the reason was
    recorded tell the worker's (actor "system", with a failure count) from an admin's."""
    row = (
        await session.execute(
            select(AuditEvent.actor, AuditEvent.after)
            .where(
                AuditEvent.entity_type == "webhook_endpoint",
                AuditEvent.entity_id == endpoint_id,
                AuditEvent.action == "webhook_endpoint.disabled",
            )
            .order_by(AuditEvent.id.desc())
            .limit(1)
        )
    ).first()
    return row is not None and _disabled_by_failures(row.actor, row.after)


def _disabled_by_failures(actor: str, after: Any) -> bool:
    """Whether a `webhook_endpoint.disabled` audit row (its actor and after) is the worker's, after failures."""
    after = after if isinstance(after, dict) else {}
    if "reason" in after:
        return bool(after["reason"] == REASON_FAILURES)
    return bool(actor == "system" and "consecutiveFailures" in formatted(after))


async def _resume_held(session: AsyncSession, endpoint: WebhookEndpoint) -> int:
    """Queue a delivery job for every PENDING delivery of an endpoint just enabled, oldest first and
    RESUME_PER_SECOND a second. Each job carries `resumed_at`: the three days of retries count again from
    there, so an event held longer than that still gets its attempts. Jobs still waiting from before (a
    retry due after the endpoint was switched off, or an earlier resume's) are ended as superseded: run
    after the new ones, they would count the retries from the event's creation and could give up on it.
    One running at this moment finishes; its retries too count from this enable (read from the audit log),
    and whichever runs second finds the delivery done (receivers drop duplicates by event id anyway)."""
    superseded = await end_waiting(session, OutboxJob.kind == "webhook.deliver",
                                   OutboxJob.dedupe_key.like(f"whd:{endpoint.id}:%"), status="PENDING",
                                   reason="superseded: the endpoint was enabled again")
    held = (
        await session.execute(
            select(*_HELD)
            .where(WebhookDelivery.endpoint_id == endpoint.id, WebhookDelivery.status == "PENDING")
            .order_by(WebhookDelivery.created_at, WebhookDelivery.id)
        )
    ).all()
    # Each enable its own key: another in the same second (after a switch-off between them) must not find
    # its jobs dropped as duplicates of the earlier enable's, which it has just superseded.
    tag = f"resumed:{_stamp(utcnow())}:{secrets.token_hex(6)}"
    queued = await _queue_resumed(session, endpoint, held, tag)
    if queued:
        log.info("held webhook deliveries resumed", extra={"endpoint_id": endpoint.id, "count": queued,
                                                           "superseded": superseded})
    return queued


async def _resume_unqueued(session: AsyncSession, endpoint: WebhookEndpoint) -> int:
    """Queue a resumed job (as _resume_held) for each PENDING delivery of `endpoint` that no 'webhook.deliver' job
    waits or runs for: those held while its domain was not approved (their jobs ended, see _hold_for_domain).
    One with a job still live is left to it: a job mid-send when the domain was rejected and approved again
    finishes its send, and a second job would send the event twice."""
    live = (
        select(OutboxJob.id)
        .where(
            OutboxJob.kind == "webhook.deliver",
            OutboxJob.status.in_(("PENDING", "RUNNING")),
            OutboxJob.dedupe_key.like(f"whd:{endpoint.id}:%"),
            OutboxJob.payload["event_id"].as_string() == WebhookDelivery.event_id,
        )
        .exists()
    )
    held = (
        await session.execute(
            select(*_HELD)
            .where(WebhookDelivery.endpoint_id == endpoint.id, WebhookDelivery.status == "PENDING", ~live)
            .order_by(WebhookDelivery.created_at, WebhookDelivery.id)
        )
    ).all()
    # Its own key, to the microsecond: an enable's (to the second) in the same second would take the same one.
    queued = await _queue_resumed(session, endpoint, held, f"unheld:{utcnow().strftime('%Y%m%dT%H%M%S%f')}")
    if queued:
        log.info("held webhook deliveries resumed: domain approved", extra={"endpoint_id": endpoint.id,
                                                                            "count": queued})
    return queued


# A held delivery as a resumed job is queued for it (_queue_resumed): its event id, and what its event is about
# (its type and its data's id: the job names its payment or refund, as fan_out's do, core.outbox.job_subject).
_HELD = (WebhookDelivery.event_id, WebhookDelivery.event_type, event_data_id(WebhookDelivery.payload))


async def _queue_resumed(session: AsyncSession, endpoint: WebhookEndpoint, held: Sequence[Any], tag: str) -> int:
    """A job for each of the `held` deliveries (_HELD's rows, oldest first), RESUME_PER_SECOND a second, each
    carrying `resumed_at` and its subject; `tag` ends their dedupe keys."""
    now = utcnow()
    jobs = [
        NewJob(
            "webhook.deliver",
            {"endpoint_id": endpoint.id, "event_id": event_id, "resumed_at": now.isoformat(),
             **_subject_of(event_type, subject_id)},
            dedupe_key=f"whd:{endpoint.id}:{event_id}:{tag}",
            cooperative_id=endpoint.cooperative_id,
            run_at=now + timedelta(seconds=index // RESUME_PER_SECOND),
        )
        for index, (event_id, event_type, subject_id) in enumerate(held)
    ]
    for start in range(0, len(jobs), _RESUME_BATCH):
        await enqueue_many(session, jobs[start : start + _RESUME_BATCH])
    return len(jobs)


# ------------------------------------------------------------------------------------ fan-out, delivery


def stored_event_id(event_id: str) -> str:
    """Event ids longer than the column are replaced by a stable digest, the same on every run."""
    if len(event_id) <= MAX_EVENT_ID:
        return event_id
    return "evt_" + hashlib.sha256(event_id.encode()).hexdigest()[:48]


def envelope(
    event_id: str, event_type: str, cooperative_id: str, data: dict[str, Any], created: str
) -> dict[str, Any]:
    """The body POSTed: `created` is when the event was queued, to the millisecond (core.db.iso_ms). Two
    events about one entity are ordered by their data's `updatedAt` (same format, strictly later for each later
    change: core.notify.changed_at), not by `created` nor by arrival (retries and batches overtake each other)."""
    return {
        "id": event_id,
        "type": event_type,
        "created": created,
        "cooperativeId": cooperative_id,
        "data": data,
    }


def event_subject(event_type: str, payload: Any) -> tuple[str | None, str | None]:
    """What a stored event is about: its kind (its type's first word: "payment", "refund" or "dispute", as
    SUBJECT_TYPES) and that entity's id, from the stored envelope's data. The event id alone does not say it
    once it is a digest (stored_event_id), and a receiver catching up on what it missed needs it.
    (None, None) for a body that names none."""
    kind = event_type.partition(".")[0]
    data = payload.get("data") if isinstance(payload, dict) else None
    subject_id = data.get("id") if isinstance(data, dict) else None
    if kind not in SUBJECT_TYPES or not isinstance(subject_id, str) or not subject_id:
        return None, None
    return kind, subject_id


def _subject_of(event_type: str, subject_id: Any) -> dict[str, str]:
    """A delivery job's payment_id or refund_id (core.outbox.SUBJECT_KEYS): what its event (`event_type`, its data's
    id `subject_id`) is about, which a digested event id no longer names; {} for another (a dispute's)."""
    key = SUBJECT_KEYS.get(event_type.partition(".")[0])
    return {key: subject_id} if key and isinstance(subject_id, str) and subject_id else {}


def _say_domain_skipped(endpoint_id: str, event_id: str) -> None:
    """Warn that the endpoint's domain is no longer approved (its event `event_id` skipped), at most once a
    DOMAIN_SKIP_LOG_SECONDS per endpoint: `skipped` counts the events since the last line, this one included."""
    now = time.monotonic()
    said, skipped = _domain_skip_said.get(endpoint_id, (-math.inf, 0))
    skipped += 1
    if now - said < DOMAIN_SKIP_LOG_SECONDS:
        _domain_skip_said[endpoint_id] = (said, skipped)
        return
    _domain_skip_said[endpoint_id] = (now, 0)
    log.warning("webhook endpoint skipped: domain no longer approved",
                extra={"endpoint_id": endpoint_id, "event_id": event_id, "skipped": skipped})


def _say_domain_approved(endpoint_id: str) -> None:
    """The endpoint's domain is approved again (an event of it recorded): its next rejection is warned about at
    once, and the events skipped since the last warning, which no later one would count, are said now."""
    said = _domain_skip_said.pop(endpoint_id, None)
    if said is not None and said[1]:
        log.warning("webhook endpoint approved again: events skipped since the last warning",
                    extra={"endpoint_id": endpoint_id, "skipped": said[1]})


def body_bytes(payload: dict[str, Any]) -> bytes:
    # The stored envelope serialised the same way on every attempt: retries send identical bytes.
    return json.dumps(payload, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode()


async def fan_out(rt: Runtime, payload: dict[str, Any], job_id: int | None = None) -> int:
    """'webhook.event': one delivery row and one 'webhook.deliver' job per subscribed, approved endpoint.

    An endpoint switched off after failures gets its row and job too: the job holds the delivery until
    the endpoint is enabled (and a row committed with its job is never missed by the enabling). An endpoint
    an admin deleted gets nothing.

    `job_id`, the job's: its data read again under its row's lock before the rows are written. An erasure
    (core.members._erase_events) may have scrubbed it since the worker claimed it (a claimed job can wait for a
    slot), and one scrubbing it now waits for these rows and then scrubs them too; written from the claimed
    copy, the member's account mask and the notes about her went out in deliveries no erasure reached."""
    event_type = payload.get("event_type")
    cooperative_id = payload.get("cooperative_id")
    if event_type not in EVENTS or not cooperative_id or not payload.get("event_id"):
        raise PermanentJobError(f"bad webhook event payload (type {event_type!r})")
    event_id = stored_event_id(str(payload["event_id"]))
    created = str(payload.get("created") or iso_ms(utcnow()))  # queued before events carried it: now
    body = envelope(event_id, event_type, cooperative_id, payload.get("data") or {}, created)
    # The payment or refund each delivery's job is about (core.outbox.job_subject: GET /v1/jobs shows it and finds
    # it by paymentId), which a digested event id no longer names (a flag's, a review's, reported money's).
    subject = _subject_of(event_type, event_subject(event_type, body)[1])
    made = 0
    # The endpoints whose domain is not approved (skipped) and those approved (recorded), said once the rows are
    # committed: a try rolled back (a database error) and run again counted its skipped event twice.
    skipped: list[str] = []
    recorded: list[str] = []
    async with rt.sessionmaker.begin() as session:
        stored = None if job_id is None else await lock_row(session, OutboxJob, job_id)
        if stored is not None and isinstance(stored.payload, dict):
            body["data"] = stored.payload.get("data") or {}
        endpoints = (
            (
                await session.execute(
                    select(WebhookEndpoint).where(
                        WebhookEndpoint.cooperative_id == cooperative_id,
                        WebhookEndpoint.status.in_(("ACTIVE", "DISABLED")),
                    )
                )
            )
            .scalars()
            .all()
        )
        approved = set(
            (
                await session.execute(
                    select(ApprovedDomain.domain).where(
                        ApprovedDomain.cooperative_id == cooperative_id, ApprovedDomain.status == "APPROVED"
                    )
                )
            ).scalars()
        )
        for endpoint in endpoints:
            if not subscribed(endpoint.events or [], event_type, tuple(payload.get("follows") or ())):
                continue
            if endpoint_host(endpoint.url) not in approved:
                skipped.append(endpoint.id)
                continue
            recorded.append(endpoint.id)
            if endpoint.status != "ACTIVE" and not (
                    _still_held(endpoint.disabled_at) and await disabled_for_failures(session, endpoint.id)):
                continue  # deleted by an admin, or switched off for longer than a delivery is ever retried
            now = utcnow()
            stmt = (
                insert_ignore(session.get_bind().dialect.name, WebhookDelivery)
                .values(
                    id=new_id(),
                    cooperative_id=cooperative_id,
                    endpoint_id=endpoint.id,
                    event_id=event_id,
                    event_type=event_type,
                    payload=body,
                    status="PENDING",
                    attempts=[],
                    created_at=now,
                    updated_at=now,
                )
                .on_conflict_do_nothing(index_elements=["endpoint_id", "event_id"])
            )
            await session.execute(stmt)
            await enqueue(
                session,
                "webhook.deliver",
                {"endpoint_id": endpoint.id, "event_id": event_id, **subject},
                dedupe_key=f"whd:{endpoint.id}:{event_id}",
                cooperative_id=cooperative_id,
            )
            made += 1
    for endpoint_id in skipped:
        _say_domain_skipped(endpoint_id, event_id)
    for endpoint_id in recorded:
        _say_domain_approved(endpoint_id)
    return made


async def resolve(host: str, port: int) -> list[str]:
    """The addresses a host name resolves to (the system resolver, as the HTTP client's)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


async def refused_destination(url: str, *, embedded: bool, private: tuple[str, ...] = ()) -> str | None:
    """Why nothing may be sent to `url` (None: send it): its host name resolves to an address that is not
    public (loopback, private, link-local such as 169.254.169.254, ...), nor in one of the operator's `private`
    networks (WEBHOOK_PRIVATE_NETWORKS). An approved domain is a name; what it resolves to can change after
    approval (or point inward from the start): a name on the LAN repointed to another private address, or to
    loopback or the metadata service, is refused as any other.

    An IP literal is not resolved: it is held to the same rule as the addresses a name resolves to, so an endpoint
    on an address of a network the operator has since taken off the list is sent nothing from the next start, as a
    name resolving there is (it was sent to until an admin rejected its domain). A localhost host is resolved as any
    name. In the embedded default (one machine, trying it out) names and addresses may be anywhere.
    The address is checked just before sending, for a clear reason in the attempt; the webhook client
    (core.http.PublicOnlyResolver) checks again the addresses it connects to, so repointing the name in
    between (DNS rebinding) gets nothing sent either.
    """
    parsed = urlparse(url)
    host = (parsed.hostname or "").lower()
    try:
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
    except ValueError as exc:  # a port past 65535, stored before check_url refused it: a recorded failure
        return f"invalid url: {exc}"
    if embedded:
        return None
    if _is_ip(host):
        if refused_address(host, private):
            return f"{host.split('%', 1)[0]} is not a public address: not sent"
        return None
    try:
        addresses = await resolve(host, port)
    except (OSError, ValueError) as exc:
        return f"cannot resolve {host}: {exc}"[:300]
    for text in addresses:
        if refused_address(text, private):
            return f"{host} resolves to {text.split('%', 1)[0]}, which is not a public address: not sent"
    return None if addresses else f"cannot resolve {host}: no address"


def _is_ip(host: str, *, version: int | None = None) -> bool:
    """Whether `host` is an IP address (of that `version`, when given)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return version is None or address.version == version


def retry_delay(failed_attempts: int) -> float:
    """30 s, 1 min, 2 min, ... doubling up to 6 h, with ±10 % jitter so endpoints are not hit in step."""
    base = min(MAX_RETRY_SECONDS, FIRST_RETRY_SECONDS * 2 ** max(0, failed_attempts - 1))
    return base * random.uniform(0.9, 1.1)


async def deliver(rt: Runtime, job: Job) -> str:
    """'webhook.deliver': POST the stored event, record the attempt, retry, give up after three days.

    Safe to run twice (a worker killed mid-delivery): the same stored body and event id go out again,
    and receivers drop the duplicate by event id.
    """
    endpoint_id, event_id = job.payload.get("endpoint_id"), job.payload.get("event_id")
    async with rt.sessionmaker() as session:
        delivery = (
            await session.execute(
                select(WebhookDelivery).where(
                    WebhookDelivery.endpoint_id == endpoint_id, WebhookDelivery.event_id == event_id
                )
            )
        ).scalar_one_or_none()
        endpoint = await session.get(WebhookEndpoint, endpoint_id) if endpoint_id else None
        held = (
            endpoint is not None
            and endpoint.status != "ACTIVE"
            and await disabled_for_failures(session, endpoint.id)
        )
        # Checked at every send, not only at fan-out: a domain rejected after its events were recorded (retries,
        # deliveries resumed by an enable) must not be sent them.
        approval = None if endpoint is None else await domain_status(session, endpoint.cooperative_id, endpoint.url)
    if delivery is None or endpoint is None:
        raise PermanentJobError(f"webhook delivery {endpoint_id}/{event_id} not found")
    if delivery.status != "PENDING":
        return delivery.status.lower()  # already delivered or given up
    if held:
        # Switched off after failures: kept PENDING, not tried; enabling the endpoint queues it again.
        log.info(
            "webhook delivery held: endpoint switched off after failures",
            extra={"endpoint_id": endpoint.id, "event_id": delivery.event_id},
        )
        return "held"
    if endpoint.status != "ACTIVE":
        await _given_up(rt, delivery.id, "endpoint disabled")
        return "endpoint_disabled"
    if not still_subscribed(endpoint.events or [], delivery.event_type):
        # Its event was taken off the endpoint's list (update_endpoint) while it was being recorded: given up as
        # the change gave up those it found, not sent.
        await _given_up(rt, delivery.id, "event no longer subscribed")
        return "unsubscribed"
    url = endpoint.url
    if approval != "APPROVED":
        fresh = await _hold_for_domain(rt, job, endpoint, delivery.event_id)
        if fresh is None:
            return "held"
        url = fresh

    body = body_bytes(delivery.payload)
    keys = signing_secrets(rt.cipher, endpoint)  # the current secret, and each replaced one while it overlaps
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "coop-pay-gateway-webhooks/1",
        SIGNATURE_HEADER: sign(keys[0], body, int(time.time()), *keys[1:]),
        EVENT_ID_HEADER: delivery.event_id,
        EVENT_HEADER: delivery.event_type,
        ATTEMPT_HEADER: str(len(delivery.attempts or []) + 1),
    }
    started = time.perf_counter()
    status_code: int | None = None
    error = await refused_destination(url, embedded=rt.settings.is_embedded,
                                      private=rt.settings.webhook_private_networks)
    if error is None:
        try:
            # The status line is the answer (a 2xx delivers), within DELIVERY_TIMEOUT in all: the body is not
            # read (STATUS_ONLY), and an answer trickled out slower than the client's per-read timeout is cut
            # off here. Otherwise a receiver that answered 200 and then sent its body slowly held the job until
            # the worker cancelled it, nothing recorded, and was sent the event again at each of the job's tries.
            async with asyncio.timeout(DELIVERY_TIMEOUT):
                response = await _client(rt).post(
                    url, content=body, headers=headers, timeout=DELIVERY_TIMEOUT, follow_redirects=False,
                    extensions={STATUS_ONLY: True},
                )
            status_code = response.status_code
            if not 200 <= status_code < 300:
                error = f"HTTP {status_code}"
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            # InvalidURL: a URL registered before check_url refused it; a failure recorded like any other.
            error = f"{type(exc).__name__}: {exc}"[:300] or type(exc).__name__
        except TimeoutError:
            error = f"no answer within {DELIVERY_TIMEOUT:.0f} s"
    latency_ms = int((time.perf_counter() - started) * 1000)
    attempt = {
        "at": utcnow().isoformat(),
        "status_code": status_code,
        "latency_ms": latency_ms,
        "error": error,
    }

    if error is None:
        await _finish(
            rt, delivery.id, status="DELIVERED", attempt=attempt, endpoint_id=endpoint.id, success=True
        )
        return "delivered"

    log.warning(
        "webhook delivery failed",
        extra={
            "endpoint_id": endpoint.id,
            "event_id": delivery.event_id,
            "status_code": status_code,
            "error": error,
        },
    )
    window = await _retries_from(rt, delivery, job)
    # The backoff counts the failures of this window: after a replay or a resume it starts again at 30 s.
    failed_attempts = 1 + sum(
        1
        for a in (delivery.attempts or [])
        if a.get("error") and (parse_aware(a.get("at")) or window) >= window
    )
    delay = retry_delay(failed_attempts)
    give_up = utcnow() + timedelta(seconds=delay) > window + RETRY_FOR
    await _finish(
        rt,
        delivery.id,
        status="FAILED" if give_up else "PENDING",
        attempt=attempt,
        endpoint_id=endpoint.id,
        success=False,
    )
    if give_up:
        raise PermanentJobError(f"webhook {delivery.event_id} not delivered within {RETRY_FOR.days} days")
    # Its attempt given back (RetryLater), as a failed one (failed): listed as waiting and run now (POST
    # /v1/jobs/{id}/replay) once its receiver is fixed.
    raise RetryLater(delay, f"webhook attempt {failed_attempts} failed: {error}", failed=True)


async def _hold_for_domain(rt: Runtime, job: Job, endpoint: WebhookEndpoint, event_id: str) -> str | None:
    """None when the endpoint's domain is still not approved: the delivery is held, left PENDING with no attempt
    recorded, and its job ends DONE saying why (GET /v1/jobs); approving the domain queues it again
    (resume_for_domain). The URL to send it to when its domain was approved meanwhile, or the endpoint's URL
    changed to one on an approved domain.

    Read again with the endpoint's and the domain's rows locked FOR SHARE (SQLite: the write lock), and the job
    ended in the same transaction: an approval, or a PATCH to a URL on an approved domain (each locks the row it
    changes), either commits first, read here, and this job sends, or waits for this job's end, and its resume,
    which queues only deliveries whose job has ended (_resume_unqueued), finds this one."""
    async with rt.sessionmaker.begin() as session:
        await serialise_on_sqlite(session, WebhookEndpoint, endpoint.id)
        url = (
            await session.execute(
                select(WebhookEndpoint.url).where(WebhookEndpoint.id == endpoint.id).with_for_update(read=True)
            )
        ).scalar_one_or_none() or endpoint.url
        host = endpoint_host(url)
        status = (
            await session.execute(_status_of_domain(endpoint.cooperative_id, host).with_for_update(read=True))
        ).scalar_one_or_none()
        if status == "APPROVED":
            return url
        state = status.lower() if status else "not requested"
        await finish_unsent(
            await session.connection(), job,
            f"held: domain {host} is {state}, not approved; sent when a super admin approves it",
        )
    log.warning(
        "webhook delivery held: domain not approved",
        extra={"endpoint_id": endpoint.id, "event_id": event_id, "domain": host, "domain_status": status},
    )
    return None


REPLAYED = "webhook_delivery.replayed"  # audit action: an admin replayed the delivery's parked job
DISCARDED = "webhook_delivery.discarded"  # audit action: an admin discarded it, giving it up (give_up_for_discard)


async def _delivery_of(session: AsyncSession, job: OutboxJob) -> WebhookDelivery | None:
    """The delivery a 'webhook.deliver' job sends (by its endpoint and event id), its row locked."""
    payload = job.payload or {}
    return (
        await session.execute(
            select(WebhookDelivery)
            .where(
                WebhookDelivery.endpoint_id == payload.get("endpoint_id"),
                WebhookDelivery.event_id == payload.get("event_id"),
            )
            .with_for_update()
            .execution_options(populate_existing=True)
        )
    ).scalar_one_or_none()


async def reopen_for_replay(session: AsyncSession, job: OutboxJob, *, actor: Actor) -> None:
    """An admin replays a parked 'webhook.deliver' job (the receiver is fixed), in the replay's transaction.

    The job parked because its delivery was given up on (FAILED after three days, see deliver), and a job
    finds a delivery that is not PENDING done. So the delivery is made PENDING again, and the replay recorded
    in the audit log: its three days of retries, and its backoff, start again from now (_retries_from).
    A delivery that was DELIVERED is left so: the job finds it done and sends nothing."""
    delivery = await _delivery_of(session, job)
    if delivery is None or delivery.status == "DELIVERED":
        return  # the job parks again (not found) or ends at once (delivered already)
    before = delivery.status
    delivery.status = "PENDING"
    await session.flush()
    await record(
        session,
        actor=actor,
        action=REPLAYED,
        entity_type="webhook_delivery",
        entity_id=delivery.id,
        before={"status": before},
        after={"status": "PENDING", "jobId": job.id},
        cooperative_id=delivery.cooperative_id,
    )
    log.info("parked webhook delivery replayed", extra={"endpoint_id": delivery.endpoint_id,
                                                         "event_id": delivery.event_id, "jobId": job.id})


async def give_up_for_discard(session: AsyncSession, job: OutboxJob, *, actor: Actor) -> None:
    """An admin discards a parked 'webhook.deliver' job (admin_api.jobs), in the discard's transaction: its delivery,
    if still PENDING (parked before its three days were up, e.g. a payload the worker could not send), is given up
    on as one past its three days is (FAILED), so the deliveries list and the ops page stop showing it as still to
    go, audited beside the discard. One already FAILED or DELIVERED says so already and is left as it is."""
    delivery = await _delivery_of(session, job)
    if delivery is None or delivery.status != "PENDING":
        return
    delivery.status = "FAILED"
    await session.flush()
    await record(session, actor=actor, action=DISCARDED, entity_type="webhook_delivery", entity_id=delivery.id,
                 before={"status": "PENDING"}, after={"status": "FAILED", "jobId": job.id},
                 cooperative_id=delivery.cooperative_id)


def _client(rt: Runtime) -> httpx.AsyncClient:
    """The client for customers' URLs: the one that connects only to public addresses, outside the embedded
    default. A runtime built without it sends nothing rather than fall back to the unguarded client."""
    if rt.webhook_http is not None:
        return rt.webhook_http
    if rt.settings.is_embedded:
        return rt.http
    raise RuntimeError("no webhook client on this runtime (Runtime.webhook_http): nothing sent")


async def _retries_from(rt: Runtime, delivery: WebhookDelivery, job: Job) -> datetime:
    """When the delivery's three days of retries began: when it was created, when its endpoint was last
    enabled again after holding it, or when an admin last replayed its job (see reopen_for_replay). The job
    says when it was resumed (`resumed_at`); so does the audit log, for a job that was already running when
    the endpoint was enabled and carries no such mark. Replays are read from the audit log only."""
    start = delivery.created_at
    moments = [start]
    resumed = parse_aware(job.payload.get("resumed_at"))
    if resumed is not None:
        moments.append(resumed)
    async with rt.sessionmaker() as session:
        events = (await session.execute(select(AuditEvent.action, AuditEvent.at, AuditEvent.after).where(
            or_(
                and_(AuditEvent.entity_type == "webhook_endpoint", AuditEvent.entity_id == delivery.endpoint_id,
                     AuditEvent.action == "webhook_endpoint.enabled"),
                and_(AuditEvent.entity_type == "webhook_delivery", AuditEvent.entity_id == delivery.id,
                     AuditEvent.action == REPLAYED),
            ),
            AuditEvent.at > start))).all()
    moments.extend(
        at for action, at, after in events
        if action == REPLAYED or (isinstance(after, dict) and formatted(after).get("resumedDeliveries"))
    )
    return max(moments)


async def _given_up(rt: Runtime, delivery_id: str, error: str) -> None:
    """A delivery ended FAILED without being sent (its endpoint switched off or deleted, its event unsubscribed)."""
    await _finish(rt, delivery_id, status="FAILED",
                  attempt={"at": utcnow().isoformat(), "status_code": None, "latency_ms": 0, "error": error})


async def _finish(
    rt: Runtime,
    delivery_id: str,
    *,
    status: str,
    attempt: dict[str, Any],
    endpoint_id: str | None = None,
    success: bool | None = None,
) -> None:
    async with rt.sessionmaker.begin() as session:
        delivery = (
            await session.execute(
                select(WebhookDelivery).where(WebhookDelivery.id == delivery_id).with_for_update()
            )
        ).scalar_one()
        delivery.attempts = [*(delivery.attempts or []), attempt]
        if delivery.status == "PENDING":
            delivery.status = status
            if status == "DELIVERED":
                delivery.delivered_at = utcnow()
        if endpoint_id is None or success is None:
            return
        now = utcnow()
        if success:
            # Only a streak to end is written: a healthy endpoint's row is not locked by every delivery.
            await session.execute(
                update(WebhookEndpoint)
                .where(WebhookEndpoint.id == endpoint_id, WebhookEndpoint.consecutive_failures != 0)
                .values(consecutive_failures=0, updated_at=now)
            )
            return
        # A failure: one more in the streak. The first of a streak sets updated_at and the others leave it,
        # so that while consecutive_failures > 0, updated_at is when the endpoint began failing.
        streak = (
            await session.execute(
                update(WebhookEndpoint)
                .where(WebhookEndpoint.id == endpoint_id, WebhookEndpoint.status == "ACTIVE")
                .values(
                    consecutive_failures=WebhookEndpoint.consecutive_failures + 1,
                    updated_at=case(
                        (WebhookEndpoint.consecutive_failures == 0, literal(now, UTCDateTime)),
                        else_=WebhookEndpoint.updated_at,
                    ),
                )
                .returning(WebhookEndpoint.consecutive_failures, WebhookEndpoint.updated_at)
            )
        ).first()
        if streak is None:
            return  # switched off meanwhile
        failures, failing_since = streak
        if failures >= DISABLE_AFTER and failing_since <= now - DISABLE_AFTER_FAILING_FOR:
            await _disable(rt, session, endpoint_id, failures, failing_since)


async def _disable(
    rt: Runtime, session: AsyncSession, endpoint_id: str, failures: int, failing_since: datetime
) -> None:
    """Switch the endpoint off after failures (its deliveries are held, see deliver) and tell the admin."""
    now = utcnow()
    row = (
        await session.execute(
            update(WebhookEndpoint)
            .where(WebhookEndpoint.id == endpoint_id, WebhookEndpoint.status == "ACTIVE")
            .values(status="DISABLED", disabled_at=now, updated_at=now)
            .returning(WebhookEndpoint.cooperative_id)
        )
    ).scalar_one_or_none()
    if row is None:
        return  # another worker disabled it first
    cooperative_id = row
    await record(
        session,
        actor=Actor("system", "worker"),
        action="webhook_endpoint.disabled",
        entity_type="webhook_endpoint",
        entity_id=endpoint_id,
        after={
            "status": "DISABLED",
            "reason": REASON_FAILURES,
            "consecutiveFailures": failures,
            "failingSince": iso_z(failing_since),
        },
        cooperative_id=cooperative_id,
    )
    log.warning("webhook endpoint disabled", extra={"endpoint_id": endpoint_id, "failures": failures})
    coop = await session.get(Cooperative, cooperative_id)
    if coop is None or not coop.contact_phone:
        log.warning(
            "cooperative has no contact phone; endpoint disabled silently", extra={"endpoint_id": endpoint_id}
        )
        return
    from core.notify import send_sms
    from core.phone import PhoneError, normalize

    try:
        phone = normalize(coop.contact_phone)
    except PhoneError:
        log.warning("cooperative contact phone is invalid", extra={"cooperative_id": cooperative_id})
        return
    await send_sms(
        session,
        template="webhook_disabled",
        cooperative_id=cooperative_id,
        context={"endpoint_id": endpoint_id, "failures": failures},
        cipher=rt.cipher,
        phone=phone,
        dedupe=f"webhook_disabled:{endpoint_id}:{_stamp(now)}",
    )


def _stamp(moment: datetime) -> str:
    return moment.strftime("%Y%m%dT%H%M%S")
