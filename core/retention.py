"""Retention: `main.py prune` deletes operational rows past their period, in small batches, while serving.

What goes, and what stays (each period an environment variable; 0 keeps that kind forever):

- outbox_jobs: DONE jobs finished more than RETENTION_OUTBOX_DONE_DAYS (30) ago, and DISCARDED ones (parked jobs a
  person ended for good, POST /v1/jobs/{id}/discard) discarded as long ago. Never PENDING, RUNNING or PARKED ones
  (PARKED wait for a person). Their dedupe keys go with them: every key is of one event (a payment,
  a refund, an SMS, a sweep slot), and the SMS and the webhook delivery of an event dedupe again on their own rows.
  The walk reads ix_outbox_jobs_ended (migration 0039), which holds the ended jobs in (run_at, id) order.
- ussd_sessions: sessions started and ended more than RETENTION_USSD_SESSIONS_DAYS (90) ago (one the aggregator
  never reported ended counts from its start: a USSD session lasts minutes).
- provider_events: only callbacks for an unknown payment or refund (outcome "unknown_payment" or
  "unknown_refund", no payment; see core.unmatched_callbacks.store_unmatched) received more than
  RETENTION_UNKNOWN_CALLBACKS_DAYS (30) ago, and not one under which money may have moved until a person has
  resolved it (outcome "unknown_payment_resolved" or "unknown_refund_resolved",
  POST /v1/provider-callbacks/{id}/resolve): unresolved, only one whose final word is that no money moved (status
  FAILED, EXPIRED or CANCELLED) goes. A SUCCEEDED one is a member's money at the provider that no payment records,
  or money paid out of the cooperative's account that no refund records; an AMBIGUOUS or PENDING one may be (the
  provider could not tell yet, or the member may approve after it), and nothing of ours asks the provider again
  about a callback that named no payment or refund.
  The others stay: they are the provider's own word on a payment or refund, the money trail a dispute or a
  reconciliation goes back to years later, and they number a few per payment (the payments themselves are kept).
- webhook_deliveries: DELIVERED or FAILED (given up) deliveries created and last changed more than
  RETENTION_WEBHOOK_DELIVERIES_DAYS (30) ago, unless a job not ended still names them (a PARKED webhook.deliver
  job an admin may replay reopens its delivery). PENDING ones never: but those held for an endpoint switched off
  after failures (core.webhooks: kept PENDING, sent when it is enabled) are given up, marked FAILED as a DELETE of
  the endpoint marks them, once it has been off and they were recorded more than RETENTION_WEBHOOK_HELD_DAYS (30)
  ago; the rule above then deletes them as long after. An endpoint nobody enables again records new events for
  three days only (core.webhooks.RETRY_FOR), but what it held would otherwise stay for ever; enabled after that,
  it sends only those kept. Those an ACTIVE endpoint holds while its URL's domain is not approved (rejected, or
  asked for again after a rejection; core.webhooks._hold_for_domain: sent when a super admin approves it) are
  given up the same way once the domain has not been approved since more than RETENTION_WEBHOOK_HELD_DAYS ago
  (the rejection: approved_domains.decided_at, or, asked for again, its last `webhook_domain.rejected` audit row)
  and they were recorded as long ago; approved after that, it sends only those kept.
- sms_messages: the row stays (status, provider status, cost, dates, the masked number: the evidence of what was
  sent); the text of one no longer QUEUED, created more than RETENTION_SMS_BODY_DAYS (180) ago, is emptied, and
  with it the recipient's number (ciphertext and blind index: no number finds the row any more), all personal
  data (the columns are NOT NULL, so ''). A QUEUED one keeps them: its parked job may still be replayed and send
  it. (Rows emptied by a release before this one kept their number: they are not walked again.)
  The walk reads ix_sms_messages_body_kept, which holds only the rows whose text is still there: a run reads
  what is left to empty, not again every row an earlier run emptied.
- used_refresh_tokens: the record of a refresh token's single use (core.auth.refresh), once the token expired a
  day ago (USED_REFRESH_TOKENS_DAYS: not a setting; a spent token is refused as expired from then on, so the row
  has done its work, and before that it must stay). Not configurable: 0 would keep them forever for no reason.
- audit_events: never (append-only by design; PostgreSQL refuses UPDATE and DELETE on it).

Each batch (RETENTION_BATCH_SIZE rows, 5,000) is one short transaction of one statement that repeats every
condition, so a row that changed in between (a delivery reopened by a replay) is left, and no lock is held
for long. The cut-off is taken once, at the start, by the database's clock.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    ColumnElement,
    and_,
    delete,
    exists,
    func,
    literal,
    literal_column,
    or_,
    select,
    true,
    tuple_,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from core.config import ConfigError
from core.db import align_clock, table_of, utcnow
from core.models import (
    ApprovedDomain,
    AuditEvent,
    OutboxJob,
    ProviderEvent,
    SmsMessage,
    UsedRefreshToken,
    UssdSession,
    WebhookDelivery,
    WebhookEndpoint,
)
from core.outbox import ENDED, LIVE
from core.ports import ProviderOutcome
from core.unmatched_callbacks import RESOLVED_OF
from core.webhooks import endpoint_host

DEFAULT_DAYS = {
    "RETENTION_OUTBOX_DONE_DAYS": 30,
    "RETENTION_USSD_SESSIONS_DAYS": 90,
    "RETENTION_UNKNOWN_CALLBACKS_DAYS": 30,
    "RETENTION_WEBHOOK_DELIVERIES_DAYS": 30,
    "RETENTION_WEBHOOK_HELD_DAYS": 30,
    "RETENTION_SMS_BODY_DAYS": 180,
}
DEFAULT_BATCH = 5000
MAX_DAYS = 36_500
# A pause between batches: room for the service's own writes (SQLite has one writer at a time).
PAUSE_SECONDS = 0.01


@dataclass(frozen=True)
class RetentionPolicy:
    """Days each kind is kept (0: forever) and the rows per transaction."""

    outbox_done_days: int = DEFAULT_DAYS["RETENTION_OUTBOX_DONE_DAYS"]
    ussd_sessions_days: int = DEFAULT_DAYS["RETENTION_USSD_SESSIONS_DAYS"]
    unknown_callbacks_days: int = DEFAULT_DAYS["RETENTION_UNKNOWN_CALLBACKS_DAYS"]
    webhook_deliveries_days: int = DEFAULT_DAYS["RETENTION_WEBHOOK_DELIVERIES_DAYS"]
    webhook_held_days: int = DEFAULT_DAYS["RETENTION_WEBHOOK_HELD_DAYS"]
    sms_body_days: int = DEFAULT_DAYS["RETENTION_SMS_BODY_DAYS"]
    batch_size: int = DEFAULT_BATCH


def _whole(env: Mapping[str, str], name: str, default: int, lowest: int, highest: int) -> int:
    raw = (env.get(name) or "").strip()
    if not raw:
        return default
    if not raw.isascii() or not raw.isdigit():
        raise ConfigError(name, f"must be a whole number, got {raw!r}")
    value = int(raw)
    if not lowest <= value <= highest:
        raise ConfigError(name, f"must be from {lowest} to {highest}")
    return value


def load_policy(env: Mapping[str, str] | None = None) -> RetentionPolicy:
    """The RETENTION_* variables (days; 0 keeps that kind forever) and RETENTION_BATCH_SIZE."""
    env = os.environ if env is None else env
    days = {name: _whole(env, name, default, 0, MAX_DAYS) for name, default in DEFAULT_DAYS.items()}
    return RetentionPolicy(
        outbox_done_days=days["RETENTION_OUTBOX_DONE_DAYS"],
        ussd_sessions_days=days["RETENTION_USSD_SESSIONS_DAYS"],
        unknown_callbacks_days=days["RETENTION_UNKNOWN_CALLBACKS_DAYS"],
        webhook_deliveries_days=days["RETENTION_WEBHOOK_DELIVERIES_DAYS"],
        webhook_held_days=days["RETENTION_WEBHOOK_HELD_DAYS"],
        sms_body_days=days["RETENTION_SMS_BODY_DAYS"],
        batch_size=_whole(env, "RETENTION_BATCH_SIZE", DEFAULT_BATCH, 1, 50_000),
    )


@dataclass(frozen=True)
class Pruned:
    """One table's line of the report."""

    table: str
    what: str  # what goes, e.g. "DONE jobs finished before 2026-11-01"
    count: int | None  # None: kept forever (period 0)
    variable: str
    cleared: bool = False  # an UPDATE emptying a column, not a DELETE
    given_up: bool = False  # an UPDATE marking held deliveries FAILED, not a DELETE

    def line(self, *, dry_run: bool) -> str:
        if self.count is None:
            return f"{self.table}: kept ({self.variable}=0)"
        done = "cleared" if self.cleared else "given up" if self.given_up else "deleted"
        verb = f"would be {done}" if dry_run else done
        return f"{self.table}: {self.count} {verb} ({self.what})"


