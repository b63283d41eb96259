"""SQLAlchemy 2 typed models: every table of the gateway, scoped by cooperative."""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Date,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from core.db import Base, JSONType, UTCDateTime, UUIDStr, event_data_id, new_id, utcnow


def _id() -> Mapped[str]:
    return mapped_column(UUIDStr, primary_key=True, default=new_id)


def _created() -> Mapped[datetime]:
    return mapped_column(UTCDateTime, default=utcnow, nullable=False)


def _updated() -> Mapped[datetime]:
    return mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow, nullable=False)


def _where(predicate: str) -> dict[str, Any]:
    """A partial index's predicate, the same SQL on PostgreSQL and SQLite (as the migration builds it)."""
    return {"postgresql_where": text(predicate), "sqlite_where": text(predicate)}


def _coop_fk(nullable: bool = False, *, index: bool = True) -> Mapped[Any]:
    """`index=False` where a composite index or unique constraint begins with cooperative_id (migration 0011)."""
    return mapped_column(UUIDStr, ForeignKey("cooperatives.id"), nullable=nullable, index=index)


class Cooperative(Base):
    __tablename__ = "cooperatives"
    __table_args__ = (
        # Migration 0017: a short code is one code whatever its case (members type it as they like, and USSD
        # registration finds it so: channels.ussd.flows, core.cooperatives.code_is).
        Index("ux_cooperatives_upper_short_code", text("upper(short_code)"), unique=True),
    )

    id: Mapped[str] = _id()
    name: Mapped[str] = mapped_column(String(200))
    short_code: Mapped[str] = mapped_column(String(32), unique=True)
    country: Mapped[str] = mapped_column(String(2))
    currency: Mapped[str] = mapped_column(String(3))
    timezone: Mapped[str] = mapped_column(String(64), default="Africa/Kigali")
    ussd_extension: Mapped[str | None] = mapped_column(String(16), unique=True)
    # The USSD aggregator its members dial through (africastalking, hubtel, nalo): the SMS texts name that
    # aggregator's code (USSD_SERVICE_CODE_<NAME>) with the extension. None: USSD_SERVICE_CODE.
    ussd_aggregator: Mapped[str | None] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default="ACTIVE")  # ACTIVE | SUSPENDED
    contact_phone: Mapped[str | None] = mapped_column(String(32))
    self_registration: Mapped[bool] = mapped_column(Boolean, default=True)
    # Of its members added without one, its payers who are no members, its menu for a caller it does not know.
    # The database's default only (core.cooperatives sets it): an ORM insert leaves the column out unless given, so
    # rows are still written before migration 0026 (the tests of older migrations, a previous release's rows).
    language: Mapped[str] = mapped_column(String(2), server_default="en")
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _updated()


class Member(Base):
    __tablename__ = "members"
    __table_args__ = (
        UniqueConstraint("cooperative_id", "phone_index"),
        # Migration 0014: the reminder scan's chunks (core.reminders) and the member list (admin_api.members).
        Index("ix_members_coop_id", "cooperative_id", "id"),
        Index("ix_members_coop_name", "cooperative_id", "name", "id"),
    )

    id: Mapped[str] = _id()
    cooperative_id: Mapped[str] = _coop_fk(index=False)
    name: Mapped[str] = mapped_column(String(200))
    # Both NULL once the number is released (core.members.release_phone): it can be registered again.
    phone_enc: Mapped[str | None] = mapped_column(String(255))
    phone_index: Mapped[str | None] = mapped_column(String(64), index=True)
    phone_masked: Mapped[str] = mapped_column(String(32))
    language: Mapped[str] = mapped_column(String(2), default="en")
    unit: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default="ACTIVE")  # PENDING | ACTIVE | SUSPENDED
    reminders_opt_out: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _updated()


