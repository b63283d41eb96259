"""Signed webhooks: registration rules, fan-out, signature checked by hand, retries, disabling, re-runs."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp import web
from sqlalchemy import select, update

from core import webhooks
from core.audit import Actor
from core.db import utcnow
from core.errors import Conflict, Forbidden, NotFound, ValidationError
from core.models import ApprovedDomain, AuditEvent, OutboxJob, WebhookDelivery, WebhookEndpoint
from core.notify import emit_event
from core.outbox import PermanentJobError, RetryLater
from core.state.payment import PaymentStatus
from tests.channels.sms.helpers import as_job, jobs_of, start_simulator
from tests.conftest import drain, requires_pg, waiting_for_locks

ADMIN = Actor("admin:1", "api")
SUPER = Actor("admin:super", "api")


# -------------------------------------------------------------------------------------------- signatures


def by_hand(secret: str, header: str, body: bytes) -> bool:
    """An independent receiver: parse the header, recompute the HMAC, compare, check the age."""
    fields = dict(part.split("=", 1) for part in header.split(","))
    signed = fields["t"].encode() + b"." + body
    expected = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, fields["v1"]) and abs(time.time() - int(fields["t"])) <= 300


def test_sign_and_verify() -> None:
    body = b'{"id":"evt_1","type":"payment.completed"}'
    now = int(time.time())
    header = webhooks.sign("whsec_abc", body, now)
    assert header.startswith(f"t={now},v1=")
    assert by_hand("whsec_abc", header, body)
    assert webhooks.verify_signature("whsec_abc", header, body)
    assert not webhooks.verify_signature("whsec_other", header, body)
    assert not webhooks.verify_signature("whsec_abc", header, body + b" ")
    assert not webhooks.verify_signature("whsec_abc", webhooks.sign("whsec_abc", body, now - 301), body)
    assert webhooks.verify_signature("whsec_abc", webhooks.sign("whsec_abc", body, now - 10), body)
    # A timestamp in digits str.isdigit takes but int() does not ("³"), or other scripts' digits: refused.
    digest = header.partition(",v1=")[2]
    for odd in ("\u00b3", "\u0663" * 10, "1" * 40):
        assert not webhooks.verify_signature("whsec_abc", f"t={odd},v1={digest}", body)
    assert not webhooks.verify_signature("whsec_abc", "", body)
    assert not webhooks.verify_signature("whsec_abc", f"t={now}", body)
    assert not webhooks.verify_signature("whsec_abc", "t=abc,v1=00", body)
    # During a secret rotation two v1 values may be sent: either may match.
    rotated = header + ",v1=" + "0" * 64
    assert webhooks.verify_signature("whsec_abc", rotated, body)


# ----------------------------------------------------------------------------------- domains, endpoints


async def approved_endpoint(
    rt: Any, coop_id: str, url: str, events: list[str] | None = None, embedded: bool = True
) -> tuple[WebhookEndpoint, str]:
    from urllib.parse import urlparse

    async with rt.sessionmaker.begin() as session:
        domain = await webhooks.request_domain(
            session, cooperative_id=coop_id, domain=urlparse(url).hostname or "", actor=ADMIN, embedded=embedded
        )
        await webhooks.approve_domain(session, domain_id=domain.id, actor=SUPER, is_super_admin=True)
        return await webhooks.register_endpoint(
            session,
            rt.cipher,
            cooperative_id=coop_id,
            url=url,
            events=events or list(webhooks.EVENTS),
            actor=ADMIN,
            embedded=embedded,
        )


@requires_pg
async def test_an_approval_and_a_rejection_at_once_take_turns_and_audit_what_they_replaced(
        rt: Any, demo: dict[str, Any]) -> None:
    """Two super admins decide one domain at the same moment: each read PENDING before the other's write, so the
    later one's audit row said PENDING -> REJECTED while it replaced the APPROVED just committed."""
    async with rt.sessionmaker.begin() as session:
        domain = await webhooks.request_domain(session, cooperative_id=demo["cooperative_id"],
                                               domain="hooks.turns.rw", actor=ADMIN)
    first = rt.sessionmaker()
    try:
        await webhooks.approve_domain(first, domain_id=domain.id, actor=SUPER, is_super_admin=True)

        async def reject() -> None:
            async with rt.sessionmaker.begin() as session:
                await webhooks.approve_domain(session, domain_id=domain.id, actor=SUPER, is_super_admin=True,
                                              approve=False)

        second = asyncio.ensure_future(reject())
        await waiting_for_locks(rt, 1)  # the rejection waits for the approval's row lock
        await first.commit()
    finally:
        await first.close()
    await second
    async with rt.sessionmaker() as session:
        rows = (await session.execute(select(AuditEvent.action, AuditEvent.before).where(
            AuditEvent.entity_id == domain.id).order_by(AuditEvent.id))).all()
        assert (await session.get(ApprovedDomain, domain.id)).status == "REJECTED"
    assert [(action, before) for action, before in rows] == [
        ("webhook_domain.requested", None), ("webhook_domain.approved", {"status": "PENDING"}),
        ("webhook_domain.rejected", {"status": "APPROVED"})]


