"""Re-encrypting stored PII under the active key, so an old key (a leaked one, or one past its life) can be
removed from PII_ENCRYPTION_KEYS.

Rotation (README, "PII keys rotate without downtime"): add the new key to PII_ENCRYPTION_KEYS everywhere and restart
every process, then make it PII_ACTIVE_KEY_ID and restart them again (in one step, a restarted process seals under a
key one not yet restarted cannot open), run `python main.py reencrypt` until it reports nothing left under another
key, then remove the old key and restart again. The command is safe to run while the service
runs and to run again: each row is rewritten by a compare-and-set on its old ciphertext (a row changed
meanwhile is left for the next run), in batches of one short transaction each. The blind indexes
(BLIND_INDEX_KEY) do not depend on these keys and are left alone.

`python main.py rehash-requests` (rehash_requests), once after the upgrade to the release that keys the payments'
request hashes (core.payments.keyed_request_hash): a payment written before it holds a plain digest of its
request, from which anyone holding a backup finds the payer's number; each is replaced by its HMAC. So are the
disputes' and their transitions' written before the release that keys them (a digest of the note, which outlives the
member's erasure). Safe while serving and to run again, as reencrypt.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from core.crypto import CryptoError, PiiCipher
from core.db import utcnow
from core.members import phone_context
from core.models import Dispute, DisputeTransitionKey, Member, OutboxJob, Payment, SmsMessage, WebhookEndpoint
from core.notify import SMS_PHONE_CONTEXT
from core.outbox import ENDED, SMS_KIND
from core.payments import REQUEST_HASH_VERSION, account_context, keyed_request_hash
from core.webhooks import endpoint_secret_context, secret_expiry

log = logging.getLogger("gateway.rekey")
BATCH = 500


@dataclass(frozen=True)
class Column:
    """One encrypted column, and the AES-GCM context its values were sealed with (from the row)."""

    model: Any
    name: str
    context: Callable[[Any], str]


COLUMNS = (
    Column(Member, "phone_enc", lambda row: phone_context(row.cooperative_id)),
    Column(Payment, "payment_account_enc", lambda row: account_context(row.cooperative_id)),
    Column(SmsMessage, "phone_enc", lambda row: SMS_PHONE_CONTEXT),
    Column(WebhookEndpoint, "secret_enc", lambda row: endpoint_secret_context(row.cooperative_id)),
)
# SMS jobs carry the recipient's phone in their payload (core.notify), those ended (DONE, DISCARDED) too: they are
# kept RETENTION_OUTBOX_DONE_DAYS, and one left under the old key (a leaked one) would give a backup's numbers to
# whoever holds it, and keep `reencrypt` from meaning "nothing left under another key".
PAYLOAD_KEY = "phone_enc"


@dataclass
class Report:
    rewritten: dict[str, int] = field(default_factory=dict)
    unreadable: dict[str, list[str]] = field(default_factory=dict)  # where -> ids (none decrypts them)
    dropped: dict[str, int] = field(default_factory=dict)  # where -> how many (ended jobs' numbers none decrypts)
    changed_meanwhile: int = 0

    def add(self, where: str) -> None:
        self.rewritten[where] = self.rewritten.get(where, 0) + 1

    def lost(self, where: str, row_id: Any) -> None:
        self.unreadable.setdefault(where, []).append(str(row_id))

    def tally(self, where: str, rows_written: int) -> None:
        """A compare-and-set's outcome: rewritten, or changed meanwhile (left for the next run)."""
        if rows_written:
            self.add(where)
        else:
            self.changed_meanwhile += 1


def _stale(cipher: PiiCipher, value: Any) -> bool:
    return isinstance(value, str) and bool(value) and not value.startswith(f"{cipher.active_key_id}:")


def _sealed_again(cipher: PiiCipher, value: str, context: str) -> str | None:
    """`value` sealed under the active key, None when no configured key opens it."""
    try:
        return cipher.encrypt(cipher.decrypt(value, context=context), context=context)
    except CryptoError:
        return None


async def reencrypt(sessionmaker: async_sessionmaker[AsyncSession], cipher: PiiCipher, *,
                    batch: int = BATCH) -> Report:
    """Every stored ciphertext not under the active key, decrypted and sealed again under it."""
    report = Report()
    for column in COLUMNS:
        await _column(sessionmaker, cipher, column, batch, report)
    await _previous_secrets(sessionmaker, cipher, batch, report)
    await _payloads(sessionmaker, cipher, batch, report)
    return report