# The conditions of each kind, for a cut-off.

_JOBS = table_of(OutboxJob)
_LIVE_JOB_STATES = LIVE
# The predicate of ix_outbox_jobs_ended (migration 0039), written out rather than bound (as _TEXT_KEPT below): the
# walk reads that index in (run_at, id) order; ix_outbox_due (status, run_at) cannot give two statuses' rows in
# run_at order, and PostgreSQL read the whole table and sorted every old job at each batch.
_ENDED_JOB = _JOBS.c.status.in_([literal_column(f"'{status}'") for status in ENDED])


def _old_jobs(cutoff: datetime) -> ColumnElement[bool]:
    # A DONE job's run_at is before its end, except a waiting job ended early (superseded), which goes once its
    # run_at has passed too. A DISCARDED job's done_at is when a person discarded it: kept as long after that as a
    # DONE job after its end.
    return and_(_ENDED_JOB, _JOBS.c.run_at < cutoff,
                or_(_JOBS.c.done_at < cutoff, and_(_JOBS.c.done_at.is_(None), _JOBS.c.updated_at < cutoff)))


_SESSIONS = table_of(UssdSession)


def _old_sessions(cutoff: datetime) -> ColumnElement[bool]:
    return and_(_SESSIONS.c.started_at < cutoff,
                or_(_SESSIONS.c.ended_at.is_(None), _SESSIONS.c.ended_at < cutoff))