async def test_a_domain_asked_for_again_after_its_rejection_is_audited_pending_again(
        rt: Any, demo: dict[str, Any]) -> None:
    """Asked for again after a super admin rejected it, the domain was PENDING again with no audit row: the log said
    it was REJECTED (its last row) while the list showed it waiting for a decision."""
    coop = demo["cooperative_id"]
    async with rt.sessionmaker.begin() as session:
        domain = await webhooks.request_domain(session, cooperative_id=coop, domain="hooks.again.rw", actor=ADMIN)
        await webhooks.approve_domain(session, domain_id=domain.id, actor=SUPER, is_super_admin=True, approve=False)
    async with rt.sessionmaker.begin() as session:
        again = await webhooks.request_domain(session, cooperative_id=coop, domain="hooks.again.rw", actor=ADMIN)
    assert (again.id, again.status) == (domain.id, "PENDING")
    async with rt.sessionmaker.begin() as session:  # asked once more while PENDING: nothing changes, nothing audited
        await webhooks.request_domain(session, cooperative_id=coop, domain="hooks.again.rw", actor=ADMIN)
    async with rt.sessionmaker() as session:
        rows = (await session.execute(select(AuditEvent.action, AuditEvent.before, AuditEvent.after).where(
            AuditEvent.entity_id == domain.id).order_by(AuditEvent.id))).all()
    assert [(action, before, after["status"]) for action, before, after in rows] == [
        ("webhook_domain.requested", None, "PENDING"), ("webhook_domain.rejected", {"status": "PENDING"}, "REJECTED"),
        ("webhook_domain.requested", {"status": "REJECTED"}, "PENDING")]


async def test_registration_rules(rt: Any, demo: dict[str, Any]) -> None:
    coop = demo["cooperative_id"]
    async with rt.sessionmaker.begin() as session:
        with pytest.raises(ValidationError, match="must use https"):
            await webhooks.register_endpoint(
                session,
                rt.cipher,
                cooperative_id=coop,
                url="http://hooks.example.rw/x",
                events=["payment.completed"],
                actor=ADMIN,
            )
        with pytest.raises(Forbidden, match=r"hooks\.example\.rw is not approved"):
            await webhooks.register_endpoint(
                session,
                rt.cipher,
                cooperative_id=coop,
                url="https://hooks.example.rw/x",
                events=["payment.completed"],
                actor=ADMIN,
            )
        domain = await webhooks.request_domain(
            session, cooperative_id=coop, domain="Hooks.Example.RW.", actor=ADMIN
        )
        assert domain.domain == "hooks.example.rw" and domain.status == "PENDING"
        with pytest.raises(Forbidden, match="pending approval"):
            await webhooks.register_endpoint(
                session,
                rt.cipher,
                cooperative_id=coop,
                url="https://hooks.example.rw/x",
                events=["payment.completed"],
                actor=ADMIN,
            )
        with pytest.raises(Forbidden, match="only a super admin"):
            await webhooks.approve_domain(session, domain_id=domain.id, actor=ADMIN, is_super_admin=False)
        with pytest.raises(NotFound):
            await webhooks.approve_domain(session, domain_id="nope", actor=SUPER, is_super_admin=True)
        await webhooks.approve_domain(session, domain_id=domain.id, actor=SUPER, is_super_admin=True)
        with pytest.raises(ValidationError, match="unknown events"):
            await webhooks.register_endpoint(
                session,
                rt.cipher,
                cooperative_id=coop,
                url="https://hooks.example.rw/x",
                events=["payment.exploded"],
                actor=ADMIN,
            )
        with pytest.raises(ValidationError, match="non-empty list"):
            await webhooks.register_endpoint(
                session,
                rt.cipher,
                cooperative_id=coop,
                url="https://hooks.example.rw/x",
                events=[],
                actor=ADMIN,
            )
        with pytest.raises(ValidationError, match="credentials"):
            await webhooks.register_endpoint(
                session,
                rt.cipher,
                cooperative_id=coop,
                url="https://u:p@hooks.example.rw/x",
                events=["payment.failed"],
                actor=ADMIN,
            )
        endpoint, secret = await webhooks.register_endpoint(
            session,
            rt.cipher,
            cooperative_id=coop,
            url="https://hooks.example.rw/x",
            events=["refund.failed", "payment.completed", "payment.completed"],
            actor=ADMIN,
        )
        assert endpoint.events == ["payment.completed", "refund.failed"]
        assert secret.startswith("whsec_") and secret not in endpoint.secret_enc
        assert webhooks.endpoint_secret(rt.cipher, endpoint) == secret
        # Another cooperative cannot use this cooperative's approval.
        other = (await session.execute(select(ApprovedDomain))).scalars().all()
        assert len(other) == 1


