"""Payment service: idempotent creation, provider outcomes, late and mismatched money, refunds, polling."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import timedelta

import pytest
from sqlalchemy import func, inspect, select, text

from core.audit import Actor
from core.cooperatives import zone_of
from core.db import iso_z, utcnow
from core.errors import BusinessRuleError, Conflict, NotFound, ValidationError
from core.models import AuditEvent, Cooperative, OutboxJob, Payment, PaymentType, ProviderEvent, Refund
from core.money import Money
from core.payments import NewPayment, create_payment
from core.ports import CollectionAccepted, EventKind, ProviderError, ProviderOutcome, StatusResult
from core.ports import ProviderEvent as Event
from core.provider_events import handle_provider_event
from core.refunds import request_refund
from tests.conftest import drain, requires_pg

ADMIN = Actor("admin:test", "api")


class RecordingProvider:
    """A provider double for core tests: records what the core asked, answers what the test set."""

    def __init__(self, name="mtn_momo", partial=True):
        self.name = name
        self.supports_partial_refund = partial
        self.refund_names_request = False
        self.methods = frozenset({"MOBILE_MONEY_MTN"})
        self.collections = []
        self.refunds = []
        self.status = StatusResult(ProviderOutcome.PENDING)
        self.refund_answer = StatusResult(ProviderOutcome.SUCCEEDED, provider_transaction_id="RF-1")
        self.fail_collect = None

    async def request_collection(self, request):
        self.collections.append(request)
        if self.fail_collect:
            raise self.fail_collect
        return CollectionAccepted(provider_transaction_id=None)

    async def collection_status(self, reference, txn, currency):
        return self.status

    async def request_refund(self, request):
        self.refunds.append(request)
        return CollectionAccepted()

    async def refund_status(self, reference, currency):
        return self.refund_answer

    async def verify_callback(self, callback):
        return None

    def parse_callback(self, callback):
        raise NotImplementedError


@pytest.fixture
def provider(rt):
    fake = RecordingProvider()
    rt.providers = {**rt.providers, "mtn_momo": fake}
    return fake


def _new(demo, key="key-0001-abcdef", **kw):
    base = dict(cooperative_id=demo["cooperative_id"], payment_type_id=demo["payment_types"]["Monthly Rent"],
                method="MOBILE_MONEY_MTN", account="0788000001", idempotency_key=key, channel="api",
                member_id=demo["members"]["+250788000001"])
    base.update(kw)
    return NewPayment(**base)


async def _create(rt, new):
    async with rt.sessionmaker.begin() as session:
        return await create_payment(session, rt, new, actor=ADMIN)


async def test_create_writes_payment_audit_and_jobs_in_one_transaction(rt, demo, provider):
    payment, created = await _create(rt, _new(demo))
    assert created and payment.status == "PENDING" and payment.amount_minor == 50_000
    assert payment.reference.startswith("PAY_") and payment.provider == "mtn_momo"
    assert payment.payment_account_masked == "+25078****001"
    assert "250788000001" not in payment.payment_account_enc
    async with rt.sessionmaker() as s:
        jobs = (await s.execute(select(OutboxJob.kind, OutboxJob.dedupe_key))).all()
        audit = (await s.execute(select(AuditEvent.action).where(AuditEvent.entity_id == payment.id))).scalars().all()
    assert sorted(jobs) == [("payment.collect", f"collect:{payment.id}"), ("payment.poll", f"poll:{payment.id}")]
    assert audit == ["payment.created"]


async def test_same_key_same_body_returns_first_payment_and_other_body_conflicts(rt, demo, provider):
    first, _ = await _create(rt, _new(demo))
    again, created = await _create(rt, _new(demo, account="+250788000001"))  # same number, other spelling
    assert not created and again.id == first.id
    with pytest.raises(Conflict):
        await _create(rt, _new(demo, description="another body"))
    async with rt.sessionmaker() as s:
        assert (await s.execute(select(func.count()).select_from(Payment))).scalar_one() == 1


async def test_returned_payment_is_the_stored_row_and_the_audit_names_its_reference(rt, demo, provider):
    async with rt.sessionmaker.begin() as session:
        payment, created = await create_payment(session, rt, _new(demo), actor=ADMIN)
        state = inspect(payment)
        assert state.persistent and not state.unloaded and not state.modified  # every column, nothing to flush
        payment.description = "changed in the same transaction"  # a loaded, persistent instance
    assert created
    async with rt.sessionmaker() as s:
        stored = await s.get(Payment, payment.id)
        after = (await s.execute(select(AuditEvent.after).where(AuditEvent.entity_id == payment.id))).scalar_one()
    columns = [c.key for c in Payment.__table__.c]
    assert {c: getattr(stored, c) for c in columns} == {c: getattr(payment, c) for c in columns}
    assert stored.description == "changed in the same transaction"
    assert after == {"status": "PENDING", "amount": 50_000, "currency": "RWF", "method": "MOBILE_MONEY_MTN",
                     "reference": payment.reference}


@requires_pg
@pytest.mark.parametrize(("last", "suffix"), [(6, "_007"), (998, "_999"), (999, "_1000"), (123_455, "_123456")])
async def test_reference_number_is_padded_to_three_digits_and_never_cut(rt, demo, provider, last, suffix):
    async with rt.sessionmaker.begin() as s:
        await s.execute(text("SELECT setval('human_reference_seq', :n)"), {"n": last})
    before = utcnow()
    payment, _ = await _create(rt, _new(demo))
    # Dated by the cooperative's day (Kigali, UTC+2), not UTC's: from 22:00 UTC it is the next day there. (Its day
    # as the payment began or ended: one read after it was another when the day turned in between.)
    async with rt.sessionmaker() as s:
        zone = zone_of((await s.get(Cooperative, payment.cooperative_id)).timezone)
    days = {f"{at.astimezone(zone):%Y%m%d}" for at in (before, utcnow())}
    assert payment.reference in {f"PAY_{day}{suffix}" for day in days}, payment.reference


async def test_a_replayed_key_still_answers_after_its_type_was_deactivated(rt, demo, provider):
    first, _ = await _create(rt, _new(demo))
    async with rt.sessionmaker.begin() as s:
        (await s.get(PaymentType, demo["payment_types"]["Monthly Rent"])).is_active = False
    again, created = await _create(rt, _new(demo))
    assert not created and again.id == first.id
    with pytest.raises(ValidationError) as info:
        await _create(rt, _new(demo, idempotency_key="key-0002-abcdef"))
    assert info.value.field == "paymentTypeId"


async def test_a_member_of_another_cooperative_is_not_found(rt, demo, provider):
    from core.members import create_member
    from core.models import Cooperative
    from core.phone import normalize

    async with rt.sessionmaker.begin() as s:
        other = Cooperative(name="Other", short_code="OTH", country="RW", currency="RWF",
                            timezone="Africa/Kigali", status="ACTIVE")
        s.add(other)
        await s.flush()
        stranger = await create_member(s, rt.cipher, cooperative_id=other.id, name="Stranger",
                                       phone=normalize("+250788999002"), actor=ADMIN)
    with pytest.raises(NotFound) as info:
        await _create(rt, _new(demo, member_id=stranger.id))
    assert info.value.field == "member"
    async with rt.sessionmaker() as s:
        assert (await s.execute(select(func.count()).select_from(Payment))).scalar_one() == 0


@requires_pg
async def test_concurrent_duplicates_create_one_payment(rt, demo, provider):
    results = await asyncio.gather(*(_create(rt, _new(demo)) for _ in range(8)), return_exceptions=True)
    ids = {r[0].id for r in results if not isinstance(r, BaseException)}
    assert len(ids) == 1, results
    assert sum(1 for r in results if not isinstance(r, BaseException) and r[1]) == 1
    async with rt.sessionmaker() as s:
        assert (await s.execute(select(func.count()).select_from(Payment))).scalar_one() == 1
        assert (await s.execute(select(func.count()).select_from(OutboxJob))).scalar_one() == 2


@pytest.mark.parametrize(
    ("change", "error", "field"),
    [
        ({"method": "PAYPAL"}, ValidationError, "paymentMethod"),
        ({"account": "0733000001"}, ValidationError, "paymentAccount"),  # Airtel number for MTN
        ({"account": "12"}, ValidationError, "paymentAccount"),
        ({"amount": Money(40_000, "RWF")}, ValidationError, "amount"),  # fixed-price type
        ({"amount": Money(50_000, "KES")}, ValidationError, "amount"),
        ({"idempotency_key": "short"}, ValidationError, "idempotencyKey"),
        ({"payment_type_id": "00000000-0000-0000-0000-000000000000"}, NotFound, "paymentTypeId"),
        ({"member_id": "00000000-0000-0000-0000-000000000000"}, NotFound, "member"),
    ],
)
async def test_bad_input_is_refused_with_the_field(rt, demo, provider, change, error, field):
    with pytest.raises(error) as info:
        await _create(rt, replace(_new(demo), **change))
    assert info.value.field == field
    async with rt.sessionmaker() as s:
        assert (await s.execute(select(func.count()).select_from(Payment))).scalar_one() == 0


async def test_custom_amount_when_the_type_allows_it(rt, demo, provider):
    async with rt.sessionmaker.begin() as s:
        ptype = await s.get(PaymentType, demo["payment_types"]["Water"])
        ptype.allow_custom_amount = True
    payment, _ = await _create(rt, _new(demo, payment_type_id=ptype.id, amount=Money(7_500, "RWF")))
    assert payment.amount_minor == 7_500


def _event(payment, outcome, event_id="e1", **kw):
    return Event(provider="mtn_momo", kind=EventKind.COLLECTION, event_id=event_id,
                 reference=payment.provider_reference, outcome=outcome, **kw)


async def _payment(rt, id_):
    async with rt.sessionmaker() as s:
        return await s.get(Payment, id_)


async def _job_kinds(rt):
    async with rt.sessionmaker() as s:
        return sorted((await s.execute(select(OutboxJob.kind))).scalars())


async def test_success_callback_completes_and_queues_receipt_and_webhook(rt, demo, provider):
    payment, _ = await _create(rt, _new(demo))
    result = await handle_provider_event(rt, _event(payment, ProviderOutcome.SUCCEEDED, amount=Money(50_000, "RWF"),
                                                    provider_transaction_id="MTN-123"))
    assert result == "completed"
    done = await _payment(rt, payment.id)
    assert (done.status, done.provider_transaction_id, done.late, done.mismatch) == (
        "COMPLETED", "MTN-123", False, False)
    assert done.completed_at is not None
    assert await _job_kinds(rt) == ["payment.collect", "payment.poll", "sms.send", "webhook.event"]
    # the same callback again is acknowledged and ignored
    assert await handle_provider_event(rt, _event(payment, ProviderOutcome.SUCCEEDED)) == "duplicate"
    # an out-of-order failure after success never reopens the payment
    assert await handle_provider_event(rt, _event(payment, ProviderOutcome.FAILED, "e2")) == "ignored_final"
    assert (await _payment(rt, payment.id)).status == "COMPLETED"
    async with rt.sessionmaker() as s:
        stored = (await s.execute(select(ProviderEvent.event_id, ProviderEvent.outcome, ProviderEvent.payment_id)
                                  .order_by(ProviderEvent.event_id))).all()
    # Each stored callback says what it did: the first with the jobs it queued, the second on its own.
    assert stored == [("e1", "completed", payment.id), ("e2", "ignored_final", payment.id)]
    assert await _job_kinds(rt) == ["payment.collect", "payment.poll", "sms.send", "webhook.event"]


async def test_callback_for_an_unknown_payment_is_stored_once(rt, demo, provider):
    ghost = Event(provider="mtn_momo", kind=EventKind.COLLECTION, event_id="ghost-1", reference="no-such-ref",
                  outcome=ProviderOutcome.SUCCEEDED)
    assert await handle_provider_event(rt, ghost) == "unknown_payment"
    assert await handle_provider_event(rt, ghost) == "duplicate"
    async with rt.sessionmaker() as s:
        rows = (await s.execute(select(ProviderEvent.event_id, ProviderEvent.outcome, ProviderEvent.payment_id))).all()
    assert rows == [("ghost-1", "unknown_payment", None)]


async def test_callback_found_by_the_provider_transaction_id(rt, demo, provider):
    """M-Pesa's callbacks name the CheckoutRequestID the provider gave, not our reference."""
    payment, _ = await _create(rt, _new(demo))
    async with rt.sessionmaker.begin() as s:
        (await s.get(Payment, payment.id)).provider_transaction_id = "ws_CO_123"
    event = Event(provider="mtn_momo", kind=EventKind.COLLECTION, event_id="cb-1", reference="ws_CO_123",
                  outcome=ProviderOutcome.SUCCEEDED, raw={"lookup": "provider_transaction_id"})
    assert await handle_provider_event(rt, event) == "completed"
    async with rt.sessionmaker() as s:
        stored = (await s.execute(select(ProviderEvent.outcome, ProviderEvent.payment_id))).one()
    assert stored == ("completed", payment.id) and (await _payment(rt, payment.id)).status == "COMPLETED"


