"""M-Pesa taking a reversal, then refusing it in its Result for the gateway's own initiator (ResultCode 2001: "The
initiator information is invalid.", a rotated initiator password; 21: the initiator may not reverse), against the
simulator over HTTP. Read as any reversal failure, the refund was FAILED and the member texted that her refund
failed, when nothing was processed and only the gateway's configuration was wrong. It waits for the fix as a refund
whose credentials are refused when it is sent does: PENDING, its submission parked naming the initiator, the
operator told, and sent again once the configuration is fixed and the job replayed."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from aiohttp import web
from sqlalchemy import select, update

from core.config import ProviderConfig, Secret
from core.db import utcnow
from core.metrics import REGISTRY
from core.models import OutboxJob, ProviderEvent, Refund, SmsMessage
from core.outbox import replay_job, waiting
from core.ports import ProviderTimeout
from core.refunds import cancel_refund
from providers.mpesa import MpesaAdapter
from providers.mpesa.simulator import INITIATOR_NOT_ALLOWED, create_simulator
from providers.simulation import STATE, SimulatorOptions
from tests.conftest import drain
from tests.core.test_provider_faults_mpesa import _payment
from tests.core.test_refund_credentials_providers import Recorder, _refund
from tests.providers.wires import ADMIN, MPESA_CREDS, due_now, mpesa_payment

REVERSAL = "/mpesa/reversal/v1/request"


def _mpesa(rt: Any, base: str, http: httpx.AsyncClient, **creds: str) -> None:
    rt.providers = {**rt.providers, "mpesa": MpesaAdapter(http, ProviderConfig(
        base_url=base, credentials={k: Secret(v) for k, v in {**MPESA_CREDS, **creds}.items()},
        options={"shortcode": "174379"}))}


@contextlib.asynccontextmanager
async def _simulator(rt: Any, client: Any) -> AsyncIterator[tuple[web.Application, str]]:
    """The M-Pesa simulator served on its own port, its callbacks to the gateway under test: it and its base URL."""
    sim = create_simulator(SimulatorOptions(delay=0.05, credentials=MPESA_CREDS))
    runner = web.AppRunner(sim, handler_cancellation=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        rt.settings = dataclasses.replace(rt.settings, public_base_url=str(client.make_url("")).rstrip("/"))
        yield sim, f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(("initiator", "code"), [("an-old-initiator", "2001"), (INITIATOR_NOT_ALLOWED, "21")],
                         ids=["invalid_2001", "not_allowed_21"])
async def test_reversal_refused_for_the_initiator_waits_for_the_configuration(
        rt: Any, demo: dict[str, Any], worker: Any, client: Any, initiator: str, code: str) -> None:
    recorder = Recorder()
    async with _simulator(rt, client) as (sim, base):
        async with httpx.AsyncClient(event_hooks={"request": [recorder]}) as http:
            # The initiator rotated away at Safaricom: Daraja takes the reversal, and refuses it in its Result.
            refund_id = await _reversal_refused(rt, demo, worker, sim, base, http, initiator)
            assert len(recorder.bodies(REVERSAL)) == 1
            async with rt.sessionmaker() as s:
                refund = await s.get(Refund, refund_id)
                job = (await s.execute(select(OutboxJob).where(OutboxJob.dedupe_key == f"refund:{refund_id}"))
                       ).scalar_one()
                texts = (await s.execute(select(SmsMessage.body).where(SmsMessage.template.startswith("refund_")))
                         ).all()
                sms_jobs = (await s.execute(select(OutboxJob.dedupe_key).where(
                    OutboxJob.dedupe_key.like(f"%refund_failed:{refund_id}")))).scalars().all()
                [result] = (await s.execute(select(ProviderEvent).where(ProviderEvent.kind == "refund"))).scalars()
            # Not FAILED, nobody told the refund failed: it waits, unsent, for the configuration.
            assert refund.status == "PENDING", (refund.status, refund.failure_reason)
            assert refund.failure_reason is None
            assert not texts and not sms_jobs
            assert job.status == "PARKED", (job.status, job.last_error)
            assert "initiator" in (job.last_error or "") and f"ResultCode {code}" in (job.last_error or ""), \
                job.last_error
            assert (result.payload["ResultCode"], result.refund_id, result.outcome) == \
                (code, refund_id, "awaiting_configuration")
            assert REGISTRY.get_sample_value("gateway_provider_failing", {"provider": "mpesa"}) == 1

            _mpesa(rt, base, http)  # fixed
            async with rt.sessionmaker.begin() as s:
                assert await replay_job(s, job.id) is not None
            await drain(worker)
            await sim[STATE].idle()
            await drain(worker)
        async with rt.sessionmaker() as s:
            refund = await s.get(Refund, refund_id)
            texts = (await s.execute(select(SmsMessage.template).where(SmsMessage.template.startswith("refund_")))
                     ).scalars().all()
        assert len(recorder.bodies(REVERSAL)) == 2
        assert refund.status == "COMPLETED", (refund.status, refund.failure_reason)
        assert texts == ["refund_completed"]


async def _reversal_refused(rt: Any, demo: dict[str, Any], worker: Any, sim: Any, base: str, http: Any,
                            initiator: str) -> str:
    """An M-Pesa payment completed (the payer approves, the callback brings the receipt), then a refund of it whose
    reversal Daraja takes (ResponseCode 0) and refuses in its Result, `initiator` being refused; its id."""
    _mpesa(rt, base, http)
    payment = await mpesa_payment(rt, demo)
    await worker.run_once()
    await sim[STATE].idle()
    assert (await _payment(rt, payment.id)).status == "COMPLETED"
    _mpesa(rt, base, http, initiator=initiator)
    refund_id = await _refund(rt, demo, payment.id)
    await due_now(rt, "refund.submit")
    await drain(worker)
    await sim[STATE].idle()
    await drain(worker)
    return refund_id


async def _replayed_fixed(rt: Any, worker: Any, sim: Any, base: str, http: Any, refund_id: str) -> None:
    """The initiator fixed, the refund replayed; the replayed reversal's Result is lost."""
    _mpesa(rt, base, http)
    sim[STATE].options.drop_callback = True
    async with rt.sessionmaker.begin() as s:
        job = (await s.execute(select(OutboxJob).where(OutboxJob.dedupe_key == f"refund:{refund_id}"))).scalar_one()
        assert await replay_job(s, job.id) is not None
    await drain(worker)
    await sim[STATE].idle()


