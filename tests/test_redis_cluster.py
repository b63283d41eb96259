"""The service on a real Redis Cluster (REDIS_CLUSTER=1): three masters from the redis-server binary, PostgreSQL
as usual. Every Redis feature the service uses that a cluster client handles differently goes through it here:
scripts (EVAL) and pipelines over hash-tagged keys, keyless commands (PING, INFO, CONFIG GET, FLUSHDB), and each
kind of key lands on the node its slot says."""

from __future__ import annotations

import shutil
import subprocess
import sys
import uuid
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from redis.asyncio.cluster import RedisCluster
from sqlalchemy import func, select

from admin_api.auth_routes import FAILED_PER_ADDRESS
from channels.ussd import sessions
from core import auth, ops
from core.db import utcnow
from core.models import OutboxJob, Payment, UssdSession
from core.phone import normalize
from core.ports import CallbackRejected
from core.ratelimit import Limit, effective_count
from core.reference_mark import HIGH_WATER_KEY, ReferenceWatch
from tests.channels.ussd.helpers import AtPhone
from tests.conftest import make_settings, readiness, requires_pg
from tests.redis_cluster import Cluster, start_cluster

pytestmark = [
    requires_pg,
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs the redis-server binary"),
]

ROOT = Path(__file__).resolve().parent.parent  # where main.py is
EN_MTN = "+250788000002"  # Jean Bosco, English, MTN (core.demo)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    yield from start_cluster(masters=3)


@pytest.fixture
def settings(migrated_database: str, cluster: Cluster) -> Any:
    # Limits halved (RATE_LIMIT_MULTIPLIER): a 429 comes within fewer requests.
    return make_settings(REDIS_URL=cluster.url, REDIS_CLUSTER="1", RATE_LIMIT_MULTIPLIER="0.5")


def option(screen: str, label: str) -> str:
    for line in screen[4:].split("\n"):
        number, _, text = line.partition(". ")
        if label in text and number.isdigit():
            return number
    raise AssertionError(f"{label!r} not offered in {screen!r}")


async def test_the_runtime_talks_to_the_cluster_and_spreads_keys_over_its_nodes(rt: Any, cluster: Cluster) -> None:
    assert isinstance(rt.redis, RedisCluster)
    nodes = {(n.host, n.port) for n in rt.redis.get_primaries()}
    assert nodes == {("127.0.0.1", port) for port in cluster.ports}
    # Keys of other slots are written where they belong, not refused with MOVED.
    keys = [f"probe:{{{i}}}" for i in range(30)]
    for key in keys:
        await rt.redis.set(key, b"x")
    holders = {cluster.port_of(key) for key in keys}
    assert holders == set(cluster.ports)
    assert all(cluster.held_by(cluster.port_of(key), key) == b"x" for key in keys)


