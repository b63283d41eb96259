"""Fuzzed SMS and payment-provider callbacks against the real app (every secret configured and given):
a 2xx or a 4xx, never a 5xx or a hang, and a refused callback leaves every table as it was."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.security.conftest import SECRETS, pending_payment, snapshot
from tests.security.test_fuzz_ussd import form_encode, json_value, mutated, nasty_text, raw_bytes

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
# A hang, not a slow answer: a fresh-clone CI run once took over 10 s for an unmatched MTN callback (a stalled
# machine: Hypothesis's rerun of the same body answered at once). Far above any callback's own budget.
TIMEOUT = 30.0
PROVIDERS = ("mtn_momo", "airtel", "mpesa", "irembopay")
CONTENT_TYPES = ["application/json", "application/x-www-form-urlencoded", "text/plain", "multipart/form-data",
                 "application/json; charset=latin-1", None]

MTN = {"financialTransactionId": "1843215792", "externalId": "x", "amount": "15000", "currency": "RWF",
       "payer": {"partyIdType": "MSISDN", "partyId": "250788000001"}, "status": "SUCCESSFUL"}
AIRTEL = {"transaction": {"id": "x", "message": "ok", "status_code": "TS", "airtel_money_id": "MP1"},
          "hash": "AAAA"}
MPESA = {"Body": {"stkCallback": {"MerchantRequestID": "1", "CheckoutRequestID": "ws_CO_1", "ResultCode": 0,
                                  "ResultDesc": "ok", "CallbackMetadata": {"Item": [
                                      {"Name": "Amount", "Value": 1}, {"Name": "PhoneNumber",
                                                                      "Value": 254708374149}]}}}}
IREMBO = {"success": True, "data": {"transactionId": "x", "invoiceNumber": "880", "paymentStatus": "PAID",
                                    "amount": 100, "currency": "RWF"}}
BASES = {"mtn_momo": MTN, "airtel": AIRTEL, "mpesa": MPESA, "irembopay": IREMBO}


def secret_for(name: str) -> str:
    return SECRETS[f"CALLBACK_SECRET_{name.upper()}"]


async def send(client: Any, method: str, path: str, body: bytes, ctype: str | None,
               headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    h = {"Content-Type": ctype} if ctype else {}
    h.update(headers or {})
    resp = await asyncio.wait_for(client.request(method, path, data=body, headers=h), TIMEOUT)
    return resp.status, await asyncio.wait_for(resp.read(), TIMEOUT)


def nested(value: Any) -> Any:
    """Replace some leaves of a valid provider body with fuzz (types and all)."""
    leaves = st.one_of(json_value, nasty_text)
    if isinstance(value, dict):
        return st.fixed_dictionaries({k: st.one_of(nested(v), leaves) for k, v in value.items()})
    if isinstance(value, list):
        return st.lists(st.one_of(*(nested(v) for v in value)) if value else leaves, max_size=3)
    return st.one_of(st.just(value), leaves)


def provider_bodies(name: str) -> Any:
    return st.one_of(
        nested(BASES[name]).map(lambda v: json.dumps(v).encode()),
        json_value.map(lambda v: json.dumps(v).encode()),  # arrays, scalars, objects of junk
        raw_bytes,
        st.just(b"[" + json.dumps(BASES[name]).encode() + b"]"),
    )


@FUZZ
@given(data=st.data())
async def test_provider_callbacks_fuzzed(srt: Any, sclient: Any, sdemo: Any, data: Any) -> None:
    name = data.draw(st.sampled_from(PROVIDERS))
    body = data.draw(provider_bodies(name))
    ctype = data.draw(st.sampled_from(CONTENT_TYPES))
    method = data.draw(st.sampled_from(["POST", "PUT"]))
    before = await snapshot(srt)
    status, raw = await send(sclient, method, f"/webhooks/payments/{name}?secret={secret_for(name)}", body, ctype)
    assert status < 500, (name, status, raw[:300], body[:300])
    answer = json.loads(raw)
    assert isinstance(answer, dict)
    if status >= 400:
        assert answer["statusCode"] == status and answer["message"], answer
        assert await snapshot(srt) == before, (name, body[:200])
    else:
        assert status == 200


@FUZZ
@given(body=st.one_of(raw_bytes, st.just(b"{}"), st.just(b"[]")), name=st.sampled_from(PROVIDERS))
async def test_provider_callback_without_secret_is_refused_before_the_body_is_read(
        srt: Any, sclient: Any, sdemo: Any, body: bytes, name: str) -> None:
    before = await snapshot(srt)
    for query in ("", "?secret=", "?secret=guess", f"?secret={secret_for(name)}x", "?Secret=" + secret_for(name)):
        status, raw = await send(sclient, "POST", f"/webhooks/payments/{name}{query}", body, "application/json")
        assert status == 401, (name, query, status)
        assert json.loads(raw)["statusCode"] == 401
    assert await snapshot(srt) == before


async def test_unknown_provider_and_oversized_callback(srt: Any, sclient: Any, sdemo: Any) -> None:
    before = await snapshot(srt)
    status, _ = await send(sclient, "POST", "/webhooks/payments/..%2F..%2Fetc", b"{}", "application/json")
    assert status == 404
    status, _ = await send(sclient, "POST", "/webhooks/payments/MTN_MOMO", b"{}", "application/json")
    assert status == 404
    huge = b'{"a":"' + b"x" * (2 * 1024 * 1024) + b'"}'
    for name in PROVIDERS:
        status, _ = await send(sclient, "POST", f"/webhooks/payments/{name}?secret={secret_for(name)}", huge,
                               "application/json")
        assert status == 413, (name, status)
    assert await snapshot(srt) == before


async def test_unconfirmable_callback_is_a_clean_retry_later(srt: Any, sclient: Any, sdemo: Any) -> None:
    """An unsigned MTN callback for a real payment is confirmed by a status query; when MTN cannot be
    reached the provider is told to retry (503), and nothing is recorded."""
    payment = await pending_payment(srt, sdemo, provider="mtn_momo", method="MOBILE_MONEY_MTN")
    before = await snapshot(srt)
    body = json.dumps({**MTN, "externalId": payment.provider_reference}).encode()
    status, raw = await send(sclient, "PUT", f"/webhooks/payments/mtn_momo?secret={secret_for('mtn_momo')}"
                             f"&ref={payment.provider_reference}", body, "application/json")
    assert status == 503, (status, raw[:300])
    assert json.loads(raw)["statusCode"] == 503
    assert await snapshot(srt) == before


# --- SMS -------------------------------------------------------------------------------------------

sms_forms = st.fixed_dictionaries({}, optional={
    "id": st.one_of(st.uuids().map(str), nasty_text),
    "status": st.one_of(st.sampled_from(["Success", "Failed", "Rejected", "Sent", "Buffered"]), nasty_text),
    "failureReason": nasty_text,
    "from": st.one_of(st.sampled_from(["+250788000001", "+250788999999", "0788000002"]), nasty_text),
    "to": nasty_text,
    "text": st.one_of(st.sampled_from(["RECEIPT PAY_20260101_001", "STOP", "HELP", "status"]), nasty_text),
    "date": nasty_text,
    "linkId": nasty_text,
})
SMS_BASE = {"id": "ATXid_1", "status": "Success", "from": "+250788000001", "text": "HELP", "date": "2026-01-01"}


@FUZZ
@given(form=st.one_of(sms_forms, mutated(SMS_BASE, sms_forms)), raw=raw_bytes,
       ctype=st.sampled_from(CONTENT_TYPES), which=st.sampled_from(["delivery", "inbound"]))
async def test_sms_callbacks_fuzzed(srt: Any, sclient: Any, sdemo: Any, form: dict[str, str], raw: bytes,
                                    ctype: str, which: str) -> None:
    path = f"/sms/africastalking/{which}?secret={SECRETS['CALLBACK_SECRET_SMS']}"
    for body in (form_encode(form), raw, json.dumps(form).encode()):
        before = await snapshot(srt)
        status, answer = await send(sclient, "POST", path, body, ctype)
        assert status < 500, (which, status, answer[:300], body[:200])
        if status >= 400:
            assert await snapshot(srt) == before, (which, body[:200])


async def test_sms_callbacks_refuse_a_missing_or_wrong_secret(srt: Any, sclient: Any, sdemo: Any) -> None:
    before = await snapshot(srt)
    body = form_encode({"from": "+250788000001", "text": "STOP", "id": "1", "status": "Success"})
    for which in ("delivery", "inbound"):
        for query in ("", "?secret=", "?secret=nope"):
            status, _ = await send(sclient, "POST", f"/sms/africastalking/{which}{query}", body,
                                   "application/x-www-form-urlencoded")
            assert status == 403
    assert await snapshot(srt) == before


async def test_sms_named_hostile_bodies(srt: Any, sclient: Any, sdemo: Any) -> None:
    path = f"/sms/africastalking/inbound?secret={SECRETS['CALLBACK_SECRET_SMS']}"
    for body in (b"from=%2B250788000001&text=\xff\xfe", b"from=%FF&text=HELP", b"from=%2B250788000001&text=%00",
                 form_encode({"from": "+250788000001", "text": "RECEIPT " + "*" * 5000}),
                 form_encode({"from": "+250788000001", "text": "\ud800"}),
                 b"from=" + b"9" * 2_000_000):
        status, answer = await send(sclient, "POST", path, body, "application/x-www-form-urlencoded")
        assert status < 500, (status, answer[:300], body[:100])
    dpath = f"/sms/africastalking/delivery?secret={SECRETS['CALLBACK_SECRET_SMS']}"
    for body in (b"id=%00&status=Success", b"id=\xff&status=Success", b"id=1&status=%00",
                 form_encode({"id": "\ud800", "status": "Success"})):
        status, answer = await send(sclient, "POST", dpath, body, "application/x-www-form-urlencoded")
        assert status < 500, (status, answer[:300], body[:100])


async def test_callback_strings_the_database_cannot_store_are_a_400(srt: Any, sclient: Any, sdemo: Any) -> None:
    """A lone surrogate or NUL escaped in a provider's JSON used to reach the JSON column and fail as a 500."""
    before = await snapshot(srt)
    for name, body in (("mtn_momo", {**MTN, "externalId": "ref-1", "payer": {"partyId": "\ud9ca"}}),
                       ("mtn_momo", {**MTN, "externalId": "ref-2", "reason": "a\u0000b"}),
                       ("mpesa", {"Body": {"stkCallback": {**MPESA["Body"]["stkCallback"], "ResultDesc": "\udc00"}}})):
        status, raw = await send(sclient, "POST", f"/webhooks/payments/{name}?secret={secret_for(name)}",
                                 json.dumps(body).encode(), "application/json")
        assert status == 400, (name, status, raw[:200])
    # The same strings written otherwise: a surrogate as its raw bytes (json.loads reads them as one), the body in
    # UTF-16 (json.loads reads that too). Neither has a "\u" escape in its bytes.
    mtn = f"/webhooks/payments/mtn_momo?secret={secret_for('mtn_momo')}"
    cesu = json.dumps({**MTN, "externalId": "ref-3", "reason": "SURROGATE"}).encode().replace(
        b"SURROGATE", b"\xed\xa0\x80")
    utf16 = json.dumps({**MTN, "externalId": "ref-4", "reason": "a\u0000b"}).encode("utf-16")
    for body in (cesu, utf16):
        status, raw = await send(sclient, "POST", mtn, body, "application/json")
        assert status == 400, (status, raw[:200], body[:60])
    assert await snapshot(srt) == before


@pytest.mark.parametrize(("body", "unstorable"), [
    (b'{"a":"x\\u0000y"}', True), (b'{"a":"\\ud800"}', True), (b'{"a":"\\uDC00"}', True),
    (b'{"a":"\xed\xa0\x80"}', True),  # a surrogate as its bytes: json.loads reads it as one
    ('{"a":"\\u0000"}'.encode("utf-16"), True), ('{"a":"\\u0000"}'.encode("utf-32"), True),
    (b'{"a":"ok"}', False), ('{"a":"Kigali é 🙏"}'.encode(), False), (b'{"a":"\\u00e9\\ud83d\\ude4f"}', False),
    ('{"a":"ok"}'.encode("utf-16"), False), (b'not json', False),
])
def test_unstorable_strings_are_found_however_the_body_writes_them(body: bytes, unstorable: bool) -> None:
    """routes._unstorable_json skips its parse for a body with no escape, no byte ED and no NUL: no such body can
    hold a NUL or a lone surrogate. Every way of writing one is still found."""
    from providers.routes import _unstorable_json

    assert _unstorable_json(body) is unstorable
