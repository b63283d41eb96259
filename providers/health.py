"""Each process's view of the providers' health, kept in Redis where every process reads it: the ops page shows an
outage a worker sees (a provider failing since when, the last error) from any serve.

providers.calls keeps each process's view in its memory (gateway_provider_failing, per process); a serve answering
/ops/data never made the worker's calls. So every serve and worker records its view (providers.calls.health_view) in
one key of its own, `ops:{providerhealth}:process:<process>`, with a TTL: rewritten at each change (at most once a
second) and every HEALTH_EVERY seconds besides, so a process that dies leaves no "failing" behind past HEALTH_TTL,
and one that stops cleanly takes its record away at once. An index of the processes (a sorted set, scored by when
each record lapses) is read, then the records in one MGET: one hash tag for every key, so both work on Redis
Cluster too (one slot). Redis down costs the provider calls nothing: they only note what they saw in memory; the
publisher says once that it cannot record, and once that it can again. While Redis cannot be read the page shows
the serving process's own view, marked as this process's only (SOURCE_THIS_PROCESS): an outage it saw (its own
calls: all of them under `run`, whose worker is in the serve) still shows as FAILING, rather than every provider
UNKNOWN at the hour an operator most needs to know.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Iterable
from typing import Any

from redis.exceptions import RedisError

from core.outbox import process_id
from providers import calls

log = logging.getLogger("gateway.provider_health")

KEY_PREFIX = "ops:{providerhealth}"
INDEX_KEY = f"{KEY_PREFIX}:processes"
HEALTH_EVERY = 10.0  # seconds between a process's records while nothing changes (its heartbeat)
HEALTH_TTL = 45  # seconds a record outlives its process: several heartbeats, so a slow Redis drops none
MIN_GAP = 1.0  # seconds between two records of one process: an outage changes the view at every failed call
RECORD_TIMEOUT = 2.0  # seconds: a hung Redis must not hold the publisher past a few heartbeats
MAX_PROCESSES = 500  # records read at most (the index is cleaned as it is written; this bounds a page's read)
# Who this process is, in its key: unique per start (a restarted process on the same host and pid is another).
PROCESS = process_id()
# Where /ops/data's rows come from (its `source`): every live process's record in Redis, or, while Redis cannot be
# read, the serving process's memory alone (the other serves' and the workers' views are not known then).
SOURCE_ALL = "all processes"
SOURCE_THIS_PROCESS = "this process only"


def process_key(process: str) -> str:
    return f"{KEY_PREFIX}:process:{process}"


async def record(redis: Any, *, role: str = "process", process: str = PROCESS, ttl: int = HEALTH_TTL,
                 view: dict[str, dict[str, Any]] | None = None) -> None:
    """Write this process's view (providers.calls.health_view unless `view`) under its key for `ttl` seconds, in
    the index, and drop from the index the records lapsed long ago. One round trip. Raises when Redis does."""
    body = json.dumps({"process": process, "role": role, "providers": calls.health_view() if view is None else view},
                      separators=(",", ":"))
    now = time.time()
    pipe = redis.pipeline(transaction=False)
    pipe.set(process_key(process), body, ex=ttl)
    pipe.zadd(INDEX_KEY, {process: now + ttl})
    pipe.zremrangebyscore(INDEX_KEY, "-inf", now - HEALTH_TTL)
    pipe.expire(INDEX_KEY, max(ttl, HEALTH_TTL) * 2)  # every process gone: the index goes too
    await pipe.execute()


async def forget(redis: Any, *, process: str = PROCESS) -> None:
    """A process stopping cleanly: its record goes at once (a rolling deploy leaves no old worker's view behind)."""
    pipe = redis.pipeline(transaction=False)
    pipe.delete(process_key(process))
    pipe.zrem(INDEX_KEY, process)
    await pipe.execute()


async def publish(redis: Any, *, stop: asyncio.Event, role: str, every: float = HEALTH_EVERY, ttl: int = HEALTH_TTL,
                  process: str = PROCESS) -> None:
    """Run for the life of a serve or worker: record this process's view at each change (at most once every
    MIN_GAP seconds) and every `every` seconds, until `stop`; then forget it. Redis out of reach is said once (one
    line, no traceback), and once more when recording works again; the provider calls never wait for it."""
    changed = asyncio.Event()
    calls.listen(changed)
    failing = False
    try:
        while not stop.is_set():
            changed.clear()
            try:
                await asyncio.wait_for(record(redis, role=role, process=process, ttl=ttl), timeout=RECORD_TIMEOUT)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis down, hung or refusing writes: the page says providers are unknown
                if not failing:
                    log.warning("could not record provider health in Redis (said once until it works again)",
                                extra={"error": type(exc).__name__})
                failing = True
            else:
                if failing:
                    log.info("recording provider health in Redis works again")
                failing = False
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(MIN_GAP):
                    await stop.wait()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, every - MIN_GAP)):
                    await _either(stop, changed)
    finally:
        calls.ignore(changed)
    with contextlib.suppress(Exception):
        await asyncio.wait_for(forget(redis, process=process), timeout=RECORD_TIMEOUT)


