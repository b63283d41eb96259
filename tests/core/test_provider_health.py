"""A provider's outage seen by a worker is shown by any serve's /ops/data (providers.health).

gateway_provider_failing and the "calls failing" line live in the memory of the process that made the calls: the
ops page, answered by a serve, said nothing of MTN down while every worker's collect failed. Each process now
records its view in Redis with a TTL; the page reads every live process's view. The MTN MoMo simulator runs over
HTTP on 127.0.0.1 and is told to answer 500; the page is asked of a second app on its own runtime (its own Redis
and database clients), with the worker's memory forgotten first, as another process has none of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import select

from core.models import Payment
from core.payments import create_payment
from providers import calls
from providers import health as provider_health
from providers.simulation import STATE
from tests.admin_api.conftest import login, redis_unreachable, unreachable_redis
from tests.admin_api.test_retried_key_after_restore import mtn_simulator
from tests.conftest import drain
from tests.providers.wires import ADMIN, due_now, mtn_payment
from tests.web.conftest import page_client


def forget_this_process() -> None:
    """What another process knows of this one's calls: nothing (its memory is its own)."""
    calls._outages.clear()
    calls._seen.clear()


@contextlib.asynccontextmanager
async def another_serve(rt: Any, aiohttp_client: Any, demo: dict[str, Any]) -> AsyncIterator[Any]:
    """A second app on a runtime of its own (its own Redis and database clients), signed in: its /ops/data."""
    from app import open_runtime

    async with open_runtime(rt.settings) as other:
        client = await page_client(aiohttp_client, other, other.settings)
        token = (await login(client, *demo["admin"]))["accessToken"]

        async def ops_data() -> dict[str, Any]:
            resp = await client.get("/ops/data", headers={"Authorization": f"Bearer {token}"})
            body = await resp.json()
            assert resp.status == 200, body
            return body

        yield ops_data


def row(body: dict[str, Any], provider: str) -> dict[str, Any]:
    [found] = [r for r in body["providerHealth"]["providers"] if r["provider"] == provider]
    return found