@pytest.mark.parametrize(
    ("domain", "embedded", "message"),
    [
        ("127.0.0.1", False, "not IP addresses or localhost"),
        ("localhost", False, "not IP addresses or localhost"),
        # The short forms of IP addresses the system resolver reads (127.0.0.1, 10.0.0.1, 127.0.0.1 in hex).
        ("127.1", False, "not IP addresses or localhost"),
        ("10.1", False, "not IP addresses or localhost"),
        ("0x7f.1", False, "not IP addresses or localhost"),
        # Its last part in hex, or every part: the resolver reads those too (inet_aton).
        ("127.0x1", False, "not IP addresses or localhost"),
        ("0x7f.0x0.0x0.0x1", False, "not IP addresses or localhost"),
        ("not a domain", False, "not a valid domain"),
        ("nodot", False, "not a valid domain"),
        ("", False, "domain is required"),
    ],
)
def test_domain_rules(domain: str, embedded: bool, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        webhooks.normalize_domain(domain, embedded=embedded)


def test_local_domains_allowed_in_embedded_default() -> None:
    assert webhooks.normalize_domain("127.0.0.1", embedded=True) == "127.0.0.1"
    assert webhooks.check_url("http://127.0.0.1:8000/hook", embedded=True)[1] == "127.0.0.1"


async def test_endpoint_limit(rt: Any, demo: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(webhooks, "MAX_ENDPOINTS_PER_COOPERATIVE", 1)
    await approved_endpoint(rt, demo["cooperative_id"], "https://a.example.rw/h")
    with pytest.raises(Conflict, match="at most 1"):
        await approved_endpoint(rt, demo["cooperative_id"], "https://a.example.rw/h2")


# ---------------------------------------------------------------------------------------- fan-out, delivery


class Receiver:
    """A cooperative's system on 127.0.0.1 that verifies signatures itself and can be told to fail."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.answers: list[int] = []  # status codes to answer with, in order; then 200
        self.arrived = asyncio.Event()  # set at each request
        self.hold = asyncio.Event()  # cleared: requests are held (unanswered) until it is set again
        self.hold.set()

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests.append({"headers": dict(request.headers), "body": body})
        self.arrived.set()
        await self.hold.wait()
        status = self.answers.pop(0) if self.answers else 200
        return web.Response(status=status, text="ok")


@pytest.fixture
async def receiver(aiohttp_server: Any) -> tuple[Receiver, str]:
    hook = Receiver()
    app = web.Application()
    app.router.add_post("/hook", hook.handle)
    server = await aiohttp_server(app)
    return hook, str(server.make_url("/hook"))


async def emit(rt: Any, coop: str, event_type: str = "payment.completed", event_id: str = "evt_1") -> None:
    async with rt.sessionmaker.begin() as session:
        await emit_event(
            session,
            cooperative_id=coop,
            event_type=event_type,
            event_id=event_id,
            data={"id": "p1", "reference": "PAY_20260115_001", "amount": 50000, "currency": "RWF"},
        )


async def test_event_is_signed_and_delivered(
    rt: Any, demo: dict[str, Any], receiver: Any, worker: Any
) -> None:
    hook, url = receiver
    coop = demo["cooperative_id"]
    _endpoint, secret = await approved_endpoint(rt, coop, url)
    # A second endpoint on the same domain that is not subscribed to this event does not get it.
    await approved_endpoint(rt, coop, url.replace("/hook", "/other"), events=["refund.failed"])
    await emit(rt, coop)
    await drain(worker)
    assert len(hook.requests) == 1
    request = hook.requests[0]
    body = request["body"]
    assert by_hand(secret, request["headers"]["X-Gateway-Signature"], body)
    assert webhooks.verify_signature(secret, request["headers"]["X-Gateway-Signature"], body)
    assert request["headers"]["X-Gateway-Event-Id"] == "evt_1"
    assert request["headers"]["X-Gateway-Event"] == "payment.completed"
    assert request["headers"]["Content-Type"] == "application/json"
    event = json.loads(body)
    assert event["id"] == "evt_1" and event["type"] == "payment.completed"
    assert event["data"]["reference"] == "PAY_20260115_001" and event["cooperativeId"] == coop
    async with rt.sessionmaker() as session:
        [delivery] = (await session.execute(select(WebhookDelivery))).scalars().all()
    assert delivery.status == "DELIVERED" and delivery.delivered_at is not None
    [attempt] = delivery.attempts
    assert attempt["status_code"] == 200 and attempt["error"] is None and attempt["latency_ms"] >= 0
    # The same event emitted again (a duplicate callback upstream): no second delivery.
    await emit(rt, coop)
    await drain(worker)
    assert len(hook.requests) == 1


async def test_fan_out_skips_unapproved_and_disabled(
    rt: Any, demo: dict[str, Any], receiver: Any, worker: Any
) -> None:
    hook, url = receiver
    coop = demo["cooperative_id"]
    await approved_endpoint(rt, coop, url)
    async with rt.sessionmaker.begin() as session:
        await session.execute(update(ApprovedDomain).values(status="REJECTED"))
    await emit(rt, coop, event_id="evt_a")
    await drain(worker)
    async with rt.sessionmaker.begin() as session:
        await session.execute(update(ApprovedDomain).values(status="APPROVED"))
        await session.execute(update(WebhookEndpoint).values(status="DISABLED"))
    await emit(rt, coop, event_id="evt_b")
    await drain(worker)
    assert hook.requests == []
    assert await jobs_of(rt, "webhook.deliver") == []


async def test_an_unapproved_domains_skipped_events_are_warned_about_once_an_hour(
    rt: Any, demo: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """A busy cooperative's rejected domain: one warning per endpoint an hour, counting the events skipped, not one
    per payment."""
    coop = demo["cooperative_id"]
    endpoint, _ = await approved_endpoint(rt, coop, "http://127.0.0.1:9/hook")
    async with rt.sessionmaker.begin() as session:
        await session.execute(update(ApprovedDomain).values(status="REJECTED"))

    def skipped() -> list[Any]:
        return [r for r in caplog.records if r.getMessage() == "webhook endpoint skipped: domain no longer approved"]

    event = {"event_type": "payment.completed", "cooperative_id": coop, "data": {"id": "p1"}}
    with caplog.at_level(logging.WARNING, logger="gateway.webhooks"):
        for n in range(3):
            assert await webhooks.fan_out(rt, {**event, "event_id": f"evt_{n}"}) == 0
        [first] = skipped()
        assert (first.endpoint_id, first.event_id, first.skipped) == (endpoint.id, "evt_0", 1)
        said, unsaid = webhooks._domain_skip_said[endpoint.id]  # an hour later
        webhooks._domain_skip_said[endpoint.id] = (said - webhooks.DOMAIN_SKIP_LOG_SECONDS, unsaid)
        assert await webhooks.fan_out(rt, {**event, "event_id": "evt_3"}) == 0
        async with rt.sessionmaker.begin() as session:  # approved again, then rejected again: said at once
            await session.execute(update(ApprovedDomain).values(status="APPROVED"))
        assert await webhooks.fan_out(rt, {**event, "event_id": "evt_4"}) == 1
        async with rt.sessionmaker.begin() as session:
            await session.execute(update(ApprovedDomain).values(status="REJECTED"))
        assert await webhooks.fan_out(rt, {**event, "event_id": "evt_5"}) == 0
    [_, later, again] = skipped()
    assert (later.event_id, later.skipped) == ("evt_3", 3)  # evt_1, evt_2 and this one
    assert (again.event_id, again.skipped) == ("evt_5", 1)


async def test_a_fan_out_rolled_back_and_run_again_counts_its_skipped_event_once(
    rt: Any, demo: dict[str, Any], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An event skipped for one endpoint (its domain rejected) whose fan-out then failed on a database error for
    another, and ran again: the skip was counted by the try rolled back too, so the next warning said one event
    more than the endpoint missed. Counted once its rows are committed, it is counted once."""
    from sqlalchemy.exc import OperationalError

    coop = demo["cooperative_id"]
    rejected, _ = await approved_endpoint(rt, coop, "http://127.0.0.1:9/hook")  # first: skipped before the failure
    await approved_endpoint(rt, coop, "http://localhost:9/hook")
    async with rt.sessionmaker.begin() as session:
        await session.execute(update(ApprovedDomain).where(ApprovedDomain.domain == "127.0.0.1")
                              .values(status="REJECTED"))
    enqueue, failures = webhooks.enqueue, [OperationalError("INSERT", {}, Exception("connection lost"))]

    async def fails_once(*args: Any, **kw: Any) -> Any:
        if failures:
            raise failures.pop()
        return await enqueue(*args, **kw)

    monkeypatch.setattr(webhooks, "enqueue", fails_once)
    event = {"event_type": "payment.completed", "cooperative_id": coop, "data": {"id": "p1"}}
    with caplog.at_level(logging.WARNING, logger="gateway.webhooks"):
        with pytest.raises(OperationalError):
            await webhooks.fan_out(rt, {**event, "event_id": "evt_0"})
        assert await webhooks.fan_out(rt, {**event, "event_id": "evt_0"}) == 1  # the worker's retry
        said, unsaid = webhooks._domain_skip_said[rejected.id]  # an hour later
        webhooks._domain_skip_said[rejected.id] = (said - webhooks.DOMAIN_SKIP_LOG_SECONDS, unsaid)
        assert await webhooks.fan_out(rt, {**event, "event_id": "evt_1"}) == 1
    said_lines = [(r.event_id, r.skipped) for r in caplog.records
                  if r.getMessage() == "webhook endpoint skipped: domain no longer approved"]
    assert said_lines == [("evt_0", 1), ("evt_1", 1)]  # evt_0 once, and evt_1


async def test_the_events_a_domain_skipped_before_it_is_approved_again_are_counted(
    rt: Any, demo: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """Approved again within the hour: the events skipped since the warning were said nowhere (the next warning,
    after a later rejection, counts from one), so the log's count of what its receiver never got fell short."""
    coop = demo["cooperative_id"]
    endpoint, _ = await approved_endpoint(rt, coop, "http://127.0.0.1:9/hook")
    event = {"event_type": "payment.completed", "cooperative_id": coop, "data": {"id": "p1"}}

    async def domain(status: str) -> None:
        async with rt.sessionmaker.begin() as session:
            await session.execute(update(ApprovedDomain).values(status=status))

    with caplog.at_level(logging.WARNING, logger="gateway.webhooks"):
        await domain("REJECTED")
        for n in range(4):
            assert await webhooks.fan_out(rt, {**event, "event_id": f"evt_{n}"}) == 0
        await domain("APPROVED")
        assert await webhooks.fan_out(rt, {**event, "event_id": "evt_4"}) == 1
        assert await webhooks.fan_out(rt, {**event, "event_id": "evt_5"}) == 1  # said once
        await domain("REJECTED")
        assert await webhooks.fan_out(rt, {**event, "event_id": "evt_6"}) == 0
    said = [(r.getMessage(), r.skipped) for r in caplog.records if getattr(r, "endpoint_id", None) == endpoint.id]
    assert said == [("webhook endpoint skipped: domain no longer approved", 1),
                    ("webhook endpoint approved again: events skipped since the last warning", 3),  # evt_1-3
                    ("webhook endpoint skipped: domain no longer approved", 1)]
    assert sum(skipped for _, skipped in said) == 5  # every event it skipped


async def test_money_taken_after_a_failure_reaches_the_endpoints_told_of_the_failure(
    rt: Any, demo: dict[str, Any], receiver: Any, worker: Any
) -> None:
    """payment.taken_after_failure follows payment.failed: an endpoint that asked for the failure (before this
    event existed, say) is told the money was taken after all; one that asked for neither is not."""
    hook, url = receiver
    coop = demo["cooperative_id"]
    await approved_endpoint(rt, coop, url, events=["payment.failed"])
    await emit(rt, coop, event_type="payment.taken_after_failure", event_id="evt_held")
    await emit(rt, coop, event_type="payment.timeout", event_id="evt_other")
    await drain(worker)
    assert [json.loads(body)["type"] for _, body in ((r, r["body"]) for r in hook.requests)] == [
        "payment.taken_after_failure"]


async def test_bad_event_payload_is_parked(rt: Any, demo: dict[str, Any], worker: Any) -> None:
    await emit(rt, demo["cooperative_id"], event_type="payment.exploded")
    await drain(worker)
    [job] = await jobs_of(rt, "webhook.event")
    assert job.status == "PARKED"


async def test_failures_are_retried_with_backoff_and_recorded(
    rt: Any, demo: dict[str, Any], receiver: Any, worker: Any
) -> None:
    hook, url = receiver
    hook.answers = [500, 503]
    endpoint, secret = await approved_endpoint(rt, demo["cooperative_id"], url)
    await emit(rt, demo["cooperative_id"])
    tried = utcnow()  # before the attempt: a loaded machine can take seconds over it and the reads below
    await drain(worker)
    [job] = await jobs_of(rt, "webhook.deliver")
    assert job.status == "PENDING" and job.attempts == 0  # RetryLater: waiting, not failing
    assert tried + timedelta(seconds=20) < job.run_at < utcnow() + timedelta(seconds=40)
    for _ in range(2):
        async with rt.sessionmaker.begin() as session:
            await session.execute(update(OutboxJob).values(run_at=utcnow() - timedelta(seconds=1)))
        await drain(worker)
    async with rt.sessionmaker() as session:
        [delivery] = (await session.execute(select(WebhookDelivery))).scalars().all()
        endpoint = await session.get(WebhookEndpoint, endpoint.id)
    assert [a["status_code"] for a in delivery.attempts] == [500, 503, 200]
    assert [a["error"] for a in delivery.attempts] == ["HTTP 500", "HTTP 503", None]
    assert delivery.status == "DELIVERED"
    assert endpoint.consecutive_failures == 0  # reset by the success
    # Every attempt carried the same event id and the same bytes, each freshly signed.
    assert len({r["body"] for r in hook.requests}) == 1
    assert {r["headers"]["X-Gateway-Event-Id"] for r in hook.requests} == {"evt_1"}
    assert all(by_hand(secret, r["headers"]["X-Gateway-Signature"], r["body"]) for r in hook.requests)
    assert [r["headers"]["X-Gateway-Delivery-Attempt"] for r in hook.requests] == ["1", "2", "3"]


async def test_a_redirect_is_not_a_delivery(rt: Any, demo: dict[str, Any], receiver: Any, worker: Any) -> None:
    """Only a 2xx delivers: a receiver that answers 301/302 (moved, or a login page in front of it) has not taken the
    event, and redirects are not followed (the new place's domain was never approved). Retried, recorded as failed."""
    hook, url = receiver
    hook.answers = [302, 301]
    await approved_endpoint(rt, demo["cooperative_id"], url)
    await emit(rt, demo["cooperative_id"])
    await drain(worker)
    async with rt.sessionmaker.begin() as session:
        await session.execute(update(OutboxJob).values(run_at=utcnow() - timedelta(seconds=1)))
    await drain(worker)
    async with rt.sessionmaker() as session:
        [delivery] = (await session.execute(select(WebhookDelivery))).scalars().all()
    assert [(a["status_code"], a["error"]) for a in delivery.attempts] == [(302, "HTTP 302"), (301, "HTTP 301")]
    assert delivery.status == "PENDING" and delivery.delivered_at is None
    assert len(hook.requests) == 2
    [job] = await jobs_of(rt, "webhook.deliver")
    assert job.status == "PENDING" and job.run_at > utcnow()  # a third try waits its backoff


def test_retry_schedule_covers_three_days() -> None:
    delays = [webhooks.retry_delay(n) for n in range(1, 30)]
    assert 27 <= delays[0] <= 33
    assert all(d <= webhooks.MAX_RETRY_SECONDS * 1.1 for d in delays)
    total, attempts = 0.0, 0
    while total < webhooks.RETRY_FOR.total_seconds():
        attempts += 1
        total += webhooks.retry_delay(attempts)
    assert 15 <= attempts <= 30


async def test_given_up_after_three_days(rt: Any, demo: dict[str, Any], receiver: Any, worker: Any) -> None:
    hook, url = receiver
    hook.answers = [500]
    await approved_endpoint(rt, demo["cooperative_id"], url)
    await emit(rt, demo["cooperative_id"])
    await worker.run_once()  # fan-out
    async with rt.sessionmaker.begin() as session:
        await session.execute(update(WebhookDelivery).values(created_at=utcnow() - timedelta(days=3)))
    [job] = await jobs_of(rt, "webhook.deliver")
    with pytest.raises(PermanentJobError, match="within 3 days"):
        await webhooks.deliver(rt, as_job(job))
    async with rt.sessionmaker() as session:
        [delivery] = (await session.execute(select(WebhookDelivery))).scalars().all()
    assert delivery.status == "FAILED" and len(delivery.attempts) == 1
    # A later run of the same job does nothing.
    assert await webhooks.deliver(rt, as_job(job)) == "failed"
    assert len(hook.requests) == 1


async def test_no_retry_is_scheduled_past_the_three_days(
    rt: Any, demo: dict[str, Any], receiver: Any, worker: Any
) -> None:
    """A failure seconds before the three days end is the last attempt: the next retry (30 s on) would fall after
    them, so the delivery is given up now rather than tried once more past the promised window."""
    hook, url = receiver
    hook.answers = [500]
    await approved_endpoint(rt, demo["cooperative_id"], url)
    await emit(rt, demo["cooperative_id"])
    await worker.run_once()  # fan-out
    async with rt.sessionmaker.begin() as session:
        await session.execute(
            update(WebhookDelivery).values(created_at=utcnow() - webhooks.RETRY_FOR + timedelta(seconds=10)))
    [job] = await jobs_of(rt, "webhook.deliver")
    with pytest.raises(PermanentJobError, match="within 3 days"):
        await webhooks.deliver(rt, as_job(job))
    async with rt.sessionmaker() as session:
        [delivery] = (await session.execute(select(WebhookDelivery))).scalars().all()
    assert delivery.status == "FAILED" and [a["error"] for a in delivery.attempts] == ["HTTP 500"]


async def test_endpoint_disabled_after_threshold_and_admin_told_by_sms(
    rt: Any, demo: dict[str, Any], aiohttp_server: Any, worker: Any
) -> None:
    _, sim = await start_simulator(aiohttp_server, rt)
    coop = demo["cooperative_id"]
    # Nothing listens on 127.0.0.1:9: every attempt is a connection error.
    endpoint, _ = await approved_endpoint(rt, coop, "http://127.0.0.1:9/hook")
    # It has been failing for longer than a day (the streak began when updated_at says).
    async with rt.sessionmaker.begin() as session:
        await session.execute(update(WebhookEndpoint).values(
            consecutive_failures=webhooks.DISABLE_AFTER - 2,
            updated_at=utcnow() - webhooks.DISABLE_AFTER_FAILING_FOR - timedelta(minutes=1)))
    await emit(rt, coop, event_id="evt_x")
    await drain(worker)
    async with rt.sessionmaker() as session:
        assert (await session.get(WebhookEndpoint, endpoint.id)).status == "ACTIVE"
    await emit(rt, coop, event_id="evt_y")
    await drain(worker)
    async with rt.sessionmaker() as session:
        endpoint = await session.get(WebhookEndpoint, endpoint.id)
        deliveries = (await session.execute(select(WebhookDelivery))).scalars().all()
    assert endpoint.status == "DISABLED" and endpoint.disabled_at is not None
    assert endpoint.consecutive_failures == webhooks.DISABLE_AFTER
    assert all("ConnectError" in d.attempts[0]["error"] for d in deliveries)
    # The cooperative's contact phone got one SMS naming the endpoint's host.
    [sms] = sim.messages("+250788123456")
    assert "127.0.0.1" in sms["message"] and "disabled after 20 failed deliveries" in sms["message"]
    # The pending retries find the endpoint switched off: held PENDING, neither sent nor given up.
    async with rt.sessionmaker.begin() as session:
        await session.execute(update(OutboxJob).values(run_at=utcnow() - timedelta(seconds=1)))
    await drain(worker)
    async with rt.sessionmaker() as session:
        rows = (await session.execute(select(WebhookDelivery))).scalars().all()
    assert {d.event_id: (d.status, len(d.attempts)) for d in rows} == {"evt_x": ("PENDING", 1), "evt_y": ("PENDING", 1)}
    assert len(sim.messages("+250788123456")) == 1
    # Re-enabled by an admin: counters reset, and what it held is queued again.
    async with rt.sessionmaker.begin() as session:
        again = await webhooks.enable_endpoint(
            session, endpoint_id=endpoint.id, cooperative_id=coop, actor=ADMIN
        )
    assert again.status == "ACTIVE" and again.consecutive_failures == 0
    resumed = [j for j in await jobs_of(rt, "webhook.deliver") if j.status == "PENDING"]
    assert sorted(j.payload["event_id"] for j in resumed) == ["evt_x", "evt_y"]
    assert all("resumed_at" in j.payload for j in resumed)


async def test_worker_killed_mid_delivery_resends_the_same_event(
    rt: Any, demo: dict[str, Any], receiver: Any, worker: Any
) -> None:
    hook, url = receiver
    _endpoint, secret = await approved_endpoint(rt, demo["cooperative_id"], url)
    await emit(rt, demo["cooperative_id"], event_id="evt_kill")
    await worker.run_once()  # fan-out only
    [job] = await jobs_of(rt, "webhook.deliver")
    hook.hold.clear()
    # The worker dies while the receiver holds the request: nothing is recorded on our side. (Killed once the
    # request has arrived, not after a fixed 0.3 s: on a loaded machine the request may not have left by then.)
    delivering = asyncio.create_task(webhooks.deliver(rt, as_job(job)))
    await asyncio.wait_for(hook.arrived.wait(), 30)
    delivering.cancel()
    with pytest.raises(asyncio.CancelledError):
        await delivering
    async with rt.sessionmaker() as session:
        [delivery] = (await session.execute(select(WebhookDelivery))).scalars().all()
    assert delivery.status == "PENDING" and delivery.attempts == []
    # The lease lapses; another worker runs the same job.
    hook.hold.set()
    assert await webhooks.deliver(rt, as_job(job, attempts=2)) == "delivered"
    first, second = hook.requests
    assert first["body"] == second["body"]
    assert first["headers"]["X-Gateway-Event-Id"] == second["headers"]["X-Gateway-Event-Id"] == "evt_kill"
    assert json.loads(second["body"])["id"] == "evt_kill"
    assert by_hand(secret, second["headers"]["X-Gateway-Signature"], second["body"])


def test_long_event_ids_get_a_stable_digest() -> None:
    long_id = "evt_dispute_updated_" + "x" * 36 + "_UNDER_REVIEW"
    assert len(webhooks.stored_event_id(long_id)) <= webhooks.MAX_EVENT_ID
    assert webhooks.stored_event_id(long_id) == webhooks.stored_event_id(long_id)
    assert webhooks.stored_event_id("evt_1") == "evt_1"


async def test_retry_later_is_raised_for_a_failure(
    rt: Any, demo: dict[str, Any], receiver: Any, worker: Any
) -> None:
    hook, url = receiver
    hook.answers = [410]
    await approved_endpoint(rt, demo["cooperative_id"], url)
    await emit(rt, demo["cooperative_id"])
    await worker.run_once()
    [job] = await jobs_of(rt, "webhook.deliver")
    with pytest.raises(RetryLater, match="HTTP 410"):
        await webhooks.deliver(rt, as_job(job))


def test_readme_verification_function_agrees() -> None:
    """The function receivers copy from the README verifies what we sign, and rejects what we would: the project's
    README (where an integrator reads it, "Webhooks to cooperatives' systems") and the SMS channel's copy."""
    from pathlib import Path

    root = Path(__file__).parents[2]
    for readme in (root / "README.md", root / "channels" / "sms" / "README.md"):
        code = readme.read_text().split("```python\n", 1)[1].split("```", 1)[0]
        namespace: dict[str, Any] = {}
        exec(code, namespace)  # our own README
        readme_verify = namespace["verify_signature"]
        body = b'{"id":"evt_1"}'
        good = webhooks.sign("whsec_x", body, int(time.time()))
        old = webhooks.sign("whsec_x", body, int(time.time()) - 400)
        assert readme_verify("whsec_x", good, body) is True, readme
        assert readme_verify("whsec_x", webhooks.sign("whsec_new", body, int(time.time()), "whsec_x"), body) is True
        assert readme_verify("whsec_y", good, body) is False
        assert readme_verify("whsec_x", old, body) is False
        assert readme_verify("whsec_x", good, body + b"\n") is False


@pytest.mark.parametrize("status", [s.value for s in PaymentStatus])
@pytest.mark.parametrize("taken", [False, True])
def test_every_event_a_payment_was_last_told_is_one_a_report_may_follow(status: str, taken: bool) -> None:
    """core.webhooks.TOLD (what payment.paid_twice and payment.unconfirmed_success may follow, checked again when
    they are sent) lists every answer of core.provider_events._told: one it lacked would mark those deliveries FAILED as
    "no longer subscribed" at their send."""
    from types import SimpleNamespace

    from core.provider_events import _told

    payment = SimpleNamespace(status=status, completed_at=datetime.now(UTC) if taken else None,
                              collected_minor=5000 if taken else 0)
    assert _told(payment) in webhooks.TOLD  # type: ignore[arg-type]


async def test_an_endpoint_whose_host_ends_in_a_dot_gets_its_events(rt: Any, demo: dict[str, Any]) -> None:
    """`https://hooks.example.rw./x` is registered on the approved hooks.example.rw (the root's dot dropped, as the
    domain's), so its events are recorded for it, not skipped as if the domain were not approved."""
    coop = demo["cooperative_id"]
    endpoint, _secret = await approved_endpoint(rt, coop, "https://hooks.example.rw./x", embedded=False)
    made = await webhooks.fan_out(rt, {"event_type": "payment.completed", "cooperative_id": coop,
                                       "event_id": "evt_dot", "data": {"id": "p1"}})
    assert made == 1
    async with rt.sessionmaker() as session:
        [delivery] = (await session.execute(select(WebhookDelivery))).scalars().all()
    assert delivery.endpoint_id == endpoint.id and delivery.status == "PENDING"