_EVENTS = table_of(ProviderEvent)
# The outcomes core.unmatched_callbacks gives a callback no payment or refund matched (UNMATCHED, UNMATCHED_REFUND), and
# one a person resolved since (UNMATCHED_RESOLVED, UNMATCHED_REFUND_RESOLVED); and the statuses of one saying, for
# good, that no money moved (none taken from a member, none paid out to one). Any other (SUCCEEDED, AMBIGUOUS,
# PENDING, one unknown) may be money moved: kept until resolved.
UNKNOWN_CALLBACKS = tuple(RESOLVED_OF)
UNKNOWN_CALLBACKS_RESOLVED = tuple(RESOLVED_OF.values())
NO_MONEY_MOVED = tuple(o.value for o in (ProviderOutcome.FAILED, ProviderOutcome.EXPIRED, ProviderOutcome.CANCELLED))


def _old_unknown_callbacks(cutoff: datetime) -> ColumnElement[bool]:
    # payment_id IS NULL first: ix_provider_events_payment_id holds the NULLs too (PostgreSQL). One under which
    # money may have moved stays, however old, until a person resolves it: it is the only record of that money.
    return and_(_EVENTS.c.payment_id.is_(None), _EVENTS.c.received_at < cutoff,
                or_(_EVENTS.c.outcome.in_(UNKNOWN_CALLBACKS_RESOLVED),
                    and_(_EVENTS.c.outcome.in_(UNKNOWN_CALLBACKS), _EVENTS.c.status.in_(NO_MONEY_MOVED))))


