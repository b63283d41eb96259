"""Outbox jobs for messaging: 'sms.send' (templated, throttled, sent once) and the webhook jobs.

What a failed send leaves, so that a message is neither lost nor doubled:
- nothing left (no connection, AT refused it for now, our account refused): the row stays QUEUED and
  the outbox retries; when the attempts run out the job is parked and the row keeps saying why
  (provider_status RetriesExhausted, failure_reason), still QUEUED, so replaying the job sends it;
- the request went out but its answer was lost (read timeout, broken answer, an HTTP 504 from AT's front
  end, a job cut off mid-send):
  AT may have queued it and has no idempotency key, so it is not sent again. The row is recorded SENT
  without a provider message id (provider_status Unconfirmed, failure_reason says why) and the job ends;
- AT answered but writing the outcome failed (the database went away under the write): AT has it, so it
  is not sent again either. The attempt fails as interrupted (Job.interrupted), and AT's answer is kept in
  Redis (the message's answer key, message_keys) so the next attempt records it, AT's message id and all,
  without a request. Should that key be gone, the interrupted attempt is enough: the next one records the
  message Unconfirmed;
- the row lost after the send (PostgreSQL restored to a point before it, its job with it, pending again): AT's
  answer is kept under that key after every send that AT may have (accepted, or unconfirmed) for ANSWER_SECONDS,
  so the job, run again, finds it before sending and stores the row again as SENT with that answer.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import random
import time
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, NamedTuple

from redis.exceptions import AuthenticationError, OutOfMemoryError, ReadOnlyError, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy import DateTime, String, and_, bindparam, case, func, literal, null, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from channels.sms.encoding import measure
from channels.sms.routes import (
    COUNTED_AT,
    GIVE_BACK_JOB,
    STATUS_REPLY_TEMPLATES,
    apply_parked_reports,
    give_back_reply,
    parked_key,
)
from channels.sms.sender import SmsAccountError, SmsNotSentError, SmsTemporaryError, SmsUnconfirmedError
from channels.sms.templates import (
    OPTIONAL_TEMPLATES,
    TEMPLATES,
    PaymentFacts,
    TemplateError,
    build_message,
    is_payment_template,
    payment_values,
    recipient,
    render,
)
from core import metrics, pgraw
from core.audit import Actor
from core.db import autocommit, insert_ignore, new_id, utcnow
from core.disputes import DISPUTE_TEMPLATES
from core.errors import INVALID_STATE, Conflict
from core.members import (
    ERASED_SMS_REASON,
    RELEASED_SMS_REASON,
    PhoneReleased,
    number_came_since_rows,
    number_opted_out,
)
from core.models import Cooperative, Dispute, Member, OutboxJob, Payment, PaymentType, Refund, SmsMessage
from core.notify import SMS_KEY_SIZE, SMS_PHONE_CONTEXT
from core.outbox import (
    CALL_SENT,
    CALL_STARTED,
    DISCARDED_BY,
    INTERRUPTED,
    Handler,
    Job,
    NewJob,
    PermanentJobError,
    RetryLater,
    enqueue_job,
    finish_queueing,
    finish_unsent,
)
from core.ratelimit import Limit, RateLimiter
from core.refunds import OLDER_THAN_ANSWER_DAYS, REFUND_TEMPLATES
from core.reminders import why_not_send
from core.state import StaleTransition, transition, transition_alone
from core.state.payment import MoneyState, PaymentStatus, holds_money
from core.state.refund import RefundStatus
from core.state.sms import RETRIES_EXHAUSTED, SENT_UNCONFIRMED, SKIPPED, SMS, SmsStatus

if TYPE_CHECKING:
    from core.phone import Phone
    from core.runtime import Runtime

log = logging.getLogger("gateway.sms.jobs")
WORKER = Actor("system", "worker")
# The shortest a message's send lock is held (a crashed run's lock expires on its own).
SEND_LOCK_SECONDS = 30
# How long AT's answer for a message is kept (message_keys), from every send AT may have: past the job's retries
# (hours, when its account's problems make it wait), a week for a replay of the parked job, and for a PostgreSQL
# restored to a point up to a week back, whose jobs pending then run again (their rows lost: stored again from the
# answer, not resent). ~380 bytes of Redis a message: ~27 MB at 10,000 messages a day. Without it a retry still
# does not send (the job is interrupted): Unconfirmed.
ANSWER_SECONDS = 7 * 24 * 3600
# While Redis cannot be used before a send (down, restarting, loading its data, failing over, or full and refusing
# writes), a message is not sent (its send rate's slot and send lock live there) and its job is tried again this many
# seconds later (a random value between the two) without using an attempt, as a worker whose database is away claims
# nothing. Its 10 attempts (core.notify: ~8 to 17 minutes of backoff) bound Africa's Talking refusing a message; spent
# on a Redis outage as long, they parked every receipt of its first minutes, sent only when an operator replayed them.
REDIS_AWAY_RETRY_SECONDS = (10.0, 30.0)
# The warning that sends wait for Redis: at most once in this many seconds per process.
REDIS_AWAY_LOG_SECONDS = 60.0
_redis_away_said = -math.inf


def redis_away(exc: BaseException) -> bool:
    """Is `exc` Redis out of reach or refusing writes for now (an outage, not a fault of the message or of our
    code)? A refused password is not: it does not pass by waiting, and parks as before."""
    if isinstance(exc, AuthenticationError):
        return False
    if isinstance(exc, RedisConnectionError | RedisTimeoutError | ReadOnlyError | OutOfMemoryError):
        return True
    # The multiplexed client (core.redis_mux) answers a full Redis's "OOM command not allowed ..." as a ResponseError.
    return isinstance(exc, ResponseError) and str(exc).startswith("OOM ")


@contextlib.asynccontextmanager
async def _waits_for_redis(job: Job) -> AsyncIterator[None]:
    """Around everything before the send: Redis away (redis_away) is RetryLater, not a failed attempt. Nothing was
    sent then (the send comes after), so trying again later can double nothing. Not for an attempt after one cut off
    mid-send (Job.interrupted), which fails as before: its failure hands the doubt on as interrupted, whereas a
    RetryLater's last error (core.outbox._doubt_kept) is no longer read as interrupted, and the attempt after the
    outage would have sent AT the message again."""
    global _redis_away_said
    try:
        yield
    except RedisError as exc:
        if not redis_away(exc) or job.interrupted:
            raise
        now = time.monotonic()
        if now - _redis_away_said >= REDIS_AWAY_LOG_SECONDS:
            _redis_away_said = now
            log.warning("SMS sends wait for Redis: not sent, tried again without using their attempts",
                        extra={"job_id": job.id, "error": f"{type(exc).__name__}: {exc}"[:300]})
        raise RetryLater(random.uniform(*REDIS_AWAY_RETRY_SECONDS),
                         f"waiting for Redis ({type(exc).__name__}): not sent") from exc


def message_key(payload: dict[str, Any]) -> str:
    """The message's idempotency key: core puts its dedupe key in payload['key']; else a digest of the
    fields that identify the message (phone_enc is left out: it is encrypted with a fresh nonce)."""
    if payload.get("key"):
        return str(payload["key"])[:SMS_KEY_SIZE]
    ident = {k: payload.get(k) for k in ("template", "cooperative_id", "member_id", "context")}
    return "auto:" + hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()


def message_keys(key: str) -> tuple[str, str]:
    """The message's Redis keys: its send lock, and where AT's answer is kept once it may have the message (see
    ANSWER_SECONDS). One hash tag, so a cluster keeps them on one slot (one pipeline)."""
    digest = hashlib.sha256(key.encode()).hexdigest()[:32]
    return f"sms:lock:{{{digest}}}", f"sms:answer:{{{digest}}}"


class Answer(NamedTuple):
    """What AT answered for a message, kept for any later run of its job: accepted (its id, which may be None,
    status, cost, when), or unconfirmed (`cause` set: AT may have it)."""

    provider_message_id: str | None = None
    provider_status: str | None = None
    cost: str | None = None
    sent_at: str | None = None  # ISO 8601, UTC
    cause: str | None = None

    def dump(self) -> str:
        return json.dumps(self._asdict())

    @classmethod
    def load(cls, raw: bytes | str | None) -> Answer | None:
        """The kept answer, None when there is none (or it cannot be read: the job's interrupted last error
        still stops a resend, and the message is recorded Unconfirmed)."""
        if raw is None:
            return None
        try:
            data = json.loads(raw)
            return cls(**{k: data.get(k) for k in cls._fields})
        except (ValueError, TypeError, AttributeError):
            log.error("unreadable kept SMS answer ignored")
            return None


class SmsOutcomeNotRecorded(Exception):
    """AT may have the message (it accepted it, or its answer was lost) and writing that outcome failed.
    Raised after the doubt is marked on the job (Job.mark_call_started), so the outbox records the attempt as
    interrupted and the next one does not send it again."""


def send_lock_seconds(lease_seconds: float) -> int:
    """How long a message's send lock lasts: at least the outbox lease, so that a run whose worker was lost
    mid-send still holds it when its job is claimed again (the next claim comes only after the lease)."""
    return max(SEND_LOCK_SECONDS, math.ceil(lease_seconds))


def send_limit(rate_per_second: float) -> Limit:
    """A fixed window per sender id: `rate` per second, or one per ceil(1/rate) seconds when below 1."""
    if rate_per_second >= 1:
        return Limit("sms:send", count=math.floor(rate_per_second), window=1, sliding=False)
    return Limit("sms:send", count=1, window=math.ceil(1 / rate_per_second), sliding=False)


class SmsJobs:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.limiter = RateLimiter(rt.hot_redis, prefix="rl")
        self.limit = send_limit(rt.settings.sms_rate_per_second)
        self.sender_id = rt.settings.sms_sender_id or rt.settings.sms_username
        self.lock_seconds = send_lock_seconds(rt.settings.outbox_lease_seconds)

    async def throttle_and_lock(self, lock: str, holder: str, answer: str | None = None) -> Answer | None:
        """Take a slot of the sender id's send rate and the message's send lock, in one round trip.

        With `answer` (the message's answer key, message_keys), the answer an earlier run kept is read in the
        same round trip: when there is one, it is returned and the lock is not kept (the caller records it,
        nothing is sent)."""
        redis = self.rt.hot_redis

        def then(pipe: Any) -> None:
            pipe.set(lock, holder, nx=True, ex=self.lock_seconds)
            if answer is not None:
                pipe.get(answer)

        decision, (locked, *kept) = await self.limiter.hit_then(self.limit, self.sender_id, then)
        found = Answer.load(kept[0]) if kept else None
        if found is not None:
            if locked:
                await redis.delete(lock)
            return found
        if not decision.allowed:
            if locked:
                await redis.delete(lock)
            raise RetryLater(max(0.2, float(decision.retry_after)), "SMS send rate reached for sender id")
        if not locked:
            # Two runs of one message at once (a lease that lapsed mid-send) must not both send it.
            raise RetryLater(self.lock_seconds, "message is being sent by another worker")
        return None

    async def send(self, job: Job) -> None:
        rt = self.rt
        payload = job.payload
        key = message_key(payload)
        # The previous attempt was cut off, lost with its worker, or failed after AT may have had the message:
        # should this one fail before it settles that (even at the read below), the doubt is handed on.
        doubt = job.interrupted
        if doubt:
            job.mark_call_started()
        if rt.sms is None:
            # Parked saying the doubt too (a park's error is written as it is): parked as "no SMS sender" alone, a
            # discard read it as never sent (Skipped, a keyword reply's count given back while the lost run's request
            # went: fail_for_discard), and a replay sent it again.
            raise PermanentJobError(f"{INTERRUPTED}: {NO_SENDER}" if doubt else NO_SENDER)
        # One connection, in autocommit, for everything before the send: each statement is its own
        # transaction (as each read was under READ COMMITTED) without a BEGIN and a ROLLBACK/COMMIT
        # around it, and without a pool checkout (a ping) per step. It is released before the HTTP call.
        async with _waits_for_redis(job), autocommit(rt.engine) as conn:
            existing = await _first(conn, _BY_KEY, {"k": key})
            lock, kept = message_keys(key)
            if existing is not None and existing.status != SmsStatus.QUEUED.value:
                if existing.status == SmsStatus.FAILED.value:  # a person's "not sent" beside a send: _held_back_sent
                    await self._held_back_sent(job, existing.id, kept)
                return  # sent (or refused) already: a duplicate job or a re-run after a crash
            if existing is None:
                job.call_started.clear()  # never stored, so never sent: this is a first send
            elif await self._settled_before(job, existing, kept, doubt):
                return
            # Checked on every attempt: a reminder retried through an aggregator outage is exactly the one whose
            # member may have paid or sent STOP, or whose day may be over, by now; a welcome, one whose member
            # was suspended since.
            template = payload.get("template")
            reminder = template in OPTIONAL_TEMPLATES
            void = None
            if payload.get("member_id"):
                if reminder:
                    # REMINDERS_ENABLED off stops the reminders already queued too, not only the next scans.
                    void = await why_not_send(conn, payload) if self.rt.settings.reminders_enabled else "reminders_off"
                elif template in MEMBER_TEMPLATES:
                    void = await _member_void(conn, payload)
                elif existing is not None and template in STALE_TEMPLATES:
                    # Built by an earlier attempt (a first one's build checks it: _build), and retried through an
                    # aggregator outage: its payment may have been voided (a receipt), or paid (a failure), since.
                    void = await _receipt_void(conn, payload)
                elif template == REFUND_FAILED:
                    void = await _refund_void(conn, payload)
            elif template in PAYER_TEMPLATES and (existing is not None or not is_payment_template(template)):
                # To the number that paid a payment of no member: a member may have got it since it was queued, or
                # the payment turned older than SMS_PAYER_ANSWER_DAYS (and a receipt's payment may have been voided
                # since). A payment's own SMS is asked on a retry only: a first attempt's build reads it with the
                # payment's facts, in the same query (_build).
                void = await _payer_void(conn, payload, self.rt.settings.sms_payer_answer_days)
            if void is None and template in SWITCH_REPLIES:
                void = await _switch_void(rt, conn, payload)
            if void is not None:
                if existing is None and await self._sent_before_restore(conn, job, payload, key, kept):
                    return  # it went out before a restore lost its row: stored again as sent, whatever stops it now
                if reminder:
                    metrics.REMINDERS_SKIPPED.labels(reason=void).inc()
                log.info("reminder not sent" if reminder else "member SMS not sent",
                         extra={"member_id": payload.get("member_id"), "reason": void,
                                "template": payload.get("template")})
                # A keyword's reply switched since gives its count back through a GIVE_BACK_JOB that commits
                # with the reply's end: given back after it only (Redis, best effort), a worker lost or Redis failing
                # in between left it counted for good. At once too, once that end has committed (best effort: the
                # job is the durable way), so her next keyword is not refused by a count the job gives back only at
                # the worker's next poll; once in all (give_back_reply's mark), as the inbound route's.
                given_back = (_give_back_jobs(job.id, payload, payload.get("cooperative_id"))
                              if void == SWITCHED_SINCE else [])
                queued = False
                if existing is not None:  # an earlier attempt stored it: it ends here, unsent (for a reminder,
                    # SKIPPED: not sent, so the next morning's scan may queue its due date again), the give-back
                    # queued by the move itself (none when another run or a discard moved it first: theirs)
                    queued = await self._move(existing.id, SmsStatus.FAILED, failure_reason=shown_reason(void),
                                              provider_status=SKIPPED, jobs=given_back) and bool(given_back)
                elif given_back:  # never stored, so never sent: queued with the job's end (by this run only, while
                    # it holds the job; a run outside a worker queues it alone)
                    queued = await finish_queueing(rt.sessionmaker, job, given_back) or job.locked_by is None
                if queued:
                    await _give_back(rt, payload, best_effort=True)
                if void in SAID_ON_THE_JOB:
                    # Said on the job (GET /v1/jobs). A reminder's or member SMS's reason is not: "opted_out" may be
                    # a STOP the number sent to another cooperative, which this one must not learn (it ends DONE
                    # as quietly as one sent).
                    await finish_unsent(conn, job, f"not sent: {void}")
                return
            found = await self.throttle_and_lock(lock, str(job.id), kept)
            if found is not None:  # AT may have it already (an earlier run's answer, kept): recorded, never resent
                stored = existing or await _first(conn, _BY_KEY, {"k": key})
                if stored is None:
                    stored = await self._store_again(conn, job, payload, key, found)
                if stored is not None and stored.status == SmsStatus.QUEUED.value:
                    await self._record_answer(job, stored, found, kept)
                return
            message: Any = None
            try:
                if existing is None:
                    try:
                        message = await self._create(conn, payload, key, lease=job)
                    except PhoneReleased:  # to the member's number, which is no longer theirs: not sent
                        log.info("member SMS not sent", extra={"member_id": payload.get("member_id"),
                                                               "reason": "phone_released",
                                                               "template": payload.get("template")})
                        return
                    except _NotSent as stale:  # what it says is no longer true (_build): never stored, not sent
                        log.info("member SMS not sent", extra={"member_id": payload.get("member_id"),
                                                               "reason": stale.reason,
                                                               "template": payload.get("template")})
                        await finish_unsent(conn, job, f"not sent: {stale.reason}")
                        return
                else:
                    # Re-read under the lock: the other run may have finished while we waited for it.
                    message = await _first(conn, _BY_ID, {"i": existing.id})
            finally:
                if message is None or message.status != SmsStatus.QUEUED.value:
                    await rt.hot_redis.delete(lock)
        if message is None or message.status != SmsStatus.QUEUED.value:
            return
        accepted: tuple[str, bool] | None = None
        try:
            accepted = await self._send_once(job, message, kept)
        finally:
            if accepted is None:
                await rt.hot_redis.delete(lock)
        if accepted is not None:  # the lock is released with the parked-report check, in one round trip
            await self._apply_parked(message.id, *accepted, lock)

    async def _settled_before(self, job: Job, message: Any, kept: str, doubt: bool) -> bool:
        """For a message an earlier attempt stored (still QUEUED): whether an earlier attempt may have sent it,
        in which case its outcome is recorded here, and nothing is sent: AT's answer that attempt kept
        (its answer key: SENT with AT's id), else, when the previous attempt was cut off, lost with its worker or
        failed after AT may have had it (`doubt`: Job.interrupted), Unconfirmed. Asked before the send-time
        checks (a reminder whose member paid since was sent all the same) and before anything that could
        overwrite the job's last error. One Redis read, on a retry only (a first attempt has no stored message)."""
        found = Answer.load(await self.rt.hot_redis.get(kept))
        if found is not None:
            await self._record_answer(job, message, found, kept)
            return True
        if doubt:
            # The worker cancelled the previous attempt, or was lost while running it (its lease lapsed), most
            # likely waiting for AT's answer, or it failed to write AT's answer: AT may have the message.
            await self._unconfirmed(job, message, _doubt_cause(job), kept)
            return True
        return False

    async def _held_back_sent(self, job: Job, message_id: str, kept: str) -> None:
        """For a message found FAILED: whether an earlier run's request for it went out, its answer kept (AT accepted
        it, or may have it) but not written, while a person's action wrote "not sent" on it (_HELD_BACK: her
        erasure, the release of her number), which read it QUEUED: the run whose answer came back could not write it
        (the database away under the write: _keep), or the action committed after that answer was kept and before
        this retry. The kept answer is then recorded on the row (_confirm: SENT with AT's id, its parked delivery
        reports applied; or Unconfirmed), as that run would have; nothing is sent. With no answer kept, the attempt
        before this one cut off or lost with its worker (Job.interrupted: the action came before this retry, the
        request of that run maybe out, its answer never back) is recorded as _settled_before records it on a QUEUED
        row: Unconfirmed, since it may have gone (a held-back row said "never handed to Africa's Talking"). A row
        stored by an earlier attempt that ended with nothing out (a 503, no connection) stays "not sent", and a run
        lost before it stored the row left none to hold back. One Redis read, for a run that finds its row FAILED
        only (the job of a text held back, run once more)."""
        found = Answer.load(await self.rt.hot_redis.get(kept))
        if found is None and job.interrupted:
            found = Answer(cause=_doubt_cause(job))
        if found is None:
            return
        job.mark_call_started()
        if found.cause is not None:
            await self._confirm(message_id, SmsStatus.SENT, {
                "provider_status": SENT_UNCONFIRMED, "failure_reason": f"unconfirmed, not resent: {found.cause}",
                "sent_at": utcnow()})
            return
        moved = await self._confirm(message_id, SmsStatus.SENT, {
            "provider_message_id": found.provider_message_id, "provider_status": found.provider_status,
            "cost": found.cost, "sent_at": _parse_time(found.sent_at)})
        if moved and found.provider_message_id:
            await self._apply_parked(message_id, found.provider_message_id, moved)

    async def _sent_before_restore(self, conn: AsyncConnection, job: Job, payload: dict[str, Any], key: str,
                                   kept: str) -> bool:
        """For a message never stored that its send-time checks stop (a reminder whose member paid or sent STOP
        since, a welcome whose member was suspended, an SMS to a payer's number given to a member since): whether
        it went out all the same, before PostgreSQL was restored to a point before its send (its job pending then,
        run again: the checks come before the answer is looked for on that path, throttle_and_lock). Then AT's
        answer kept at the send is there, and the row is stored again as it went (_store_again) and the answer
        recorded on it: SENT, not "not sent" with no row at all (for a reminder, SENT counts as sent: the next
        morning's scan does not queue its due date again, rightly, as it went). One Redis read, on this rare path
        only (a first attempt not sent): none for a message sent, nor for one stored by an earlier attempt
        (_settled_before asked it). A row that cannot be built any more (its member gone, or her number released)
        is not stored: nothing to record the answer on, the job ends as for one sent."""
        found = Answer.load(await self.rt.hot_redis.get(kept))
        if found is None:
            return False
        try:
            stored = await self._store_again(conn, job, payload, key, found)
        except PermanentJobError as exc:  # what it was built from is gone: the job ends, not parked for a sent SMS
            log.warning("SMS already sent but its row is gone and cannot be built again: not stored, not resent",
                        extra={"job_id": job.id, "template": payload.get("template"), "error": str(exc)[:300]})
            return True
        if stored is not None and stored.status == SmsStatus.QUEUED.value:
            await self._record_answer(job, stored, found, kept)
        return True

    async def _store_again(self, conn: AsyncConnection, job: Job, payload: dict[str, Any], key: str,
                           answer: Answer) -> Any:
        """The row of a message AT may have (its answer was kept at the send) is gone: PostgreSQL was restored to a
        point before the send, and the job, pending then, runs again. The row is stored again, QUEUED for the
        answer to be recorded on it, never sent: built as it went (`sent`), a receipt whose payment was voided since,
        or whose number went to a member or turned older than SMS_PAYER_ANSWER_DAYS since, too, which would not go
        out now (_NotSent; the send-time checks: _sent_before_restore) but went out then. None
        when it cannot be built for the member's number any more (released since): nothing to record it on, and
        nothing is sent either."""
        log.warning("SMS already sent but its row is gone (PostgreSQL restored to before the send?): stored again "
                    "from the answer kept at the send, not resent",
                    extra={"job_id": job.id, "provider_message_id": answer.provider_message_id,
                           "template": payload.get("template")})
        try:
            return await self._create(conn, payload, key, sent=True)
        except PhoneReleased:
            return None

    async def _record_answer(self, job: Job, message: Any, answer: Answer, kept: str) -> None:
        """Record the answer an earlier attempt kept: SENT with AT's id (then the delivery reports parked for that
        id meanwhile are applied), or Unconfirmed. Nothing is sent; the answer stays kept (ANSWER_SECONDS)."""
        log.warning("SMS outcome recorded from the answer an earlier attempt kept, not resent",
                    extra={"sms_id": message.id, "job_id": job.id, "provider_message_id": answer.provider_message_id})
        if answer.cause is not None:
            await self._unconfirmed(job, message, answer.cause, kept)
            return
        job.mark_call_started()
        moved = await self._record_sent(job, message.id, answer)
        if answer.provider_message_id:
            await self._apply_parked(message.id, answer.provider_message_id, moved)

    async def _record_sent(self, job: Job, message_id: str, answer: Answer) -> bool:
        """QUEUED -> SENT with what AT answered (its id, status, cost, when), the job finished with it; whether
        this run recorded it. A parked attempt's note (failure_reason) goes, if the job was replayed. A row another
        run recorded Unconfirmed meanwhile (it took the job over from this run, stalled past its lease after storing
        the row, and could not tell whether this run had sent it) is confirmed with this answer (_confirm)."""
        values: dict[str, Any] = {"provider_message_id": answer.provider_message_id,
                                  "provider_status": answer.provider_status, "cost": answer.cost,
                                  "sent_at": _parse_time(answer.sent_at)}
        if await self._move(message_id, SmsStatus.SENT, finish=job, clear=("failure_reason",), **values):
            return True
        return await self._confirm(message_id, SmsStatus.SENT, values)

    async def _confirm(self, message_id: str, target: SmsStatus, values: dict[str, Any]) -> bool:
        """This run sent the message (AT answered: accepted, `target` SENT, or refused it, REJECTED; or its answer was
        lost, `target` SENT with `values` Unconfirmed; or the attempt before it was cut off or lost mid-send,
        Job.interrupted, and this run records that as a lost answer: _held_back_sent, _unconfirmed) and the row had
        moved on from QUEUED meanwhile, without it:
        - the run that took its job over recorded it Unconfirmed (SENT, no id: it found the row this run stored
          QUEUED, its job lost by this run, and could not tell whether this run had sent it, so it sent nothing);
        - a person's action wrote "not sent" on it while this run's request was out (_HELD_BACK: her erasure, the
          release of her number, an admin's discard of its parked job), which read it QUEUED and could not know.
        One copy went, this run's: the row is made to say so, with AT's id (the delivery reports for it then find the
        row, and parked ones are applied) or its refusal, and audited (sms.confirmed; sms.sent for an answer lost, the
        move to REJECTED). An erased row keeps its number and text cleared (only the send's columns are written); the
        discarded job stays discarded. A refusal makes either REJECTED with Africa's Talking's reason, as any refused
        send ends (a held-back row's "not sent: ..." stays in the audit row's before), and an Unconfirmed answer
        leaves an Unconfirmed row as it is. Only a row still so: one a delivery report or another answer reached
        first is left. Each is one of the machine's moves (SMS.recoveries, or the table's SENT -> REJECTED). Whether
        it was; the rare path, so a short transaction (the row read and locked, then the move with its audit row) on
        any database."""
        values = {k: _fit(k, v) for k, v in values.items() if v is not None}
        lost = values.get("provider_status") == SENT_UNCONFIRMED and not values.get("provider_message_id")
        changes = dict(values)
        if target is SmsStatus.SENT:
            if not lost:
                changes["failure_reason"] = None
            moved_on = _HELD_BACK if lost else or_(_TAKEN_OVER_ROW, _HELD_BACK)
        else:  # refused: it never went, so no sent time (the taker's Unconfirmed stamped one), as any refused
            changes["sent_at"] = None
            moved_on = or_(_TAKEN_OVER_ROW, _HELD_BACK)
        async with self.rt.sessionmaker.begin() as session:
            before = (await session.execute(
                select(_SMS.c.status, _SMS.c.provider_status, _SMS.c.failure_reason)
                .where(_SMS.c.id == message_id, moved_on).with_for_update())).first()
            if before is None:
                return False
            source = SmsStatus(before.status)
            held_back = source is SmsStatus.FAILED
            was: dict[str, Any] = {"provider_status": before.provider_status}
            if held_back:
                was["failure_reason"] = before.failure_reason  # what the person's action wrote: "not sent: ..."
            # A declared move of the machine (core.state.sms: SMS.recoveries), under the guard it was read by (the row
            # is locked: it still holds); the taker's Unconfirmed refused is the table's SENT -> REJECTED.
            recovery = ("sent" if lost else "confirmed" if target is SmsStatus.SENT
                        else "rejected" if held_back else None)
            try:
                await transition(session, SMS, message_id, source, target, actor=WORKER, values=changes, was=was,
                                 recovery=recovery, where=_HELD_BACK if held_back else _TAKEN_OVER_ROW)
            except StaleTransition:
                return False
        log.warning("SMS recorded by another run or a person's action (Unconfirmed, or not sent) while this run sent "
                    "it (stalled past its lease, or its request out): recorded as it went",
                    extra={"sms_id": message_id, "status": target.value, "was": before.status,
                           "provider_message_id": values.get("provider_message_id")})
        if target is not SmsStatus.SENT or before.status != SmsStatus.SENT.value:
            metrics.SMS.labels(status=target.value).inc()
        return True

    async def _remember(self, message_id: str, kept: str, answer: Answer) -> None:
        """Keep AT's answer for any later run of the job (ANSWER_SECONDS), before its outcome is written: a run
        that finds the row lost since, or still QUEUED, records it instead of sending. Best effort: the outcome is
        written all the same (should that fail too, _keep tries again)."""
        try:
            await self.rt.hot_redis.set(kept, answer.dump(), ex=ANSWER_SECONDS)
        except Exception:
            log.warning("AT's answer not kept: a restore of the database to before this send would send it again",
                        exc_info=True, extra={"sms_id": message_id})

    async def _keep(self, message_id: str, kept: str, answer: Answer, error: Exception) -> SmsOutcomeNotRecorded:
        """AT may have the message and its outcome could not be written: keep AT's answer for the next attempt
        (best effort: without it the next attempt records it Unconfirmed), and say so in the job's error."""
        try:
            await self.rt.hot_redis.set(kept, answer.dump(), ex=ANSWER_SECONDS)
            saved = "kept for the next attempt"
        except Exception:
            log.exception("AT's answer not kept: the next attempt records the SMS Unconfirmed",
                          extra={"sms_id": message_id})
            saved = "not kept"
        log.error("SMS outcome not recorded; it is not sent again", extra={
            "sms_id": message_id, "provider_message_id": answer.provider_message_id, "error": repr(error)[:300]})
        what = f"AT accepted it ({answer.provider_message_id})" if answer.cause is None else answer.cause
        return SmsOutcomeNotRecorded(
            f"{what}, answer {saved}; writing the outcome failed: {type(error).__name__}: {error}")

    async def _send_once(self, job: Job, message: Any, kept: str) -> tuple[str, bool] | None:
        """Send and record the outcome; for a message the aggregator accepted with an id, (that id, whether
        this run recorded it), so delivery reports parked before it was stored can be applied."""
        rt = self.rt
        assert rt.sms is not None
        phone = _phone(rt, message)
        try:
            result = await rt.sms.send(phone, message.body)
            if not result.accepted and not result.permanent:
                raise SmsTemporaryError(f"SMS not accepted: {result.provider_status}")
        except SmsUnconfirmedError as exc:
            await self._unconfirmed(job, message, exc.cause, kept)
            return None
        except SmsTemporaryError as exc:
            # Nothing went, for sure: no connection made, or AT's API refusing it for our account (its own answer, or a
            # request never made), on which every send sends again. A 5xx, a 408, a 429 is no such proof.
            # Whether another run took the job over is the database's to say (_reopen's guarded move), not this
            # run's clock: one whose host was suspended (CLOCK_MONOTONIC stops), or that stamped its claim late, reads
            # itself inside its handler's time after its lease lapsed; and one whose clock counted its stall is
            # cancelled by the worker (the handler's timeout) at its next await, before it could look.
            if isinstance(exc, SmsNotSentError | SmsAccountError) and await self._reopen(
                    job, message.id, kept, str(exc)):
                return None
            if job.attempts >= job.max_attempts:
                # The outbox parks the job after this attempt. The message did not leave: it stays QUEUED,
                # so replaying the job once the cause is fixed sends it; the row says why it waits.
                await self._note_parked(message.id, str(exc))
            raise
        if result.accepted:
            # AT has it: from here on, no failure may lead to sending it again. Marked in memory only, no stamp on
            # the job's row (a round trip per message): an attempt lost before the outbox records its failure is
            # WORKER_LOST, interrupted all the same.
            job.mark_call_started()
            answer = Answer(result.provider_message_id, result.provider_status, result.cost, utcnow().isoformat())
            await self._remember(message.id, kept, answer)
            try:
                moved = await self._record_sent(job, message.id, answer)
            except Exception as exc:  # e.g. a pool timeout, a failover, a connection reset
                raise await self._keep(message.id, kept, answer, exc) from exc
            return (result.provider_message_id, moved) if result.provider_message_id else None
        # A permanent refusal (this number) is an outcome, not a job failure: record it and finish the job.
        log.warning(
            "SMS refused by the aggregator",
            extra={"sms_id": message.id, "status": result.provider_status, "to": message.phone_masked},
        )
        refused: dict[str, Any] = {"provider_status": result.provider_status,
                                   "failure_reason": (result.failure_reason or result.provider_status)[:64]}
        if not await self._move(message.id, SmsStatus.REJECTED, finish=job, **refused):
            await self._confirm(message.id, SmsStatus.REJECTED, refused)
        return None

    async def _build(self, conn: AsyncConnection, payload: dict[str, Any], *, sent: bool = False
                     ) -> tuple[Phone, str, str]:
        """(phone, language, body). A receipt or payment update, the bulk of the traffic, is filled from one
        plain query; anything else, or a payment whose rows are not all there, goes through
        `build_message`, which reads the rows one by one and names what is missing.

        `sent`: the message went out already (its row lost to a restore: _store_again), so what would stop it now
        (_NotSent) does not stop its row."""
        rt = self.rt
        service_code = rt.settings.service_code_for  # the cooperative's aggregator's, else USSD_SERVICE_CODE
        try:
            facts = await _payment_facts(conn, payload, rt.settings.sms_payer_answer_days)
            if facts is not None:
                if sent:
                    pass  # it went out then: its row is stored as it went, whatever would stop it now
                elif stale := _stale(payload["template"], facts.payment):
                    raise _NotSent(stale)
                elif facts.payer_gone:  # the number that paid a payment of no member: too old, or a member's since
                    raise _NotSent(facts.payer_gone)
                phone, language = recipient(rt.cipher, payload, facts.member, facts.coop_language)
                return phone, language, render(payload["template"], language,
                                               payment_values(facts.payment, language, service_code))
            async with AsyncSession(bind=conn, expire_on_commit=False) as session:
                return await build_message(session, rt.cipher, payload, service_code=service_code,
                                           settings=rt.settings)
        except TemplateError as exc:
            raise PermanentJobError(f"cannot build SMS: {exc}") from exc

    async def _create(self, conn: AsyncConnection, payload: dict[str, Any], key: str, *, sent: bool = False,
                      lease: Job | None = None) -> Any:
        """Build and store the message (QUEUED), or read the one another run stored. A message sent by a worker's
        run (`lease`: its job, claimed) is stored only while that run still holds its job (_insert_leased): a run
        whose lease lapsed before it stored its message (a worker stalled past it), its checks passed, stored and
        sent it after the run holding the job had ended it unsent (her STOP's reply switched since, and its count
        given back: "no more reminders" read last while her START had turned them back on; a receipt whose payment
        was voided since), or the job was parked and discarded; and it sent a second copy of the message the run
        holding the job had stored and was sending (it found that row QUEUED). Such a run stores and sends nothing
        (RetryLater, whose outcome the worker drops), whatever row it finds."""
        rt = self.rt
        phone, language, body = await self._build(conn, payload, sent=sent)
        size = measure(body)
        now = utcnow()
        values = {
            "id": new_id(),
            "cooperative_id": payload.get("cooperative_id"),
            "member_id": payload.get("member_id"),
            "phone_enc": rt.cipher.encrypt(phone.e164, context=SMS_PHONE_CONTEXT),
            "phone_index": rt.cipher.blind_index(phone.e164),
            "phone_masked": phone.masked(),
            "template": payload["template"],
            "language": language,
            "body": body,
            "encoding": size.encoding,
            "length": size.length,
            "segments": size.segments,
            "status": SmsStatus.QUEUED.value,
            "idempotency_key": key,
            "created_at": now,
            "updated_at": now,
        }
        held = not sent and bool(payload.get("member_id")) and not payload.get("phone_enc")
        leased = not sent and lease is not None and lease.locked_by is not None
        if leased:
            assert lease is not None
            row = await _first(conn, _insert_leased(conn.dialect.name, tuple(values), held),
                               {**values, "lease_job": lease.id, "lease_worker": lease.locked_by})
        elif held:
            # To her own number, read by the build: stored only while she still holds it (_insert_held).
            row = await _first(conn, _insert_held(conn.dialect.name, tuple(values)), values)
        else:
            row = await _first(conn, _insert(conn.dialect.name), values, tuple(values))
        if row is not None:
            metrics.SMS.labels(status="QUEUED").inc()  # by the run whose insert stored it: once a message
            return row
        if leased:
            # This run no longer holds its job: the run that holds it decides, and a row found now is that run's
            # (still QUEUED while it sends it: sent here too, she got two). Or her number changed as it was built
            # (held), or a row stored by a run outside the lease (a release before this one): the job's next
            # attempt builds it again, or finds that row.
            raise RetryLater(1, "message not stored: this run no longer holds its job, or her number changed")
        # Another run inserted it first (ON CONFLICT DO NOTHING returns no row), and counted it; or her number is
        # no longer hers (erased, released or corrected since the build read it): built again, from what is now.
        row = await _first(conn, _BY_KEY, {"k": key})
        if row is None:
            raise RetryLater(1, "the member's number changed as the message was built: built again" if held
                             else "message row neither inserted nor found")
        return row

    async def _apply_parked(self, message_id: str, provider_message_id: str, moved: bool,
                            lock: str | None = None) -> None:
        """Delivery reports that beat the id's commit were parked by the route: apply them now.

        The send `lock`, if this run holds it, is released first, in the same round trip as the check (the
        outcome is recorded: another run would find the message no longer QUEUED)."""
        try:
            # Almost always none were parked: one EXISTS instead of the database read that
            # apply_parked_reports starts with. When this run did not store the id (the row had moved
            # on), it goes through apply_parked_reports as before.
            pipe = self.rt.hot_redis.pipeline(transaction=False)
            if lock is not None:
                pipe.delete(lock)
            pipe.exists(parked_key(provider_message_id))
            *_, parked = await pipe.execute()
            if moved and not parked:
                return
            await apply_parked_reports(self.rt, provider_message_id)
        except Exception:
            # The SMS left and is recorded SENT; failing the job would not bring a lost report back.
            log.exception("parked delivery reports not applied", extra={"sms_id": message_id})

    async def _unconfirmed(self, job: Job, message: Any, cause: str, kept: str) -> None:
        """AT may have queued the message, and sending it again could give the member a second copy: it is
        recorded SENT (what it most likely is) without a provider message id, marked Unconfirmed, and the
        job ends. An operator can check it against AT's dashboard; no delivery report can update it.
        The cause is kept first (`kept`: a later run, the row lost or not, records it so and never sends); should
        the write fail, the job stays in doubt (Job.mark_call_started) and the cause is kept again. A row a person's
        action marked "not sent" meanwhile (_HELD_BACK: it read the row QUEUED) is recorded so too (_confirm), since
        it may have gone: this run's own request was out (its answer lost), or the run before this one was cut off or
        lost mid-send (_settled_before read the row QUEUED just before the action committed)."""
        job.mark_call_started()
        log.warning(
            "SMS may have reached Africa's Talking: recorded unconfirmed, not resent",
            extra={"sms_id": message.id, "cause": cause, "to": message.phone_masked, "job_id": job.id},
        )
        metrics.PROVIDER_ERRORS.labels(provider="africastalking", operation="sms.unconfirmed").inc()
        await self._remember(message.id, kept, Answer(cause=cause))
        values: dict[str, Any] = {"provider_status": SENT_UNCONFIRMED,
                                  "failure_reason": f"unconfirmed, not resent: {cause}", "sent_at": utcnow()}
        try:
            if not await self._move(message.id, SmsStatus.SENT, finish=job, **values):
                await self._confirm(message.id, SmsStatus.SENT, values)
        except Exception as exc:
            raise await self._keep(message.id, kept, Answer(cause=cause), exc) from exc

    async def _reopen(self, job: Job, message_id: str, kept: str, error: str) -> bool:
        """This run's request never connected (SmsNotSentError), or AT's API refused it for our account
        (SmsAccountError: an empty balance, a risk hold, the sender id or credentials; or the request could not be
        made): nothing went, for sure, after the run that took its job over (this run stalled past its lease: a long
        pause) recorded the message Unconfirmed without sending it (_TAKEN_OVER: it could not tell whether this run
        had sent it) and ended the job. No run sent it then: the message is handed back to be sent, once: the row
        QUEUED again, the job PENDING and due now (REOPENED, a plain retry), and the Unconfirmed answer the taker kept
        (`kept`) deleted, before the commit, so the retry sends it rather than recording that answer again. Only a
        row still so, by a job still DONE, to a number still the row's (not erased; a member's still hers: an erasure
        or release after the taker's record is seen, and one under way waited for, as _insert_held does): otherwise
        nothing changes and the row stays Unconfirmed. A 5xx (or a 408, a 429) is no such proof (AT's front end may
        refuse after its API took the message): it stays Unconfirmed. Whether it was handed back; one statement that
        changes nothing on a plain connection failure or an account refusal (the row QUEUED)."""
        now = utcnow()
        try:
            async with self.rt.sessionmaker.begin() as session:
                try:
                    # A declared move of the machine (core.state.sms: SMS.recoveries), under its guard (_REOPENABLE).
                    await transition(session, SMS, message_id, SmsStatus.SENT, SmsStatus.QUEUED, actor=WORKER,
                                     values=dict.fromkeys(("provider_status", "failure_reason", "sent_at")),
                                     was={"provider_status": SENT_UNCONFIRMED}, audit={"reason": error[:200]},
                                     recovery="reopened", where=_REOPENABLE)
                except StaleTransition:
                    return False
                again = await session.execute(
                    update(OutboxJob).where(OutboxJob.id == job.id, OutboxJob.status == "DONE")
                    .values(status="PENDING", run_at=now, locked_by=None, done_at=None, last_error=REOPENED,
                            after_failure=False, updated_at=now))
                if not again.rowcount:  # type: ignore[attr-defined]
                    raise _Undo
                await self.rt.hot_redis.delete(kept)  # fails: rolled back, the row stays Unconfirmed
        except _Undo:
            return False
        except Exception:  # Redis or the database failing: nothing handed back, the row stays Unconfirmed
            log.warning("SMS not sent by a stalled run not handed back: it stays Unconfirmed", exc_info=True,
                        extra={"sms_id": message_id, "job_id": job.id})
            return False
        log.warning("SMS recorded Unconfirmed by the run that took its job over never reached Africa's Talking (this "
                    "run, stalled past its lease, could not connect): handed back to be sent",
                    extra={"sms_id": message_id, "job_id": job.id, "error": error[:300]})
        return True

    async def _note_parked(self, message_id: str, reason: str) -> None:
        """Say on the still-QUEUED row why its job is being parked (not a state change: no transition)."""
        async with autocommit(self.rt.engine) as conn:
            await pgraw.first(conn, _NOTE_PARKED, {
                "i": message_id, "p": RETRIES_EXHAUSTED, "r": _fit("failure_reason", reason), "u": utcnow()})

    async def _move(self, message_id: str, target: SmsStatus, *, finish: Job | None = None,
                    clear: tuple[str, ...] = (), jobs: list[NewJob] | None = None, **values: Any) -> bool:
        """Apply the outcome; False when the message had already moved on.

        `finish`: the outcome ends the job (nothing after it can fail the job), so the job is marked
        DONE in the same transaction instead of by the worker's separate UPDATE afterwards. `jobs`: outbox jobs
        queued with the move, only if it moved (transition_alone's).
        `values` left None are not written; the columns in `clear` are set to NULL.
        """
        values = {**{k: v for k, v in values.items() if v is not None}, **dict.fromkeys(clear)}
        try:
            # One statement on PostgreSQL: the move, its audit row and the job's end.
            await transition_alone(
                self.rt.sessionmaker,
                SMS,
                message_id,
                SmsStatus.QUEUED,
                target,
                actor=WORKER,
                values={k: _fit(k, v) for k, v in values.items()},
                finish=finish,
                jobs=jobs or (),
            )
        except StaleTransition:
            log.info("SMS already moved on", extra={"sms_id": message_id, "target": target.value})
            return False
        metrics.SMS.labels(status=target.value).inc()
        return True


_NOT_RECORDED = SmsOutcomeNotRecorded.__name__
NO_SENDER = "no SMS sender configured"


def _doubt_cause(job: Job) -> str:
    """Why a message whose previous attempt left doubt (Job.interrupted) is recorded Unconfirmed by this one: that
    attempt failed to write AT's answer, or was cut off or lost with its worker (CUT_OFF_CAUSE)."""
    return "previous attempt's outcome not written" if _NOT_RECORDED in (job.last_error or "") else CUT_OFF_CAUSE


# The cause a run writes on a message it records Unconfirmed, without sending, because the attempt before it was cut
# off or lost with its worker (SmsJobs._settled_before): a run that sends nothing. (Its failure_reason, _TAKEN_OVER.)
CUT_OFF_CAUSE = "previous attempt cut off mid-send"
_TAKEN_OVER = f"unconfirmed, not resent: {CUT_OFF_CAUSE}"
# The last word on a job handed back by a stalled run whose request never connected (SmsJobs._reopen). Neither
# INTERRUPTED nor CALL_SENT: its next run is a plain retry, and sends.
REOPENED = "sent again: the run that took this job over recorded it Unconfirmed, but the run it took over never " \
           "reached Africa's Talking"


class _Undo(Exception):
    """Roll back SmsJobs._reopen's transaction: its row moved back, its job no longer there to send it."""


def _parse_time(value: str | None) -> datetime:
    """A kept answer's time (when AT accepted it); now when it has none."""
    try:
        return datetime.fromisoformat(value) if value else utcnow()
    except ValueError:
        return utcnow()


class _Message(NamedTuple):
    """The columns of a message the send needs (_COLUMNS)."""

    id: str
    status: str
    body: str
    phone_enc: str
    phone_masked: str


async def _first(conn: AsyncConnection, stmt: Any, params: dict[str, Any],
                 columns: tuple[str, ...] | None = None) -> _Message | None:
    """One of the statements below on the autocommit connection (straight on asyncpg on PostgreSQL)."""
    record = await pgraw.first(conn, stmt, params, columns)
    return None if record is None else _Message(*record)


_SMS = SmsMessage.__table__
_COLUMNS = (_SMS.c.id, _SMS.c.status, _SMS.c.body, _SMS.c.phone_enc, _SMS.c.phone_masked)
# Built once; only the columns the send needs, not the whole ORM row.
_BY_KEY = select(*_COLUMNS).where(_SMS.c.idempotency_key == bindparam("k"))
_BY_ID = select(*_COLUMNS).where(_SMS.c.id == bindparam("i"))
# What a person's action writes on a message still QUEUED that it stops: FAILED "not sent: ..." by her erasure or the
# release of her number (core.members._hold_back_queued), "discarded by an admin: ..." by the discard of its parked job
# (fail_for_discard). Each reads the row QUEUED and cannot know that a run's request for it is out (read before the
# send, its answer not back yet: a run stalled past its lease, or one slow to answer): that run's answer then says
# what went (SmsJobs._confirm). The worker's own "not sent" (a reminder paid since) is written by the run holding the
# job, never beside a send.
# (Its reasons compared one by one, not by an IN: a guard of transition's statement, which runs straight on asyncpg,
# takes no expanding parameter.)
_HELD_BACK = and_(_SMS.c.status == SmsStatus.FAILED.value, _SMS.c.provider_message_id.is_(None),
                  or_(_SMS.c.failure_reason == ERASED_SMS_REASON, _SMS.c.failure_reason == RELEASED_SMS_REASON,
                      _SMS.c.failure_reason.startswith(DISCARDED_BY, autoescape=True)))
# A row recorded Unconfirmed by a run that sent nothing: the one that took its job over (SmsJobs._confirm's SENT ->
# SENT or REJECTED over it).
_TAKEN_OVER_ROW = and_(_SMS.c.status == SmsStatus.SENT.value, _SMS.c.provider_status == SENT_UNCONFIRMED,
                       _SMS.c.provider_message_id.is_(None))
# A row SmsJobs._reopen hands back: the taker's Unconfirmed (_TAKEN_OVER: it sent nothing), to a number still the
# row's (not erased; a member's still hers, her row read under a share lock: an erasure or release after the taker's
# record is seen, and one under way waited for, as _insert_held does).
_REOPENABLE = and_(
    _TAKEN_OVER_ROW, _SMS.c.failure_reason == _TAKEN_OVER, _SMS.c.phone_enc != "",
    or_(_SMS.c.member_id.is_(None),
        select(Member.__table__.c.id)
        .where(Member.__table__.c.id == _SMS.c.member_id, Member.__table__.c.phone_index == _SMS.c.phone_index)
        .with_for_update(read=True, key_share=True).exists()))
_NOTE_PARKED = (
    update(SmsMessage)
    .where(_SMS.c.id == bindparam("i"), _SMS.c.status == SmsStatus.QUEUED.value)
    .values(provider_status=bindparam("p"), failure_reason=bindparam("r"), updated_at=bindparam("u"))
    .returning(_SMS.c.id)
)


async def reopen_for_replay(session: AsyncSession, payload: dict[str, Any]) -> None:
    """A parked 'sms.send' job is being replayed (admin_api.jobs): its still-QUEUED message is back in the queue,
    so it no longer says its retries are exhausted (the ops page's QUEUED_PARKED, "replay it"); the reason it waited
    stays until it goes out, and a replay that runs out of attempts again notes it again (_note_parked)."""
    await session.execute(
        update(SmsMessage)
        .where(SmsMessage.idempotency_key == message_key(payload), SmsMessage.status == SmsStatus.QUEUED.value,
               SmsMessage.provider_status == RETRIES_EXHAUSTED)
        .values(provider_status=None, updated_at=utcnow())
    )


async def fail_for_discard(session: AsyncSession, job: OutboxJob, parked_with: str | None, *, reason: str,
                           actor: Actor, redis: Any) -> str | None:
    """A parked 'sms.send' job is being discarded (admin_api.jobs), in the discard's transaction: its still-QUEUED
    message will never go, so it is FAILED ("discarded by an admin: <reason>", cut to the column's 64 characters:
    the whole reason is in the audit log and the job's lastError; the move audited as any is),
    no longer QUEUED_PARKED on the ops page, and prune may empty its text as any sent one's. Marked SKIPPED (never
    handed to the aggregator: not in the delivery rate; a reminder so marked is not counted as sent), unless the
    job's last try may have reached Africa's Talking (`parked_with`: cut off mid-send), which is then a plain failed
    send. The message's id, or None when no QUEUED message is stored for it.

    Refused (Conflict, 409) when Africa's Talking accepted the message and its answer is kept (message_keys, on
    `redis`): an earlier try sent it and could not write its outcome (the database away), and the job parked before a
    try recorded it. It went: discarded, the row would say "failed" without AT's id, so its delivery report would find
    no row. A replay records it SENT with that id (SmsJobs._settled_before), sends nothing, and applies the delivery
    reports parked for it meanwhile. So too when her erasure or the release of her number has written "not sent" on
    it while the job was parked (its replay: SmsJobs._held_back_sent). An answer kept as lost (Unconfirmed) makes it
    a plain failed send, as a last try cut off does.

    A keyword's reply so marked gives its count back, and so does one whose job parked before it stored any message (an
    unknown template: a release removed it; a payload the build refused), its last try cut off too: a message is sent
    only once stored, so it never went. Given back by a GIVE_BACK_JOB queued here (_queue_give_back): it runs once the
    discard has committed, and is retried until Redis takes it. Given back before the commit, a discard that did not
    commit left the reply parked and uncounted (replayed, it went, one more than her limit); after it, in the request, a
    process lost (or Redis failing) in between left it counted for good."""
    payload = job.payload or {}
    stored = (await session.execute(select(
        SmsMessage.id, SmsMessage.status, SmsMessage.failure_reason, SmsMessage.provider_message_id).where(
        SmsMessage.idempotency_key == message_key(payload)))).first()
    if stored is None:
        # Whatever its last try's error (cut off too): a try sends only a message it stored first (a first send
        # clears the doubt: Job.call_started), so one with no row never went (a row a restore lost: the job's kept
        # answer check, give_back_unsent).
        await _queue_give_back(session, job)
        return None
    # Held back by her erasure or the release of her number while the job was parked (_HELD_BACK: read QUEUED, it
    # wrote "not sent"): the job's replay records AT's kept answer on it (SmsJobs._held_back_sent), its discard would
    # leave "never handed to Africa's Talking" without AT's id. Refused as a QUEUED one is, below.
    held_back = (stored.status == SmsStatus.FAILED.value and stored.provider_message_id is None
                 and stored.failure_reason in (ERASED_SMS_REASON, RELEASED_SMS_REASON))
    if stored.status != SmsStatus.QUEUED.value and not held_back:
        return None  # sent (or ended otherwise: a reply switched since queued its give-back then)
    error = parked_with or ""
    may_have_gone = error.startswith((INTERRUPTED, CALL_SENT)) or error == CALL_STARTED
    kept = Answer.load(await redis.get(message_keys(message_key(payload))[1]))
    if held_back and (kept is None or kept.cause is not None):
        return None  # ended already, by the person's action; its replay would record what the job's doubt says
    if kept is not None and kept.cause is None:
        went = f" (message id {kept.provider_message_id})" if kept.provider_message_id else ""
        raise Conflict(f"Africa's Talking accepted this SMS{went}: it went, and discarded it would be recorded "
                       f"failed. Replay job {job.id} instead: it records the SMS SENT with Africa's Talking's answer, "
                       "sending nothing again, and its delivery report then finds it", code=INVALID_STATE)
    may_have_gone = may_have_gone or kept is not None
    try:
        await transition(session, SMS, stored.id, SmsStatus.QUEUED, SmsStatus.FAILED, actor=actor, values={
            "failure_reason": _fit("failure_reason", f"{DISCARDED_BY}{reason}"),
            "provider_status": None if may_have_gone else SKIPPED})
    except StaleTransition:
        return None  # sent meanwhile (its job ran it after all): nothing to fail
    if not may_have_gone:
        await _queue_give_back(session, job)
    return str(stored.id)


# The outbox job that gives back the count of a keyword's reply not sent (a reply to STOP or START switched since,
# ended by the worker: SmsJobs.send; any discarded by an admin: fail_for_discard), queued with the reply's end (the
# FAILED move's statement, or the job's end when nothing was stored; the discard's transaction): none when that end
# did not commit, and the worker runs it after, tried again until Redis takes it. Its payload names the reply's
# 'sms.send' job only ({"job_id"}), whose payload says whose count and which (read when it runs: an erasure in between
# takes her number off that job, and the count stays). One per 'sms.send' job, whichever way queued it (its dedupe
# key), and the count given back once however often it runs (give_back_reply: its mark in Redis, which the route's
# own give-back of the same reply shares). The route queues one too, with the text's transaction, for a STOP or START
# that queued no reply (channels.sms.routes.give_back_job: its payload names the number and the count, not a job).


def _give_back_jobs(job_id: int, payload: dict[str, Any], cooperative_id: str | None) -> list[NewJob]:
    """The GIVE_BACK_JOB of 'sms.send' job `job_id` (`payload`, of `cooperative_id`: core.notify.sms_job gives both
    the same), if it is a keyword's reply that was counted (COUNTED_AT in its context): [] otherwise."""
    if _counted(payload) is None:
        return []
    return [NewJob(GIVE_BACK_JOB, {"job_id": job_id}, dedupe_key=f"{GIVE_BACK_JOB}:{job_id}",
                   cooperative_id=cooperative_id)]


async def _queue_give_back(session: AsyncSession, job: OutboxJob) -> None:
    """Queue the GIVE_BACK_JOB of a discarded 'sms.send' `job` in the discard's transaction (_give_back_jobs)."""
    for new in _give_back_jobs(job.id, job.payload or {}, job.cooperative_id):
        await enqueue_job(session, new)


_GIVEN_BACK_ROW = select(SmsMessage.status, SmsMessage.provider_status).where(
    SmsMessage.idempotency_key == bindparam("k"))


async def give_back_unsent(rt: Runtime, job: Job) -> None:
    """Run a GIVE_BACK_JOB: the reply's count given back (_give_back), once however often this runs
    (give_back_reply: its mark in Redis). Only while its message says it was never handed to Africa's Talking: FAILED
    Skipped (switched since, discarded), or none stored (a message is sent only once stored), as whatever queued the
    job found it; a message that says otherwise (sent) keeps its count. Nor when Africa's Talking may have it after
    all: its answer kept for it (message_keys) means a send went out before PostgreSQL was restored to a point before
    its row. The route's job (channels.sms.routes.give_back_job: a STOP or START that queued no reply) is asked the
    same of the reply its key names, but for a retry's own count (`own`), which is not that reply's. Redis away
    (redis_away): tried again later without using an attempt, as a send waits for it; another Redis error uses one."""
    if "job_id" in job.payload:
        async with rt.sessionmaker() as session:
            reply = await session.get(OutboxJob, int(job.payload["job_id"]))
        payload = (reply.payload if reply is not None else None) or {}
        if not payload:
            return
        key, own = message_key(payload), False
    else:
        payload, key, own = job.payload, message_key(job.payload), bool(job.payload.get("own"))
        if not payload.get("index"):
            return  # the number's index cleared by an erasure (core.members): the count stays
    if not own:
        async with rt.sessionmaker() as session:
            stored = (await session.execute(_GIVEN_BACK_ROW, {"k": key})).first()
        if stored is not None and tuple(stored) != (SmsStatus.FAILED.value, SKIPPED):
            log.warning("a reply's count is not given back: its message was not skipped",
                        extra={"job_id": job.id, "status": stored[0], "provider_status": stored[1]})
            return
    _, kept = message_keys(key)
    try:
        if not own and await rt.hot_redis.get(kept) is not None:
            return
        if "job_id" in job.payload:
            await _give_back(rt, payload)
        else:
            await give_back_reply(rt, str(payload["index"]), key, float(payload[COUNTED_AT]),
                                  str(payload.get("template")), best_effort=False)
    except RedisError as exc:
        if not redis_away(exc):
            raise
        raise RetryLater(random.uniform(*REDIS_AWAY_RETRY_SECONDS),
                         f"waiting for Redis ({type(exc).__name__}): count not given back yet") from exc


@functools.cache
def _insert(dialect_name: str) -> Any:
    """INSERT ... ON CONFLICT (idempotency_key) DO NOTHING RETURNING the send's columns, built once."""
    return (insert_ignore(dialect_name, _SMS).on_conflict_do_nothing(index_elements=["idempotency_key"])
            .returning(*_COLUMNS))


@functools.cache
def _insert_held(dialect_name: str, columns: tuple[str, ...]) -> Any:
    """_insert for a message to the number of the member it names, read by the build: INSERT ... SELECT, stored
    only while she still holds that number (her row's blind index), her row locked FOR KEY SHARE (as a key pointing
    at it would). An erasure or a release (core.members) that committed since the build is seen, and one under way
    is waited for (it locks her row first) and then seen: the message is not stored, and the job builds it again
    from what is now (PhoneReleased: not sent). Before, a message built just before her erasure was stored after
    it cleared her texts, with her number and its text, and sent."""
    given = {name: bindparam(name, type_=_SMS.c[name].type) for name in columns}
    members = Member.__table__
    held = (select(members.c.id)
            .where(members.c.id == given["member_id"], members.c.phone_index == given["phone_index"])
            .with_for_update(read=True, key_share=True))
    return (insert_ignore(dialect_name, _SMS).from_select(list(columns), select(*given.values()).where(held.exists()))
            .on_conflict_do_nothing(index_elements=["idempotency_key"]).returning(*_COLUMNS))


@functools.cache
def _insert_leased(dialect_name: str, columns: tuple[str, ...], held: bool) -> Any:
    """_insert (or _insert_held: `held`) storing only while the run still holds its job: the job (lease_job) RUNNING
    under this worker (lease_worker), its row locked FOR SHARE. A claim by another worker under way is waited for
    and then seen (nothing stored); one after it waits for this insert's commit, so the run that claimed finds the
    row (it never judges a reply "none stored" while this run stores it)."""
    given = {name: bindparam(name, type_=_SMS.c[name].type) for name in columns}
    jobs = OutboxJob.__table__
    holds = (select(jobs.c.id)
             .where(jobs.c.id == bindparam("lease_job"), jobs.c.status == "RUNNING",
                    jobs.c.locked_by == bindparam("lease_worker", type_=String))
             .with_for_update(read=True))
    where = [holds.exists()]
    if held:
        members = Member.__table__
        where.append(select(members.c.id)
                     .where(members.c.id == given["member_id"], members.c.phone_index == given["phone_index"])
                     .with_for_update(read=True, key_share=True).exists())
    return (insert_ignore(dialect_name, _SMS).from_select(list(columns), select(*given.values()).where(*where))
            .on_conflict_do_nothing(index_elements=["idempotency_key"]).returning(*_COLUMNS))


# What a stored message skipped at a retry says (GET /v1/members/{id}/messages shows it to the cooperative):
# opted_out may be a STOP the number sent to another cooperative (core.reminders reads the number's STOP list),
# which this one must not learn, so it reads as a reminder whose day ran out does (too_late: a matter of when
# the worker or the aggregator got to it, which the cooperative cannot tell either). A STOP sent as this
# cooperative's member shows on the member (remindersOptOut) anyway. Every other reason is about this
# cooperative's own records (its member suspended, its payment type changed, the payment made or voided, the
# due date reminded) and keeps its words. Logs and metrics keep the reason as it is.
QUIET_REASONS = frozenset({"opted_out", "too_late"})
QUIET_WORDS = "not sent: skipped"


def shown_reason(void: str) -> str:
    """The failure_reason of a stored message not sent for `void` (QUIET_REASONS)."""
    return QUIET_WORDS if void in QUIET_REASONS else f"not sent: {void}"


# Messages about the membership itself: worth sending only while the member is still ACTIVE ("Welcome, you
# are now a member" to someone suspended a moment after the approval, before the worker's turn, is wrong).
MEMBER_TEMPLATES = frozenset({"member_approved", "balance"})  # balance: what she owes, to a member still ACTIVE
_MEMBER_STATUS = select(Member.__table__.c.status).where(Member.__table__.c.id == bindparam("m", type_=String))


async def _member_void(conn: AsyncConnection, payload: dict[str, Any]) -> str | None:
    """Why a MEMBER_TEMPLATES message must not go out any more, None to send it: member_inactive (suspended,
    its number maybe released, since it was queued). A member that does not exist is left to the build, which
    parks the job. (Any message to a member whose number was released is dropped when built: PhoneReleased.)"""
    status = await pgraw.first(conn, _MEMBER_STATUS, {"m": payload["member_id"]})
    if status is not None and status[0] != "ACTIVE":
        return "member_inactive"
    return None


# The reply to STOP or START ("You will no longer get reminders", "Reminders are on again") worth sending only while
# it still holds: her STOP and START texted seconds apart queue both replies, which the worker sends in any order (a
# batch runs its jobs at once; a reply whose try failed goes after its backoff), and the STOP's reply sent last told
# her reminders were off while her START had turned them back on. Judged at its turn by the number's STOP
# (core.members.number_opted_out, what the reminders read): one the number's state no longer matches is not sent
# (SWITCHED_SINCE); the reply to her latest word goes. Template -> the state it tells (opted out or not).
SWITCH_REPLIES = {"opted_out": True, "opted_in": False}
SWITCHED_SINCE = "switched_since"
_NUMBER_OPTED_OUT = select(number_opted_out(bindparam("i", type_=String)))


async def _switch_void(rt: Runtime, conn: AsyncConnection, payload: dict[str, Any]) -> str | None:
    """Why a reply to STOP or START must not go out any more, None to send it: SWITCHED_SINCE when the number
    (the one that texted: the payload's) sent the other word since (SWITCH_REPLIES)."""
    phone_enc = payload.get("phone_enc")
    if not phone_enc:
        return None
    found = await pgraw.first(conn, _NUMBER_OPTED_OUT, {"i": _texted(rt, phone_enc)})
    opted_out = bool(found is not None and found[0])
    return None if opted_out == SWITCH_REPLIES[payload["template"]] else SWITCHED_SINCE


def _texted(rt: Runtime, phone_enc: str) -> str:
    """The blind index of the number a keyword's reply goes to: the one that texted."""
    return rt.cipher.blind_index(rt.cipher.decrypt(phone_enc, context=SMS_PHONE_CONTEXT))


async def _give_back(rt: Runtime, payload: dict[str, Any], *, best_effort: bool = False) -> None:
    """A keyword's reply not sent (a reply to STOP or START: SWITCHED_SINCE; any, discarded by an admin) gives back its
    count against the number's reply limits (channels.sms.routes.COUNTED_AT), once whatever the runs of its
    GIVE_BACK_JOB (give_back_unsent) and the ways it was not sent. One queued without it (an earlier release's, or by
    the retry of a text an earlier release's try counted) stays counted, and so does one whose number an erasure took
    off its job. Redis failing raises (the job tries again); `best_effort` (the worker's at once, beside the job that
    is queued): logged, left to the job."""
    counted_at = _counted(payload)
    if counted_at is not None:
        await give_back_reply(rt, _texted(rt, payload["phone_enc"]), message_key(payload), counted_at,
                              str(payload.get("template")), best_effort=best_effort)


def _counted(payload: dict[str, Any]) -> float | None:
    """When a keyword reply's 'sms.send' payload was counted against the number's reply limits (COUNTED_AT in its
    context), if it was and still names the number (an erasure takes it off): what a give-back needs."""
    counted_at = (payload.get("context") or {}).get(COUNTED_AT)
    return float(counted_at) if isinstance(counted_at, int | float) and payload.get("phone_enc") else None


# Receipts worth sending only while the payment still holds the money they say was received: one queued before
# its recording was voided (core.recorded_payments.void_recording) and sent after it (the worker or the aggregator was
# down meanwhile) would tell the member she paid what the cooperative has just taken off her record. (Money taken
# after a failure is told too: the payment stays FAILED, which is never voided, but the text says money is held.)
RECEIPT_TEMPLATES = frozenset({"payment_receipt", "payment_receipt_refunded", "payment_late_receipt",
                               "payment_taken_after_failure"})
PAYMENT_VOIDED = "payment_voided"  # why such a receipt is not sent: the job's last word is "not sent: <this>"
# Failure SMS ("failed ... dial to try again", "not approved in time", "could not confirm") worth sending only while
# no money of the payment came: one queued before the provider reported the money taken after all (the payment
# completed late, or FAILED holds it) and sent after (the worker or the aggregator was down) told her to pay again
# for a payment made, maybe after the receipt that said not to (its job is younger, its backoff shorter). Her late
# receipt (or payment_taken_after_failure) says what happened.
FAILURE_TEMPLATES = frozenset({"payment_failed", "payment_timeout", "payment_unconfirmed"})
PAYMENT_PAID_SINCE = "payment_paid_since"
STALE_TEMPLATES = RECEIPT_TEMPLATES | FAILURE_TEMPLATES
_PAYMENT_STATUS = select(Payment.__table__.c.status, Payment.__table__.c.completed_at,
                         Payment.__table__.c.collected_minor).where(
    Payment.__table__.c.id == bindparam("p", type_=String))


# "Refund ... failed: your cooperative will contact you" worth sending only while the refund has not gone through: one
# queued before the provider reported it sent back after all (its late answer, or a person correcting a FAILED
# recorded too soon) and sent after (the worker or the aggregator was down), after "refund completed" maybe, told her
# the money she has back was not sent.
REFUND_FAILED = "refund_failed"
REFUND_SENT_SINCE = "refund_sent_since"
_REFUND_STATUS = select(Refund.__table__.c.status).where(Refund.__table__.c.id == bindparam("r", type_=String))


async def _refund_void(conn: AsyncConnection, payload: dict[str, Any]) -> str | None:
    """Why a refund_failed message to a member must not go out any more, None to send it: refund_sent_since (the
    refund COMPLETED since). A refund that does not exist is left to the build, which parks the job."""
    refund_id = (payload.get("context") or {}).get("refund_id")
    if not isinstance(refund_id, str):
        return None
    found = await pgraw.first(conn, _REFUND_STATUS, {"r": refund_id})
    return REFUND_SENT_SINCE if found is not None and found[0] == RefundStatus.COMPLETED.value else None


class _MoneyRead(NamedTuple):
    """A payment's status, completed_at and collected_minor as a probe read them (core.state.payment.MoneyState)."""

    status: str
    completed_at: datetime | None
    collected_minor: int | None


def _stale(template: Any, payment: MoneyState) -> str | None:
    """Why a payment's SMS no longer tells the truth, None while it does: PAYMENT_VOIDED for a receipt of a payment
    voided since, PAYMENT_PAID_SINCE for a failure whose money came since (completed late, or held by the FAILED
    payment: core.state.payment.holds_money)."""
    if template in RECEIPT_TEMPLATES and payment.status == PaymentStatus.VOIDED.value:
        return PAYMENT_VOIDED
    if template in FAILURE_TEMPLATES and holds_money(payment):
        return PAYMENT_PAID_SINCE
    return None


class _NotSent(Exception):
    """A message built for its turn that must not go out any more (`reason`): nothing stored, nothing sent."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


async def _receipt_void(conn: AsyncConnection, payload: dict[str, Any]) -> str | None:
    """Why a STALE_TEMPLATES message stored by an earlier attempt must not go out any more, None to send it:
    payment_voided, payment_paid_since (_stale). (A first attempt's build reads the payment's status with the rest
    of its facts: _build.)"""
    payment_id = (payload.get("context") or {}).get("payment_id")
    if not isinstance(payment_id, str):
        return None
    found = await pgraw.first(conn, _PAYMENT_STATUS, {"p": payment_id})
    return _stale(payload.get("template"), _MoneyRead(*found)) if found is not None else None


# The SMS to the number that paid a payment of no member (its receipt, "your payment failed", a refund's, a dispute's:
# every template a payer who is no member is texted, PAYER_TEMPLATES), checked again on every attempt: queued while
# that number was its payer's and sent after a member got it (a new SIM, a swap: the worker or the aggregator down
# meanwhile, a parked job replayed, a late success told after the move), it told her of another's payment, its
# amount and reference. Not sent then; the job says why (lastError "not sent: number_went_to_a_member"). Nor once the
# payment is older than SMS_PAYER_ANSWER_DAYS ("not sent: older_than_answer_days"): the operator may have given the
# number to a stranger since, as the RECEIPT keyword, the desk's resend and a refund's or dispute's SMS queued then
# judge it (core.refunds.payer_to_tell); one queued on the 89th day and sent on the 91st, or a late receipt months
# on, is judged as they are. A refund's or dispute's is judged when it is queued too (core.refunds.payer_to_tell,
# audited); a payment's is judged here only, whenever it was queued: asked at the callback it would be a round trip
# more on every payment of no member's outcome, under its row lock, for what this check, a first attempt's in the
# query that reads the receipt's rows, catches anyway.
PAYER_TEMPLATES = frozenset((*REFUND_TEMPLATES, *DISPUTE_TEMPLATES, *STATUS_REPLY_TEMPLATES,
                             *filter(is_payment_template, TEMPLATES)))
NUMBER_WENT_TO_A_MEMBER = "number_went_to_a_member"
# The reasons a message is not sent that its job says (GET /v1/jobs): about the cooperative's own records (a reminder's
# or member SMS's are not: shown_reason).
SAID_ON_THE_JOB = frozenset({PAYMENT_VOIDED, PAYMENT_PAID_SINCE, REFUND_SENT_SINCE, NUMBER_WENT_TO_A_MEMBER,
                             OLDER_THAN_ANSWER_DAYS})
_R, _D = Refund.__table__, Dispute.__table__
_P = Payment.__table__
# Payments made before this are past SMS_PAYER_ANSWER_DAYS (None: no limit, and `created_at < NULL` holds for none).
_ANSWER_SINCE = bindparam("answer_since", type_=DateTime(timezone=True))


def _answer_since(answer_days: int) -> datetime | None:
    """_ANSWER_SINCE's value: SMS_PAYER_ANSWER_DAYS (0: no limit) before now."""
    return utcnow() - timedelta(days=answer_days) if answer_days else None


def _payer_gone(*also: Any) -> Any:
    """In a statement reading the payment (payments): why the number that paid it is no longer texted about it, NULL
    while it is: OLDER_THAN_ANSWER_DAYS (made before _ANSWER_SINCE), or NUMBER_WENT_TO_A_MEMBER (a member got it by a
    correction since: core.members.number_came_since), as core.refunds.payer_to_tell asks them, in that order. Asked
    of a payment of no member (and `also`) only: in a CASE, the audit log is probed for those rows alone, and not for
    one too old; a member's payment costs nothing."""
    came = number_came_since_rows(_P.c.payment_account_index, _P.c.created_at).correlate(_P).exists()
    payer = and_(*also, _P.c.member_id.is_(None), _P.c.payment_account_index.is_not(None))
    return case((and_(payer, _P.c.created_at < _ANSWER_SINCE), literal(OLDER_THAN_ANSWER_DAYS)),
                (and_(payer, came), literal(NUMBER_WENT_TO_A_MEMBER)), else_=null())


# The payment a PAYER_TEMPLATES message is about (its context names it, or its refund or dispute): its status and
# why its number is no longer texted about it, in one probe.
_PAYER_PROBES = {
    "payment_id": select(_P.c.status, _P.c.completed_at, _P.c.collected_minor, null(), _payer_gone())
    .where(_P.c.id == bindparam("i", type_=String)),
    "refund_id": select(_P.c.status, _P.c.completed_at, _P.c.collected_minor, _R.c.status, _payer_gone())
    .select_from(_R.join(_P, _P.c.id == _R.c.payment_id)).where(_R.c.id == bindparam("i", type_=String)),
    "dispute_id": select(_P.c.status, _P.c.completed_at, _P.c.collected_minor, null(), _payer_gone())
    .select_from(_D.join(_P, _P.c.id == _D.c.payment_id)).where(_D.c.id == bindparam("i", type_=String)),
}


async def _payer_void(conn: AsyncConnection, payload: dict[str, Any], answer_days: int) -> str | None:
    """Why a PAYER_TEMPLATES message to a number (no member named) must not go out any more, None to send it:
    PAYMENT_VOIDED for a receipt whose payment was voided since (as _receipt_void); for a payment of no member,
    OLDER_THAN_ANSWER_DAYS once it is older than `answer_days` (SMS_PAYER_ANSWER_DAYS, 0: no limit), or
    NUMBER_WENT_TO_A_MEMBER once a member got the number that paid it by a correction since the payment. One probe;
    the audit log's only for a payment of no member young enough (_payer_gone)."""
    context = payload.get("context") or {}
    for name, probe in _PAYER_PROBES.items():
        if isinstance(context.get(name), str):
            found = await pgraw.first(conn, probe, {"i": context[name], "answer_since": _answer_since(answer_days)})
            break
    else:
        return None
    if found is None:
        return None  # left to the build, which names what is missing
    status, completed_at, collected_minor, refund_status, gone = found
    stale = _stale(payload.get("template"), _MoneyRead(status, completed_at, collected_minor))
    if stale is not None:
        return stale
    if payload.get("template") == REFUND_FAILED and refund_status == RefundStatus.COMPLETED.value:
        return REFUND_SENT_SINCE
    return str(gone) if gone else None


class _Member(NamedTuple):
    phone_enc: str
    cooperative_id: str
    language: str


class _PaymentRow(NamedTuple):
    payment: PaymentFacts
    member: _Member | None  # None when the payload names no member
    coop_language: str  # a payer who is none of its members is texted in it
    payer_gone: str | None  # no member named, and the number that paid a payment of no member is texted no more


_FACTS = len(PaymentFacts._fields)  # the query's columns: PaymentFacts', then _Member's
_COOP_NAME = PaymentFacts._fields.index("coop_name")


async def _payment_facts(conn: AsyncConnection, payload: dict[str, Any], answer_days: int) -> _PaymentRow | None:
    """A payment template's rows (payment, its type, the cooperative, the member) in one plain query, or
    None: not a payment template, or a row missing (build_message then says which). `answer_days`:
    SMS_PAYER_ANSWER_DAYS, for a payload naming no member (_payer_gone)."""
    payment_id = (payload.get("context") or {}).get("payment_id")
    if not is_payment_template(payload.get("template")) or not isinstance(payment_id, str):
        return None
    member_id = payload.get("member_id") or None
    params = {"c": payload.get("cooperative_id") or None, "m": member_id, "p": payment_id,
              "answer_since": _answer_since(answer_days)}
    row = await pgraw.first(conn, _PAYMENT_FACTS, params)
    if row is None or row[_COOP_NAME] is None or (member_id and row[_FACTS] is None):
        return None  # the cooperative or the member is gone
    member = _Member(*row[_FACTS:-2]) if member_id else None
    return _PaymentRow(PaymentFacts(*row[:_FACTS]), member, row[-2], row[-1] or None)


_T, _C, _M = (model.__table__ for model in (PaymentType, Cooperative, Member))
# Built once; the columns in PaymentFacts' order, then the member's (_Member), then the cooperative's language, then
# why the number that paid a payment of no member is texted no more (_payer_gone: for a payload that names no member
# only, so a member's receipt reads no more than before).
_PAYMENT_FACTS = (
    select(
        _P.c.amount_minor, _P.c.currency, _P.c.reference, _P.c.provider_transaction_id, _P.c.completed_at,
        _P.c.updated_at, _P.c.status, _P.c.failure_reason, _T.c.name, _C.c.name, _C.c.timezone,
        _C.c.ussd_extension, _P.c.collected_minor, _C.c.ussd_aggregator, _P.c.provider, _P.c.refunded_minor,
        _M.c.phone_enc,
        _M.c.cooperative_id, _M.c.language, _C.c.language, _payer_gone(bindparam("m", type_=String).is_(None)),
    )
    .select_from(_P)
    .outerjoin(_T, _T.c.id == _P.c.payment_type_id)
    .outerjoin(_C, _C.c.id == func.coalesce(bindparam("c", type_=String), _P.c.cooperative_id))
    .outerjoin(_M, _M.c.id == bindparam("m", type_=String))
    .where(_P.c.id == bindparam("p", type_=String))
)


def _phone(rt: Runtime, message: Any):  # type: ignore[no-untyped-def]
    from core.phone import Phone

    return Phone(rt.cipher.decrypt(message.phone_enc, context=SMS_PHONE_CONTEXT))


def job_handlers(rt: Runtime) -> dict[str, Handler]:
    from core import webhooks

    jobs = SmsJobs(rt)

    async def webhook_event(job: Job) -> None:
        await webhooks.fan_out(rt, job.payload, job.id)

    async def webhook_deliver(job: Job) -> None:
        await webhooks.deliver(rt, job)

    async def give_back(job: Job) -> None:
        await give_back_unsent(rt, job)

    return {"sms.send": jobs.send, "webhook.event": webhook_event, "webhook.deliver": webhook_deliver,
            GIVE_BACK_JOB: give_back}


# The message row's text columns (String(N)): an aggregator's wording must not fail the outcome's write
# (the row would stay QUEUED and the job would send again).
_WIDTHS = {"provider_status": 32, "failure_reason": 64}


def _fit(column: str, value: Any) -> Any:
    width = _WIDTHS.get(column)
    return value[:width] if width is not None and isinstance(value, str) else value
