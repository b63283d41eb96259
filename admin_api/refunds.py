"""Refunds over the API: request one for a payment (full by default), list them, record the outcome of one the
gateway could not learn, and withdraw one not yet sent."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from sqlalchemy import select

from admin_api.common import (
    AMOUNT_IN,
    AMOUNT_OUT,
    DATETIME,
    ID,
    NULL_DATETIME,
    NULL_STRING,
    basis_param,
    by_basis,
    cooperative_zone,
    iso,
    json_response,
    matching,
    money_out,
    obj,
    one,
    out,
    page_of,
    paged,
)
from admin_api.routing import IDEMPOTENT_REPLAYED, Ctx, Route
from admin_api.validation import (
    LIMIT,
    PAGE,
    Param,
    check_path_id,
    own_idempotency_key,
    period_params,
    statement_time,
)
from core import refunds as service
from core.models import Payment, Refund
from core.money import Money
from core.refunds import ReturnedByProvider, record_refund_outcome, request_refund
from core.state.refund import RefundStatus

REFUND = out(
    {
        "id": ID,
        "paymentId": ID,
        "reference": {"type": "string"},
        "amount": AMOUNT_OUT,
        "currency": {"type": "string"},
        "status": {"enum": [s.value for s in RefundStatus]},
        "reason": NULL_STRING,
        "failureReason": NULL_STRING,
        "disputeId": {"type": ["string", "null"]},
        "createdAt": DATETIME,
        "updatedAt": DATETIME,
        "completedAt": NULL_DATETIME,
        "providerTransactionId": {**NULL_STRING, "description": "the provider's id of the money sent back, as its "
                                                                "statement shows it (null until it is known)"},
        "returnedByProvider": {"type": "boolean",
                               "description": "true: money the provider sent back on its own (a chargeback), "
                                             "recorded by an admin and never sent by the gateway"},
    }
)
# Money the provider already sent back on its own (a chargeback, a reversal by its customer care): recorded as a
# COMPLETED refund and never sent, so the member is not paid twice.
RETURNED = {
    **obj({"providerTransactionId": {"type": "string", "minLength": 1, "maxLength": 128,
                                     "description": "the provider's id of the reversal, from its statement"},
           "completedAt": {"type": ["string", "null"], "format": "date-time",
                           "description": "when the statement shows the money sent back (default: now; without an "
                                          "offset, the cooperative's local time)"}},
          ["providerTransactionId"]),
    "description": "the provider already sent this money back (a chargeback): record it, send nothing. Its "
                   "statement is not a request: recorded whatever the payment's refunds hold (one at the provider, "
                   "or completed), up to what the provider collected on the payment with its chargebacks recorded "
                   "before (422 beyond); refunds not yet sent that would then give back more than was collected are "
                   "withdrawn (one withdrawn whole when less of it had to go flags the payment with what is still "
                   "the member's, to refund again); what goes back beyond it is flagged on the payment "
                   "(mismatchDetail) to recover from the member. The same providerTransactionId twice: 409",
}
TO_PAYING_NUMBER = {
    "type": "boolean",
    "description": "the payment was paid from a number its member no longer holds (her number was changed since: "
                   "a new SIM, or swapped with another member's), and the provider sends a refund back to the number "
                   "that paid, which the operator may have given to someone else: true sends it there all the same "
                   "(she still holds that wallet). Without it such a refund is refused (409 PAYING_NUMBER_CHANGED) "
                   "naming that number, nothing sent; a number that was never hers (someone paying for her, or one a "
                   "TYPO correction replaced) is refunded as it paid, unasked, unless another member got that number "
                   "since (a swap): asked alike, as is a payment of no member (or of a member whose number was "
                   "released) whose number a member got since. A refund asked without it whose number changes so "
                   "before the worker sends it is not sent: FAILED, its failureReason starting PAYING_NUMBER_CHANGED "
                   "(one a try of which may have reached the provider is PROCESSING until the provider says whether "
                   "it has it)",
}
CREATE = obj(
    {
        "amount": {**AMOUNT_IN, "description": "major units, more than zero (400 otherwise); omitted = everything "
                                               "still refundable (422 when nothing is; so is more than is left, "
                                               "except with returnedByProvider: up to what was collected)"},
        "reason": {"type": ["string", "null"], "maxLength": 300},
        "idempotencyKey": {"type": "string", "minLength": 8, "maxLength": 128},
        "returnedByProvider": RETURNED,
        "toPayingNumber": TO_PAYING_NUMBER,
    },
    ["idempotencyKey"],
)


async def returned_from(ctx: Ctx, body: dict[str, Any], cooperative_id: str) -> ReturnedByProvider | None:
    """The body's returnedByProvider, as core.refunds takes it (None: a refund to send); a time without an offset
    is the cooperative's, as statements show it."""
    given = body.get("returnedByProvider")
    if given is None:
        return None
    when = statement_time(given.get("completedAt"), await cooperative_zone(ctx, cooperative_id),
                          "returnedByProvider.completedAt")
    return ReturnedByProvider(given["providerTransactionId"], when)