_DELIVERIES = table_of(WebhookDelivery)


def _finished_deliveries(cutoff: datetime) -> ColumnElement[bool]:
    return and_(_DELIVERIES.c.created_at < cutoff, _DELIVERIES.c.status.in_(("DELIVERED", "FAILED")),
                _DELIVERIES.c.updated_at < cutoff)


def _named_by_a_job() -> ColumnElement[bool]:
    # A webhook.deliver job names its delivery by endpoint and event id (core.webhooks); one not DONE (waiting,
    # running, or parked for an admin's replay, which reopens the delivery) keeps it.
    return exists().where(
        _JOBS.c.status.in_(_LIVE_JOB_STATES), _JOBS.c.kind == "webhook.deliver",
        _JOBS.c.payload["endpoint_id"].as_string() == _DELIVERIES.c.endpoint_id,
        _JOBS.c.payload["event_id"].as_string() == _DELIVERIES.c.event_id)


def _old_deliveries(cutoff: datetime) -> ColumnElement[bool]:
    return and_(_finished_deliveries(cutoff), ~_named_by_a_job())


_ENDPOINTS = table_of(WebhookEndpoint)


def _held_deliveries(cutoff: datetime) -> ColumnElement[bool]:
    return and_(_DELIVERIES.c.created_at < cutoff, _DELIVERIES.c.status == "PENDING")


def _held_too_long(cutoff: datetime) -> ColumnElement[bool]:
    # A DISABLED endpoint's PENDING deliveries are those held after failures: a DELETE marks its own FAILED. Off
    # since before the cut-off too: one switched off again just after an enable keeps what that enable resumed.
    switched_off = exists().where(_ENDPOINTS.c.id == _DELIVERIES.c.endpoint_id, _ENDPOINTS.c.status == "DISABLED",
                                  _ENDPOINTS.c.disabled_at < cutoff)
    return and_(_held_deliveries(cutoff), switched_off)


_DOMAINS = table_of(ApprovedDomain)
_AUDIT = table_of(AuditEvent)


def _held_for_domain(cutoff: datetime, endpoint_ids: Collection[str]) -> ColumnElement[bool]:
    # Those of the ACTIVE endpoints `endpoint_ids` (_not_approved_for_long) no job waits or runs for: held, their
    # jobs ended (core.webhooks._hold_for_domain), as an approval finds them to resume (_resume_unqueued).
    active = exists().where(_ENDPOINTS.c.id == _DELIVERIES.c.endpoint_id, _ENDPOINTS.c.status == "ACTIVE")
    return and_(_held_deliveries(cutoff), _DELIVERIES.c.endpoint_id.in_(list(endpoint_ids)), active,
                ~_named_by_a_job())


async def _not_approved_for_long(conn: AsyncConnection, cutoff: datetime, among: ColumnElement[bool] | None = None
                                 ) -> set[str]:
    """The ACTIVE endpoints (of `among`, locked FOR SHARE with their domains' rows: an approval's lock) whose URL's
    domain has not been approved for their cooperative since before `cutoff`: REJECTED then (approved_domains
    .decided_at), or PENDING again after a rejection then (decided_at is emptied by the request: the last
    `webhook_domain.rejected` audit row says when). One on no domain row, or PENDING with no such row, is kept."""
    query = select(_ENDPOINTS.c.id, _ENDPOINTS.c.cooperative_id, _ENDPOINTS.c.url).where(
        _ENDPOINTS.c.status == "ACTIVE")
    if among is not None:
        query = query.where(among).with_for_update(read=True)
    endpoints = [(id_, cooperative_id, endpoint_host(url)) for id_, cooperative_id, url in await conn.execute(query)]
    if not endpoints:
        return set()
    domains = select(_DOMAINS.c.id, _DOMAINS.c.cooperative_id, _DOMAINS.c.domain, _DOMAINS.c.status,
                     _DOMAINS.c.decided_at).where(_DOMAINS.c.cooperative_id.in_({c for _, c, _ in endpoints}),
                                                  _DOMAINS.c.domain.in_({h for _, _, h in endpoints}))
    if among is not None:
        domains = domains.with_for_update(read=True)
    rows = (await conn.execute(domains)).all()
    pending = [row.id for row in rows if row.status == "PENDING"]
    rejected = dict((await conn.execute(
        select(_AUDIT.c.entity_id, func.max(_AUDIT.c.at)).where(
            _AUDIT.c.entity_type == "approved_domain", _AUDIT.c.entity_id.in_(pending),
            _AUDIT.c.action == "webhook_domain.rejected").group_by(_AUDIT.c.entity_id))).all()) if pending else {}
    since = {(row.cooperative_id, row.domain): row.decided_at if row.status == "REJECTED" else rejected.get(row.id)
             for row in rows if row.status != "APPROVED"}
    return {id_ for id_, cooperative_id, host in endpoints
            if (moment := since.get((cooperative_id, host))) is not None and moment < cutoff}