class AdminUser(Base):
    __tablename__ = "admin_users"
    __table_args__ = (
        # Migration 0017: one account per username whatever its case (sign-in finds it so: core.auth.login).
        Index("ux_admin_users_lower_username", text("lower(username)"), unique=True),
    )

    id: Mapped[str] = _id()
    username: Mapped[str] = mapped_column(String(120), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(24))  # SUPER_ADMIN | COOP_ADMIN | TENANT
    cooperative_id: Mapped[str | None] = _coop_fk(nullable=True)
    member_id: Mapped[str | None] = mapped_column(UUIDStr, ForeignKey("members.id"))
    is_active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _updated()


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = _id()
    cooperative_id: Mapped[str] = _coop_fk()
    name: Mapped[str] = mapped_column(String(120))
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    scopes: Mapped[list[str]] = mapped_column(JSONType, default=list)
    created_by: Mapped[str | None] = mapped_column(UUIDStr)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = _created()


class PaymentType(Base):
    __tablename__ = "payment_types"

    id: Mapped[str] = _id()
    cooperative_id: Mapped[str] = _coop_fk()
    name: Mapped[str] = mapped_column(String(120))
    description: Mapped[str | None] = mapped_column(String(500))
    amount_minor: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    allow_custom_amount: Mapped[bool] = mapped_column(Boolean, default=False)
    is_recurring: Mapped[bool] = mapped_column(Boolean, default=False)
    recurring_interval: Mapped[str | None] = mapped_column(String(16))  # MONTHLY | QUARTERLY | YEARLY
    due_day: Mapped[int | None] = mapped_column(Integer)
    is_active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _updated()