async def test_amount_mismatch_is_flagged_and_audited(rt, demo, provider):
    payment, _ = await _create(rt, _new(demo))
    await handle_provider_event(rt, _event(payment, ProviderOutcome.SUCCEEDED, amount=Money(5_000, "RWF")))
    done = await _payment(rt, payment.id)
    assert done.status == "COMPLETED" and done.mismatch
    assert "5,000 RWF" in done.mismatch_detail
    async with rt.sessionmaker() as s:
        actions = (await s.execute(select(AuditEvent.action).where(AuditEvent.entity_id == payment.id))).scalars().all()
    assert "payment.amount_mismatch" in actions
    assert done.collected_minor == 5_000


async def test_refunds_of_a_short_payment_stop_at_what_was_taken(rt, demo, provider, worker):
    payment, _ = await _create(rt, _new(demo))
    await handle_provider_event(rt, _event(payment, ProviderOutcome.SUCCEEDED, amount=Money(5_000, "RWF")))
    with pytest.raises(BusinessRuleError, match="exceeds the refundable 5,000 RWF"):
        async with rt.sessionmaker.begin() as s:
            await request_refund(s, rt, payment_id=payment.id, cooperative_id=demo["cooperative_id"],
                                 amount=Money(6_000, "RWF"), reason=None, idempotency_key="short-refund-1",
                                 actor=ADMIN)
    async with rt.sessionmaker.begin() as s:  # everything: what was taken, not what was asked
        refund, _ = await request_refund(s, rt, payment_id=payment.id, cooperative_id=demo["cooperative_id"],
                                         amount=None, reason=None, idempotency_key="short-refund-2", actor=ADMIN)
    assert refund.amount_minor == 5_000
    async with rt.sessionmaker.begin() as s:
        await s.execute(OutboxJob.__table__.update().where(OutboxJob.status == "PENDING").values(run_at=utcnow()))
    await drain(worker)
    async with rt.sessionmaker.begin() as s:  # the refund's status poll, due later: now
        await s.execute(OutboxJob.__table__.update().where(OutboxJob.kind == "refund.poll").values(run_at=utcnow()))
    await drain(worker)
    assert provider.refunds[0].full and provider.refunds[0].amount == Money(5_000, "RWF")
    done = await _payment(rt, payment.id)
    assert (done.status, done.refunded_minor) == ("REFUNDED", 5_000)