async def _column(sessionmaker: async_sessionmaker[AsyncSession], cipher: PiiCipher, column: Column, batch: int,
                  report: Report) -> None:
    model, attr = column.model, getattr(column.model, column.name)
    where = f"{model.__tablename__}.{column.name}"
    active = f"{cipher.active_key_id}:%"
    after = ""
    while True:
        async with sessionmaker.begin() as session:
            rows = (await session.execute(
                select(model).where(attr.is_not(None), attr != "", ~attr.like(active), model.id > after)
                .order_by(model.id).limit(batch))).scalars().all()
            for row in rows:
                old = getattr(row, column.name)
                new = _sealed_again(cipher, old, column.context(row))
                if new is None:
                    report.lost(where, row.id)
                    continue
                # updated_at kept: it means something to some rows (a webhook endpoint failing since then).
                done = await session.execute(update(model).where(model.id == row.id, attr == old)
                                             .values({column.name: new, "updated_at": model.updated_at})
                                             .execution_options(synchronize_session=False))
                report.tally(where, done.rowcount)  # type: ignore[attr-defined]
        if len(rows) < batch:
            return
        after = str(rows[-1].id)


async def _previous_secrets(sessionmaker: async_sessionmaker[AsyncSession], cipher: PiiCipher, batch: int,
                            report: Report) -> None:
    """The secrets webhook endpoints' rotations replaced (a JSON list, see WebhookEndpoint.previous_secrets)."""
    where = f"{WebhookEndpoint.__tablename__}.previous_secrets"
    after = ""
    while True:
        async with sessionmaker.begin() as session:
            rows = (await session.execute(
                select(WebhookEndpoint).where(WebhookEndpoint.id > after)
                .order_by(WebhookEndpoint.id).limit(batch))).scalars().all()
            for row in rows:
                entries = list(row.previous_secrets or [])
                if not any(_stale(cipher, entry.get("secret_enc")) for entry in entries if isinstance(entry, dict)):
                    continue
                new = _resealed_previous(cipher, entries, endpoint_secret_context(row.cooperative_id), utcnow())
                if new is None:
                    report.lost(where, row.id)
                    continue
                # Every rotation writes a new secret_enc along with the list: an unchanged secret_enc means an
                # unchanged list (a JSON column is not compared alike on every backend). updated_at kept.
                done = await session.execute(
                    update(WebhookEndpoint)
                    .where(WebhookEndpoint.id == row.id, WebhookEndpoint.secret_enc == row.secret_enc)
                    .values(previous_secrets=new, updated_at=WebhookEndpoint.updated_at)
                    .execution_options(synchronize_session=False))
                report.tally(where, done.rowcount)  # type: ignore[attr-defined]
        if len(rows) < batch:
            return
        after = str(rows[-1].id)


def _resealed_previous(cipher: PiiCipher, entries: list[Any], context: str,
                       now: datetime) -> list[dict[str, Any]] | None:
    """The entries still signing, each secret sealed under the active key (order kept), None when no key opens
    one of them. Expired ones are dropped, not sealed again: they never sign again, and one left under the old
    key would outlive it."""
    kept = []
    for entry in entries:
        until = secret_expiry(entry)
        if until is None or until <= now:
            continue
        sealed = entry["secret_enc"]
        if _stale(cipher, sealed):
            sealed = _sealed_again(cipher, sealed, context)
            if sealed is None:
                return None
        kept.append({**entry, "secret_enc": sealed})
    return kept