_USED_REFRESH = table_of(UsedRefreshToken)
USED_REFRESH_TOKENS_DAYS = 1  # past the token's expiry (core.auth.LEEWAY is seconds): fixed, not a setting


def _expired_refresh_uses(cutoff: datetime) -> ColumnElement[bool]:
    return _USED_REFRESH.c.expires_at < cutoff


_SMS = table_of(SmsMessage)


# The predicate of ix_sms_messages_body_kept (migration 0013), written out rather than bound: the index holds only
# the rows whose text is still there, so a run reads what is left to empty, not every row an earlier run emptied;
# PostgreSQL can use a partial index for `body <> $1` only while it plans for that value, not for a reused plan.
_TEXT_KEPT = _SMS.c.body != literal_column("''")


def _old_sms_bodies(cutoff: datetime) -> ColumnElement[bool]:
    return and_(_SMS.c.created_at < cutoff, _SMS.c.status != "QUEUED", _TEXT_KEPT)


Condition = Callable[[datetime], ColumnElement[bool]]


@dataclass(frozen=True)
class _Kind:
    table: Any
    variable: str
    days: Callable[[RetentionPolicy], int]
    condition: Condition  # every condition, checked again as each row is deleted
    what: str  # with {cutoff}
    order: Any = None  # the indexed column the rows are walked by, oldest first (None: no usable index)
    pick: Condition | None = None  # the part of `condition` that walk reads by that index (None: all of it)
    label: str = ""  # the report's name, when not the table's
    gives_up: bool = False  # marks the rows FAILED (held webhook deliveries), not deleted
    # Held while a domain is not approved: `condition` of the endpoints _not_approved_for_long finds (read in
    # Python: an endpoint's domain is its URL's, core.webhooks.endpoint_host), and read again by each batch.
    for_domain: Callable[[datetime, Collection[str]], ColumnElement[bool]] | None = None


KINDS = (
    _Kind(_JOBS, "RETENTION_OUTBOX_DONE_DAYS", lambda p: p.outbox_done_days, _old_jobs,
          "DONE or DISCARDED jobs finished before {cutoff}", _JOBS.c.run_at),
    _Kind(_SESSIONS, "RETENTION_USSD_SESSIONS_DAYS", lambda p: p.ussd_sessions_days, _old_sessions,
          "sessions ended before {cutoff}", _SESSIONS.c.started_at),
    _Kind(_EVENTS, "RETENTION_UNKNOWN_CALLBACKS_DAYS", lambda p: p.unknown_callbacks_days, _old_unknown_callbacks,
          "callbacks for unknown payments or refunds received before {cutoff}, but not unresolved ones saying "
          "money was taken or paid out, or may have been (AMBIGUOUS, PENDING); the others are kept"),
    _Kind(_DELIVERIES, "RETENTION_WEBHOOK_DELIVERIES_DAYS", lambda p: p.webhook_deliveries_days, _old_deliveries,
          "delivered or given up, last changed before {cutoff}", _DELIVERIES.c.created_at, _finished_deliveries),
    # After the deletion above: those given up now go as long after as the others.
    _Kind(_DELIVERIES, "RETENTION_WEBHOOK_HELD_DAYS", lambda p: p.webhook_held_days, _held_too_long,
          "held for endpoints switched off after failures, both before {cutoff}; marked FAILED",
          _DELIVERIES.c.created_at, _held_deliveries, label="webhook_deliveries held", gives_up=True),
    _Kind(_DELIVERIES, "RETENTION_WEBHOOK_HELD_DAYS", lambda p: p.webhook_held_days, _held_deliveries,
          "held while their endpoints' domains were not approved, both since before {cutoff}; marked FAILED",
          _DELIVERIES.c.created_at, _held_deliveries, label="webhook_deliveries held for a domain", gives_up=True,
          for_domain=_held_for_domain),
    _Kind(_USED_REFRESH, "", lambda p: USED_REFRESH_TOKENS_DAYS, _expired_refresh_uses,
          "uses of refresh tokens expired before {cutoff}", _USED_REFRESH.c.expires_at),
)


