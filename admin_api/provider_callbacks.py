"""Provider callbacks that matched no payment or no refund, for a super admin: list them, and mark one resolved
with a note.

Such a callback (core.unmatched_callbacks.store_unmatched, keep_unmatched) is answered "unknown_payment" (a refund's
"unknown_refund") so that the provider stops sending it, and is kept here: after PostgreSQL was restored to an
earlier point, a SUCCEEDED collection is a member's money taken with no payment of ours to credit, and a SUCCEEDED
refund is money paid out of the cooperative's account with no refund of ours to account for it. It names no
cooperative, so only a super admin sees them: the routes take the `admin` scope as the other lists do, and a
cooperative's caller is scoped as everywhere (Principal.scope: rows of no cooperative are none of theirs), so its
list is empty and an id answers 404 as a missing one. Resolving one (after checking the provider's statement and
crediting, refunding or booking it by hand) records the note with it and in the audit log; `main.py prune` keeps
an unresolved one under which money may have moved (SUCCEEDED, AMBIGUOUS, PENDING) whatever its age
(core.retention). A collection's money is credited with
POST /v1/payments/recorded, which resolves the callback it names (callbackId) in the same transaction, and the
resolution then names the payment (paymentId)."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from sqlalchemy import select

from admin_api.common import DATETIME, json_response, obj, out, page_of, paged
from admin_api.routing import Ctx, Route
from admin_api.validation import LIMIT, PAGE, Param, check_path_id
from core.db import iso_z
from core.errors import NotFound, ValidationError
from core.models import ProviderEvent
from core.ports import EventKind, ProviderOutcome
from core.unmatched_callbacks import RESOLUTION, RESOLVED_OF, UNMATCHED_OF, bounded_body, resolve_unmatched

CALLBACK = out(
    {
        "id": {"type": "string", "format": "uuid"},
        "provider": {"type": "string"},
        "eventId": {"type": "string", "description": "The provider's id of the callback"},
        "kind": {"type": "string", "enum": [k.value for k in EventKind],
                 "description": "collection: it named no payment of ours; refund: it named no refund of ours"},
        "status": {"type": "string", "description": "What the callback reported, e.g. SUCCEEDED (money taken, or "
                                                    "for a refund paid out) or FAILED; an unsigned one's word was "
                                                    "not confirmed"},
        "receivedAt": DATETIME,
        "payload": {"type": "object", "description": "The callback's body as kept (at most 2 KiB, else its size "
                                                     "and SHA-256), to match with the provider's statement; "
                                                     "gatewayReference: the request of ours it named (a payment "
                                                     "recorded for it takes it: POST /v1/payments/recorded)"},
        "outcome": {"type": "string", "enum": [*RESOLVED_OF, *RESOLVED_OF.values()]},
        "resolution": {
            "type": ["object", "null"],
            "description": "Who resolved it, when, and their note; null while unresolved",
            "properties": {"note": {"type": "string"}, "by": {"type": "string"}, "at": DATETIME,
                           "paymentId": {"type": "string", "format": "uuid",
                                         "description": "the payment recorded for its money, when it was resolved "
                                                        "by POST /v1/payments/recorded (callbackId)"}},
            "required": ["note", "by", "at"],
        },
    }
)
RESOLVE = obj(
    {"note": {"type": "string", "minLength": 3, "maxLength": 300,
              "description": "How it was accounted for, e.g. what the provider's statement shows and what was done"}},
    ["note"],
)
_UNMATCHED_ONLY = "only callbacks that matched no payment or refund are listed here (unmatched=true)"


def present(row: ProviderEvent) -> dict[str, Any]:
    payload = dict(row.payload) if isinstance(row.payload, dict) else {"body": row.payload}
    # Ours only once resolved (core.unmatched_callbacks.resolve_unmatched): before, a key of that name is the sender's.
    resolution = payload.pop(RESOLUTION, None) if row.outcome in RESOLVED_OF.values() else None
    return {
        "id": row.id,
        "provider": row.provider,
        "eventId": row.event_id,
        "kind": row.kind,
        "status": row.status,
        "receivedAt": iso_z(row.received_at),
        # Bounded here too: a signed callback for no payment was stored whole (up to the 64 KiB body limit) before
        # core.unmatched_callbacks.keep_unmatched bounded it.
        "payload": bounded_body(payload),
        "outcome": row.outcome,
        "resolution": resolution if isinstance(resolution, dict) else None,
    }


async def list_callbacks(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    if ctx.query["unmatched"] is not True:
        raise ValidationError(_UNMATCHED_ONLY, field="unmatched")
    # payment_id IS NULL first: ix_provider_events_payment_id finds them (core.retention reads them so too).
    query = ctx.who.scope(select(ProviderEvent), ProviderEvent).where(ProviderEvent.payment_id.is_(None))
    # By outcome alone: each is of one kind (unknown_payment a collection's, unknown_refund a refund's).
    kind, resolved = ctx.query.get("kind"), ctx.query.get("resolved")
    unresolved = [UNMATCHED_OF[EventKind(kind)]] if kind is not None else list(UNMATCHED_OF.values())
    outcomes: list[str] = []
    if resolved is not True:
        outcomes += unresolved
    if resolved is not False:
        outcomes += [RESOLVED_OF[o] for o in unresolved]
    query = query.where(ProviderEvent.outcome.in_(outcomes))
    for name, column in (("provider", ProviderEvent.provider), ("status", ProviderEvent.status)):
        if ctx.query.get(name) is not None:
            query = query.where(column == ctx.query[name])
    return await paged(ctx, query.order_by(ProviderEvent.received_at.desc(), ProviderEvent.id.desc()), present)


async def resolve_callback(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    row_id = check_path_id(request.match_info["id"], "provider callback")
    if not ctx.who.is_super:  # none is a cooperative's (see the module's docstring): as for a missing id
        raise NotFound("provider callback not found")
    row = await resolve_unmatched(ctx.session, row_id, ctx.body["note"], actor=ctx.who.actor)
    await ctx.session.commit()
    return json_response(present(row))


ROUTES = [
    Route("GET", "/provider-callbacks", list_callbacks,
          "Provider callbacks that matched no payment or no refund, newest first (a SUCCEEDED one: money taken "
          "that no payment records, or for a refund paid out that no refund records). Super admin: they name no "
          "cooperative, so a cooperative's list is empty",
          "provider-callbacks", "admin", response=page_of(CALLBACK),
          query={"page": PAGE, "limit": LIMIT,
                 "unmatched": Param("boolean", "Callbacks that matched no payment or refund (the only ones "
                                    "listed here)", True),
                 "kind": Param(enum=tuple(k.value for k in EventKind),
                               description="collection: for no payment of ours; refund: for no refund of ours"),
                 "resolved": Param("boolean", "true: only those resolved; false: only those still to account for"),
                 "provider": Param(description="e.g. mtn_momo, airtel, mpesa, irembopay", max_length=24),
                 "status": Param(enum=tuple(o.value for o in ProviderOutcome),
                                 description="What the callback reported (SUCCEEDED: money taken, or paid out)")}),
    Route("POST", "/provider-callbacks/{id}/resolve", resolve_callback,
          "Mark a callback that matched no payment or refund as accounted for, with a note (kept in the audit "
          "log). Super admin: for a cooperative's caller every id is not found", "provider-callbacks", "admin",
          body=RESOLVE,
          response=CALLBACK),
]