async def test_late_success_after_timeout_completes_with_late_flag(rt, demo, provider, worker):
    payment, _ = await _create(rt, _new(demo))
    async with rt.sessionmaker.begin() as s:  # the approval window has passed, and the grace MTN's prompt has after it
        row = await s.get(Payment, payment.id)
        row.expires_at = utcnow() - timedelta(seconds=rt.settings.payment_pending_grace_seconds)
        await s.execute(OutboxJob.__table__.update().values(run_at=utcnow()))
    await drain(worker)
    timed_out = await _payment(rt, payment.id)
    assert timed_out.status == "TIMEOUT" and timed_out.failure_reason == "not approved in time"
    assert await handle_provider_event(rt, _event(payment, ProviderOutcome.SUCCEEDED, "late")) == "late_completed"
    late = await _payment(rt, payment.id)
    assert (late.status, late.late) == ("COMPLETED", True)


async def test_collect_job_calls_provider_once_with_saved_reference(rt, demo, provider, worker):
    payment, _ = await _create(rt, _new(demo))
    await drain(worker)
    assert len(provider.collections) == 1
    sent = provider.collections[0]
    assert sent.provider_reference == payment.provider_reference
    assert sent.amount == Money(50_000, "RWF") and sent.payer.e164 == "+250788000001"
    assert sent.callback_url.endswith("/webhooks/payments/mtn_momo")
    assert (await _payment(rt, payment.id)).status == "PROCESSING"
    await drain(worker)  # running again sends nothing more
    assert len(provider.collections) == 1


