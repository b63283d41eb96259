"""Forged, tampered and replayed provider webhooks against real payments: refused with 401/409, the
verification-failure metric counts each one, and not a row changes. A genuine one is the control."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from core.models import Payment
from providers.airtel.adapter import callback_hash
from providers.irembopay.adapter import signature_header
from tests.security.conftest import SECRETS, pending_payment, rejected, snapshot

AIRTEL_KEY = SECRETS["AIRTEL_CALLBACK_KEY"]
IREMBO_KEY = SECRETS["IREMBOPAY_SECRET_KEY"]


def url(provider: str, secret: str | None = None) -> str:
    secret = SECRETS[f"CALLBACK_SECRET_{provider.upper()}"] if secret is None else secret
    return f"/webhooks/payments/{provider}?secret={secret}"


async def status_of(rt: Any, payment_id: str) -> str:
    async with rt.sessionmaker() as s:
        return (await s.get(Payment, payment_id)).status


async def refused(client: Any, rt: Any, source: str, expected: int, *args: Any, **kw: Any) -> None:
    """Send one callback; it must be refused with `expected`, counted once, and change nothing."""
    before_rows, before_metric = await snapshot(rt), rejected(source)
    resp = await client.post(*args, **kw)
    body = await resp.json()
    assert resp.status == expected, (resp.status, body)
    assert body["statusCode"] == expected and body["message"]
    assert rejected(source) == before_metric + 1
    assert await snapshot(rt) == before_rows


# --- Airtel: HMAC over the transaction object -------------------------------------------------------


async def test_airtel_forged_hashes_are_refused_and_the_genuine_one_applies(srt: Any, sclient: Any,
                                                                            sdemo: Any) -> None:
    payment = await pending_payment(srt, sdemo, provider="airtel", method="MOBILE_MONEY_AIRTEL")
    tx = {"id": payment.provider_reference, "message": "Paid", "status_code": "TS", "airtel_money_id": "MP77"}
    failed_tx = {**tx, "status_code": "TF"}
    forgeries = [
        {"transaction": tx, "hash": callback_hash(tx, "a-guessed-key")},
        {"transaction": tx, "hash": ""},
        {"transaction": tx},
        {"transaction": tx, "hash": callback_hash(failed_tx, AIRTEL_KEY)},  # signed a different body
        {"transaction": {**tx, "airtel_money_id": "MP99"}, "hash": callback_hash(tx, AIRTEL_KEY)},  # tampered
        {"transaction": tx, "hash": callback_hash(tx, AIRTEL_KEY).lower()},
        {"transaction": tx, "hash": 12345},
    ]
    for body in forgeries:
        await refused(sclient, srt, "airtel", 401, url("airtel"), json=body)
    # The right hash on the wrong URL secret, or none: refused before the body is looked at.
    genuine = {"transaction": tx, "hash": callback_hash(tx, AIRTEL_KEY)}
    for secret in ("", "wrong", SECRETS["CALLBACK_SECRET_MTN_MOMO"]):
        await refused(sclient, srt, "airtel", 401, url("airtel", secret), json=genuine)
    assert await status_of(srt, payment.id) == "PENDING"

    resp = await sclient.post(url("airtel"), json=genuine)
    assert resp.status == 200, await resp.text()
    assert await status_of(srt, payment.id) == "COMPLETED"
    # The same genuine callback again is a no-op, not a second completion.
    before = await snapshot(srt)
    again = await sclient.post(url("airtel"), json=genuine)
    assert again.status == 200 and (await again.json())["result"] == "duplicate"
    assert await snapshot(srt) == before


# --- IremboPay: signed header with a timestamp, one use per signature --------------------------------


def irembo_body(payment: Any, status: str = "PAID", amount: int = 50_000) -> bytes:
    return json.dumps({"success": True, "message": "ok", "data": {
        "transactionId": payment.provider_reference, "invoiceNumber": "880419623157",
        "paymentStatus": status, "amount": amount, "currency": "RWF"}}).encode()


def now_ms() -> int:
    return int(time.time() * 1000)


async def test_irembopay_forged_stale_and_tampered_signatures_are_refused(srt: Any, sclient: Any,
                                                                          sdemo: Any) -> None:
    payment = await pending_payment(srt, sdemo, provider="irembopay", method="MOBILE_MONEY_MTN")
    body = irembo_body(payment)
    t = now_ms()
    cases = [
        {},  # no signature header
        {"irembopay-signature": ""},
        {"irembopay-signature": "garbage"},
        {"irembopay-signature": f"t={t}"},
        {"irembopay-signature": f"t=abc,s={'0' * 64}"},
        {"irembopay-signature": f"t={t},s={'0' * 64}"},
        {"irembopay-signature": signature_header("a-guessed-key", t, body)},
        {"irembopay-signature": signature_header(IREMBO_KEY, t, irembo_body(payment, amount=1))},  # other body
        {"irembopay-signature": signature_header(IREMBO_KEY, t - 600_000, body)},  # 10 minutes old
        {"irembopay-signature": signature_header(IREMBO_KEY, t + 600_000, body)},  # from the future
        {"irembopay-signature": signature_header(IREMBO_KEY, t, body).replace(f"t={t}", f"t={t + 1}")},
        {"irembopay-signature": "t=" + "9" * 5000 + ",s=ab"},
    ]
    for headers in cases:
        await refused(sclient, srt, "irembopay", 401, url("irembopay"), data=body,
                      headers={"Content-Type": "application/json", **headers})
    # A genuine signature on the wrong URL secret is refused too.
    good = {"Content-Type": "application/json", "irembopay-signature": signature_header(IREMBO_KEY, t, body)}
    await refused(sclient, srt, "irembopay", 401, url("irembopay", "nope"), data=body, headers=good)
    assert await status_of(srt, payment.id) == "PENDING"

    resp = await sclient.post(url("irembopay"), data=body, headers=good)
    assert resp.status == 200, await resp.text()
    assert await status_of(srt, payment.id) == "COMPLETED"
    # The very same signed request again (a captured and replayed webhook): refused as a replay.
    await refused(sclient, srt, "irembopay", 409, url("irembopay"), data=body, headers=good)


async def test_irembopay_replay_is_refused_by_another_gateway_process(srt: Any, sclient: Any, sdemo: Any,
                                                                      aiohttp_client: Any) -> None:
    """Two `serve` processes behind a load balancer share Redis: a webhook replayed to the second one
    must be refused like a replay to the first (the one-time check cannot be process-local)."""
    from app import create_app, open_runtime

    payment = await pending_payment(srt, sdemo, provider="irembopay", method="MOBILE_MONEY_MTN")
    body = irembo_body(payment, status="FAILED")
    headers = {"Content-Type": "application/json",
               "irembopay-signature": signature_header(IREMBO_KEY, now_ms(), body)}
    async with open_runtime(srt.settings) as other_rt:
        other = await aiohttp_client(create_app(other_rt.settings, runtime=other_rt))
        first = await sclient.post(url("irembopay"), data=body, headers=headers)
        assert first.status == 200, await first.text()
        assert await status_of(srt, payment.id) == "FAILED"
        await refused(other, srt, "irembopay", 409, url("irembopay"), data=body, headers=headers)


async def test_irembopay_webhook_with_redis_unavailable_asks_for_a_retry(srt: Any, sclient: Any, sdemo: Any,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The one-time-key check cannot reach Redis (down, or out of memory refusing writes): 503 with Retry-After
    and nothing recorded (it was a bare 500, which IremboPay may not retry); the retry then applies."""
    from redis.exceptions import ResponseError

    payment = await pending_payment(srt, sdemo, provider="irembopay", method="MOBILE_MONEY_MTN")
    body = irembo_body(payment, status="FAILED")
    headers = {"Content-Type": "application/json",
               "irembopay-signature": signature_header(IREMBO_KEY, now_ms(), body)}
    adapter = srt.providers["irembopay"]

    async def out_of_memory(key: str, ttl: int) -> bool:
        raise ResponseError("OOM command not allowed when used memory > 'maxmemory'.")

    before = await snapshot(srt)
    with monkeypatch.context() as patched:
        patched.setattr(adapter, "_nonce_store", out_of_memory)
        resp = await sclient.post(url("irembopay"), data=body, headers=headers)
        answer = await resp.json()
    assert (resp.status, resp.headers.get("Retry-After")) == (503, "5"), answer
    assert answer["message"] == "the callback could not be verified now; retry later"
    assert await snapshot(srt) == before
    retried = await sclient.post(url("irembopay"), data=body, headers=headers)
    assert retried.status == 200, await retried.text()
    assert await status_of(srt, payment.id) == "FAILED"


