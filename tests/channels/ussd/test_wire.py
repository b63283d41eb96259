"""Table-driven parsing and rendering per aggregator over recorded request bodies."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from channels.ussd import africastalking, hubtel, nalo
from channels.ussd.types import UssdReply
from channels.ussd.wire import MalformedRequest, Parsed

FIXTURES = Path(__file__).parents[2] / "fixtures" / "ussd"
MODULES = {"africastalking": africastalking, "hubtel": hubtel, "nalo": nalo}


def cases(kind: str) -> list[Any]:
    out = []
    for name, module in MODULES.items():
        data = json.loads((FIXTURES / f"{name}.json").read_text())
        for case in data.get(kind, []):
            out.append(pytest.param(module, data["base_code"], case, id=f"{name}:{case['name']}"))
    return out


@pytest.mark.parametrize(("module", "base", "case"), cases("parse"))
def test_parse(module: Any, base: str, case: dict[str, Any]) -> None:
    if "error" in case:
        with pytest.raises(MalformedRequest) as err:
            module.parse(case["body"], base)
        assert str(err.value) == case["error"]
        return
    parsed = module.parse(case["body"], base)
    turn = parsed.turn
    assert turn.aggregator == module.NAME
    for field, expected in case["turn"].items():
        actual = getattr(turn, field)
        if field == "phone":
            actual = actual.e164
        assert actual == expected, field
    for field, expected in case.get("echo", {}).items():
        assert parsed.echo[field] == expected


@pytest.mark.parametrize(("module", "base", "case"), cases("render"))
def test_render(module: Any, base: str, case: dict[str, Any]) -> None:
    reply = UssdReply(case["reply"]["text"], case["reply"]["end"])
    parsed = Parsed(turn=None, echo=case.get("echo", {}))  # type: ignore[arg-type]
    rendered = module.render(reply, parsed)
    assert rendered.status == case["status"]
    assert rendered.content_type == case["content_type"]
    if "json" in case:
        assert json.loads(rendered.body) == case["json"]
    else:
        assert rendered.body.decode() == case["body"]


@pytest.mark.parametrize(("module", "base", "case"), cases("events"))
def test_africastalking_events(module: Any, base: str, case: dict[str, Any]) -> None:
    if "error" in case:
        with pytest.raises(MalformedRequest) as err:
            module.parse_event(case["body"])
        assert str(err.value) == case["error"]
        return
    fields = module.parse_event(case["body"])
    for field, expected in case["fields"].items():
        assert fields[field] == expected, field


def test_malformed_replies() -> None:
    at = africastalking.render_malformed("phoneNumber is required")
    assert (at.status, at.body.decode()) == (200, "END Sorry, we could not complete your request. "
                                                  "Please try again later.")
    for module in (hubtel, nalo):
        bad = module.render_malformed("MSGTYPE is required")
        assert bad.status == 400
        assert json.loads(bad.body) == {"error": "Bad Request", "message": "MSGTYPE is required"}


def test_nalo_never_sends_more_than_120_characters() -> None:
    rendered = nalo.render(UssdReply("x" * 200, True), None)
    assert len(json.loads(rendered.body)["MSG"]) == 120


@pytest.mark.parametrize(("service_code", "message", "extension"), [
    ("384*123", "*384*123*7#", "7"),        # the dialled code in Message
    ("*384*123*7#", "", "7"),               # the whole dialled code in ServiceCode
    ("*384*123*7#", "*384*123*7#", "7"),
    ("384*123", "*384*123#", None),
    ("*384*123#", "", None),
])
def test_hubtel_finds_the_extension_wherever_the_dialled_code_is(service_code: str, message: str,
                                                                 extension: str | None) -> None:
    parsed = hubtel.parse({"Type": "Initiation", "SessionId": "s-1", "Mobile": "233244000001",
                           "ServiceCode": service_code, "Message": message, "Operator": "mtn"}, "*384*123#")
    assert parsed.turn.extension == extension


@pytest.mark.parametrize(("kind", "expected"), [("initiation", "Initiation"), ("RESPONSE", "Response"),
                                                ("release", "Release"), ("timeout", "Timeout")])
def test_hubtel_reads_the_type_in_any_case(kind: str, expected: str) -> None:
    """Hubtel's programmable services write their own Type in lower case ("response", "release"): a request Type in
    another case than PROTOCOLS.md's is the same hop, not a 400 that ends the member's session."""
    body = {"Type": kind, "SessionId": "s-1", "Mobile": "233244000001", "ServiceCode": "384*123", "Message": "1",
            "Sequence": 2}
    turn = hubtel.parse(body, "*384*123#").turn
    same = hubtel.parse({**body, "Type": expected}, "*384*123#").turn
    assert turn == same
    assert (turn.is_new, turn.closed, turn.hop_key) == (expected == "Initiation", expected in ("Release", "Timeout"),
                                                        f"{expected}:2")


@pytest.mark.parametrize(("sequence", "kept"), [(2, 2), ("7", 7), (2**31 - 1, 2**31 - 1), (2**31, None), (-1, None),
                                                ("999999999", 999_999_999)])
def test_hubtel_sequence_is_kept_only_as_a_hop_counter_can_be(sequence: Any, kept: int | None) -> None:
    """Sequence orders a session's hops (a hop at or below the latest one is answered as a retry): a value no hop
    counter reaches (negative, past 32 bits) is not kept, else every later hop of the session read as a retry."""
    body = {"Type": "Response", "SessionId": "s-1", "Mobile": "233244000001", "ServiceCode": "384*123",
            "Message": "1", "Sequence": sequence}
    assert hubtel.parse(body, "*384*123#").turn.sequence == kept


def test_a_field_of_exactly_its_limit_is_read_and_a_boolean_is_no_text() -> None:
    """A field as long as its limit is taken (Hubtel's SessionId of 128 characters), one character more is not; a
    JSON true is no text (Nalo's USERDATA: true is refused, never read as the input "True")."""
    body = {"Type": "Initiation", "SessionId": "s" * 128, "Mobile": "233244000001", "ServiceCode": "384*123",
            "Message": "*384*123#"}
    assert hubtel.parse(body, "*384*123#").turn.session_id == "s" * 128
    with pytest.raises(MalformedRequest, match="SessionId is too long"):
        hubtel.parse({**body, "SessionId": "s" * 129}, "*384*123#")
    with pytest.raises(MalformedRequest, match="USERDATA must be a string"):
        nalo.parse({"USERID": "u", "MSISDN": "233244000001", "USERDATA": True, "MSGTYPE": False,
                    "SESSIONID": "n-1", "NETWORK": "MTN"}, "*384*123#")


def test_a_network_name_of_up_to_64_characters_is_kept() -> None:
    """The network is a hint, kept as the aggregator names it up to 64 characters (the session row keeps 16): a
    longer name than 16 is no reason to drop it; one past 64 is read as no network, never a 400."""
    name = "Vodafone Ghana (Telecel) prepaid"
    body = {"Type": "Initiation", "SessionId": "s-1", "Mobile": "233244000001", "ServiceCode": "384*123",
            "Message": "*384*123#", "Operator": name}
    assert hubtel.parse(body, "*384*123#").turn.network == name
    assert hubtel.parse({**body, "Operator": "x" * 65}, "*384*123#").turn.network is None
