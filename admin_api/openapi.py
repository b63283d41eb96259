"""The OpenAPI 3.1 document, generated from the route table so no route can be left out, and its page."""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web

from admin_api import webhook_events
from admin_api.common import ERROR
from admin_api.routing import IDEMPOTENCY_KEY_HEADER, Ctx, Route
from core.auth import OWN_PAYMENTS
from core.errors import CODES

PREFIX = "/v1"
_ERRORS = {
    400: "Invalid request: message lists every field the request's shape check refuses (checks against stored "
         "data, such as the account number or the price, follow one at a time)",
    401: "Missing or invalid credentials",
    403: "Not allowed for this caller: message says why (an API key told the scope it lacks, super admins only, "
         "not open to tenants)",
    404: "Not found (or not visible to this caller)",
    408: "The request body did not arrive within 10 seconds; nothing was changed, send it again",
    409: "Conflict",
    413: "Body too large",
    415: "Unsupported content type",
    422: "Business rule refused",
    429: "Too many requests",
    503: "A dependency is unavailable; nothing was changed, send it again",
}
# The codes (core.errors.CODES) an error answer of each status may carry: each code's text starts with its statuses.
_CODES_OF = {status: [code for code, text in CODES.items() if str(status) in text.partition(":")[0]]
             for status in _ERRORS}
# The rate limit's headers, on every answer of a limited route (admin_api.errors.apply_rate_headers).
_RATE_HEADERS = {
    "X-RateLimit-Limit": "requests allowed per window to this caller on this route",
    "X-RateLimit-Remaining": "how many more are allowed right now",
    "X-RateLimit-Reset": "when the next request is allowed if nothing more is sent, in epoch seconds (not seconds "
                         "to wait: Retry-After on a 429)",
}
_SCOPE_TEXT = {
    "super": "super admin only",
    "admin": "cooperative admin, super admin, or API key with admin",
    "payments:read": "payments:read",
    "payments:write": "payments:write",
}

# The Access line of a route no API key may call (Route.keys False), whatever the key's scopes.
_SIGNED_IN_TEXT = {
    "admin": "cooperative admin or super admin, signed in (an API key is refused, 403, whatever its scopes)",
    "payments:read": "a signed-in user (an API key is refused, 403)",
}


def _access_text(route: Route) -> str:
    scope = route.scope or ""
    if not route.keys:
        return _SIGNED_IN_TEXT[scope]
    if route.also_scope:  # both needed (POST /disputes: a key with payments:write alone is refused)
        return f"{_SCOPE_TEXT[scope]} and {_SCOPE_TEXT[route.also_scope]} (a key needs both)"
    if route.own_scope == OWN_PAYMENTS:  # what payments:write implies (auth.IMPLIED_SCOPES)
        return f"{_SCOPE_TEXT[scope]}, or payments:write for the payments that key made (any other is 404)"
    return _SCOPE_TEXT.get(scope, "public")


