"""Worker jobs owned by the core: collect, poll and time out payments; submit and poll refunds."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import exists, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from core import metrics
from core.audit import Actor
from core.db import lock_row, utcnow
from core.models import Cooperative, Member, OutboxJob, Payment, PaymentType, Refund
from core.money import Money
from core.outbox import (
    CALL_SENT,
    CALL_STARTED,
    INTERRUPTED,
    NOTHING_PROCESSED,
    PAYMENT_KINDS,
    Handler,
    Hinted,
    Job,
    PermanentJobError,
    RetryLater,
    call_starting,
    db_now,
    end_waiting,
    enqueue,
    handler_timeout,
    schema_mismatch,
)
from core.payments import payment_account
from core.phone import Phone
from core.ports import (
    AWAITING_CONFIGURATION,
    AWAITING_CONFIGURATION_NOTE,
    NOT_SENT,
    REFUND_UNSUPPORTED,
    CollectionAccepted,
    CollectionRequest,
    CredentialsRefused,
    ProviderError,
    ProviderOutcome,
    ProviderTimeout,
    RefundRequest,
    StatusResult,
    watch_departures,
)
from core.provider_events import WATCH_AFTER_CANCEL, WATCH_JOB, apply_collection_outcome
from core.reference_mark import ReferenceWatch
from core.refunds import apply_kept_refusal, apply_refund_outcome, collected, lock_for_outcome, paying_number_changed
from core.state import StaleTransition, transition
from core.state.payment import OPEN, OPEN_VALUES, PAYMENT, UNCONFIRMED, PaymentStatus
from core.state.refund import REFUND, RefundStatus
from core.transaction_ids import CONTESTED_JOB, flag_contested

if TYPE_CHECKING:
    from core.runtime import Runtime

log = logging.getLogger("gateway.jobs")
WORKER = Actor("system", "worker")
# A refund the provider has not settled this long after it was asked for is parked for a person: some
# providers (M-Pesa reversals) report only by a callback that may never come, and a poll cannot tell.
REFUND_POLL_LIMIT = timedelta(hours=24)
# A payment whose outcome the provider has not told us by the end of its approval window (status queries
# failing or unreadable, an AMBIGUOUS answer) stays open and polled this long after it: the money may
# have been taken (MTN calls back once, with no retry), and "not approved" would invite a second payment.
SETTLE_GRACE = timedelta(hours=24)  # the default of PAYMENT_SETTLE_GRACE_SECONDS
SETTLE_POLL_CAP = 1800.0  # seconds between status queries once backed off
# The failure reason of a payment whose collection never reached the provider (an outage: the collect job
# failed or parked, the provider has no such request once the window is over). channels.sms reads it as
# reason "provider_unreachable" (nothing was taken, try again), never as "not approved in time".
NEVER_SENT = "the request never reached the provider; nothing was taken"
PROVIDER_UNREACHABLE = f"provider unreachable: {NEVER_SENT}"
# Times a refund the provider says it never received (status NOT_FOUND) is sent again, same reference.
REFUND_RESENDS = 3


def collect_call_budget(lease_seconds: float) -> float:
    """Seconds a collect or refund job gives its provider call: the worker's handler timeout less a margin to
    record the answer. Past it the call counts as unanswered (ask the status), never as failed."""
    limit = handler_timeout(lease_seconds)
    return limit - min(5.0, limit / 5)


def poll_delay(age_seconds: float) -> float:
    """Poll often while the payer is likely at the PIN prompt, then back off (cap 2 minutes)."""
    if age_seconds < 60:
        return 15
    if age_seconds < 180:
        return 30
    return min(120, 30 * 2 ** int(age_seconds // 300))


def next_poll_in(payment: Payment, now: datetime) -> float:
    """poll_delay, but never past the end of the approval window, so a TIMEOUT is declared on time."""
    left = (payment.expires_at - now).total_seconds()
    return max(1.0, min(poll_delay((now - payment.created_at).total_seconds()), left))


def settle_poll_in(payment: Payment, now: datetime, grace: timedelta = SETTLE_GRACE) -> float:
    """After the window, with the outcome unknown: ask every minute at first, backing off to every
    SETTLE_POLL_CAP, never past the end of the settling grace (when the payment is given up)."""
    overdue = (now - payment.expires_at).total_seconds()
    left = (payment.expires_at + grace - now).total_seconds()
    return max(1.0, min(SETTLE_POLL_CAP, 60 * 2 ** int(overdue // 600), left))


async def payment_and_now(session: AsyncSession, payment_id: str) -> tuple[Payment | None, datetime]:
    """The payment, and now by the database's clock (PostgreSQL: read in the same statement). Its approval
    window is judged, and its next poll set, by the clock the outbox runs by, not this worker's: one whose
    clock runs minutes fast would otherwise end a payment the payer is approving "not approved in time"."""
    if session.get_bind().dialect.name != "postgresql":
        return await session.get(Payment, payment_id), utcnow()  # embedded: one process, one clock
    row = (await session.execute(select(Payment, func.now()).where(Payment.id == payment_id))).first()
    return (row[0], row[1]) if row is not None else (None, utcnow())


def _callback_url(rt: Runtime, provider: str) -> str:
    from providers.routes import callback_url

    return callback_url(rt.settings, provider)


async def _timed(provider: str, operation: str, coro):  # type: ignore[no-untyped-def]
    """The whole operation's latency (its retries included; a token obtained before it, by ready_to_send, is
    timed per call by the adapter as its own operation). Errors are counted where they happen, once,
    by the transport and the adapters (providers.calls): counted here too, one failed call would count twice,
    and an answer such as a status query's NOT_FOUND (a provider that never got the request) as an error."""
    started = time.perf_counter()
    try:
        return await coro
    finally:
        metrics.PROVIDER_OPERATIONS.labels(provider=provider, operation=operation).observe(
            time.perf_counter() - started)


async def ready_to_send(provider: object, operation: str, deadline: float) -> None:
    """What `provider` needs before it sends `operation`'s request ("collect", "refund"): its OAuth token, by its
    optional `prepare(operation)` (IremboPay has none). Obtained by `deadline` (the event loop's clock), before
    the job stamps its call (call_starting) and starts the call's own deadline: until the request leaves, nothing
    can have arrived. A token endpoint slow or failing then makes an attempt that was never sent (a retryable
    ProviderError: sent again later, as in an outage), not one whose request may have arrived - which is never
    sent again, and M-Pesa could not even be asked about (its status query needs the CheckoutRequestID its
    push's answer brings): the payer would never be prompted. A refusal that will not change (bad credentials)
    is raised as the provider said it: nothing was sent."""
    prepare = getattr(provider, "prepare", None)
    if prepare is None:
        return
    name = getattr(provider, "name", "provider")
    try:
        async with asyncio.timeout_at(deadline):
            await prepare(operation)
    except TimeoutError:
        raise ProviderError(f"{name} {operation}: its token was not obtained in time; nothing was sent, "
                            "sent later", retryable=True, code=NOT_SENT) from None
    except ProviderTimeout as exc:  # a token request creates nothing at the provider: unanswered is not sent
        raise ProviderError(f"{name} {operation}: {exc}; nothing was sent, sent later", retryable=True,
                            code=NOT_SENT) from exc


_T = TypeVar("_T")