async def _count(engine: AsyncEngine, table: Any, condition: ColumnElement[bool]) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(table).where(condition))).scalar_one())


Apply = Callable[[AsyncConnection, list[Any], ColumnElement[bool]], Awaitable[int]]


async def _walk(engine: AsyncEngine, table: Any, pick: ColumnElement[bool], order: Any, batch: int,
                apply: Apply) -> int:
    """Per transaction: the ids of up to `batch` rows matching `pick`, then `apply` to them (which checks every
    condition again: a row changed meanwhile, e.g. a delivery reopened by a replay, is left). Until a batch
    comes short.

    With `order`, the rows are walked once, oldest first by (order, id) from where the last batch ended: its
    index finds them, a row `apply` leaves is not read again (the row comparison `(order, id) > (last)` is an
    index condition; written `order > last OR (order = last AND id > last id)`, it was a filter, and each batch
    read the index again from the period's start, over the rows the batches before had deleted or emptied), and
    `apply` is also given the batch's upper bound on `order` so that PostgreSQL's DELETE reads that index over
    the batch's range only (with the whole period it read every old row at every batch). Without `order` (no
    usable index), each batch searches again.
    The ids are sent as a list: a DELETE ... IN (subquery) scanned every eligible row per batch."""
    total, after = 0, None
    while True:
        if order is None:
            query = select(table.c.id, literal(None)).where(pick).limit(batch)
        else:
            where = pick if after is None else and_(pick, tuple_(order, table.c.id) > after)
            query = select(table.c.id, order).where(where).order_by(order, table.c.id).limit(batch)
        async with engine.begin() as conn:
            rows = (await conn.execute(query)).all()
            if rows:
                bound = true() if order is None else order <= rows[-1][1]
                total += await apply(conn, [row[0] for row in rows], bound)
        if len(rows) < batch:
            return total
        after = (rows[-1][1], rows[-1][0])
        await asyncio.sleep(PAUSE_SECONDS)


def _deleting(table: Any, condition: ColumnElement[bool]) -> Apply:
    async def apply(conn: AsyncConnection, ids: list[Any], bound: ColumnElement[bool]) -> int:
        return int((await conn.execute(delete(table).where(table.c.id.in_(ids), bound, condition))).rowcount)

    return apply


