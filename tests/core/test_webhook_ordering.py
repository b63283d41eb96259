"""Webhook events a receiver can order: deliveries retry independently and a batch goes out at once, so events
about one entity arrive in any order. Each event's data carries `updatedAt` (UTC, to the millisecond): what the
change it tells wrote on the row, strictly later for each later change of that entity, even two changes in one
millisecond or on a host whose clock is a little behind. The envelope's `created` is to the millisecond too."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp import web
from sqlalchemy import select, update

from core import notify
from core.audit import Actor
from core.db import utcnow
from core.disputes import move_dispute, open_dispute
from core.models import Dispute, OutboxJob, Payment, Refund
from core.money import Money
from core.payments import NewPayment, create_payment
from core.ports import ProviderOutcome
from core.provider_events import apply_collection_outcome
from core.refunds import apply_refund_outcome, refund_data, request_refund
from core.state import machine
from tests.core.test_webhooks import approved_endpoint

ADMIN = Actor("admin:test", "api")
PROVIDER = Actor("provider:test", "provider")
MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


async def _payment(rt: Any, demo: dict[str, Any]) -> Payment:
    new = NewPayment(cooperative_id=demo["cooperative_id"], payment_type_id=demo["payment_types"]["Monthly Rent"],
                     method="MOBILE_MONEY_MTN", account="0788000001", idempotency_key="order-key-0001",
                     channel="api", member_id=demo["members"]["+250788000001"])
    async with rt.sessionmaker.begin() as session:
        payment, _ = await create_payment(session, rt, new, actor=ADMIN)
    return payment


async def _outcome(rt: Any, payment_id: str, outcome: ProviderOutcome, **kw: Any) -> None:
    async with rt.sessionmaker.begin() as session:
        payment = await session.get(Payment, payment_id)
        assert payment is not None
        await apply_collection_outcome(session, rt, payment, outcome, actor=PROVIDER, **kw)


async def _events(rt: Any) -> dict[str, dict[str, Any]]:
    """The queued webhook events by type: what fan-out stores and every delivery sends."""
    async with rt.sessionmaker() as session:
        jobs = (await session.execute(select(OutboxJob).where(OutboxJob.kind == "webhook.event")
                                      .order_by(OutboxJob.created_at))).scalars().all()
    return {job.payload["event_type"]: job.payload for job in jobs}


def _ms(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def _updated_at(rt: Any, model: Any, row_id: str) -> str:
    """The row's updated_at as events write it (UTC, to the millisecond)."""
    async with rt.sessionmaker() as session:
        row = await session.get(model, row_id)
        assert row is not None
        return _ms(row.updated_at)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> dict[str, timedelta]:
    """The clock changes are stamped with (core.notify.changed_at reads it), moved by the test."""
    shift = {"by": timedelta(0)}
    monkeypatch.setattr(notify, "utcnow", lambda: utcnow() + shift["by"])
    return shift


async def test_a_late_completion_reads_later_than_the_timeout_even_on_a_clock_behind(
    rt: Any, demo: dict[str, Any], clock: dict[str, timedelta]
) -> None:
    """TIMEOUT then the provider's success (COMPLETED late), the second stamped by a host whose clock is 50 ms
    behind the first's: the completion's updatedAt is still after the timeout's, and each is what its move
    wrote on the payment (the event is built before the move, from the values it writes)."""
    payment = await _payment(rt, demo)
    await _outcome(rt, payment.id, ProviderOutcome.EXPIRED, reason="not approved in time")
    timeout = (await _events(rt))["payment.timeout"]
    assert timeout["data"]["status"] == "TIMEOUT"
    assert timeout["data"]["updatedAt"] == await _updated_at(rt, Payment, payment.id)
    clock["by"] = -timedelta(milliseconds=50)
    await _outcome(rt, payment.id, ProviderOutcome.SUCCEEDED, provider_transaction_id="MTN-LATE-1")
    completed = (await _events(rt))["payment.completed"]
    assert completed["data"]["status"] == "COMPLETED"
    assert completed["data"]["updatedAt"] == await _updated_at(rt, Payment, payment.id)
    assert MS.match(timeout["data"]["updatedAt"]) and MS.match(completed["data"]["updatedAt"])
    assert completed["data"]["updatedAt"] > timeout["data"]["updatedAt"]
    assert MS.match(timeout["created"]) and MS.match(completed["created"])