async def until(check: Any, within: float = 10.0) -> Any:
    """Ask `check` until it answers truthy; `within` is patience for a loaded machine, not a bound tested."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        answer = await check()
        if answer or asyncio.get_running_loop().time() > deadline:
            return answer
        await asyncio.sleep(0.1)


async def pay(rt: Any, demo: dict[str, Any], count: int) -> list[str]:
    ids = []
    for i in range(count):
        async with rt.sessionmaker.begin() as s:
            payment, _ = await create_payment(s, rt, mtn_payment(demo, key=f"key-health-{i:04d}"), actor=ADMIN)
            ids.append(payment.id)
    return ids


async def test_mtn_failing_for_the_worker_shows_on_another_serve_then_ok_after_recovery(
        rt: Any, demo: dict[str, Any], worker: Any, aiohttp_server: Any, aiohttp_client: Any) -> None:
    stop = asyncio.Event()
    async with mtn_simulator(rt, aiohttp_server) as sim, another_serve(rt, aiohttp_client, demo) as ops_data:
        publisher = asyncio.create_task(provider_health.publish(rt.redis, stop=stop, role="worker",
                                                                process="worker-test"))
        try:
            sim[STATE].options.fail_request_500 = True
            await pay(rt, demo, calls.FAILING_AFTER)
            await drain(worker)  # five collects, each answered 500: MTN is down as the worker sees it

            async def failing() -> Any:
                body = await ops_data()
                return body if row(body, "mtn_momo")["status"] == "FAILING" else None

            body = await until(failing)
            assert body, "the worker's outage never showed on the other serve"
            # What the other serve read: the worker's record in Redis (the dead worker's test below reads it with
            # this process's memory emptied).
            record = json.loads(await rt.redis.get(provider_health.process_key("worker-test")))
            assert record["role"] == "worker" and record["providers"]["mtn_momo"]["failing"] is True
            mtn = row(body, "mtn_momo")
            assert mtn["status"] == "FAILING" and mtn["failingSince"] and mtn["processesFailing"] == 1
            assert mtn["lastError"]["class"] == "HTTP_500"
            assert mtn["lastError"]["summary"] == "request_to_pay: HTTP 500"
            assert body["providerHealth"]["redisReachable"] is True
            assert body["providerHealth"]["source"] == "all processes"
            # No phone number, credential or URL in what the page is given.
            shown = json.dumps(body["providerHealth"])
            assert "788000001" not in shown and "mtn-api-key" not in shown and "://" not in shown

            sim[STATE].options.fail_request_500 = False  # MTN back: the worker's next collect is answered
            await due_now(rt, "payment.collect")
            await drain(worker)

            async def ok() -> Any:
                body = await ops_data()
                return body if row(body, "mtn_momo")["status"] == "OK" else None

            body = await until(ok)
            assert body, "MTN answered again, and the page still said failing"
            mtn = row(body, "mtn_momo")
            assert mtn["failingSince"] is None and mtn["lastSuccessAt"] > mtn["lastError"]["at"]
        finally:
            stop.set()
            await publisher
    async with rt.sessionmaker() as s:
        statuses = (await s.execute(select(Payment.status))).scalars().all()
    assert len(statuses) == calls.FAILING_AFTER and set(statuses) <= {"PROCESSING", "COMPLETED"}
    # Stopped cleanly: its record went with it, not left to lapse.
    assert await rt.redis.get(provider_health.process_key("worker-test")) is None


async def test_a_dead_workers_failing_record_lapses(rt: Any, demo: dict[str, Any], aiohttp_client: Any) -> None:
    """A worker that dies reporting an outage (killed: no clean stop to remove its record) is forgotten once its
    record's TTL runs out; the provider is then UNKNOWN, not FAILING for ever."""
    for _ in range(calls.FAILING_AFTER):
        calls.call_failed("airtel", time.perf_counter(), error="UNREACHABLE",
                          summary="collect: cannot connect (ConnectError)")
    # A TTL long enough for a slow machine to read it first; cut short below, as time would.
    await provider_health.record(rt.redis, role="worker", process="dead-worker", ttl=60)
    forget_this_process()
    async with another_serve(rt, aiohttp_client, demo) as ops_data:
        body = await ops_data()
        airtel = row(body, "airtel")
        assert airtel["status"] == "FAILING" and airtel["lastError"]["class"] == "UNREACHABLE"
        assert body["providerHealth"]["processesReporting"] == 1
        assert 0 < await rt.redis.pttl(provider_health.process_key("dead-worker")) <= 60_000
        await rt.redis.pexpire(provider_health.process_key("dead-worker"), 200)

        async def lapsed() -> Any:
            body = await ops_data()
            return body if body["providerHealth"]["processesReporting"] == 0 else None

        body = await until(lapsed, within=5.0)
        assert body, "the dead worker's record never lapsed"
    # Airtel is configured: listed, as nothing any live process knows of (no error, no answer), not as OK.
    assert row(body, "airtel") == {"provider": "airtel", "status": "UNKNOWN", "failingSince": None,
                                   "processesFailing": 0, "processesReporting": 0, "lastError": None,
                                   "lastSuccessAt": None, "credentialsRefused": []}
    assert all(r["status"] == "UNKNOWN" for r in body["providerHealth"]["providers"]), body["providerHealth"]


