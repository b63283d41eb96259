"""Provider callbacks that matched no payment, for a super admin: list them, and mark one resolved with a note.

Such a callback (core.payments._store_unmatched) is answered "unknown_payment" so that the provider stops sending it,
and is kept here: after PostgreSQL was restored to an earlier point, a SUCCEEDED one is a member's money taken with
no payment of ours to credit. It names no cooperative, so only a super admin sees them: the routes take the
`admin` scope as the other lists do, and a cooperative's caller is scoped as everywhere (Principal.scope: rows of no
cooperative are none of theirs), so its list is empty and an id answers 404 as a missing one. Resolving one (after
checking the provider's statement and crediting or refunding by hand) records the note with it and in the audit
log; `main.py prune` keeps an unresolved money-taken one whatever its age (core.retention)."""

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
from core.payments import RESOLUTION, UNMATCHED, UNMATCHED_RESOLVED, bounded_body, resolve_unmatched
from core.ports import ProviderOutcome

CALLBACK = out(
    {
        "id": {"type": "string", "format": "uuid"},
        "provider": {"type": "string"},
        "eventId": {"type": "string", "description": "The provider's id of the callback"},
        "kind": {"type": "string", "enum": ["collection", "refund"]},
        "status": {"type": "string", "description": "What the callback reported, e.g. SUCCEEDED (money taken) or "
                                                    "FAILED; an unsigned one's word was not confirmed"},
        "receivedAt": DATETIME,
        "payload": {"type": "object", "description": "The callback's body as kept (at most 2 KiB, else its size "
                                                     "and SHA-256), to match with the provider's statement"},
        "outcome": {"type": "string", "enum": [UNMATCHED, UNMATCHED_RESOLVED]},
        "resolution": {
            "type": ["object", "null"],
            "description": "Who resolved it, when, and their note; null while unresolved",
            "properties": {"note": {"type": "string"}, "by": {"type": "string"}, "at": DATETIME},
            "required": ["note", "by", "at"],
        },
    }
)
RESOLVE = obj(
    {"note": {"type": "string", "minLength": 3, "maxLength": 300,
              "description": "How it was accounted for, e.g. what the provider's statement shows and what was done"}},
    ["note"],
)
_UNMATCHED_ONLY = "only callbacks that matched no payment are listed here (unmatched=true)"


def present(row: ProviderEvent) -> dict[str, Any]:
    payload = dict(row.payload) if isinstance(row.payload, dict) else {"body": row.payload}
    # Ours only once resolved (core.payments.resolve_unmatched): before, a key of that name is the sender's.
    resolution = payload.pop(RESOLUTION, None) if row.outcome == UNMATCHED_RESOLVED else None
    return {
        "id": row.id,
        "provider": row.provider,
        "eventId": row.event_id,
        "kind": row.kind,
        "status": row.status,
        "receivedAt": iso_z(row.received_at),
        # Bounded here too: a signed callback for no payment was stored whole (up to the 64 KiB body limit).
        "payload": bounded_body(payload),
        "outcome": row.outcome,
        "resolution": resolution if isinstance(resolution, dict) else None,
    }


async def list_callbacks(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    if ctx.query["unmatched"] is not True:
        raise ValidationError(_UNMATCHED_ONLY, field="unmatched")
    # payment_id IS NULL first: ix_provider_events_payment_id finds them (core.retention reads them so too).
    query = ctx.who.scope(select(ProviderEvent), ProviderEvent).where(ProviderEvent.payment_id.is_(None))
    resolved = ctx.query.get("resolved")
    if resolved is None:
        query = query.where(ProviderEvent.outcome.in_((UNMATCHED, UNMATCHED_RESOLVED)))
    else:
        query = query.where(ProviderEvent.outcome == (UNMATCHED_RESOLVED if resolved else UNMATCHED))
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
          "Provider callbacks that matched no payment, newest first (a SUCCEEDED one: money taken that no payment "
          "records). Super admin: they name no cooperative, so a cooperative's list is empty",
          "provider-callbacks", "admin", response=page_of(CALLBACK),
          query={"page": PAGE, "limit": LIMIT,
                 "unmatched": Param("boolean", "Callbacks that matched no payment (the only ones listed here)",
                                    True),
                 "resolved": Param("boolean", "true: only those resolved; false: only those still to account for"),
                 "provider": Param(description="e.g. mtn_momo, airtel, mpesa, irembopay", max_length=24),
                 "status": Param(enum=tuple(o.value for o in ProviderOutcome),
                                 description="What the callback reported (SUCCEEDED: money taken)")}),
    Route("POST", "/provider-callbacks/{id}/resolve", resolve_callback,
          "Mark a callback that matched no payment as accounted for, with a note (kept in the audit log). Super "
          "admin: for a cooperative's caller every id is not found", "provider-callbacks", "admin", body=RESOLVE,
          response=CALLBACK),
]
