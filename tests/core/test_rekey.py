"""Key rotation end to end: rows sealed under an old PII key are re-encrypted under the active one
(`python main.py reencrypt`), after which the old key can be removed and everything still reads: members'
phones, payment accounts, stored SMS, webhook secrets, and the phone in queued SMS jobs. A value no key opens is
reported (exit 1), never silently skipped; a second run finds nothing to do."""

from __future__ import annotations

import base64
import os
from typing import Any

import pytest
from sqlalchemy import select, update

from app import open_runtime
from core.audit import Actor
from core.crypto import CryptoError, PiiCipher
from core.members import member_phone
from core.models import Member, OutboxJob, Payment, SmsMessage, WebhookEndpoint
from core.notify import sms_job
from core.outbox import enqueue_many
from core.payments import NewPayment, create_payment, payer_phone
from core.phone import Phone
from core.rekey import reencrypt
from core.webhooks import endpoint_secret, signing_secrets
from main import _reencrypt
from tests.conftest import clean_database, make_settings

OLD, NEW = base64.b64encode(os.urandom(32)).decode(), base64.b64encode(os.urandom(32)).decode()
BEFORE = {"PII_ENCRYPTION_KEYS": f"old:{OLD}", "PII_ACTIVE_KEY_ID": "old"}
BOTH = {"PII_ENCRYPTION_KEYS": f"old:{OLD},new:{NEW}", "PII_ACTIVE_KEY_ID": "new"}
AFTER = {"PII_ENCRYPTION_KEYS": f"new:{NEW}", "PII_ACTIVE_KEY_ID": "new"}
ADMIN = Actor("admin:test", "api")


async def _data_under_the_old_key(migrated_database: str) -> dict[str, Any]:
    from core.demo import seed_demo

    async with open_runtime(make_settings(**BEFORE)) as rt:
        await clean_database(rt)
        async with rt.sessionmaker.begin() as s:
            demo = await seed_demo(s, rt.cipher)
        async with rt.sessionmaker.begin() as s:
            payment, _ = await create_payment(s, rt, NewPayment(
                cooperative_id=demo["cooperative_id"], payment_type_id=demo["payment_types"]["Water"],
                method="MOBILE_MONEY_MTN", account="+250788000001", idempotency_key="rekey-payment-1",
                channel="api"), actor=ADMIN)
            s.add(SmsMessage(cooperative_id=demo["cooperative_id"], phone_enc=rt.cipher.encrypt("+250788000001",
                             context="sms"), phone_index=rt.cipher.blind_index("+250788000001"),
                             phone_masked="+25078****001", template="payment_receipt", language="en", body="x",
                             encoding="GSM-7", length=1, segments=1, status="SENT", idempotency_key="rk-1"))
            sealed = rt.cipher.encrypt("whsec_old", context=f"webhook:{demo['cooperative_id']}")
            s.add(WebhookEndpoint(cooperative_id=demo["cooperative_id"], url="https://hooks.example.rw/x",
                                  secret_enc=sealed, events=["payment.completed"]))
            await enqueue_many(s, [sms_job(template="payment_receipt", cooperative_id=demo["cooperative_id"],
                                           context={"payment_id": payment.id}, cipher=rt.cipher, member_id=None,
                                           phone=Phone("+250788000001"), dedupe="payment_receipt:rekey")])
        return {"demo": demo, "payment_id": payment.id}


async def _all_sealed_with(rt: Any, key_id: str) -> None:
    async with rt.sessionmaker() as s:
        values = [*(await s.execute(select(Member.phone_enc))).scalars(),
                  *(await s.execute(select(Payment.payment_account_enc))).scalars(),
                  *(await s.execute(select(SmsMessage.phone_enc))).scalars(),
                  *(await s.execute(select(WebhookEndpoint.secret_enc))).scalars()]
        jobs = [j.payload["phone_enc"] for j in (await s.execute(select(OutboxJob))).scalars()
                if (j.payload or {}).get("phone_enc")]
    assert values and jobs
    assert {v.partition(":")[0] for v in [*values, *jobs]} == {key_id}


