"""A local MTN MoMo: the Collection and Disbursement paths, token rules, status codes and callbacks."""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
import uuid
from decimal import Decimal, InvalidOperation
from typing import Any

from aiohttp import web

from core.config import MTN_TARGET_ENVIRONMENTS
from providers.simulation import (
    STATE,
    Outcome,
    SimulatorOptions,
    SimulatorState,
    new_id,
    new_simulator_app,
)

TRANSACTIONS = web.AppKey("mtn_transactions", dict)  # referenceId -> wire body (+ private fields)
REFUNDS = web.AppKey("mtn_refunds", dict)
_AMOUNT = re.compile(r"^\d{1,15}(\.\d{1,2})?$", re.ASCII)
_CURRENCY = re.compile(r"^[A-Z]{3}$")
_PARTY = re.compile(r"^\d{6,15}$", re.ASCII)
# MTN is reported to refuse a request whose payerMessage / payeeNote holds '&' ('<' and '>' likewise here, as an
# XML back end would) and to answer 500 to an empty or missing one: the simulator does the same.
_NOTE_REFUSED = re.compile(r"[&<>]")
# What the payer's answer does to the request, as MTN reports it: (status, reason).
_FINAL: dict[Outcome, tuple[str, str | None]] = {
    Outcome.SUCCEED: ("SUCCESSFUL", None),
    Outcome.FAIL: ("FAILED", "NOT_ENOUGH_FUNDS"),
    Outcome.REJECT: ("FAILED", "APPROVAL_REJECTED"),
    Outcome.EXPIRE: ("FAILED", "EXPIRED"),
    Outcome.PAYER_NOT_FOUND: ("FAILED", "PAYER_NOT_FOUND"),
}
TOKEN_LIFETIME = 3600
# Credential names per product, as in ProviderConfig.
_PRODUCT_CREDENTIALS = {
    "collection": ("api_user", "api_key", "subscription_key"),
    "disbursement": ("disbursement_api_user", "disbursement_api_key", "disbursement_subscription_key"),
}


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"code": code, "message": message}, status=status)


def _internal_error() -> web.Response:
    """MTN's own 500, in its error shape ({code, message}, as every other answer here): the shared fault's
    {message} alone gave the adapter words MTN never sends."""
    return _error(500, "INTERNAL_PROCESSING_ERROR", "An internal error occurred while processing.")


def _public(tx: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in tx.items() if not k.startswith("_")}


def _subscription_ok(state: SimulatorState, request: web.Request, product: str) -> bool:
    given = request.headers.get("Ocp-Apim-Subscription-Key")
    return state.credential_ok(_PRODUCT_CREDENTIALS[product][2], given)


