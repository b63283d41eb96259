"""Outbox jobs over the API: see what is queued or parked, and replay a parked job after fixing its cause."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
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
from core.errors import CODES, INVALID_STATE, Conflict, NotFound, ValidationError
from core.jobs import payment_and_now
from core.models import OutboxJob
from core.outbox import job_lane, job_subject, replay_job, subject_filter
from core.text import is_number

STATUSES = ("PENDING", "RUNNING", "DONE", "PARKED")
# The jobs a subject filter searches: those not DONE (see list_jobs).
LIVE = ("PENDING", "RUNNING", "PARKED")
SUBJECT_PARAMS = {"payment": "paymentId", "refund": "refundId"}
# What a replay of a job of this kind must also do, in the replay's transaction, for the job to do its
# work again: a handler that finds its subject already given up on ends without doing anything.
ON_REPLAY: dict[str, Callable[[AsyncSession, OutboxJob, Actor], Awaitable[None]]] = {
    "webhook.deliver": lambda session, job, actor: webhooks.reopen_for_replay(session, job, actor=actor),
    "payment.collect": lambda session, job, actor: _collect_still_open(session, job),
    "sms.send": lambda session, job, actor: sms_jobs.reopen_for_replay(session, job.payload or {}),
}
JOB = out(
    {
        "id": {"type": "integer"},
        "kind": {"type": "string"},
        "status": {"type": "string", "enum": list(STATUSES)},
        "cooperativeId": {"type": ["string", "null"]},
        "attempts": {"type": "integer"},
        "maxAttempts": {"type": "integer"},
        "runAt": DATETIME,
        "lastError": {"type": ["string", "null"]},
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
        "afterId": {"type": "integer", "minimum": 0,
                    "description": "the jobs after this id: the previous call's lastId, to go on past the jobs it "
                                   "skipped (they stay PARKED and would come first again)"},
        "limit": {"type": "integer", "minimum": 1, "maximum": BULK_REPLAY_MAX, "default": BULK_REPLAY_DEFAULT,
                  "description": f"at most this many jobs (default {BULK_REPLAY_DEFAULT})"},
    }),
    "description": "Which of the caller's cooperative's PARKED jobs (a super admin's: every cooperative's) to "
                   "replay: every filter given must match (none: all of them, up to `limit`).",
}
BULK_REPLAYED = out({
    "replayed": {"type": "array", "items": {"type": "integer"}, "description": "the jobs put back (PENDING)"},
    "skipped": {"type": "array", "items": obj({"id": {"type": "integer"},
                                               "code": {"type": "string", "enum": sorted(CODES),
                                                        "description": "why, to branch on: INVALID_STATE (no longer "
                                                                       "PARKED, or a collect whose payment ended)"},
                                               "reason": {"type": "string"}},
                                              ["id", "code", "reason"]),
                "description": "the jobs left PARKED, each with why (as a single replay's 409 says it: its code and "
                               "message)"},
    "replayedCount": {"type": "integer"},
    "skippedCount": {"type": "integer"},
    "more": {"type": "boolean",
             "description": "more parked jobs matched than `limit`: call again for them, with afterId lastId"},
    "lastId": {"type": ["integer", "null"], "description": "the last job this call replayed or skipped"},
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
        query = query.where(OutboxJob.status.in_(LIVE), subject_filter(*subject))
    if ctx.query.get("status"):
        query = query.where(OutboxJob.status == ctx.query["status"])
    if ctx.query.get("kind"):
        query = query.where(OutboxJob.kind == ctx.query["kind"])
    return await paged(ctx, query.order_by(OutboxJob.id.desc()), present)


def _subject_asked(ctx: Ctx) -> tuple[str, str] | None:
    """("payment", id) or ("refund", id) from paymentId or refundId (one at most), or None."""
    asked = [(subject, ctx.query[param]) for subject, param in SUBJECT_PARAMS.items() if ctx.query.get(param)]
    if len(asked) > 1:
        raise ValidationError("give paymentId or refundId, not both", field="refundId")
    if asked and ctx.query.get("status") and ctx.query["status"] not in LIVE:
        raise ValidationError(f"paymentId and refundId search the jobs not done ({', '.join(LIVE)}): the history "
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
    """The parked jobs matching the body's filters, in the caller's cooperative, each replayed as replay does (its
    ON_REPLAY hook, its audit entry), in a savepoint of its own: one refused (a collect whose payment ended) is
    left PARKED and named with its reason, and the others still go back."""
    body = ctx.body or {}
    limit = int(body.get("limit", BULK_REPLAY_DEFAULT))
    query = ctx.who.scope(select(OutboxJob.id).where(OutboxJob.status == "PARKED"), OutboxJob)
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
    ids = list((await ctx.session.execute(query.order_by(OutboxJob.id).limit(limit + 1))).scalars())
    replayed: list[int] = []
    skipped: list[dict[str, Any]] = []
    for job_id in ids[:limit]:
        try:
            async with ctx.session.begin_nested():
                await _replay_one(ctx, job_id)
        except Conflict as exc:
            skipped.append({"id": job_id, "code": exc.code, "reason": str(exc)})
        else:
            replayed.append(job_id)
    return json_response({"replayed": replayed, "skipped": skipped, "replayedCount": len(replayed),
                          "skippedCount": len(skipped), "more": len(ids) > limit,
                          "lastId": ids[:limit][-1] if ids else None})


async def _replay_one(ctx: Ctx, job_id: int) -> OutboxJob:
    """Put back one job the caller may see, as POST /v1/jobs/{id}/replay does; Conflict when it cannot be."""
    job = await replay_job(ctx.session, job_id)
    if job is None:
        # Named, so a replay sent again (its answer lost) reads as the first one taken: PENDING, back in the queue.
        current = await ctx.session.get(OutboxJob, job_id)  # the row replay_job read and locked
        raise Conflict(f"job {job_id} is {current.status if current else 'gone'}: only a PARKED job can be replayed",
                       code=INVALID_STATE)
    reopen = ON_REPLAY.get(job.kind)
    if reopen is not None:
        await reopen(ctx.session, job, ctx.who.actor)
    await record(ctx.session, actor=ctx.who.actor, action="job.replayed", entity_type="outbox_job",
                 entity_id=str(job.id), after={"kind": job.kind, "subject": subject_of(job.kind, job.payload)},
                 cooperative_id=job.cooperative_id)
    await ctx.session.flush()
    return job


ROUTES = [
    Route("GET", "/jobs", list_jobs, "Outbox jobs (queued, running, done, parked)", "jobs", "admin",
          response=page_of(JOB),
          query={"page": PAGE, "limit": LIMIT, "status": Param(enum=STATUSES, description="Job status"),
                 "kind": Param(description="e.g. sms.send, payment.collect, webhook.deliver"),
                 "paymentId": Param("uuid", "The jobs still to run, running or parked about one payment: its "
                                    "collect and polls, its SMS and webhooks (the jobs whose subject it is). DONE "
                                    "jobs are not searched (with status DONE: 400)"),
                 "refundId": Param("uuid", "As paymentId, for one refund")}),
    Route("POST", "/jobs/{id}/replay", replay, "Replay a parked job", "jobs", "admin", response=JOB),
    Route("POST", "/jobs/replay", replay_many,
          f"Replay the parked jobs matching filters (at most {BULK_REPLAY_MAX} a call), each as a single replay: "
          "put back PENDING with a fresh attempt budget and audited (job.replayed), or skipped with its reason "
          "(a collect whose payment ended or whose approval window is over)", "jobs", "admin",
          body=BULK_REPLAY, body_optional=True, response=BULK_REPLAYED),
]
