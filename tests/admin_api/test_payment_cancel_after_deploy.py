"""Review of POST /v1/payments/{id}/cancel (rev2): the watch after a cancel must survive a rolling deploy (a worker
of the previous release beside the new one) and a provider's status lookup that is behind (MTN answering 404 for a
request it accepted): money taken after the cancel is never dropped."""

from __future__ import annotations

import importlib
import importlib.util
import re
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from core.models import OutboxJob, Payment
from core.outbox import Job, RetryLater
from core.ports import ProviderError
from providers.mtn_momo.simulator import TRANSACTIONS
from providers.simulation import STATE
from tests.admin_api.conftest import Caller, make_payment
from tests.admin_api.test_payment_cancel import MEMBER, NOTE, _prompt, interactive_mtn
from tests.conftest import drain
from tests.providers.wires import due_now

PREVIOUS_RELEASE = "b0e66c7"  # the release this one is deployed over


# core.payments as the previous release had it, before it was split by concept: its names now live in these.
_PAYMENTS_THEN = ("core.payments", "core.transaction_ids", "core.unmatched_callbacks", "core.provider_events",
                  "core.recorded_payments")


def _previous_jobs_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """core/jobs.py as the previous release has it, loaded beside this release's modules (what an old worker
    still running during a rolling deploy executes). Its `core.payments` imports (at the top and inside
    functions) are served one module holding every name the split modules hold."""
    root = Path(__file__).resolve().parents[2]
    try:
        source = subprocess.run(["git", "show", f"{PREVIOUS_RELEASE}:core/jobs.py"], cwd=root, check=True,
                                capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"the previous release {PREVIOUS_RELEASE} is not in this checkout")
    then = types.ModuleType("previous_release_payments")
    for name in _PAYMENTS_THEN:
        then.__dict__.update({k: v for k, v in vars(importlib.import_module(name)).items() if not k.startswith("__")})
    monkeypatch.setitem(sys.modules, then.__name__, then)
    path = tmp_path / "previous_jobs.py"
    path.write_text(re.sub(r"\bcore\.payments\b", then.__name__, source))
    spec = importlib.util.spec_from_file_location("previous_release_jobs", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(spec.name, None)
    return module


async def test_a_worker_of_the_previous_release_does_not_end_the_watch_after_a_cancel(
        admin: Caller, rt: Any, demo: dict[str, Any], worker: Any, aiohttp_server: Any, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """During a rolling deploy a worker of the previous release claims the watch job (its kind is payment.poll,
    which that worker handles, and its `cancelled` payload key means nothing to it): it finds the payment
    CANCELLED, not open, and returns; the job is DONE, nobody asks MTN again, and the member's approval (MTN's
    callback lost) is never recorded. The watch job must be one the previous release hands back (a kind it has
    no handler for: core.outbox hands those back for a worker that has it), or its handler must not finish it."""
    previous = _previous_jobs_module(tmp_path, monkeypatch)
    async with interactive_mtn(rt, aiohttp_server) as (app, base), httpx.AsyncClient() as http:
        made = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
        await drain(worker)  # the collect job: MTN prompts the member
        prompt = await _prompt(http, base, MEMBER)
        await admin.json("POST", f"/v1/payments/{made['id']}/cancel", 200, json={"note": NOTE})
        await http.post(f"{base}/_control/decide", json={"reference": prompt["reference"], "approve": True})
        await app[STATE].idle()
        [taken] = app[TRANSACTIONS].values()
        assert taken["status"] == "SUCCESSFUL"  # MTN took her money; its callback is dropped
        async with rt.sessionmaker() as s:
            # The watch the cancel queued (its dedupe key names the payment and the cancel).
            [row] = (await s.execute(select(OutboxJob).where(
                OutboxJob.dedupe_key.like(f"%{made['id']}%cancel%"), OutboxJob.status == "PENDING"))).scalars()
        old_handlers = previous.job_handlers(rt)
        if row.kind in old_handlers:
            # The old worker runs it: it must keep the job (RetryLater) or complete the payment.
            job = Job(row.id, row.kind, dict(row.payload), 1, row.max_attempts, row.created_at)
            kept = False
            try:
                await old_handlers[row.kind](job)
            except RetryLater:
                kept = True
            async with rt.sessionmaker() as s:
                stored = await s.get(Payment, made["id"])
            assert stored is not None
            assert kept or stored.status == "COMPLETED", (
                f"a previous-release worker finished the watch job ({row.kind}, {row.payload}) with the payment "
                f"{stored.status}: the money MTN took after the cancel is never recorded")


class _LookupBehind:
    """MTN whose status lookup is behind (degraded, it answers 404 for requests it holds): NOT_FOUND for the first
    `misses` status queries, then MTN's own answer."""

    def __init__(self, inner: Any, misses: int) -> None:
        self._inner = inner
        self.misses = misses

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def collection_status(self, *args: Any, **kwargs: Any) -> Any:
        if self.misses > 0:
            self.misses -= 1
            raise ProviderError("MTN status: 404 RESOURCE_NOT_FOUND", retryable=False, code="NOT_FOUND")
        return await self._inner.collection_status(*args, **kwargs)


async def test_a_request_accepted_after_the_cancel_is_still_watched_when_the_lookup_says_not_found(
        admin: Caller, rt: Any, demo: dict[str, Any], worker: Any, aiohttp_server: Any) -> None:
    """Cancelled while PENDING, its request on its way: MTN accepts it (202) after the cancel, so the prompt is on
    the member's phone. The watch's first status query meets MTN's lookup behind (404): the watch takes that for
    "never sent" (its payload says PENDING and no collect job runs any more) and ends, although the request was
    accepted; the open-payment poll treats the same 404 for an accepted request as no answer. The member then
    approves, MTN's callback is lost, and the money is never recorded."""
    async with interactive_mtn(rt, aiohttp_server, hang=0.5) as (app, base), httpx.AsyncClient() as http:
        import asyncio

        made = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
        collecting = asyncio.create_task(drain(worker))
        prompt = await _prompt(http, base, MEMBER)  # MTN has the request; its 202 is not back yet
        await admin.json("POST", f"/v1/payments/{made['id']}/cancel", 200, json={"note": NOTE})
        await collecting  # the 202 arrives: accepted after the cancel (the payment stays CANCELLED)
        rt.providers = {**rt.providers, "mtn_momo": _LookupBehind(rt.providers["mtn_momo"], misses=1)}
        await due_now(rt, "payment.poll")
        await due_now(rt, "payment.watch")
        await drain(worker)  # the watch: 404 from MTN's lookup
        await http.post(f"{base}/_control/decide", json={"reference": prompt["reference"], "approve": True})
        await app[STATE].idle()
        [taken] = app[TRANSACTIONS].values()
        assert taken["status"] == "SUCCESSFUL"
        await due_now(rt, "payment.poll")
        await due_now(rt, "payment.watch")
        await drain(worker)
    done = await admin.json("GET", f"/v1/payments/{made['id']}", 200)
    assert (done["status"], done["late"]) == ("COMPLETED", True), (
        f"money MTN took after the cancel was dropped: the payment is {done['status']}")