async def test_irembopay_webhook_whose_one_time_key_answer_was_lost_gets_through_on_retry(
        srt: Any, sclient: Any, sdemo: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The SET NX reached Redis but its answer was lost (a socket timeout): 503 "retry later", and the key it
    may have stored is freed, so the retry IremboPay sends is not refused as a replay."""
    from redis.exceptions import TimeoutError as RedisTimeout

    payment = await pending_payment(srt, sdemo, provider="irembopay", method="MOBILE_MONEY_MTN")
    body = irembo_body(payment, status="FAILED")
    headers = {"Content-Type": "application/json",
               "irembopay-signature": signature_header(IREMBO_KEY, now_ms(), body)}
    adapter = srt.providers["irembopay"]
    real = adapter._nonce_store

    class LostAnswer:
        async def __call__(self, key: str, ttl: int) -> bool:
            await real(key, ttl)
            raise RedisTimeout("Timeout reading from socket")

        async def forget(self, key: str) -> None:
            await real.forget(key)

    with monkeypatch.context() as patched:
        patched.setattr(adapter, "_nonce_store", LostAnswer())
        first = await sclient.post(url("irembopay"), data=body, headers=headers)
    assert first.status == 503, await first.text()
    retried = await sclient.post(url("irembopay"), data=body, headers=headers)
    assert retried.status == 200, await retried.text()
    assert await status_of(srt, payment.id) == "FAILED"


# --- unsigned providers: the URL secret is all there is ----------------------------------------------


@pytest.mark.parametrize("provider", ["mtn_momo", "mpesa", "airtel", "irembopay"])
async def test_wrong_url_secret_is_refused_for_every_provider(srt: Any, sclient: Any, sdemo: Any,
                                                              provider: str) -> None:
    payment = await pending_payment(srt, sdemo, provider=provider, method="MOBILE_MONEY_MTN")
    body = {"externalId": payment.provider_reference, "status": "SUCCESSFUL", "amount": "50000",
            "currency": "RWF", "financialTransactionId": "1"}
    for secret in ("", "x", SECRETS[f"CALLBACK_SECRET_{provider.upper()}"][:-1],
                   SECRETS[f"CALLBACK_SECRET_{provider.upper()}"] + " "):
        await refused(sclient, srt, provider, 401, url(provider, secret), json=body)
    assert await status_of(srt, payment.id) == "PENDING"


# --- USSD aggregators and SMS: the URL secret, counted too --------------------------------------------


@pytest.mark.parametrize(("path", "source", "body"), [
    ("/ussd/africastalking", "ussd_africastalking", {"data": {"sessionId": "s", "phoneNumber": "+250788000001",
                                                              "serviceCode": "*384*123#", "text": ""}}),
    ("/ussd/hubtel", "ussd_hubtel", {"json": {"Type": "Initiation", "Mobile": "233200000001",
                                              "SessionId": "s", "Message": "*384*123#"}}),
    ("/ussd/nalo", "ussd_nalo", {"json": {"MSGTYPE": True, "SESSIONID": "s", "MSISDN": "233200000001",
                                          "USERDATA": "*384*123#"}}),
    ("/ussd/africastalking/events", "ussd_africastalking_events",
     {"data": {"sessionId": "s", "phoneNumber": "+250788000001", "status": "Success"}}),
    ("/sms/africastalking/inbound", "sms", {"data": {"from": "+250788000001", "text": "STOP"}}),
    ("/sms/africastalking/delivery", "sms", {"data": {"id": "ATXid_1", "status": "Success"}}),
])
async def test_aggregator_callbacks_without_the_secret_are_refused_and_counted(
        srt: Any, sclient: Any, sdemo: Any, path: str, source: str, body: dict[str, Any]) -> None:
    for query in ("", "?secret=", "?secret=guess"):
        before_rows, before_metric = await snapshot(srt), rejected(source)
        resp = await sclient.post(path + query, **body)
        assert resp.status == 403, (path, query, resp.status)
        assert rejected(source) == before_metric + 1
        assert await snapshot(srt) == before_rows
        assert await srt.redis.dbsize() == 0  # no session was started either


async def test_irembopay_webhook_we_could_not_store_is_accepted_when_resent(srt: Any, sclient: Any,
                                                                             sdemo: Any) -> None:
    """Our database down while a genuine webhook arrives: 503, and IremboPay's retry is not a 'replay'."""
    from sqlalchemy.ext.asyncio import async_sessionmaker

    from core.db import make_engine

    payment = await pending_payment(srt, sdemo, provider="irembopay", method="MOBILE_MONEY_MTN")
    body = irembo_body(payment)
    good = {"Content-Type": "application/json",
            "irembopay-signature": signature_header(IREMBO_KEY, now_ms(), body)}
    dead = make_engine("postgresql+asyncpg://postgres@127.0.0.1:1/nowhere")
    # Both ways a callback reaches the database: its Core transaction (the engine, on PostgreSQL) and a session.
    working, srt.sessionmaker = srt.sessionmaker, async_sessionmaker(dead, expire_on_commit=False)
    engine, srt.engine = srt.engine, dead
    try:
        down = await sclient.post(url("irembopay"), data=body, headers=good)
    finally:
        srt.sessionmaker, srt.engine = working, engine
        await dead.dispose()
    assert down.status == 503 and "retry" in (await down.json())["message"]
    assert await status_of(srt, payment.id) == "PENDING"
    resent = await sclient.post(url("irembopay"), data=body, headers=good)
    assert resent.status == 200, await resent.text()
    assert await status_of(srt, payment.id) == "COMPLETED"
    await refused(sclient, srt, "irembopay", 409, url("irembopay"), data=body, headers=good)


@pytest.mark.usefixtures("limiter_clock")
async def test_provider_callbacks_are_rate_limited_per_address(srt: Any, sdemo: Any, aiohttp_client: Any) -> None:
    from app import create_app
    from tests.conftest import make_settings
    from tests.security.conftest import SECRETS

    # 1000/min scaled down to 2/min, so the test need not send a thousand callbacks.
    client = await aiohttp_client(create_app(make_settings(**SECRETS, RATE_LIMIT_MULTIPLIER="0.002"),
                                             runtime=srt))
    before = rejected("rate_limited")
    answers = [await client.post(url("mtn_momo", "wrong"), json={}) for _ in range(3)]
    assert [a.status for a in answers] == [401, 401, 429]
    limited = answers[-1]
    assert limited.headers["X-RateLimit-Limit"] == "2" and limited.headers["X-RateLimit-Remaining"] == "0"
    assert int(limited.headers["Retry-After"]) >= 1
    assert (await limited.json())["statusCode"] == 429
    assert rejected("rate_limited") == before + 1


async def test_a_provider_callback_is_applied_with_redis_down_its_rate_limit_skipped(
        srt: Any, sclient: Any, sdemo: Any, caplog: pytest.LogCaptureFixture) -> None:
    """A provider's money callback matters more than its limit: with Redis down (both of the runtime's clients: the
    limit goes on the multiplexed one, rt.hot_redis) it is verified and applied, the limit skipped and logged."""
    import logging

    from tests.admin_api.conftest import redis_unreachable

    payment = await pending_payment(srt, sdemo, provider="airtel", method="MOBILE_MONEY_AIRTEL")
    tx = {"id": payment.provider_reference, "message": "Paid", "status_code": "TS", "airtel_money_id": "MP78"}
    async with redis_unreachable(srt):
        with caplog.at_level(logging.WARNING, logger="gateway.providers.callbacks"):
            resp = await sclient.post(url("airtel"), json={"transaction": tx, "hash": callback_hash(tx, AIRTEL_KEY)})
    assert resp.status == 200, await resp.text()
    assert "X-RateLimit-Limit" not in resp.headers
    assert await status_of(srt, payment.id) == "COMPLETED"
    skipped = [r for r in caplog.records if r.name == "gateway.providers.callbacks"
               and r.getMessage() == "callback rate limit unavailable; letting the callback through"]
    assert len(skipped) == 1


async def test_irembopay_signature_with_bytes_outside_ascii_is_refused_not_a_500(srt: Any, sclient: Any,
                                                                                sdemo: Any) -> None:
    """A header byte outside ASCII in `s` (aiohttp reads it as a surrogate escape) is a forgery like any other:
    401, counted, nothing changed; hmac.compare_digest refuses such strings with a TypeError, which was a 500."""
    import asyncio

    payment = await pending_payment(srt, sdemo, provider="irembopay", method="MOBILE_MONEY_MTN")
    body = irembo_body(payment)
    before_rows, before_metric = await snapshot(srt), rejected("irembopay")
    for signature in (f"t={now_ms()},s=".encode() + b"\xe9" * 64, f"t={now_ms()},s=ab".encode() + b"\xc3\xa9"):
        reader, writer = await asyncio.open_connection(sclient.server.host, sclient.server.port)
        head = (f"POST {url('irembopay')} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n").encode()
        try:
            writer.write(head + b"irembopay-signature: " + signature + b"\r\n\r\n" + body)
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(), 10)
        finally:
            writer.close()
        assert int(answer.split(b" ", 2)[1]) == 401, answer[:300]
    assert rejected("irembopay") == before_metric + 2
    assert await snapshot(srt) == before_rows