class Payment(Base):
    __tablename__ = "payments"
    __table_args__ = (
        UniqueConstraint("cooperative_id", "idempotency_key"),
        UniqueConstraint("provider", "provider_reference"),
        Index("ix_payments_coop_created", "cooperative_id", "created_at"),
        Index("ix_payments_member_created", "member_id", "created_at"),
        Index("ix_payments_status_poll", "status", "next_poll_at"),
        Index("ix_payments_coop_completed", "cooperative_id", "completed_at"),
        Index("ix_payments_updated", "updated_at"),
        Index("ix_payments_created", "created_at"),
        # Migration 0013: a cooperative's sync (admin_api.common.synced) and the flagged lists (mismatch=, late=).
        Index("ix_payments_coop_updated", "cooperative_id", "updated_at", "id"),
        Index("ix_payments_coop_mismatch", "cooperative_id", "created_at", **_where("mismatch IS true")),
        Index("ix_payments_coop_late", "cooperative_id", "created_at", **_where("late IS true")),
        # Migration 0014: a super admin's export by completion (core.reports), entered when the money moves.
        Index("ix_payments_completed", "completed_at", **_where("completed_at IS NOT NULL")),
        # Migration 0022: the provider's id of the money (an M-Pesa callback's payment, a statement line's probe,
        # a completion's, the support desk's search): the id first, which the search gives without the provider.
        Index("ix_payments_transaction_id", "provider_transaction_id", "provider",
              **_where("provider_transaction_id IS NOT NULL")),
        # Migration 0027: a period's payments naming its due date (the dues report: core.reminders.period_money);
        # those naming none are read through ix_payments_coop_created.
        Index("ix_payments_coop_type_due", "cooperative_id", "payment_type_id", "due_date",
              **_where("due_date IS NOT NULL")),
        # Migration 0032: the list filtered by a bank method (a few payments in a hundred: the count and the page read
        # them alone); partial, so a wallet payment (USSD's, most API ones) is no entry. core.payments.BANK_METHODS.
        Index("ix_payments_bank_method", "method", "cooperative_id", "created_at",
              **_where("method IN ('BANK_BK', 'BANK_IM', 'BANK_ECOBANK')")),
        # Migration 0035: the list filtered by a payment type (its count and page read that type's entries, newest
        # first); the cooperative last, so that a cooperative admin's count reads the index alone.
        Index("ix_payments_type_created", "payment_type_id", "created_at", "cooperative_id"),
    )

    id: Mapped[str] = _id()
    cooperative_id: Mapped[str] = _coop_fk(index=False)
    member_id: Mapped[str | None] = mapped_column(UUIDStr, ForeignKey("members.id"))
    payment_type_id: Mapped[str] = mapped_column(UUIDStr, ForeignKey("payment_types.id"))
    reference: Mapped[str] = mapped_column(String(32), unique=True)
    amount_minor: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    fee_minor: Mapped[int] = mapped_column(BigInteger, default=0)
    refunded_minor: Mapped[int] = mapped_column(BigInteger, default=0)
    # What the provider reported taken, when it differs from amount_minor (a mismatch): refunds stop there.
    collected_minor: Mapped[int | None] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(24), default="PENDING")
    method: Mapped[str] = mapped_column(String(32))
    provider: Mapped[str] = mapped_column(String(24))
    provider_reference: Mapped[str] = mapped_column(String(64))
    provider_transaction_id: Mapped[str | None] = mapped_column(String(128))
    gateway_reference: Mapped[str | None] = mapped_column(String(128))
    payment_url: Mapped[str | None] = mapped_column(String(500))
    payment_account_enc: Mapped[str] = mapped_column(String(255))
    payment_account_index: Mapped[str] = mapped_column(String(64), index=True)
    payment_account_masked: Mapped[str] = mapped_column(String(64))
    idempotency_key: Mapped[str] = mapped_column(String(128))
    request_hash: Mapped[str] = mapped_column(String(64))
    description: Mapped[str | None] = mapped_column(String(500))
    due_date: Mapped[datetime | None] = mapped_column(UTCDateTime)
    channel: Mapped[str] = mapped_column(String(8))  # ussd | api | sms
    failure_reason: Mapped[str | None] = mapped_column(String(200))
    mismatch: Mapped[bool] = mapped_column(Boolean, default=False)
    mismatch_detail: Mapped[str | None] = mapped_column(String(300))
    # Migration 0024: the last review of its flags (core.payments.review_flags): what they said (the detail it had),
    # who cleared them, when, and the note. Kept when a later flag sets `mismatch` again.
    reviewed_detail: Mapped[str | None] = mapped_column(String(300))
    reviewed_by: Mapped[str | None] = mapped_column(String(64))
    reviewed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    review_note: Mapped[str | None] = mapped_column(String(300))
    late: Mapped[bool] = mapped_column(Boolean, default=False)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    next_poll_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_by: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _updated()
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class ProviderEvent(Base):
    """A provider callback as received, kept raw; unique per provider and event id."""

    __tablename__ = "provider_events"
    __table_args__ = (UniqueConstraint("provider", "event_id"),)

    id: Mapped[str] = _id()
    provider: Mapped[str] = mapped_column(String(24))
    event_id: Mapped[str] = mapped_column(String(200))
    payment_id: Mapped[str | None] = mapped_column(UUIDStr, ForeignKey("payments.id"), index=True)
    refund_id: Mapped[str | None] = mapped_column(UUIDStr)
    kind: Mapped[str] = mapped_column(String(24))  # collection | refund
    status: Mapped[str] = mapped_column(String(24))
    payload: Mapped[Any] = mapped_column(JSONType)
    outcome: Mapped[str | None] = mapped_column(String(64))
    received_at: Mapped[datetime] = _created()