async def test_rotation_then_the_old_key_removed(migrated_database):
    made = await _data_under_the_old_key(migrated_database)
    async with open_runtime(make_settings(**BOTH)) as rt:
        report = await reencrypt(rt.sessionmaker, rt.cipher, batch=2)  # several batches
        assert report.unreadable == {} and report.changed_meanwhile == 0
        assert report.rewritten["members.phone_enc"] == len(made["demo"]["members"])
        assert report.rewritten["payments.payment_account_enc"] == 1
        assert report.rewritten["webhook_endpoints.secret_enc"] == 1
        assert report.rewritten["outbox_jobs.payload.phone_enc"] >= 1
        await _all_sealed_with(rt, "new")
        again = await reencrypt(rt.sessionmaker, rt.cipher)
        assert again.rewritten == {} and again.unreadable == {}
    async with open_runtime(make_settings(**AFTER)) as rt, rt.sessionmaker() as s:
        members = (await s.execute(select(Member))).scalars().all()
        assert {member_phone(rt.cipher, m).e164 for m in members} == set(made["demo"]["members"])
        payment = await s.get(Payment, made["payment_id"])
        assert payer_phone(rt.cipher, payment).e164 == "+250788000001"
        endpoint = (await s.execute(select(WebhookEndpoint))).scalar_one()
        assert endpoint_secret(rt.cipher, endpoint) == "whsec_old" and signing_secrets(rt.cipher, endpoint) == [
            "whsec_old"]
        job = (await s.execute(select(OutboxJob).where(OutboxJob.kind == "sms.send"))).scalars().first()
        assert rt.cipher.decrypt(job.payload["phone_enc"], context="sms") == "+250788000001"


async def test_a_parked_sms_is_sealed_again_too_so_its_replay_still_reaches_the_member(migrated_database):
    """An SMS job parked (its aggregator refusing it for hours) keeps the member's number in its payload: rotated
    with the rest, so once the old key is removed, replaying it (POST /v1/jobs/{id}/replay) can still read where to
    send it."""
    await _data_under_the_old_key(migrated_database)
    async with open_runtime(make_settings(**BEFORE)) as rt, rt.sessionmaker.begin() as s:
        await s.execute(update(OutboxJob).where(OutboxJob.kind == "sms.send").values(status="PARKED"))
    async with open_runtime(make_settings(**BOTH)) as rt:
        report = await reencrypt(rt.sessionmaker, rt.cipher)
        assert report.unreadable == {} and report.rewritten["outbox_jobs.payload.phone_enc"] >= 1
    async with open_runtime(make_settings(**AFTER)) as rt, rt.sessionmaker() as s:
        job = (await s.execute(select(OutboxJob).where(OutboxJob.kind == "sms.send"))).scalars().first()
        assert job.status == "PARKED"
        assert rt.cipher.decrypt(job.payload["phone_enc"], context="sms") == "+250788000001"


async def test_a_value_no_key_opens_is_reported_and_the_command_fails(migrated_database, capsys):
    made = await _data_under_the_old_key(migrated_database)
    async with open_runtime(make_settings(**BEFORE)) as rt, rt.sessionmaker.begin() as s:
        await s.execute(update(Payment).where(Payment.id == made["payment_id"])
                        .values(payment_account_enc="gone:" + base64.b64encode(b"x" * 40).decode()))
    assert await _reencrypt(make_settings(**BOTH)) == 1
    out = capsys.readouterr()
    assert f"payments.payment_account_enc: 1 cannot be decrypted with any configured key (ids: {made['payment_id']})" \
        in out.err
    assert "members.phone_enc: " in out.out and "re-encrypted under new" in out.out


@pytest.mark.parametrize("token", ["new:not base64!", "new:" + base64.b64encode(b"short").decode(), "new:", "nokey"])
def test_malformed_ciphertext_is_a_crypto_error(token):
    cipher = PiiCipher({"new": os.urandom(32)}, "new", "index-key")
    with pytest.raises(CryptoError):
        cipher.decrypt(token)


