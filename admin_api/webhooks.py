"""Webhook endpoints and domain approval over the API; the delivery machinery is core.webhooks."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from aiohttp import web
from sqlalchemy import select

from admin_api.common import (
    DATETIME,
    ID,
    NULL_DATETIME,
    NULL_STRING,
    iso,
    json_response,
    obj,
    one,
    out,
    out_plus,
    page_of,
    paged,
    target_cooperative,
)
from admin_api.routing import Ctx, Route
from admin_api.validation import LIMIT, PAGE, Param
from core import webhooks
from core.db import parse_aware
from core.models import ApprovedDomain, WebhookDelivery, WebhookEndpoint

DOMAIN = out(
    {
        "id": ID,
        "cooperativeId": ID,
        "domain": {"type": "string", "description": "a host name in lower case, or an IP address in its canonical "
                   "form (fd00:0::5 is fd00::5, an IPv4-mapped one ::ffff:1.2.3.4), as an endpoint URL's host is "
                   "compared with it"},
        "status": {"enum": ["PENDING", "APPROVED", "REJECTED"]},
        "decidedBy": NULL_STRING,
        "decidedAt": NULL_DATETIME,
        "createdAt": DATETIME,
    }
)
ENDPOINT = out(
    {
        "id": ID,
        "cooperativeId": ID,
        "url": {"type": "string"},
        "events": {"type": "array", "items": {"enum": list(webhooks.EVENTS)}},
        "status": {"enum": ["ACTIVE", "DISABLED"]},
        "consecutiveFailures": {"type": "integer"},
        "disabledAt": NULL_DATETIME,
        # When the secret the last rotation replaced stops signing; null once none does.
        "previousSecretValidUntil": NULL_DATETIME,
        # Every replaced secret still signing deliveries, newest first: when each stops.
        "previousSecrets": {"type": "array", "items": out({"validUntil": DATETIME})},
        "domainStatus": {
            "type": ["string", "null"], "enum": ["APPROVED", "PENDING", "REJECTED", None],
            "description": "the status of the cooperative's request for the URL's domain: anything but APPROVED "
            "holds its deliveries (heldReason domain_not_approved) until a super admin approves it",
        },
        "createdAt": DATETIME,
        "updatedAt": DATETIME,
    }
)
ENDPOINT_CREATED = out_plus(ENDPOINT, secret={"type": "string"})
MAX_OVERLAP_HOURS = int(webhooks.MAX_ROTATION_OVERLAP.total_seconds() // 3600)
ROTATION = obj(
    {
        "overlapHours": {
            "type": "integer",
            "minimum": 0,
            "maximum": MAX_OVERLAP_HOURS,
            "description": "how long the previous secret still signs deliveries (default 24; 0: stop it, and "
            "any earlier one still signing, at once)",
        }
    }
)
ATTEMPT = out(
    {
        "at": DATETIME,
        "statusCode": {"type": ["integer", "null"], "description": "null: no answer (timeout, refused, ...)"},
        "latencyMs": {"type": "integer"},
        "error": {"type": ["string", "null"], "description": "null: delivered (a 2xx answer). Not sent at all "
                  "(statusCode null, retried as any failure): '<name> resolves to <address>, which is not a public "
                  "address: not sent', or '<address> is not a public address: not sent' for an endpoint on an IP "
                  "address outside the operator's WEBHOOK_PRIVATE_NETWORKS"},
    }
)
DELIVERY = out(
    {
        "id": ID,
        "endpointId": ID,
        "eventId": {"type": "string"},
        "eventType": {"enum": list(webhooks.EVENTS)},
        # What the event is about, from its stored data: the event id does not say it once it is a digest.
        "subjectType": {"type": ["string", "null"], "enum": [*webhooks.SUBJECT_TYPES, None],
                        "description": "what the event is about (its data's `id` is that entity's id)"},
        "subjectId": {"type": ["string", "null"], "description": "the payment, refund or dispute id"},
        "status": {"enum": list(webhooks.DELIVERY_STATUSES)},
        "heldReason": {
            "type": ["string", "null"],
            "enum": [webhooks.HELD_SWITCHED_OFF, webhooks.HELD_DOMAIN_NOT_APPROVED, None],
            "description": "a PENDING delivery that is not being sent, and why: endpoint_switched_off (sent when "
            "the endpoint is enabled), domain_not_approved (the URL's domain was rejected or is pending: sent when "
            "a super admin approves it). Held deliveries keep their attempts and are not given up while held, but "
            "an endpoint switched off, or whose domain has not been approved, for RETENTION_WEBHOOK_HELD_DAYS (30) "
            "has those recorded as long ago marked FAILED by `prune`. "
            "null: delivered, given up, or sent (or retried) when due",
        },
        "attempts": {"type": "array", "items": ATTEMPT},
        "createdAt": DATETIME,
        "deliveredAt": NULL_DATETIME,
    }
)
COOP = {"type": "string", "format": "uuid", "description": "super admin only"}
DOMAIN_CREATE = obj(
    {
        "domain": {"type": "string", "minLength": 1, "maxLength": 253,
                   "description": "a host name, or an IP address where one is allowed (an IPv6 one with or without "
                   "the brackets of a URL: [fd00::5] is fd00::5)"},
        "cooperativeId": COOP,
    },
    ["domain"],
)
ENDPOINT_CREATE = obj(
    {
        "url": {"type": "string", "minLength": 8, "maxLength": 500},
        "events": {
            "type": "array",
            "minItems": 1,
            "uniqueItems": True,
            "items": {"enum": list(webhooks.EVENTS)},
        },
        "cooperativeId": COOP,
    },
    ["url", "events"],
)
ENDPOINT_UPDATE = obj(
    {
        "url": ENDPOINT_CREATE["properties"]["url"],
        "events": ENDPOINT_CREATE["properties"]["events"],
    },
    min_properties=1,
)
DECISION = obj({"note": {"type": ["string", "null"], "maxLength": 500}})


def present_domain(d: ApprovedDomain) -> dict[str, Any]:
    return {
        "id": d.id,
        "cooperativeId": d.cooperative_id,
        "domain": d.domain,
        "status": d.status,
        "decidedBy": d.decided_by,
        "decidedAt": iso(d.decided_at),
        "createdAt": iso(d.created_at),
    }


def present_endpoint(e: WebhookEndpoint, domain_status: str | None) -> dict[str, Any]:
    previous = [iso(webhooks.secret_expiry(entry)) for entry in webhooks.live_previous_secrets(e)]
    return {
        "id": e.id,
        "cooperativeId": e.cooperative_id,
        "url": e.url,
        "events": list(e.events or []),
        "status": e.status,
        "consecutiveFailures": e.consecutive_failures,
        "disabledAt": iso(e.disabled_at),
        "previousSecretValidUntil": previous[0] if previous else None,
        "previousSecrets": [{"validUntil": until} for until in previous],
        "domainStatus": domain_status,
        "createdAt": iso(e.created_at),
        "updatedAt": iso(e.updated_at),
    }


def present_attempt(attempt: dict[str, Any]) -> dict[str, Any]:
    """A recorded attempt in the API's camelCase, its time written as every API timestamp (the row keeps
    core.webhooks' snake_case keys and Python's isoformat)."""
    at = attempt.get("at")
    return {"at": iso(parse_aware(at)) or at, "statusCode": attempt.get("status_code"),
            "latencyMs": attempt.get("latency_ms", 0), "error": attempt.get("error")}


async def endpoint_out(ctx: Ctx, e: WebhookEndpoint) -> dict[str, Any]:
    """present_endpoint, with its domain's status read."""
    return present_endpoint(e, await webhooks.domain_status(ctx.session, e.cooperative_id, e.url))