class Refund(Base):
    __tablename__ = "refunds"
    __table_args__ = (
        UniqueConstraint("payment_id", "idempotency_key"),
        Index("ix_refunds_coop_created", "cooperative_id", "created_at"),
        Index("ix_refunds_coop_completed", "cooperative_id", "completed_at"),
        # Migration 0013: a super admin's refunds export, read in keyset batches (core.reports).
        Index("ix_refunds_created", "created_at"),
        Index("ix_refunds_completed", "completed_at"),
        # Migration 0022: a refund's callback by the provider's id, a recorded reversal's probe (core.refunds).
        Index("ix_refunds_transaction_id", "provider_transaction_id", **_where("provider_transaction_id IS NOT NULL")),
        # Migration 0043: GET /v1/disputes?refundFailed= (admin_api.disputes), read from these instead of the table:
        # the refunds linked to disputes, the FAILED ones' ids, and a payment's refunds that did not fail by date.
        Index("ix_refunds_dispute_status", "dispute_id", "status", **_where("dispute_id IS NOT NULL")),
        Index("ix_refunds_failed", "id", **_where("status = 'FAILED'")),
        Index("ix_refunds_payment_unfailed", "payment_id", "created_at", **_where("status <> 'FAILED'")),
    )

    id: Mapped[str] = _id()
    cooperative_id: Mapped[str] = _coop_fk(index=False)
    payment_id: Mapped[str] = mapped_column(UUIDStr, ForeignKey("payments.id"), index=True)
    reference: Mapped[str] = mapped_column(String(32), unique=True)
    amount_minor: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    status: Mapped[str] = mapped_column(String(16), default="PENDING")
    reason: Mapped[str | None] = mapped_column(String(300))
    idempotency_key: Mapped[str] = mapped_column(String(128))
    # sha256 of what was asked (amount or "everything", reason, dispute); NULL on refunds made before 0003
    request_hash: Mapped[str | None] = mapped_column(String(64))
    provider_reference: Mapped[str] = mapped_column(String(64), unique=True)
    provider_transaction_id: Mapped[str | None] = mapped_column(String(128))
    failure_reason: Mapped[str | None] = mapped_column(String(200))
    dispute_id: Mapped[str | None] = mapped_column(UUIDStr)
    # Recorded, not sent: money the provider sent back on its own (a chargeback; core.refunds.ReturnedByProvider).
    # False on every refund made before 0012.
    returned_by_provider: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    created_by: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _updated()
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Dispute(Base):
    __tablename__ = "disputes"
    __table_args__ = (
        # Migration 0025: a member's disputes (GET /v1/disputes?member=); partial: one of no member is no entry.
        Index("ix_disputes_member", "member_id", **_where("member_id IS NOT NULL")),
        # Migration 0038: a cooperative's keys of POST /v1/disputes (core.disputes.open_keyed_dispute); partial: a
        # dispute opened without one (USSD, SMS, an API request without a key) is no entry.
        Index("uq_disputes_cooperative_key", "cooperative_id", "idempotency_key", unique=True,
              **_where("idempotency_key IS NOT NULL")),
    )

    id: Mapped[str] = _id()
    cooperative_id: Mapped[str] = _coop_fk()
    payment_id: Mapped[str] = mapped_column(UUIDStr, ForeignKey("payments.id"), index=True)
    member_id: Mapped[str | None] = mapped_column(UUIDStr, ForeignKey("members.id"))
    reference: Mapped[str] = mapped_column(String(32), unique=True)
    reason: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16), default="OPEN")
    channel: Mapped[str] = mapped_column(String(8))
    notes: Mapped[list[dict[str, Any]]] = mapped_column(JSONType, default=list)
    resolution: Mapped[str | None] = mapped_column(String(500))
    refund_id: Mapped[str | None] = mapped_column(UUIDStr)
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _updated()
    resolved_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # The client's idempotency key of the request that opened it, and that request's digest (None without a key;
    # keyed, core.disputes._request_hash).
    idempotency_key: Mapped[str | None] = mapped_column(String(128))
    request_hash: Mapped[str | None] = mapped_column(String(64))


