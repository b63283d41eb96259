"""Fuzzed aggregator callbacks against the real app: every answer is a valid reply in the aggregator's own
format or a 4xx, never a 5xx and never a hang, whatever the body, encoding or content type."""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import quote_from_bytes

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from channels.ussd.routes import MAX_BODY

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
HOP_TIMEOUT = 10.0  # far above the 3 s hop budget: a hang, not a slow hop

DEMO_PHONES = ["+250788000001", "+250788000002", "+250733000001", "250788000003", "0788000001"]
CONTENT_TYPES = [
    "application/x-www-form-urlencoded", "application/json", "text/plain", "multipart/form-data",
    "application/x-www-form-urlencoded; charset=latin-1", "application/xml", None,
]
nasty_text = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(categories=["Cs", "Cc", "Cf", "Zl"]), min_size=1, max_size=10),
    st.text(alphabet=st.characters(max_codepoint=0x1F), max_size=40),  # control characters
    st.from_regex(r"\A[0-9*#]{0,40}\Z"),  # what a keypad can send
    st.integers(1, 6).map(lambda n: "1*" * n + "1"),  # walks through the menus
    st.integers(500, 5000).map(lambda n: "*" * n),  # thousands of stars
    st.integers(1, 20_000).map(lambda n: "9" * n),  # huge text
    st.sampled_from(["", " ", "\x00", "\u202e", "\ud83d\ude00", "CON x", "END y", "%00", "' OR 1=1 --",
                     "<script>alert(1)</script>", "${jndi:ldap://x}", "\r\nSet-Cookie: a=b"]),
)
phones = st.one_of(st.sampled_from(DEMO_PHONES), nasty_text, st.from_regex(r"\A\+?\d{0,20}\Z"))
raw_bytes = st.one_of(st.binary(max_size=300), st.just(b"\xff\xfe\xfa" * 50), st.just(b"\x80abc=\xc3\x28"))


async def post(client: Any, path: str, body: bytes, content_type: str | None) -> Any:
    headers = {"Content-Type": content_type} if content_type else {}
    resp = await asyncio.wait_for(client.post(path, data=body, headers=headers), HOP_TIMEOUT)
    raw = await asyncio.wait_for(resp.read(), HOP_TIMEOUT)
    return resp, raw


def assert_at_reply(resp: Any, raw: bytes) -> None:
    assert resp.status < 500, (resp.status, raw[:300])
    if resp.status == 200:
        assert resp.content_type == "text/plain", resp.content_type
        text = raw.decode("utf-8")
        assert text.startswith(("CON ", "END ")), text[:200]
    else:
        assert 400 <= resp.status < 500


def assert_hubtel_reply(resp: Any, raw: bytes) -> None:
    assert resp.status < 500, (resp.status, raw[:300])
    body = json.loads(raw.decode("utf-8"))
    assert isinstance(body, dict)
    if resp.status == 200:
        assert resp.content_type == "application/json"
        assert body["Type"] in ("Response", "Release") and isinstance(body["Message"], str), body
        assert isinstance(body["ClientState"], str) and body["DataType"] in ("input", "display")
    else:
        assert 400 <= resp.status < 500 and body.get("error"), body


def assert_nalo_reply(resp: Any, raw: bytes) -> None:
    assert resp.status < 500, (resp.status, raw[:300])
    body = json.loads(raw.decode("utf-8"))
    assert isinstance(body, dict)
    if resp.status == 200:
        assert resp.content_type == "application/json"
        assert set(body) == {"USERID", "MSISDN", "MSG", "MSGTYPE"}, body
        assert isinstance(body["MSG"], str) and len(body["MSG"]) <= 120
        assert isinstance(body["MSGTYPE"], bool)
    else:
        assert 400 <= resp.status < 500 and body.get("error"), body


def form_encode(fields: dict[str, str]) -> bytes:
    # urlencode by hand so that lone surrogates and odd code points go through as their bytes
    def enc(v: str) -> str:
        return quote_from_bytes(v.encode("utf-8", "surrogatepass"), safe="")

    return "&".join(f"{enc(k)}={enc(v)}" for k, v in fields.items()).encode()


