"""Hubtel USSD (Ghana): JSON callbacks with the latest input only, Response/Release JSON replies."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from channels.ussd.types import UssdReply, UssdTurn, extends, extension_of
from channels.ussd.wire import MalformedRequest, Parsed, Rendered, network_field, phone_field, text_field
from core.text import is_number

# Ghana's: a number sent in local form (0244123456) is a Ghanaian one, not one of the default region.
REGION = "GH"
NAME = "hubtel"
LIMIT = 182
_TYPES = ("Initiation", "Response", "Release", "Timeout")


def parse(body: Mapping[str, Any], base_code: str) -> Parsed:
    if not isinstance(body, Mapping):
        raise MalformedRequest("body must be a JSON object")
    given = text_field(body, "Type", max_len=16)
    # In any case: Hubtel's programmable services write Type in lower case ("response", "release").
    kind = next((known for known in _TYPES if known.lower() == given.strip().lower()), None)
    if kind is None:
        raise MalformedRequest(f"Type {given!r} is not one of {', '.join(_TYPES)}")
    session_id = text_field(body, "SessionId", max_len=128)
    phone = phone_field(body, "Mobile", region=REGION)
    service_code = text_field(body, "ServiceCode", required=False, max_len=32)
    # A Response must carry Message, but it may be empty (the user sent an empty reply): the menu answers
    # "invalid choice" as it does on Africa's Talking, instead of a 400 that ends the session.
    if kind == "Response" and body.get("Message") is None:
        raise MalformedRequest("Message is required")
    message = text_field(body, "Message", required=False, max_len=200)
    sequence = body.get("Sequence")
    if sequence is not None and (isinstance(sequence, bool) or not isinstance(sequence, int | str)):
        raise MalformedRequest("Sequence must be a number")
    number = (sequence if isinstance(sequence, int)
              else int(sequence) if isinstance(sequence, str) and len(sequence) <= 9 and is_number(sequence)
              else None)
    dialled = message if kind == "Initiation" and message.startswith("*") else ""
    code = service_code if service_code.startswith("*") else f"*{service_code}#"
    # The extension is what follows our configured code, in the dialled string (Message on Initiation) or,
    # when Hubtel puts the whole dialled code there, in ServiceCode itself.
    extension = None
    if kind == "Initiation":
        extension = _dialled_extension(dialled, base_code, code) or extension_of(code, base_code)
    turn = UssdTurn(
        aggregator=NAME, session_id=session_id, phone=phone, service_code=dialled or code,
        input=message if kind == "Response" else None, is_new=kind == "Initiation",
        network=network_field(body, "Operator"),
        hop_key=f"{kind}:{sequence}" if sequence is not None else None,
        sequence=number if number is not None and 0 <= number < 2**31 else None,
        extension=extension,
        closed=kind in ("Release", "Timeout"),
    )
    # Echoed back verbatim, so it is checked like any other field (a string, printable, bounded).
    return Parsed(turn, {"ClientState": text_field(body, "ClientState", required=False, max_len=1000)})


def _dialled_extension(dialled: str, base_code: str, service_code: str) -> str | None:
    """The extension in the dialled string: what follows our configured code when the member dialled it (none
    when they dialled exactly it), and only otherwise what follows Hubtel's ServiceCode.

    On a shared short code our code is itself a sub-code (*713*45#, ServiceCode "713"): read relative to the
    ServiceCode, the plain app code would give "45" and send the member to whichever cooperative has that
    extension.
    """
    if not dialled:
        return None
    if extends(dialled, base_code):
        return extension_of(dialled, base_code)
    return extension_of(dialled, service_code)


def render(reply: UssdReply, parsed: Parsed | None = None) -> Rendered:
    body = {
        "Type": "Release" if reply.end else "Response",
        "Message": reply.text,
        "Label": "CoopPay",
        "ClientState": (parsed.echo.get("ClientState") if parsed else "") or "",
        "DataType": "display" if reply.end else "input",
        "FieldType": "text",
    }
    return Rendered(200, json.dumps(body, ensure_ascii=False).encode(), "application/json")


def render_malformed(message: str) -> Rendered:
    body = json.dumps({"error": "Bad Request", "message": message}).encode()
    return Rendered(400, body, "application/json")