async def test_permanent_provider_refusal_fails_the_payment(rt, demo, provider, worker):
    provider.fail_collect = ProviderError("payer not found", retryable=False)
    payment, _ = await _create(rt, _new(demo))
    await drain(worker)
    failed = await _payment(rt, payment.id)
    assert (failed.status, failed.failure_reason) == ("FAILED", "payer not found")


async def test_poll_settles_a_payment_whose_callback_never_came(rt, demo, provider, worker):
    payment, _ = await _create(rt, _new(demo))
    provider.status = StatusResult(ProviderOutcome.SUCCEEDED, amount=Money(50_000, "RWF"), provider_transaction_id="T9")
    async with rt.sessionmaker.begin() as s:
        await s.execute(OutboxJob.__table__.update().values(run_at=utcnow()))
    await drain(worker)
    done = await _payment(rt, payment.id)
    assert (done.status, done.provider_transaction_id) == ("COMPLETED", "T9")


async def _completed(rt, demo, key="key-0001-abcdef"):
    payment, _ = await _create(rt, _new(demo, key=key))
    await handle_provider_event(rt, _event(payment, ProviderOutcome.SUCCEEDED, f"ok-{key}"))
    return payment


async def test_partial_refunds_never_exceed_what_was_collected(rt, demo, provider, worker):
    payment = await _completed(rt, demo)
    async with rt.sessionmaker.begin() as s:
        r1, created = await request_refund(s, rt, payment_id=payment.id, cooperative_id=demo["cooperative_id"],
                                           amount=Money(20_000, "RWF"), reason="overpaid",
                                           idempotency_key="refund-key-1", actor=ADMIN)
    assert created
    with pytest.raises(BusinessRuleError):
        async with rt.sessionmaker.begin() as s:
            await request_refund(s, rt, payment_id=payment.id, cooperative_id=demo["cooperative_id"],
                                 amount=Money(30_001, "RWF"), reason=None, idempotency_key="refund-key-2", actor=ADMIN)
    await drain(worker)  # submit, then the refund poll finds it completed
    async with rt.sessionmaker.begin() as s:
        await s.execute(OutboxJob.__table__.update().where(OutboxJob.status == "PENDING").values(run_at=utcnow()))
    await drain(worker)
    async with rt.sessionmaker() as s:
        refund = await s.get(Refund, r1.id)
    assert refund.status == "COMPLETED"
    partial = await _payment(rt, payment.id)
    assert (partial.status, partial.refunded_minor) == ("PARTIALLY_REFUNDED", 20_000)
    assert provider.refunds[0].amount == Money(20_000, "RWF") and not provider.refunds[0].full
    async with rt.sessionmaker.begin() as s:  # the rest, with amount omitted = everything left
        r2, _ = await request_refund(s, rt, payment_id=payment.id, cooperative_id=demo["cooperative_id"], amount=None,
                                     reason=None, idempotency_key="refund-key-3", actor=ADMIN)
    assert r2.amount_minor == 30_000


