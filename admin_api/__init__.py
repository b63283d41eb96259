"""The JSON API for cooperatives, an aiohttp sub-app mounted at /v1."""

from __future__ import annotations

from aiohttp import web

from admin_api.errors import error_middleware
from admin_api.openapi import DOCUMENT, build_document
from admin_api.routing import RATE_MULTIPLIER, Route, rate_multiplier, register
from core.config import Settings


def all_routes() -> list[Route]:
    """Every route of the API, in matching order (fixed paths before {id} patterns)."""
    from admin_api import (
        audit,
        auth_routes,
        callbacks,
        cooperatives,
        disputes,
        jobs,
        members,
        messages,
        openapi,
        payment_types,
        payments,
        provider_callbacks,
        refunds,
        reports,
        users,
        webhooks,
    )

    return [
        *auth_routes.ROUTES,
        *payments.ROUTES,
        *refunds.ROUTES,
        *payment_types.ROUTES,
        *cooperatives.ROUTES,
        *members.ROUTES,
        *messages.ROUTES,
        *callbacks.ROUTES,
        *disputes.ROUTES,
        *reports.ROUTES,
        *audit.ROUTES,
        *webhooks.ROUTES,
        *jobs.ROUTES,
        *provider_callbacks.ROUTES,
        *users.ROUTES,
        *openapi.ROUTES,
    ]


def create_admin_app(settings: Settings) -> web.Application:
    app = web.Application(middlewares=[error_middleware])
    routes = all_routes()
    app[RATE_MULTIPLIER] = rate_multiplier(settings.extra)
    app[DOCUMENT] = build_document(routes)
    register(app, routes)
    return app


__all__ = ["all_routes", "create_admin_app"]