async def test_a_ussd_payment_session_end_to_end(client: Any, rt: Any, demo: Any, cluster: Cluster) -> None:
    """Language, resume offer and pay, through POST /ussd/africastalking: the session, the phone's resume route
    and language keys and the hour's funnel counters are written (scripts and pipelines) on their own nodes."""
    phone = normalize(EN_MTN)
    lang_key, route_key = sessions.phone_keys(rt.cipher.blind_index(phone.e164))

    # The member picks French: remembered in the phone's language key.
    first = AtPhone(client, EN_MTN)
    home = await first.dial()
    assert home.startswith("CON Welcome to Kigali Heights Housing Cooperative")
    languages = await first.send(option(home, "Language"))
    assert (await first.send(option(languages, "Francais"))).startswith("CON Bienvenue")

    # A session dropped on the confirmation screen leaves a resume route on the phone's node.
    dropped = AtPhone(client, EN_MTN)
    home = await dropped.dial()
    assert home.startswith("CON Bienvenue")
    types = await dropped.send("1")
    confirm = await dropped.send(option(types, "Water"))
    assert confirm.startswith("CON ") and "PAY_" in confirm
    assert cluster.held_by(cluster.port_of(route_key), route_key) is not None
    session_key = sessions.session_key("africastalking", dropped.session_id)
    assert cluster.held_by(cluster.port_of(session_key), session_key) is not None

    # The next dial offers to resume; continuing shows the same confirmation, and confirming pays.
    again = AtPhone(client, EN_MTN)
    offer = await again.dial()
    assert offer.startswith("CON ") and "1. " in offer and offer != home
    assert await again.send("1") == confirm
    done = await again.send("1")
    assert done.startswith("END ") and "PAY_" in done

    async with rt.sessionmaker() as s:
        payments = list((await s.execute(select(Payment))).scalars())
        jobs = (await s.execute(select(func.count()).select_from(OutboxJob)
                                .where(OutboxJob.kind == "payment.collect"))).scalar_one()
        ussd_rows = list((await s.execute(select(UssdSession).where(
            UssdSession.session_id == again.session_id))).scalars())
    assert len(payments) == 1 and jobs == 1
    payment = payments[0]
    assert (payment.status, payment.amount_minor, payment.currency, payment.channel) == (
        "PENDING", 5_000, "RWF", "ussd")
    assert payment.member_id == demo["members"][EN_MTN]
    assert payment.idempotency_key == f"ussd:africastalking:{again.session_id}" and payment.reference in done
    assert [(r.status, r.payment_id) for r in ussd_rows] == [("Success", payment.id)]
    # Paid: the route is gone (its node says so), the language stays; the funnel counted the payment.
    assert cluster.held_by(cluster.port_of(route_key), route_key) is None
    assert cluster.held_by(cluster.port_of(lang_key), lang_key) == b"fr"
    funnel = {row["step"]: row["reached"] for row in await ops.ussd_funnel(rt.redis, None, utcnow())}
    assert max(funnel.values()) >= 3 and min(funnel.values()) >= 1, funnel


@pytest.mark.usefixtures("limiter_clock")
async def test_api_rate_limit_answers_429_and_a_revoked_token_is_refused(client: Any, rt: Any, demo: Any,
                                                                          cluster: Cluster) -> None:
    resp = await client.post("/v1/auth/token", json={"username": demo["admin"][0], "password": demo["admin"][1]})
    assert resp.status == 200, await resp.text()
    token = (await resp.json())["accessToken"]
    headers = {"Authorization": f"Bearer {token}"}
    reads = effective_count(Limit("payments:read", 100), 0.5)  # admin_api.routing: 100 reads a minute, halved
    statuses = [(await client.get("/v1/payments", headers=headers)).status for _ in range(reads + 1)]
    assert statuses == [200] * reads + [429], statuses
    refused = await client.get("/v1/payments", headers=headers)
    assert refused.status == 429 and int(refused.headers["Retry-After"]) >= 1

    # Sign-in attempts: the in-flight set and both windows in one script (one hash tag, one node).
    for _ in range(effective_count(FAILED_PER_ADDRESS, 0.5)):
        wrong = await client.post("/v1/auth/token", json={"username": demo["tenant"][0], "password": "guess"})
        assert wrong.status == 401
    locked = await client.post("/v1/auth/token", json={"username": demo["tenant"][0],
                                                        "password": demo["tenant"][1]})
    assert locked.status == 429

    # The revocation mark: written on the node of the user's tag, read with the limit in one script.
    user_id = str(auth.decode_token(token, secret=rt.settings.jwt_secret.get(), expected_type="access")["sub"])
    await auth.revoke_tokens(rt.redis, user_id, ttl_seconds=rt.settings.jwt_ttl_seconds)
    mark = auth.revoked_key(user_id)
    assert cluster.held_by(cluster.port_of(mark), mark) is not None
    assert cluster.port_of(mark) == cluster.port_of(f"rl:{auth.subject_tag(f'user:{user_id}')}:x")
    # Past the minute's limit the answer is still 429; once the mark is there the token is refused as revoked
    # first (401), whatever the limit says.
    after = await client.get("/v1/payments", headers=headers)
    assert after.status == 401, await after.text()


async def test_callback_replay_key_is_used_once(rt: Any, cluster: Cluster) -> None:
    from providers.irembopay import redis_nonce_store
    from tests.providers.test_irembopay import PAID, adapter_at, signed

    body = {**PAID, "data": {**PAID["data"], "paymentReference": uuid.uuid4().hex}}
    callback = signed(body)
    key = "nonce:{irembopay}:" + callback.headers["irembopay-signature"].split("s=")[1]
    await adapter_at(nonce_store=redis_nonce_store(rt.redis)).verify_callback(callback)
    with pytest.raises(CallbackRejected) as err:  # another process, same cluster
        await adapter_at(nonce_store=redis_nonce_store(rt.redis)).verify_callback(callback)
    assert err.value.status == 409
    assert cluster.held_by(cluster.port_of(key), key) == b"1"


