"""A local M-Pesa Daraja: token, STK push with password check, STK query, reversal, and callbacks."""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from aiohttp import web

from core.config import DARAJA_REFUSED_IN_URLS
from core.phone import mask
from core.text import is_number
from providers.simulation import (
    STATE,
    Outcome,
    SimulatorOptions,
    SimulatorState,
    new_id,
    new_simulator_app,
    run_standalone,
)

log = logging.getLogger("gateway.simulator.mpesa")

_NAIROBI = timezone(timedelta(hours=3), "EAT")  # Kenya: UTC+3, no daylight saving since 1942
TOKEN_LIFETIME = 3599  # Daraja tokens live one hour
# Kenyan payer numbers by their last four digits; any other number succeeds.
SUFFIX_OUTCOMES: dict[str, str] = {
    "0001": "0",  # success
    "0002": "1",  # insufficient funds
    "0003": "",  # never completes: the STK query answers "still processing" forever
    "0004": "1032",  # cancelled by the payer
    "0005": "2001",  # wrong PIN
    "0006": "1037",  # phone unreachable
    "0007": "1019",  # expired
    "0008": "1001",  # another transaction was in process on the payer's phone
}
# Payer numbers whose STK push Daraja refuses outright (HTTP 500, errorCode 500.001.1001: no prompt sent).
LOCKED_SUFFIX = "0009"
# An initiator Daraja knows but that may not reverse transactions: its reversals are taken, then refused in their
# Result with ResultCode 21. Any other initiator than the configured one is refused there with 2001 ("The initiator
# information is invalid."): Daraja checks the initiator when it processes the reversal, not when it takes it.
INITIATOR_NOT_ALLOWED = "no-reversal-role"
RESULT_DESC: dict[str, str] = {
    "0": "The service request is processed successfully.",
    "1": "The balance is insufficient for the transaction.",
    "1032": "Request cancelled by user",
    "1037": "DS timeout user cannot be reached",
    "2001": "The initiator information is invalid.",
    "1019": "Transaction has expired",
    "1001": "Unable to lock subscriber, a transaction is already in process for the current subscriber",
}
# A reversal's Result when Daraja refuses its initiator.
_INITIATOR_REFUSED: dict[str, str] = {"2001": RESULT_DESC["2001"], "21": "The initiator is not allowed to initiate "
                                                                        "this request."}
# The payer's decision in the interactive (demo phone) mode, as a ResultCode.
_INTERACTIVE: dict[Outcome, str] = {Outcome.SUCCEED: "0", Outcome.REJECT: "1032", Outcome.EXPIRE: "1019",
                                    Outcome.FAIL: "1", Outcome.PAYER_NOT_FOUND: "1037"}


@dataclass
class _Stk:
    checkout: str
    merchant: str
    phone: str
    amount: int
    callback_url: str
    result_code: str | None = None  # None while the payer has not acted
    receipt: str | None = None


@dataclass
class _Store:
    stk: dict[str, _Stk] = field(default_factory=dict)
    receipts: dict[str, _Stk] = field(default_factory=dict)
    reversed: set[str] = field(default_factory=set)


STORE = web.AppKey("mpesa_store", _Store)


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"requestId": new_id(8) + "-" + new_id(6), "errorCode": code,
                              "errorMessage": message}, status=status)


def _bad(field_name: str) -> web.Response:
    return _error(400, "400.002.02", f"Bad Request - Invalid {field_name}")


def _callback_refused(url: Any) -> bool:
    """A URL Daraja would not call: not http(s), or holding a word its rules refuse (core.config's list; "exe", "cmd",
    "sql" and "query" are in its rules too, not checked here: "exe" is in every example.com)."""
    return (not isinstance(url, str) or not url.startswith(("http://", "https://"))
            or bool(DARAJA_REFUSED_IN_URLS.search(url)))


