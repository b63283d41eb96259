"""Operations figures computed from real rows."""

from __future__ import annotations

from core.audit import Actor
from core.ops import dashboard
from core.payments import NewPayment, create_payment
from core.ports import EventKind, ProviderEvent, ProviderOutcome
from core.provider_events import handle_provider_event
from tests.conftest import requires_pg


async def test_dashboard_counts_payments_providers_and_outbox(rt, demo):
    made = []
    async with rt.sessionmaker.begin() as s:
        for i, account in enumerate(["0788000001", "0788000002", "0788000003"]):
            p, _ = await create_payment(s, rt, NewPayment(
                cooperative_id=demo["cooperative_id"], payment_type_id=demo["payment_types"]["Water"],
                method="MOBILE_MONEY_MTN", account=account, idempotency_key=f"ops-test-{i:04d}", channel="api"),
                actor=Actor("admin:t", "api"))
            made.append(p)
    for p, outcome in zip(made[:2], (ProviderOutcome.SUCCEEDED, ProviderOutcome.FAILED), strict=True):
        await handle_provider_event(rt, ProviderEvent(provider="mtn_momo", kind=EventKind.COLLECTION, event_id=p.id,
                                                      reference=p.provider_reference, outcome=outcome))
    async with rt.sessionmaker() as s:
        figures = await dashboard(s, demo["cooperative_id"])
        other = await dashboard(s, "another-cooperative")
    mtn = figures["providers"]["mtn_momo"]
    assert (mtn["settled"], mtn["succeeded"], mtn["rate"]) == (2, 1, 0.5)
    assert figures["openPayments"]["count"] == 1
    assert sum(r["count"] for r in figures["paymentsPerMinute"]) == 3
    assert {r["status"] for r in figures["paymentsPerMinute"]} == {"COMPLETED", "FAILED", "PENDING"}
    # 3 collect + 3 poll jobs, one receipt and one failure SMS, two webhook events, all still pending
    assert figures["outbox"]["pending"] == 10
    assert other["openPayments"]["count"] == 0 and other["providers"] == {}
    # A recording an admin voided (core.recorded_payments.void_recording) is no provider's outcome: not in its rate.
    from sqlalchemy import update

    from core.models import Payment

    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Payment).where(Payment.id == made[2].id).values(status="VOIDED"))
    async with rt.sessionmaker() as s:
        mtn = (await dashboard(s, demo["cooperative_id"]))["providers"]["mtn_momo"]
    assert (mtn["settled"], mtn["succeeded"], mtn["rate"]) == (2, 1, 0.5) and mtn["counts"]["VOIDED"] == 1


# -- the USSD funnel ------------------------------------------------------------------------------------

EN_MTN, RW_MTN, FR_AIRTEL, SW_AIRTEL, GRACE = (
    "+250788000002", "+250788000001", "+250733000001", "+250733000002", "+250788000003")
STRANGER = "+250788555123"


async def drive_funnel_sessions(client) -> None:
    """Sessions that stop at each step of the pay funnel (keys as on the demo's main menu and list)."""
    from tests.channels.ussd.helpers import AtPhone

    async def session(number: str, *keys: str, retry_last: bool = False) -> str:
        phone = AtPhone(client, number)
        screen = await phone.dial()
        for key in keys:
            screen = await phone.send(key)
        if retry_last:
            assert await phone.resend() == screen  # an aggregator retry counts nothing twice
        return screen

    assert (await session(EN_MTN)).startswith("CON Welcome")  # stops at home
    assert (await session(RW_MTN, "1", retry_last=True)).startswith("CON ")  # stops at what to pay
    # Reaches what to pay, goes back home and stops there: it still reached "what to pay".
    assert "1. " in await session(GRACE, "1", "0")
    assert "Ref: PAY_" in await session(EN_MTN, "1", "2")  # stops on the confirmation (new phone session)
    assert (await session(FR_AIRTEL, "1", "2", "2")).startswith("END ")  # cancels on the confirmation
    done = await session(SW_AIRTEL, "1", "2", "1", retry_last=True)  # pays
    assert done.startswith("END ") and "PAY_" in done
    assert (await session(STRANGER)).startswith("CON ")  # not a member: counted for no cooperative


