"""A local Airtel Money: token, collection, status enquiry, refund and hashed callbacks."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import phonenumbers
from aiohttp import web

from providers.airtel.adapter import callback_hash
from providers.simulation import (
    STATE,
    Outcome,
    SimulatorOptions,
    SimulatorState,
    new_id,
    new_simulator_app,
)

TRANSACTIONS = web.AppKey("airtel_transactions", dict)  # our transaction id -> record
TOKEN_LIFETIME = 180
_MSISDN = re.compile(r"^\d{6,12}$", re.ASCII)
_AMOUNT = re.compile(r"^\d{1,15}(\.\d{1,2})?$", re.ASCII)
_CODE = re.compile(r"^[A-Z]{2,3}$")
# Payer's answer -> (status, message) as the status enquiry reports it.
_FINAL: dict[Outcome, tuple[str, str]] = {
    Outcome.SUCCEED: ("TS", "Transaction is successful"),
    Outcome.FAIL: ("TF", "Insufficient funds"),
    Outcome.REJECT: ("TF", "Transaction declined by the payer"),
    Outcome.EXPIRE: ("TE", "Transaction expired"),
    Outcome.PAYER_NOT_FOUND: ("TF", "Payer is not registered"),
}


def _status(code: str, message: str, result_code: str, *, success: bool,
            response_code: str = "DP00800001001") -> dict[str, Any]:
    return {"code": code, "message": message, "result_code": result_code, "response_code": response_code,
            "success": success}


# Airtel's collection response codes for a definite refusal: DP00800001000 is "ambiguous: do the transaction
# enquiry" (providers.airtel.adapter.IN_DOUBT), never a refusal.
REFUSED = "DP00800001008"
NOT_FOUND = "DP00800001025"


def _refusal(http_status: int, message: str, result_code: str, response_code: str = REFUSED) -> web.Response:
    return web.json_response({"data": {}, "status": _status(str(http_status), message, result_code,
                                                             success=False, response_code=response_code)},
                             status=http_status)


def _internal_error() -> web.Response:
    """A simulated 500 (fail_request_500) in Airtel's envelope, as its other errors: ESB000001 is "Something went
    wrong" in Airtel's code list (the shared fault's {message} alone is no answer Airtel gives). Nothing is stored."""
    return _refusal(500, "Something went wrong", "ESB000001", response_code="DP00800001000")


def _authorized(request: web.Request) -> web.Response | None:
    state = request.app[STATE]
    if not state.bearer_valid(request, "airtel"):
        return _refusal(401, "Authorization failed: invalid or expired token", "ESB000034")
    headers = request.headers
    if not _CODE.match(headers.get("X-Country", "")) or not _CODE.match(headers.get("X-Currency", "")):
        return _refusal(400, "X-Country and X-Currency headers are required", "ESB000001")
    return None


async def _json(request: web.Request) -> dict[str, Any] | None:
    try:
        body = await request.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


