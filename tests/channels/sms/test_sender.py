"""The Africa's Talking sender over recorded wire bodies: the request we send and what we make of answers."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import parse_qs

import httpx
import pytest

from channels.sms.sender import (
    AfricasTalkingConfig,
    AfricasTalkingSender,
    SmsAccountError,
    SmsTemporaryError,
    SmsUnconfirmedError,
)
from core.config import Secret
from core.phone import Phone

FIXTURES = Path(__file__).parents[2] / "fixtures" / "africastalking_sms"
SEND_CASES = sorted(p.name for p in FIXTURES.glob("send_*.json"))
PHONE = Phone("+250788000001")


def make_sender(handler) -> tuple[AfricasTalkingSender, list[httpx.Request]]:  # type: ignore[no-untyped-def]
    seen: list[httpx.Request] = []

    def transport(request: httpx.Request) -> httpx.Response:
        # Fail closed: anything but the messaging endpoint is a bug.
        if (
            request.url != httpx.URL("https://sms.example.test/version1/messaging")
            or request.method != "POST"
        ):
            raise AssertionError(f"unexpected request {request.method} {request.url}")
        seen.append(request)
        return handler(request)

    client = httpx.AsyncClient(transport=httpx.MockTransport(transport))
    sender = AfricasTalkingSender(
        client,
        AfricasTalkingConfig(
            base_url="https://sms.example.test/",
            username="coop",
            api_key=Secret("k-123"),
            sender_id="COOPPAY",
        ),
    )
    return sender, seen


@pytest.mark.parametrize("name", SEND_CASES)
async def test_send_cases(name: str) -> None:
    case = json.loads((FIXTURES / name).read_text())

    def answer(_request: httpx.Request) -> httpx.Response:
        if "body" in case:
            return httpx.Response(case["http_status"], json=case["body"])
        return httpx.Response(case["http_status"], text=case["text"])

    sender, seen = make_sender(answer)
    expect = case["expect"]
    if expect.get("temporary"):
        with pytest.raises(SmsAccountError if expect.get("account") else SmsTemporaryError):
            await sender.send(PHONE, "Hello")
    else:
        result = await sender.send(PHONE, "Hello")
        assert result.accepted is expect["accepted"]
        assert result.permanent is expect["permanent"]
        assert result.provider_status == expect["provider_status"]
        assert result.cost == expect["cost"]
        assert result.provider_message_id == expect["provider_message_id"]
    request = seen[0]
    assert request.headers["apiKey"] == "k-123"
    assert request.headers["Accept"] == "application/json"
    form = {k: v[0] for k, v in parse_qs(request.content.decode()).items()}
    assert form == {
        "username": "coop",
        "to": "+250788000001",
        "message": "Hello",
        "from": "COOPPAY",
        "bulkSMSMode": "1",
        "enqueue": "1",
    }


async def test_network_error_is_temporary() -> None:
    def boom(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    sender, _ = make_sender(boom)
    with pytest.raises(SmsTemporaryError, match="network error"):
        await sender.send(PHONE, "Hello")


async def test_unreadable_answer_is_unconfirmed_or_temporary() -> None:
    # A 2xx we cannot read: AT took the request and may have queued the message, so it is not resent
    # (it used to be retried: a possible second copy).
    sender, _ = make_sender(lambda _r: httpx.Response(200, text="<html>proxy</html>"))
    with pytest.raises(SmsUnconfirmedError, match="unreadable"):
        await sender.send(PHONE, "Hello")
    # Anything else unreadable (here a redirect) was not taken: safe to retry.
    sender, _ = make_sender(lambda _r: httpx.Response(302, text="<html>moved</html>"))
    with pytest.raises(SmsTemporaryError, match="unreadable"):
        await sender.send(PHONE, "Hello")


def test_api_key_never_in_repr() -> None:
    config = AfricasTalkingConfig(base_url="https://x", username="u", api_key=Secret("very-secret"))
    assert "very-secret" not in repr(config)