async def test_provider_health_records_are_written_and_read_on_one_node(rt: Any, cluster: Cluster) -> None:
    """Each process's record and the index of them share a hash tag: the pipeline that writes them and the MGET
    that reads them work on a cluster (one slot, one node)."""
    from providers import calls
    from providers import health as provider_health

    calls.call_answered("airtel")
    await provider_health.record(rt.redis, process="cluster-worker-1")
    await provider_health.record(rt.redis, process="cluster-worker-2")
    [airtel] = provider_health.summarize(await provider_health.views(rt.redis), ["airtel"])
    assert (airtel["status"], airtel["processesReporting"]) == ("OK", 2)
    key = provider_health.process_key("cluster-worker-1")
    assert cluster.port_of(key) == cluster.port_of(provider_health.INDEX_KEY)
    await provider_health.forget(rt.redis, process="cluster-worker-1")
    assert len(await provider_health.views(rt.redis)) == 1


async def test_reference_high_water_mark_and_readiness(client: Any, rt: Any, demo: Any, cluster: Cluster) -> None:
    from core.references import next_reference

    async with rt.sessionmaker.begin() as s:
        await next_reference(s, "PAY")
        await next_reference(s, "PAY")
    at = await ReferenceWatch().check(rt)
    assert at is not None and at.issued >= 2 and not at.behind
    assert int(cluster.held_by(cluster.port_of(HIGH_WATER_KEY), HIGH_WATER_KEY) or 0) == at.issued

    status, body = await readiness(client)
    assert (status, body) == (200, {"status": "ok", "checks": {"database": "ok", "redis": "ok"}})
    # Each master took a write (a full one refuses its own slots' writes only).
    for port in cluster.ports:
        with cluster.node(port) as node:
            assert any(k.startswith(auth.WRITE_PROBE.encode()) for k in node.keys("*")), port
    from core.metrics import REDIS_UP, refresh_redis_gauge

    REDIS_UP.set(0)
    await refresh_redis_gauge(rt)
    assert REDIS_UP._value.get() == 1


async def test_delivery_reports_parked_and_taken_in_a_multi(client: Any, rt: Any, cluster: Cluster) -> None:
    """Reports that beat the message's SENT commit are parked (RPUSH, LTRIM, EXPIRE in one MULTI) and taken once
    (LRANGE and DEL in one MULTI): transactions of one key, which a cluster runs on its node."""
    from channels.sms import routes
    from core.models import SmsMessage
    from tests.channels.sms.test_routes import sent_message

    for status in ("Buffered", "Success"):
        answer = await client.post("/sms/africastalking/delivery", data={"id": "ATXid_C", "status": status})
        assert answer.status == 200 and await answer.text() == "unknown"
    key = routes.parked_key("ATXid_C")
    with cluster.node(cluster.port_of(key)) as node:
        assert len(node.lrange(key, 0, -1)) == 2 and 0 < node.ttl(key) <= routes.PARKED_TTL
    sms_id = await sent_message(rt, "ATXid_C")
    assert await routes.apply_parked_reports(rt, "ATXid_C") == ["progress", "delivered"]
    async with rt.sessionmaker() as s:
        row = await s.get(SmsMessage, sms_id)
    assert row is not None and (row.status, row.provider_status) == ("DELIVERED", "Success")
    assert cluster.held_by(cluster.port_of(key), key) is None