async def _until_it_leaves(name: str, operation: str, call: Awaitable[_T], deadline: float | None = None) -> _T:
    """`call` (the adapter's request_collection or request_refund, after the job's stamp), by `deadline` (the event
    loop's clock; None: the worker's own cut-off alone), with what failed before its request that moves money left
    made what it is: a retryable NOT_SENT, sent again later. Whether it left is watched, not guessed
    (core.ports.watch_departures): providers.calls.send counts a request gone as it hands it to the transport, and
    turns it back only when it cannot have been taken (no connection was had; answered 401).

    Before it left: an exception of the adapter's own (a bad amount, a credential a header cannot carry:
    providers.calls.not_sent), the deadline (passed before the call started; a token fetched again inside the call:
    its cached one had lapsed, or was refused 401), or a retryable failure of another call (the token's request
    unanswered or answered 5xx, an IremboPay invoice's): taken for a call that may have arrived (what any other
    exception after the stamp is: core.outbox's run_job), the payment would only be asked about, never sent
    (M-Pesa's and IremboPay's cannot even be asked without their own id), and an Airtel refund left to a person. A
    definite refusal (not retryable: CredentialsRefused, a number the provider cannot pay) and a failure that
    already says nothing was processed (core.outbox.NOTHING_PROCESSED: a 429 keeps its Retry-After) are raised as
    they are.

    Once it left, anything raised (a timeout, a reset connection, the adapter failing on the answer) stays in doubt
    and is asked about (the deadline, with the provider's id for the request known, as a ProviderTimeout carrying
    it: core.ports.known_as); a NOT_SENT, UNREACHABLE or HTTP_429 then speaks of another request than the one that
    left (none does today), and so does a CredentialsRefused (a refusal of the money request itself turned it back:
    providers.calls.send, the M-Pesa adapter's), so it is made a ProviderTimeout (carrying that id too), never sent
    again blind nor ended as nothing taken. A ProviderTimeout is the adapter's own word that its request may have
    arrived: raised as it is, left or not."""
    if deadline is not None and asyncio.get_running_loop().time() >= deadline:
        # Passed before the call starts (the job waited for a slot, its stamp was slow): nothing is handed over.
        # Started, its request would be cut off wherever the transport first waits, connecting or after writing it
        # (over a kept-alive connection): in doubt, where it was certain nothing had left.
        if inspect.iscoroutine(call):
            call.close()
        raise ProviderError(f"{name} {operation}: not sent, the call's deadline had passed before it started; nothing "
                            "was sent, sent later", retryable=True, code=NOT_SENT)
    with watch_departures() as watch:
        try:
            async with asyncio.timeout_at(deadline):
                return await call
        except ProviderTimeout:
            raise
        except TimeoutError:
            if watch.left and watch.provider_transaction_id:
                # The deadline with a request out, the provider's id for it known (IremboPay's invoice number):
                # carried, so it is stored and any process asks by it (core.ports.known_as).
                raise ProviderTimeout(f"{name} {operation}: no answer by the call's deadline; ask the status, do not "
                                      "send again", provider_transaction_id=watch.provider_transaction_id) from None
            if watch.left:
                raise  # the deadline with a request out: it may have arrived
            raise ProviderError(f"{name} {operation}: not sent by the call's deadline (a request it needs first, "
                                "its token or an invoice, not answered in time); nothing was sent, sent later",
                                retryable=True, code=NOT_SENT) from None
        except ProviderError as exc:
            if watch.left and (exc.code in _NOTHING_LEFT or isinstance(exc, CredentialsRefused)):
                raise ProviderTimeout(f"{exc}; but a request that moves money had left before it: it may have "
                                      "arrived; ask the status, do not send again",
                                      provider_transaction_id=watch.provider_transaction_id) from exc
            if watch.left or not exc.retryable or exc.code in NOTHING_PROCESSED:
                raise
            raise ProviderError(f"{exc}; nothing was sent, sent later", retryable=True, code=NOT_SENT) from exc
        except Exception as exc:
            if watch.left:
                raise
            from providers.calls import not_sent

            raise not_sent(name, operation, exc) from exc


async def _status_by(deadline: float, name: str, operation: str, call: Awaitable[_T]) -> _T:
    """A status query (`operation`: a payment's "status", a refund's "refund_status"), timed (_timed), answered by
    the call's `deadline` (the event loop's clock, from the job's claim: job_handlers' call_deadline). It moves no
    money, so one unanswered then is a failed query (a retryable ProviderError TIMEOUT: its job asks again, as after
    any failed query), not a job the worker cuts off (INTERRUPTED: an attempt used and, on the last, the job parked
    with no word of what failed). A TimeoutError of the call's own (not this deadline's) is raised as it is."""
    lookup = asyncio.timeout_at(deadline)
    try:
        async with lookup:
            return await _timed(name, operation, call)
    except TimeoutError:
        if not lookup.expired():
            raise
        raise ProviderError(f"{name} {operation}: no answer by the call's deadline", retryable=True,
                            code="TIMEOUT") from None


# What a ProviderError's code says of the request that failed: it never left this process (a request not made, a
# connection never had), or the provider's rate limit refused it unprocessed (HTTP_429: providers.calls.send turns a
# money request so answered back). Raised after a request that moves money left (and was not turned back), it is
# about another: as it is, the outbox would take the try for one nothing processed (NOTHING_PROCESSED) and send the
# money request again. (A CredentialsRefused raised then is about another too: _until_it_leaves.)
_NOTHING_LEFT = frozenset({NOT_SENT, "UNREACHABLE", "HTTP_429"})


# Why a payment whose member was suspended before its request left ends CANCELLED (nothing sent, nothing taken).
MEMBER_NOT_ACTIVE = "membership not active: not sent to the provider, nothing was taken"
# Why a payment whose cooperative was suspended before its request left ends CANCELLED: it takes no payments then.
COOPERATIVE_NOT_ACTIVE = "cooperative not active: not sent to the provider, nothing was taken"

# Why a payment whose provider refused the gateway's own credentials (core.ports.CredentialsRefused: a rotated key)
# ended FAILED at once: its payer is waiting on her phone, and is told the service could not be reached (its words sort
# so: channels.sms.templates.reason_key), not kept waiting for a configuration fix. The operator is told by the
# adapter's error line and gateway_provider_failing (providers.calls.credentials_refused).
CREDENTIALS_REFUSED = ("the provider refused the gateway's credentials (its configuration must be fixed): "
                       "the request never reached the provider; nothing was taken")


def left_out(provider: str) -> str:
    """Why a row's provider cannot be called: this deployment no longer uses it (PROVIDERS; the row is from before
    it was left out), and builds no adapter for it."""
    return f"provider {provider} is not in PROVIDERS (this deployment does not use it)"


def awaiting_configuration(exc: CredentialsRefused) -> ProviderError:
    """A refund's call refused for the gateway's credentials, as the outbox retries it: a refund is not urgent, and a
    fault of ours is never a failed refund told to the member. Retried with backoff, then parked; replayed once the
    configuration is fixed. Nothing was processed (core.outbox.NOTHING_PROCESSED): still a refund never sent."""
    return ProviderError(f"{exc}{AWAITING_CONFIGURATION_NOTE}", retryable=True, code=AWAITING_CONFIGURATION)


def _not_asked(payment: Payment, job: Job | None = None) -> str:
    """Why the job of an open payment whose provider was left out of PROVIDERS is parked, and what a person does:
    its status cannot be asked, and nothing is guessed about money. A collect `job` an earlier try of which may have
    reached the provider (CALL_SENT) keeps saying so, so that its replay (its attempts back at 0) never takes its
    next try for a first one (Job.tried_before)."""
    sent = f"{CALL_SENT}: " if job is not None and (job.last_error or "").startswith(CALL_SENT) else ""
    return (f"{sent}payment {payment.reference}: {left_out(payment.provider)}, so its status cannot be asked; add "
            f"{payment.provider} back to PROVIDERS (with its variables) and replay this job, or check the provider's "
            f"statement and record its outcome with POST /v1/payments/{payment.id}/outcome")


def _refund_not_sent(job: Job, refund: Refund, payment: Payment) -> str:
    """Why a refund's submission whose provider was left out of PROVIDERS is parked. One no try of which may have
    reached the provider starts with AWAITING_CONFIGURATION, which core.refunds.cancel_refund reads as never sent
    (withdrawable); one an earlier try of which may have (CALL_SENT) keeps that, so it is never withdrawn and
    refunded twice."""
    what = (f"refund {refund.reference}: {left_out(payment.provider)}, so it cannot be sent; add {payment.provider} "
            "back to PROVIDERS (with its variables) and replay this job, or ")
    if (job.last_error or "").startswith(CALL_SENT):
        return (f"{CALL_SENT}: {what}check with the provider (an earlier try may have reached it) and record its "
                f"outcome with POST /v1/refunds/{refund.id}/outcome")
    return f"{AWAITING_CONFIGURATION}: {what}withdraw it with POST /v1/refunds/{refund.id}/cancel"