async def _either(*events: asyncio.Event) -> None:
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


async def views(redis: Any) -> list[dict[str, Any]]:
    """The records of the processes alive (a record whose key lapsed is gone from the MGET's answer). Raises when
    Redis does."""
    processes = await redis.zrange(INDEX_KEY, 0, MAX_PROCESSES - 1)
    if not processes:
        return []
    names = [p.decode() if isinstance(p, bytes) else str(p) for p in processes]
    out = []
    for raw in await redis.mget([process_key(name) for name in names]):
        if raw is None:
            continue
        try:
            body = json.loads(raw)
        except ValueError:
            continue
        if isinstance(body, dict) and isinstance(body.get("providers"), dict):
            out.append(body)
    return out


def summarize(records: list[dict[str, Any]], providers: Iterable[str]) -> list[dict[str, Any]]:
    """One row per provider (`providers`, and any a process reported): its status across the processes.

    FAILING: a process reports an outage (gateway_provider_failing 1 there) that no process has seen answered
    since: a worker's outage outlives the provider's recovery until its next call to it, and a later answer to
    another process (a serve, another worker) says the provider is back. Not so for refused credentials, which
    an answer to another operation does not end (providers.calls.Outage.refused). OK: no outage and some process
    had an answer from it. UNKNOWN: no live process has had an answer from it nor reports it failing (no call
    since the processes started, or fewer failures in a row than an outage takes)."""
    reported: dict[str, list[dict[str, Any]]] = {}
    for body in records:
        for provider, entry in body["providers"].items():
            if isinstance(entry, dict):
                reported.setdefault(provider, []).append(entry)
    rows = []
    for provider in sorted(set(providers) | set(reported)):
        entries = reported.get(provider, [])
        successes = [e["lastSuccessAt"] for e in entries if e.get("lastSuccessAt")]
        last_success = max(successes) if successes else None
        # A process's own answers all came before its outage (one ends it): only the others' can supersede it. One
        # in the same millisecond as its last failure does too: the provider answered someone then.
        failing = [e for e in entries if e.get("failing") and (e.get("credentialsRefused") or not any(
            other is not e and other.get("lastSuccessAt") and other["lastSuccessAt"] >= (e.get("lastFailureAt") or "")
            for other in entries))]
        failures = [e for e in entries if e.get("lastFailureAt")]
        last = max(failures, key=lambda e: e["lastFailureAt"]) if failures else None
        status = "FAILING" if failing else "OK" if last_success else "UNKNOWN"
        rows.append({
            "provider": provider,
            "status": status,
            "failingSince": min(e.get("failingSince") or e["lastFailureAt"] for e in failing) if failing else None,
            "processesFailing": len(failing),
            "processesReporting": len(entries),
            "lastError": None if last is None else {"class": last.get("lastError"),
                                                    "summary": last.get("lastErrorSummary"),
                                                    "at": last["lastFailureAt"]},
            "lastSuccessAt": last_success,
            "credentialsRefused": sorted({op for e in failing for op in e.get("credentialsRefused") or ()}),
        })
    return rows


async def shown(redis: Any, providers: Iterable[str]) -> dict[str, Any]:
    """What /ops/data shows: whether Redis answered, how many processes report in it, where the rows come from
    (`source`), and a row per provider. While Redis cannot be read: the rows of this process's own view
    (providers.calls.health_view), `source` SOURCE_THIS_PROCESS and `processesReporting` null (how many report is
    not known). A provider failing for this process shows FAILING; one it has not called is UNKNOWN, not "OK"."""
    try:
        records = await views(redis)
    except (RedisError, OSError, TimeoutError) as exc:
        log.warning("provider health unavailable: Redis unreachable", extra={"error": type(exc).__name__})
        own = {"process": PROCESS, "providers": calls.health_view()}
        return {"redisReachable": False, "processesReporting": None, "source": SOURCE_THIS_PROCESS,
                "providers": summarize([own], providers)}
    return {"redisReachable": True, "processesReporting": len(records), "source": SOURCE_ALL,
            "providers": summarize(records, providers)}
