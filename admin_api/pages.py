"""Browser pages on the main app: the phone simulator (/simulator) and the operations page (/ops)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from aiohttp import web
from sqlalchemy import or_, select

from admin_api.errors import timestamp
from core import auth
from core.errors import DomainError, status_code
from core.models import Cooperative, Payment, PaymentType
from core.references import REFERENCE_SHAPE
from core.runtime import RUNTIME, SETTINGS
from core.text import has_bad_characters, is_number, is_uuid

log = logging.getLogger("gateway.pages")

STATIC_DIR = Path(__file__).resolve().parent / "static"
_TYPES = {".html": "text/html", ".css": "text/css", ".js": "text/javascript", ".svg": "image/svg+xml"}
OPS_FILES = frozenset({"ops.html", "ops.css", "ops.js"})
PHONE_FILES = frozenset({"phone.html", "phone.css", "phone.js"})
# Everything the pages load comes from this origin: no inline script, no CDN, no external font.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; "
    "script-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
OPS_ROLES = frozenset({auth.SUPER_ADMIN, auth.COOP_ADMIN})
PAGES_ENABLED = web.AppKey("phone_simulator_enabled", bool)
# How many /ops/data reads one process makes at once; the others wait their turn. Each reads a day of payments, SMS,
# sessions, jobs and deliveries on a pooled connection, and the page is outside /v1's rate limits: one admin's token
# sending a few hundred at once took every connection, and USSD hops, provider callbacks and the API waiting for one
# were answered "unavailable". An open page asks every 4 s: a few tabs of many admins still read at once.
OPS_READS_AT_ONCE = 4
OPS_READS = web.AppKey("ops_reads", asyncio.Semaphore)
# Query values are checked before any query: PostgreSQL refuses a NUL in text outright (asyncpg raises, a
# 500), and an id that is not a UUID cannot exist. The same checks as /v1 (admin_api.validation).
MAX_REFERENCE = 128


def simulator_enabled(settings: Any, env: dict[str, str] | None = None) -> bool:
    """The phone page exists with the in-process simulators, or when explicitly switched on."""
    if bool(settings.simulators_in_process) or settings.extra.get("phone_simulator_enabled", False):
        return True
    return env is not None and env.get("PHONE_SIMULATOR_ENABLED", "") == "1"


def setup_pages(app: web.Application) -> None:
    """Register /simulator (when enabled), /ops, /ops/data and /static/{name} on the main app."""
    settings = app[SETTINGS]
    enabled = simulator_enabled(settings)
    app[PAGES_ENABLED] = enabled
    app[OPS_READS] = asyncio.Semaphore(OPS_READS_AT_ONCE)
    app.router.add_get("/ops", ops_page)
    app.router.add_get("/ops/", ops_page)
    app.router.add_get("/ops/data", ops_data)
    app.router.add_get("/static/{name}", static_file)
    if enabled:
        app.router.add_get("/simulator", phone_page)
        app.router.add_get("/simulator/", phone_page)
        app.router.add_get("/simulator/config", simulator_config)
        app.router.add_get("/simulator/phones", simulator_phones)
        app.router.add_get("/simulator/payment", simulator_payment)
        log.info("phone simulator page enabled", extra={"path": "/simulator"})


# --- files ------------------------------------------------------------------------------------------


def _file(name: str) -> web.Response:
    path = STATIC_DIR / name
    if not path.is_file():
        raise web.HTTPNotFound(text="not found")
    content_type = _TYPES.get(path.suffix, "application/octet-stream")
    return web.Response(
        body=path.read_bytes(), headers={**SECURITY_HEADERS, "Content-Type": f"{content_type}; charset=utf-8"}
    )


async def static_file(request: web.Request) -> web.Response:
    # A fixed list of names: no path from the request ever reaches the filesystem.
    name = request.match_info["name"]
    if name in OPS_FILES or (name in PHONE_FILES and request.app[PAGES_ENABLED]):
        return _file(name)
    raise web.HTTPNotFound(text="not found")


async def phone_page(_request: web.Request) -> web.Response:
    return _file("phone.html")


async def ops_page(_request: web.Request) -> web.Response:
    return _file("ops.html")


# --- phone simulator JSON ---------------------------------------------------------------------------


def _phones() -> list[dict[str, str]]:
    from core.demo import DEMO_MEMBERS
    from core.phone import network_code_of

    # Each phone's network as Africa's Talking reports it (the USSD menu offers the method of the network's operator).
    return [
        {"phone": phone, "name": name, "unit": unit, "language": language, "does": what,
         "network": network_code_of(phone)}
        for name, phone, unit, language, what in DEMO_MEMBERS
    ]


def _same_origin_path(settings: Any, url: str) -> str | None:
    """A simulator the page can reach: a path on this service, else None (cross-origin calls are refused)."""
    base = settings.public_base_url.rstrip("/")
    if url.startswith(base + "/"):
        return url[len(base) :].rstrip("/")
    return None


async def simulator_phones(_request: web.Request) -> web.Response:
    return web.json_response({"phones": _phones()}, headers={"Cache-Control": "no-cache"})


async def simulator_config(request: web.Request) -> web.Response:
    """What the phone page needs: the USSD code, the callback URL (with its secret) and the simulators."""
    settings = request.app[SETTINGS]
    ussd_url = "/ussd/africastalking"
    secret = settings.callback_secrets.get("africastalking")
    if secret:
        # Only served while the simulator is enabled: the page plays the aggregator, so it needs the secret.
        ussd_url += "?" + urlencode({"secret": secret.get()})
    providers = {
        name: _same_origin_path(settings, config.base_url) for name, config in settings.providers.items()
    }
    sms = _same_origin_path(settings, settings.sms_base_url)
    return web.json_response(
        {
            "serviceCode": settings.ussd_service_code,
            "ussdUrl": ussd_url,
            "networkCode": "63510",
            "providers": {name: path for name, path in providers.items() if path},
            "smsInbox": f"{sms}/_inbox/" if sms else None,
            "phones": _phones(),
        },
        headers={"Cache-Control": "no-cache"},
    )


async def simulator_payment(request: web.Request) -> web.Response:
    """A payment seen from the phone: by our reference or the provider's, to word the PIN prompt."""
    reference = request.query.get("reference", "").strip()
    if not reference or len(reference) > MAX_REFERENCE:
        return _error(request, 400, f"reference query parameter is required (at most {MAX_REFERENCE} characters)")
    if has_bad_characters(reference):
        return _error(request, 400, "reference contains characters that are not allowed")
    # Ours has a fixed shape (compared in capitals: typed on a phone); the providers' are theirs to choose.
    matches = [Payment.provider_reference == reference, Payment.gateway_reference == reference]
    if REFERENCE_SHAPE.match(reference.upper()):
        matches.append(Payment.reference == reference.upper())
    rt = request.app[RUNTIME]
    async with rt.sessionmaker() as session:
        row = (
            await session.execute(
                select(Payment, Cooperative.name, PaymentType.name)
                .join(Cooperative, Cooperative.id == Payment.cooperative_id)
                .join(PaymentType, PaymentType.id == Payment.payment_type_id)
                .where(or_(*matches))
                .order_by(Payment.created_at.desc())
                .limit(1)
            )
        ).first()
    if row is None:
        return _error(request, 404, "no payment with that reference")
    payment, cooperative, payment_type = row
    return web.json_response(
        {
            "reference": payment.reference,
            "status": payment.status,
            "amountMinor": payment.amount_minor,
            "currency": payment.currency,
            "method": payment.method,
            "provider": payment.provider,
            "cooperative": cooperative,
            "paymentType": payment_type,
            "failureReason": payment.failure_reason,
        },
        headers={"Cache-Control": "no-cache"},
    )


