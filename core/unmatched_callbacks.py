"""Provider callbacks for a payment or refund the gateway does not have: kept, reported, resolved."""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from core import metrics
from core.audit import Actor, record
from core.db import insert_ignore, iso_z, table_of, utcnow
from core.errors import Conflict, NotFound
from core.models import ProviderEvent
from core.payments import _by_transaction
from core.ports import EventKind, ProviderOutcome
from core.ports import ProviderEvent as ProviderEventData
from core.text import admin_note, is_uuid

if TYPE_CHECKING:
    from core.runtime import Runtime

log = logging.getLogger("gateway.payments")

# What a callback for no payment (or refund) of ours keeps of its body: anyone who can reach the callback URL can
# send one.
UNMATCHED_PAYLOAD_BYTES = 2048
# The outcome of a stored callback that matched no payment, and of one a person has since accounted for
# (resolve_unmatched); the same for a refund callback that matched no refund (core.refunds). core.retention and
# admin_api.provider_callbacks name them too.
UNMATCHED = "unknown_payment"
UNMATCHED_RESOLVED = "unknown_payment_resolved"
UNMATCHED_REFUND = "unknown_refund"
UNMATCHED_REFUND_RESOLVED = "unknown_refund_resolved"
UNMATCHED_OF = {EventKind.COLLECTION: UNMATCHED, EventKind.REFUND: UNMATCHED_REFUND}
RESOLVED_OF = {UNMATCHED: UNMATCHED_RESOLVED, UNMATCHED_REFUND: UNMATCHED_REFUND_RESOLVED}
# Where a resolved one keeps its note, beside the provider's body (as KEPT_TRANSACTION_ID is kept).
RESOLUTION = "gatewayResolution"
# Where one keeps the reference of ours it named (_our_reference), beside the body: the request a collection's
# callback answers, which a payment recorded for its money takes (record_payment), and an MTN refund names.
CALLBACK_REFERENCE = "gatewayReference"


def _our_reference(event: ProviderEventData) -> str | None:
    """The reference of ours (our request id at the provider) a callback named: its reference, or, for one the
    provider names by its own transaction id (M-Pesa), the one the adapter read from the callback's URL."""
    ours = event.raw.get("provider_reference") if _by_transaction(event) else event.reference
    return ours if isinstance(ours, str) and is_uuid(ours) else None


def _kept_unmatched(event: ProviderEventData) -> dict[str, Any]:
    """What a callback that matched nothing keeps: its body bounded, and the reference of ours it named."""
    kept = bounded_body(dict(event.raw))
    ours = _our_reference(event)
    if ours is not None:
        kept[CALLBACK_REFERENCE] = ours.lower()
    return kept


