"""What the providers said about a payment or a refund, for the support desk and disputes ("MTN says she paid at
10:02": did its callback come, and what did the gateway do with it?).

Each provider callback is kept as received (core.provider_events, one row per provider and event id): a collection's
callback with its payment, a refund's with its refund and that refund's payment (core.refunds._link_event). These
routes list a payment's (its collection's and its refunds') and a refund's, newest first: who sent it, what it
reported (`status`), what the gateway made of it (`outcome`: completed, duplicate, already_completed, late_completed,
ignored_final, ...) and when. Not the body: it holds the payer's full number (MTN's payer.partyId, M-Pesa's
PhoneNumber), which the API shows masked everywhere; a super admin reads unmatched ones' bodies in
GET /v1/provider-callbacks. Scoped as the payment or refund is: another cooperative's is 404."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from sqlalchemy import ColumnElement, select

from admin_api.common import DATETIME, ID, NULL_STRING, iso, one, out, page_of, paged
from admin_api.routing import Ctx, Route
from admin_api.validation import LIMIT, PAGE
from core.models import Payment, ProviderEvent, Refund
from core.ports import EventKind

CALLBACK = out(
    {
        "id": ID,
        "provider": {"type": "string", "description": "mtn_momo, airtel, mpesa, irembopay"},
        "eventId": {"type": "string", "description": "The callback's id as the gateway keys it (the provider's "
                                                     "reference, status and transaction id): a provider's retry "
                                                     "of it is the same id, counted once"},
        "kind": {"type": "string", "enum": [k.value for k in EventKind],
                 "description": "collection: about the payment; refund: about one of its refunds"},
        "refundId": {"type": ["string", "null"], "format": "uuid", "description": "the refund it is about"},
        "status": {"type": "string", "description": "What the provider reported: SUCCEEDED (money taken, or for a "
                                                    "refund paid out), FAILED, REJECTED, EXPIRED, PENDING, ...; "
                                                    "for an unsigned callback (MTN's), what the status query it "
                                                    "was confirmed by answered"},
        "outcome": {**NULL_STRING, "description": "What the gateway did with it: completed, late_completed, "
                                                  "duplicate (a retry of one already applied), already_completed, "
                                                  "ignored_final (the payment had ended), failed, pending (it "
                                                  "asked the provider's status), flagged_... (a person must "
                                                  "look); null while it was being applied"},
        "receivedAt": DATETIME,
    }
)
LIST_QUERY = {"page": PAGE, "limit": LIMIT}


def present(row: ProviderEvent) -> dict[str, Any]:
    return {"id": row.id, "provider": row.provider, "eventId": row.event_id, "kind": row.kind,
            "refundId": row.refund_id, "status": row.status, "outcome": row.outcome,
            "receivedAt": iso(row.received_at)}


async def _listed(ctx: Ctx, where: ColumnElement[bool]) -> web.StreamResponse:
    """Newest first, paged as the other lists; read by ix_provider_events_payment_id (a payment has a few)."""
    query = select(ProviderEvent).where(where).order_by(ProviderEvent.received_at.desc(), ProviderEvent.id.desc())
    return await paged(ctx, query, present)


async def payment_callbacks(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    payment = await one(ctx, Payment, request.match_info["id"], "payment")
    return await _listed(ctx, ProviderEvent.payment_id == payment.id)


async def refund_callbacks(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    refund = await one(ctx, Refund, request.match_info["id"], "refund")
    # Its payment's first (the index), then the refund's among them.
    return await _listed(ctx, (ProviderEvent.payment_id == refund.payment_id) & (ProviderEvent.refund_id == refund.id))


ROUTES = [
    Route("GET", "/payments/{id}/callbacks", payment_callbacks,
          "The provider callbacks received about a payment and its refunds, newest first: what each reported and "
          "what the gateway did with it", "payments", "admin", query=LIST_QUERY, response=page_of(CALLBACK)),
    Route("GET", "/refunds/{id}/callbacks", refund_callbacks,
          "The provider callbacks received about a refund, newest first: what each reported and what the gateway "
          "did with it", "refunds", "admin", query=LIST_QUERY, response=page_of(CALLBACK)),
]