# A payment the provider has never heard of after its window, while a collect job is still sending its request:
# asked again this much later, when that call has been answered (or cut off at the job's deadline).
IN_FLIGHT_POLL_SECONDS = 15.0
# A payment poll's payload key: how many collect jobs it queued to send a request the provider had not got (NOT_FOUND
# inside the window), each keyed collect:<payment id>:resent:<n>. In the payload, which a replay keeps.
RESENT = "resent"
# At most this many of them a payment (n from 1 to it: the keys are the payment's, so a poll the sweep queued beside
# its own, counting from 0, finds them taken): a request the provider never got, sent again with the same reference
# (which it deduplicates), as a refund's (REFUND_RESENDS). Uncapped, a provider that swallowed every request (each one
# unanswered, ProviderTimeout, its status lookup NOT_FOUND) was sent one more at every poll of the window, 15 to 30 s
# apart, each holding a slot of its lane for the whole call budget ahead of other payers' first requests.
PAYMENT_RESENDS = 3


async def _collect_in_flight(session: AsyncSession, payment_id: str, *, retry_before: datetime | None = None,
                             closed_at: datetime | None = None) -> bool:
    """A collect job of this payment (its first, or a resend after NOT_FOUND) is held by a worker: it may be
    sending the request now. With `retry_before` (the end of the payment's window), also one waiting to try again
    before then (a retry after a failed call, or not run yet): it will send the request itself, and a resend
    beside it would only double the calls to a provider already failing. With `closed_at` (the end of the
    window, once it is over), not one a worker took up at or after it that has not stamped a call (a first claim:
    no earlier attempt's worker lost while running it): the collect job reads the window by the same clock the
    claim stamped updated_at with, and sends nothing then. RUNNING jobs are a few (ix_outbox_due: status first);
    PENDING ones are the whole backlog, largest in an outage (a few ms more per poll then, read by the dedupe key's
    prefix)."""
    key = OutboxJob.dedupe_key
    live = OutboxJob.status == "RUNNING"
    if closed_at is not None:
        live = live & ((OutboxJob.updated_at < closed_at) | (OutboxJob.last_error == CALL_STARTED)
                       | OutboxJob.last_error.startswith(INTERRUPTED, autoescape=True))
    if retry_before is not None:
        live = live | ((OutboxJob.status == "PENDING") & (OutboxJob.run_at < retry_before))
    return (await session.execute(select(OutboxJob.id).where(
        live, OutboxJob.kind == "payment.collect",
        (key == f"collect:{payment_id}") | key.like(f"collect:{payment_id}:%")).limit(1))).first() is not None


async def refund_note(session: AsyncSession, payment: Payment) -> str:
    """The note a refund's provider is sent (RefundRequest.note): the payment's reference and its cooperative's name,
    which the member knows; never the admin's reason (internal wording), which stays in our records."""
    name = await session.scalar(select(Cooperative.name).where(Cooperative.id == payment.cooperative_id))
    return " ".join(("Refund", payment.reference, name or ""))


async def collect_description(session: AsyncSession, payment: Payment) -> tuple[str, str | None, str | None]:
    """What a collection request tells the payer it is for (CollectionRequest.description; her PIN prompt, MTN's
    payerMessage): the description the cooperative's system gave, else the payment type, the payment's reference and
    the cooperative's name ("Monthly Rent PAY_20261203_001 Kigali Heights"), never an internal id; the
    cooperative's language and its status (None: its row is gone). One query."""
    names = (await session.execute(
        select(PaymentType.name, Cooperative.name, Cooperative.language, Cooperative.status)
        .select_from(Cooperative)
        .outerjoin(PaymentType, PaymentType.id == payment.payment_type_id)
        .where(Cooperative.id == payment.cooperative_id))).first()
    if names is None:
        return payment.description or payment.reference, None, None
    if payment.description:
        return payment.description, names.language, names.status
    return (" ".join(part for part in (names[0], payment.reference, names[1]) if part), names.language,
            names.status)


def refund_poll_parked(job: Job, last: str) -> str:
    """Why a refund.poll is parked after its last attempt (`last`: how that attempt ended, the worker's cut-off
    included), and what a person does: the refund holds its amount (PROCESSING) until its outcome is recorded."""
    refund_id = job.payload["refund_id"]
    return (f"refund {refund_id} needs manual review: its status was not settled in {job.attempts} tries (last: "
            f"{last}); replay this job once that is fixed, or check with the provider, then record it with "
            f"POST /v1/refunds/{refund_id}/outcome")


