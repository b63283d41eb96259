"""An Africa's Talking messaging simulator: the send API, delayed delivery reports, and an inbox per phone."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

import aiohttp
from aiohttp import web
from phonenumbers import NumberParseException

from channels.sms.encoding import measure
from core.config import Settings
from core.phone import mask, network_code_of

log = logging.getLogger("gateway.sms.simulator")

# Failures decided when the message is sent: name -> (statusCode, status) as the real API spells them.
SEND_FAILURES: dict[str, tuple[int, str]] = {
    "RiskHold": (401, "RiskHold"),
    "InvalidSenderId": (402, "InvalidSenderId"),
    "InvalidPhoneNumber": (403, "InvalidPhoneNumber"),
    "UnsupportedNumberType": (404, "UnsupportedNumberType"),
    "InsufficientBalance": (405, "InsufficientBalance"),
    "UserInBlacklist": (406, "UserInBlacklist"),
    "UserInBlackList": (406, "UserInBlacklist"),
    "CouldNotRoute": (407, "CouldNotRoute"),
    "DoNotDisturbRejection": (409, "DoNotDisturbRejection"),
    "InternalServerError": (500, "InternalServerError"),
    "GatewayError": (501, "GatewayError"),
}
# Failures reported later in the delivery report: name -> (status, failureReason).
DELIVERY_FAILURES: dict[str, tuple[str, str | None]] = {
    "InsufficientCredit": ("Failed", "InsufficientCredit"),
    "DeliveryFailure": ("Failed", "DeliveryFailure"),
    "UserIsInactive": ("Failed", "UserIsInactive"),
    "UserDoesNotExist": ("Rejected", "UserDoesNotExist"),
    "Expired": ("Expired", None),
}
# The networkCode of a report for a number whose network the simulator cannot name (no MCC-MNC known for its range's
# operator: core.phone.network_code_of): Africa's Talking's own code for its sandbox network, "Athena".
UNKNOWN_NETWORK_CODE = "99999"
# Whole-request failures: the HTTP status the API answers with.
HTTP_FAILURES = {"http500": 500, "http502": 502, "http503": 503}
ALL_FAILURES = frozenset(SEND_FAILURES) | frozenset(DELIVERY_FAILURES) | frozenset(HTTP_FAILURES)

_E164 = re.compile(r"^\+\d{8,15}$", re.ASCII)
_CURRENCY = {"250": "RWF", "254": "KES", "256": "UGX", "255": "TZS", "233": "GHS", "260": "ZMW"}
_PRICE = {
    "RWF": "20.0000",
    "KES": "0.8000",
    "UGX": "25.0000",
    "TZS": "20.0000",
    "GHS": "0.0600",
    "ZMW": "0.2000",
    "USD": "0.0100",
}


@dataclass
class Failure:
    name: str
    times: int | None = None  # None: every message; n: the next n messages only


@dataclass
class SimulatorState:
    username: str
    api_key: str
    delivery_url: str | None
    delivery_delay: float
    failures: dict[str, Failure] = field(default_factory=dict)  # phone -> failure
    global_failure: Failure | None = None
    inbox: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    by_id: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[dict[str, str]] = field(default_factory=list)  # every send request, for tests
    reports_posted: list[dict[str, str]] = field(default_factory=list)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    session: aiohttp.ClientSession | None = None

    def set_failure(self, name: str | None, *, number: str | None = None, times: int | None = None) -> None:
        if name is not None and name not in ALL_FAILURES:
            raise ValueError(f"unknown failure {name!r}; one of {sorted(ALL_FAILURES)}")
        if times is not None and times < 0:
            raise ValueError("times must be 0 or more (0: none; leave it out: every message)")
        # "times": 0 is no failure at all (it failed the next message: a count taken down only after one was failed).
        failure = Failure(name, times) if name and times != 0 else None
        if number is None:
            self.global_failure = failure
        elif failure is None:
            self.failures.pop(number, None)
        else:
            self.failures[number] = failure

    def take_failure(self, number: str | None) -> str | None:
        failure = self.failures.get(number) if number else self.global_failure
        if failure is None:
            return None
        if failure.times is not None:
            failure.times -= 1
            if failure.times <= 0:
                if number:
                    self.failures.pop(number, None)
                else:
                    self.global_failure = None
        return failure.name

    def messages(self, phone: str) -> list[dict[str, Any]]:
        return list(self.inbox.get(phone, []))


STATE = web.AppKey("africastalking_sms_state", SimulatorState)


def _cost(number: str, segments: int) -> str:
    currency = next((c for p, c in _CURRENCY.items() if number[1:].startswith(p)), "USD")
    price = float(_PRICE[currency]) * max(1, segments)
    return f"{currency} {price:.4f}"


async def _messaging(request: web.Request) -> web.Response:
    state = request.app[STATE]
    # As bytes: compare_digest refuses a str that is not ASCII, and a header arrives as Latin-1 text.
    given = request.headers.get("apiKey", "").encode("utf-8", "surrogateescape")
    if not hmac.compare_digest(given, state.api_key.encode()):
        return web.Response(status=401, text="The supplied authentication is invalid")
    form = await request.post()
    username = str(form.get("username", ""))
    state.requests.append({k: str(v) for k, v in form.items()})
    if username != state.username:
        return web.Response(status=401, text="The supplied authentication is invalid")
    message = str(form.get("message", ""))
    to = [n.strip() for n in str(form.get("to", "")).split(",") if n.strip()]
    if not message or not to:
        return web.Response(status=400, text="Must have to and message")
    pending = state.global_failure
    if pending is not None and pending.name in HTTP_FAILURES:
        state.take_failure(None)
        return web.Response(status=HTTP_FAILURES[pending.name], text="Internal Server Error")
    # A request one of its numbers fails as a whole (a 5xx) reaches nobody, as the API's would: an earlier
    # recipient must not be inboxed (and sent again on the retry). Only that number's failure is taken (not the
    # one set for every number's next message: the retry is that message).
    for number in to:
        pending = state.failures.get(number)
        if pending is not None and pending.name in HTTP_FAILURES:
            state.take_failure(number)
            return web.Response(status=HTTP_FAILURES[pending.name], text="Internal Server Error")
    global_failure = state.take_failure(None)
    sender = str(form.get("from", "")) or "AFRICASTKNG"
    size = measure(message)
    recipients = []
    for number in to:
        failure = state.take_failure(number) or global_failure
        if not _E164.match(number):
            failure = "InvalidPhoneNumber"
        if failure in SEND_FAILURES:
            code, status = SEND_FAILURES[failure]
            recipients.append(
                {"statusCode": code, "number": number, "status": status, "cost": "0", "messageId": "None"}
            )
            continue
        message_id = f"ATXid_{uuid.uuid4().hex}"
        cost = _cost(number, size.segments)
        entry = {
            "id": message_id,
            "from": sender,
            "to": number,
            "message": message,
            "cost": cost,
            "encoding": size.encoding,
            "segments": size.segments,
            "status": "Submitted",
            "at": datetime.now(UTC).isoformat(),
        }
        state.inbox.setdefault(number, []).append(entry)
        state.by_id[message_id] = entry
        recipients.append(
            {"statusCode": 101, "number": number, "status": "Success", "cost": cost, "messageId": message_id}
        )
        status, reason = DELIVERY_FAILURES.get(failure or "", ("Success", None))
        _schedule_report(request.app, entry, status, reason)
    sent = sum(1 for r in recipients if r["statusCode"] == 101)
    return web.json_response(
        {
            "SMSMessageData": {
                "Message": f"Sent to {sent}/{len(to)} Total Cost: {recipients[0]['cost']}",
                "Recipients": recipients,
            }
        },
        status=201,
    )


def _schedule_report(app: web.Application, entry: dict[str, Any], status: str, reason: str | None) -> None:
    state = app[STATE]
    entry["final_status"] = status
    if not state.delivery_url:
        entry["status"] = status
        return
    task = asyncio.get_running_loop().create_task(_post_report(state, entry, status, reason))
    state.tasks.add(task)
    task.add_done_callback(state.tasks.discard)


def _network_code(number: str) -> str:
    """The MCC-MNC Africa's Talking reports for `number` (core.phone.network_code_of: its range's operator's), or
    UNKNOWN_NETWORK_CODE for one it cannot name (no operator known, or a country code nobody has)."""
    try:
        return network_code_of(number) or UNKNOWN_NETWORK_CODE
    except NumberParseException:
        return UNKNOWN_NETWORK_CODE


async def _post_report(state: SimulatorState, entry: dict[str, Any], status: str, reason: str | None) -> None:
    await asyncio.sleep(state.delivery_delay)
    entry["status"] = status
    form = {
        "id": entry["id"],
        "status": status,
        "phoneNumber": entry["to"],
        # The recipient's network as Africa's Talking reports it (its MCC-MNC: 63902 for a Safaricom number),
        # read from the number's range (a ported number is reported on its range's operator here).
        "networkCode": _network_code(entry["to"]),
        "retryCount": "0",
    }
    if reason:
        form["failureReason"] = reason
    if state.session is None or state.session.closed:
        state.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
    assert state.delivery_url
    for attempt in range(3):
        try:
            async with state.session.post(state.delivery_url, data=form) as response:
                state.reports_posted.append({**form, "answer": str(response.status)})
                if response.status < 500:
                    return
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("delivery report not taken", extra={"to": mask(entry["to"]), "error": str(exc)})
        await asyncio.sleep(0.5 * (attempt + 1))


async def _inbox(request: web.Request) -> web.Response:
    state = request.app[STATE]
    phone = request.match_info["phone"].strip()
    if not phone.startswith("+"):
        phone = "+" + phone
    return web.json_response({"phone": phone, "messages": state.messages(phone)})


async def _all_inboxes(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.json_response({"inboxes": {p: list(m) for p, m in state.inbox.items()}})


async def _clear(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.inbox.clear()
    state.by_id.clear()
    state.requests.clear()
    return web.json_response({"cleared": True})


async def _control(request: web.Request) -> web.Response:
    """POST {"failure": "UserInBlackList"|null, "number": "+250...", "times": 2}: set or clear a failure."""
    state = request.app[STATE]
    try:
        body = await request.json()
        times = body.get("times")
        state.set_failure(
            body.get("failure"), number=body.get("number"), times=int(times) if times is not None else None
        )
    except (ValueError, TypeError, AttributeError) as exc:
        return web.json_response({"error": str(exc)}, status=400)
    return web.json_response({"ok": True})


async def _on_cleanup(app: web.Application) -> None:
    state = app[STATE]
    for task in list(state.tasks):
        task.cancel()
    for task in list(state.tasks):
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    if state.session is not None:
        await state.session.close()


def create_simulator(
    *,
    username: str = "sandbox",
    api_key: str = "sim-dev-credential",
    delivery_url: str | None = None,
    delivery_delay: float = 0.5,
    failures: dict[str, str] | None = None,
    global_failure: str | None = None,
) -> web.Application:
    """The simulator as an aiohttp app: mount it under a prefix or run it as its own process.

    `failures` maps a phone number to a failure name (see SEND_FAILURES, DELIVERY_FAILURES,
    HTTP_FAILURES); `global_failure` applies to every message.
    """
    state = SimulatorState(
        username=username, api_key=api_key, delivery_url=delivery_url, delivery_delay=delivery_delay
    )
    for number, name in (failures or {}).items():
        state.set_failure(name, number=number)
    if global_failure:
        state.set_failure(global_failure)
    app = web.Application()
    app[STATE] = state
    app.router.add_post("/version1/messaging", _messaging)
    app.router.add_get("/_inbox", _all_inboxes)
    app.router.add_get("/_inbox/{phone}", _inbox)
    app.router.add_delete("/_inbox", _clear)
    app.router.add_post("/_control", _control)
    app.on_cleanup.append(_on_cleanup)
    return app


def simulator_from_settings(settings: Settings, *, delivery_delay: float = 0.5) -> web.Application:
    """The simulator as the gateway's own settings expect it: same username and key, reports sent back to
    `{PUBLIC_BASE_URL}/sms/africastalking/delivery` (with the callback secret when one is set)."""
    delivery_url = f"{settings.public_base_url}/sms/africastalking/delivery"
    secret = settings.callback_secrets.get("sms")
    if secret:
        delivery_url += "?" + urlencode({"secret": secret.get()})
    return create_simulator(
        username=settings.sms_username,
        api_key=settings.sms_api_key.get(),
        delivery_url=delivery_url,
        delivery_delay=delivery_delay,
    )