async def test_refund_refusals(rt, demo, provider):
    pending, _ = await _create(rt, _new(demo, key="pending-payment-1"))
    with pytest.raises(BusinessRuleError):
        async with rt.sessionmaker.begin() as s:
            await request_refund(s, rt, payment_id=pending.id, cooperative_id=demo["cooperative_id"], amount=None,
                                 reason=None, idempotency_key="refund-key-9", actor=ADMIN)
    provider.supports_partial_refund = False
    done = await _completed(rt, demo, key="completed-payment-1")
    with pytest.raises(BusinessRuleError, match="only the full amount"):
        async with rt.sessionmaker.begin() as s:
            await request_refund(s, rt, payment_id=done.id, cooperative_id=demo["cooperative_id"],
                                 amount=Money(1_000, "RWF"), reason=None, idempotency_key="refund-key-8", actor=ADMIN)
    with pytest.raises(NotFound):
        async with rt.sessionmaker.begin() as s:
            await request_refund(s, rt, payment_id=done.id, cooperative_id="another-coop", amount=None,
                                 reason=None, idempotency_key="refund-key-7", actor=ADMIN)


class _Garbage(RecordingProvider):
    """A provider whose status answers cannot be understood (the adapter raises, not ProviderError)."""

    async def collection_status(self, reference, txn, currency):
        raise ValueError("unknown status 'WEIRD'")