async def test_a_keyword_reply_is_counted_and_its_verdict_kept_on_their_nodes(client: Any, rt: Any, demo: Any,
                                                                              cluster: Cluster) -> None:
    """A keyword's reply is counted in its two windows, and the text's verdict kept with when it was counted, by one
    EVAL of five keys of the number's tag (RateLimiter.hit_all_once); the verdict is also kept as the release before
    keeps it, by one MULTI of two keys of the text's tag, read back by one MGET on the aggregator's retry: each on
    its node."""
    import hashlib

    from channels.sms import routes
    from core.ratelimit import RateLimiter, subject_tag
    from tests.channels.sms.helpers import jobs_of
    from tests.channels.sms.test_routes import ALINE, inbound

    for _ in range(2):  # the text, then the aggregator's retry of it: one reply, counted once
        answer = await inbound(client, ALINE, "STATUS PAY_20260115_999999", "in-cluster")
        assert answer.status == 200
    assert [job.payload["template"] for job in await jobs_of(rt, "sms.send")] == ["not_found"]
    index = rt.cipher.blind_index(ALINE)
    verdict, at = (routes._taken_key(index, "in-cluster", what) for what in ("reply", "reply-at"))
    port = cluster.port_of(verdict)
    assert port == cluster.port_of(at) and cluster.held_by(port, verdict) == b"1" and cluster.held_by(port, at)
    mark = f"rl:{subject_tag(index)}:{routes.REPLY_LIMIT.name}:once:{hashlib.sha256(b'in-cluster').hexdigest()[:32]}"
    assert cluster.held_by(cluster.port_of(mark), mark) == cluster.held_by(port, at)  # when it was counted
    limiter = RateLimiter(rt.redis)
    assert [(await limiter.peek(limit, index)).used for limit in (routes.REPLY_LIMIT, routes.REPLY_DAILY_LIMIT)
            ] == [1, 1]