class DisputeTransitionKey(Base):
    """Migration 0041: a client's idempotency key of POST /v1/disputes/{id}/transitions, scoped to its dispute, and
    the digest of the request it came with (core.disputes.move_keyed_dispute): a retry after a lost answer is
    answered with the dispute as it is, not applied again (a second note and event, or a 409 for the resolution it
    made). The digest only (keyed, core.disputes._request_hash), never the note: free text that may name the
    member."""

    __tablename__ = "dispute_transition_keys"

    dispute_id: Mapped[str] = mapped_column(UUIDStr, ForeignKey("disputes.id"), primary_key=True)
    idempotency_key: Mapped[str] = mapped_column(String(128), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = _created()


class SmsMessage(Base):
    __tablename__ = "sms_messages"
    __table_args__ = (
        Index("ix_sms_messages_created", "created_at"),
        Index("ix_sms_messages_coop_created", "cooperative_id", "created_at"),
        # Migration 0013: the texts `prune` has still to empty (core.retention), by age.
        Index("ix_sms_messages_body_kept", "created_at", **_where("body <> ''")),
        # Migration 0018: a member's texts, which erasing her clears (core.members).
        Index("ix_sms_messages_member", "member_id", **_where("member_id IS NOT NULL")),
        # Migration 0021: a payment's texts, by their key's prefix (admin_api.messages.of_payment): LIKE 'prefix%'
        # reads a btree only in byte order, which the unique index's collation is not.
        Index("ix_sms_messages_key_prefix", "idempotency_key",
              postgresql_ops={"idempotency_key": "text_pattern_ops"}),
    )

    id: Mapped[str] = _id()
    cooperative_id: Mapped[str | None] = _coop_fk(nullable=True, index=False)
    member_id: Mapped[str | None] = mapped_column(UUIDStr)
    phone_enc: Mapped[str] = mapped_column(String(255))
    phone_index: Mapped[str] = mapped_column(String(64), index=True)
    phone_masked: Mapped[str] = mapped_column(String(32))
    template: Mapped[str] = mapped_column(String(48))
    language: Mapped[str] = mapped_column(String(2))
    body: Mapped[str] = mapped_column(Text)
    encoding: Mapped[str] = mapped_column(String(8))  # GSM-7 | UCS-2
    length: Mapped[int] = mapped_column(Integer)
    segments: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default="QUEUED")
    idempotency_key: Mapped[str] = mapped_column(String(160), unique=True)
    provider_message_id: Mapped[str | None] = mapped_column(String(128), index=True)
    provider_status: Mapped[str | None] = mapped_column(String(32))
    failure_reason: Mapped[str | None] = mapped_column(String(64))
    cost: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _updated()
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class OutboxJob(Base):
    """A side effect to perform after commit; claimed with FOR UPDATE SKIP LOCKED."""

    __tablename__ = "outbox_jobs"
    __table_args__ = (
        Index("ix_outbox_due", "status", "run_at"),
        Index("ix_outbox_jobs_coop_id", "cooperative_id", "id"),
        # Migration 0020: a claim that spares the lanes at their share reads the others' due jobs by lane ranges
        # (core.outbox._spared), never a full lane's backlog.
        Index("ix_outbox_due_lane", "lane", "run_at", **_where("status IN ('PENDING', 'RUNNING')")),
        # Migration 0023: the plain claim (core.outbox._claim) reads the live jobs in run_at order, no sort of them all.
        Index("ix_outbox_live_due", "run_at", **_where("status IN ('PENDING', 'RUNNING')")),
        # Migration 0039: retention (core.retention) walks the ended jobs in (run_at, id) order, a batch at a time.
        Index("ix_outbox_jobs_ended", "run_at", "id", **_where("status IN ('DONE', 'DISCARDED')")),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    kind: Mapped[str] = mapped_column(String(48))
    payload: Mapped[dict[str, Any]] = mapped_column(JSONType)
    dedupe_key: Mapped[str | None] = mapped_column(String(200), unique=True)
    cooperative_id: Mapped[str | None] = mapped_column(UUIDStr)
    status: Mapped[str] = mapped_column(String(12), default="PENDING")  # PENDING|RUNNING|DONE|PARKED|DISCARDED
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=8)
    run_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    locked_by: Mapped[str | None] = mapped_column(String(64))
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _updated()
    done_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # The payment provider the job's handler calls (core.outbox's lanes): its payment's provider, written by the
    # database when the job is inserted (migration 0020's trigger), whichever code inserts it; NULL for a job
    # that calls none. Compared in byte order ("C" on PostgreSQL, SQLite's own), as the claim's ranges are built.
    lane: Mapped[str | None] = mapped_column(String(24).with_variant(String(24, collation="C"), "postgresql"))
    # Migration 0031: its last try failed, so its PENDING wait (run_at) is a retry after a failure: an attempt used, or
    # a failure its handler retried with its attempt given back (core.outbox.RetryLater's `failed`: a webhook delivery,
    # a poll whose status query failed); false after a try that only planned its wait. Its attempts show neither (a
    # RetryLater gives its attempt back; they count earlier failures too). Written at every retry and RetryLater
    # (core.outbox.waiting reads it alone).
    after_failure: Mapped[bool] = mapped_column(Boolean, server_default=false())