def bounded_body(raw: dict[str, Any]) -> dict[str, Any]:
    """The body of a callback that matched no payment or refund, if small; else its size and digest (enough to
    match it with the provider's records, not 64 KiB a request kept for ever)."""
    body = json.dumps(raw, sort_keys=True, default=str).encode()
    if len(body) <= UNMATCHED_PAYLOAD_BYTES:
        return dict(raw)
    return {"truncated": {"bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}}


async def store_unmatched(rt: Runtime, event: ProviderEventData) -> str:
    """An unsigned callback naming no payment (or refund) of ours: kept unconfirmed (there is nothing to ask the
    provider about), its body bounded. Returns its outcome (UNMATCHED_OF), or "duplicate"."""
    outcome = UNMATCHED_OF[event.kind]
    async with rt.sessionmaker.begin() as session:
        stored = (await session.execute(
            insert_ignore(session.get_bind().dialect.name, ProviderEvent)
            .values(id=str(uuid.uuid4()), provider=event.provider, event_id=event.event_id[:200],
                    kind=event.kind.value, status=event.outcome.value, payload=_kept_unmatched(event),
                    outcome=outcome, received_at=utcnow())
            .on_conflict_do_nothing(index_elements=["provider", "event_id"])
            .returning(ProviderEvent.id))).scalar_one_or_none()
    if stored is None:
        return "duplicate"  # a copy sent at the same moment was stored (and reported) first
    report_unmatched(event)
    return outcome


async def keep_unmatched(session: AsyncSession, event_row_id: str, event: ProviderEventData) -> None:
    """A callback just stored (whole, before its payment or refund was looked for) that matched none: its outcome
    (UNMATCHED_OF) and its body bounded, as store_unmatched keeps an unsigned one. Report it (report_unmatched)
    once the transaction has committed."""
    table = table_of(ProviderEvent)
    await session.execute(update(table).where(table.c.id == event_row_id)
                          .values(outcome=UNMATCHED_OF[event.kind], payload=_kept_unmatched(event)))


_UNMATCHED_LOG = {EventKind.COLLECTION: log, EventKind.REFUND: logging.getLogger("gateway.refunds")}
# What report_unmatched says, by the callback's kind and whether it says money moved (logged ERROR) or not.
_UNMATCHED_SAYS = {
    (EventKind.COLLECTION, True): "provider says money was taken for a payment the gateway does not have: check the "
                                  "provider's statement (GET /v1/provider-callbacks?unmatched=true&resolved=false)",
    (EventKind.COLLECTION, False): "provider callback for a payment the gateway does not have",
    (EventKind.REFUND, True): "provider says a refund was paid out that the gateway does not have: money left the "
                              "cooperative's account; check the provider's statement "
                              "(GET /v1/provider-callbacks?unmatched=true&kind=refund&resolved=false)",
    (EventKind.REFUND, False): "provider callback for a refund the gateway does not have",
}


def report_unmatched(event: ProviderEventData) -> None:
    """Say that a callback matched no payment or refund: the counter gateway_callbacks_unmatched_total (by kind),
    and a log line at ERROR when it says money moved, WARNING otherwise. A collection SUCCEEDED: a member's money
    was taken at the provider with no payment of ours to credit (after PostgreSQL was restored to an earlier point,
    say); a refund SUCCEEDED: money left the cooperative's account to a member with no refund of ours to account
    for it. The provider's ids only, never the payer's number (the body, kept on the row, may hold it). A person
    lists and resolves them over the API (GET /v1/provider-callbacks, admin_api.provider_callbacks); `main.py
    prune` keeps an unresolved one under which money may have moved (SUCCEEDED, AMBIGUOUS, PENDING) whatever its
    age (core.retention)."""
    metrics.CALLBACKS_UNMATCHED.labels(provider=event.provider, kind=event.kind.value,
                                       outcome=event.outcome.value).inc()
    fields = {"provider": event.provider, "kind": event.kind.value, "event_id": event.event_id[:200],
              "reference": event.reference[:128],
              "provider_transaction_id": (event.provider_transaction_id or "")[:128] or None,
              "outcome": event.outcome.value, "confirmed": not event.needs_confirmation}
    moved = event.outcome is ProviderOutcome.SUCCEEDED
    _UNMATCHED_LOG[event.kind].log(logging.ERROR if moved else logging.WARNING,
                                   _UNMATCHED_SAYS[event.kind, moved], extra=fields)


async def resolve_unmatched(session: AsyncSession, event_row_id: str, note: str, *, actor: Actor,
                            payment_id: str | None = None) -> ProviderEvent:
    """A person accounts for a callback that matched no payment (credited by hand, refunded by the provider,
    a test) or no refund (the payout entered in the books, recovered from the member): its outcome moves from
    UNMATCHED to UNMATCHED_RESOLVED (UNMATCHED_REFUND to UNMATCHED_REFUND_RESOLVED), the note is kept with it
    (RESOLUTION, next to the provider's body) and in the audit log. NotFound for a row that is not such a callback;
    Conflict once resolved (the first note stands).

    `payment_id`: the payment recorded for its money (record_payment), kept with the note. The callback itself stays
    without a payment (payment_id): it is still listed with the unmatched ones, resolved."""
    note = admin_note(note, "how the callback was accounted for, e.g. what the provider's statement shows")
    row = (await session.execute(
        select(ProviderEvent).where(ProviderEvent.id == event_row_id, ProviderEvent.payment_id.is_(None),
                                    ProviderEvent.outcome.in_((*RESOLVED_OF, *RESOLVED_OF.values())))
        .with_for_update())).scalar_one_or_none()
    if row is None:
        raise NotFound("provider callback not found")
    before = row.outcome
    if before not in RESOLVED_OF:
        raise Conflict("provider callback is resolved already", field="outcome")
    after = RESOLVED_OF[before]
    at = utcnow()
    payload = dict(row.payload) if isinstance(row.payload, dict) else {"body": row.payload}
    resolution = {"note": note, "by": actor.id, "at": iso_z(at)}
    if payment_id is not None:
        resolution["paymentId"] = payment_id
    payload[RESOLUTION] = resolution
    table = table_of(ProviderEvent)
    await session.execute(update(table).where(table.c.id == row.id, table.c.outcome == before)
                          .values(outcome=after, payload=payload))
    await record(session, actor=actor, action="provider_callback.resolved", entity_type="provider_event",
                 entity_id=row.id, before={"outcome": before},
                 after={"outcome": after, "note": note, "provider": row.provider, "kind": row.kind,
                        "eventId": row.event_id, "status": row.status, "paymentId": payment_id})
    await session.flush()
    await session.refresh(row)
    return row