# --- operations data --------------------------------------------------------------------------------


def _error(request: web.Request, status: int, message: str, code: str | None = None) -> web.Response:
    """The API's error shape, with `code`: the refusal's (an expired token's TOKEN_EXPIRED), else its status's."""
    reason = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found"}.get(
        status, "Error"
    )
    headers = {"WWW-Authenticate": 'Bearer realm="ops"'} if status == 401 else None
    return web.json_response(
        {
            "statusCode": status,
            "message": message,
            "error": reason,
            "code": code or status_code(status),
            "timestamp": timestamp(),
            "path": request.path,
        },
        status=status,
        headers=headers,
    )


def principal_from_request(request: web.Request) -> tuple[auth.Principal, dict[str, Any]]:
    """The caller of /ops/data and its token's claims: a valid access JWT (Authorization: Bearer) or
    core.auth.Unauthorized. (Its revocation is checked by the caller: auth.check_token.)"""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise auth.Unauthorized("a Bearer access token is required")
    settings = request.app[SETTINGS]
    claims = auth.decode_token(token.strip(), secret=settings.jwt_secret.get(), previous=settings.jwt_previous,
                               expected_type="access")
    return auth.principal_from_access(claims), claims


async def ops_data(request: web.Request) -> web.Response:
    """core.ops.dashboard for an admin: a cooperative admin sees only their cooperative."""
    from channels.sms.sender import NAME as SMS_AGGREGATOR
    from core.ops import dashboard
    from providers.health import shown

    rt = request.app[RUNTIME]
    try:
        principal, claims = principal_from_request(request)
        async with rt.sessionmaker() as session:  # a deactivated account's token is refused here too
            await auth.check_token(rt.redis, session, principal, claims)
    except DomainError as exc:
        return _error(request, 401, str(exc) or "unauthorized", exc.code if exc.status == 401 else None)
    if principal.role not in OPS_ROLES:
        return _error(request, 403, "the operations page is for super admins and cooperative admins")
    requested = request.query.get("cooperativeId", "").strip() or None
    if requested is not None:
        if has_bad_characters(requested):
            return _error(request, 400, "cooperativeId contains characters that are not allowed")
        if not is_uuid(requested):
            return _error(request, 400, "cooperativeId must be a UUID")
        requested = requested.lower()
    if principal.is_super:
        cooperative_id = requested
    else:
        if requested and requested != principal.cooperative_id:
            return _error(request, 404, "cooperative not found")
        cooperative_id = principal.cooperative_id
    minutes_raw = request.query.get("minutes", "60").strip()
    # The length first: int() of thousands of digits raises (Python's conversion limit) rather than answer.
    if len(minutes_raw) > 4 or not is_number(minutes_raw) or not 1 <= int(minutes_raw) <= 1440:
        return _error(request, 400, "minutes must be an integer from 1 to 1440")
    async with request.app[OPS_READS], rt.sessionmaker() as session:
        health = await shown(rt.redis, [*rt.providers, *([SMS_AGGREGATOR] if rt.sms is not None else [])])
        figures = await dashboard(session, cooperative_id, minutes=int(minutes_raw), redis=rt.redis,
                                  provider_health=health)
        scope = "all cooperatives"
        if cooperative_id:
            coop = await session.get(Cooperative, cooperative_id)
            if coop is None:
                return _error(request, 404, "cooperative not found")
            scope = coop.name
    figures["scope"] = {
        "cooperativeId": cooperative_id,
        "name": scope,
        "role": principal.role,
        "minutes": int(minutes_raw),
    }
    return web.json_response(figures, headers={"Cache-Control": "no-store"})