async def test_unreadable_status_answers_wait_then_time_out_after_the_settling_grace(rt, demo, worker):
    from core.jobs import SETTLE_GRACE
    from core.state.payment import UNCONFIRMED

    rt.providers = {**rt.providers, "mtn_momo": _Garbage()}
    payment, _ = await _create(rt, _new(demo))
    async with rt.sessionmaker.begin() as s:
        await s.execute(OutboxJob.__table__.update().where(OutboxJob.kind == "payment.poll").values(run_at=utcnow()))
    await worker.run_once()
    async with rt.sessionmaker() as s:
        poll = (await s.execute(select(OutboxJob).where(OutboxJob.kind == "payment.poll"))).scalar_one()
    # Waiting, not failing: no attempt used up, payment still open.
    assert (poll.status, poll.attempts) == ("PENDING", 0) and "ValueError" in poll.last_error
    assert (await _payment(rt, payment.id)).status in ("PENDING", "PROCESSING")
    # The window is over, the answers still unreadable: the provider never said "not approved", so the
    # payment stays open (money may have been taken) and is asked about again.
    async with rt.sessionmaker.begin() as s:
        await s.execute(Payment.__table__.update().values(expires_at=utcnow() - timedelta(seconds=1)))
        await s.execute(OutboxJob.__table__.update().where(OutboxJob.kind == "payment.poll").values(run_at=utcnow()))
    await worker.run_once()
    assert (await _payment(rt, payment.id)).status in ("PENDING", "PROCESSING")
    # Only once the settling grace after the window is over is it given up, saying why.
    async with rt.sessionmaker.begin() as s:
        await s.execute(Payment.__table__.update().values(expires_at=utcnow() - SETTLE_GRACE - timedelta(seconds=1)))
        await s.execute(OutboxJob.__table__.update().where(OutboxJob.kind == "payment.poll").values(run_at=utcnow()))
    await drain(worker)
    done = await _payment(rt, payment.id)
    assert (done.status, done.failure_reason) == ("TIMEOUT", UNCONFIRMED)


async def test_sweep_requeues_polls_that_stalled_and_settles_the_payment(rt, demo, provider, worker):
    from core.jobs import sweep_open_payments

    payment, _ = await _create(rt, _new(demo))
    fresh, _ = await _create(rt, _new(demo, key="key-0002-abcdef"))
    async with rt.sessionmaker.begin() as s:
        # The first payment's poll job was parked hours ago; the second one is polling normally.
        await s.execute(OutboxJob.__table__.update().where(OutboxJob.kind == "payment.poll",
                                                           OutboxJob.dedupe_key == f"poll:{payment.id}")
                        .values(status="PARKED"))
        await s.execute(Payment.__table__.update().where(Payment.id == payment.id)
                        .values(next_poll_at=utcnow() - timedelta(hours=2)))
    assert await sweep_open_payments(rt) == 1
    assert await sweep_open_payments(rt) == 0  # next_poll_at moved: not stuck any more
    async with rt.sessionmaker() as s:
        polls = (await s.execute(select(OutboxJob.dedupe_key).where(
            OutboxJob.kind == "payment.poll", OutboxJob.status == "PENDING"))).scalars().all()
    assert sorted(polls) == sorted([f"poll:{fresh.id}", next(p for p in polls if ":sweep:" in p)])
    assert f"poll:{payment.id}:sweep:" in next(p for p in polls if ":sweep:" in p)
    provider.status = StatusResult(ProviderOutcome.SUCCEEDED, amount=Money(50_000, "RWF"), provider_transaction_id="T7")
    await drain(worker)
    assert (await _payment(rt, payment.id)).status == "COMPLETED"
    assert (await _payment(rt, fresh.id)).status in ("PENDING", "PROCESSING")  # its own poll is not due yet