def steps(figures) -> dict[str, tuple[int, int]]:
    return {row["step"]: (row["reached"], row["dropped"]) for row in figures["ussdFunnel"]}


async def test_ussd_funnel_counts_reached_and_dropped_per_step(rt, demo, client):
    await drive_funnel_sessions(client)
    async with rt.sessionmaker() as s:
        mine = await dashboard(s, demo["cooperative_id"], redis=rt.redis)
        everyone = await dashboard(s, None, redis=rt.redis)
        other = await dashboard(s, "another-cooperative", redis=rt.redis)
        without_redis = await dashboard(s, demo["cooperative_id"])
    assert [r["step"] for r in mine["ussdFunnel"]] == ["home", "pay_type", "pay_confirm", "pay_done"]
    assert steps(mine) == {"home": (6, 1), "pay_type": (5, 2), "pay_confirm": (3, 2), "pay_done": (1, 0)}
    assert [r["ofStart"] for r in mine["ussdFunnel"]] == [1.0, round(5 / 6, 4), 0.5, round(1 / 6, 4)]
    # The stranger reached the main menu only, and belongs to no cooperative.
    assert steps(everyone) == {"home": (7, 2), "pay_type": (5, 2), "pay_confirm": (3, 2), "pay_done": (1, 0)}
    assert steps(other) == {"home": (0, 0), "pay_type": (0, 0), "pay_confirm": (0, 0), "pay_done": (0, 0)}
    assert other["ussdFunnel"][0]["ofStart"] is None
    assert without_redis["ussdFunnel"] == []
    # Drop-off by last screen, from the session records, is still there.
    assert {r["screen"]: r["paid"] for r in mine["ussdLastScreens"]}.get("pay_done") == 1


async def test_ussd_funnel_counts_a_resumed_session_as_its_own(rt, demo, client):
    from tests.channels.ussd.helpers import AtPhone

    dropped = AtPhone(client, EN_MTN)
    await dropped.dial()
    await dropped.send("1")
    await dropped.send("2")  # drops on the confirmation
    again = AtPhone(client, EN_MTN)
    assert (await again.dial()).startswith("CON You did not finish")
    await again.send("1")  # continue: straight back to the confirmation
    assert (await again.send("1")).startswith("END ")
    async with rt.sessionmaker() as s:
        figures = await dashboard(s, demo["cooperative_id"], redis=rt.redis)
    # Two sessions: the first dropped on the confirmation, the resumed one went through every step.
    assert steps(figures) == {"home": (2, 0), "pay_type": (2, 0), "pay_confirm": (2, 1), "pay_done": (1, 0)}


async def test_ussd_funnel_counts_a_member_of_several_cooperatives_once_chosen(rt, demo, client):
    from core.members import create_member
    from core.models import Cooperative, PaymentType
    from core.phone import normalize
    from tests.channels.ussd.helpers import AtPhone

    async with rt.sessionmaker.begin() as s:
        coop = Cooperative(name="Second Coop", short_code="SECOND", country="RW", currency="RWF",
                           timezone="Africa/Kigali", status="ACTIVE", self_registration=True)
        s.add(coop)
        await s.flush()
        s.add(PaymentType(cooperative_id=coop.id, name="Levy", amount_minor=1000, currency="RWF", is_active=True))
        await create_member(s, rt.cipher, cooperative_id=coop.id, name="Jean Bosco Habimana",
                            phone=normalize(EN_MTN), actor=Actor("admin:t", "api"))
        second = coop.id
    phone = AtPhone(client, EN_MTN)
    await phone.dial()  # several cooperatives: none known at home
    picker = await phone.send("1")
    line = next(x for x in picker[4:].split("\n") if "Second Coop" in x)
    assert (await phone.send(line.split(".")[0])).startswith("CON Choose what to pay")
    async with rt.sessionmaker() as s:
        figures = {coop_id: steps(await dashboard(s, coop_id, redis=rt.redis))
                   for coop_id in (None, second, demo["cooperative_id"])}
    # Counted for the chosen cooperative from home on, once; never for the other one.
    assert figures[None]["home"] == figures[second]["home"] == (1, 0)
    assert figures[None]["pay_type"] == figures[second]["pay_type"] == (1, 1)
    assert figures[demo["cooperative_id"]]["home"] == (0, 0)