async def test_rows_keep_their_updated_at(migrated_database):
    """A failing webhook endpoint's updated_at says since when it fails (its switch-off counts from it)."""
    from datetime import timedelta

    from core.db import utcnow

    await _data_under_the_old_key(migrated_database)
    since = utcnow() - timedelta(hours=20)
    async with open_runtime(make_settings(**BOTH)) as rt:
        async with rt.sessionmaker.begin() as s:
            await s.execute(update(WebhookEndpoint).values(consecutive_failures=50, updated_at=since))
            await s.execute(update(Payment).values(updated_at=since))
        report = await reencrypt(rt.sessionmaker, rt.cipher)
        assert report.rewritten["webhook_endpoints.secret_enc"] == 1
        async with rt.sessionmaker() as s:
            endpoint = (await s.execute(select(WebhookEndpoint))).scalar_one()
            payments = (await s.execute(select(Payment))).scalars().all()
    assert abs((endpoint.updated_at - since).total_seconds()) < 1
    assert all(abs((p.updated_at - since).total_seconds()) < 1 for p in payments)


async def test_rows_changed_while_it_ran_make_it_exit_2(migrated_database, monkeypatch, capsys):
    """A row a worker changed between the read and the compare-and-set may still be under the old key: the
    command says run it again and does not exit 0 (the signal that the old key may go)."""
    import core.rekey as rekey

    async def raced(*_: Any, **__: Any) -> rekey.Report:
        report = rekey.Report()
        report.add("members.phone_enc")
        report.changed_meanwhile = 1
        return report

    monkeypatch.setattr(rekey, "reencrypt", raced)
    assert await _reencrypt(make_settings(**BOTH)) == 2
    out = capsys.readouterr()
    assert "1 changed while this ran and may still be under the old key: run it again" in out.err
    assert "nothing stored under another key" not in out.out


@pytest.mark.parametrize("ended", ["DONE", "DISCARDED"])
async def test_an_ended_sms_job_is_sealed_again_too_so_nothing_is_left_under_the_old_key(migrated_database, ended):
    """A sent SMS's job is kept RETENTION_OUTBOX_DONE_DAYS (30) with the payer's number in its payload: left under
    the old key, a leaked key still opened a backup's numbers after the rotation the leak called for, and
    `reencrypt` exited 0 ("nothing left under another key") with them there."""
    await _data_under_the_old_key(migrated_database)
    async with open_runtime(make_settings(**BEFORE)) as rt, rt.sessionmaker.begin() as s:
        await s.execute(update(OutboxJob).where(OutboxJob.kind == "sms.send").values(status=ended))
    async with open_runtime(make_settings(**BOTH)) as rt:
        report = await reencrypt(rt.sessionmaker, rt.cipher)
        assert report.unreadable == {} and report.rewritten["outbox_jobs.payload.phone_enc"] >= 1
        await _all_sealed_with(rt, "new")
    async with open_runtime(make_settings(**AFTER)) as rt, rt.sessionmaker() as s:
        job = (await s.execute(select(OutboxJob).where(OutboxJob.kind == "sms.send"))).scalars().first()
        assert job.status == ended
        assert rt.cipher.decrypt(job.payload["phone_enc"], context="sms") == "+250788000001"


async def test_a_number_erased_while_it_ran_is_not_written_back(migrated_database, monkeypatch):
    """A member's erasure empties the number her queued texts' jobs carry without changing their status: a job read
    by reencrypt just before got the number back, sealed under the new key, after she was told it was gone."""
    import asyncio
    import threading

    import asyncpg  # type: ignore[import-untyped]

    import core.rekey as rekey

    await _data_under_the_old_key(migrated_database)
    sealed_again = rekey._sealed_again
    dsn = migrated_database.replace("postgresql+asyncpg://", "postgresql://")
    if not dsn.startswith("postgresql://"):
        pytest.skip("the erasure runs on its own connection meanwhile: PostgreSQL")

    async def erase() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute("UPDATE outbox_jobs SET payload = jsonb_set(payload, '{phone_enc}', 'null') "
                               "WHERE kind = 'sms.send'")
        finally:
            await conn.close()

    carried: set[str] = set()

    def racing(cipher: PiiCipher, value: str, context: str) -> str | None:
        if value in carried:  # a job's number, between reencrypt's read of the job and its write
            worker = threading.Thread(target=lambda: asyncio.run(erase()))
            worker.start()
            worker.join()
        return sealed_again(cipher, value, context)

    async with open_runtime(make_settings(**BOTH)) as rt:
        async with rt.sessionmaker() as s:
            carried |= {j.payload["phone_enc"] for j in (await s.execute(select(OutboxJob))).scalars()
                       if (j.payload or {}).get("phone_enc")}
        monkeypatch.setattr(rekey, "_sealed_again", racing)
        report = await reencrypt(rt.sessionmaker, rt.cipher)
        assert report.changed_meanwhile >= 1
        async with rt.sessionmaker() as s:
            jobs = (await s.execute(select(OutboxJob).where(OutboxJob.kind == "sms.send"))).scalars().all()
    assert jobs and all(job.payload["phone_enc"] is None for job in jobs)


