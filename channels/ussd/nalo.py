"""Nalo USSD (Ghana): JSON callbacks with MSGTYPE true on the first hop; MSG at most 120 characters."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from channels.ussd.types import UssdReply, UssdTurn, extension_of
from channels.ussd.wire import MalformedRequest, Parsed, Rendered, network_field, phone_field, text_field

# Ghana's: a number sent in local form (0244123456) is a Ghanaian one, not one of the default region.
REGION = "GH"
NAME = "nalo"
LIMIT = 120


def _flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise MalformedRequest("MSGTYPE must be true or false")


def parse(body: Mapping[str, Any], base_code: str) -> Parsed:
    if not isinstance(body, Mapping):
        raise MalformedRequest("body must be a JSON object")
    if "MSGTYPE" not in body:
        raise MalformedRequest("MSGTYPE is required")
    first = _flag(body["MSGTYPE"])
    session_id = text_field(body, "SESSIONID", max_len=128)
    phone = phone_field(body, "MSISDN", region=REGION)
    # USERDATA must be there after the first hop, but may be empty (an empty reply): "invalid choice", not 400.
    if not first and body.get("USERDATA") is None:
        raise MalformedRequest("USERDATA is required")
    userdata = text_field(body, "USERDATA", required=False, max_len=200)
    turn = UssdTurn(
        aggregator=NAME, session_id=session_id, phone=phone,
        service_code=userdata if first and userdata.startswith("*") else base_code,
        input=None if first else userdata, is_new=first,
        network=network_field(body, "NETWORK"),
        # Nalo sends nothing that tells a retry from the same key pressed twice.
        hop_key=None,
        extension=extension_of(userdata, base_code) if first else None,
    )
    # USERID goes back as Nalo sent it: a number stays a number, as MSISDN does (checked, never rewritten).
    userid = body.get("USERID") if text_field(body, "USERID", required=False, max_len=64) else ""
    echo = {"USERID": userid, "MSISDN": body.get("MSISDN")}
    return Parsed(turn, echo)


def render(reply: UssdReply, parsed: Parsed | None = None) -> Rendered:
    echo = parsed.echo if parsed else {}
    body = {"USERID": echo.get("USERID", ""), "MSISDN": echo.get("MSISDN", ""), "MSG": reply.text[:LIMIT],
            "MSGTYPE": not reply.end}
    return Rendered(200, json.dumps(body, ensure_ascii=False).encode(), "application/json")


def render_malformed(message: str) -> Rendered:
    body = json.dumps({"error": "Bad Request", "message": message}).encode()
    return Rendered(400, body, "application/json")