async def _token(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await _json(request)
    if body is None or body.get("grant_type") != "client_credentials":
        return web.json_response({"error": "invalid_request",
                                  "error_description": "grant_type client_credentials is required"},
                                 status=400)
    if not state.credential_ok("client_id", body.get("client_id")) \
            or not state.credential_ok("client_secret", body.get("client_secret")):
        return web.json_response({"error": "invalid_client",
                                  "error_description": "Client authentication failed"}, status=401)
    lifetime = state.options.token_lifetime or TOKEN_LIFETIME
    return web.json_response({"access_token": state.issue_token("airtel", lifetime),
                              "expires_in": str(lifetime), "token_type": "bearer"})


def _e164(country: str, msisdn: str) -> str:
    return f"{phonenumbers.country_code_for_region(country)}{msisdn}"


async def _collect(request: web.Request) -> web.Response:
    state = request.app[STATE]
    denied = _authorized(request)
    if denied:
        return denied
    body = await _json(request) or {}
    if state.fail_now():
        return _internal_error()
    subscriber, tx = body.get("subscriber"), body.get("transaction")
    if not (isinstance(subscriber, dict) and isinstance(tx, dict) and isinstance(body.get("reference"), str)):
        return _refusal(400, "reference, subscriber and transaction are required", "ESB000001")
    msisdn = str(subscriber.get("msisdn", ""))
    country = str(subscriber.get("country", ""))
    calling_code = phonenumbers.country_code_for_region(country) if _CODE.match(country) else 0
    if not _MSISDN.match(msisdn) or not calling_code:
        return _refusal(400, "subscriber.msisdn must be digits without the country code", "ESB000001")
    if msisdn.startswith(str(calling_code)) and len(msisdn) > 9:
        return _refusal(400, "subscriber.msisdn must not include the country code", "ESB000001")
    amount = tx.get("amount")
    # A JSON number, as Airtel documents it (`"amount": 1000`): a string ("1500.00") is refused.
    if isinstance(amount, bool) or not isinstance(amount, int | float) \
            or not _AMOUNT.match(str(amount)) or amount <= 0:
        return _refusal(400, "transaction.amount must be a positive number", "ESB000001")
    tx_id = tx.get("id")
    if not isinstance(tx_id, str) or not tx_id:
        return _refusal(400, "transaction.id is required", "ESB000001")
    transactions = request.app[TRANSACTIONS]
    if tx_id in transactions:
        return _refusal(400, "Duplicate transaction id", "ESB000041")
    record = {"id": tx_id, "status": "TIP", "message": "In process", "airtel_money_id": None,
              "amount": str(amount), "currency": str(tx.get("currency", "")),
              "msisdn": _e164(country, msisdn), "refunded": False}
    transactions[tx_id] = record
    state.spawn(_settle(state, record))
    await state.hang()
    return web.json_response({"data": {"transaction": {"id": tx_id, "status": "Success."}},
                              "status": _status("200", "Success.", "ESB000010", success=True,
                                                response_code="DP00800001006")})


def _callback_body(record: dict[str, Any], status_code: str, message: str) -> dict[str, Any]:
    return {"transaction": {"id": record["id"], "message": message, "status_code": status_code,
                            "airtel_money_id": record["airtel_money_id"] or ""}}


async def _settle(state: SimulatorState, record: dict[str, Any]) -> None:
    outcome = await state.payer_decides(record["id"], record["msisdn"], record["amount"], record["currency"],
                                        record["id"])
    if outcome is Outcome.PENDING:
        return
    status, message = _FINAL[outcome]
    record.update(status=status, message=message)
    if status == "TS":
        record["airtel_money_id"] = "MP" + new_id(12)
    # Callbacks carry TS or TF only; an expiry is reported as a failure.
    final = _callback_body(record, "TS" if status == "TS" else "TF", message)
    # The stale callback never claims money that did not move: a success is followed by an old failure,
    # a failure by an old "in progress".
    stale = _callback_body(record, "TF" if status == "TS" else "TIP", "stale replay")
    key = state.options.credentials.get("callback_key", "")

    def sign(payload: Mapping[str, Any]) -> Mapping[str, Any]:
        return {**payload, "hash": callback_hash(payload["transaction"], key)} if key else payload

    await state.deliver(state.options.callback_url, final, stale, method="POST", sign=sign)


async def _status_enquiry(request: web.Request) -> web.Response:
    denied = _authorized(request)
    if denied:
        return denied
    record = request.app[TRANSACTIONS].get(request.match_info["id"])
    if record is None:
        return _refusal(404, "Transaction not found", "ESB000008", NOT_FOUND)
    tx = {"airtel_money_id": record["airtel_money_id"] or "", "id": record["id"],
          "message": record["message"], "status": record["status"]}
    return web.json_response({"data": {"transaction": tx},
                              "status": _status("200", "SUCCESS", "ESB000010", success=True)})


async def _refund(request: web.Request) -> web.Response:
    state = request.app[STATE]
    denied = _authorized(request)
    if denied:
        return denied
    body = await _json(request)
    if state.fail_now():
        return _internal_error()
    tx = body.get("transaction") if body else None
    money_id = tx.get("airtel_money_id") if isinstance(tx, dict) else None
    if not isinstance(money_id, str) or not money_id:
        return _refusal(400, "transaction.airtel_money_id is required", "ESB000001")
    record = next((r for r in request.app[TRANSACTIONS].values() if r["airtel_money_id"] == money_id), None)
    if record is None:
        return _refusal(404, "Transaction not found", "ESB000008", NOT_FOUND)
    if record["status"] != "TS" or record["refunded"]:
        # ESB000011 "Failed": ESB000045 is Airtel's "no transaction found with the provided id", which the status
        # enquiry reads as never sent (providers.airtel.adapter.NOT_FOUND_CODE).
        return web.json_response({"data": {"transaction": {"airtel_money_id": money_id, "status": "FAILED"}},
                                  "status": _status("200", "Transaction is not eligible for refund",
                                                    "ESB000011", success=False, response_code=REFUSED)})
    record["refunded"] = True
    await state.hang()
    refund = {"airtel_money_id": "RF" + new_id(12), "status": "SUCCESS"}
    return web.json_response({"data": {"transaction": refund},
                              "status": _status("200", "SUCCESS", "ESB000010", success=True)})


def create_simulator(options: SimulatorOptions) -> web.Application:
    app, _state = new_simulator_app("airtel", options)
    app[TRANSACTIONS] = {}
    app.router.add_post("/auth/oauth2/token", _token)
    app.router.add_post("/merchant/v1/payments/", _collect)
    app.router.add_get("/standard/v1/payments/{id}", _status_enquiry)
    app.router.add_post("/standard/v1/payments/refund", _refund)
    return app