# What a route's one-line summary cannot say, added to its description (by operationId).
_NOTES = {
    "replay": "409 naming the job's status when it is not PARKED (PENDING: an earlier replay took; DISCARDED: "
              "given up on, never run again).",
    "discard": "For a job whose replay could only park again (a poison job: an SMS whose template is gone, a "
               "payload no release reads). It becomes DISCARDED: never run again (a replay is refused), no longer "
               "counted as parked (gateway_outbox_depth{status=\"PARKED\"}, the ops page), pruned as long after "
               "as DONE jobs (RETENTION_OUTBOX_DONE_DAYS); lastError starts \"discarded by an admin: <reason>\". "
               "Audited (job.discarded: the reason, the status and attempts before). What the job is about is "
               "given up with it: a still-QUEUED SMS becomes FAILED (Skipped, never sent), a still-PENDING webhook "
               "delivery FAILED (audited, webhook_delivery.discarded). A payment is never ended by a discard: its "
               "polls go on asking its provider (the payment sweep queues a new poll while it is open), so a "
               "payment's collect or poll is refused (409) only when nothing would ask any more (its provider not "
               "in PROVIDERS): record its outcome instead. A refund's submission or poll is refused (409) while "
               "the refund is PENDING or PROCESSING: record its outcome or withdraw it, which settles its jobs. "
               "409 naming the job's status when it is not PARKED. Who may: as for a replay (the caller's "
               "cooperative's jobs; a job of no cooperative, a super admin).",
    "discard_many": "The parked jobs POST /v1/jobs/replay's filters choose, each discarded as POST "
                    "/v1/jobs/{id}/discard does (one job.discarded line each), in turn: one refused stays PARKED and "
                    "is listed in skipped with the 409's code and reason (a refund's while its refund is open). "
                    "more: true says call again, with afterId the answer's lastId.",
    "update_member": "phone corrects the member's number (read in the cooperative's country, as on create): her "
                     "history stays, the old number's STOP is forgotten once no membership holds it and the new "
                     "one keeps its own (held at send time, not shown); 409 if another member of the cooperative "
                     "has it or the number was released. phoneChange (only with phone, 400 otherwise) says why: "
                     "NEW_SIM (the default) keeps her remindersOptOut (a STOP she sent is hers, not her SIM's); "
                     "TYPO (the old number was never hers, and a STOP from it was its holder's) resets it to "
                     "false. A USSD session of the old number still open can no longer act as her. The audit "
                     "row says which of name and unit changed, not their values, shows numbers masked, and "
                     "remindersOptOut before and after when it changed.",
    "erase_member": "For a member who asked to be erased. Only a SUSPENDED member (409 otherwise), none of whose "
                    "payments or refunds is still PENDING or PROCESSING (409: erase once they settle; 409 "
                    "CONCURRENT_CHANGE, nothing erased, when disputes of her payments were opened and held by "
                    "others meanwhile, 3 times over: send it again). Her name, "
                    "unit and number are replaced on her record (\"Erased member\", no unit, phone \"erased\"; "
                    "the number is released as by release-phone); on her payments the account number is cleared "
                    "(paymentAccount no longer finds them; shown as \"erased\") while amounts, references, "
                    "provider transaction ids and statuses stay, and the free text written on them, which may "
                    "name her, goes (description null; a review's note and an admin's note in failureReason "
                    "\"[note erased]\"; their refunds' reason null; on their disputes each note's text and "
                    "evidence and the resolution \"[note erased]\", but a resolution that is the gateway's own "
                    "word, the status it was closed with, e.g. \"rejected\"), and so does each webhook event stored "
                    "about them "
                    "(its delivery rows and queued event: one not yet sent, or replayed later, is sent so, under the "
                    "same event id); on her SMS rows the number and text are cleared "
                    "(one not yet sent is not sent); her tenant logins are deactivated and their usernames "
                    "replaced by erased-<id>. A refund of her payments can afterwards only be recorded as "
                    "returnedByProvider. Cannot be undone; calling it again changes nothing. The audit row "
                    "(member.erased) names her by id only; audit rows written before this release keep the "
                    "values they held (the audit log is append-only).",
    "record_statement_payment": "For money a provider's statement shows taken that no payment holds: a payment "
                                "lost when the database was restored from a backup (the member holds its receipt, "
                                "the cooperative's system its payment.completed webhook), or money no request "
                                "asked for. Nothing is sent to the provider: the payment is COMPLETED at once, "
                                "collected at amount, dated completedAt (the reconciliation's settled figures "
                                "count it in that period, and name it in paymentsRecordedLater once that period "
                                "has ended), channel recorded; without a reference, a new one dated the day of "
                                "completedAt in the cooperative's time zone (as the member's receipt shows it). "
                                "Audited payment.recorded (the note) and payment.completed, by the caller; the "
                                "payment.completed webhook event is queued; the payer's receipt SMS only with "
                                "sendReceipt. Refused as POST /v1/payments refuses the same fields where money taken "
                                "must still fit (the type's currency, the provider's, the payer's country and "
                                "operator; not the type's price or state nor the member's status, which do not undo "
                                "a payment made), and: completedAt in the future or more than "
                                "RECORDED_PAYMENT_MAX_AGE_DAYS (400 by default) ago, a reference not dated with a "
                                "real day (400, naming the field), a member of another cooperative (404), a "
                                "providerTransactionId a payment of that provider holds, a reference or id a "
                                "payment has, a callbackId already resolved, of another provider or not saying "
                                "money was taken (409). The same request under its idempotencyKey answers the "
                                "payment it recorded (201, Idempotent-Replayed); another request under it, or under "
                                "a key a POST /v1/payments used, is a 409.",
    "transition_dispute": "A dispute closed already (RESOLVED, REJECTED, WITHDRAWN; another admin's resolution "
                          "that got there first) takes no further move or note: 409 INVALID_STATE saying who closed "
                          "it (a super admin's login reads 'a super admin' to a cooperative's admin; a staff login "
                          "or key reads 'gateway staff' to an API key), when and how (its resolution, the refund it "
                          "was resolved with), nothing changed; a payment contested again gets a new dispute. 422 "
                          "for a dispute under review sent back to OPEN, or sent its own status without a note or "
                          "evidence. The same request sent again under its idempotencyKey (the dispute's) answers "
                          "200 with the dispute as it is now (Idempotent-Replayed), closed since or not: nothing "
                          "noted, refunded or told again; another request under it is 409 IDEMPOTENCY_KEY_REUSED.",
    "give_gateway_reference": "Only for a payment recorded with POST /v1/payments/recorded without the request "
                              "that took its money (channel recorded, gatewayReference starting recorded:): 409 for "
                              "any other payment, and for one whose gatewayReference is known already (it is not "
                              "changed). 409 if a payment of the provider holds the reference (another "
                              "cooperative's is not named; one of the cooperative is, with its status and what that "
                              "makes true of the request's money: recorded there, or, for a FAILED, VOIDED, "
                              "timed-out or open one, not, and what to do). Nothing is sent to the provider; audited "
                              "payment.gateway_reference_set by the caller. A refund through MTN MoMo, refused "
                              "before (409), can then be sent.",
    "update_endpoint": "url and events (at least one) are checked as at registration: the event list; https (or http "
                       "to an address of the operator's WEBHOOK_PRIVATE_NETWORKS), no credentials, a domain "
                       "approved for the cooperative (403 otherwise). Deliveries still "
                       "pending (retrying, or held while the endpoint is switched off after failures) of an event "
                       "it no longer gets (neither asked for nor following one asked for) are given up: FAILED, "
                       "as DELETE gives up all of them, and not sent again if the event is added back. The others "
                       "stay pending and go to the URL as it is when each is sent. A new URL starts a new count of "
                       "consecutiveFailures; the status is kept (one switched off stays off until enabled). Audited "
                       "webhook_endpoint.updated, url and events before and after (never the secret). 409 for an "
                       "endpoint that was DELETEd (enable it first), or for a url another ACTIVE endpoint of the "
                       "cooperative has (as at registration).",
    "create_endpoint": "409 when an ACTIVE endpoint of the cooperative has the url already (scheme and host in any "
                       "case, an IP address in any written form, the default port, a trailing slash: the same url), "
                       "its id in the message: each event goes to every endpoint, so a second one would be sent "
                       "everything twice. A registration retried after a lost answer gets that 409: rotate the "
                       "endpoint's secret if it was lost. A DELETEd endpoint's url may be registered again.",
    "rotate_secret": "409 for an endpoint that was DELETEd: enable it first.",
    "enable_endpoint": "409 when another ACTIVE endpoint of the cooperative has its url (registered since it was "
                       "deleted), or no room is left for it.",
    "list_payments": "Without updatedFrom or after: pages of payments newest first (createdAt, then id), by page "
                     "and limit. A payment made while you page goes on top and moves every row down one: paging a "
                     "period still open (this month), give a `to` fixed when you read the first page (a few "
                     "seconds before it) and keep it for every page, so none is listed twice or skipped; a period "
                     "that has ended gets no new payments. With basis=completed the period and the pages go by "
                     "completedAt (then id), and only payments whose money moved are listed: a payment asked for "
                     "on 31 October and paid on 1 November is November's, as in the reconciliation's `settled` "
                     "section and payments.csv?basis=completed (which also leaves out what no longer holds money, "
                     "a voided recording: here `status` says so). A fixed `to` holds those pages less well: money "
                     "is dated by the provider's time, or the statement's for a recording, which can fall before "
                     "it. To read every change as it happens, sync with updatedFrom and after instead (basis then "
                     "only chooses the period's payments; the cursor goes by the changes).",
    # What a treasurer reads in a file: the columns (their names in the header line, in this order), which are UTC
    # and which the cooperative's days, and the rows' order (core.reports.PAYMENT_COLUMNS, REFUND_COLUMNS).
    "payments_csv": "One row per payment, oldest first (by createdAt, or completedAt with basis=completed, then id). "
                    "Columns: `id`, `reference`, `createdAt` (asked for) and `completedAt` (money taken; empty if "
                    "never) as UTC instants (2026-11-30T22:30:00Z is 00:30 on 1 December in Kigali), `status` (now), "
                    "`paymentMethod`, `amount` (asked for), `currency`, `fee`, `refundedAmount` (refunded so far, "
                    "whenever), `collectedAmount` (what the provider took and the payment still holds, 0 if none: "
                    "the payment's JSON and webhook data's `collectedAmount`), "
                    "`paymentTypeId`, `paymentType` (its name), `memberId`, `paymentAccount` (masked), "
                    "`gatewayReference`, `gatewayTransactionId` (the provider's id of the money), `channel`, "
                    "`mismatch`, `late`, `description`, `provider`, `createdLocalDate` and `completedLocalDate` "
                    "(YYYY-MM-DD in the row's cooperative's time zone: the day the period's bare dates count it "
                    "in), `memberName`, `cooperativeShortCode`, `failureReason`. Amounts in major units of "
                    "`currency`, as in the JSON (50000 RWF, 1500.00 KES).",
    "dues_report": "For the treasurer's question \"who has not paid November's rent yet?\": "
                   "/v1/reports/dues?paymentTypeId=<rent>&period=2026-11-01&status=UNPAID. A payment counts toward "
                   "the period as the reminders count it (core.reminders.PaidFor): the money kept by the member's "
                   "payments of it, in the type's currency, against the type's price. Amounts in major units of the "
                   "type's currency, as in every report. Read when asked: a payment completed or refunded since "
                   "changes a closed period's lines.",
    "dues_csv": "The lines of GET /v1/reports/dues (same query; every line, no pages), in the same order (by name, "
                "then member id). Columns: `memberId`, `name`, `unit`, `status`, `currency`, `amountDue`, "
                "`amountPaid`, `amountAwaitingApproval`, `amountOutstanding` (major units of `currency`, as in the "
                "JSON), `lastPaymentAt` (UTC; empty when none), `dueDate` (the period's, YYYY-MM-DD local). "
                "`delimiter`, `excel` and `bom` as the other exports (`excel`: a unit of digits only is written as "
                "text).",
    "refunds_csv": "One row per refund, oldest first (by createdAt, or completedAt with basis=completed, then id). "
                   "Columns: `id`, `reference`, `paymentId`, `paymentReference`, `createdAt` (asked for) and "
                   "`completedAt` (paid back; empty if not) as UTC instants, `status` (now), `amount`, `currency`, "
                   "`reason`, `failureReason`, `disputeId`, `provider` (its payment's), `createdLocalDate` and "
                   "`completedLocalDate` (YYYY-MM-DD in the row's cooperative's time zone: the day the period's bare "
                   "dates count it in), `providerTransactionId`, `returnedByProvider` (true: a chargeback recorded, "
                   "never sent), `memberName`, `cooperativeShortCode`. Amounts in major units of `currency`, as in "
                   "the JSON.",
    "list_audit_events": "A tenant's acts through the API (her payments, disputes, her own password) are the "
                         "member's, actor member:<member id> with channel api, as her USSD acts are with channel "
                         "ussd; admin:<id> is a staff login's. Rows written before this release name a tenant's "
                         "acts admin:<her user id> (the audit log is append-only). Sign-ins: user.signed_in for "
                         "each one, the account itself as the actor (admin:<user id>, a tenant's member:<member "
                         "id>); user.locked_out (actor system) when wrong passwords for an account fill a sign-in "
                         "limit, after {per: address (10 a minute from one address) | account (100 an hour across "
                         "addresses), failedAttempts, windowSeconds}. Never the password tried; a username that "
                         "names no account is not audited. Ending an account's sessions: user.deactivated, "
                         "user.password_reset, user.password_changed, user.sessions_ended (its cooperative or "
                         "member suspended).",
}


