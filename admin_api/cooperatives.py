"""Cooperatives over the API: a super admin creates, edits and suspends them; admins read their own."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from sqlalchemy import select

from admin_api.common import DATETIME, ID, NULL_STRING, iso, json_response, obj, one, out, page_of, paged
from admin_api.routing import Ctx, Route, end_sessions
from admin_api.validation import LIMIT, PAGE, Param
from core import auth
from core import cooperatives as service
from core.config import USSD_AGGREGATORS
from core.members import LANGUAGES
from core.models import Cooperative
from core.money import EXPONENTS
from core.phone import mask

COOPERATIVE = out(
    {
        "id": ID,
        "name": {"type": "string"},
        "shortCode": {"type": "string"},
        "country": {"type": "string"},
        "currency": {"type": "string"},
        "timezone": {"type": "string"},
        "ussdExtension": NULL_STRING,
        "ussdAggregator": NULL_STRING,
        "status": {"enum": list(service.STATUSES)},
        "contactPhone": NULL_STRING,
        "selfRegistration": {"type": "boolean"},
        "language": {"enum": list(LANGUAGES)},
        "createdAt": DATETIME,
        "updatedAt": DATETIME,
    }
)
_FIELDS = {
    "name": {"type": "string", "minLength": 2, "maxLength": 200},
    "shortCode": {"type": "string", "pattern": "^[A-Za-z0-9_-]{2,32}$",
                  "description": "unique whatever its case (409 when another cooperative, a suspended one too, "
                                 "has it in any case); members may type it in any case"},
    "country": {"enum": sorted(service.COUNTRY_CURRENCY)},
    "currency": {"enum": sorted(EXPONENTS)},
    "timezone": {"type": "string", "minLength": 3, "maxLength": 64},
    "ussdExtension": {"type": ["string", "null"], "pattern": "^[0-9]{1,8}$"},
    # The aggregator its members dial through: SMS texts say that aggregator's code (null: USSD_SERVICE_CODE).
    "ussdAggregator": {"enum": [*USSD_AGGREGATORS, None]},
    "status": {"enum": list(service.STATUSES)},
    "contactPhone": {"type": ["string", "null"], "maxLength": 32},
    "selfRegistration": {"type": "boolean"},
    "language": {"enum": list(LANGUAGES),
                 "description": "of its members added without one, of the SMS to its payers who are no members, "
                                "and of its USSD menu for a caller it does not know (default: the country's, sw in "
                                "TZ, else en); a member's own language always wins"},
}
CREATE = obj(_FIELDS, ["name", "shortCode", "country"])
UPDATE = obj({k: v for k, v in _FIELDS.items() if k not in ("country", "currency")}, min_properties=1)
_NAMES = {
    "shortCode": "short_code",
    "ussdExtension": "ussd_extension",
    "ussdAggregator": "ussd_aggregator",
    "contactPhone": "contact_phone",
    "selfRegistration": "self_registration",
}


def present(c: Cooperative) -> dict[str, Any]:
    return {
        "id": c.id,
        "name": c.name,
        "shortCode": c.short_code,
        "country": c.country,
        "currency": c.currency,
        "timezone": c.timezone,
        "ussdExtension": c.ussd_extension,
        "ussdAggregator": c.ussd_aggregator,
        "status": c.status,
        "contactPhone": mask(c.contact_phone) if c.contact_phone else None,
        "selfRegistration": c.self_registration,
        "language": c.language,
        "createdAt": iso(c.created_at),
        "updatedAt": iso(c.updated_at),
    }


def _columns(body: dict[str, Any]) -> dict[str, Any]:
    return {_NAMES.get(k, k): v for k, v in body.items()}


async def create_cooperative(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    coop = await service.create_cooperative(ctx.session, values=_columns(ctx.body), actor=ctx.who.actor)
    await ctx.session.commit()
    return json_response(present(coop), status=201)


async def list_cooperatives(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    query = ctx.who.scope(select(Cooperative), Cooperative)
    if ctx.query.get("status"):
        query = query.where(Cooperative.status == ctx.query["status"])
    return await paged(ctx, query.order_by(Cooperative.name, Cooperative.id), present)


async def get_cooperative(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    return json_response(present(await one(ctx, Cooperative, request.match_info["id"], "cooperative")))


async def update_cooperative(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    return await _update(ctx, request.match_info["id"], _columns(ctx.body))


async def suspend_cooperative(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    return await _update(ctx, request.match_info["id"], {"status": "SUSPENDED"})


async def _update(ctx: Ctx, coop_id: str, changes: dict[str, Any]) -> web.StreamResponse:
    # Held, read fresh (service.hold): what it was (`was_active`, the audit row's before) is what this change
    # replaces, not what another change at once is replacing.
    coop = await service.hold(ctx.session, (await one(ctx, Cooperative, coop_id, "cooperative")).id)
    was_active = coop.status == "ACTIVE"
    coop = await service.update_cooperative(ctx.session, coop, changes=changes, actor=ctx.who.actor)
    if was_active and coop.status != "ACTIVE":
        # Its admins' and tenants' tokens stop working now, as its API keys do (new sign-ins and refreshes
        # are refused on the rows; refresh tokens from before it for good, not again once it is ACTIVE).
        await auth.record_sessions_ended(ctx.session, actor=ctx.who.actor, because="cooperative suspended",
                                         cooperative_id=coop.id)
        await end_sessions(ctx, "the cooperative's", lambda: auth.revoke_cooperative_tokens(
            ctx.session, ctx.rt.redis, coop.id, ttl_seconds=ctx.rt.settings.jwt_ttl_seconds))
    await ctx.session.commit()
    return json_response(present(coop))


ROUTES = [
    Route(
        "POST",
        "/cooperatives",
        create_cooperative,
        "Create a cooperative",
        "cooperatives",
        "super",
        status=201,
        body=CREATE,
        response=COOPERATIVE,
    ),
    Route(
        "GET",
        "/cooperatives",
        list_cooperatives,
        "List cooperatives (admins see their own)",
        "cooperatives",
        "admin",
        response=page_of(COOPERATIVE),
        query={"page": PAGE, "limit": LIMIT, "status": Param(enum=service.STATUSES)},
    ),
    Route(
        "GET",
        "/cooperatives/{id}",
        get_cooperative,
        "Get a cooperative",
        "cooperatives",
        "admin",
        response=COOPERATIVE,
    ),
    Route(
        "PATCH",
        "/cooperatives/{id}",
        update_cooperative,
        "Update a cooperative",
        "cooperatives",
        "super",
        body=UPDATE,
        response=COOPERATIVE,
    ),
    Route(
        "DELETE",
        "/cooperatives/{id}",
        suspend_cooperative,
        "Suspend a cooperative (never deleted: it keeps its shortCode and ussdExtension until changed)",
        "cooperatives",
        "super",
        response=COOPERATIVE,
    ),
]
