"""Shared pieces of the API: timestamps, money on the wire, paging, JSON answers and schema fragments."""

from __future__ import annotations

import json
import math
from typing import Any

from aiohttp import web
from sqlalchemy import Select, func, select

from admin_api.routing import Ctx
from core.db import iso_z
from core.errors import NotFound
from core.models import Cooperative
from core.money import Money

ID = {"type": "string", "format": "uuid"}
DATETIME = {"type": "string", "format": "date-time"}
NULL_DATETIME = {"type": ["string", "null"], "format": "date-time"}
NULL_STRING = {"type": ["string", "null"]}
# Major units: an integer for currencies without minor units (RWF), a decimal string otherwise.
AMOUNT_OUT = {"type": ["integer", "string"]}
AMOUNT_IN = {"type": ["integer", "number", "string"], "description": "major units, e.g. 50000 RWF"}

META = {
    "type": "object",
    "required": ["page", "limit", "total", "totalPages", "hasNext", "hasPrevious"],
    "additionalProperties": False,
    "properties": {
        "page": {"type": "integer"},
        "limit": {"type": "integer"},
        "total": {"type": "integer"},
        "totalPages": {"type": "integer"},
        "hasNext": {"type": "boolean"},
        "hasPrevious": {"type": "boolean"},
    },
}
ERROR = {
    "type": "object",
    "required": ["statusCode", "message", "error", "timestamp", "path"],
    "properties": {
        "statusCode": {"type": "integer"},
        "message": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
        "error": {"type": "string"},
        "timestamp": DATETIME,
        "path": {"type": "string"},
    },
}


def obj(
    properties: dict[str, Any],
    required: list[str] | None = None,
    *,
    strict: bool = True,
    min_properties: int | None = None,
) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": not strict}
    if required:
        schema["required"] = required
    if min_properties:
        schema["minProperties"] = min_properties
    return schema


def out(properties: dict[str, Any]) -> dict[str, Any]:
    """A response schema: every listed field is always present."""
    return {"type": "object", "properties": properties, "required": list(properties)}


def out_plus(schema: dict[str, Any], **extra: dict[str, Any]) -> dict[str, Any]:
    """`schema` with more always-present fields (e.g. a secret shown once, at creation)."""
    return out({**schema["properties"], **extra})


def out_only(schema: dict[str, Any], *names: str) -> dict[str, Any]:
    """The same response schema cut down to `names` (a smaller view of the same object)."""
    return out({name: schema["properties"][name] for name in names})


def page_of(item: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["data", "meta"],
        "properties": {"data": {"type": "array", "items": item}, "meta": META},
    }


iso = iso_z  # every timestamp the API writes (core.db.iso_z: the webhooks' event data use the same)


def money_out(minor: int, currency: str) -> int | str:
    return Money(minor, currency).to_api()


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda v: json.dumps(v, separators=(",", ":")))


def meta(page: int, limit: int, total: int) -> dict[str, Any]:
    pages = math.ceil(total / limit) if total else 0
    return {
        "page": page,
        "limit": limit,
        "total": total,
        "totalPages": pages,
        "hasNext": page < pages,
        "hasPrevious": page > 1,
    }


async def paged(ctx: Ctx, query: Select[Any], present: Any) -> web.Response:
    """Count, fetch one page and present it with the seed's meta block."""
    page, limit = ctx.query["page"], ctx.query["limit"]
    total = (
        await ctx.session.execute(select(func.count()).select_from(query.order_by(None).subquery()))
    ).scalar_one()
    rows = (await ctx.session.execute(query.offset((page - 1) * limit).limit(limit))).scalars().all()
    return json_response({"data": [present(r) for r in rows], "meta": meta(page, limit, int(total))})


async def target_cooperative(ctx: Ctx, requested: str | None) -> Cooperative:
    """The cooperative a write goes to (the caller's own, or the one a super admin names), loaded."""
    coop_id = ctx.who.target_cooperative(requested)
    coop = (
        await ctx.session.execute(
            ctx.who.scope(select(Cooperative).where(Cooperative.id == coop_id), Cooperative)
        )
    ).scalar_one_or_none()
    if coop is None:
        raise NotFound("cooperative not found")
    return coop


async def one(ctx: Ctx, model: Any, entity_id: str, what: str) -> Any:
    """Fetch one row through the caller's scope; anything outside it is simply not found."""
    from admin_api.validation import check_path_id

    entity_id = check_path_id(entity_id, what)
    row = (
        await ctx.session.execute(ctx.who.scope(select(model).where(model.id == entity_id), model))
    ).scalar_one_or_none()
    if row is None:
        raise NotFound(f"{what} not found")
    return row