async def test_a_reversal_refused_for_the_initiator_can_be_withdrawn(
        rt: Any, demo: dict[str, Any], worker: Any, client: Any) -> None:
    """Nothing reached the member, so an admin may withdraw the refund instead of waiting for the configuration
    (a chargeback made meanwhile, say). Its parked submission was read as one parked for manual review (409 "check
    with the provider, then record its outcome"), and recording FAILED texted the member that her refund failed."""
    recorder = Recorder()
    async with _simulator(rt, client) as (sim, base):
        async with httpx.AsyncClient(event_hooks={"request": [recorder]}) as http:
            refund_id = await _reversal_refused(rt, demo, worker, sim, base, http, "an-old-initiator")
            async with rt.sessionmaker.begin() as s:
                withdrawn = await cancel_refund(s, rt, refund_id=refund_id, cooperative_id=demo["cooperative_id"],
                                                note="the member was paid back by hand", actor=ADMIN)
            assert (withdrawn.status, withdrawn.failure_reason) == \
                ("FAILED", "withdrawn by an admin: the member was paid back by hand")
            async with rt.sessionmaker() as s:
                job = (await s.execute(select(OutboxJob).where(OutboxJob.dedupe_key == f"refund:{refund_id}"))
                       ).scalar_one()
                texts = (await s.execute(select(SmsMessage.template).where(SmsMessage.template.startswith("refund_"))
                                         )).scalars().all()
                member_sms = (await s.execute(select(OutboxJob.dedupe_key).where(
                    OutboxJob.kind == "sms.send", OutboxJob.dedupe_key.like(f"%{refund_id}%")))).scalars().all()
            assert (job.status, job.last_error) == ("DONE", withdrawn.failure_reason)
            assert not texts and not member_sms
            # Replaying it now sends nothing.
            assert len(recorder.bodies(REVERSAL)) == 1