async def _token(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if request.query.get("grant_type") != "client_credentials":
        return _error(400, "400.008.02", "Invalid grant type passed")
    scheme, _, encoded = request.headers.get("Authorization", "").partition(" ")
    try:
        key, _, secret = base64.b64decode(encoded, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        key = secret = ""
    if scheme.lower() != "basic" or not (state.credential_ok("consumer_key", key)
                                         and state.credential_ok("consumer_secret", secret)):
        return _error(401, "400.008.01", "Invalid Authentication passed")
    lifetime = state.options.token_lifetime or TOKEN_LIFETIME
    return web.json_response({"access_token": state.issue_token("mpesa", lifetime),
                              "expires_in": str(lifetime)})


async def _body(request: web.Request) -> dict[str, Any] | web.Response:
    if not request.app[STATE].bearer_valid(request, "mpesa"):
        return _error(401, "404.001.03", "Invalid Access Token")
    try:
        body = await request.json()
    except ValueError:
        return _error(400, "400.002.01", "Bad Request - Invalid JSON")
    return body if isinstance(body, dict) else _error(400, "400.002.01", "Bad Request - Invalid JSON")


def _password_ok(state: SimulatorState, body: dict[str, Any]) -> bool:
    timestamp, shortcode = str(body.get("Timestamp", "")), str(body.get("BusinessShortCode", ""))
    try:
        datetime.strptime(timestamp, "%Y%m%d%H%M%S")  # format check only
        raw = base64.b64decode(str(body.get("Password", "")), validate=True).decode()
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return False
    passkey = state.options.credentials.get("passkey")
    if passkey is not None:
        return secrets.compare_digest(raw.encode(), f"{shortcode}{passkey}{timestamp}".encode())
    return raw.startswith(shortcode) and raw.endswith(timestamp) and len(raw) > len(shortcode + timestamp)


def _nairobi_now() -> int:
    """Daraja's TransactionDate / TransCompletedTime: Nairobi's wall clock as digits (20261203135731), as the
    adapter reads them. UTC digits (and the machine's local time, UTC on a server) were read three hours early, so
    the gateway kept the request's time as each payment's and reversal's completion instead of the payer's approval."""
    return int(datetime.now(_NAIROBI).strftime("%Y%m%d%H%M%S"))


def _kenyan_mobile(value: object) -> bool:
    text = str(value)
    return len(text) == 12 and text.isdigit() and text.startswith(("2547", "2541"))


def _whole(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value > 0 else None
    if isinstance(value, str) and is_number(value) and int(value) > 0:
        return int(value)
    return None


async def _stk_push(request: web.Request) -> web.Response:
    state, store = request.app[STATE], request.app[STORE]
    body = await _body(request)
    if isinstance(body, web.Response):
        return body
    if state.fail_now():
        return _error(500, "500.003.02", "System is busy. Please try again in few minutes.")
    if not str(body.get("BusinessShortCode", "")).isdigit():
        return _bad("BusinessShortCode")
    if not _password_ok(state, body):
        return _bad("Password")
    if body.get("TransactionType") not in ("CustomerPayBillOnline", "CustomerBuyGoodsOnline"):
        return _bad("TransactionType")
    amount = _whole(body.get("Amount"))
    if amount is None:
        return _bad("Amount")
    if not _kenyan_mobile(body.get("PartyA")):
        return _bad("PartyA")
    if not _kenyan_mobile(body.get("PhoneNumber")):
        return _bad("PhoneNumber")
    if str(body.get("PartyB", "")) != str(body.get("BusinessShortCode")):
        return _bad("PartyB")
    callback = body.get("CallBackURL")
    if not isinstance(callback, str) or _callback_refused(callback):
        return _bad("CallBackURL")
    account, desc = body.get("AccountReference"), body.get("TransactionDesc")
    if not isinstance(account, str) or not 1 <= len(account) <= 12:
        return _bad("AccountReference")
    if not isinstance(desc, str) or not 1 <= len(desc) <= 13:
        return _bad("TransactionDesc")
    if str(body["PhoneNumber"]).endswith(LOCKED_SUFFIX):
        return _error(500, "500.001.1001", "Unable to lock subscriber, a transaction is already in process for "
                                           "the current subscriber")
    stamp = datetime.now(UTC).strftime("%d%m%Y%H%M%S")
    stk = _Stk(checkout=f"ws_CO_{stamp}{new_id(12)}", merchant=f"{new_id(5)}-{new_id(8)}-1",
               phone=str(body["PhoneNumber"]), amount=amount, callback_url=callback)
    store.stk[stk.checkout] = stk
    log.info("mpesa simulator stk push", extra={"payer": mask("+" + stk.phone), "amount": amount})
    state.spawn(_decide(state, store, stk))
    # A hang comes after the push is stored and the payer prompted, as at Safaricom: the answer is lost,
    # the payment is not (the payer may approve, and the callback still comes).
    await state.hang()
    accepted = "Success. Request accepted for processing"
    return web.json_response({"MerchantRequestID": stk.merchant, "CheckoutRequestID": stk.checkout,
                              "ResponseCode": "0", "ResponseDescription": accepted,
                              "CustomerMessage": accepted})


async def _decide(state: SimulatorState, store: _Store, stk: _Stk) -> None:
    scripted = SUFFIX_OUTCOMES.get(stk.phone[-4:], "0")
    if state.interactive_for(stk.phone):
        outcome = await state.payer_decides(stk.checkout, stk.phone, str(stk.amount), "KES", "M-Pesa")
        code = _INTERACTIVE.get(outcome, "")
        if code == "0" and scripted:
            code = scripted  # approved, but Safaricom still refuses this number (insufficient funds...)
    else:
        if stk.phone in state.options.pending_forever:
            return
        code = scripted
        if not code:
            return  # the payer never acts; queries keep answering "still processing"
        await asyncio.sleep(state.options.delay)
    if not code:
        return
    stk.result_code = code
    item: list[dict[str, Any]] | None = None
    if code == "0":
        stk.receipt = "S" + secrets.token_hex(5).upper()[:9]
        store.receipts[stk.receipt] = stk
        item = [{"Name": "Amount", "Value": stk.amount}, {"Name": "MpesaReceiptNumber", "Value": stk.receipt},
                {"Name": "TransactionDate", "Value": _nairobi_now()},
                {"Name": "PhoneNumber", "Value": int(stk.phone)}]
    final = _callback(stk, code, item)
    # Out of order: an earlier "unreachable" attempt reported after the success (seen on Daraja).
    stale = _callback(stk, "1037", None) if code == "0" else None
    await state.deliver(stk.callback_url, final, stale, method="POST")


def _callback(stk: _Stk, code: str, items: list[dict[str, Any]] | None) -> dict[str, Any]:
    callback: dict[str, Any] = {"MerchantRequestID": stk.merchant, "CheckoutRequestID": stk.checkout,
                                "ResultCode": int(code), "ResultDesc": RESULT_DESC[code]}
    if items:
        callback["CallbackMetadata"] = {"Item": items}
    return {"Body": {"stkCallback": callback}}


async def _stk_query(request: web.Request) -> web.Response:
    state, store = request.app[STATE], request.app[STORE]
    body = await _body(request)
    if isinstance(body, web.Response):
        return body
    if not _password_ok(state, body):
        return _bad("Password")
    stk = store.stk.get(str(body.get("CheckoutRequestID", "")))
    if stk is None:
        return _bad("CheckoutRequestID")
    if stk.result_code is None:
        return _error(500, "500.001.1001", "The transaction is being processed")
    return web.json_response({"ResponseCode": "0",
                              "ResponseDescription": "The service request has been accepted successsfully",
                              "MerchantRequestID": stk.merchant, "CheckoutRequestID": stk.checkout,
                              "ResultCode": stk.result_code, "ResultDesc": RESULT_DESC[stk.result_code]})


async def _reversal(request: web.Request) -> web.Response:
    state, store = request.app[STATE], request.app[STORE]
    body = await _body(request)
    if isinstance(body, web.Response):
        return body
    if state.fail_now():
        return _error(500, "500.003.02", "System is busy. Please try again in few minutes.")
    initiator = body.get("Initiator")
    if not isinstance(initiator, str) or not initiator:
        return _error(400, "400.002.02", "Bad Request - Invalid Initiator")
    if not state.credential_ok("security_credential", body.get("SecurityCredential")):
        return _error(400, "400.002.02", "Bad Request - Invalid SecurityCredential")
    if body.get("CommandID") != "TransactionReversal":
        return _bad("CommandID")
    if str(body.get("RecieverIdentifierType")) != "11":
        return _bad("RecieverIdentifierType")
    amount = _whole(body.get("Amount"))
    if amount is None:
        return _bad("Amount")
    for name in ("TransactionID", "ReceiverParty", "ResultURL", "QueueTimeOutURL", "Remarks"):
        if not isinstance(body.get(name), str | int) or not str(body.get(name)):
            return _bad(name)
    for name in ("ResultURL", "QueueTimeOutURL"):
        if _callback_refused(body[name]):
            return _bad(name)
    originator, conversation = f"{new_id(5)}-{new_id(8)}-1", f"AG_{datetime.now(UTC):%Y%m%d}_{new_id(20)}"
    refused = ("21" if initiator == INITIATOR_NOT_ALLOWED
               else None if state.credential_ok("initiator", initiator) else "2001")
    state.spawn(_reverse(state, store, body, amount, originator, conversation, refused))
    await state.hang()  # after the reversal is under way: only the answer is lost
    return web.json_response({"OriginatorConversationID": originator, "ConversationID": conversation,
                              "ResponseCode": "0",
                              "ResponseDescription": "Accept the service request successfully."})


async def _reverse(state: SimulatorState, store: _Store, body: dict[str, Any], amount: int, originator: str,
                   conversation: str, refused: str | None) -> None:
    """The reversal's Result; `refused`: the initiator's ResultCode (2001 or 21) when Daraja refuses it."""
    await asyncio.sleep(state.options.delay)
    receipt = str(body["TransactionID"])
    stk = store.receipts.get(receipt)
    if refused is not None:
        code, desc = refused, _INITIATOR_REFUSED[refused]
    elif stk is None or stk.amount != amount:
        code, desc = "R000002", "The OriginalTransactionID is invalid."
    elif receipt in store.reversed:
        code, desc = "R000001", "The transaction has already been reversed."
    else:
        code, desc = "0", "The service request is processed successfully."
        store.reversed.add(receipt)
    result: dict[str, Any] = {"ResultType": 0, "ResultCode": int(code) if code.isdigit() else code,
                              "ResultDesc": desc, "OriginatorConversationID": originator,
                              "ConversationID": conversation,
                              "TransactionID": "S" + secrets.token_hex(5).upper()[:9]}
    if code == "0":
        result["ResultParameters"] = {"ResultParameter": [
            {"Key": "DebitAccountBalance", "Value": "Utility Account|KES|0.00|0.00|0.00|0.00"},
            {"Key": "Amount", "Value": amount},
            {"Key": "TransCompletedTime", "Value": _nairobi_now()},
            {"Key": "OriginalTransactionID", "Value": receipt},
            {"Key": "Charge", "Value": 0},
        ]}
    result["ReferenceData"] = {"ReferenceItem": {"Key": "QueueTimeoutURL", "Value": body["QueueTimeOutURL"]}}
    await state.deliver(str(body["ResultURL"]), {"Result": result}, None, method="POST")


def create_simulator(options: SimulatorOptions | None = None) -> web.Application:
    """The M-Pesa simulator app; mount it under /_sim/mpesa or run it on its own."""
    app, _state = new_simulator_app("mpesa", options or SimulatorOptions())
    app[STORE] = _Store()
    app.router.add_get("/oauth/v1/generate", _token)
    app.router.add_post("/mpesa/stkpush/v1/processrequest", _stk_push)
    app.router.add_post("/mpesa/stkpushquery/v1/query", _stk_query)
    app.router.add_post("/mpesa/reversal/v1/request", _reversal)
    return app


def main(argv: list[str] | None = None) -> None:
    run_standalone("M-Pesa Daraja simulator", 8092, create_simulator, argv)


if __name__ == "__main__":
    main()