async def test_an_ended_job_no_key_opens_loses_its_number_and_fails_nothing(migrated_database, capsys):
    """A key removed after a rotation that left ended jobs alone (releases before they were sealed again): those
    jobs' numbers are sent nowhere again, so they are dropped, and the next rotation's command still exits 0
    rather than listing them as unreadable (exit 1) for 30 days."""
    await _data_under_the_old_key(migrated_database)
    async with open_runtime(make_settings(**BEFORE)) as rt, rt.sessionmaker.begin() as s:
        await s.execute(update(OutboxJob).where(OutboxJob.kind == "sms.send").values(status="DONE"))
    assert await _reencrypt(make_settings(**AFTER)) == 1  # the members' numbers: no configured key opens them
    out = capsys.readouterr()
    assert "outbox_jobs.payload.phone_enc: 1 of ended jobs dropped (no configured key opens them" in out.out
    assert "outbox_jobs" not in out.err and "members.phone_enc" in out.err
    async with open_runtime(make_settings(**AFTER)) as rt, rt.sessionmaker() as s:
        job = (await s.execute(select(OutboxJob).where(OutboxJob.kind == "sms.send"))).scalars().one()
        assert job.status == "DONE" and job.payload["phone_enc"] is None


async def test_only_sms_jobs_under_another_key_are_read_and_far_apart_ids_are_all_reached(migrated_database):
    """Since ended jobs are sealed again too, every outbox job was read whole into the command, of every kind (a
    webhook delivery's event, a refund's submission) and every number already under the active key, each run: on a
    table of millions kept their retention, all of them crossed to the process. Now only the SMS jobs still under
    another key are read; and the walk by windows of ids still reaches a job whose id lies far past a gap."""
    from sqlalchemy import event

    from core.outbox import NewJob

    await _data_under_the_old_key(migrated_database)
    async with open_runtime(make_settings(**BEFORE)) as rt, rt.sessionmaker.begin() as s:
        await enqueue_many(s, [NewJob("webhook.deliver", {"event_id": f"evt-{n}", "body": "x" * 200},
                                      dedupe_key=f"rekey-other-{n}") for n in range(60)])
        await enqueue_many(s, [sms_job(template="payment_receipt", cooperative_id=None, context={}, cipher=rt.cipher,
                                       phone=Phone("+250788000002"), dedupe=f"rekey-more-{n}") for n in range(3)])
        far = (await s.execute(select(OutboxJob).where(OutboxJob.dedupe_key == "sms:rekey-more-2"))).scalar_one()
        far.id = far.id + 100_000  # past a gap of many windows (jobs pruned)
    async with open_runtime(make_settings(**BOTH)) as rt:
        async with rt.sessionmaker.begin() as s:  # one more SMS already under the new key: nothing to do for it
            await enqueue_many(s, [sms_job(template="payment_receipt", cooperative_id=None, context={},
                                           cipher=rt.cipher, phone=Phone("+250788000003"), dedupe="rekey-new")])
        read: list[int] = []

        def loaded(target: OutboxJob, _context: Any) -> None:
            read.append(target.id)

        event.listen(OutboxJob, "load", loaded)
        try:
            report = await reencrypt(rt.sessionmaker, rt.cipher, batch=2)
        finally:
            event.remove(OutboxJob, "load", loaded)
        assert report.rewritten["outbox_jobs.payload.phone_enc"] == 4 and report.unreadable == {}
        assert len(read) == 4, f"{len(read)} jobs read for 4 to seal again"
        await _all_sealed_with(rt, "new")
        again = await reencrypt(rt.sessionmaker, rt.cipher, batch=2)
        assert "outbox_jobs.payload.phone_enc" not in again.rewritten