async def test_a_cluster_out_of_reach_is_redis_down_not_a_server_error(migrated_database: str,
                                                                      aiohttp_client: Any) -> None:
    """No node answers: the cluster client's own error is a redis ConnectionError, so the API answers without
    its limits (as with a plain Redis down) instead of 500, and /readyz says Redis is in error."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    from app import create_app, open_runtime
    from core.demo import seed_demo
    from tests.conftest import clean_database
    from tests.redis_cluster import _free_ports

    [dead] = _free_ports(1)
    settings = make_settings(REDIS_URL=f"redis://127.0.0.1:{dead}", REDIS_CLUSTER="1")
    async with open_runtime(settings) as rt:
        await clean_database(rt)
        async with rt.sessionmaker.begin() as s:
            demo = await seed_demo(s, rt.cipher)
        with pytest.raises(RedisConnectionError):
            await rt.redis.get("x")
        client = await aiohttp_client(create_app(settings, runtime=rt))
        resp = await client.post("/v1/auth/token", json={"username": demo["admin"][0],
                                                          "password": demo["admin"][1]})
        assert resp.status == 200, await resp.text()
        headers = {"Authorization": f"Bearer {(await resp.json())['accessToken']}"}
        listed = await client.get("/v1/payments", headers=headers)
        assert listed.status == 200, await listed.text()
        status, body = await readiness(client)
        assert status == 200 and body["checks"]["redis"] == "error: ConnectionError", body


async def test_readiness_sees_a_master_other_than_the_clients_default_full_or_evicting(
        client: Any, rt: Any, cluster: Cluster) -> None:
    """CONFIG GET and INFO go to one node of a cluster unless sent to each: a master that evicts keys (USSD
    sessions of its slots) or refuses writes must not hide behind the one asked."""
    await rt.redis.ping()
    default = rt.redis.get_default_node().port
    other = next(port for port in cluster.ports if port != default)
    with cluster.node(other) as node:
        node.config_set("maxmemory-policy", "allkeys-lru")
        node.config_set("maxmemory", "100mb")
        try:
            status, body = await readiness(client)
            assert (status, body["status"], body["checks"]["redis"]) == (
                200, "degraded", "degraded: evicts keys (maxmemory-policy allkeys-lru)"), body
            node.config_set("maxmemory-policy", "noeviction")
            node.config_set("maxmemory", "1")  # full at once: every write of its slots refused
            status, body = await readiness(client)
            assert body["checks"]["redis"] == "degraded: out of memory, writes refused", body
        finally:
            node.config_set("maxmemory", "0")
    status, body = await readiness(client)
    assert body["checks"]["redis"] == "ok", body


def test_the_test_cluster_starts_on_other_ports_when_one_is_taken_meanwhile(monkeypatch: Any) -> None:
    """A port found free may be taken before its node binds it (another test's server on a busy CI machine): the
    cluster starts on fresh ports, and the nodes of the failed attempt are stopped, not left running."""
    import socket

    from tests import redis_cluster

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    real = redis_cluster._free_ports
    handed: list[list[int]] = []

    def one_taken(count: int) -> list[int]:
        ports = real(count)
        if not handed:
            ports[0] = taken.getsockname()[1]
        handed.append(ports)
        return ports

    monkeypatch.setattr(redis_cluster, "_free_ports", one_taken)
    try:
        started = cast(Generator[Cluster, None, None], start_cluster(masters=3))
        cluster = next(started)
        try:
            assert len(handed) == 2 and taken.getsockname()[1] not in cluster.ports
            with cluster.node(cluster.ports[0]) as node:
                assert b"cluster_state:ok" in node.execute_command("CLUSTER", "INFO")
        finally:
            started.close()
        assert all(proc.poll() is not None for proc in cluster.procs)
        for port in handed[0][1:3]:  # the first attempt's own nodes: stopped
            with socket.socket() as probe:
                assert probe.connect_ex(("127.0.0.1", port)) != 0, port
    finally:
        taken.close()


async def test_an_erasure_deletes_her_sessions_held_by_several_nodes(client: Any, rt: Any, demo: Any,
                                                                     cluster: Cluster) -> None:
    """Her recent sessions' keys (admin_api.members._forget_sessions) are of several slots: deleted in one call,
    which the cluster client splits by slot (no CROSSSLOT), on each node that holds one."""
    phones = [AtPhone(client, EN_MTN) for _ in range(8)]
    for phone in phones:
        assert (await phone.dial()).startswith("CON ")
    keys = [sessions.session_key("africastalking", phone.session_id) for phone in phones]
    assert len({cluster.port_of(key) for key in keys}) > 1
    assert all(cluster.held_by(cluster.port_of(key), key) is not None for key in keys)
    resp = await client.post("/v1/auth/token", json={"username": demo["admin"][0], "password": demo["admin"][1]})
    headers = {"Authorization": f"Bearer {(await resp.json())['accessToken']}"}
    member = demo["members"][EN_MTN]
    assert (await client.delete(f"/v1/members/{member}", headers=headers)).status == 200
    erased = await client.post(f"/v1/members/{member}/erase", headers=headers)
    assert erased.status == 200, await erased.text()
    assert [key for key in keys if cluster.held_by(cluster.port_of(key), key) is not None] == []


async def test_a_one_node_cluster_without_redis_cluster_is_taken() -> None:
    """A cluster of one node that holds every slot answers every key itself (never MOVED): a plain client works
    there, so REDIS_CLUSTER off is not refused, while the same check refuses a node of the three-node cluster (the
    test below). It refused it, telling the operator to set REDIS_CLUSTER=1 for a setup that worked."""
    from redis.asyncio import Redis

    from app import refuse_redis_misconfigured

    for one in start_cluster(masters=1):
        client = Redis.from_url(one.url)
        try:
            await client.set("probe:{x}", b"1")  # any slot: this node's
            assert await client.get("probe:{y}") is None
            await refuse_redis_misconfigured(client, make_settings(REDIS_URL=one.url))  # no ConfigError
        finally:
            await client.aclose()


def test_a_cluster_node_without_redis_cluster_stops_the_start(cluster: Cluster, settings: Any) -> None:
    # REDIS_CLUSTER forgotten: a plain client on a node is answered MOVED for every key another node holds. /readyz
    # said ok (PING names no key) while every USSD hop answered "service unavailable". Refused at start, as Redis
    # refusing REDIS_URL's database is.
    from tests.conftest import _base_env
    from tests.integration.procs import free_port

    env = {**_base_env(), "REDIS_URL": cluster.url, "PORT": str(free_port())}
    env.pop("REDIS_CLUSTER", None)
    for command in ("serve", "worker"):
        result = subprocess.run([sys.executable, "main.py", command], cwd=ROOT, capture_output=True, text=True,
                                env=env, timeout=120, check=False, stdin=subprocess.DEVNULL)
        assert result.returncode == 2, (command, result.stderr)
        lines = [line for line in result.stderr.splitlines() if not line.startswith("{")]
        assert lines == ["configuration error: REDIS_CLUSTER: is off, but the Redis at REDIS_URL is a node of a "
                         "Redis Cluster (INFO cluster: cluster_enabled:1): set REDIS_CLUSTER=1"], result.stderr