async def test_a_replayed_reversal_is_polled_again(rt: Any, demo: dict[str, Any], worker: Any, client: Any) -> None:
    """The refund sent again on replay waits for its Result with a status poll, as its first sending did: the poll
    that parks it for a person when the Result never comes. The first sending's poll, ended when the initiator was
    refused, kept its dedupe key: the second was never queued, and a replayed reversal whose Result was lost stayed
    PROCESSING for good, never put before anyone."""
    async with _simulator(rt, client) as (sim, base):
        async with httpx.AsyncClient() as http:
            refund_id = await _reversal_refused(rt, demo, worker, sim, base, http, "an-old-initiator")
            await _replayed_fixed(rt, worker, sim, base, http, refund_id)  # its Result lost
        async with rt.sessionmaker() as s:
            refund = await s.get(Refund, refund_id)
            polls = (await s.execute(select(OutboxJob.status).where(
                OutboxJob.kind == "refund.poll", OutboxJob.payload["refund_id"].as_string() == refund_id))
                     ).scalars().all()
        assert refund.status == "PROCESSING"
        assert "PENDING" in polls, polls


async def test_a_replayed_reversal_s_poll_is_not_waiting_after_its_first_sending_s_failure(
        rt: Any, demo: dict[str, Any], worker: Any, client: Any) -> None:
    """The first sending's poll, waiting after a failed status query (asked with the same refused initiator) when the
    refusal ended it, is queued again for the replayed reversal: a fresh poll at its planned time, not a job waiting
    after a failure. Before, it kept that mark: listed by GET /v1/jobs?waiting=true (afterFailure true, lastError
    null, attempts 0) and run now by POST /v1/jobs/replay {"waiting": true}."""
    async with _simulator(rt, client) as (sim, base):
        async with httpx.AsyncClient() as http:
            refund_id = await _reversal_refused(rt, demo, worker, sim, base, http, "an-old-initiator")
            polls = (OutboxJob.kind == "refund.poll", OutboxJob.dedupe_key == f"refund-poll:{refund_id}")
            async with rt.sessionmaker.begin() as s:
                # Its status query had failed before the Result came (the refusal ended it waiting for its retry).
                ended = await s.execute(update(OutboxJob).where(*polls, OutboxJob.status == "DONE").values(
                    after_failure=True))
                assert ended.rowcount == 1  # type: ignore[attr-defined]
            await _replayed_fixed(rt, worker, sim, base, http, refund_id)  # its Result lost
        async with rt.sessionmaker() as s:
            poll = (await s.execute(select(OutboxJob).where(*polls))).scalar_one()
            listed = (await s.execute(select(OutboxJob.id).where(*polls, waiting(utcnow())))).scalars().all()
        assert (poll.status, poll.attempts, poll.after_failure, poll.run_at > utcnow()) == ("PENDING", 0, False, True)
        assert listed == []