class ApprovedDomain(Base):
    __tablename__ = "approved_domains"
    __table_args__ = (UniqueConstraint("cooperative_id", "domain"),)

    id: Mapped[str] = _id()
    cooperative_id: Mapped[str] = _coop_fk()
    domain: Mapped[str] = mapped_column(String(253))
    status: Mapped[str] = mapped_column(String(16), default="PENDING")  # PENDING | APPROVED | REJECTED
    decided_by: Mapped[str | None] = mapped_column(String(64))
    decided_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = _created()


class WebhookEndpoint(Base):
    __tablename__ = "webhook_endpoints"

    id: Mapped[str] = _id()
    cooperative_id: Mapped[str] = _coop_fk()
    url: Mapped[str] = mapped_column(String(500))
    secret_enc: Mapped[str] = mapped_column(String(255))
    # The secrets rotations replaced, newest first, each encrypted like secret_enc and with the moment its
    # overlap ends: [{"secret_enc": ..., "expires_at": ISO 8601 UTC}]. Every one not yet expired still signs
    # deliveries, so a receiver on any of them can switch over without refusing anything (core.webhooks).
    previous_secrets: Mapped[list[dict[str, Any]]] = mapped_column(JSONType, default=list)
    events: Mapped[list[str]] = mapped_column(JSONType, default=list)
    status: Mapped[str] = mapped_column(String(16), default="ACTIVE")  # ACTIVE | DISABLED
    consecutive_failures: Mapped[int] = mapped_column(Integer, default=0)
    disabled_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _updated()


class WebhookDelivery(Base):
    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        UniqueConstraint("endpoint_id", "event_id"),
        Index("ix_webhook_deliveries_created", "created_at"),
        Index("ix_webhook_deliveries_coop_created", "cooperative_id", "created_at"),
    )

    id: Mapped[str] = _id()
    cooperative_id: Mapped[str] = _coop_fk(index=False)
    endpoint_id: Mapped[str] = mapped_column(UUIDStr, ForeignKey("webhook_endpoints.id"), index=True)
    event_id: Mapped[str] = mapped_column(String(64))
    event_type: Mapped[str] = mapped_column(String(48))
    payload: Mapped[dict[str, Any]] = mapped_column(JSONType)
    status: Mapped[str] = mapped_column(String(16), default="PENDING")  # PENDING | DELIVERED | FAILED
    attempts: Mapped[list[dict[str, Any]]] = mapped_column(JSONType, default=list)
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _updated()
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


# Migration 0034: the stored webhook events of a payment or a refund, by the id in their data (core.db.event_data_id),
# which erasing its member scrubs (core.members): an event id names its subject only before it is digested
# (core.webhooks.stored_event_id; flags, reviews and reported money are digested), never in an indexed way.
Index("ix_webhook_deliveries_subject", event_data_id(WebhookDelivery.payload))
Index("ix_outbox_jobs_event_subject", event_data_id(OutboxJob.payload), **_where("kind = 'webhook.event'"))