OUTCOME = {**obj(
    {
        "status": {"enum": [RefundStatus.COMPLETED.value, RefundStatus.FAILED.value]},
        "providerTransactionId": {"type": ["string", "null"], "minLength": 1, "maxLength": 128},
        "note": {"type": "string", "minLength": 3, "maxLength": 300,
                 "description": "what the provider confirmed (kept in the audit log)"},
        "completedAt": {"type": ["string", "null"], "format": "date-time",
                        "description": "COMPLETED: when the provider's statement shows the money sent back (default: "
                                       "now; without an offset, the cooperative's local time); the reconciliation's "
                                       "settled figures date the refund so"},
    },
    ["status", "note"],
), "description": "For a refund the gateway could not learn the outcome of: parked for manual review, or sent "
                  "through the bank (IremboPay). 409 for a final refund (a FAILED one may still be recorded "
                  "COMPLETED), for one whose submission is still queued (or withdraw it: POST "
                  "/v1/refunds/{id}/cancel), and FAILED for one whose status is still being asked of the provider "
                  "(not parked yet): it may still be paid out."}
CANCEL = {
    **obj({"note": {"type": "string", "minLength": 3, "maxLength": 300,
                    "description": "why it is withdrawn (kept in the audit log and the refund's failureReason)"}},
          ["note"]),
    "description": "Withdraw a refund not yet sent to the provider (PENDING: queued, e.g. while the provider is "
                   "down), before it goes: one asked for by mistake (one the provider has meanwhile made itself is "
                   "withdrawn by recording that as a refund with returnedByProvider). It becomes FAILED (failureReason "
                   "\"withdrawn by an admin: <note>\"), its amount is refundable again, the refund.failed webhook "
                   "event is sent (no SMS: the member was never told of it). 409 when it is no longer PENDING, or "
                   "may already have reached the provider (its submission is being sent, or a try of it may have "
                   "arrived): wait for its outcome; or when its submission is parked: record its outcome.",
}
LIST_QUERY = {
    "page": PAGE,
    "limit": LIMIT,
    "status": Param(enum=tuple(s.value for s in RefundStatus)),
    **period_params("createdAt, or completedAt with basis=completed"),
    "basis": basis_param("refunds"),
}


def present(r: Refund) -> dict[str, Any]:
    return {
        "id": r.id,
        "paymentId": r.payment_id,
        "reference": r.reference,
        "amount": money_out(r.amount_minor, r.currency),
        "currency": r.currency,
        "status": r.status,
        "reason": r.reason,
        "failureReason": r.failure_reason,
        "disputeId": r.dispute_id,
        "createdAt": iso(r.created_at),
        "updatedAt": iso(r.updated_at),
        "completedAt": iso(r.completed_at),
        "providerTransactionId": r.provider_transaction_id,
        "returnedByProvider": bool(r.returned_by_provider),
    }


