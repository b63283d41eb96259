"""Payment types over the API: create, update, deactivate, list, and the small active list USSD reads."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from sqlalchemy import select

from admin_api.common import (
    AMOUNT_IN,
    AMOUNT_OUT,
    DATETIME,
    ID,
    NULL_STRING,
    iso,
    json_response,
    money_out,
    obj,
    one,
    out,
    out_only,
    page_of,
    paged,
)
from admin_api.routing import Ctx, Route
from admin_api.validation import HINTS_KEYWORD, LIMIT, PAGE, Param
from core import payment_types as service
from core.errors import NotFound, ValidationError
from core.models import Cooperative, PaymentType
from core.money import EXPONENTS, Money
from core.ratelimit import Limit

INTERVAL = {"type": ["string", "null"], "enum": [*service.RECURRING_INTERVALS, None]}
DUE_DAY = {"type": ["integer", "null"], "minimum": 1, "maximum": 31,
           "description": "day of the month it falls due; in a shorter month, 29-31 fall on its last day"}
PAYMENT_TYPE = out(
    {
        "id": ID,
        "name": {"type": "string"},
        "description": NULL_STRING,
        "amount": AMOUNT_OUT,
        "currency": {"type": "string"},
        "isRecurring": {"type": "boolean"},
        "recurringInterval": NULL_STRING,
        "dueDay": {"type": ["integer", "null"]},
        "isActive": {"type": "boolean"},
        "allowCustomAmount": {"type": "boolean"},
        "cooperativeId": ID,
        "createdAt": DATETIME,
        "updatedAt": DATETIME,
    }
)
ACTIVE_TYPE = out_only(PAYMENT_TYPE, "id", "name", "description", "amount", "currency", "isRecurring",
                       "recurringInterval", "dueDay")
_FIELDS = {
    "name": {"type": "string", "minLength": 1, "maxLength": 120},
    "description": {"type": ["string", "null"], "maxLength": 500},
    "amount": {**AMOUNT_IN, "description": f"{AMOUNT_IN['description']}. Refused (400) when no payment method "
                                           "of the cooperative's country can collect it (M-Pesa takes whole "
                                           "shillings)"},
    "isRecurring": {"type": "boolean", "description": "a recurring type needs recurringInterval and dueDay (the "
                                                      "day reminders go before). false also clears both; setting "
                                                      "either on a one-off type makes it recurring"},
    "recurringInterval": INTERVAL,
    "dueDay": DUE_DAY,
    "isActive": {"type": "boolean"},
    "allowCustomAmount": {"type": "boolean"},
}
CREATE = obj(
    {
        **_FIELDS,
        "isRecurring": {"type": "boolean", "description": "default: true when recurringInterval or dueDay is "
                                                          "given, else false. A recurring type needs both; false "
                                                          "with either is refused"},
        "currency": {"enum": sorted(EXPONENTS)},
        "cooperativeId": {"type": "string", "format": "uuid", "description": "super admin only"},
    },
    ["name", "amount"],
)
UPDATE = {**obj(_FIELDS, min_properties=1), HINTS_KEYWORD: {
    "currency": ": a payment type keeps the currency it was made with; make another type for another currency"}}
_NAMES = {
    "isRecurring": "is_recurring",
    "recurringInterval": "recurring_interval",
    "dueDay": "due_day",
    "isActive": "is_active",
    "allowCustomAmount": "allow_custom_amount",
    "name": "name",
    "description": "description",
}


def present(pt: PaymentType) -> dict[str, Any]:
    return {
        "id": pt.id,
        "name": pt.name,
        "description": pt.description,
        "amount": money_out(pt.amount_minor, pt.currency),
        "currency": pt.currency,
        "isRecurring": pt.is_recurring,
        "recurringInterval": pt.recurring_interval,
        "dueDay": pt.due_day,
        "isActive": pt.is_active,
        "allowCustomAmount": pt.allow_custom_amount,
        "cooperativeId": pt.cooperative_id,
        "createdAt": iso(pt.created_at),
        "updatedAt": iso(pt.updated_at),
    }


def present_active(pt: PaymentType) -> dict[str, Any]:
    return {
        "id": pt.id,
        "name": pt.name,
        "description": pt.description,
        "amount": money_out(pt.amount_minor, pt.currency),
        "currency": pt.currency,
        "isRecurring": pt.is_recurring,
        "recurringInterval": pt.recurring_interval,
        "dueDay": pt.due_day,
    }


async def _currency(ctx: Ctx, coop_id: str) -> str:
    coop = (
        await ctx.session.execute(
            ctx.who.scope(select(Cooperative).where(Cooperative.id == coop_id), Cooperative)
        )
    ).scalar_one_or_none()
    if coop is None:
        raise NotFound("cooperative not found")
    return coop.currency


async def create_payment_type(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    body = ctx.body
    coop_id = ctx.who.target_cooperative(body.get("cooperativeId"))
    currency = body.get("currency") or await _currency(ctx, coop_id)
    fields = service.PaymentTypeFields(
        name=body["name"],
        amount=Money.from_api(body["amount"], currency),
        description=body.get("description"),
        allow_custom_amount=body.get("allowCustomAmount", False),
        is_recurring=body.get("isRecurring"),  # absent: recurring when an interval or due day is given
        recurring_interval=body.get("recurringInterval"),
        due_day=body.get("dueDay"),
        is_active=body.get("isActive", True),
    )
    pt = await service.create_payment_type(
        ctx.session, cooperative_id=coop_id, fields=fields, actor=ctx.who.actor, rt=ctx.rt
    )
    await ctx.session.commit()
    return json_response(present(pt), status=201)


async def update_payment_type(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    pt = await one(ctx, PaymentType, request.match_info["id"], "payment type")
    changes: dict[str, Any] = {_NAMES[k]: v for k, v in ctx.body.items() if k != "amount"}
    if "amount" in ctx.body:
        changes["amount"] = Money.from_api(ctx.body["amount"], pt.currency)
    if "name" in changes and changes["name"] is None:
        raise ValidationError("name must not be null", field="name")
    pt = await service.update_payment_type(
        ctx.session,
        cooperative_id=pt.cooperative_id,
        payment_type_id=pt.id,
        changes=changes,
        actor=ctx.who.actor,
        rt=ctx.rt,
    )
    await ctx.session.commit()
    return json_response(present(pt))


async def deactivate_payment_type(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    pt = await one(ctx, PaymentType, request.match_info["id"], "payment type")
    pt = await service.deactivate_payment_type(
        ctx.session, cooperative_id=pt.cooperative_id, payment_type_id=pt.id, actor=ctx.who.actor
    )
    await ctx.session.commit()
    return json_response(present(pt))


async def list_payment_types(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    query = ctx.who.scope(select(PaymentType), PaymentType)
    if not ctx.query["includeInactive"] or ctx.who.is_tenant:
        query = query.where(PaymentType.is_active.is_(True))
    if ctx.query.get("cooperativeId"):
        query = query.where(PaymentType.cooperative_id == ctx.query["cooperativeId"])
    return await paged(ctx, query.order_by(PaymentType.name, PaymentType.id), present)


async def active_payment_types(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    coop_id = ctx.who.target_cooperative(ctx.query.get("cooperativeId"))
    rows = await service.active_payment_types(ctx.session, coop_id)
    response = json_response([present_active(pt) for pt in rows])
    # Small and read on every USSD session: clients may cache it briefly.
    response.headers["Cache-Control"] = "private, max-age=30"
    return response


async def get_payment_type(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    return json_response(present(await one(ctx, PaymentType, request.match_info["id"], "payment type")))


COOP_PARAM = Param("uuid", "Super admin: the cooperative")
ROUTES = [
    Route(
        "POST",
        "/payment-types",
        create_payment_type,
        "Create a payment type",
        "payment-types",
        "admin",
        status=201,
        body=CREATE,
        response=PAYMENT_TYPE,
        limit=Limit("payment-types:create", 20),
    ),
    Route(
        "GET",
        "/payment-types",
        list_payment_types,
        "List payment types",
        "payment-types",
        "payments:read",
        response=page_of(PAYMENT_TYPE),
        tenants=True,
        query={
            "page": PAGE,
            "limit": LIMIT,
            "cooperativeId": COOP_PARAM,
            "includeInactive": Param("boolean", "Include inactive payment types", False),
        },
    ),
    Route(
        "GET",
        "/payment-types/active",
        active_payment_types,
        "Active payment types (USSD menu)",
        "payment-types",
        "payments:read",
        response={"type": "array", "items": ACTIVE_TYPE},
        query={"cooperativeId": COOP_PARAM},
        tenants=True,
    ),
    Route(
        "GET",
        "/payment-types/{id}",
        get_payment_type,
        "Get a payment type",
        "payment-types",
        "payments:read",
        response=PAYMENT_TYPE,
        tenants=True,
    ),
    Route(
        "PATCH",
        "/payment-types/{id}",
        update_payment_type,
        "Update a payment type",
        "payment-types",
        "admin",
        body=UPDATE,
        response=PAYMENT_TYPE,
    ),
    Route(
        "DELETE",
        "/payment-types/{id}",
        deactivate_payment_type,
        "Deactivate a payment type",
        "payment-types",
        "admin",
        response=PAYMENT_TYPE,
    ),
]
