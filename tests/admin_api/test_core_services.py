"""The core services behind the API that other edges call directly: payment types, rate limiter, scoping."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from core.audit import Actor
from core.auth import Principal
from core.errors import Conflict, NotFound, ValidationError
from core.models import Payment, PaymentType
from core.money import Money
from core.payment_types import (
    PaymentTypeFields,
    active_payment_types,
    create_payment_type,
    deactivate_payment_type,
    get_payment_type,
    list_payment_types,
    update_payment_type,
)
from core.ratelimit import Limit, RateLimiter, subject_tag

ACTOR = Actor("admin:test", "api")


async def test_payment_type_services(session, demo):
    coop = demo["cooperative_id"]
    made = await create_payment_type(
        session,
        cooperative_id=coop,
        actor=ACTOR,
        fields=PaymentTypeFields(name="  Garbage ", amount=Money(1500, "RWF")),
    )
    await session.commit()
    assert made.name == "Garbage"
    assert [t.name for t in await active_payment_types(session, coop)] == ["Garbage", "Monthly Rent", "Water"]
    found = await get_payment_type(session, coop, made.id)
    assert found is not None and found.id == made.id
    assert await get_payment_type(session, "00000000-0000-0000-0000-000000000000", made.id) is None
    with pytest.raises(Conflict):
        await create_payment_type(
            session,
            cooperative_id=coop,
            actor=ACTOR,
            fields=PaymentTypeFields(name="garbage", amount=Money(1, "RWF")),
        )
    with pytest.raises(ValidationError) as err:
        await create_payment_type(
            session,
            cooperative_id=coop,
            actor=ACTOR,
            fields=PaymentTypeFields(name="", amount=Money(0, "RWF"), due_day=32),
        )
    assert err.value.errors == [
        "name must be 1 to 120 characters",
        "amount must be a positive number",
        "dueDay must be between 1 and 31",
        "recurringInterval is required when isRecurring is true",  # a due day given: it recurs
    ]
    await update_payment_type(
        session,
        cooperative_id=coop,
        payment_type_id=made.id,
        actor=ACTOR,
        changes={"amount": Money(2000, "RWF")},
    )
    await deactivate_payment_type(session, cooperative_id=coop, payment_type_id=made.id, actor=ACTOR)
    await session.commit()
    assert made.id not in [t.id for t in await active_payment_types(session, coop)]
    inactive = await get_payment_type(session, coop, made.id)
    assert inactive is not None
    assert inactive.is_active is False and inactive.amount_minor == 2000
    rows, total = await list_payment_types(session, coop, include_inactive=True, page=1, limit=2)
    assert total == 3 and len(rows) == 2
    with pytest.raises(NotFound):
        await update_payment_type(
            session,
            cooperative_id="00000000-0000-0000-0000-000000000000",
            payment_type_id=made.id,
            changes={"is_active": True},
            actor=ACTOR,
        )


async def test_sliding_window_counts_the_previous_window(rt):
    limiter = RateLimiter(rt.redis)
    limit = Limit("test", 4, window=60)
    t0 = 1_800_000_000 - (1_800_000_000 % 60)  # start of a window
    for i in range(4):
        decision = await limiter.hit(limit, "u1", now=t0 + 50)
        assert decision.allowed and decision.remaining == 3 - i
    assert not (await limiter.hit(limit, "u1", now=t0 + 55)).allowed  # refused, so not counted
    # 15 s into the next window, 3/4 of the previous four hits still count: 3 + 1 fits, 3 + 2 does not.
    fits = await limiter.hit(limit, "u1", now=t0 + 75)
    assert fits.allowed and fits.remaining == 0
    assert not (await limiter.hit(limit, "u1", now=t0 + 75)).allowed
    # Once the previous window has slid out, there is room again.
    later = await limiter.hit(limit, "u1", now=t0 + 119)
    assert later.allowed and later.remaining == 2 and later.reset == t0 + 119  # more are allowed now
    # Keys carry the subject's hash tag, then the bucket, and expire.
    keys = [k.decode() async for k in rt.redis.scan_iter(match="rl:*")]
    assert keys and all(k.startswith("rl:{u1}:test:") for k in keys)
    for k in keys:
        assert 0 < await rt.redis.ttl(k) <= 120


async def test_fixed_window_and_multiplier(rt):
    fixed = Limit("fixed", 2, window=10, sliding=False)
    limiter = RateLimiter(rt.redis, multiplier=1.5)
    assert limiter.effective(fixed) == 3
    results = [(await limiter.hit(fixed, "u", now=1000.0)).allowed for _ in range(4)]
    assert results == [True, True, True, False]
    assert (await limiter.hit(fixed, "u", now=1010.0)).allowed  # a new window starts clean


async def test_hit_and_read_counts_and_reads_one_key_of_the_subject(rt):
    limiter = RateLimiter(rt.redis)
    limit = Limit("reads", 2, window=60)
    mark = f"auth:{subject_tag('user:42')}:revoked"
    assert mark == "auth:{user:42}:revoked"
    decision, value = await limiter.hit_and_read(limit, "user:42", mark, now=6000.0)
    assert decision.allowed and decision.remaining == 1 and value is None
    await rt.redis.set(mark, b"1700000000")
    decision, value = await limiter.hit_and_read(limit, "user:42", mark, now=6001.0)
    assert decision.remaining == 0 and value == b"1700000000"
    decision, _ = await limiter.hit_and_read(limit, "user:42", mark, now=6002.0)
    assert not decision.allowed  # counted like hit()
    # A key of another subject could sit on another cluster node: refused before anything is sent.
    with pytest.raises(ValueError, match="not tagged"):
        await limiter.hit_and_read(limit, "user:42", "auth:{user:43}:revoked")


async def test_a_subject_with_braces_keeps_a_single_hash_tag(rt):
    limiter = RateLimiter(rt.redis)
    for _ in range(2):
        await limiter.hit(Limit("odd", 5), "we{ir}d", now=7000.0)
    keys = [k.decode() async for k in rt.redis.scan_iter(match="rl:*:odd:*")]
    assert len(keys) == 1 and keys[0].count("{") == 1 and keys[0].count("}") == 1
    assert "we{ir}d" not in keys[0] and await rt.redis.get(keys[0]) == b"2"


async def test_principal_scope_is_the_only_filter(session, demo, coop_b):
    a_admin = Principal("user", "x", "COOP_ADMIN", demo["cooperative_id"], scopes=frozenset({"admin"}))
    tenant = Principal("user", "y", "TENANT", demo["cooperative_id"], demo["members"]["+250788000001"])
    sup = Principal("user", "z", "SUPER_ADMIN", None)
    count = {}
    for name, who in (("a", a_admin), ("tenant", tenant), ("super", sup)):
        rows = (await session.execute(who.scope(select(PaymentType), PaymentType))).scalars().all()
        count[name] = len(rows)
    assert count == {"a": 2, "tenant": 2, "super": 3}
    # Tenants see no rows of a model that is neither theirs nor shared.
    from core.models import AuditEvent, Refund

    for model in (Refund, AuditEvent):
        assert (await session.execute(tenant.scope(select(model), model))).scalars().all() == []
    assert (await session.execute(tenant.scope(select(Payment), Payment))).scalars().all() == []
    with pytest.raises(NotFound):
        a_admin.target_cooperative(coop_b["cooperative_id"])
    with pytest.raises(ValidationError):
        sup.target_cooperative(None)