def _operation(route: Route) -> dict[str, Any]:
    params: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in re.findall(r"{(\w+)}", route.path)
    ]
    params += [
        {"name": name, "in": "query", "required": p.required, "description": p.description, "schema": p.schema()}
        for name, p in route.query.items()
    ]
    if "idempotencyKey" in (route.body or {}).get("properties", {}):
        params.append({"name": IDEMPOTENCY_KEY_HEADER, "in": "header", "required": False,
                       "description": "the idempotency key, as the body's idempotencyKey (which it stands for when "
                                      "the body has none; both given: the same key, else 400 VALIDATION_FAILED "
                                      "naming both, nothing made)",
                       "schema": {"type": "string", "minLength": 8, "maxLength": 128}})
    rate = route.effective_limit()
    headers = {h: {"description": text, "schema": {"type": "integer"}} for h, text in _RATE_HEADERS.items()}
    if route.produces == "application/json":
        content = {"application/json": {"schema": dict(route.response or {"type": "object"})}}
    else:
        content = {route.produces: {"schema": {"type": "string"}}}
    success_headers: dict[str, Any] = dict(headers)
    if "idempotencyKey" in (route.body or {}).get("properties", {}):
        # A replay answers 201 as the first request did; only this header tells the two apart.
        success_headers["Idempotent-Replayed"] = {
            "description": "\"true\" when this answers an earlier request with the same idempotency key "
                           "(nothing new was made); absent otherwise. A replay is answered even past the rate "
                           "limit and is not counted towards it",
            "schema": {"type": "string", "enum": ["true"]},
        }
    responses: dict[str, Any] = {
        str(route.status): {"description": "Success", "headers": success_headers, "content": content}
    }
    errors = sorted(_ERRORS) if route.scope is not None else [400, 401, 404, 408, 413, 415, 429, 503]
    if route.handler in (openapi_json, docs_page):
        errors.remove(503)  # reads nothing: neither the database nor Redis
    for status in errors:
        responses[str(status)] = {
            "description": f"{_ERRORS[status]} (code: {', '.join(_CODES_OF[status])})",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
    if "503" in responses:  # an outage, nothing changed (admin_api.errors._error_answer)
        responses["503"]["headers"] = {"Retry-After": {
            "description": "whole seconds to wait before sending the same request again (with the same "
                           "idempotency key it never doubles a payment)", "schema": {"type": "integer", "minimum": 1}}}
    if "429" in responses:  # the rate limit's refusal (admin_api.errors.apply_rate_headers)
        responses["429"]["headers"] = {**headers, "Retry-After": {
            "description": "whole seconds to wait: the next request is allowed then if nothing more is sent (a "
                           "refused request is not counted)", "schema": {"type": "integer", "minimum": 1}}}
    op: dict[str, Any] = {
        "operationId": route.name,
        "summary": route.summary,
        "tags": [route.tag],
        "parameters": params,
        "responses": responses,
        "description": (
            f"Access: {_access_text(route)}"
            f"{'; tenants see only their own' if route.tenants else ''}. "
            f"Rate limit: {rate.count}/{rate.window}s per caller."
            f"{' ' + _NOTES[route.name] if route.name in _NOTES else ''}"
        ),
        "security": [] if route.scope is None else [{"bearerAuth": []}] + ([{"apiKey": []}] if route.keys else []),
    }
    if route.body is not None:
        op["requestBody"] = {"required": not route.body_optional,
                             "content": {"application/json": {"schema": dict(route.body)}}}
    elif route.raw_body:
        raw: dict[str, Any] = {route.raw_body: {"schema": {"type": "string"}}}
        if route.raw_body == "text/csv":  # or the file in a form (admin_api.members._uploaded_file)
            raw["multipart/form-data"] = {"schema": {"type": "object", "required": ["file"], "properties": {
                "file": {"type": "string", "format": "binary"}}}}
        op["requestBody"] = {"required": True, "content": raw}
    return op


def build_document(routes: list[Route], server_url: str = PREFIX) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(PREFIX + route.path, {})[route.method.lower()] = _operation(route)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Cooperative payment gateway API",
            "version": "1.0.0",
            "description": "Payments, payment types, members, refunds, disputes, reports and webhooks "
            "for cooperatives. Amounts are in major units of the cooperative's currency: an integer for a "
            "currency without minor units (RWF, UGX: 50000 is 50,000 RWF), otherwise a decimal string with "
            "the currency's decimal places (KES: \"1500.00\" is 1,500 shillings). Requests may send an "
            "integer or a decimal string in any currency (1500 or \"1500.50\" KES); a fraction the currency "
            "does not have is refused.",
        },
        "servers": [{"url": "/"}],
        "paths": paths,
        # What the gateway POSTs to cooperatives' registered endpoints (an OpenAPI 3.1 section).
        "webhooks": webhook_events.webhooks(),
        "components": {
            "schemas": {"Error": ERROR, **webhook_events.SCHEMAS},
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            },
        },
    }