async def _payloads(sessionmaker: async_sessionmaker[AsyncSession], cipher: PiiCipher, batch: int,
                    report: Report) -> None:
    where = f"{OutboxJob.__tablename__}.payload.{PAYLOAD_KEY}"
    # Only SMS jobs carry a number (core.notify.sms_job), and only one not under the active key is work: picked by
    # the query. Ended jobs being read too, the table holds millions (every webhook delivery, refund submission and
    # text, kept their retention): read whole and judged here, every one of them crossed to this process on every
    # run. Each statement covers `window` ids of the primary key, whatever matches: bounded where nothing does (a
    # second run), not one scan of the whole table.
    phone = OutboxJob.payload[PAYLOAD_KEY].as_string()
    stale = (OutboxJob.kind == SMS_KIND, phone.is_not(None), phone != "",
             ~phone.startswith(f"{cipher.active_key_id}:", autoescape=True))
    window = batch * 20
    after = 0
    top = await _last_job_id(sessionmaker)
    while after < top:
        async with sessionmaker.begin() as session:
            jobs = (await session.execute(
                select(OutboxJob).where(OutboxJob.id > after, OutboxJob.id <= after + window, *stale)
                .order_by(OutboxJob.id).limit(batch))).scalars().all()
            for job in jobs:
                old = (job.payload or {}).get(PAYLOAD_KEY)
                if not isinstance(old, str) or not _stale(cipher, old):
                    continue
                new = _sealed_again(cipher, old, SMS_PHONE_CONTEXT)
                if new is None and job.status not in ENDED:
                    report.lost(where, job.id)
                    continue
                # An ended job is never sent again (only a parked one is replayed): a number no configured key opens
                # (a key removed after a rotation before ended jobs were sealed again) is dropped, not a failure.
                payload = {**job.payload, PAYLOAD_KEY: new}
                # On the number itself too: a member's erasure that emptied it meanwhile (core.members
                # ._erase_jobs_numbers, the job's status unchanged) must not get it back, sealed anew.
                done = await session.execute(update(OutboxJob).where(OutboxJob.id == job.id,
                                                                     OutboxJob.status == job.status,
                                                                     OutboxJob.payload[PAYLOAD_KEY].as_string() == old)
                                             .values(payload=payload, updated_at=OutboxJob.updated_at)
                                             .execution_options(synchronize_session=False))
                if new is None and done.rowcount:  # type: ignore[attr-defined]
                    report.dropped[where] = report.dropped.get(where, 0) + 1
                else:
                    report.tally(where, done.rowcount)  # type: ignore[attr-defined]
        after = jobs[-1].id if len(jobs) == batch else min(after + window, top)
        if after >= top:
            top = await _last_job_id(sessionmaker)  # jobs queued while this ran: sealed by a process not restarted


async def _last_job_id(sessionmaker: async_sessionmaker[AsyncSession]) -> int:
    async with sessionmaker() as session:
        return int((await session.execute(select(func.max(OutboxJob.id)))).scalar() or 0)


async def rehash_requests(sessionmaker: async_sessionmaker[AsyncSession], cipher: PiiCipher, *,
                          batch: int = BATCH) -> Report:
    """Every payment's request hash written before it was keyed (a plain SHA-256 of the request, the payer's
    full number in it) replaced by its HMAC (core.payments.keyed_request_hash of the stored digest: what the
    same request gives now, so an idempotent replay of an old key still finds its payment). Nothing to
    decrypt; each row by a compare-and-set on its old hash, updated_at kept (the payment did not change: a
    cooperative's sync by updatedFrom does not list it again). The disputes' (opened under a key) and their
    keyed transitions' the same way (core.disputes._request_hash: a digest of the note, which the member's erasure
    scrubs and the digest outlives)."""
    report = Report()
    await _rehash(sessionmaker, cipher, Payment, (Payment.id,), batch, report)
    await _rehash(sessionmaker, cipher, Dispute, (Dispute.id,), batch, report)
    await _rehash(sessionmaker, cipher, DisputeTransitionKey,
                  (DisputeTransitionKey.dispute_id, DisputeTransitionKey.idempotency_key), batch, report)
    return report


async def _rehash(sessionmaker: async_sessionmaker[AsyncSession], cipher: PiiCipher, model: Any, keys: tuple[Any, ...],
                  batch: int, report: Report) -> None:
    """One table's plain request hashes, read in the order of its primary key (`keys`)."""
    where = f"{model.__tablename__}.request_hash"
    column = model.request_hash
    kept = {"updated_at": model.updated_at} if hasattr(model, "updated_at") else {}
    after: tuple[Any, ...] | None = None
    while True:
        async with sessionmaker.begin() as session:
            rows = (await session.execute(
                select(*keys, column).where(~column.startswith(REQUEST_HASH_VERSION, autoescape=True),
                                            column != "",  # '': an erased payer's; NULL (a dispute without key)
                                            *([] if after is None else [tuple_(*keys) > after]))
                .order_by(*keys).limit(batch))).all()
            for row in rows:
                done = await session.execute(
                    update(model).where(*(key == value for key, value in zip(keys, row, strict=False)),
                                        column == row.request_hash)
                    .values(request_hash=keyed_request_hash(cipher, row.request_hash), **kept)
                    .execution_options(synchronize_session=False))
                report.tally(where, done.rowcount)  # type: ignore[attr-defined]
        if len(rows) < batch:
            return
        after = tuple(rows[-1])[: len(keys)]
