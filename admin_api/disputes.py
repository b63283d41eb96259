"""Disputes over the API: open one on a payment, list them, and move them through their state machine."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web
from sqlalchemy import and_, case, func, or_, select
from sqlalchemy.orm import aliased

from admin_api.common import (
    AMOUNT_IN,
    DATETIME,
    ID,
    NULL_DATETIME,
    NULL_STRING,
    iso,
    json_response,
    matching,
    obj,
    one,
    out,
    page_of,
    paged,
)
from admin_api.refunds import RETURNED, TO_PAYING_NUMBER, returned_from
from admin_api.routing import IDEMPOTENT_REPLAYED, Ctx, Route
from admin_api.validation import ID_KEYWORD, LIMIT, PAGE, Param, check_path_id, own_idempotency_key, period_params
from core.disputes import (
    STAFF_LABEL,
    move_dispute,
    move_keyed_dispute,
    open_dispute,
    open_keyed_dispute,
    present_note,
)
from core.errors import DomainError, NotFound, ValidationError
from core.models import Dispute, DisputeTransitionKey, Payment, Refund
from core.money import Money
from core.state.dispute import DisputeReason, DisputeStatus
from core.state.refund import RefundStatus

STATUSES = [s.value for s in DisputeStatus]
REASONS = [r.value for r in DisputeReason]
NOTE = {
    "type": "object",
    "properties": {
        "at": DATETIME,
        "actor": {"type": "string",
                  "description": "who wrote it: to a staff login, as the audit log names them (admin:<user id>, "
                                 "apikey:<key id>, member:<member id>, system); to a tenant or an API key, a "
                                 f"staff member's or a key's note reads \"{STAFF_LABEL}\" (never an internal id)"},
        "text": NULL_STRING,
        "evidence": NULL_STRING,
        "status": {"type": "string", "enum": STATUSES,
                   "description": "the dispute's status with this note: OPEN for the note it was opened with"},
    },
    "required": ["at", "actor", "text", "evidence", "status"],
}
DISPUTE = out(
    {
        "id": ID,
        "reference": {"type": "string"},
        "paymentId": ID,
        "memberId": {"type": ["string", "null"]},
        "reason": {"enum": REASONS},
        "status": {"enum": STATUSES},
        "channel": {"type": "string"},
        "notes": {"type": "array", "items": NOTE},
        "resolution": NULL_STRING,
        "refundId": {"type": ["string", "null"]},
        "createdAt": DATETIME,
        "updatedAt": DATETIME,
        "resolvedAt": NULL_DATETIME,
    }
)
CREATE = obj(
    {
        "paymentId": {"type": "string", "minLength": 1, "maxLength": 64, ID_KEYWORD: True},
        "reason": {"enum": REASONS},
        "note": {"type": ["string", "null"], "maxLength": 1000},
        "idempotencyKey": {"type": "string", "minLength": 8, "maxLength": 128,
                           "description": "optional, the client's own (unique in the cooperative): the same request "
                                          "sent again under it answers the dispute it opened (201, "
                                          "Idempotent-Replayed), whatever its status since; another request "
                                          "under it is 409 IDEMPOTENCY_KEY_REUSED. Without it, a second request "
                                          "is 409 DISPUTE_ALREADY_OPEN while the first's dispute is open, and "
                                          "opens another once it is closed"},
    },
    ["paymentId", "reason"],
)
TRANSITION = obj(
    {
        "status": {"enum": STATUSES},
        "note": {"type": ["string", "null"], "maxLength": 2000},
        "evidence": {"type": ["string", "null"], "maxLength": 2000},
        "refundAmount": {**AMOUNT_IN, "description": "with RESOLVED: refund this much in the same step"},
        "returnedByProvider": {**RETURNED, "description": "with refundAmount: the provider already sent it back "
                                                          "(a chargeback): recorded, nothing sent; whatever the "
                                                          "payment's refunds hold, up to what was collected (see "
                                                          "POST /v1/payments/{id}/refunds)"},
        "toPayingNumber": {**TO_PAYING_NUMBER, "description": "with refundAmount (true without it: 400, nothing "
                                                              "changed): " + TO_PAYING_NUMBER["description"]},
        "idempotencyKey": {"type": "string", "minLength": 8, "maxLength": 128,
                           "description": "optional, the client's own, scoped to the dispute: the same request sent "
                                          "again under it (the same status, note, evidence, refundAmount, "
                                          "returnedByProvider and toPayingNumber) answers 200 with the dispute as "
                                          "it is now, Idempotent-Replayed, whatever happened to it since: no second "
                                          "note, event, refund, SMS or audit row; another request under it is 409 "
                                          "IDEMPOTENCY_KEY_REUSED. Without it, a retried note is a second note, and "
                                          "a retried move that closed the dispute is 409 INVALID_STATE (closed "
                                          "already)"},
    },
    ["status"],
)


def presenter(ctx: Ctx) -> Callable[[Dispute], dict[str, Any]]:
    """`present` for this caller: a staff login (cooperative or super admin) sees who wrote each note as the
    audit log names them; a tenant or an API key sees a staff member's as STAFF_LABEL (core.disputes.present_note)."""
    staff = ctx.who.kind == "user" and not ctx.who.is_tenant
    return lambda d: present(d, staff=staff)