async def create_refund(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    payment = await one(ctx, Payment, request.match_info["id"], "payment")
    body = ctx.body
    own_idempotency_key(body["idempotencyKey"])
    amount = Money.from_api(body["amount"], payment.currency) if body.get("amount") is not None else None
    refund, created = await request_refund(
        ctx.session,
        ctx.rt,
        payment_id=payment.id,
        cooperative_id=payment.cooperative_id,
        amount=amount,
        reason=body.get("reason"),
        idempotency_key=body["idempotencyKey"],
        actor=ctx.who.actor,
        returned=await returned_from(ctx, body, payment.cooperative_id),
        to_paying_number=bool(body.get("toPayingNumber")),
    )
    await ctx.session.commit()
    # A replay answers as the first request did (201), marked as payments' replays are.
    response = json_response(present(refund), status=201)
    if not created:
        response.headers[IDEMPOTENT_REPLAYED] = "true"
    return response


async def refund_key_used(ctx: Ctx) -> bool:
    """Route.replay: whether the payment (one the caller sees) holds a refund made under the request's key."""
    payment_id = check_path_id(ctx.request.match_info["id"], "payment")
    made = await ctx.session.execute(ctx.who.scope(select(Refund.id).where(
        Refund.payment_id == payment_id, Refund.idempotency_key == ctx.body["idempotencyKey"].strip()), Refund))
    return made.first() is not None


async def record_outcome(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    """The outcome of a refund the gateway could not learn from the provider (parked for manual review)."""
    refund = await one(ctx, Refund, request.match_info["id"], "refund")
    body = ctx.body
    refund = await record_refund_outcome(
        ctx.session, ctx.rt, refund_id=refund.id, cooperative_id=refund.cooperative_id,
        succeeded=body["status"] == RefundStatus.COMPLETED.value, note=body["note"],
        provider_transaction_id=body.get("providerTransactionId"), actor=ctx.who.actor,
        completed_at=statement_time(body.get("completedAt"), await cooperative_zone(ctx, refund.cooperative_id)))
    await ctx.session.commit()
    return json_response(present(refund))


async def cancel_refund(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    """Withdraw a refund before it is sent (core.refunds.cancel_refund)."""
    refund = await one(ctx, Refund, request.match_info["id"], "refund")
    refund = await service.cancel_refund(ctx.session, ctx.rt, refund_id=refund.id,
                                         cooperative_id=refund.cooperative_id, note=ctx.body["note"],
                                         actor=ctx.who.actor)
    await ctx.session.commit()
    return json_response(present(refund))


def _filters(ctx: Ctx, query: Any) -> Any:
    query, moment = by_basis(ctx, query, Refund.created_at, Refund.completed_at)
    query = matching(ctx, query, {"status": Refund.status, "cooperativeId": Refund.cooperative_id}, moment)
    return query.order_by(moment.desc(), Refund.id.desc())


async def list_payment_refunds(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    payment = await one(ctx, Payment, request.match_info["id"], "payment")
    query = ctx.who.scope(select(Refund), Refund).where(Refund.payment_id == payment.id)
    return await paged(ctx, _filters(ctx, query), present)


async def list_refunds(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    return await paged(ctx, _filters(ctx, ctx.who.scope(select(Refund), Refund)), present)


async def get_refund(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    return json_response(present(await one(ctx, Refund, request.match_info["id"], "refund")))


ROUTES = [
    Route(
        "POST",
        "/payments/{id}/refunds",
        create_refund,
        "Refund a payment (amount optional = full)",
        "refunds",
        "admin",
        status=201,
        body=CREATE,
        response=REFUND,
        replay=refund_key_used,
    ),
    Route(
        "GET",
        "/payments/{id}/refunds",
        list_payment_refunds,
        "List a payment's refunds",
        "refunds",
        "payments:read",
        query=LIST_QUERY,
        response=page_of(REFUND),
    ),
    Route(
        "GET",
        "/refunds",
        list_refunds,
        "List refunds",
        "refunds",
        "payments:read",
        query=LIST_QUERY,
        # GET /v1/disputes takes paymentId; a payment's refunds have their own list.
        elsewhere={"paymentId": "a payment's refunds are listed by GET /v1/payments/{id}/refunds"},
        response=page_of(REFUND),
    ),
    Route("GET", "/refunds/{id}", get_refund, "Get a refund", "refunds", "payments:read", response=REFUND),
    Route(
        "POST",
        "/refunds/{id}/outcome",
        record_outcome,
        "Record a refund's outcome confirmed with the provider (for one parked for manual review)",
        "refunds",
        "admin",
        body=OUTCOME,
        response=REFUND,
    ),
    Route(
        "POST",
        "/refunds/{id}/cancel",
        cancel_refund,
        "Withdraw a refund not yet sent to the provider",
        "refunds",
        "admin",
        body=CANCEL,
        response=REFUND,
    ),
]