async def test_a_refusal_before_the_worker_commits_its_sending_is_applied(
        rt: Any, demo: dict[str, Any], worker: Any, client: Any) -> None:
    """Daraja's Result refusing the initiator arrives before the worker has written the refund PROCESSING (its
    answer to the reversal request taken, the worker's commit not yet made). It was stored "pending" for a refund
    still PENDING, and lost: the refund then waited PROCESSING for a Result already come, until its poll parked it
    for manual review a day later. It waits for the configuration as a refusal after that commit does."""
    async with _simulator(rt, client) as (sim, base):
        class ResultFirst(MpesaAdapter):
            async def request_refund(self, request: Any) -> Any:
                accepted = await super().request_refund(request)
                await sim[STATE].idle()  # its Result is handled before the worker goes on
                return accepted

        async with httpx.AsyncClient() as http:
            _mpesa(rt, base, http)
            payment = await mpesa_payment(rt, demo)
            await worker.run_once()
            await sim[STATE].idle()
            rt.providers = {**rt.providers, "mpesa": ResultFirst(http, ProviderConfig(
                base_url=base, credentials={k: Secret(v) for k, v in
                                            {**MPESA_CREDS, "initiator": "an-old-initiator"}.items()},
                options={"shortcode": "174379"}))}
            refund_id = await _refund(rt, demo, payment.id)
            await due_now(rt, "refund.submit")
            await drain(worker)
        async with rt.sessionmaker() as s:
            refund = await s.get(Refund, refund_id)
            job = (await s.execute(select(OutboxJob).where(OutboxJob.dedupe_key == f"refund:{refund_id}"))
                   ).scalar_one()
            polls = (await s.execute(select(OutboxJob.status).where(
                OutboxJob.kind == "refund.poll", OutboxJob.payload["refund_id"].as_string() == refund_id,
                OutboxJob.status.in_(("PENDING", "RUNNING"))))).scalars().all()
            [result] = (await s.execute(select(ProviderEvent).where(ProviderEvent.kind == "refund"))).scalars()
            sms_jobs = (await s.execute(select(OutboxJob.dedupe_key).where(
                OutboxJob.dedupe_key.like(f"%refund_failed:{refund_id}")))).scalars().all()
        assert (refund.status, refund.provider_transaction_id) == ("PENDING", None), refund.status
        assert job.status == "PARKED" and "initiator" in (job.last_error or ""), (job.status, job.last_error)
        assert not polls and not sms_jobs
        assert (result.refund_id, result.outcome) == (refund_id, "awaiting_configuration")
        async with rt.sessionmaker.begin() as s:  # and it can be withdrawn, as nothing was processed
            withdrawn = await cancel_refund(s, rt, refund_id=refund_id, cooperative_id=demo["cooperative_id"],
                                            note="paid back by hand", actor=ADMIN)
        assert withdrawn.status == "FAILED"


async def test_a_refusal_before_the_worker_commits_an_unanswered_sending_is_applied(
        rt: Any, demo: dict[str, Any], worker: Any, client: Any) -> None:
    """The same race when Daraja's answer to the reversal request never reached the worker (it timed out): the
    worker writes the refund PROCESSING with no id of the provider's, and the Result it kept was never applied,
    the refund waiting PROCESSING for a Result already come."""
    async with _simulator(rt, client) as (sim, base):
        class ResultFirstUnanswered(MpesaAdapter):
            async def request_refund(self, request: Any) -> Any:
                await super().request_refund(request)
                await sim[STATE].idle()  # its Result is handled before the worker goes on
                raise ProviderTimeout("mpesa: no answer in time")

        async with httpx.AsyncClient() as http:
            _mpesa(rt, base, http)
            payment = await mpesa_payment(rt, demo)
            await worker.run_once()
            await sim[STATE].idle()
            rt.providers = {**rt.providers, "mpesa": ResultFirstUnanswered(http, ProviderConfig(
                base_url=base, credentials={k: Secret(v) for k, v in
                                            {**MPESA_CREDS, "initiator": "an-old-initiator"}.items()},
                options={"shortcode": "174379"}))}
            refund_id = await _refund(rt, demo, payment.id)
            await due_now(rt, "refund.submit")
            await drain(worker)
        async with rt.sessionmaker() as s:
            refund = await s.get(Refund, refund_id)
            job = (await s.execute(select(OutboxJob).where(OutboxJob.dedupe_key == f"refund:{refund_id}"))
                   ).scalar_one()
            [result] = (await s.execute(select(ProviderEvent).where(ProviderEvent.kind == "refund"))).scalars()
        assert refund.status == "PENDING", refund.status
        assert job.status == "PARKED" and "initiator" in (job.last_error or ""), (job.status, job.last_error)
        assert (result.refund_id, result.outcome) == (refund_id, "awaiting_configuration")