def present(d: Dispute, *, staff: bool = True) -> dict[str, Any]:
    return {
        "id": d.id,
        "reference": d.reference,
        "paymentId": d.payment_id,
        "memberId": d.member_id,
        "reason": d.reason,
        "status": d.status,
        "channel": d.channel,
        "notes": [present_note(note, staff=staff) for note in d.notes or []],
        "resolution": d.resolution,
        "refundId": d.refund_id,
        "createdAt": iso(d.created_at),
        "updatedAt": iso(d.updated_at),
        "resolvedAt": iso(d.resolved_at),
    }


async def create_dispute(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    try:
        payment_id = check_path_id(ctx.body["paymentId"], "payment")
    except NotFound:
        raise NotFound("payment not found", field="paymentId") from None
    payment = (
        await ctx.session.execute(ctx.who.scope(select(Payment).where(Payment.id == payment_id), Payment))
    ).scalar_one_or_none()
    if payment is None:
        raise NotFound("payment not found", field="paymentId")
    key = ctx.body.get("idempotencyKey")
    opening: dict[str, Any] = {
        "payment": payment,
        "reason": ctx.body["reason"],
        "channel": "api",
        "actor": ctx.who.actor,
        "cipher": ctx.rt.cipher,
        "answer_days": ctx.rt.settings.sms_payer_answer_days,
        "note": ctx.body.get("note"),
    }
    created = True
    if key is None:
        dispute = await open_dispute(ctx.session, **opening)
    else:
        own_idempotency_key(key)  # (the gateway keys no dispute, but one rule for every key a client gives)
        dispute, created = await open_keyed_dispute(ctx.session, idempotency_key=key, **opening)
    await ctx.session.commit()
    # A replay answers as the first request did (201), marked as payments' and refunds' replays are.
    response = json_response(presenter(ctx)(dispute), status=201)
    if not created:
        response.headers[IDEMPOTENT_REPLAYED] = "true"
    return response


async def dispute_key_used(ctx: Ctx) -> bool:
    """Route.replay: whether a dispute the caller sees was opened under the request's key in the cooperative of its
    payment (one the caller sees), where open_keyed_dispute looks for it. Not in any the caller sees: a super admin's
    request under a key another cooperative's dispute holds went past the limit and opened a dispute."""
    key = ctx.body.get("idempotencyKey")
    if not isinstance(key, str):
        return False
    payment_id = check_path_id(ctx.body["paymentId"], "payment")  # (NotFound: no replay, _names_earlier)
    coop = ctx.who.scope(select(Payment.cooperative_id).where(Payment.id == payment_id), Payment).scalar_subquery()
    made = await ctx.session.execute(ctx.who.scope(select(Dispute.id).where(
        Dispute.cooperative_id == coop, Dispute.idempotency_key == key.strip()), Dispute).limit(1))
    return made.first() is not None


# What the desk still has to answer: a dispute neither resolved, rejected nor withdrawn.
UNSETTLED = (DisputeStatus.OPEN.value, DisputeStatus.UNDER_REVIEW.value)
LIST_QUERY = {
    "page": PAGE,
    "limit": LIMIT,
    "status": Param(enum=tuple(STATUSES)),
    "open": Param("boolean", "true: only disputes still to answer (OPEN or UNDER_REVIEW); false: only those "
                  "settled (RESOLVED, REJECTED, WITHDRAWN)"),
    "reason": Param(enum=tuple(REASONS)),
    "paymentId": Param("uuid", "Disputes of one payment"),
    "member": Param("uuid", "Disputes of one member"),
    "reference": Param(description="The dispute's reference as its SMS gives it (DSP_20261201_001)", nonempty=True),
    "refundFailed": Param("boolean", "true: only disputes resolved with a refund that then FAILED, or resolved "
                          "without one on refunds made while they were open, or not yet settled when they were "
                          "resolved (then linked to them: disputeId), that all FAILED (the member was "
                          "not paid back: a RESOLVED dispute, out of ?open=true; send another refund, POST "
                          "/v1/payments/{id}/refunds), until a refund of the payment made since is not FAILED; "
                          "false: all others"),
    **period_params("created"),
}


async def list_disputes(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    """Newest first. The desk's queue is ?open=true; a member calling about hers is ?member= or the reference her
    SMS gave; the month's, from/to (bare dates in the cooperative's zone, as every list reads them)."""
    q = ctx.query
    query = matching(ctx, ctx.who.scope(select(Dispute), Dispute),
                     {"status": Dispute.status, "reason": Dispute.reason, "paymentId": Dispute.payment_id,
                      "member": Dispute.member_id, "cooperativeId": Dispute.cooperative_id}, Dispute.created_at)
    if q.get("open") is not None:
        query = query.where(Dispute.status.in_(UNSETTLED) if q["open"] else Dispute.status.not_in(UNSETTLED))
    if q.get("reference") is not None:
        query = query.where(Dispute.reference == q["reference"].strip().upper())
    if q.get("refundFailed") is not None:
        # Until the member is paid back another way: a refund of the payment made since (not FAILED: sent, or
        # recorded as the provider's chargeback), which a refund asked for now cannot link to a settled dispute.
        # Asked only of the disputes listed otherwise (an anti-join, probing ix_refunds_payment_unfailed per dispute
        # or reading it once: migration 0043).
        since = aliased(Refund)
        paid_back = select(since.id).where(since.payment_id == Dispute.payment_id,
                                           since.status != RefundStatus.FAILED.value,
                                           since.created_at > Dispute.resolved_at).exists()
        # The FAILED refunds' ids, read once (hashed) from ix_refunds_failed: a correlated EXISTS was planned
        # as if asked per dispute, and that estimate (millions on 100,000 disputes) had PostgreSQL compile the
        # query (JIT) for half a second each time.
        own_failed = and_(Dispute.refund_id.is_not(None), Dispute.refund_id.in_(
            select(Refund.id).where(Refund.status == RefundStatus.FAILED.value)))
        # Or resolved in her favour without a refund of its own, on the refunds made while it was open (noted on it:
        # core.refunds._note_refund_on_disputes; nothing may have been left to refund), or made before and not settled
        # when it was resolved (linked then: core.disputes._rely_on_unsettled), every one of which FAILED:
        # the same member not paid back, whose failure was only a note on a RESOLVED dispute. The disputes whose
        # linked refunds all FAILED, read once (hashed) from ix_refunds_dispute_status: an EXISTS per dispute read
        # every refund for each RESOLVED one without its own (minutes on 100,000 disputes, 400,000 refunds).
        meanwhile = aliased(Refund)
        not_failed = func.sum(case((meanwhile.status != RefundStatus.FAILED.value, 1), else_=0))
        all_failed = select(meanwhile.dispute_id).where(meanwhile.dispute_id.is_not(None)).group_by(
            meanwhile.dispute_id).having(not_failed == 0)
        relied_on = and_(Dispute.status == DisputeStatus.RESOLVED.value, Dispute.refund_id.is_(None),
                         Dispute.id.in_(all_failed))
        failed = and_(or_(own_failed, relied_on), ~paid_back)
        if q["refundFailed"]:
            query = query.where(failed)
        else:
            # All but those (an anti-join on the listed ones): NOT (...) asked whether each dispute was paid back
            # since, one by one, and was planned (and compiled) as such.
            listed = query.with_only_columns(Dispute.id).where(failed).subquery()
            query = query.where(~select(listed.c.id).where(listed.c.id == Dispute.id).exists())
    return await paged(ctx, query.order_by(Dispute.created_at.desc(), Dispute.id.desc()), presenter(ctx))


async def get_dispute(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    return json_response(presenter(ctx)(await one(ctx, Dispute, request.match_info["id"], "dispute")))


async def transition_dispute(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    dispute = await one(ctx, Dispute, request.match_info["id"], "dispute")
    body = ctx.body
    refund_amount = None
    if body.get("refundAmount") is not None:
        payment = await ctx.session.get(Payment, dispute.payment_id)
        assert payment is not None
        refund_amount = Money.from_api(body["refundAmount"], payment.currency, "refundAmount")
        if not refund_amount.is_positive():  # (400 as for a refund's own amount: core.refunds.request_refund)
            raise ValidationError("refundAmount must be a positive number", field="refundAmount")
    move: dict[str, Any] = {
        "dispute_id": dispute.id,
        "cooperative_id": dispute.cooperative_id,
        "target": body["status"],
        "actor": ctx.who.actor,
        "note": body.get("note"),
        "evidence": body.get("evidence"),
        "refund_amount": refund_amount,
        "returned": await returned_from(ctx, body, dispute.cooperative_id),
        "to_paying_number": bool(body.get("toPayingNumber")),
    }
    key = body.get("idempotencyKey")
    moved = True
    try:
        if key is None:
            updated = await move_dispute(ctx.session, ctx.rt, **move)
        else:
            own_idempotency_key(key)  # (one rule for every key a client gives, as POST /v1/disputes)
            updated, moved = await move_keyed_dispute(ctx.session, ctx.rt, idempotency_key=key, **move)
    except DomainError as exc:
        # The resolution's refund is refused as POST /v1/payments/{id}/refunds refuses one, about its `amount`:
        # here the request names that amount `refundAmount` (the 422 "exceeds the refundable" had no `field`).
        if exc.field == "amount":
            exc.field = "refundAmount"
        raise

    await ctx.session.commit()
    response = json_response(presenter(ctx)(updated))
    if not moved:  # a retry under its key: answered as the first was (200), marked as every replay is
        response.headers[IDEMPOTENT_REPLAYED] = "true"
    return response


async def transition_key_used(ctx: Ctx) -> bool:
    """Route.replay: whether the request's key was used on this dispute (one the caller sees), where
    move_keyed_dispute looks for it: a retry is not counted towards the limit, nor refused past it."""
    key = ctx.body.get("idempotencyKey")
    if not isinstance(key, str):
        return False
    dispute_id = check_path_id(ctx.request.match_info["id"], "dispute")  # (NotFound: no replay, _names_earlier)
    seen = ctx.who.scope(select(Dispute.id).where(Dispute.id == dispute_id), Dispute).scalar_subquery()
    used = await ctx.session.execute(select(DisputeTransitionKey.dispute_id).where(
        DisputeTransitionKey.dispute_id == seen, DisputeTransitionKey.idempotency_key == key.strip()).limit(1))
    return used.first() is not None


ROUTES = [
    Route(
        "POST",
        "/disputes",
        create_dispute,
        "Open a dispute on a payment",
        "disputes",
        "payments:write",
        # A key with payments:write alone (an integrator's: it creates payments and reads only their status) does
        # not handle disputes, on its payments or anyone's.
        also_scope="payments:read",
        status=201,
        body=CREATE,
        response=DISPUTE,
        tenants=True,
        replay=dispute_key_used,
    ),
    Route(
        "GET",
        "/disputes",
        list_disputes,
        "List disputes",
        "disputes",
        "payments:read",
        response=page_of(DISPUTE),
        tenants=True,
        query=LIST_QUERY,
    ),
    Route(
        "GET",
        "/disputes/{id}",
        get_dispute,
        "Get a dispute",
        "disputes",
        "payments:read",
        response=DISPUTE,
        tenants=True,
    ),
    Route(
        "POST",
        "/disputes/{id}/transitions",
        transition_dispute,
        "Move a dispute (review, resolve with optional refund, reject, withdraw)",
        "disputes",
        "admin",
        body=TRANSITION,
        response=DISPUTE,
        replay=transition_key_used,
    ),
]