def present_delivery(d: WebhookDelivery, held: str | None = None) -> dict[str, Any]:
    """`held`: why its endpoint's PENDING deliveries are held (webhooks.held_reason), shown on a PENDING one."""
    subject_type, subject_id = webhooks.event_subject(d.event_type, d.payload)
    return {
        "id": d.id,
        "endpointId": d.endpoint_id,
        "eventId": d.event_id,
        "eventType": d.event_type,
        "subjectType": subject_type,
        "subjectId": subject_id,
        "status": d.status,
        "heldReason": held if d.status == "PENDING" else None,
        "attempts": [present_attempt(a) for a in d.attempts or [] if isinstance(a, dict)],
        "createdAt": iso(d.created_at),
        "deliveredAt": iso(d.delivered_at),
    }


async def request_domain(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    coop_id = (await target_cooperative(ctx, ctx.body.get("cooperativeId"))).id
    row = await webhooks.request_domain(
        ctx.session,
        cooperative_id=coop_id,
        domain=ctx.body["domain"],
        actor=ctx.who.actor,
        embedded=ctx.rt.settings.is_embedded,
        private=ctx.rt.settings.webhook_private_networks,
    )
    await ctx.session.commit()
    return json_response(present_domain(row), status=201)


async def list_domains(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    query = ctx.who.scope(select(ApprovedDomain), ApprovedDomain)
    if ctx.query.get("status"):
        query = query.where(ApprovedDomain.status == ctx.query["status"])
    return await paged(
        ctx, query.order_by(ApprovedDomain.created_at.desc(), ApprovedDomain.id), present_domain
    )


async def _decide(request: web.Request, ctx: Ctx, approve: bool) -> web.StreamResponse:
    row = await one(ctx, ApprovedDomain, request.match_info["id"], "domain request")
    row = await webhooks.approve_domain(
        ctx.session, domain_id=row.id, actor=ctx.who.actor, is_super_admin=ctx.who.is_super, approve=approve
    )
    await ctx.session.commit()
    return json_response(present_domain(row))


async def approve_domain(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    return await _decide(request, ctx, True)


async def reject_domain(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    return await _decide(request, ctx, False)


async def create_endpoint(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    coop_id = (await target_cooperative(ctx, ctx.body.get("cooperativeId"))).id
    endpoint, secret = await webhooks.register_endpoint(
        ctx.session,
        ctx.rt.cipher,
        cooperative_id=coop_id,
        url=ctx.body["url"],
        events=ctx.body["events"],
        actor=ctx.who.actor,
        embedded=ctx.rt.settings.is_embedded,
        private=ctx.rt.settings.webhook_private_networks,
    )
    await ctx.session.commit()
    response = json_response({**await endpoint_out(ctx, endpoint), "secret": secret}, status=201)
    response.headers["Cache-Control"] = "no-store"
    return response


async def list_endpoints(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    query = ctx.who.scope(select(WebhookEndpoint), WebhookEndpoint)
    statuses: dict[tuple[str, str], str] = {}

    async def domains(rows: Any) -> None:  # the page's domains, in one query
        if not rows:
            return
        found = await ctx.session.execute(
            select(ApprovedDomain.cooperative_id, ApprovedDomain.domain, ApprovedDomain.status).where(
                ApprovedDomain.cooperative_id.in_({e.cooperative_id for e in rows}),
                ApprovedDomain.domain.in_({webhooks.endpoint_host(e.url) for e in rows}),
            )
        )
        statuses.update({(coop, domain): status for coop, domain, status in found.all()})

    return await paged(
        ctx,
        query.order_by(WebhookEndpoint.created_at.desc(), WebhookEndpoint.id),
        lambda e: present_endpoint(e, statuses.get((e.cooperative_id, webhooks.endpoint_host(e.url)))),
        domains,
    )


async def get_endpoint(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    return json_response(
        await endpoint_out(ctx, await one(ctx, WebhookEndpoint, request.match_info["id"], "webhook endpoint"))
    )


async def update_endpoint(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    endpoint = await one(ctx, WebhookEndpoint, request.match_info["id"], "webhook endpoint")
    endpoint = await webhooks.update_endpoint(
        ctx.session,
        endpoint_id=endpoint.id,
        cooperative_id=endpoint.cooperative_id,
        actor=ctx.who.actor,
        url=ctx.body.get("url"),
        events=ctx.body.get("events"),
        embedded=ctx.rt.settings.is_embedded,
        private=ctx.rt.settings.webhook_private_networks,
    )
    await ctx.session.commit()
    return json_response(await endpoint_out(ctx, endpoint))


async def disable_endpoint(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    endpoint = await one(ctx, WebhookEndpoint, request.match_info["id"], "webhook endpoint")
    endpoint = await webhooks.delete_endpoint(
        ctx.session, endpoint_id=endpoint.id, cooperative_id=endpoint.cooperative_id, actor=ctx.who.actor
    )
    await ctx.session.commit()
    return json_response(await endpoint_out(ctx, endpoint))


async def enable_endpoint(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    endpoint = await one(ctx, WebhookEndpoint, request.match_info["id"], "webhook endpoint")
    endpoint = await webhooks.enable_endpoint(
        ctx.session, endpoint_id=endpoint.id, cooperative_id=endpoint.cooperative_id, actor=ctx.who.actor
    )
    await ctx.session.commit()
    return json_response(await endpoint_out(ctx, endpoint))


async def rotate_secret(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    endpoint = await one(ctx, WebhookEndpoint, request.match_info["id"], "webhook endpoint")
    hours = (ctx.body or {}).get("overlapHours")
    overlap = webhooks.ROTATION_OVERLAP if hours is None else timedelta(hours=hours)
    endpoint, secret = await webhooks.rotate_secret(
        ctx.session,
        ctx.rt.cipher,
        endpoint_id=endpoint.id,
        cooperative_id=endpoint.cooperative_id,
        actor=ctx.who.actor,
        overlap=overlap,
    )
    await ctx.session.commit()
    response = json_response({**await endpoint_out(ctx, endpoint), "secret": secret})
    response.headers["Cache-Control"] = "no-store"
    return response


async def list_deliveries(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    endpoint = await one(ctx, WebhookEndpoint, request.match_info["id"], "webhook endpoint")
    query = (
        ctx.who.scope(select(WebhookDelivery), WebhookDelivery)
        .where(WebhookDelivery.endpoint_id == endpoint.id)
        .order_by(WebhookDelivery.created_at.desc(), WebhookDelivery.id)
    )
    if ctx.query.get("status"):  # e.g. FAILED: what a receiver that was down has missed
        query = query.where(WebhookDelivery.status == ctx.query["status"])
    held = await webhooks.held_reason(ctx.session, endpoint)
    return await paged(ctx, query, lambda d: present_delivery(d, held))


PAGING = {"page": PAGE, "limit": LIMIT}
ROUTES = [
    Route(
        "POST",
        "/webhook-domains",
        request_domain,
        "Ask for a webhook domain to be approved",
        "webhooks",
        "admin",
        status=201,
        body=DOMAIN_CREATE,
        response=DOMAIN,
    ),
    Route(
        "GET",
        "/webhook-domains",
        list_domains,
        "List webhook domain requests",
        "webhooks",
        "admin",
        query={**PAGING, "status": Param(enum=("PENDING", "APPROVED", "REJECTED"))},
        response=page_of(DOMAIN),
    ),
    Route(
        "POST",
        "/webhook-domains/{id}/approve",
        approve_domain,
        "Approve a webhook domain (super admin)",
        "webhooks",
        "super",
        body=DECISION,
        response=DOMAIN,
    ),
    Route(
        "POST",
        "/webhook-domains/{id}/reject",
        reject_domain,
        "Reject a webhook domain (super admin)",
        "webhooks",
        "super",
        body=DECISION,
        response=DOMAIN,
    ),
    Route(
        "POST",
        "/webhook-endpoints",
        create_endpoint,
        "Register a webhook endpoint (secret shown once)",
        "webhooks",
        "admin",
        status=201,
        body=ENDPOINT_CREATE,
        response=ENDPOINT_CREATED,
    ),
    Route(
        "GET",
        "/webhook-endpoints",
        list_endpoints,
        "List webhook endpoints",
        "webhooks",
        "admin",
        query=PAGING,
        response=page_of(ENDPOINT),
    ),
    Route(
        "GET",
        "/webhook-endpoints/{id}",
        get_endpoint,
        "Get a webhook endpoint",
        "webhooks",
        "admin",
        response=ENDPOINT,
    ),
    Route(
        "PATCH",
        "/webhook-endpoints/{id}",
        update_endpoint,
        "Change a webhook endpoint's events or URL (its secret, status and deliveries kept)",
        "webhooks",
        "admin",
        body=ENDPOINT_UPDATE,
        response=ENDPOINT,
    ),
    Route(
        "DELETE",
        "/webhook-endpoints/{id}",
        disable_endpoint,
        "Disable a webhook endpoint (nothing more is recorded for it)",
        "webhooks",
        "admin",
        response=ENDPOINT,
    ),
    Route(
        "POST",
        "/webhook-endpoints/{id}/enable",
        enable_endpoint,
        "Re-enable a webhook endpoint (sends what it still held while switched off: not what `prune` gave up, "
        "see RETENTION_WEBHOOK_HELD_DAYS)",
        "webhooks",
        "admin",
        response=ENDPOINT,
    ),
    Route(
        "POST",
        "/webhook-endpoints/{id}/rotate-secret",
        rotate_secret,
        "Rotate a webhook endpoint's signing secret (new secret shown once; the previous one still signs "
        "deliveries for overlapHours, 24 by default, and so does each earlier one until its own overlap ends)",
        "webhooks",
        "admin",
        body=ROTATION,
        body_optional=True,
        response=ENDPOINT_CREATED,
    ),
    Route(
        "GET",
        "/webhook-endpoints/{id}/deliveries",
        list_deliveries,
        "Deliveries to an endpoint, newest first, each naming the payment, refund or dispute it was about",
        "webhooks",
        "admin",
        query={**PAGING, "status": Param(enum=webhooks.DELIVERY_STATUSES,
                                         description="only deliveries in this status (FAILED: given up)")},
        response=page_of(DELIVERY),
    ),
]
