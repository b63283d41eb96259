"""Outbox jobs over the API: see what is queued or parked, replay a parked job after fixing its cause (or run one
waiting for its retry now), or discard one that can never succeed (a poison job, whose replay could only park
again)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

from aiohttp import web
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from admin_api.common import DATETIME, iso, json_response, obj, out, page_of, paged
from admin_api.routing import Ctx, Route
from admin_api.validation import LIMIT, PAGE, Param, body_datetime
from channels.sms import jobs as sms_jobs
from core import webhooks
from core.audit import Actor, record
from core.db import iso_z, lock_row, utcnow
from core.errors import CODES, INVALID_STATE, Conflict, NotFound, ValidationError
from core.jobs import payment_and_now
from core.models import OutboxJob, Payment, Refund
from core.outbox import (
    DISCARDED,
    LIVE,
    PAYMENT_KINDS,
    REFUND_KINDS,
    is_waiting,
    job_lane,
    job_subject,
    lock_parked,
    mark_discarded,
    replay_job,
    run_waiting_now,
    subject_filter,
    waiting,
)
from core.provider_events import WATCH_JOB
from core.state.payment import OPEN_VALUES as OPEN_PAYMENT_VALUES
from core.state.payment import PaymentStatus
from core.state.refund import OPEN_VALUES as OPEN_REFUND_VALUES
from core.text import is_number
from core.transaction_ids import CONTESTED_JOB, flag_contested

STATUSES = ("PENDING", "RUNNING", "DONE", "PARKED", DISCARDED)
# The jobs a subject filter searches: those not DONE (see list_jobs); DISCARDED ones too, a few (each ended by a
# person), found by the same (status, run_at) index.
SEARCHED = (*LIVE, DISCARDED)
SUBJECT_PARAMS = {"payment": "paymentId", "refund": "refundId"}
# What a replay of a job of this kind must also do, in the replay's transaction, for the job to do its
# work again: a handler that finds its subject already given up on ends without doing anything.
ON_REPLAY: dict[str, Callable[[AsyncSession, OutboxJob, Actor], Awaitable[None]]] = {
    "webhook.deliver": lambda session, job, actor: webhooks.reopen_for_replay(session, job, actor=actor),
    "payment.collect": lambda session, job, actor: _collect_still_open(session, job),
    "sms.send": lambda session, job, actor: sms_jobs.reopen_for_replay(session, job.payload or {}),
}
# The same for a job waiting for its retry, run now: nothing was given up on (its SMS is QUEUED, its webhook delivery
# PENDING, and reopening the delivery would start its three days again), so only the check that it still has work.
ON_RUN_NOW: dict[str, Callable[[AsyncSession, OutboxJob, Actor], Awaitable[None]]] = {
    "payment.collect": ON_REPLAY["payment.collect"],
}
# What a discard of a job of this kind must also do, in the discard's transaction, so that what the job is about does
# not look as if it were still on its way: its subject given up on as the job is (an SMS FAILED, a webhook delivery
# FAILED), or the discard refused (409) where the job is the only thing that would still settle money (a refund's:
# see _refund_settled_otherwise, _cancelled_still_watched), or the job's work done by the discard itself (a contested
# transaction id's flag: _contested_flagged). Given the error the job parked with. A kind not named changes nothing
# else: a payment's collect and poll (_payment_still_asked), a webhook event's fan-out (no delivery stored yet), the
# sweeps.
ON_DISCARD: dict[str, Callable[[Ctx, OutboxJob, str | None, str], Awaitable[None]]] = {
    "webhook.deliver": lambda ctx, job, parked_with, reason: webhooks.give_up_for_discard(
        ctx.session, job, actor=ctx.who.actor),
    "sms.send": lambda ctx, job, parked_with, reason: _sms_not_sent(ctx, job, parked_with, reason),
    **{kind: lambda ctx, job, parked_with, reason: _payment_still_asked(ctx, job) for kind in PAYMENT_KINDS},
    **{kind: lambda ctx, job, parked_with, reason: _refund_settled_otherwise(ctx, job) for kind in REFUND_KINDS},
    WATCH_JOB: lambda ctx, job, parked_with, reason: _cancelled_still_watched(ctx, job),
    CONTESTED_JOB: lambda ctx, job, parked_with, reason: _contested_flagged(ctx, job),
}
REASON = {"type": "string", "minLength": 3, "maxLength": 300,
          "description": "why the job is given up on (kept in the audit log and the job's lastError)"}
DISCARD = {
    **obj({"reason": REASON}, ["reason"]),
    "description": "Why the parked job is discarded: it will never run again (a replay of it is refused). Refused "
                   "(409 INVALID_STATE, saying what to do instead) where the job is the only thing still settling "
                   "money: an open refund's submission or poll, an open payment's poll whose provider is not in "
                   "PROVIDERS, a cancelled payment's payment.watch (replay it, or record the payment's outcome; "
                   "its provider not in PROVIDERS, only until the approval window and its grace are over). A "
                   "payment.contested job's flag is set on its payment by the discard itself. An sms.send's message "
                   "is FAILED (refused, 409, when Africa's Talking accepted it and its answer is kept: replay it, "
                   "which records it SENT with Africa's Talking's id and sends nothing again); a keyword's reply "
                   "never handed to Africa's Talking (or never stored: its job parked before it built the text) "
                   "gives its count against the number's reply limits back, through an sms.give_back job queued "
                   "with the discard (the worker runs it moments later).",
}
JOB = out(
    {
        "id": {"type": "integer"},
        "kind": {"type": "string"},
        "status": {"type": "string", "enum": list(STATUSES),
                   "description": "DISCARDED: parked, then given up on by an admin (POST /v1/jobs/{id}/discard)"},
        "cooperativeId": {"type": ["string", "null"]},
        "attempts": {"type": "integer"},
        "maxAttempts": {"type": "integer"},
        "runAt": DATETIME,
        "lastError": {"type": ["string", "null"]},
        "afterFailure": {"type": "boolean",
                         "description": "its last try failed, using an attempt or retried with its attempt given "
                                        "back (a webhook delivery; a payment's status poll or watch whose status "
                                        "query failed, its attempts 0): PENDING with a later runAt, it waits for "
                                        "its retry after a failure (waiting=true). false: never tried, its last "
                                        "try only planned its wait (a poll told still pending; its attempts may "
                                        "still count earlier failures), replayed and not tried since, or done"},
        "subject": {
            "type": ["object", "null"],
            "description": "What the job is about (a payment or a refund, by id); null for other kinds",
            "properties": {"type": {"type": "string", "enum": ["payment", "refund"]}, "id": {"type": "string"}},
            "required": ["type", "id"],
        },
        "createdAt": DATETIME,
        "doneAt": {"type": ["string", "null"], "format": "date-time"},
    }
)


# POST /v1/jobs/replay: the parked jobs one call puts back (the oldest parked first; `more` says others matched).
BULK_REPLAY_DEFAULT, BULK_REPLAY_MAX = 100, 500
BULK_REPLAY = {
    **obj({
        "kind": {"type": "string", "minLength": 1, "maxLength": 48,
                 "description": "e.g. payment.collect, sms.send, webhook.deliver"},
        "provider": {"type": "string", "minLength": 1, "maxLength": 48,
                     "description": "the payment provider the jobs call (their lane: mtn_momo, airtel_money...): "
                                    "its collects, polls and refunds"},
        "paymentId": {"type": "string", "format": "uuid", "description": "the jobs about one payment"},
        "refundId": {"type": "string", "format": "uuid", "description": "the jobs about one refund"},
        "lastErrorPrefix": {"type": "string", "minLength": 1, "maxLength": 200,
                            "description": "the jobs whose last error starts so (e.g. \"ProviderError: mtn_momo\")"},
        "parkedSince": {"type": "string", "format": "date-time",
                        "description": "the jobs parked at or after this instant (without an offset: UTC)"},
        "waiting": {"type": "boolean", "default": False,
                    "description": "true: the PENDING jobs waiting for their retry after a failed attempt (their "
                                   "runAt later than now) instead of the PARKED ones, each made due now (e.g. "
                                   "{\"waiting\": true, \"kind\": \"sms.send\"} once the SMS API key is fixed); "
                                   "not with parkedSince"},
        "afterId": {"type": "integer", "minimum": 0,
                    "description": "the jobs after this id: the previous call's lastId, to go on past the jobs it "
                                   "skipped (they stay PARKED and would come first again)"},
        "limit": {"type": "integer", "minimum": 1, "maximum": BULK_REPLAY_MAX, "default": BULK_REPLAY_DEFAULT,
                  "description": f"at most this many jobs (default {BULK_REPLAY_DEFAULT})"},
    }),
    "description": "Which of the caller's cooperative's PARKED jobs (a super admin's: every cooperative's) to "
                   "replay, or with `waiting` its jobs waiting for their retry: every filter given must match (none: "
                   "all of them, up to `limit`).",
}
BULK_REPLAYED = out({
    "replayed": {"type": "array", "items": {"type": "integer"},
                 "description": "the jobs put back (PENDING, due now; a waiting one keeps its attempts)"},
    "skipped": {"type": "array", "items": obj({"id": {"type": "integer"},
                                               "code": {"type": "string", "enum": sorted(CODES),
                                                        "description": "why, to branch on: INVALID_STATE (no longer "
                                                                       "matching the call: PARKED, or waiting, "
                                                                       "with its filters, when its turn came; or a "
                                                                       "collect whose payment ended)"},
                                               "reason": {"type": "string"}},
                                              ["id", "code", "reason"]),
                "description": "the jobs left as they were, each with why (as a single replay's 409 says it: its "
                               "code and message; a job that changed since the call listed them, checked again "
                               "under its row lock: \"job N no longer matches this call (it is PARKED now)\")"},
    "replayedCount": {"type": "integer"},
    "skippedCount": {"type": "integer"},
    "more": {"type": "boolean",
             "description": "more jobs matched than `limit`: call again for them, with afterId lastId"},
    "lastId": {"type": ["integer", "null"], "description": "the last job this call replayed or skipped"},
})


# POST /v1/jobs/discard: the parked jobs one call discards, chosen as POST /v1/jobs/replay chooses them.
BULK_DISCARD = {
    # Not `waiting`: a job still being retried is not given up on (only a PARKED one is discarded).
    **obj({**{name: spec for name, spec in BULK_REPLAY["properties"].items() if name != "waiting"},
           "reason": REASON}, ["reason"]),
    "description": "Which of the caller's cooperative's PARKED jobs (a super admin's: every cooperative's) to discard, "
                   "and why: every filter given must match (none: all of them, up to `limit`), as for "
                   "POST /v1/jobs/replay.",
}
BULK_DISCARDED = out({
    "discarded": {"type": "array", "items": {"type": "integer"}, "description": "the jobs discarded (DISCARDED)"},
    "skipped": {"type": "array",
                "items": obj({"id": {"type": "integer"},
                              "code": {"type": "string", "enum": sorted(CODES),
                                       "description": "why, to branch on: INVALID_STATE (no longer PARKED or "
                                                      "matching the call's filters when its turn came, a "
                                                      "refund's job while its refund is open, a payment's that "
                                                      "nothing else would ask about)"},
                              "reason": {"type": "string"}},
                             ["id", "code", "reason"]),
                "description": "the jobs left as they were, each with why (as a single discard's 409 says it: its code "
                               "and message)"},
    "discardedCount": {"type": "integer"},
    "skippedCount": {"type": "integer"},
    "more": BULK_REPLAYED["properties"]["more"],
    "lastId": {"type": ["integer", "null"], "description": "the last job this call discarded or skipped"},
})


def subject_of(kind: str, payload: dict[str, Any] | None) -> dict[str, str] | None:
    """The payment or refund the job is about (core.outbox.job_subject: an opaque id, nothing personal; a
    receipt SMS's and a webhook's too), or None: never anything else from its payload."""
    found = job_subject(kind, payload)
    return {"type": found[0], "id": found[1]} if found else None


async def _collect_still_open(session: AsyncSession, job: OutboxJob) -> None:
    """A parked 'payment.collect' job is replayed only while its payment may still be approved: once its
    window is over, or the payment is no longer PENDING (its poll ended it, or the provider has it), the job would
    send nothing (core.jobs), and a 200 would read as the payer prompted."""
    payment, now = await payment_and_now(session, str((job.payload or {}).get("payment_id") or ""))
    if payment is not None and payment.status == "PROCESSING":
        raise Conflict(f"payment {payment.id} is PROCESSING: the provider has its request, so replaying its collect "
                       "job would send nothing. Its callback or status poll settles it", code=INVALID_STATE)
    if payment is not None and payment.status != "PENDING":
        reason = f" ({payment.failure_reason})" if payment.failure_reason else ""
        raise Conflict(f"payment {payment.id} is {payment.status}{reason}: replaying its collect job would send "
                       "nothing", code=INVALID_STATE)
    if payment is not None and payment.status == "PENDING" and now >= payment.expires_at:
        raise Conflict(f"payment {payment.id}'s approval window is over: replaying its collect job would send "
                       "nothing (a PIN prompt now would come too late). Its status poll settles it; the payer "
                       "can start a new payment", code=INVALID_STATE)


def present(job: OutboxJob) -> dict[str, Any]:
    # The payload stays private: it may hold encrypted phone numbers and message contexts. Only the id of
    # the payment or refund a job is about is shown (subject_of), so a parked one can be traced to its payment.
    return {
        "id": job.id,
        "kind": job.kind,
        "status": job.status,
        "cooperativeId": job.cooperative_id,
        "attempts": job.attempts,
        "maxAttempts": job.max_attempts,
        "runAt": iso(job.run_at),
        "lastError": job.last_error or None,  # "" is the claim's own mark (core.outbox.UNSTAMPED): no error
        "afterFailure": bool(job.after_failure),
        "subject": subject_of(job.kind, job.payload),
        "createdAt": iso(job.created_at),
        "doneAt": iso(job.done_at),
    }


def _job_id(raw: str) -> int:
    if not is_number(raw) or len(raw) > 18:
        raise NotFound("job not found")
    return int(raw)


async def list_jobs(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    query = ctx.who.scope(select(OutboxJob), OutboxJob)
    subject = _subject_asked(ctx)
    if subject is not None:
        # Its JSON paths are not indexed: tested on the jobs not DONE only, which the (status, run_at) index finds
        # without reading the DONE history (a month of every payment's jobs, more with a longer retention).
        query = query.where(OutboxJob.status.in_(SEARCHED), subject_filter(*subject))
    if ctx.query.get("status"):
        query = query.where(OutboxJob.status == ctx.query["status"])
    if ctx.query.get("waiting"):
        if ctx.query.get("status") not in (None, "PENDING"):
            # A job waiting for its retry is PENDING: another status with it would only ever list nothing.
            raise ValidationError(f"waiting chooses PENDING jobs waiting for their retry: status "
                                  f"{ctx.query['status']} lists none of them (leave status out, or use it alone)",
                                  field="status")
        query = query.where(waiting(utcnow()))
    if ctx.query.get("kind"):
        query = query.where(OutboxJob.kind == ctx.query["kind"])
    return await paged(ctx, query.order_by(OutboxJob.id.desc()), present)


def _subject_asked(ctx: Ctx) -> tuple[str, str] | None:
    """("payment", id) or ("refund", id) from paymentId or refundId (one at most), or None."""
    asked = [(subject, ctx.query[param]) for subject, param in SUBJECT_PARAMS.items() if ctx.query.get(param)]
    if len(asked) > 1:
        raise ValidationError("give paymentId or refundId, not both", field="refundId")
    if asked and ctx.query.get("status") and ctx.query["status"] not in SEARCHED:
        raise ValidationError(f"paymentId and refundId search the jobs not DONE ({', '.join(SEARCHED)}): the history "
                              "of finished jobs is not searched by what they are about", field="status")
    return asked[0] if asked else None


async def replay(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    job_id = _job_id(request.match_info["id"])
    visible = (await ctx.session.execute(
        ctx.who.scope(select(OutboxJob.id).where(OutboxJob.id == job_id), OutboxJob))).scalar_one_or_none()
    if visible is None:
        raise NotFound("job not found")
    return json_response(present(await _replay_one(ctx, job_id)))


async def replay_many(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    """The parked jobs matching the body's filters, in the caller's cooperative (with `waiting`, its jobs waiting for
    their retry), each replayed as replay does (its ON_REPLAY or ON_RUN_NOW hook, its audit entry), in a savepoint of
    its own: one refused (a collect whose payment ended) is left as it was and named with its reason, and the others
    still go back."""
    body = ctx.body or {}
    if body.get("waiting") and body.get("parkedSince") is not None:
        raise ValidationError("parkedSince chooses parked jobs: a job waiting for its retry is not parked (use "
                              "lastErrorPrefix, kind or provider)", field="parkedSince")
    done, skipped, more, last = await _each_parked(ctx, lambda job_id: _replay_one(ctx, job_id),
                                                   waiting_jobs=bool(body.get("waiting")))
    return json_response({"replayed": done, "skipped": skipped, "replayedCount": len(done),
                          "skippedCount": len(skipped), "more": more, "lastId": last})


async def discard_many(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    """The parked jobs matching the body's filters (replay_many's), each discarded as discard does, in a savepoint of
    its own: one refused (a refund's while its refund is open) is left PARKED and named with its reason."""
    reason = _reason(ctx)
    done, skipped, more, last = await _each_parked(ctx, lambda job_id: _discard_one(ctx, job_id, reason))
    return json_response({"discarded": done, "skipped": skipped, "discardedCount": len(done),
                          "skippedCount": len(skipped), "more": more, "lastId": last})


async def _each_parked(ctx: Ctx, act: Callable[[int], Awaitable[OutboxJob]], *, waiting_jobs: bool = False
                       ) -> tuple[list[int], list[dict[str, Any]], bool, int | None]:
    """`act` on each PARKED job (`waiting_jobs`: each job waiting for its retry, core.outbox.is_waiting) the caller
    may see that matches the body's filters (BULK_REPLAY's), the oldest first, up to its `limit`, each in a
    savepoint: (the jobs acted on, those skipped with the Conflict's code and reason, whether more matched, the last
    job's id).

    Each job is chosen again under its row lock, by the same filters, before `act`: a job that changed since the
    list was read (a waiting one claimed and parked by its last attempt, a parked one replayed by hand and now
    waiting after a failed try, one parked again with another error) is skipped, never given the other call's
    treatment (a fresh attempt budget for a run-now of the waiting, a run-now for a replay of the parked)."""
    body = ctx.body or {}
    limit = int(body.get("limit", BULK_REPLAY_DEFAULT))
    query = _bulk_query(ctx, waiting_jobs)
    ids = list((await ctx.session.execute(query.order_by(OutboxJob.id).limit(limit + 1))).scalars())
    done: list[int] = []
    skipped: list[dict[str, Any]] = []
    for job_id in ids[:limit]:
        try:
            async with ctx.session.begin_nested():
                job = await lock_row(ctx.session, OutboxJob, job_id)
                # The query again, with its `now`, against the row as it is now that it is locked (the statement
                # after the lock reads what was committed before it).
                again = _bulk_query(ctx, waiting_jobs).where(OutboxJob.id == job_id)
                if job is None or (await ctx.session.execute(again)).first() is None:
                    state = "gone" if job is None else (
                        "PENDING and waiting for its retry" if is_waiting(job, utcnow()) else job.status)
                    raise Conflict(f"job {job_id} no longer matches this call (it is {state} now): left as it is",
                                   code=INVALID_STATE)
                await act(job_id)
        except Conflict as exc:
            skipped.append({"id": job_id, "code": exc.code, "reason": str(exc)})
        else:
            done.append(job_id)
    return done, skipped, len(ids) > limit, ids[:limit][-1] if ids else None


def _bulk_query(ctx: Ctx, waiting_jobs: bool) -> Any:
    """The ids of the jobs a bulk call chooses (_each_parked): PARKED, or `waiting_jobs` waiting for their retry
    as of now, the caller may see, matching the body's filters."""
    body = ctx.body or {}
    chosen = waiting(utcnow()) if waiting_jobs else OutboxJob.status == "PARKED"
    query = ctx.who.scope(select(OutboxJob.id).where(chosen), OutboxJob)
    asked = [(subject, body[param]) for subject, param in SUBJECT_PARAMS.items() if body.get(param)]
    if len(asked) > 1:
        raise ValidationError("give paymentId or refundId, not both", field="refundId")
    if asked:
        query = query.where(subject_filter(*asked[0]))
    if body.get("kind"):
        query = query.where(OutboxJob.kind == body["kind"])
    if body.get("provider"):
        query = query.where(job_lane(ctx.session.get_bind().dialect.name == "postgresql") == body["provider"])
    if body.get("lastErrorPrefix"):
        query = query.where(OutboxJob.last_error.startswith(body["lastErrorPrefix"], autoescape=True))
    if body.get("afterId") is not None:
        query = query.where(OutboxJob.id > int(body["afterId"]))
    if body.get("parkedSince") is not None:  # "" is no instant (400), not "no filter": every parked job
        # A parked job's row is last written when it parks (core.outbox: _finish stamps updated_at).
        query = query.where(OutboxJob.updated_at >= body_datetime(body["parkedSince"], "parkedSince"))
    return query


async def _replay_one(ctx: Ctx, job_id: int) -> OutboxJob:
    """Put back one job the caller may see, as POST /v1/jobs/{id}/replay does; Conflict when it cannot be. A PARKED
    job goes back with a fresh attempt budget (ON_REPLAY); one waiting for its retry after a failed attempt is made
    due now, its attempts kept (ON_RUN_NOW), its audit entry saying so (before: PENDING, its attempts, when it was
    due). A RUNNING one (a worker has it) or one ended (DONE, DISCARDED) is refused, and so is one PENDING and due
    or never tried (nothing to hurry: it is claimed as soon as a worker is free, or runs at its planned time)."""
    job = await replay_job(ctx.session, job_id)
    before: dict[str, Any] | None = None
    hooks = ON_REPLAY
    if job is None:
        ran = await run_waiting_now(ctx.session, job_id)  # the row replay_job read and locked
        if ran is None:
            # Named, so a replay sent again (its answer lost) reads as the first one taken: PENDING, back in the queue.
            current = await ctx.session.get(OutboxJob, job_id)
            status = current.status if current else "gone"
            if status == "PENDING":
                status = "PENDING and not waiting for a retry (due now, or not tried yet)"
            raise Conflict(f"job {job_id} is {status}: only a PARKED job, or a PENDING one waiting for its retry "
                           "after a failed attempt, can be replayed", code=INVALID_STATE)
        job, due = ran
        before, hooks = {"status": "PENDING", "attempts": job.attempts, "runAt": iso(due)}, ON_RUN_NOW
    reopen = hooks.get(job.kind)
    if reopen is not None:
        await reopen(ctx.session, job, ctx.who.actor)
    await record(ctx.session, actor=ctx.who.actor, action="job.replayed", entity_type="outbox_job",
                 entity_id=str(job.id), before=before,
                 after={"kind": job.kind, "subject": subject_of(job.kind, job.payload)},
                 cooperative_id=job.cooperative_id)
    await ctx.session.flush()
    return job


async def discard(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    job_id = _job_id(request.match_info["id"])
    reason = _reason(ctx)
    visible = (await ctx.session.execute(
        ctx.who.scope(select(OutboxJob.id).where(OutboxJob.id == job_id), OutboxJob))).scalar_one_or_none()
    if visible is None:
        raise NotFound("job not found")
    return json_response(present(await _discard_one(ctx, job_id, reason)))


def _reason(ctx: Ctx) -> str:
    reason = str((ctx.body or {}).get("reason") or "").strip()
    if not 3 <= len(reason) <= 300:
        raise ValidationError("reason must be 3 to 300 characters: why the job is given up on", field="reason")
    return reason


async def _discard_one(ctx: Ctx, job_id: int, reason: str) -> OutboxJob:
    """End one PARKED job the caller may see for good, as POST /v1/jobs/{id}/discard does (its ON_DISCARD hook, its
    audit entry); Conflict when it cannot be."""
    job = await lock_parked(ctx.session, job_id)
    if job is None:
        current = await ctx.session.get(OutboxJob, job_id)  # the row lock_parked read and locked
        raise Conflict(f"job {job_id} is {current.status if current else 'gone'}: only a PARKED job can be "
                       "discarded", code=INVALID_STATE)
    parked_with, attempts = job.last_error, job.attempts
    on_discard = ON_DISCARD.get(job.kind)
    if on_discard is not None:
        await on_discard(ctx, job, parked_with, reason)
    mark_discarded(job, reason)
    await record(ctx.session, actor=ctx.who.actor, action="job.discarded", entity_type="outbox_job",
                 entity_id=str(job.id), before={"status": "PARKED", "attempts": attempts},
                 after={"status": DISCARDED, "kind": job.kind, "subject": subject_of(job.kind, job.payload),
                        "reason": reason},
                 cooperative_id=job.cooperative_id)
    await ctx.session.flush()
    return job


async def _sms_not_sent(ctx: Ctx, job: OutboxJob, parked_with: str | None, reason: str) -> None:
    # A keyword's reply gives its count back through an outbox job queued here (channels.sms.jobs.GIVE_BACK_JOB):
    # run once the discard has committed, none when it rolls back (with its savepoint, in a bulk discard).
    # Refused (409) when Africa's Talking accepted it (its answer kept): a replay records it SENT with AT's id.
    await sms_jobs.fail_for_discard(ctx.session, job, parked_with, reason=reason, actor=ctx.who.actor,
                                    redis=ctx.rt.hot_redis)


async def _payment_still_asked(ctx: Ctx, job: OutboxJob) -> None:
    """A payment's collect or poll is discarded with the payment left as it is: only the provider's word (or an
    admin's record of it) ends a payment, never a job given up on. While the payment is open its status is still
    asked: its poll settles it (a request that never reached the provider fails once its window is over), and
    the payment sweep queues a new poll of an open payment whose polls stopped (a discarded one too) within about
    15 minutes. Not when its provider is left out of PROVIDERS: nothing would ask about it any more, so the
    discard is refused (409) for a record of its outcome, which ends the job itself (the next sweep settles it)."""
    payment = await ctx.session.get(Payment, str((job.payload or {}).get("payment_id") or ""))
    if payment is None or payment.status not in OPEN_PAYMENT_VALUES or payment.provider in ctx.rt.providers:
        return
    raise Conflict(f"payment {payment.id} is {payment.status} and its provider {payment.provider} is not in "
                   "PROVIDERS, so nothing else would ask about it: add it back and replay this job, or check the "
                   f"provider's statement and record its outcome with POST /v1/payments/{payment.id}/outcome (the "
                   "job is then settled)", code=INVALID_STATE)


async def _refund_settled_otherwise(ctx: Ctx, job: OutboxJob) -> None:
    """A refund's submission or poll is the only thing that would still settle an open refund (no sweep asks about
    refunds), and an open refund holds its amount: discarded, it would look on its way for ever. Refused (409)
    while the refund is open, for the routes that settle it, and its parked jobs with it: its outcome recorded from
    the provider's statement, or, never sent, its withdrawal."""
    refund = await ctx.session.get(Refund, str((job.payload or {}).get("refund_id") or ""))
    if refund is None or refund.status not in OPEN_REFUND_VALUES:
        return
    raise Conflict(f"refund {refund.id} is {refund.status}: discarding its job would leave it open for ever. Check "
                   f"with the provider and record its outcome with POST /v1/refunds/{refund.id}/outcome, or withdraw "
                   f"one never sent with POST /v1/refunds/{refund.id}/cancel: either settles this job",
                   code=INVALID_STATE)


async def _cancelled_still_watched(ctx: Ctx, job: OutboxJob) -> None:
    """A payment.watch job is the only thing that still asks the provider about a payment its cooperative cancelled
    (core.provider_events.cancel_payment): no provider can withdraw the prompt or invoice, so the member may still
    pay it, and the payment sweep asks only about open payments. Discarded, money taken after the cancel (a callback
    lost) would never be found: the payment would stay CANCELLED while the member paid. Refused (409) while it is
    CANCELLED, for a replay (the job asks the provider again, completes the payment late if it was paid, and ends by
    itself once the answer is final or the grace after its window is over: one answer says whether money was taken,
    however late) or the money recorded from the provider's statement (POST /v1/payments/{id}/outcome), after which
    the job can be discarded. Its provider left out of PROVIDERS (nothing can ask, a replay parks again): refused
    only until the approval window and the longest grace after it are over, no prompt or invoice left to pay; then
    discarded, the provider's statement the only word (money taken recorded as above, none needing nothing)."""
    payment = await ctx.session.get(Payment, str((job.payload or {}).get("payment_id") or ""))
    if payment is None or payment.status != PaymentStatus.CANCELLED.value:
        return  # completed late since (or gone): nothing left to watch
    settings, outcome = ctx.rt.settings, f"POST /v1/payments/{payment.id}/outcome"
    if payment.provider not in ctx.rt.providers:
        # Nothing can ask any more (the job parks again at once, replayed), and once the approval window and the
        # longest grace the job gives it after are over, no prompt or invoice is left to pay: the provider's
        # statement says all there is. Refused for good, the job stayed PARKED for ever (the PARKED alert up)
        # where the provider is gone for good and its statement shows nothing taken: nothing records "not paid".
        settled = payment.expires_at + timedelta(seconds=max(settings.payment_pending_grace_seconds,
                                                             settings.payment_settle_grace_seconds))
        if utcnow() >= settled:
            return
        raise Conflict(f"payment {payment.id} is CANCELLED but its provider may still take the money until "
                       f"{iso_z(settled)} (the prompt or invoice cannot be withdrawn), and {payment.provider} is not "
                       "in PROVIDERS, so nothing asks: add it back and replay this job (it asks the provider, "
                       "completes the payment late if it was paid, and ends by itself once nothing more can be "
                       f"taken), or after {iso_z(settled)} check the provider's statement: money taken, record it "
                       f"with {outcome}; none, discard this job then", code=INVALID_STATE)
    raise Conflict(f"payment {payment.id} is CANCELLED but its provider may still take the money (the prompt or "
                   "invoice cannot be withdrawn), and this job is the only thing that asks: discarded, a payment made "
                   "after the cancel would never be found. Instead replay this job: it asks the provider, completes "
                   "the payment late if it was paid, and ends by itself once nothing more can be taken. If the "
                   f"provider's statement shows the money taken, record it with {outcome}; the job can then be "
                   "discarded", code=INVALID_STATE)


async def _contested_flagged(ctx: Ctx, job: OutboxJob) -> None:
    """A payment.contested job flags (mismatch) a payment whose provider transaction id another cooperative's payment
    completed with (core.transaction_ids._contest): discarded unflagged, the cooperative would count money that may
    be the other's with nothing telling it to check the statement. The discard flags it, as the job would have, in
    its own transaction (flag_contested: the payment's row lock alone; nothing when it no longer holds the id or
    says so already)."""
    payload = job.payload or {}
    payment_id, txn = payload.get("payment_id"), payload.get("provider_transaction_id")
    if isinstance(payment_id, str) and isinstance(txn, str):
        await flag_contested(ctx.session, payment_id, txn)


ROUTES = [
    Route("GET", "/jobs", list_jobs, "Outbox jobs (queued, running, done, parked, discarded)", "jobs", "admin",
          response=page_of(JOB),
          query={"page": PAGE, "limit": LIMIT, "status": Param(enum=STATUSES, description="Job status"),
                 "kind": Param(description="e.g. sms.send, payment.collect, webhook.deliver"),
                 "paymentId": Param("uuid", "The jobs still to run, running, parked or discarded about one "
                                    "payment: its collect and polls, its SMS and webhooks (the jobs whose subject it "
                                    "is). DONE jobs are not searched (with status DONE: 400)"),
                 "refundId": Param("uuid", "As paymentId, for one refund"),
                 "waiting": Param("boolean", "true: only the jobs waiting for their retry after a failed attempt "
                                  "(PENDING, runAt later than now, afterFailure): those POST /v1/jobs/replay with "
                                  "waiting: true runs now")}),
    Route("POST", "/jobs/{id}/replay", replay,
          "Replay a parked job (a fresh attempt budget), or run now a PENDING job waiting for its retry after a failed "
          "attempt (its attempts kept); 409 for a job running, ended, or PENDING without a failed attempt to hurry",
          "jobs", "admin", response=JOB),
    Route("POST", "/jobs/{id}/discard", discard, "Discard a parked job that can never succeed", "jobs", "admin",
          body=DISCARD, response=JOB),
    Route("POST", "/jobs/replay", replay_many,
          f"Replay the parked jobs matching filters (at most {BULK_REPLAY_MAX} a call), each as a single replay: "
          "put back PENDING with a fresh attempt budget and audited (job.replayed), or skipped with its reason "
          "(a collect whose payment ended or whose approval window is over). With waiting: true, the jobs waiting "
          "for their retry after a failed attempt instead, each made due now (its attempts kept)", "jobs", "admin",
          body=BULK_REPLAY, body_optional=True, response=BULK_REPLAYED),
    Route("POST", "/jobs/discard", discard_many,
          f"Discard the parked jobs matching filters (at most {BULK_REPLAY_MAX} a call), each as a single discard",
          "jobs", "admin", body=BULK_DISCARD, response=BULK_DISCARDED),
]
