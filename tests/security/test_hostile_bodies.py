"""Bodies anyone can send that break a decoder: a Content-Encoding the bytes do not follow, JSON nested past
Python's parser. Each is the sender's 400 with a clear message and one WARNING line, never a 500 with an ERROR
traceback (which alerts, and came before any credential or rate limit was checked). And what /v1 answers let a
cache keep."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from tests.admin_api.conftest import bearer
from tests.security.conftest import SECRETS

NOT_GZIP = b'{"username": "a", "password": "b"}'  # sent as Content-Encoding: gzip, which it is not
FORM = "application/x-www-form-urlencoded"
DEEP = b"[" * 5000  # 5 KB: far under every body limit, far past the JSON parser's nesting


def _errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.ERROR]


def _warnings(caplog: pytest.LogCaptureFixture, message: str) -> int:
    return sum(1 for r in caplog.records if r.levelno == logging.WARNING and r.getMessage() == message)


def _gzip_headers(**extra: str) -> dict[str, str]:
    return {"Content-Type": "application/json", "Content-Encoding": "gzip", **extra}


async def test_a_broken_gzip_body_on_the_api_is_a_400_every_time(client: Any, demo: Any,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    answers = []
    for path in ["/v1/auth/token"] + ["/v1/payments"] * 12:  # no credentials: the body is read first
        resp = await client.post(path, data=NOT_GZIP, headers=_gzip_headers())
        answers.append((resp.status, await resp.json(), resp.headers.get("Connection")))
    for status, body, connection in answers:
        assert status == 400, answers
        assert body["statusCode"] == 400 and body["error"] == "Bad Request"
        assert body["message"] == "the request body could not be read: Can not decode content-encoding: gzip"
        # The parser stopped mid-body: nothing more can be read on this connection.
        assert connection == "close"
    assert _warnings(caplog, "request body could not be read") == len(answers)
    assert not _errors(caplog)


async def test_a_broken_gzip_body_on_a_callback_is_a_400(sclient: Any, sdemo: Any,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    for path, secret, ctype in (("/webhooks/payments/airtel", "CALLBACK_SECRET_AIRTEL", "application/json"),
                                ("/webhooks/payments/mtn_momo", "CALLBACK_SECRET_MTN_MOMO", "application/json"),
                                ("/ussd/africastalking/events", "CALLBACK_SECRET_AFRICASTALKING", FORM),
                                ("/sms/africastalking/inbound", "CALLBACK_SECRET_SMS", FORM)):  # request.post()
        resp = await sclient.post(f"{path}?secret={SECRETS[secret]}", data=NOT_GZIP,
                                  headers=_gzip_headers(**{"Content-Type": ctype}))
        text = await resp.text()
        assert resp.status == 400, (path, resp.status, text)
        assert "the request body could not be read: Can not decode content-encoding: gzip" in text, (path, text)
        assert resp.headers.get("Connection") == "close"
    assert _warnings(caplog, "request body could not be read") == 4
    assert not _errors(caplog)


async def test_sign_in_with_deeply_nested_json_is_a_400(client: Any, demo: Any,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    resp = await client.post("/v1/auth/token", data=DEEP, headers={"Content-Type": "application/json"})
    body = await resp.json()
    assert resp.status == 400, body
    assert body["message"] == ["body is nested too deeply"]
    assert not _errors(caplog)


@pytest.mark.parametrize(("provider", "message"), [
    ("airtel", "Airtel Money callback is not JSON"),  # verified by its hash: the body is parsed to check it
    ("mtn_momo", "MTN MoMo callback is not JSON"),
    ("mpesa", "M-Pesa callback is not JSON"),
])
async def test_a_provider_callback_nested_too_deeply_is_a_400(sclient: Any, sdemo: Any, provider: str,
                                                             message: str,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    secret = SECRETS[f"CALLBACK_SECRET_{provider.upper()}"]
    resp = await sclient.post(f"/webhooks/payments/{provider}?secret={secret}", data=DEEP,
                              headers={"Content-Type": "application/json"})
    body = await resp.json()
    assert resp.status == 400, body
    assert body["statusCode"] == 400 and body["message"] == message
    assert _warnings(caplog, "provider callback refused") == 1
    assert not _errors(caplog)


# --- what a cache may keep ------------------------------------------------------------------------------


async def test_api_answers_with_data_are_never_stored_by_a_cache(client: Any, demo: Any) -> None:
    admin = await bearer(client, *demo["admin"])
    for path in ("/v1/payments", "/v1/members", f"/v1/cooperatives/{demo['cooperative_id']}"):
        resp = await admin.req("GET", path)
        assert resp.status == 200, (path, await resp.text())
        assert resp.headers.get("Cache-Control") == "no-store", (path, dict(resp.headers))
    # A route that chose its own caching keeps it.
    types = await admin.req("GET", "/v1/payment-types/active")
    assert types.status == 200 and types.headers.get("Cache-Control") == "private, max-age=30"


@pytest.mark.parametrize(("path", "secret", "ctype", "body", "extra"), [
    ("/ussd/hubtel", "CALLBACK_SECRET_HUBTEL", "application/json", NOT_GZIP, {"Content-Encoding": "gzip"}),
    ("/ussd/nalo", "CALLBACK_SECRET_NALO", "application/json", NOT_GZIP, {"Content-Encoding": "gzip"}),
    ("/ussd/africastalking", "CALLBACK_SECRET_AFRICASTALKING", FORM, NOT_GZIP, {"Content-Encoding": "gzip"}),
    ("/ussd/hubtel", "CALLBACK_SECRET_HUBTEL", "application/json", DEEP, {}),
    ("/ussd/nalo", "CALLBACK_SECRET_NALO", "application/json", DEEP, {}),
])
async def test_a_usssd_hop_that_cannot_be_read_is_the_senders_mistake(
        sclient: Any, sdemo: Any, caplog: pytest.LogCaptureFixture, path: str, secret: str, ctype: str,
        body: bytes, extra: dict[str, str]) -> None:
    """A hop's body the gateway cannot decode was answered (a 4xx, or Africa's Talking's END) but logged at ERROR
    with a traceback by the hop's catch-all, as if the gateway had failed."""
    caplog.set_level(logging.WARNING)
    resp = await sclient.post(f"{path}?secret={SECRETS[secret]}", data=body,
                              headers={"Content-Type": ctype, **extra})
    await resp.read()
    assert resp.status < 500
    assert not _errors(caplog)