class UssdSession(Base):
    __tablename__ = "ussd_sessions"
    __table_args__ = (
        UniqueConstraint("aggregator", "session_id"),
        Index("ix_ussd_sessions_started", "started_at"),
        Index("ix_ussd_sessions_coop_started", "cooperative_id", "started_at"),
        # Migration 0018: a member's session rows, which erasing her clears (core.members).
        Index("ix_ussd_sessions_member", "member_id", **_where("member_id IS NOT NULL")),
    )

    id: Mapped[str] = _id()
    aggregator: Mapped[str] = mapped_column(String(24))
    session_id: Mapped[str] = mapped_column(String(128))
    cooperative_id: Mapped[str | None] = mapped_column(UUIDStr)
    member_id: Mapped[str | None] = mapped_column(UUIDStr)
    phone_index: Mapped[str] = mapped_column(String(64), index=True)
    phone_masked: Mapped[str] = mapped_column(String(32))
    service_code: Mapped[str] = mapped_column(String(32))
    network_code: Mapped[str | None] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default="OPEN")  # OPEN|Success|Incomplete|Failed
    hops: Mapped[int] = mapped_column(Integer, default=0)
    last_screen: Mapped[str | None] = mapped_column(String(48))
    duration_ms: Mapped[int | None] = mapped_column(Integer)
    cost: Mapped[str | None] = mapped_column(String(32))
    error: Mapped[str | None] = mapped_column(String(300))
    payment_id: Mapped[str | None] = mapped_column(UUIDStr)
    started_at: Mapped[datetime] = _created()
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class AuditEvent(Base):
    """Append-only record of every financial event: who, what, when, from which channel."""

    __tablename__ = "audit_events"
    __table_args__ = (
        Index("ix_audit_entity", "entity_type", "entity_id"),
        # Migration 0013: the log filtered by actor or action, newest first, for a cooperative admin (the first
        # two, which also find a cooperative's rows: no cooperative_id index alone) and a super admin.
        Index("ix_audit_events_coop_actor", "cooperative_id", "actor", "at"),
        Index("ix_audit_events_coop_action", "cooperative_id", "action", "at"),
        Index("ix_audit_events_actor", "actor", "at"),
        Index("ix_audit_events_action", "action", "at"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    cooperative_id: Mapped[str | None] = mapped_column(UUIDStr)
    actor: Mapped[str] = mapped_column(String(96))
    channel: Mapped[str] = mapped_column(String(16))
    action: Mapped[str] = mapped_column(String(64))
    entity_type: Mapped[str] = mapped_column(String(32))
    entity_id: Mapped[str] = mapped_column(String(64))
    before: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    after: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)


class ReferenceCounter(Base):
    """Per-day counters for human references (PAY_20251016_001)."""

    __tablename__ = "reference_counters"

    key: Mapped[str] = mapped_column(String(32), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger, default=0)


class ReminderSent(Base):
    __tablename__ = "reminders_sent"
    __table_args__ = (UniqueConstraint("member_id", "payment_type_id", "period"),)

    id: Mapped[str] = _id()
    member_id: Mapped[str] = mapped_column(UUIDStr, ForeignKey("members.id"))
    payment_type_id: Mapped[str] = mapped_column(UUIDStr, ForeignKey("payment_types.id"))
    period: Mapped[date] = mapped_column(Date)
    created_at: Mapped[datetime] = _created()


class UsedRefreshToken(Base):
    """A refresh token traded for a new pair (core.auth.refresh): each works once. Recorded here, in the system
    of record, not in Redis: a Redis that lost its data (flushed, restarted without persistence, failed over to a
    replica that missed the write) would let a spent token mint pairs again for the rest of its week. `prune`
    deletes a row a day after its token expired (core.retention): an expired token is refused anyway. `id` is the
    token's `jti` (named as every table `prune` walks by id is)."""

    __tablename__ = "used_refresh_tokens"
    __table_args__ = (Index("ix_used_refresh_tokens_expires_at", "expires_at"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)


class PhoneOptOut(Base):
    """A number that sent STOP (channels.sms.routes), by its blind index (the one members.phone_index holds;
    never the number): the opt-out is the number's person's, so it holds for every membership the number has,
    made before or later, in this cooperative or another: the send-time check (core.reminders.why_not_send)
    reads this row beside the membership's own flag, which starts False (core.members: the cooperative does not
    learn of it). START deletes the row; so does releasing the number from its last membership (the operator
    gives it to someone else)."""

    __tablename__ = "phone_opt_outs"

    phone_index: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = _created()


class PhoneOptOutWord(Base):
    """When a number's latest STOP or START taken was sent (channels.sms.routes: the aggregator's `date` of the text),
    by its blind index: a STOP and a START sent seconds apart are taken by two handlers at once, or out of order, and
    one sent before the word this row holds changes nothing (core.members.set_number_opt_out). Its row is locked by
    the word taken, so the number's words are written one after another. Forgotten with the number's opt-out when
    the number leaves its last membership."""

    __tablename__ = "phone_opt_out_words"

    phone_index: Mapped[str] = mapped_column(String(64), primary_key=True)
    said_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