async def test_periodic_jobs_are_scheduled_once_per_slot(rt, demo):
    from core.jobs import ensure_scheduled

    await ensure_scheduled(rt)
    await ensure_scheduled(rt)  # a second worker starting
    async with rt.sessionmaker() as s:
        kinds = (await s.execute(select(OutboxJob.kind, func.count()).group_by(OutboxJob.kind))).all()
    counts = dict(kinds)
    # Tomorrow's scan, and today's while its hour (06:00 UTC) has not passed by more than the catch-up.
    from core.reminders import CATCH_UP, _scan_time

    now = utcnow()
    today = 1 if now <= _scan_time(now.date()) + CATCH_UP else 0
    assert counts["payments.sweep"] == 1 and counts["reminders.scan"] == 1 + today


async def test_money_taken_after_a_failure_is_flagged_with_what_finds_it(rt, demo, provider):
    """A provider reports success after it had reported failure: the payment is never reopened (the member
    was told it failed), but it is flagged and audited with the provider's id and amount, which is what the
    cooperative needs to find the money and give it back."""
    from core.models import AuditEvent

    payment, _ = await _create(rt, _new(demo))
    assert await handle_provider_event(rt, _event(payment, ProviderOutcome.FAILED, "e1")) == "failed"
    late = _event(payment, ProviderOutcome.SUCCEEDED, "e2", amount=Money(50_000, "RWF"),
                  provider_transaction_id="MTN-LATE-9")
    assert await handle_provider_event(rt, late) == "flagged_success_after_failure"
    stored = await _payment(rt, payment.id)
    assert (stored.status, stored.mismatch, stored.provider_transaction_id) == ("FAILED", True, "MTN-LATE-9")
    assert stored.mismatch_detail == "provider reported success (50,000 RWF) after the payment had failed"
    async with rt.sessionmaker() as s:
        audit = (await s.execute(select(AuditEvent).where(AuditEvent.entity_id == payment.id,
                                                          AuditEvent.action == "payment.success_after_failure"))
                 ).scalar_one()
    assert audit.after == {"providerTransactionId": "MTN-LATE-9", "mismatch": True, "collected": 50000,
                           "currency": "RWF", "completedAt": iso_z(stored.completed_at), "first": True}


async def test_the_network_a_ussd_session_reports_decides_its_own_numbers_operator(rt, demo, provider):
    """Mobile number portability: an Airtel-range number the USSD aggregator reports on MTN is paid with MTN MoMo
    (channels.ussd.flows.confirmed sets account_operator for the session's own number). An API payment names no
    network: the range decides, as before, whatever the field says."""
    member = demo["members"]["+250733000001"]
    ussd = _new(demo, key="ussd:africastalking:ported-1", account="+250733000001", channel="ussd",
                member_id=member, account_operator="MTN")
    payment, created = await _create(rt, ussd)
    assert created and (payment.method, payment.payment_account_masked) == ("MOBILE_MONEY_MTN", "+25073****001")
    async with rt.sessionmaker() as s:
        after = (await s.execute(select(AuditEvent.after).where(AuditEvent.entity_id == payment.id))).scalar_one()
    assert after["operatorFrom"] == "network"
    with pytest.raises(ValidationError, match="is an Airtel number; MTN MoMo needs an MTN number"):
        await _create(rt, replace(ussd, idempotency_key="key-api-ported", channel="api"))
    # Reported on Airtel: an MTN-range number is not MTN's to collect from.
    away = _new(demo, key="ussd:africastalking:ported-2", channel="ussd", account_operator="AIRTEL")
    with pytest.raises(ValidationError, match=r"\+25078\*\*\*\*001 is an Airtel number; MTN MoMo needs an MTN"):
        await _create(rt, away)
