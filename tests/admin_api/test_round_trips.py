"""What the write paths send to PostgreSQL: the budget the benchmark's figures rest on.

Counting statements is exact where timing is noisy: a change that adds a round trip to a payment, a
callback or a connection checkout fails here instead of showing up as a slower benchmark weeks later.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import func, select

from admin_api.payments import present
from core.db import utcnow
from core.models import AuditEvent, OutboxJob, Payment
from core.models import ProviderEvent as ProviderEventRow
from core.ports import EventKind, ProviderEvent, ProviderOutcome
from core.provider_events import event_data, handle_provider_event
from tests.admin_api.conftest import payment_body
from tests.conftest import requires_pg, sql_sent

pytestmark = requires_pg


@pytest.fixture
def sent(rt: Any) -> Iterator[list[str]]:
    """The first words of every statement asyncpg sends to the server (tests.conftest.sql_sent). A BEGIN that names
    the server's default isolation level is a BEGIN: a connection given back from autocommit (core.db.autocommit: an
    API payment's, an API key's lookup, a USSD hop's) has its level set back to that default by name, which asyncpg's
    BEGIN then spells out (the same one statement, the same transaction)."""
    with sql_sent(rt, _first_words) as seen:
        yield seen


def _first_words(sql: str) -> str:
    words = sql.rstrip("; \n").split()
    if words[:5] == ["BEGIN", "ISOLATION", "LEVEL", "READ", "COMMITTED"]:
        return "BEGIN"
    return " ".join(words[:4])


async def test_an_api_payment_is_one_read_and_one_write(client: Any, demo: Any, rt: Any, admin: Any,
                                                        sent: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    body = payment_body(demo["payment_types"]["Monthly Rent"])
    made = _sessions_made(monkeypatch)
    sent.clear()
    created = await admin.json("POST", "/v1/payments", 201, json=body)
    # No BEGIN or COMMIT: the write is one statement, atomic alone. On a Core connection in autocommit, with no ORM
    # session made for the request (admin_api.payments.initiate_payment), the connection back in the pool.
    assert sent == ["SELECT cooperatives.id AS coop_id,", "WITH n AS (SELECT"], sent
    assert made == [] and rt.engine.sync_engine.pool.checkedout() == 0
    async with rt.sessionmaker() as s:
        stored = await s.get(Payment, created["id"])
    assert stored is not None and stored.reference == created["reference"]
    assert created == present(stored)  # the answer, from the detached payment, reads as the stored row
    # The replay finds the first payment through the INSERT's conflict: one SELECT more (raw, in autocommit: no
    # BEGIN and COMMIT around it), nothing written, still no session.
    made.clear()
    sent.clear()
    again = await admin.req("POST", "/v1/payments", json=body)
    assert again.status == 201 and again.headers["Idempotent-Replayed"] == "true"
    assert await again.json() == created
    assert [s.split()[0] for s in sent] == ["SELECT", "WITH", "SELECT"], sent
    assert made == [] and rt.engine.sync_engine.pool.checkedout() == 0


async def test_an_api_payment_with_a_due_date_reads_its_type_through_a_session_on_the_same_connection(
    client: Any, demo: Any, rt: Any, admin: Any, sent: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A due date is checked against its type read through the ORM: one session, on the payment's connection in
    autocommit (core.pgraw.orm), so still no BEGIN or COMMIT and one connection for the request."""
    one_off = await admin.json("POST", "/v1/payment-types", 201, json={"name": "Joining fee", "amount": 50000})
    checkouts: list[int] = []
    monkeypatch.setattr(rt.engine.sync_engine.pool, "connect", _counting(rt.engine.sync_engine.pool.connect,
                                                                         checkouts))
    made = _sessions_made(monkeypatch)
    sent.clear()
    created = await admin.json("POST", "/v1/payments", 201, json=payment_body(
        one_off["id"], dueDate="2027-03-01T00:00:00Z"))
    assert [s.split()[0] for s in sent] == ["SELECT", "SELECT", "WITH"], sent
    assert len(made) == 1 and len(checkouts) == 1 and rt.engine.sync_engine.pool.checkedout() == 0
    assert created["dueDate"] == "2027-03-01T00:00:00Z"