def mutated(base: dict[str, Any], fuzz: Any) -> Any:
    """A valid body with some fields replaced by fuzz and some dropped: most requests get past the
    first check, so the deeper code is fuzzed too."""
    return st.tuples(fuzz, st.sets(st.sampled_from(sorted(base)), max_size=2)).map(
        lambda pair: {k: v for k, v in {**base, **pair[0]}.items() if k not in pair[1]})


at_forms = st.fixed_dictionaries({}, optional={
    "sessionId": st.one_of(st.uuids().map(str), nasty_text),
    "serviceCode": st.one_of(st.sampled_from(["*384*123#", "*384*123*3#", "*384#"]), nasty_text),
    "phoneNumber": phones,
    "text": nasty_text,
    "networkCode": st.one_of(st.just("63510"), nasty_text),
})


AT_BASE = {"sessionId": "ATUid_base", "serviceCode": "*384*123#", "phoneNumber": "+250788000001", "text": ""}
HUBTEL_BASE = {"Type": "Initiation", "Mobile": "233200000001", "SessionId": "hb-base", "ServiceCode": "384*123",
               "Message": "*384*123#", "Operator": "mtn", "Sequence": 1, "ClientState": ""}
NALO_BASE = {"MSGTYPE": True, "SESSIONID": "nl-base", "MSISDN": "233200000001", "USERDATA": "*384*123#",
             "NETWORK": "MTN", "USERID": "NALO_USER"}


@FUZZ
@given(form=st.one_of(at_forms, mutated(AT_BASE, at_forms)),
       ctype=st.sampled_from([*CONTENT_TYPES, "application/x-www-form-urlencoded"]))
async def test_africastalking_fuzzed_forms(client: Any, demo: Any, form: dict[str, str], ctype: str) -> None:
    resp, raw = await post(client, "/ussd/africastalking", form_encode(form), ctype)
    assert_at_reply(resp, raw)


@FUZZ
@given(body=raw_bytes, ctype=st.sampled_from(CONTENT_TYPES))
async def test_africastalking_raw_bytes(client: Any, demo: Any, body: bytes, ctype: str) -> None:
    resp, raw = await post(client, "/ussd/africastalking", body, ctype)
    assert_at_reply(resp, raw)
    resp, raw = await post(client, "/ussd/africastalking/events", body, ctype)
    assert resp.status < 500 and (resp.status == 200 or 400 <= resp.status < 500), resp.status


json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(allow_nan=False),
                        nasty_text)
json_value = st.recursive(json_scalar, lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)

hubtel_bodies = st.fixed_dictionaries({}, optional={
    "Type": st.one_of(st.sampled_from(["Initiation", "Response", "Release", "Timeout"]), json_value),
    "Mobile": st.one_of(phones, json_value),
    "SessionId": st.one_of(st.uuids().map(str), json_value),
    "ServiceCode": st.one_of(st.just("384*123"), json_value),
    "Message": st.one_of(nasty_text, json_value),
    "Operator": st.one_of(st.just("mtn"), json_value),
    "Sequence": json_value,
    "ClientState": json_value,
})
nalo_bodies = st.fixed_dictionaries({}, optional={
    "MSGTYPE": st.one_of(st.booleans(), st.sampled_from(["true", "false", "TRUE"]), json_value),
    "SESSIONID": st.one_of(st.uuids().map(str), json_value),
    "MSISDN": st.one_of(phones, json_value),
    "USERDATA": st.one_of(nasty_text, json_value),
    "NETWORK": st.one_of(st.just("MTN"), json_value),
    "USERID": st.one_of(st.just("NALO_USER"), json_value),
})


def json_bytes(value: Any) -> bytes:
    # ensure_ascii keeps lone surrogates as \\ud800 escapes, which is what a hostile client would send
    return json.dumps(value).encode()


@FUZZ
@given(body=st.one_of(hubtel_bodies, mutated(HUBTEL_BASE, hubtel_bodies), json_value),
       ctype=st.sampled_from(CONTENT_TYPES))
async def test_hubtel_fuzzed_json(client: Any, demo: Any, body: Any, ctype: str) -> None:
    resp, raw = await post(client, "/ussd/hubtel", json_bytes(body), ctype)
    assert_hubtel_reply(resp, raw)


