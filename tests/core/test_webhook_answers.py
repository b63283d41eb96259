"""What counts as a receiver's answer: its status line, within DELIVERY_TIMEOUT in all (README: "return 2xx as
soon as the signature checks and the event is stored"; "an answer after 10 s counts as a failure").

A receiver that answers 200 and then sends its body slowly, or a large body, has answered: before, the gateway
read that body, so a slow one held the delivery (each read inside the client's per-read timeout) until the
worker cut the job off at its lease, nothing recorded, and the event went out again at each of the job's tries,
and a large one (over the client's 8 MB bound) was recorded as a failure and sent again for three days. An
answer whose status line itself trickles in is cut off at DELIVERY_TIMEOUT and recorded as a failure."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from sqlalchemy import select, update

from core import webhooks
from core.models import WebhookDelivery, WebhookEndpoint
from core.outbox import RetryLater
from tests.channels.sms.helpers import as_job, jobs_of
from tests.core.test_webhooks import approved_endpoint, emit


async def _delivery(rt: Any) -> WebhookDelivery:
    async with rt.sessionmaker() as session:
        [delivery] = (await session.execute(select(WebhookDelivery))).scalars().all()
    return delivery


async def _deliver_once(rt: Any, worker: Any) -> str:
    """Fan the emitted event out, then run its delivery job once, as the worker does."""
    await worker.run_once()
    [job] = await jobs_of(rt, "webhook.deliver")
    return await webhooks.deliver(rt, as_job(job))


@pytest.mark.parametrize("answer", ["slow body", "large body"])
async def test_a_2xx_status_line_delivers_whatever_its_body(
    rt: Any, demo: dict[str, Any], aiohttp_server: Any, worker: Any, answer: str
) -> None:
    arrived: list[bytes] = []
    never = asyncio.Event()

    async def handle(request: web.Request) -> web.StreamResponse:
        arrived.append(await request.read())
        if answer == "large body":  # over core.http.MAX_RESPONSE_BYTES, as its Content-Length says
            return web.Response(status=200, body=b"x" * (9 * 1024 * 1024))
        response = web.StreamResponse(status=200)
        response.content_length = 100_000
        await response.prepare(request)
        await response.write(b"stored, thanks")
        await never.wait()  # the rest of the body never comes
        return response

    app = web.Application()
    app.router.add_post("/hook", handle)
    server = await aiohttp_server(app)
    await approved_endpoint(rt, demo["cooperative_id"], str(server.make_url("/hook")))
    await emit(rt, demo["cooperative_id"], event_id="evt_answered")

    assert await _deliver_once(rt, worker) == "delivered"
    delivery = await _delivery(rt)
    assert delivery.status == "DELIVERED" and delivery.delivered_at is not None
    [attempt] = delivery.attempts
    assert attempt["status_code"] == 200 and attempt["error"] is None
    assert len(arrived) == 1
    never.set()


@contextlib.asynccontextmanager
async def trickling_server() -> AsyncIterator[tuple[str, list[bytes]]]:
    """A receiver that reads the request, then sends its status line and headers one byte at a time, each
    well inside the client's per-read timeout, never finishing them."""
    requests: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:"))
            requests.append(await reader.readexactly(length))
            for byte in b"HTTP/1.1 200 OK\r\nX-Padding: " + b"x" * 10_000:
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.2)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/hook", requests
    finally:
        server.close()


async def test_an_answer_not_complete_within_the_delivery_timeout_is_a_recorded_failure(
    rt: Any, demo: dict[str, Any], worker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 1 s rather than 10, so the test is short: each byte (0.2 s apart) comes within the client's read timeout.
    monkeypatch.setattr(webhooks, "DELIVERY_TIMEOUT", 1.0)
    async with trickling_server() as (url, requests):
        await approved_endpoint(rt, demo["cooperative_id"], url)
        await emit(rt, demo["cooperative_id"], event_id="evt_trickled")
        with pytest.raises(RetryLater, match="no answer within 1 s"):
            # A generous bound of the test's own: without the delivery's, the answer would trickle for 30 min.
            await asyncio.wait_for(_deliver_once(rt, worker), 120)
    delivery = await _delivery(rt)
    assert delivery.status == "PENDING"  # retried with the backoff, like any failure
    [attempt] = delivery.attempts
    assert attempt["status_code"] is None and attempt["error"] == "no answer within 1 s"
    assert len(requests) == 1


@pytest.mark.parametrize("url", ["http://127.0.0.1:99999/hook", "http://127.0.0.1:abc/hook"])
async def test_a_url_stored_before_it_was_checked_fails_each_attempt_on_record(
    rt: Any, demo: dict[str, Any], worker: Any, url: str
) -> None:
    """An endpoint registered before check_url refused such a port: each attempt is a failure recorded on the
    delivery and counted on the endpoint (towards switching it off), not a job that crashed unrecorded until it
    parked with the delivery still PENDING and no attempt listed."""
    endpoint, _secret = await approved_endpoint(rt, demo["cooperative_id"], "http://127.0.0.1:9/hook")
    async with rt.sessionmaker.begin() as session:
        await session.execute(update(WebhookEndpoint).where(WebhookEndpoint.id == endpoint.id).values(url=url))
    await emit(rt, demo["cooperative_id"], event_id="evt_bad_url")
    with pytest.raises(RetryLater):
        await _deliver_once(rt, worker)
    delivery = await _delivery(rt)
    [attempt] = delivery.attempts
    assert delivery.status == "PENDING" and attempt["status_code"] is None and attempt["error"]
    async with rt.sessionmaker() as session:
        assert (await session.get(WebhookEndpoint, endpoint.id)).consecutive_failures == 1