async def test_an_api_payment_refused_or_failing_on_its_core_connection_gives_it_back(
    client: Any, demo: Any, rt: Any, admin: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another request under a used key (409), and a failure once the write's statement ran (its answer lost): the
    connection back in the pool, no session made; the statement's rows are whole, and the retry answers them."""
    body = payment_body(demo["payment_types"]["Monthly Rent"])
    first = await admin.json("POST", "/v1/payments", 201, json=body)
    made = _sessions_made(monkeypatch)
    refused = await admin.json("POST", "/v1/payments", 409, json={**body, "amount": 60000})
    assert refused["code"] == "IDEMPOTENCY_KEY_REUSED"
    assert made == [] and rt.engine.sync_engine.pool.checkedout() == 0

    import core.payments as payments

    original = payments._insert_in_one_statement

    async def broken(*args: Any, **kw: Any) -> None:
        await original(*args, **kw)  # the write's statement fails after it ran: here, its answer is lost
        raise ConnectionResetError("the write's answer was lost")

    monkeypatch.setattr(payments, "_insert_in_one_statement", broken)
    lost = {**body, "idempotencyKey": "key-lost-answer-1"}
    assert (await admin.req("POST", "/v1/payments", json=lost)).status == 503  # (a connection error: a 503)
    assert made == [] and rt.engine.sync_engine.pool.checkedout() == 0
    # One statement in autocommit: what it wrote is whole (payment, audit row, both jobs), and the retry answers it.
    monkeypatch.setattr(payments, "_insert_in_one_statement", original)
    again = await admin.req("POST", "/v1/payments", json=lost)
    assert again.status == 201 and again.headers["Idempotent-Replayed"] == "true"
    async with rt.sessionmaker() as s:
        kept = (await s.execute(select(Payment).where(Payment.idempotency_key == lost["idempotencyKey"]))).scalar_one()
        audit = (await s.execute(select(func.count()).select_from(AuditEvent)
                                 .where(AuditEvent.entity_id == kept.id))).scalar_one()
        jobs = (await s.execute(select(func.count()).select_from(OutboxJob)
                                .where(OutboxJob.payload["payment_id"].as_string() == kept.id))).scalar_one()
        assert (await s.get(Payment, first["id"])) is not None
    assert (await again.json())["id"] == kept.id and audit == 1 and jobs == 2


def _counting(connect: Any, calls: list[int]) -> Any:
    def counted(*args: Any, **kw: Any) -> Any:
        calls.append(1)
        return connect(*args, **kw)
    return counted


async def _api_payment(admin: Any, demo: Any, rt: Any) -> Payment:
    """A PENDING payment made through the API, as stored."""
    created = await admin.json("POST", "/v1/payments", 201, json=payment_body(demo["payment_types"]["Monthly Rent"]))
    async with rt.sessionmaker() as s:
        return await s.get(Payment, created["id"])


def _callback(payment: Payment, event_id: str, outcome: ProviderOutcome, **fields: Any) -> ProviderEvent:
    return ProviderEvent(provider=payment.provider, kind=EventKind.COLLECTION, event_id=event_id,
                         reference=payment.provider_reference, outcome=outcome, **fields)


async def _notices(s: Any) -> dict[str, tuple[str, dict[str, Any]]]:
    """The SMS and webhook jobs queued, by kind: (dedupe key, payload)."""
    rows = await s.execute(select(OutboxJob.kind, OutboxJob.dedupe_key, OutboxJob.payload)
                           .where(OutboxJob.kind.in_(("sms.send", "webhook.event"))))
    return {kind: (key, payload) for kind, key, payload in rows.all()}


async def test_a_callback_is_two_statements_in_one_transaction(client: Any, demo: Any, rt: Any,
                                                               admin: Any, sent: list[str]) -> None:
    payment = await _api_payment(admin, demo, rt)
    callback = _callback(payment, "cb-1", ProviderOutcome.SUCCEEDED, provider_transaction_id="TX-1")
    sent.clear()
    assert await handle_provider_event(rt, callback) == "completed"
    # The event stored, the payment locked, then the transaction id's lock and its probe (no other payment holds it)
    # in the same statement (core.payment_statements' stored_and_locked; the database's gateway_id_holder); the move
    # with its audit row, the receipt and webhook jobs and the event's outcome.
    assert sent == ["BEGIN", "WITH e AS (INSERT", "WITH moved AS (UPDATE", "COMMIT"], sent
    async with rt.sessionmaker() as s:
        stored = (await s.execute(select(ProviderEventRow.outcome, ProviderEventRow.payment_id)
                                  .where(ProviderEventRow.event_id == "cb-1"))).one()
        jobs = await _notices(s)
        moved = await s.get(Payment, payment.id)
        audit = (await s.execute(select(AuditEvent.action, AuditEvent.actor, AuditEvent.after)
                                 .where(AuditEvent.entity_id == payment.id,
                                        AuditEvent.action == "payment.completed"))).one()
    assert tuple(stored) == ("completed", payment.id)
    assert moved.status == "COMPLETED" and moved.provider_transaction_id == "TX-1"
    assert audit.actor == f"provider:{payment.provider}" and audit.after["status"] == "COMPLETED"
    assert jobs["sms.send"][0] == f"sms:payment_receipt:{payment.id}"
    assert jobs["sms.send"][1]["context"] == {"payment_id": payment.id}
    # The webhook event was built before the move, from what it would write: it must read as the stored row.
    assert jobs["webhook.event"][0] == f"wh:evt_payment_completed_{payment.id}"
    assert jobs["webhook.event"][1]["data"] == event_data(moved), (jobs["webhook.event"][1]["data"], event_data(moved))
    assert jobs["webhook.event"][1]["data"]["status"] == "COMPLETED"
    assert jobs["webhook.event"][1]["data"]["gatewayTransactionId"] == "TX-1"
    assert jobs["webhook.event"][1]["data"]["collectedAmount"] == moved.amount_minor  # all of it (RWF: no minor unit)


@pytest.mark.parametrize("case", ["late", "mismatch", "no_transaction_id", "other_currency"])
async def test_the_webhook_data_built_before_the_move_reads_as_the_stored_row(
    client: Any, demo: Any, rt: Any, admin: Any, case: str
) -> None:
    from sqlalchemy import update

    from core.money import Money

    payment = await _api_payment(admin, demo, rt)
    if case == "late":  # given up on, then the money arrives: completed, flagged late
        async with rt.sessionmaker.begin() as s:
            await s.execute(update(Payment).where(Payment.id == payment.id).values(status="TIMEOUT"))
    amount = {"mismatch": Money(payment.amount_minor - 100, payment.currency),
              "other_currency": Money(500, "KES")}.get(case)
    callback = _callback(payment, f"cb-{case}", ProviderOutcome.SUCCEEDED, amount=amount,
                         provider_transaction_id=None if case == "no_transaction_id" else "TX-9")
    assert await handle_provider_event(rt, callback) == ("late_completed" if case == "late" else "completed")
    async with rt.sessionmaker() as s:
        stored = await s.get(Payment, payment.id)
        events = {p["event_type"]: p["data"] for p in (await s.execute(
            select(OutboxJob.payload).where(OutboxJob.kind == "webhook.event"))).scalars()}
    data = events.pop("payment.completed")
    assert data == event_data(stored), (data, event_data(stored))
    # A flag written with the move is told with it (payment.flagged), its payment read as the stored row too.
    flagged = events.pop("payment.flagged", None)
    assert (flagged is not None, events) == (case in ("mismatch", "other_currency"), {})
    if flagged is not None:
        assert flagged == {**event_data(stored), "flag": {"kind": "amount_mismatch", "detail": data["mismatchDetail"]}}
    assert (data["late"], data["mismatch"]) == (case == "late", case in ("mismatch", "other_currency"))
    assert stored.collected_minor == {"mismatch": payment.amount_minor - 100, "other_currency": 0}.get(
        case, stored.collected_minor)
    # What the cooperative's system credits: what was taken (in the payment's currency), and why it differs.
    assert data["collectedAmount"] == {"mismatch": payment.amount_minor - 100, "other_currency": 0}.get(
        case, payment.amount_minor)
    assert data["mismatchDetail"] == {
        "mismatch": f"provider reported {Money(payment.amount_minor - 100, 'RWF')}, expected 50,000 RWF",
        "other_currency": "provider reported 5.00 KES, expected 50,000 RWF"}.get(case)


async def test_a_failed_callback_moves_and_queues_in_one_statement(client: Any, demo: Any, rt: Any,
                                                                   admin: Any, sent: list[str]) -> None:
    payment = await _api_payment(admin, demo, rt)
    callback = _callback(payment, "cb-2", ProviderOutcome.FAILED, reason="payer declined")
    sent.clear()
    assert await handle_provider_event(rt, callback) == "failed"
    assert sent == ["BEGIN", "WITH e AS (INSERT", "WITH moved AS (UPDATE", "COMMIT"], sent
    async with rt.sessionmaker() as s:
        moved = await s.get(Payment, payment.id)
        jobs = await _notices(s)
        outcome = (await s.execute(select(ProviderEventRow.outcome)
                                   .where(ProviderEventRow.event_id == "cb-2"))).scalar_one()
    assert moved.status == "FAILED" and moved.failure_reason == "payer declined" and outcome == "failed"
    assert jobs["sms.send"][0] == f"sms:payment_failed:{payment.id}"
    assert jobs["webhook.event"][1]["data"] == event_data(moved)
    assert jobs["webhook.event"][1]["data"]["failureReason"] == "payer declined"
    assert jobs["webhook.event"][1]["data"]["collectedAmount"] == 0  # nothing taken
    # The same callback again: stored once, nothing moves or is queued twice.
    sent.clear()
    assert await handle_provider_event(rt, callback) == "duplicate"
    async with rt.sessionmaker() as s:
        assert (await s.execute(select(func.count()).select_from(OutboxJob)
                                .where(OutboxJob.kind.in_(("sms.send", "webhook.event"))))).scalar_one() == 2




def _sessions_made(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the ORM sessions made from here on (AsyncSession's __init__, which still runs as before)."""
    from sqlalchemy.ext.asyncio import AsyncSession

    made: list[int] = []
    original = AsyncSession.__init__

    def counted(self: Any, *args: Any, **kw: Any) -> None:
        made.append(1)
        original(self, *args, **kw)

    monkeypatch.setattr(AsyncSession, "__init__", counted)
    return made


@pytest.mark.parametrize("outcome", [ProviderOutcome.SUCCEEDED, ProviderOutcome.FAILED])
async def test_a_callbacks_common_path_makes_no_orm_session(client: Any, demo: Any, rt: Any, admin: Any,
                                                            sent: list[str], monkeypatch: pytest.MonkeyPatch,
                                                            outcome: ProviderOutcome) -> None:
    """A success or a failure for a pending payment runs on a Core connection's transaction (core.pgraw.transaction):
    no AsyncSession is made (its creation, transaction, commit and close were about 200 us of a callback's 1.4 ms of
    CPU, bench/README.md's forty-sixth round), and the connection is back in the pool afterwards."""
    payment = await _api_payment(admin, demo, rt)
    callback = _callback(payment, "cb-plain", outcome, provider_transaction_id="TX-P")
    made = _sessions_made(monkeypatch)
    sent.clear()
    assert await handle_provider_event(rt, callback) == ("completed" if outcome is ProviderOutcome.SUCCEEDED
                                                         else "failed")
    assert made == [] and rt.engine.sync_engine.pool.checkedout() == 0
    assert sent == ["BEGIN", "WITH e AS (INSERT", "WITH moved AS (UPDATE", "COMMIT"], sent
    async with rt.sessionmaker() as s:
        assert (await s.get(Payment, payment.id)).status == ("COMPLETED" if outcome is ProviderOutcome.SUCCEEDED
                                                             else "FAILED")


async def test_a_late_success_is_the_common_path_too(client: Any, demo: Any, rt: Any, admin: Any, sent: list[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A success after the payment timed out (late: its receipt says the money was taken after all) makes no ORM
    session either (README: a late success is on the common path; a success after a failure is a rare branch)."""
    payment = await _api_payment(admin, demo, rt)
    assert await handle_provider_event(rt, _callback(payment, "cb-timeout", ProviderOutcome.EXPIRED)) == "timeout"
    made = _sessions_made(monkeypatch)
    sent.clear()
    assert await handle_provider_event(rt, _callback(payment, "cb-late", ProviderOutcome.SUCCEEDED,
                                                     provider_transaction_id="TX-LATE")) == "late_completed"
    assert made == [] and rt.engine.sync_engine.pool.checkedout() == 0
    assert sent == ["BEGIN", "WITH e AS (INSERT", "WITH moved AS (UPDATE", "COMMIT"], sent


async def test_a_callbacks_rare_branch_joins_one_session_to_the_same_transaction(
    client: Any, demo: Any, rt: Any, admin: Any, sent: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An amount other than asked writes an audit row of its own through the ORM: one session, joined to the
    callback's transaction (its row flushed before the move, as autoflush did), one BEGIN and one COMMIT."""
    from core.money import Money

    payment = await _api_payment(admin, demo, rt)
    callback = _callback(payment, "cb-less", ProviderOutcome.SUCCEEDED, provider_transaction_id="TX-L",
                         amount=Money(payment.amount_minor - 100, payment.currency))
    made = _sessions_made(monkeypatch)
    sent.clear()
    assert await handle_provider_event(rt, callback) == "completed"
    assert len(made) == 1 and rt.engine.sync_engine.pool.checkedout() == 0
    assert [s.split()[0] for s in sent] == ["BEGIN", "WITH", "INSERT", "WITH", "COMMIT"], sent
    async with rt.sessionmaker() as s:
        moved = await s.get(Payment, payment.id)
        actions = (await s.execute(select(AuditEvent.action).where(AuditEvent.entity_id == payment.id)
                                   .order_by(AuditEvent.id))).scalars().all()
    assert moved.status == "COMPLETED" and moved.mismatch and moved.collected_minor == payment.amount_minor - 100
    assert actions[-2:] == ["payment.amount_mismatch", "payment.completed"]


async def test_a_callbacks_rare_branch_that_fails_takes_the_whole_callback_back(
    client: Any, demo: Any, rt: Any, admin: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The joined session's writes and the raw ones are one transaction: a failure in the branch that uses the ORM
    (after the event was stored and the payment locked raw, and the branch's audit row written) stores nothing,
    moves nothing and leaves no connection out of the pool; the provider's retry is then applied whole."""
    import core.provider_events as provider_events
    from core.money import Money

    payment = await _api_payment(admin, demo, rt)
    callback = _callback(payment, "cb-broken", ProviderOutcome.SUCCEEDED, provider_transaction_id="TX-B",
                         amount=Money(payment.amount_minor - 100, payment.currency))
    original = provider_events.record

    async def broken(session: Any, **kw: Any) -> None:
        await original(session, **kw)
        await session.flush()
        raise RuntimeError("the branch failed after its write")

    monkeypatch.setattr(provider_events, "record", broken)
    with pytest.raises(RuntimeError, match="after its write"):
        await handle_provider_event(rt, callback)
    assert rt.engine.sync_engine.pool.checkedout() == 0

    async def kept() -> tuple[str, list[str], list[str]]:
        async with rt.sessionmaker() as s:
            return ((await s.get(Payment, payment.id)).status,
                    list((await s.execute(select(ProviderEventRow.outcome)
                                          .where(ProviderEventRow.event_id == "cb-broken"))).scalars()),
                    list((await s.execute(select(AuditEvent.action).where(
                        AuditEvent.entity_id == payment.id, AuditEvent.action != "payment.created"))).scalars()))

    assert await kept() == ("PENDING", [], [])
    monkeypatch.setattr(provider_events, "record", original)
    assert await handle_provider_event(rt, callback) == "completed"
    assert await kept() == ("COMPLETED", ["completed"], ["payment.amount_mismatch", "payment.completed"])


async def test_an_sms_outcome_and_its_jobs_end_are_one_statement(rt: Any, sent: list[str]) -> None:
    from core.audit import Actor
    from core.models import OutboxJob, SmsMessage
    from core.outbox import OutboxWorker, enqueue
    from core.state import transition_alone
    from core.state.sms import SMS, SmsStatus

    async with rt.sessionmaker.begin() as s:
        row = SmsMessage(phone_enc="x", phone_index="i", phone_masked="+25078****001", template="help",
                         language="en", body="hi", encoding="GSM-7", length=2, segments=1, status="QUEUED",
                         idempotency_key="k-round-trips")
        s.add(row)
        await enqueue(s, "sms.send", {"key": "k-round-trips"})
    [job] = await OutboxWorker(rt.sessionmaker, {}, lease_seconds=30).claim()
    sent.clear()
    assert await transition_alone(rt.sessionmaker, SMS, row.id, SmsStatus.QUEUED, SmsStatus.SENT,
                                  actor=Actor("system", "worker"), finish=job)
    # No BEGIN or COMMIT: the move, its audit row and the job's end are one statement.
    assert [s.split()[0] for s in sent] == ["WITH"], sent
    async with rt.sessionmaker() as s:
        assert (await s.get(OutboxJob, job.id)).status == "DONE"
        assert (await s.get(SmsMessage, row.id)).status == "SENT"


async def test_an_sms_receipt_is_four_statements_and_no_transaction(rt: Any, demo: Any, aiohttp_server: Any,
                                                                    sent: list[str]) -> None:
    from channels.sms.jobs import SmsJobs
    from core.models import SmsMessage
    from core.notify import send_sms
    from core.outbox import OutboxWorker
    from tests.channels.sms.helpers import make_payment, start_simulator

    _, sim = await start_simulator(aiohttp_server, rt)
    phone = "+250788000001"
    payment = await make_payment(rt, demo["cooperative_id"], account=phone, member_id=demo["members"][phone])
    async with rt.sessionmaker.begin() as s:
        await send_sms(s, template="payment_receipt", cooperative_id=demo["cooperative_id"], cipher=rt.cipher,
                       context={"payment_id": payment.id}, member_id=demo["members"][phone], dedupe="rt-receipt")
    [job] = await OutboxWorker(rt.sessionmaker, {}, lease_seconds=30).claim()
    sent.clear()
    await SmsJobs(rt).send(job)
    # The key looked up, the receipt's rows read in one query, the message stored, and its outcome with
    # its audit row and the job's end: each alone, on one autocommit connection (no BEGIN or COMMIT).
    assert sent == ["SELECT sms_messages.id, sms_messages.status, sms_messages.body,",
                    "SELECT payments.amount_minor, payments.currency, payments.reference,",
                    "INSERT INTO sms_messages (id,", "WITH moved AS (UPDATE"], sent
    assert len(sim.messages(phone)) == 1 and payment.reference in sim.messages(phone)[0]["message"]
    async with rt.sessionmaker() as s:
        assert (await s.get(OutboxJob, job.id)).status == "DONE"
        [row] = (await s.execute(select(SmsMessage))).scalars().all()
    assert row.status == "SENT" and row.provider_message_id == sim.messages(phone)[0]["id"]


async def test_a_receipt_to_the_number_that_paid_is_four_statements_too(rt: Any, demo: Any, aiohttp_server: Any,
                                                                        sent: list[str]) -> None:
    """A payment of no member's receipt goes to the number that paid it while the payment is younger than
    SMS_PAYER_ANSWER_DAYS and no member got that number since (channels.sms.jobs._payer_gone): asked in the query
    that reads the receipt's rows, not in a round trip more."""
    from channels.sms.jobs import SmsJobs
    from core.notify import send_sms
    from core.outbox import OutboxWorker
    from core.phone import Phone
    from tests.channels.sms.helpers import make_payment, start_simulator

    _, sim = await start_simulator(aiohttp_server, rt)
    phone = "+250788123222"  # no member's
    payment = await make_payment(rt, demo["cooperative_id"], account=phone, created_at=utcnow())
    async with rt.sessionmaker.begin() as s:
        await send_sms(s, template="payment_receipt", cooperative_id=demo["cooperative_id"], cipher=rt.cipher,
                       context={"payment_id": payment.id}, phone=Phone(phone), dedupe="rt-payer-receipt")
    [job] = await OutboxWorker(rt.sessionmaker, {}, lease_seconds=30).claim()
    sent.clear()
    await SmsJobs(rt).send(job)
    assert sent == ["SELECT sms_messages.id, sms_messages.status, sms_messages.body,",
                    "SELECT payments.amount_minor, payments.currency, payments.reference,",
                    "INSERT INTO sms_messages (id,", "WITH moved AS (UPDATE"], sent
    assert len(sim.messages(phone)) == 1 and payment.reference in sim.messages(phone)[0]["message"]


async def test_a_delivery_report_is_one_read_and_one_write(rt: Any, sent: list[str]) -> None:
    from channels.sms.routes import apply_delivery_report
    from core.models import AuditEvent, SmsMessage
    from core.state.sms import SmsStatus

    async with rt.sessionmaker.begin() as s:
        row = SmsMessage(phone_enc="x", phone_index="i", phone_masked="+25078****001", template="help",
                         language="en", body="hi", encoding="GSM-7", length=2, segments=1, status="SENT",
                         idempotency_key="k-dlr", provider_message_id="ATXid_rt", provider_status="Sent")
        s.add(row)
    sent.clear()
    assert await apply_delivery_report(rt, "ATXid_rt", SmsStatus.SENT, "Buffered", None) == "progress"
    assert sent == ["SELECT sms_messages.id, sms_messages.status, sms_messages.provider_status",
                    "UPDATE sms_messages SET provider_status=$1::VARCHAR,"], sent
    sent.clear()
    assert await apply_delivery_report(rt, "ATXid_rt", SmsStatus.DELIVERED, "Success", None) == "delivered"
    # The move and its audit row in one statement, alone: no BEGIN or COMMIT.
    assert sent == ["SELECT sms_messages.id, sms_messages.status, sms_messages.provider_status",
                    "WITH moved AS (UPDATE"], sent
    async with rt.sessionmaker() as s:
        stored = await s.get(SmsMessage, row.id)
        audits = (await s.execute(select(AuditEvent.action, AuditEvent.actor)
                                  .where(AuditEvent.entity_id == row.id))).all()
    assert (stored.status, stored.provider_status) == ("DELIVERED", "Success") and stored.delivered_at is not None
    assert [tuple(a) for a in audits] == [("sms.delivered", "provider:africastalking")]


async def test_a_large_member_import_writes_in_chunks(client: Any, demo: Any, rt: Any, admin: Any,
                                                      sent: list[str]) -> None:
    """1,200 rows: three member INSERTs of up to 500 rows and their audit rows in batches, not a round trip
    per row (a 10,000-row file took 25-34 s that way)."""
    from core.member_import import CHUNK
    from core.members import member_phone
    from core.models import Member

    rows = [f"Member {i:04d},+2507881{i:05d},U-{i},{('en', 'rw', 'fr', 'sw')[i % 4]}" for i in range(1200)]
    sent.clear()
    made = await admin.json("POST", "/v1/members/import", 201, data=("name,phone,unit,language\n" + "\n".join(rows)
                                                                     ).encode(),
                            headers={"Content-Type": "text/csv"})
    member_inserts = [s for s in sent if s.startswith("INSERT INTO members")]
    assert len(member_inserts) == -(-1200 // CHUNK) == 3, sent
    assert len(sent) < 30, sent  # was over 2,400
    assert made["imported"] == 1200 and len(set(made["memberIds"])) == 1200
    async with rt.sessionmaker() as s:
        stored = {m.id: m for m in (await s.execute(select(Member).where(Member.id.in_(made["memberIds"])))).scalars()}
        audits = (await s.execute(select(func.count()).select_from(AuditEvent).where(
            AuditEvent.action == "member.created", AuditEvent.entity_id.in_(made["memberIds"])))).scalar_one()
    assert audits == 1200
    # In the file's order, each as create_member writes it: phone encrypted for its cooperative, masked,
    # blind-indexed, language and unit kept.
    first, last = stored[made["memberIds"][0]], stored[made["memberIds"][-1]]
    assert (first.name, first.unit, first.language, first.status) == ("Member 0000", "U-0", "en", "ACTIVE")
    assert member_phone(rt.cipher, last).e164 == "+250788101199" and last.language == "sw"
    assert last.phone_index == rt.cipher.blind_index("+250788101199") and last.phone_masked.startswith("+25078")
    found = await admin.json("GET", "/v1/members?phone=%2B250788101199", 200)
    assert [m["id"] for m in found["data"]] == [last.id]