@FUZZ
@given(body=st.one_of(nalo_bodies, mutated(NALO_BASE, nalo_bodies), json_value),
       ctype=st.sampled_from(CONTENT_TYPES))
async def test_nalo_fuzzed_json(client: Any, demo: Any, body: Any, ctype: str) -> None:
    resp, raw = await post(client, "/ussd/nalo", json_bytes(body), ctype)
    assert_nalo_reply(resp, raw)


@FUZZ
@given(body=raw_bytes)
async def test_hubtel_and_nalo_raw_bytes(client: Any, body: bytes) -> None:
    assert_hubtel_reply(*await post(client, "/ussd/hubtel", body, "application/json"))
    assert_nalo_reply(*await post(client, "/ussd/nalo", body, "application/json"))


async def test_named_hostile_bodies(client: Any, demo: Any) -> None:
    """The cases the issue names, each spelled out once, for every aggregator."""
    base_at = {"sessionId": "ATUid_fuzz", "serviceCode": "*384*123#", "phoneNumber": "+250788000001"}
    at_cases = [
        form_encode({**base_at, "text": "*" * 5000}),
        form_encode({**base_at, "text": "1" * (MAX_BODY * 2)}),
        form_encode({**base_at, "text": "\x00\x01\x1b[2J\x7f"}),
        form_encode({**base_at, "text": "\ud800"}),
        form_encode({k: v for k, v in base_at.items() if k != "phoneNumber"}),
        b"sessionId=x&phoneNumber=%FF%FE&text=\xff",
        b"\xff" * 100,
        b"",
    ]
    for body in at_cases:
        assert_at_reply(*await post(client, "/ussd/africastalking", body, "application/x-www-form-urlencoded"))
    hubtel_cases: list[bytes] = [
        json_bytes([{"Type": "Initiation"}]), json_bytes("Initiation"), json_bytes(None), b"[]", b"{",
        json_bytes({"Type": "Response", "Mobile": "233200000001", "SessionId": "s", "Message": "*" * 5000}),
        json_bytes({"Type": "Initiation", "Mobile": "233200000001", "SessionId": "s1", "Message": "*384*123#",
                    "ClientState": "\ud800"}),
        json_bytes({"Type": "Initiation", "Mobile": "233200000001", "SessionId": "\ud800", "Message": ""}),
        b'{"Type": "Initiation", "Mobile": "233200000001", "SessionId": "s2", "Message": "\xff"}',
        b"{" + b'"a":1,' * (MAX_BODY // 6 + 10) + b'"b":2}',
    ]
    for body in hubtel_cases:
        assert_hubtel_reply(*await post(client, "/ussd/hubtel", body, "application/json"))
    nalo_cases: list[bytes] = [
        json_bytes([{"MSGTYPE": True}]), b"[]", b"17", b"\xff\xfe",
        json_bytes({"MSGTYPE": True, "SESSIONID": "n1", "MSISDN": "233200000001", "USERDATA": "*" * 5000}),
        json_bytes({"MSGTYPE": True, "SESSIONID": "n2", "MSISDN": "233200000001", "USERID": "\ud800"}),
        json_bytes({"MSGTYPE": True, "SESSIONID": "n3", "MSISDN": ["233200000001"], "USERID": "u"}),
        json_bytes({"MSGTYPE": False, "SESSIONID": "n4", "MSISDN": "233200000001"}),
    ]
    for body in nalo_cases:
        assert_nalo_reply(*await post(client, "/ussd/nalo", body, "application/json"))


async def test_a_fuzzed_session_does_not_break_the_next_real_one(client: Any, demo: Any) -> None:
    """After garbage on a session id, the same phone still gets the real menu on a new session."""
    junk = form_encode({"sessionId": "ATUid_same", "serviceCode": "*384*123#", "phoneNumber": "+250788000001",
                        "text": "*" * 400})
    assert_at_reply(*await post(client, "/ussd/africastalking", junk, "application/x-www-form-urlencoded"))
    fresh = form_encode({"sessionId": "ATUid_fresh", "serviceCode": "*384*123#",
                         "phoneNumber": "+250788000001", "text": ""})
    resp, raw = await post(client, "/ussd/africastalking", fresh, "application/x-www-form-urlencoded")
    assert resp.status == 200 and raw.decode().startswith("CON ")
