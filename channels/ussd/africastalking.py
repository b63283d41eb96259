"""Africa's Talking USSD: form callbacks with every input so far joined by '*', CON/END text replies."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from channels.ussd.i18n import translate
from channels.ussd.types import UssdReply, UssdTurn, extension_of
from channels.ussd.wire import MalformedRequest, Parsed, Rendered, network_field, phone_field, text_field
from core.phone import Phone
from core.text import is_number

NAME = "africastalking"
LIMIT = 182  # GSM-7 characters per screen
# `text` is every input of the session so far, and only its newest part is read. A USSD input is at most 182
# characters and a session lasts a few minutes: 8 KiB holds over 40 inputs of full length, more than a session
# has time for (a session of ordinary choices is a few dozen characters). The request body's own cap (16 KiB,
# channels.ussd.routes.MAX_BODY) is what protects the parser; this keeps the session kept in Redis, which holds
# the text twice, small. (At 500 characters, three long inputs ended a member's session.)
MAX_TEXT = 8 * 1024


class MalformedHop(MalformedRequest):
    """A hop whose phone number is readable but another field is not: she is answered in her language."""

    def __init__(self, message: str, phone: Phone) -> None:
        super().__init__(message)
        self.phone = phone


def parse(form: Mapping[str, Any], base_code: str) -> Parsed:
    """A session hop. `text` is accumulated; the session store works out the latest input."""
    phone = phone_field(form, "phoneNumber")
    try:
        session_id = text_field(form, "sessionId", max_len=128)
        service_code = text_field(form, "serviceCode", max_len=32)
        text = text_field(form, "text", required=False, max_len=MAX_TEXT)
        network = network_field(form, "networkCode")
    except MalformedRequest as exc:
        raise MalformedHop(str(exc), phone) from None
    turn = UssdTurn(
        aggregator=NAME, session_id=session_id, phone=phone, service_code=service_code, input=None,
        is_new=text == "", network=network, accumulated=text, hop_key=text,
        extension=extension_of(service_code, base_code),
    )
    return Parsed(turn)


def render(reply: UssdReply, _parsed: Parsed | None = None) -> Rendered:
    prefix = "END " if reply.end else "CON "
    return Rendered(200, (prefix + reply.text).encode(), "text/plain")


def render_malformed(_detail: str, lang: str | None = None) -> Rendered:
    # Africa's Talking ends the user's session on a 4xx anyway; a clean END is kinder, in the phone's language
    # when it is known (MalformedHop). The detail is for our logs, not for the user's screen.
    return render(UssdReply(translate(lang, "error.generic"), True))


def parse_event(form: Mapping[str, Any]) -> dict[str, Any]:
    """End-of-session notification fields, checked; the route turns them into a SessionEvent."""
    status = text_field(form, "status", max_len=16)
    if status not in ("Success", "Incomplete", "Failed"):
        raise MalformedRequest(f"status {status!r} is not Success, Incomplete or Failed")
    phone: Phone = phone_field(form, "phoneNumber")

    def number(name: str) -> int | None:
        raw = text_field(form, name, required=False, max_len=12)
        if not raw:
            return None
        if not is_number(raw):
            raise MalformedRequest(f"{name} must be a whole number")
        return int(raw)

    return {
        "session_id": text_field(form, "sessionId", max_len=128),
        "phone": phone,
        "service_code": text_field(form, "serviceCode", required=False, max_len=32),
        "network": network_field(form, "networkCode"),
        "status": status,
        "hops": number("hopsCount"),
        "duration_ms": number("durationInMillis"),
        "cost": text_field(form, "cost", required=False, max_len=32) or None,
        "error": text_field(form, "errorMessage", required=False, max_len=1000) or None,
    }


__all__ = ["LIMIT", "MAX_TEXT", "NAME", "MalformedHop", "MalformedRequest", "parse", "parse_event", "render",
           "render_malformed"]