class CountingRedis:
    """Counts round trips to Redis: each command, or each pipeline execute."""

    def __init__(self, redis) -> None:
        self.redis, self.trips = redis, 0

    def pipeline(self, *args, **kwargs):
        pipe, outer = self.redis.pipeline(*args, **kwargs), self

        class Pipe:
            def __getattr__(self, name):
                return getattr(pipe, name)

            async def execute(self):
                outer.trips += 1
                return await pipe.execute()

        return Pipe()

    def __getattr__(self, name):
        attr = getattr(self.redis, name)
        if not callable(attr):
            return attr

        async def call(*args, **kwargs):
            self.trips += 1
            return await attr(*args, **kwargs)

        return call


async def test_ussd_funnel_counters_expire_and_cost_no_extra_round_trip(rt, demo, client):
    from core.db import utcnow
    from core.ops import FUNNEL_TTL, funnel_key
    from tests.channels.ussd.helpers import AtPhone, swapped_redis

    counting = CountingRedis(rt.redis)
    phone = AtPhone(client, EN_MTN)
    with swapped_redis(rt, counting):
        await phone.dial()
        before = counting.trips
        await phone.send("7")  # invalid: no new step
        plain = counting.trips - before
        before = counting.trips
        await phone.send("1")  # reaches "what to pay": counted
        counted = counting.trips - before
    assert plain == counted == 2  # load the session, save it (with the counters in the same pipeline)
    key = funnel_key(utcnow())
    counters = {k.decode(): int(v) for k, v in (await rt.redis.hgetall(key)).items()}
    assert counters == {"*|home": 1, "*|pay_type": 1, f"{demo['cooperative_id']}|home": 1,
                        f"{demo['cooperative_id']}|pay_type": 1}
    assert 0 < await rt.redis.ttl(key) <= FUNNEL_TTL


@requires_pg
async def test_open_payments_are_counted_all_at_a_big_cooperatives_volume(rt, demo):
    """An outage at month end leaves 6,000 payments open: the page counted the first 5,000 read (the oldest) and
    bucketed only those, so it said 5,000 open, none under a minute old, while 500 had just been asked for."""
    from sqlalchemy import text

    async with rt.engine.begin() as conn:
        await conn.execute(text(
            "INSERT INTO payments (id, cooperative_id, payment_type_id, reference, amount_minor, currency, fee_minor,"
            " refunded_minor, status, method, provider, provider_reference, payment_account_enc,"
            " payment_account_index, payment_account_masked, idempotency_key, request_hash, channel, mismatch, late,"
            " expires_at, created_at, updated_at)"
            " SELECT gen_random_uuid()::text, :coop, :type, 'OPS' || i, 5000, 'RWF', 0, 0, 'PENDING',"
            " 'MOBILE_MONEY_MTN', 'mtn_momo', 'ops-' || i, 'x', 'x', '+25078****001', 'ops-' || i, 'h', 'api', false,"
            " false, now() + interval '1 hour', t, t"
            " FROM (SELECT i, CASE WHEN i <= 5500 THEN now() - interval '10 minutes' ELSE now() END AS t"
            " FROM generate_series(1, 6000) i) s"),
            {"coop": demo["cooperative_id"], "type": demo["payment_types"]["Water"]})
    async with rt.sessionmaker() as s:
        open_payments = (await dashboard(s, demo["cooperative_id"]))["openPayments"]
    assert open_payments["count"] == 6000
    assert open_payments["buckets"] == {"under_1m": 500, "1m_to_5m": 0, "over_5m": 5500}
    assert 590 <= open_payments["oldestSeconds"] < 900