async def test_a_serves_later_answer_supersedes_a_workers_stale_failing_view(rt: Any) -> None:
    """The worker does not probe: its outage lasts until its next call to the provider. Another process's answer
    since its last failure says the provider is back; a refusal of our credentials is not ended so."""
    for _ in range(calls.FAILING_AFTER):
        calls.call_failed("mpesa", time.perf_counter(), error="HTTP_503", summary="stk_push: HTTP 503")
    await provider_health.record(rt.redis, process="worker-1")
    forget_this_process()
    calls.call_answered("mpesa", "stk_push")
    await provider_health.record(rt.redis, process="serve-1")
    [mpesa] = provider_health.summarize(await provider_health.views(rt.redis), ["mpesa"])
    assert (mpesa["status"], mpesa["processesReporting"], mpesa["lastError"]["class"]) == ("OK", 2, "HTTP_503")

    forget_this_process()
    calls.credentials_refused("mpesa", "reversal", "Initiator information is invalid")
    await provider_health.record(rt.redis, process="worker-1")
    [mpesa] = provider_health.summarize(await provider_health.views(rt.redis), ["mpesa"])
    assert (mpesa["status"], mpesa["credentialsRefused"]) == ("FAILING", ["reversal"])
    assert mpesa["lastError"] == {"class": "CREDENTIALS_REFUSED", "summary": "reversal: credentials refused",
                                  "at": mpesa["lastError"]["at"]}
    assert "Initiator" not in json.dumps(mpesa)  # the provider's own words stay in the log line


async def test_with_redis_down_a_collect_goes_through_and_the_page_says_this_process_only(
        rt: Any, demo: dict[str, Any], worker: Any, aiohttp_server: Any, aiohttp_client: Any,
        caplog: pytest.LogCaptureFixture) -> None:
    """Recording is the publisher's, not the call's: with Redis down the worker's collect reaches MTN and is
    taken, the publisher says once that it cannot record (no traceback, not once a cycle), and the page says
    Redis cannot be reached and shows only what this process saw, said so: MTN answered it, the providers it
    never called are not known (not OK)."""
    stop = asyncio.Event()
    dead = unreachable_redis()
    client = await page_client(aiohttp_client, rt, rt.settings)
    token = (await login(client, *demo["admin"]))["accessToken"]
    caplog.set_level(logging.INFO, logger="gateway.provider_health")
    async with mtn_simulator(rt, aiohttp_server) as sim:
        publisher = asyncio.create_task(provider_health.publish(dead, stop=stop, role="worker", every=0.3,
                                                                process="worker-no-redis"))
        try:
            [payment_id] = await pay(rt, demo, 1)
            async with redis_unreachable(rt):
                await drain(worker)
                await asyncio.sleep(1.5)  # several of the publisher's cycles
        finally:
            stop.set()
            await publisher
            await dead.aclose()
        assert sim[STATE].requests == 1
    async with rt.sessionmaker() as s:
        assert (await s.get(Payment, payment_id)).status in ("PROCESSING", "COMPLETED")
    said = [r for r in caplog.records if r.name == "gateway.provider_health"]
    assert [r.getMessage() for r in said] == [
        "could not record provider health in Redis (said once until it works again)"]
    assert not said[0].exc_info and said[0].levelno == logging.WARNING
    assert calls.health_view()["mtn_momo"]["lastSuccessAt"]  # the call itself was noted, in memory

    async with redis_unreachable(rt):
        resp = await client.get("/ops/data", headers={"Authorization": f"Bearer {token}"})
        body = await resp.json()
    assert resp.status == 200, body
    health = body["providerHealth"]
    assert (health["redisReachable"], health["processesReporting"], health["source"]) == (
        False, None, "this process only")
    mtn = row(body, "mtn_momo")
    assert (mtn["status"], mtn["processesReporting"], mtn["lastError"]) == ("OK", 1, None)
    assert {r["status"] for r in health["providers"] if r["provider"] != "mtn_momo"} == {"UNKNOWN"}