async def _token(request: web.Request) -> web.Response:
    state = request.app[STATE]
    product = request.match_info["product"]
    user_name, key_name, _ = _PRODUCT_CREDENTIALS[product]
    if not _subscription_ok(state, request, product):
        return _error(401, "INVALID_SUBSCRIPTION_KEY", "Access denied due to invalid subscription key.")
    scheme, _, encoded = request.headers.get("Authorization", "").partition(" ")
    try:
        user, _, key = base64.b64decode(encoded, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        user = key = ""
    if scheme.lower() != "basic" or not state.credential_ok(user_name, user) \
            or not state.credential_ok(key_name, key):
        return web.json_response({"error": "login_failed"}, status=401)
    lifetime = state.options.token_lifetime or TOKEN_LIFETIME
    return web.json_response({"access_token": state.issue_token(product, lifetime),
                              "token_type": "access_token", "expires_in": lifetime})


def _authorized(request: web.Request, product: str) -> web.Response | None:
    state = request.app[STATE]
    if not _subscription_ok(state, request, product):
        return _error(401, "INVALID_SUBSCRIPTION_KEY", "Access denied due to invalid subscription key.")
    if not state.bearer_valid(request, product):
        return _error(401, "INVALID_TOKEN", "Access denied: missing, invalid or expired access token.")
    environment = request.headers.get("X-Target-Environment")
    if not environment:
        return _error(400, "INVALID_TARGET_ENVIRONMENT", "X-Target-Environment is required.")
    if environment not in MTN_TARGET_ENVIRONMENTS:  # sandbox included: development and tests use it
        return _error(400, "INVALID_TARGET_ENVIRONMENT", f"Unknown X-Target-Environment {environment!r}.")
    return None


def _reference(request: web.Request) -> str | web.Response:
    """The request's X-Reference-Id: a UUID version 4 (RFC 4122's variant), as MTN's API asks for, written as one
    (36 characters, hex and hyphens; either case). Braces, a urn: prefix, no hyphens or another version are refused,
    so a request id of ours in another form fails against the simulator, not first at MTN."""
    raw = request.headers.get("X-Reference-Id", "")
    try:
        parsed = uuid.UUID(raw)
    except ValueError:
        parsed = None
    if parsed is None or str(parsed) != raw.lower() or parsed.version != 4 or parsed.variant != uuid.RFC_4122:
        return _error(400, "INVALID_REFERENCE_ID", "X-Reference-Id must be a UUID version 4.")
    return str(parsed)


async def _body(request: web.Request, required: tuple[str, ...]) -> dict[str, Any] | web.Response:
    try:
        body = await request.json()
    except ValueError:
        return _error(400, "BAD_REQUEST", "The body is not JSON.")
    if not isinstance(body, dict):
        return _error(400, "BAD_REQUEST", "The body must be a JSON object.")
    missing = [name for name in required if name not in body]
    if missing:
        return _error(400, "BAD_REQUEST", f"Missing fields: {', '.join(missing)}.")
    amount = body["amount"]
    if not isinstance(amount, str) or not _AMOUNT.match(amount) or Decimal(amount) <= 0:
        return _error(400, "INVALID_AMOUNT", "amount must be a positive decimal string.")
    if not isinstance(body["currency"], str) or not _CURRENCY.match(body["currency"]):
        return _error(400, "INVALID_CURRENCY", "currency must be an ISO 4217 code.")
    for name in ("payerMessage", "payeeNote"):
        text = body.get(name)
        if not isinstance(text, str) or not text.strip():
            return _internal_error()
        if _NOTE_REFUSED.search(text):
            return _error(400, "BAD_REQUEST", f"{name} holds characters that are not allowed.")
    return body


async def _request_to_pay(request: web.Request) -> web.Response:
    state = request.app[STATE]
    denied = _authorized(request, "collection")
    if denied:
        return denied
    reference = _reference(request)
    if isinstance(reference, web.Response):
        return reference
    body = await _body(request, ("amount", "currency", "externalId", "payer"))
    if isinstance(body, web.Response):
        return body
    if state.fail_now():
        return _internal_error()
    payer = body["payer"]
    if not isinstance(payer, dict) or payer.get("partyIdType") != "MSISDN" \
            or not _PARTY.match(str(payer.get("partyId", ""))):
        return _error(400, "INVALID_PAYER", "payer must be {partyIdType: MSISDN, partyId: digits}.")
    transactions = request.app[TRANSACTIONS]
    if reference in transactions:
        return _error(409, "RESOURCE_ALREADY_EXIST", "Duplicated reference id. Creation of resource failed.")
    tx = {"amount": body["amount"], "currency": body["currency"], "financialTransactionId": None,
          "externalId": body["externalId"], "payer": {"partyIdType": "MSISDN", "partyId": payer["partyId"]},
          "payerMessage": body.get("payerMessage", ""), "payeeNote": body.get("payeeNote", ""),
          "status": "PENDING", "_refunded": Decimal(0)}
    transactions[reference] = tx
    state.spawn(_settle_payment(state, reference, tx, request.headers.get("X-Callback-Url")))
    await state.hang()
    return web.Response(status=202)


async def _settle_payment(state: SimulatorState, reference: str, tx: dict[str, Any],
                          callback: str | None) -> None:
    outcome = await state.payer_decides(reference, tx["payer"]["partyId"], tx["amount"], tx["currency"],
                                        tx["payeeNote"])
    if outcome is Outcome.PENDING:
        return  # never approved: only the gateway's own timeout ends it
    stale = _public(tx)
    status, reason = _FINAL[outcome]
    tx["status"] = status
    if reason:
        tx["reason"] = reason
    else:
        tx["financialTransactionId"] = new_id()
    await state.deliver(callback, _public(tx), stale, method=state.options.callback_method)


async def _get_request_to_pay(request: web.Request) -> web.Response:
    denied = _authorized(request, "collection")
    if denied:
        return denied
    tx = request.app[TRANSACTIONS].get(request.match_info["reference"])
    if tx is None:
        return _error(404, "RESOURCE_NOT_FOUND", "Requested resource was not found.")
    return web.json_response(_public(tx))


async def _refund(request: web.Request) -> web.Response:
    state = request.app[STATE]
    denied = _authorized(request, "disbursement")
    if denied:
        return denied
    reference = _reference(request)
    if isinstance(reference, web.Response):
        return reference
    body = await _body(request, ("amount", "currency", "externalId", "referenceIdToRefund"))
    if isinstance(body, web.Response):
        return body
    if state.fail_now():
        return _internal_error()
    refunds = request.app[REFUNDS]
    if reference in refunds:
        return _error(409, "RESOURCE_ALREADY_EXIST", "Duplicated reference id. Creation of resource failed.")
    original = request.app[TRANSACTIONS].get(str(body["referenceIdToRefund"]))
    if original is None:
        return _error(404, "RESOURCE_NOT_FOUND", "The transaction to refund was not found.")
    refund = {"amount": body["amount"], "currency": body["currency"], "financialTransactionId": None,
              "externalId": body["externalId"], "payee": dict(original["payer"]),
              "payerMessage": body.get("payerMessage", ""), "payeeNote": body.get("payeeNote", ""),
              "status": "PENDING"}
    refunds[reference] = refund
    state.spawn(_settle_refund(state, refund, original, request.headers.get("X-Callback-Url")))
    await state.hang()
    return web.Response(status=202)


async def _settle_refund(state: SimulatorState, refund: dict[str, Any], original: dict[str, Any],
                         callback: str | None) -> None:
    await asyncio.sleep(state.options.delay)
    stale = dict(refund)
    try:
        amount = Decimal(refund["amount"])
        left = Decimal(original["amount"]) - original["_refunded"]
    except InvalidOperation:
        amount, left = Decimal(1), Decimal(0)
    if original["status"] != "SUCCESSFUL" or refund["currency"] != original["currency"] or amount > left:
        refund.update(status="FAILED", reason="COULD_NOT_PERFORM_TRANSACTION")
    else:
        original["_refunded"] += amount
        refund.update(status="SUCCESSFUL", financialTransactionId=new_id())
    await state.deliver(callback, dict(refund), stale, method=state.options.callback_method)


async def _get_refund(request: web.Request) -> web.Response:
    denied = _authorized(request, "disbursement")
    if denied:
        return denied
    refund = request.app[REFUNDS].get(request.match_info["reference"])
    if refund is None:
        return _error(404, "RESOURCE_NOT_FOUND", "Requested resource was not found.")
    return web.json_response(refund)


def create_simulator(options: SimulatorOptions) -> web.Application:
    app, _state = new_simulator_app("mtn_momo", options)
    app[TRANSACTIONS] = {}
    app[REFUNDS] = {}
    app.router.add_post("/{product:collection|disbursement}/token/", _token)
    app.router.add_post("/collection/v1_0/requesttopay", _request_to_pay)
    app.router.add_get("/collection/v1_0/requesttopay/{reference}", _get_request_to_pay)
    app.router.add_post("/disbursement/v1_0/refund", _refund)
    app.router.add_get("/disbursement/v1_0/refund/{reference}", _get_refund)
    return app