DOCUMENT = web.AppKey("openapi_document", dict)

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Cooperative payment gateway API</title>
<style>body{font-family:system-ui,sans-serif;margin:2rem;max-width:70rem}h2{margin-top:2rem}
.op{border:1px solid #ccc;border-radius:6px;margin:.5rem 0;padding:.5rem}
.m{font-weight:bold;display:inline-block;width:5rem}.GET{color:#0a6}.POST{color:#06c}.PATCH{color:#a60}.DELETE{color:#c00}pre{background:#f6f6f6;
padding:.5rem;overflow:auto;font-size:.8rem}summary{cursor:pointer}</style></head>
<body><h1>Cooperative payment gateway API</h1>
<p id="intro">Loading <a href="openapi.json">openapi.json</a>...</p>
<div id="ops"></div>
<script>
fetch("openapi.json").then(r => r.json()).then(doc => {
  document.getElementById("intro").textContent = doc.info.description;
  const byTag = {};
  for (const [path, item] of Object.entries(doc.paths)) {
    for (const [method, op] of Object.entries(item)) {
      (byTag[op.tags[0]] = byTag[op.tags[0]] || []).push([method.toUpperCase(), path, op]);
    }
  }
  for (const [event, item] of Object.entries(doc.webhooks || {})) {
    for (const [method, op] of Object.entries(item)) {
      (byTag["webhooks sent to your endpoints"] = byTag["webhooks sent to your endpoints"] || [])
        .push([method.toUpperCase(), event, op]);
    }
  }
  const root = document.getElementById("ops");
  for (const [tag, ops] of Object.entries(byTag)) {
    const h = document.createElement("h2"); h.textContent = tag; root.appendChild(h);
    for (const [method, path, op] of ops) {
      const d = document.createElement("details"); d.className = "op";
      const s = document.createElement("summary");
      const m = document.createElement("span"); m.className = "m " + method; m.textContent = method;
      s.appendChild(m); s.appendChild(document.createTextNode(path + " \u2014 " + op.summary));
      d.appendChild(s);
      const p = document.createElement("p"); p.textContent = op.description; d.appendChild(p);
      const pre = document.createElement("pre");
      pre.textContent = JSON.stringify({parameters: op.parameters, requestBody: op.requestBody,
                                        responses: op.responses}, null, 2);
      d.appendChild(pre); root.appendChild(d);
    }
  }
});
</script></body></html>
"""


async def openapi_json(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    return web.json_response(request.app[DOCUMENT])


async def docs_page(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    return web.Response(
        text=_PAGE,
        content_type="text/html",
        headers={
            "Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline' "
            "'self'; style-src 'unsafe-inline'"
        },
    )


ROUTES = [
    Route("GET", "/openapi.json", openapi_json, "This OpenAPI 3.1 document", "docs", None),
    Route("GET", "/docs", docs_page, "API documentation page", "docs", None, produces="text/html"),
]