def _giving_up(condition: ColumnElement[bool], now: datetime, cutoff: datetime,
               for_domain: Callable[[datetime, Collection[str]], ColumnElement[bool]] | None = None) -> Apply:
    async def apply(conn: AsyncConnection, ids: list[Any], bound: ColumnElement[bool]) -> int:
        held = condition
        # Their endpoints read under the lock an enable takes (core.webhooks.enable_endpoint: FOR UPDATE), taken
        # after the deliveries' (the order a DELETE and a delivery's end take them): an enable under way is waited
        # for, and the UPDATE below (PostgreSQL: a statement reads what was committed before it) sees it ACTIVE and
        # leaves what it resumed; one after this commit reads them FAILED. Unlocked, the UPDATE read the endpoint as
        # DISABLED while an enable was committing and gave up what it had just queued to send. (SQLite: one writer
        # at a time already.)
        await conn.execute(select(_DELIVERIES.c.id).where(_DELIVERIES.c.id.in_(ids), bound, condition)
                           .with_for_update())
        theirs = _ENDPOINTS.c.id.in_(select(_DELIVERIES.c.endpoint_id).where(_DELIVERIES.c.id.in_(ids)))
        if for_domain is None:
            await conn.execute(select(_ENDPOINTS.c.id).where(theirs, _ENDPOINTS.c.status == "DISABLED")
                               .with_for_update(read=True))
        else:
            # Held for a domain: their endpoints then their domains' rows read again under those locks, in that
            # order (the one core.webhooks._hold_for_domain takes them in; an approval locks the domain's row
            # only, core.webhooks.approve_domain). An approval under way is waited for and read APPROVED: what it
            # resumed is left (the UPDATE's condition, of the endpoints still found); one after this commit reads
            # them FAILED (_resume_unqueued: PENDING only). Likewise a PATCH to a URL on an approved domain.
            held = and_(condition, for_domain(cutoff, await _not_approved_for_long(conn, cutoff, theirs)))
        # As a DELETE of the endpoint gives up what it held (core.webhooks.delete_endpoint): no attempt recorded.
        statement = (update(_DELIVERIES).where(_DELIVERIES.c.id.in_(ids), bound, held)
                     .values(status="FAILED", updated_at=now))
        return int((await conn.execute(statement)).rowcount)

    return apply


def _clearing(condition: ColumnElement[bool]) -> Apply:
    async def apply(conn: AsyncConnection, ids: list[Any], bound: ColumnElement[bool]) -> int:
        # The number goes with the text: kept, it would tie the row to its recipient for ever.
        statement = (update(_SMS).where(_SMS.c.id.in_(ids), bound, condition)
                     .values(body="", phone_enc="", phone_index=""))
        return int((await conn.execute(statement)).rowcount)

    return apply


async def prune(engine: AsyncEngine, policy: RetentionPolicy, *, dry_run: bool = False,
                now: datetime | None = None) -> list[Pruned]:
    """Apply `policy` (count only with `dry_run`); one Pruned per table, in the order they are done."""
    if now is None:
        await align_clock(engine)
        now = utcnow()
    report = []
    for kind in KINDS:
        name = kind.label or kind.table.name
        days = kind.days(policy)
        if not days:
            report.append(Pruned(name, "", None, kind.variable))
            continue
        cutoff = now - timedelta(days=days)
        condition = kind.condition(cutoff)
        if kind.for_domain is not None:
            async with engine.connect() as conn:
                condition = kind.for_domain(cutoff, await _not_approved_for_long(conn, cutoff))
        pick = condition if kind.pick is None else kind.pick(cutoff)
        apply = (_giving_up(condition, now, cutoff, kind.for_domain) if kind.gives_up
                 else _deleting(kind.table, condition))
        count = (await _count(engine, kind.table, condition) if dry_run
                 else await _walk(engine, kind.table, pick, kind.order, policy.batch_size, apply))
        report.append(Pruned(name, kind.what.format(cutoff=_day(cutoff)), count, kind.variable,
                             given_up=kind.gives_up))
    if not policy.sms_body_days:
        report.append(Pruned(_SMS.name, "", None, "RETENTION_SMS_BODY_DAYS", cleared=True))
    else:
        cutoff = now - timedelta(days=policy.sms_body_days)
        count = (await _count(engine, _SMS, _old_sms_bodies(cutoff)) if dry_run
                 else await _walk(engine, _SMS, _old_sms_bodies(cutoff), _SMS.c.created_at, policy.batch_size,
                                  _clearing(_old_sms_bodies(cutoff))))
        report.append(Pruned(_SMS.name, f"texts and numbers of SMS created before {_day(cutoff)}; the rows and masks "
                                        "are kept", count, "RETENTION_SMS_BODY_DAYS", cleared=True))
    return report


def _day(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC")