def job_handlers(rt: Runtime) -> dict[str, Handler]:
    def call_deadline(job: Job) -> float:
        """When (the event loop's clock) the job's provider call, its token included, must be answered: the call
        budget less the time the job waited for a slot after its claim (the worker's deadline runs from the
        claim). Inside the worker's own, so a slow token or call ends the attempt as never sent or unanswered,
        not cut off by the worker (Job.interrupted)."""
        waited = time.monotonic() - job.claimed
        return asyncio.get_running_loop().time() + collect_call_budget(rt.settings.outbox_lease_seconds) - waited

    async def collect(job: Job) -> None:
        deadline = call_deadline(job)
        async with rt.sessionmaker() as session:
            payment, now = await payment_and_now(session, job.payload["payment_id"])
            if payment is None or payment.status != PaymentStatus.PENDING.value:
                return  # already moved on: running twice is harmless
            member = await session.get(Member, payment.member_id) if payment.member_id else None
            description, coop_language, coop_status = await collect_description(session, payment)
            # A payer who is none of its members (an API payment for her number or account): the cooperative's
            # language (IremboPay's invoice page is in it).
            language = member.language if member is not None else coop_language
        if now >= payment.expires_at:
            # Its approval window is over (by the database's clock, as the poll judges it): a request sent
            # now (a retry after an outage, a replayed parked job) would put a PIN prompt on the payer's phone
            # for a payment the next poll ends. Nothing is sent; the poll settles it (PROVIDER_UNREACHABLE
            # when the provider never got it).
            log.warning("collection not sent: the payment's approval window is over",
                        extra={"payment": payment.reference, "payment_id": payment.id, "job_id": job.id,
                               "overdue_minutes": int((now - payment.expires_at).total_seconds() // 60)})
            return
        if job.call_may_have_arrived:
            # An earlier attempt was cut off mid-call (the last one, or one before tries that failed before
            # they could ask: core.outbox.CALL_IN_DOUBT): the provider may have the request (M-Pesa
            # has no idempotency key, a second push is a second charge). Ask its status instead. (One whose
            # worker was lost before the stamp below never called: sent now, as IremboPay and M-Pesa, whose
            # status cannot be asked without the provider's own id, would otherwise never prompt the payer.)
            log.warning("collection attempt was cut off; status polling will settle it",
                        extra={"payment": payment.reference})
            return
        if payment.provider not in rt.providers:
            # Its provider was left out of PROVIDERS after the payment was made (its request still queued).
            if job.tried_before:  # an earlier attempt may have reached it: a person settles what it holds
                raise PermanentJobError(_not_asked(payment, job))
            async with rt.sessionmaker.begin() as session:  # never sent, nothing taken: its payer is told so
                fresh = await session.get(Payment, payment.id, with_for_update=True)
                if fresh is not None and fresh.status == PaymentStatus.PENDING.value:
                    await apply_collection_outcome(session, rt, fresh, ProviderOutcome.FAILED, actor=WORKER,
                                                   reason=f"{left_out(payment.provider)}: {NEVER_SENT}")
            log.warning("collection not sent: its provider is not in PROVIDERS",
                        extra={"payment": payment.reference, "payment_id": payment.id, "provider": payment.provider})
            return
        # Suspended (or set back to pending) after the payment was made, perhaps while its USSD hop ran: a member who
        # left is never prompted to pay; nor is anyone for a cooperative suspended since (it takes no payments).
        inactive = (("the cooperative", COOPERATIVE_NOT_ACTIVE) if coop_status is not None and coop_status != "ACTIVE"
                    else ("the member", MEMBER_NOT_ACTIVE) if member is not None and member.status != "ACTIVE"
                    else None)
        if inactive is not None:
            who, reason = inactive
            if job.tried_before:
                # An earlier attempt may have reached the provider (one answered 5xx may still be stored there, a
                # replayed job's too): nothing more is sent, and the status poll settles what the provider has.
                log.warning(f"collection not sent again: {who} is no longer active",
                            extra={"payment": payment.reference, "payment_id": payment.id})
                return
            # No earlier try of this job may have sent it (nor was one cut off, above): nothing sent, nothing taken.
            async with rt.sessionmaker.begin() as session:
                fresh = await session.get(Payment, payment.id, with_for_update=True)
                if fresh is not None and fresh.status == PaymentStatus.PENDING.value:
                    await apply_collection_outcome(session, rt, fresh, ProviderOutcome.CANCELLED, actor=WORKER,
                                                   reason=reason)
            log.warning(f"collection not sent: {who} is no longer active",
                        extra={"payment": payment.reference, "payment_id": payment.id})
            return
        provider = rt.providers[payment.provider]
        account = payment_account(rt, payment)
        request = CollectionRequest(
            provider_reference=payment.provider_reference, payment_reference=payment.reference,
            amount=Money(payment.amount_minor, payment.currency),
            payer=Phone(account) if account.startswith("+") else None, payer_account=account,
            description=description, callback_url=_callback_url(rt, payment.provider),
            method=payment.method, language=language or "en",
            payer_name=member.name if member else "", expires_at=payment.expires_at)
        try:
            await ready_to_send(provider, "collect", deadline)  # before the stamp: a failure here sent nothing
        except ProviderError as exc:
            if exc.retryable:
                raise
            await collection_failed(payment, exc)
            return
        # Outside the call's deadline: a stamp that fails or times out means the call was not made.
        await call_starting(rt.sessionmaker, job)
        try:
            accepted = await _timed(provider.name, "collect", _until_it_leaves(
                provider.name, "collect", provider.request_collection(request), deadline))
        except (ProviderTimeout, TimeoutError) as exc:
            # The provider may have the request: ask its status (poll job) instead of sending it again.
            # A call still running at our own deadline is the same case: it may have arrived.
            log.warning("collection request timed out; status polling will settle it",
                        extra={"payment": payment.reference, "error": str(exc)[:200]})
            if isinstance(exc, ProviderTimeout) and exc.provider_transaction_id:
                await keep_transaction_id(payment.id, exc.provider_transaction_id)
            return
        except ProviderError as exc:
            if exc.retryable:
                raise
            await collection_failed(payment, exc)
            return
        async with rt.sessionmaker.begin() as session:
            values = {"provider_transaction_id": accepted.provider_transaction_id or payment.provider_transaction_id,
                      "gateway_reference": accepted.gateway_reference, "payment_url": accepted.payment_url}
            given = {k: v for k, v in values.items() if v is not None}
            try:
                await transition(session, PAYMENT, payment.id, PaymentStatus.PENDING, PaymentStatus.PROCESSING,
                                 actor=WORKER, values=given)
                metrics.payment_moved("PROCESSING", payment.method).inc()
            except StaleTransition:
                # A callback already settled it, or its cooperative cancelled it while this request was on its way
                # (core.provider_events.cancel_payment): the provider may still take the money, so its ids are kept for
                # the status queries after the cancel and for a callback to find it (M-Pesa's CheckoutRequestID),
                # never over one stored meanwhile.
                if given:
                    await session.execute(update(Payment).where(
                        Payment.id == payment.id, Payment.status == PaymentStatus.CANCELLED.value).values(
                        updated_at=utcnow(), **{k: func.coalesce(getattr(Payment, k), v) for k, v in given.items()}))
                # The provider accepted it: its watch after the cancel takes a NOT_FOUND from now on as a lookup
                # behind (no answer, as poll does for a PROCESSING payment), never as "never sent".
                watch = (await session.execute(select(OutboxJob).where(
                    OutboxJob.dedupe_key == f"poll:{payment.id}:{WATCH_AFTER_CANCEL}",
                    OutboxJob.status.in_(("PENDING", "RUNNING"))).with_for_update())).scalar_one_or_none()
                if watch is not None and watch.payload.get(WATCH_AFTER_CANCEL) == PaymentStatus.PENDING.value:
                    watch.payload = {**watch.payload, WATCH_AFTER_CANCEL: PaymentStatus.PROCESSING.value}

    async def collection_failed(payment: Payment, exc: ProviderError) -> None:
        """The provider refused the collection for good (or its credentials): FAILED, nothing was taken."""
        reason = f"{CREDENTIALS_REFUSED}: {exc}" if isinstance(exc, CredentialsRefused) else str(exc)
        async with rt.sessionmaker.begin() as session:
            fresh = await session.get(Payment, payment.id)
            if fresh is not None and fresh.status in OPEN:
                await apply_collection_outcome(session, rt, fresh, ProviderOutcome.FAILED, actor=WORKER,
                                               reason=reason[:200])

    async def keep_transaction_id(payment_id: str, provider_transaction_id: str) -> None:
        """Store the provider's id an unanswered request was sent under (IremboPay's invoice number), so a
        status poll in any worker process, or after a restart, can ask about it. Not a state change."""
        async with rt.sessionmaker.begin() as session:
            await session.connection()  # held before updated_at is stamped (see core.state.machine.transition)
            await session.execute(update(Payment).where(
                Payment.id == payment_id, Payment.status.in_(OPEN_VALUES),
                Payment.provider_transaction_id.is_(None)).values(
                provider_transaction_id=provider_transaction_id, updated_at=utcnow()))

    async def poll(job: Job) -> None:
        async with rt.sessionmaker() as session:
            payment, now = await payment_and_now(session, job.payload["payment_id"])
        if payment is None or PaymentStatus(payment.status) not in OPEN:
            return
        provider = rt.providers.get(payment.provider)
        if provider is None:
            raise PermanentJobError(_not_asked(payment))
        expired = now >= payment.expires_at
        status: StatusResult | None = None
        unknown: str | None = None  # why we cannot tell what the provider did with the payment
        failed = False  # the status query failed (no answer): run now once its cause is fixed (RetryLater's failed)
        resent: dict[str, Any] | None = None  # the poll's payload once it queued a resend (its count of them)
        try:
            # By the call's deadline: unanswered then, a failed query (below), not a poll the worker cuts off.
            status = await _status_by(call_deadline(job), provider.name, "status", provider.collection_status(
                payment.provider_reference, payment.provider_transaction_id, payment.currency))
        except ProviderError as exc:
            if exc.code != "NOT_FOUND":
                unknown, failed = f"status query failed: {exc}", True
            elif payment.status != PaymentStatus.PENDING.value:
                # The provider accepted this request (its answer moved the payment to PROCESSING) and now says
                # it has none: its status lookup is wrong or behind (MTN's, degraded, answers 404 for requests
                # it holds), not a sign that nothing was taken. The payer may be at her PIN prompt now, so this
                # is no answer: unknown, as a failed query is (the settling grace), never "not approved in
                # time", which would invite her to pay again while her first payment can still go through.
                unknown = f"the provider has no record of the request it accepted: {exc}"
            elif not expired:
                # The collection never reached the provider (e.g. a timeout on send): send it again with
                # the same reference, which the provider deduplicates; unless a collect job of it is still to
                # try inside the window (the first, retrying through an outage): that one sends it.
                # Keyed by this poll's count of its resends (its payload, kept by a replay), not by its attempts: a
                # replay starts those again, and a resend after it was taken for an earlier try's (its key's job
                # DONE), so never queued. The key is what makes two runs of the same state one resend: a try cut
                # off after queuing it (its count not yet written) and run again, or the poll the payment sweep
                # queued beside this one, each finding none in flight.
                # At most PAYMENT_RESENDS times a payment: after that, asked until its window is over, and then
                # ended as never reached (below) while the provider still has none.
                count = int(job.payload.get(RESENT, 0)) + 1
                if count > PAYMENT_RESENDS:
                    if count == PAYMENT_RESENDS + 1:  # said once (counted on, so the next polls say nothing)
                        log.warning("collection unknown to the provider not sent again: sent again "
                                    f"{PAYMENT_RESENDS} times already", extra={
                                        "payment": payment.reference, "payment_id": payment.id,
                                        "provider": payment.provider})
                        resent = {**job.payload, RESENT: count}
                else:
                    async with rt.sessionmaker.begin() as session:
                        if not await _collect_in_flight(session, payment.id, retry_before=payment.expires_at):
                            await enqueue(session, "payment.collect", {"payment_id": payment.id},
                                          dedupe_key=f"collect:{payment.id}:{RESENT}:{count}",
                                          cooperative_id=payment.cooperative_id)
                            resent = {**job.payload, RESENT: count}
                unknown = str(exc)
            # NOT_FOUND once the window is over, for a request no attempt ever got accepted, is an answer: the
            # provider never got it, so nothing was taken (FAILED PROVIDER_UNREACHABLE below).
        except Exception as exc:
            # Not a provider answer we understand (an unknown status, a bug): never guess about money.
            log.error("status query failed", extra={"payment": payment.reference, "error": type(exc).__name__},
                      exc_info=True)
            unknown, failed = f"status query failed: {type(exc).__name__}", True
        if status is not None and status.outcome is ProviderOutcome.AMBIGUOUS:
            unknown = status.reason or "the provider cannot tell yet"
        reason: str | None
        if unknown is not None:
            # Only the provider's own word ends a payment: while it cannot be asked, the money may have
            # been taken (and a callback lost), so the payment stays open, asked about ever less often.
            try:
                await wait_for_an_answer(payment, now, unknown, failed=failed)  # RetryLater until the grace is over
            except RetryLater as later:
                later.payload = resent if later.payload is None else later.payload
                raise
            outcome, status, reason = ProviderOutcome.EXPIRED, None, UNCONFIRMED
        elif status is None or status.outcome is ProviderOutcome.PENDING:
            if not expired:
                delay = next_poll_in(payment, now)
                await schedule_poll(payment.id, now, delay)
                raise RetryLater(delay, "still pending")
            if status is not None:
                await wait_for_the_payer(payment, now)  # RetryLater while the provider's prompt may be open
            # The provider still waits for the payer after the window and its prompt's life: not approved in
            # time (a later success still completes the payment, flagged late).
            outcome, reason = ProviderOutcome.EXPIRED, "not approved in time"
            if status is None:
                # The provider never got the request (NOT_FOUND), and no attempt to send it was ever accepted
                # (that moves it to PROCESSING, and a NOT_FOUND then is no answer, above): the collect job
                # parked or failed through an outage. The payer was never prompted: our failure, not theirs,
                # and nothing was taken. Checked again on the locked row below: a request sent just inside the
                # window may be answered meanwhile.
                outcome, reason = ProviderOutcome.FAILED, PROVIDER_UNREACHABLE
            status = None
        else:
            outcome = status.outcome
            reason = status.reason or ("not approved in time" if outcome is ProviderOutcome.EXPIRED else None)
        ask_again: str | None = None  # why the payment is asked about again instead of ended now
        for attempt in range(3):
            try:
                async with rt.sessionmaker.begin() as session:
                    fresh = (await session.execute(select(Payment).where(Payment.id == payment.id)
                                                   .with_for_update())).scalar_one()
                    if reason == PROVIDER_UNREACHABLE:
                        if fresh.status == PaymentStatus.PROCESSING.value:
                            # The collect's request was accepted after our status query (sent just inside
                            # the window, answered late): the payer was prompted just now and may approve, and
                            # the NOT_FOUND came before the provider had it. Asked again: its answer (pending,
                            # then the payer's grace) ends it, never "not approved" while the prompt is open.
                            ask_again = "its collection request was accepted after the status query: asked again"
                            break
                        if fresh.status != PaymentStatus.PENDING.value:
                            return  # settled meanwhile (a callback): nothing to end
                        if await _collect_in_flight(session, payment.id, closed_at=payment.expires_at):
                            # A collect job is sending it now (claimed inside the window): the provider may
                            # have it in a moment. Asked again once that call has ended. One taken up after the
                            # window sends nothing: it holds back no FAILED.
                            ask_again = "its collection request is being sent: asked again after"
                            break
                        log.warning("payment failed: its collection never reached the provider",
                                    extra={"payment": payment.reference, "payment_id": payment.id,
                                           "provider": payment.provider})
                    await apply_collection_outcome(
                        session, rt, fresh, outcome, actor=WORKER,
                        amount=status.amount if status else None,
                        provider_transaction_id=status.provider_transaction_id if status else None,
                        reason=reason, occurred_at=status.occurred_at if status else None)
                return
            except StaleTransition:
                # The row moved between our read and our write (the collect job's PENDING -> PROCESSING,
                # or a callback; SQLite has no row lock to stop it): read it again and re-apply.
                if attempt == 2:
                    raise
        if ask_again is not None:
            await schedule_poll(payment.id, now, IN_FLIGHT_POLL_SECONDS)
            raise RetryLater(IN_FLIGHT_POLL_SECONDS, ask_again)

    async def watch_after_cancel(job: Job) -> None:
        """A payment its cooperative cancelled (core.provider_events.cancel_payment) while the provider may hold its
        request: the member may still approve the prompt (or pay the bank invoice), and MTN tells that once, by a
        callback that may be lost. Asked as an open payment is (poll), until the provider's answer is final; a
        success then completes it late (CANCELLED -> COMPLETED, its receipt and webhook event). Still waiting for
        the payer: asked until the approval window and its PAYMENT_PENDING_GRACE_SECONDS are over; no answer
        (a query failing, the provider not finding a request it accepted): until the settling grace is. Ends at
        once when the provider never got the request and no collect job is sending it (one not yet sent finds the
        payment closed and never sends it): nothing can be taken."""
        async with rt.sessionmaker() as session:
            payment, now = await payment_and_now(session, job.payload["payment_id"])
        if payment is None or payment.status != PaymentStatus.CANCELLED.value:
            return  # completed late meanwhile (a callback, an admin's record): nothing left to ask
        provider = rt.providers.get(payment.provider)
        if provider is None:
            raise PermanentJobError(_not_asked(payment))
        status: StatusResult | None = None
        unknown: str | None = None
        failed = False  # the status query failed, as in poll
        try:
            status = await _status_by(call_deadline(job), provider.name, "status", provider.collection_status(
                payment.provider_reference, payment.provider_transaction_id, payment.currency))
        except ProviderError as exc:
            if exc.code == "NOT_FOUND" and job.payload[WATCH_AFTER_CANCEL] == PaymentStatus.PENDING.value:
                async with rt.sessionmaker() as session:
                    if not await _collect_in_flight(session, payment.id):
                        return  # never sent, and never will be: nothing can be taken
                unknown = "its collection request was being sent when it was cancelled"
            else:
                unknown, failed = f"status query failed: {exc}", True
        except Exception as exc:
            log.error("status query failed", extra={"payment": payment.reference, "error": type(exc).__name__},
                      exc_info=True)
            unknown, failed = f"status query failed: {type(exc).__name__}", True
        if status is not None and status.outcome is ProviderOutcome.SUCCEEDED:
            async with rt.sessionmaker.begin() as session:
                fresh = await lock_row(session, Payment, payment.id)
                await apply_collection_outcome(
                    session, rt, fresh, ProviderOutcome.SUCCEEDED, actor=WORKER, amount=status.amount,
                    provider_transaction_id=status.provider_transaction_id, occurred_at=status.occurred_at)
            log.warning("payment cancelled by its cooperative was then paid: completed late",
                        extra={"payment": payment.reference, "payment_id": payment.id})
            return
        if status is not None and status.outcome not in (ProviderOutcome.PENDING, ProviderOutcome.AMBIGUOUS):
            return  # declined, expired or failed at the provider: it will take nothing
        waiting = unknown is None and status is not None and status.outcome is ProviderOutcome.PENDING
        grace = timedelta(seconds=rt.settings.payment_pending_grace_seconds if waiting
                          else rt.settings.payment_settle_grace_seconds)
        if now - payment.expires_at >= grace:
            log.warning("payment cancelled by its cooperative: no longer asked about",
                        extra={"payment": payment.reference, "payment_id": payment.id,
                               "last_answer": unknown or (status.reason if status else None) or "pending"})
            return
        delay = next_poll_in(payment, now) if now < payment.expires_at else settle_poll_in(payment, now, grace)
        raise RetryLater(delay, unknown or "cancelled, still pending at the provider: its prompt may be open",
                         failed=failed)

    async def wait_for_the_payer(payment: Payment, now: datetime) -> None:
        """The provider says the payer has not decided yet (MTN PENDING, Airtel TIP), after our approval window.
        Its PIN prompt lives from when the provider received the request (MTN: about 5 minutes), which is later
        than our window began (counted from the payment's creation; later still when the collect job was
        delayed): the payer may still approve it, and MTN says so once, by a callback that may be lost. So the
        payment stays open and polled (every minute) until the provider gives a final answer, or until
        PAYMENT_PENDING_GRACE_SECONDS after the window; then this returns, to end it "not approved in time"."""
        await poll_within(payment, now, rt.settings.payment_pending_grace_seconds, logging.INFO,
                          "payment still pending at the provider after its approval window; asked again",
                          "still pending at the provider after the approval window: its prompt may be open")

    async def wait_for_an_answer(payment: Payment, now: datetime, unknown: str, *, failed: bool = False) -> None:
        """The provider did not say what became of the payment: poll again (RetryLater, `failed` when its status
        query failed rather than answered), and once the settling grace after the window is over, return, to give
        it up as TIMEOUT."""
        if now < payment.expires_at:
            delay = next_poll_in(payment, now)
            await schedule_poll(payment.id, now, delay)
            raise RetryLater(delay, unknown, failed=failed)
        overdue = await poll_within(payment, now, rt.settings.payment_settle_grace_seconds, logging.WARNING,
                                    "payment outcome unknown after its approval window; kept open and asked again",
                                    f"outcome unknown after the approval window: {unknown}", failed=failed,
                                    error=unknown[:200])
        metrics.PROVIDER_ERRORS.labels(provider=payment.provider, operation="status_unsettled").inc()
        log.error("payment given up as TIMEOUT: the provider never confirmed its outcome",
                  extra={"payment": payment.reference, "provider": payment.provider,
                         "overdue_hours": round(overdue.total_seconds() / 3600, 1), "error": unknown[:200]})

    async def poll_within(payment: Payment, now: datetime, grace_seconds: int, level: int, said: str, why: str,
                          *, failed: bool = False, **extra: str) -> timedelta:
        """A payment past its approval window: while within `grace_seconds` after it, logged (`said`) and polled
        again (settle_poll_in's cadence; RetryLater `why`, `failed` as wait_for_an_answer's); once the grace is
        over, how long past the window it is, for the caller to end it."""
        overdue = now - payment.expires_at
        grace = timedelta(seconds=grace_seconds)
        if overdue >= grace:
            return overdue
        delay = settle_poll_in(payment, now, grace)
        log.log(level, said, extra={"payment": payment.reference, "provider": payment.provider,
                                    "overdue_seconds": int(overdue.total_seconds()), "delay_s": round(delay),
                                    **extra})
        await schedule_poll(payment.id, now, delay)
        raise RetryLater(delay, why, failed=failed)

    async def schedule_poll(payment_id: str, now: datetime, delay: float) -> None:
        """Record when the payment is asked about next, so the sweep does not take it for a stalled poll. Not a
        change anyone sees: updated_at is kept (an `updatedFrom` sync listed an open payment again at each poll)."""
        async with rt.sessionmaker.begin() as session:
            await session.execute(update(Payment).where(Payment.id == payment_id)
                                  .values(next_poll_at=now + timedelta(seconds=delay),
                                          updated_at=Payment.updated_at))

    def refund_request(refund: Refund, payment: Payment, note: str) -> RefundRequest:
        account = payment_account(rt, payment)
        return RefundRequest(
            provider_reference=refund.provider_reference, original_provider_reference=payment.provider_reference,
            original_provider_transaction_id=payment.provider_transaction_id,
            amount=Money(refund.amount_minor, refund.currency), full=refund.amount_minor >= collected(payment),
            payer=Phone(account) if account.startswith("+") else None, reason=refund.reason or "refund",
            callback_url=_callback_url(rt, payment.provider), note=note)

    async def submit_refund(job: Job) -> None:
        deadline = call_deadline(job)
        async with rt.sessionmaker() as session:
            refund = await session.get(Refund, job.payload["refund_id"])
            payment = await session.get(Payment, refund.payment_id) if refund else None
            if refund is None or payment is None or refund.status != RefundStatus.PENDING.value:
                return
            note = await refund_note(session, payment)
            # Checked as the API checked it when the refund was asked for, unless a try may have reached the provider
            # (then its outcome is waited for, below): the number that paid may have changed hands since.
            changed = None if job.call_may_have_arrived else await paying_number_changed(session, refund, payment)
        if changed is not None and (job.last_error or "").startswith(CALL_SENT):
            # An earlier try may have reached the provider (a 5xx after its call: core.outbox.CALL_SENT), which may
            # carry it out still: failed here, it could be refunded again and paid twice; sent again, it would go
            # to the number's new holder should that try not have arrived. Its outcome is asked (refund.poll; one
            # the provider has not got is checked again before it is resent).
            log.warning("refund not sent again: the number that paid is no longer its payer's; its outcome is asked",
                        extra={"refund": refund.reference, "provider": payment.provider})
            await await_refund_outcome(refund, None)
            return
        if changed is not None:
            log.warning("refund not sent: the number that paid is no longer its payer's",
                        extra={"refund": refund.reference, "provider": payment.provider})
            await refund_failed(refund, changed, tell_paying_number=False)
            return
        provider = rt.providers.get(payment.provider)
        if provider is None and not job.call_may_have_arrived:
            raise PermanentJobError(_refund_not_sent(job, refund, payment))
        if job.call_may_have_arrived:
            # An earlier attempt was cut off mid-call (past the handler timeout, or its worker was lost; the
            # doubt outlives tries that failed before they asked: core.outbox.CALL_IN_DOUBT): the provider may have
            # the refund, and some cannot deduplicate it (Airtel refunds by the
            # payment's id; a second one is refused "not eligible" though the first went through). Never
            # sent again: it waits for the provider's word as an unanswered request does (refund.poll).
            log.warning("refund request was cut off; its status will settle it, not a second request",
                        extra={"refund": refund.reference, "provider": payment.provider})
            await await_refund_outcome(refund, None)
            return
        assert provider is not None  # (one left out is parked above unless its call may have arrived)
        request = refund_request(refund, payment, note)
        try:
            await ready_to_send(provider, "refund", deadline)  # before the stamp: a failure here sent nothing
        except CredentialsRefused as exc:
            raise awaiting_configuration(exc) from exc
        except ProviderError as exc:
            if exc.retryable:
                raise
            await refund_failed(refund, str(exc))
            return
        await call_starting(rt.sessionmaker, job)  # a worker lost before this line never sent it
        try:
            accepted = await _timed(provider.name, "refund", _until_it_leaves(
                provider.name, "refund", provider.request_refund(request), deadline))
        except (ProviderTimeout, TimeoutError):
            # The provider may have the refund (unanswered, or its request still out at the call's deadline): its
            # outcome is waited for, never sent again. (One whose request never left by then is NOT_SENT:
            # _until_it_leaves.)
            accepted = None
        except CredentialsRefused as exc:
            raise awaiting_configuration(exc) from exc
        except ProviderError as exc:
            if exc.retryable:
                raise
            if exc.code == REFUND_UNSUPPORTED:
                # No refund API (IremboPay): the money goes back outside the gateway (the bank, or a
                # mobile-money transfer) and a person records it (POST /v1/refunds/{id}/outcome). Until then the
                # refund holds its amount, PROCESSING, its poll parked for them; FAILED would leave nothing to
                # record the transfer on.
                log.warning("provider has no refund API; refund waits for a person to record it",
                            extra={"refund": refund.reference, "provider": provider.name})
                await await_refund_outcome(refund, None)
                return
            await refund_failed(refund, str(exc))
            return
        if accepted is not None and accepted.outcome is not None and accepted.outcome not in (
                ProviderOutcome.PENDING, ProviderOutcome.AMBIGUOUS):
            async with rt.sessionmaker.begin() as session:
                fresh = await lock_for_outcome(session, refund.id, accepted.outcome)
                await apply_refund_outcome(session, rt, fresh, accepted.outcome, actor=WORKER,
                                           provider_transaction_id=accepted.provider_transaction_id)
            return
        await await_refund_outcome(refund, accepted)

    async def refund_failed(refund: Refund, reason: str, *, tell_paying_number: bool = True) -> None:
        """The provider refused the refund for good (or its credentials), or it was not sent to a number no longer
        its payer's: FAILED, nothing was sent back."""
        async with rt.sessionmaker.begin() as session:
            fresh = await session.get(Refund, refund.id)
            if fresh is not None:
                await apply_refund_outcome(session, rt, fresh, ProviderOutcome.FAILED, actor=WORKER,
                                           reason=reason[:200], tell_paying_number=tell_paying_number)

    async def await_refund_outcome(refund: Refund, accepted: CollectionAccepted | None) -> None:
        """The provider took the refund without an outcome, or may have it (no answer, a cut-off attempt):
        PROCESSING, settled by refund.poll (M-Pesa's Result callback, MTN's status query; Airtel, which
        cannot be asked, is parked there for a person)."""
        async with rt.sessionmaker.begin() as session:
            values = {}
            if accepted and accepted.provider_transaction_id:
                values["provider_transaction_id"] = accepted.provider_transaction_id
            try:
                await transition(session, REFUND, refund.id, RefundStatus.PENDING, RefundStatus.PROCESSING,
                                 actor=WORKER, values=values)
            except StaleTransition:
                return
            if await apply_kept_refusal(session, refund, values.get("provider_transaction_id")):
                return  # its Result, refusing the gateway's credentials, came before this commit
            run_at = utcnow() + timedelta(seconds=rt.settings.poll_after_seconds)
            if not await enqueue(session, "refund.poll", {"refund_id": refund.id},
                                 dedupe_key=f"refund-poll:{refund.id}", run_at=run_at,
                                 cooperative_id=refund.cooperative_id, max_attempts=30):
                # Sent again (replayed) after its first sending was taken and refused unprocessed (core.refunds.
                # _awaiting_configuration ended that sending's poll, which keeps the key): it polls again, for this one.
                await session.execute(update(OutboxJob).where(
                    OutboxJob.kind == "refund.poll", OutboxJob.dedupe_key == f"refund-poll:{refund.id}",
                    OutboxJob.status == "DONE").values(status="PENDING", attempts=0, run_at=run_at, locked_by=None,
                                                       done_at=None, last_error=None, updated_at=utcnow(),
                                                       # its polls start afresh (ended waiting after a failed
                                                       # query, it was not waiting for this sending's)
                                                       after_failure=False))

    async def poll_refund(job: Job) -> None:
        """refund.poll. Its last attempt failing as the outbox retries a failure (a status lookup failing or
        unanswered by the call's deadline, a resend not sent: the call's deadline had passed, the lookup having taken
        its time) parks it saying what a person does, as every other parked refund poll does, not with the bare
        error: the refund holds its amount (PROCESSING) until its outcome is recorded. So does one the worker cut
        off on its last attempt (refund_poll_parked, its kind's hint: core.outbox.Hinted)."""
        try:
            await ask_refund(job)
        except (PermanentJobError, RetryLater):
            raise
        except Exception as exc:
            if job.attempts < job.max_attempts or schema_mismatch(exc):
                raise
            raise PermanentJobError(refund_poll_parked(job, f"{type(exc).__name__}: {exc}")) from exc

    async def ask_refund(job: Job) -> None:
        async with rt.sessionmaker() as session:
            refund = await session.get(Refund, job.payload["refund_id"])
            payment = await session.get(Payment, refund.payment_id) if refund else None
        if refund is None or payment is None or refund.status != RefundStatus.PROCESSING.value:
            return
        provider = rt.providers.get(payment.provider)
        if provider is None:
            raise PermanentJobError(f"refund {refund.reference}: {left_out(payment.provider)}, so its status cannot "
                                    f"be asked; add {payment.provider} back to PROVIDERS (with its variables) and "
                                    "replay this job, or check with the provider and record its outcome with "
                                    f"POST /v1/refunds/{refund.id}/outcome")
        # By the call's deadline (from the claim), as a resend after it is: a lookup unanswered then is a failed one
        # (retried; on the poll's last attempt parked saying what to do), not a poll the worker cuts off.
        try:
            status = await _status_by(call_deadline(job), provider.name, "refund_status",
                                      provider.refund_status(refund.provider_reference, refund.currency))
        except CredentialsRefused as exc:
            raise awaiting_configuration(exc) from exc
        except ProviderError as exc:
            if exc.retryable:
                raise
            if exc.code == "NOT_FOUND":
                await resend_refund(job, refund, payment)
                return
            if exc.code == REFUND_UNSUPPORTED:
                # No refund API (IremboPay): nothing was sent; the desk sends it and records it (submit_refund).
                raise PermanentJobError(f"refund {refund.id} needs manual review: {exc}; then record it with "
                                        f"POST /v1/refunds/{refund.id}/outcome") from exc
            # The provider cannot tell (e.g. Airtel has no refund status query): a person must look.
            raise PermanentJobError(f"refund {refund.reference} needs manual review: {exc}; check with the provider, "
                                    f"then record it with POST /v1/refunds/{refund.id}/outcome") from exc
        age = utcnow() - refund.created_at
        if status.outcome in (ProviderOutcome.PENDING, ProviderOutcome.AMBIGUOUS):
            if age >= REFUND_POLL_LIMIT:
                hours = age.total_seconds() / 3600
                log.warning("refund still unsettled by the provider; parked for manual review",
                            extra={"refund": refund.reference, "provider": provider.name,
                                   "age_hours": round(hours, 1)})
                raise PermanentJobError(
                    f"refund {refund.reference} needs manual review: {provider.name} has not settled it "
                    f"{hours:.0f} h after it was asked for ({status.reason or 'still pending'}); check with "
                    f"the provider, then record it with POST /v1/refunds/{refund.id}/outcome")
            raise RetryLater(poll_delay(age.total_seconds()), "refund still pending")
        async with rt.sessionmaker.begin() as session:
            fresh = await lock_for_outcome(session, refund.id, status.outcome)
            await apply_refund_outcome(session, rt, fresh, status.outcome, actor=WORKER,
                                       provider_transaction_id=status.provider_transaction_id, reason=status.reason,
                                       occurred_at=status.occurred_at, amount=status.amount)

    async def resend_refund(job: Job, refund: Refund, payment: Payment) -> None:
        """The provider says it has no refund with this reference (the request was lost on its way, e.g.
        the submit timed out before it arrived): send it again with the same reference, which the
        provider deduplicates, and poll again; after REFUND_RESENDS tries, a person must look."""
        resent = int(job.payload.get("resent", 0))
        if resent >= REFUND_RESENDS:
            raise PermanentJobError(f"refund {refund.reference} needs manual review: the provider still has no "
                                    f"refund with its reference after {resent} resends; check with it, then record "
                                    f"it with POST /v1/refunds/{refund.id}/outcome")
        provider = rt.providers[payment.provider]  # (poll_refund parks a refund whose provider is left out)
        async with rt.sessionmaker() as session:
            note = await refund_note(session, payment)
            # Not sent yet, as the provider says: checked as submit_refund checks a first send.
            changed = await paying_number_changed(session, refund, payment)
        if changed is not None:
            log.warning("refund unknown to the provider not sent again: the number that paid is no longer its "
                        "payer's", extra={"refund": refund.reference, "provider": provider.name})
            await refund_failed(refund, changed, tell_paying_number=False)
            return
        log.warning("refund unknown to the provider; sending it again with the same reference",
                    extra={"refund": refund.reference, "provider": provider.name, "resend": resent + 1})
        try:
            # As submit_refund sends it, by the call's deadline (from the claim: the status lookup's time counts), so
            # one still out then counts as a resend that may have arrived (REFUND_RESENDS), not a poll the worker cut
            # off and tried again, resending uncounted at each try. No stamp, so no token first (ready_to_send): every
            # try of a poll asks the status before it sends anything.
            accepted = await _timed(provider.name, "refund", _until_it_leaves(
                provider.name, "refund", provider.request_refund(refund_request(refund, payment, note)),
                call_deadline(job)))
        except (ProviderTimeout, TimeoutError):
            accepted = None  # it may have arrived this time: the next poll tells
        except CredentialsRefused as exc:
            raise awaiting_configuration(exc) from exc
        except ProviderError as exc:
            if exc.retryable and exc.code in NOTHING_PROCESSED:
                raise  # it never left, or was refused unprocessed (a 429): not a resend, the poll tries again
            if not exc.retryable:
                async with rt.sessionmaker.begin() as session:
                    fresh = (await session.execute(select(Refund).where(Refund.id == refund.id).with_for_update())
                             ).scalar_one()
                    await apply_refund_outcome(session, rt, fresh, ProviderOutcome.FAILED, actor=WORKER,
                                               reason=str(exc)[:200])
                return
            # Answered 5xx (MTN deduplicates by our reference: providers.calls.http_error): it may have been
            # processed, as a try of submit_refund so answered may (CALL_SENT), so it counts as a resend that may
            # have arrived and the next poll asks the status. Raised, the poll was tried again and resent uncounted
            # (REFUND_RESENDS) at every try, until its 30 attempts parked it.
            log.warning("refund resend failed on the provider's side; it may have arrived, the next poll asks",
                        extra={"refund": refund.reference, "provider": provider.name, "error": str(exc)})
            accepted = None
        async with rt.sessionmaker.begin() as session:
            if accepted is not None and accepted.outcome not in (None, ProviderOutcome.PENDING,
                                                                 ProviderOutcome.AMBIGUOUS):
                fresh = await lock_for_outcome(session, refund.id, accepted.outcome)
                await apply_refund_outcome(session, rt, fresh, accepted.outcome, actor=WORKER,
                                           provider_transaction_id=accepted.provider_transaction_id)
                return
            await enqueue(session, "refund.poll", {"refund_id": refund.id, "resent": resent + 1},
                          dedupe_key=f"refund-poll:{refund.id}:resent:{resent + 1}",
                          run_at=utcnow() + timedelta(seconds=rt.settings.poll_after_seconds),
                          cooperative_id=refund.cooperative_id, max_attempts=30)

    references = ReferenceWatch()  # this worker's: what it last said of the reference sequence

    async def sweep(job: Job) -> None:
        # The next run is queued first, in its own transaction: a run that fails (or overruns its time and
        # is rolled back) on every attempt parks this job, but not the chain.
        async with rt.sessionmaker.begin() as session:
            await schedule_sweep(session)
        count = await sweep_open_payments(rt)
        if count:
            log.warning("open payments without a live poll re-queued", extra={"count": count})
        settled = await settle_parked_of_ended_payments(rt)
        if settled:
            log.info("parked jobs of ended payments settled", extra={"count": settled})
        # Every 5 minutes, off every payment's path: raise the reference sequence's mark, or say it fell behind it.
        await references.check(rt)

    async def contested(job: Job) -> None:
        async with rt.sessionmaker.begin() as session:
            await flag_contested(session, job.payload["payment_id"], job.payload["provider_transaction_id"])

    return {"payment.collect": collect, "payment.poll": poll, "refund.submit": submit_refund,
            "refund.poll": Hinted(poll_refund, refund_poll_parked), "payments.sweep": sweep, CONTESTED_JOB: contested,
            WATCH_JOB: watch_after_cancel}


SWEEP_EVERY = timedelta(minutes=5)
STUCK_AFTER = timedelta(minutes=10)
# The payment has a poll job that will still run (its own, or one a sweep queued). Read through the
# (status, run_at) index: the live jobs only, however many DONE ones the table holds.
_LIVE_POLL = exists().where(OutboxJob.status.in_(("PENDING", "RUNNING")), OutboxJob.kind == "payment.poll",
                            OutboxJob.payload["payment_id"].as_string() == Payment.id)


async def sweep_open_payments(rt: Runtime, *, now: datetime | None = None) -> int:
    """Re-queue a status poll for every open payment whose polling has stalled.

    Polls normally keep `next_poll_at` ahead of now; one far behind means its job was parked (a
    provider answering garbage for hours), lost with a restored backup, or never queued. A poll job
    is idempotent, so a second one for the same payment costs one status query, never a double charge.
    A payment whose poll job is still there (PENDING or RUNNING) is left alone: behind only because the
    workers were down or the queue is long, it is asked about when that job runs; a second job would
    keep a second chain of polls alive until the payment closes (RetryLater).
    Measured by the database's clock (as next_poll_at is set), so a worker whose clock runs fast does not
    take live polls for stalled ones.
    """
    async with rt.sessionmaker.begin() as session:
        now = now or await db_now(session)
        slot = int(now.timestamp() // SWEEP_EVERY.total_seconds())
        stuck = (await session.execute(
            select(Payment.id, Payment.cooperative_id).where(
                Payment.status.in_(OPEN_VALUES), Payment.provider.in_(list(rt.providers)),
                Payment.next_poll_at < now - STUCK_AFTER, ~_LIVE_POLL).limit(1000))).all()
        for payment_id, cooperative_id in stuck:
            await enqueue(session, "payment.poll", {"payment_id": payment_id},
                          dedupe_key=f"poll:{payment_id}:sweep:{slot}", cooperative_id=cooperative_id,
                          max_attempts=30)
            await session.execute(update(Payment).where(Payment.id == payment_id)
                                  .values(next_poll_at=now, updated_at=Payment.updated_at))
    return len(stuck)


# A payment's own job (its collect, a poll) parked while the payment was open, the payment ended since (its poll or
# an admin settled it). Replayed, it would send nothing (admin_api.jobs refuses it, 409), and no one else ends it.
_PAYMENT_ENDED = exists().where(Payment.id == OutboxJob.payload["payment_id"].as_string(),
                                Payment.status.not_in(OPEN_VALUES))
PARKED_SETTLED = "settled: its payment ended; replayed, it would send nothing"


async def settle_parked_of_ended_payments(rt: Runtime) -> int:
    """End (DONE, with PARKED_SETTLED as its last word) the parked collects and polls of payments no longer open, at
    each payment sweep; how many. Left PARKED they read as work for a person for good: a provider's outage that
    outlasted a collect's attempts kept gateway_outbox_depth{status="PARKED"} (the README's alert) and the ops
    page's parked count up after the outage ended and every payment was settled, with nothing to do about it. The
    parked jobs are a few (ix_outbox_due: status first), however many the table holds.

    Taken in id order, skipping a job a person holds (SKIP LOCKED): a bulk replay or discard (admin_api.jobs) locks
    its jobs one by one in id order and holds them to its end, and the UPDATE alone locked them in its scan's order
    (run_at's, or the heap's): two jobs met in opposite orders deadlocked, and PostgreSQL rolled one back (the admin's
    request answered 503, or this sweep). One skipped is settled by a later sweep if the person left it parked."""
    free = (select(OutboxJob.id).where(OutboxJob.status == "PARKED", OutboxJob.kind.in_(PAYMENT_KINDS), _PAYMENT_ENDED)
            .order_by(OutboxJob.id).with_for_update(skip_locked=True))
    async with rt.sessionmaker.begin() as session:
        return await end_waiting(session, OutboxJob.id.in_(free.scalar_subquery()), status="PARKED",
                                 reason=PARKED_SETTLED)


async def schedule_sweep(session: AsyncSession, *, now: datetime | None = None) -> None:
    """The next sweep, once per slot whatever the number of workers (slots by the database's clock, so
    workers whose clocks disagree still agree on them)."""
    now = now or await db_now(session)
    slot = int(now.timestamp() // SWEEP_EVERY.total_seconds()) + 1
    run_at = datetime.fromtimestamp(slot * SWEEP_EVERY.total_seconds(), UTC)
    await enqueue(session, "payments.sweep", {}, dedupe_key=f"payments.sweep:{slot}", run_at=run_at,
                  max_attempts=3)


async def ensure_scheduled(rt: Runtime) -> None:
    """Called when a worker starts: the periodic jobs (payment sweep, reminders) exist, once each."""
    from core.reminders import ensure_scheduled as ensure_reminders

    async with rt.sessionmaker.begin() as session:
        await schedule_sweep(session)
    await ensure_reminders(rt)