async def test_with_redis_down_mtn_failing_in_this_process_shows_failing(
        rt: Any, demo: dict[str, Any], worker: Any, aiohttp_server: Any, aiohttp_client: Any) -> None:
    """Redis down and MTN answering 500 to this process's collects: /ops/data said every provider was unknown
    (providers null) though this process knew MTN was failing. It now shows this process's own view, marked
    "this process only", with Redis not answering: MTN FAILING since its first failure, and its last error."""
    client = await page_client(aiohttp_client, rt, rt.settings)
    token = (await login(client, *demo["admin"]))["accessToken"]
    async with mtn_simulator(rt, aiohttp_server) as sim:
        sim[STATE].options.fail_request_500 = True
        await pay(rt, demo, calls.FAILING_AFTER)
        async with redis_unreachable(rt):
            await drain(worker)  # five collects, each answered 500, with no Redis to record them in
            assert sim[STATE].requests == calls.FAILING_AFTER
            resp = await client.get("/ops/data", headers={"Authorization": f"Bearer {token}"})
            body = await resp.json()
    assert resp.status == 200, body
    health = body["providerHealth"]
    mtn = row(body, "mtn_momo")
    assert (mtn["status"], mtn["processesFailing"], mtn["processesReporting"]) == ("FAILING", 1, 1)
    assert (health["redisReachable"], health["processesReporting"], health["source"]) == (
        False, None, "this process only")
    assert mtn["failingSince"] == calls.health_view()["mtn_momo"]["failingSince"]
    assert mtn["lastError"]["class"] == "HTTP_500" and mtn["lastError"]["summary"] == "request_to_pay: HTTP 500"
    assert "://" not in json.dumps(health) and "788000001" not in json.dumps(health)

    # Redis back: the rows are every live process's records again (none here: no publisher ran), said so.
    resp = await client.get("/ops/data", headers={"Authorization": f"Bearer {token}"})
    health = (await resp.json())["providerHealth"]
    assert (health["redisReachable"], health["processesReporting"], health["source"]) == (True, 0, "all processes")
    assert {r["status"] for r in health["providers"]} == {"UNKNOWN"}


async def test_recording_works_again_once_redis_is_back(rt: Any, caplog: pytest.LogCaptureFixture) -> None:
    """One line when Redis is lost, one when recording works again; the record is then there."""
    caplog.set_level(logging.INFO, logger="gateway.provider_health")
    dead = unreachable_redis()
    target: dict[str, Any] = {"redis": dead}

    class Switch:
        def __getattr__(self, name: str) -> Any:
            return getattr(target["redis"], name)

    stop = asyncio.Event()
    publisher = asyncio.create_task(provider_health.publish(Switch(), stop=stop, role="serve", every=0.2,
                                                            process="serve-back"))

    async def warned() -> bool:  # the publisher has tried, and failed, at least once (not a time guessed for it)
        return any(r.name == "gateway.provider_health" for r in caplog.records)

    assert await until(warned)
    target["redis"] = rt.redis
    calls.call_answered("irembopay")  # a change: recorded at the next turn

    async def recorded() -> Any:
        return await rt.redis.get(provider_health.process_key("serve-back"))

    assert await until(recorded, within=5.0)
    stop.set()
    await publisher
    await dead.aclose()
    assert [r.getMessage() for r in caplog.records if r.name == "gateway.provider_health"] == [
        "could not record provider health in Redis (said once until it works again)",
        "recording provider health in Redis works again"]


def test_another_process_answered_in_the_same_millisecond_as_a_failure_ends_it() -> None:
    """Timestamps are to the millisecond: a serve's answer in the same millisecond as the worker's last failure
    (a test doing both at once, or two busy processes) says the provider answered then. Read as older, the row
    stayed FAILING, and the test above failed now and then on a fast machine."""
    at = "2026-12-06T10:00:00.123Z"
    worker = {"process": "worker-1", "providers": {"mpesa": {
        "failing": True, "failingSince": "2026-12-06T09:59:00Z", "lastFailureAt": at, "lastError": "HTTP_503",
        "lastErrorSummary": "stk_push: HTTP 503", "lastSuccessAt": None, "credentialsRefused": []}}}
    serve = {"process": "serve-1", "providers": {"mpesa": {
        "failing": False, "failingSince": None, "lastFailureAt": None, "lastError": None, "lastErrorSummary": None,
        "lastSuccessAt": at, "credentialsRefused": []}}}
    [mpesa] = provider_health.summarize([worker, serve], ["mpesa"])
    assert (mpesa["status"], mpesa["processesFailing"], mpesa["lastSuccessAt"]) == ("OK", 0, at)