async def test_money_taken_after_a_failure_reads_later_than_the_failure(
    rt: Any, demo: dict[str, Any], clock: dict[str, timedelta]
) -> None:
    """payment.taken_after_failure keeps the status FAILED: only its updatedAt tells it is the newer news (a
    receiver keeping the newer of the two must not drop it as a replay of payment.failed)."""
    payment = await _payment(rt, demo)
    clock["by"] = timedelta(seconds=5)  # the failure stamped by a clock ahead; the next change is not before it
    await _outcome(rt, payment.id, ProviderOutcome.FAILED, reason="insufficient funds")
    clock["by"] = timedelta(0)
    await _outcome(rt, payment.id, ProviderOutcome.SUCCEEDED, provider_transaction_id="MTN-AFTER-1")
    events = await _events(rt)
    failed, taken = events["payment.failed"]["data"], events["payment.taken_after_failure"]["data"]
    assert failed["status"] == taken["status"] == "FAILED"
    assert taken["updatedAt"] > failed["updatedAt"]
    assert taken["updatedAt"] == await _updated_at(rt, Payment, payment.id)


async def test_dispute_changes_in_one_millisecond_read_in_order(
    rt: Any, demo: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Opened, under review and resolved with the clock standing still (one millisecond): three updatedAt,
    strictly increasing, the last one the dispute's."""
    payment = await _payment(rt, demo)
    await _outcome(rt, payment.id, ProviderOutcome.SUCCEEDED, provider_transaction_id="MTN-1")
    frozen = utcnow()
    monkeypatch.setattr(notify, "utcnow", lambda: frozen)
    monkeypatch.setattr(machine, "utcnow", lambda: frozen)  # what a move writes when it is not told
    seen = []
    async with rt.sessionmaker.begin() as session:
        row = await session.get(Payment, payment.id)
        assert row is not None
        dispute = await open_dispute(session, payment=row, reason="OTHER", channel="api", actor=ADMIN,
                                     cipher=rt.cipher, answer_days=rt.settings.sms_payer_answer_days)
    seen.append((await _events(rt))["dispute.opened"]["data"])
    for target in ("UNDER_REVIEW", "RESOLVED"):
        async with rt.sessionmaker.begin() as session:
            await move_dispute(session, rt, dispute_id=dispute.id, cooperative_id=None, target=target, actor=ADMIN)
        async with rt.sessionmaker() as session:
            jobs = (await session.execute(select(OutboxJob.payload).where(
                OutboxJob.kind == "webhook.event",
                OutboxJob.dedupe_key == f"wh:evt_dispute_updated_{dispute.id}_{target.lower()}"))).scalars().all()
        seen.append(jobs[0]["data"])
    assert [d["status"] for d in seen] == ["OPEN", "UNDER_REVIEW", "RESOLVED"]
    stamps = [d["updatedAt"] for d in seen]
    assert all(MS.match(s) for s in stamps) and stamps == sorted(set(stamps)), stamps
    assert stamps[-1] == await _updated_at(rt, Dispute, dispute.id)


async def test_refund_event_carries_the_updated_at_its_move_wrote(rt: Any, demo: dict[str, Any]) -> None:
    payment = await _payment(rt, demo)
    await _outcome(rt, payment.id, ProviderOutcome.SUCCEEDED, provider_transaction_id="MTN-2")
    async with rt.sessionmaker.begin() as session:
        refund, _ = await request_refund(session, rt, payment_id=payment.id, cooperative_id=None,
                                         amount=Money(10_000, "RWF"), reason="overpaid",
                                         idempotency_key="refund-order-1", actor=ADMIN)
    async with rt.sessionmaker.begin() as session:
        row = await session.get(Refund, refund.id)
        assert row is not None
        await apply_refund_outcome(session, rt, row, ProviderOutcome.SUCCEEDED, actor=PROVIDER,
                                   provider_transaction_id="RF-1")
    data = (await _events(rt))["refund.completed"]["data"]
    assert data["status"] == "COMPLETED" and MS.match(data["updatedAt"])
    assert data["updatedAt"] == await _updated_at(rt, Refund, refund.id)
    async with rt.sessionmaker() as session:
        assert refund_data(await session.get(Refund, refund.id))["updatedAt"] == data["updatedAt"]  # type: ignore[arg-type]


class NewestWins:
    """A receiver as README.md tells one to be: drops event ids it has seen, and applies an event only when its
    data's updatedAt is newer than what it holds for that entity. Its first answer can be a 500 (a blip)."""

    def __init__(self) -> None:
        self.held: dict[str, tuple[str, str]] = {}  # entity id -> (updatedAt, status)
        self.arrivals: list[tuple[str, str]] = []
        self.fail_first: set[str] = set()
        self.seen: set[str] = set()

    async def handle(self, request: web.Request) -> web.Response:
        event = json.loads(await request.read())
        if event["type"] in self.fail_first:
            self.fail_first.discard(event["type"])
            return web.Response(status=500)
        self.arrivals.append((event["type"], event["data"]["status"]))
        if event["id"] not in self.seen:
            self.seen.add(event["id"])
            data = event["data"]
            held = self.held.get(data["id"])
            if held is None or data["updatedAt"] > held[0]:
                self.held[data["id"]] = (data["updatedAt"], data["status"])
        return web.Response(status=200)


async def _run_webhooks(rt: Any, worker: Any, *, due: bool) -> None:
    """Run the webhook jobs due now; `due`: time passes first, so backed-off retries are due too."""
    for _ in range(6):
        async with rt.sessionmaker.begin() as session:
            await session.execute(update(OutboxJob).where(~OutboxJob.kind.like("webhook.%"),
                                                          OutboxJob.status == "PENDING").values(status="DONE"))
            if due:
                await session.execute(update(OutboxJob).where(OutboxJob.kind.like("webhook.%"),
                                                              OutboxJob.status == "PENDING").values(run_at=utcnow()))
        if not await worker.run_once():
            return


async def test_a_receiver_keeping_the_newest_ends_where_the_gateway_does(
    rt: Any, demo: dict[str, Any], worker: Any, aiohttp_server: Any
) -> None:
    """The timeout's first attempt meets a 500; the late completion is delivered; then the timeout's retry
    arrives. Applying only newer updatedAt, the receiver ends on COMPLETED, as the gateway says."""
    receiver = NewestWins()
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    server = await aiohttp_server(app)
    await approved_endpoint(rt, demo["cooperative_id"], str(server.make_url("/hook")),
                            events=["payment.completed", "payment.timeout"])
    payment = await _payment(rt, demo)
    receiver.fail_first.add("payment.timeout")
    await _outcome(rt, payment.id, ProviderOutcome.EXPIRED, reason="not approved in time")
    await _run_webhooks(rt, worker, due=False)  # the timeout: 500, its retry in ~30 s
    await _outcome(rt, payment.id, ProviderOutcome.SUCCEEDED, provider_transaction_id="MTN-LATE-2")
    await _run_webhooks(rt, worker, due=False)  # the completion, at once
    await _run_webhooks(rt, worker, due=True)  # the timeout's retry, last
    assert receiver.arrivals == [("payment.completed", "COMPLETED"), ("payment.timeout", "TIMEOUT")]
    async with rt.sessionmaker() as session:
        truth = await session.get(Payment, payment.id)
    assert truth is not None and truth.status == "COMPLETED"
    assert receiver.held[payment.id][1] == truth.status


class OpenFlags:
    """A receiver keeping each payment's open flags as README.md tells one to: a flag (payment.flagged, or a flag's
    own event) is read even when its updatedAt is not later than the last applied, unless it is earlier than that of
    a payment.flag_cleared applied for the payment, which cleared every flag told before it. Its first answer to an
    event type in `fail_first` is a 500 (a blip)."""

    def __init__(self) -> None:
        self.open: dict[str, dict[str, str]] = {}  # payment id -> {event id: the flag's updatedAt}
        self.cleared: dict[str, str] = {}  # payment id -> the updatedAt of the last payment.flag_cleared
        self.arrivals: list[str] = []
        self.fail_first: set[str] = set()

    async def handle(self, request: web.Request) -> web.Response:
        event = json.loads(await request.read())
        if event["type"] in self.fail_first:
            self.fail_first.discard(event["type"])
            return web.Response(status=500)
        self.arrivals.append(event["type"])
        data = event["data"]
        flags = self.open.setdefault(data["id"], {})
        if event["type"] == "payment.flag_cleared":
            self.cleared[data["id"]] = max(self.cleared.get(data["id"], ""), data["updatedAt"])
            for told in [e for e, at in flags.items() if at < data["updatedAt"]]:
                del flags[told]
        elif data["updatedAt"] >= self.cleared.get(data["id"], ""):
            flags[event["id"]] = data["updatedAt"]
        return web.Response(status=200)


async def test_a_flag_retried_after_its_review_is_read_as_cleared_and_a_later_one_as_open(
    rt: Any, demo: dict[str, Any], worker: Any, aiohttp_server: Any, clock: dict[str, timedelta]
) -> None:
    """payment.flagged's first attempt meets a 500; a person reviews the flag and payment.flag_cleared is delivered;
    then the flag's retry arrives: earlier than the review's updatedAt, it is not open again. A flag raised after the
    review (on a host whose clock is behind) reads later than it, and is."""
    from core.payments import review_flags

    receiver = OpenFlags()
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    server = await aiohttp_server(app)
    await approved_endpoint(rt, demo["cooperative_id"], str(server.make_url("/hook")),
                            events=["payment.flagged", "payment.flag_cleared"])
    payment = await _payment(rt, demo)
    receiver.fail_first.add("payment.flagged")
    await _outcome(rt, payment.id, ProviderOutcome.SUCCEEDED, provider_transaction_id="MTN-SHORT-1",
                   amount=Money(40_000, "RWF"))  # flagged: another amount taken
    await _run_webhooks(rt, worker, due=False)  # the flag: 500, its retry in ~30 s
    async with rt.sessionmaker.begin() as session:
        await review_flags(session, payment.id, None, "statement shows 40,000; the rest paid in cash", actor=ADMIN)
    await _run_webhooks(rt, worker, due=False)  # the review, at once
    await _run_webhooks(rt, worker, due=True)  # the flag's retry, last
    assert receiver.arrivals == ["payment.flag_cleared", "payment.flagged"]
    assert receiver.open[payment.id] == {}

    clock["by"] = -timedelta(seconds=5)
    await _outcome(rt, payment.id, ProviderOutcome.SUCCEEDED, provider_transaction_id="MTN-OTHER-2")
    await _run_webhooks(rt, worker, due=True)
    assert receiver.arrivals[2:] == ["payment.flagged"]
    async with rt.sessionmaker() as session:
        truth = await session.get(Payment, payment.id)
    assert truth is not None and truth.mismatch and "MTN-OTHER-2" in (truth.mismatch_detail or "")
    assert list(receiver.open[payment.id].values()) == [_ms(truth.updated_at)]
