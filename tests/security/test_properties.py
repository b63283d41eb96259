"""Property-based tests: random walks through every state machine on real rows, Money algebra and
round trips, and random refund sequences that must never give back more than was collected."""

from __future__ import annotations

import asyncio
import uuid
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from core.audit import Actor
from core.errors import BusinessRuleError, Conflict, DomainError, ValidationError
from core.models import AuditEvent, Payment, Refund
from core.money import CODE_FIRST, EXPONENTS, MAX_MINOR, Money, MoneyError
from core.ports import ProviderOutcome
from core.refunds import apply_refund_outcome, request_refund
from core.state import IllegalTransition, StaleTransition, transition
from core.state.dispute import DISPUTE
from core.state.payment import PAYMENT
from core.state.refund import REFUND
from core.state.sms import SMS
from tests.conftest import requires_pg
from tests.core.factories import row_in_state
from tests.security.conftest import pending_payment

ACTOR = Actor("admin:property", "api")
MACHINES = {m.name: m for m in (PAYMENT, REFUND, DISPUTE, SMS)}
INITIAL = {"payment": "PENDING", "refund": "PENDING", "dispute": "OPEN", "sms": "QUEUED"}
DB_EXAMPLES = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))


# --- state machines --------------------------------------------------------------------------------


@st.composite
def walks(draw: Any) -> tuple[str, list[tuple[str, bool]]]:
    """A machine and a list of (target, claim the right source?) moves."""
    name = draw(st.sampled_from(sorted(MACHINES)))
    states = [s.value for s in MACHINES[name].states]
    moves = draw(st.lists(st.tuples(st.sampled_from(states), st.booleans() | st.just(True)), max_size=10))
    return name, moves


@DB_EXAMPLES
@given(walk=walks())
async def test_random_walk_on_a_real_row_uses_only_declared_moves(sm: Any, walk: Any) -> None:
    name, moves = walk
    machine = MACHINES[name]
    async with sm.begin() as session:
        row = await row_in_state(session, name, INITIAL[name])
    state = machine.states(INITIAL[name])
    applied = 0
    for target_value, honest in moves:
        target = machine.states(target_value)
        # A writer that believes the row is elsewhere (a lost race) must never move it.
        claimed = state if honest else next((s for s in machine.states if s != state), state)
        expect_ok = honest and machine.allowed(state, target)
        async with sm() as session:
            try:
                async with session.begin():
                    await transition(session, machine, row.id, claimed, target, actor=ACTOR)
                outcome = "ok"
            except IllegalTransition:
                outcome = "illegal"
            except StaleTransition:
                outcome = "stale"
        if expect_ok:
            assert outcome == "ok", (name, state, target)
            state, applied = target, applied + 1
        elif not machine.allowed(claimed, target):
            assert outcome == "illegal", (name, claimed, target)
        else:
            assert outcome == "stale", (name, claimed, state, target)
        async with sm() as session:
            assert (await session.get(machine.model, row.id)).status == state.value
    if state in machine.final:
        # Final means final: no target at all is accepted from here.
        for target in machine.states:
            with pytest.raises(IllegalTransition):
                machine.check(state, target)
    async with sm() as session:
        events = (await session.execute(select(func.count()).select_from(AuditEvent).where(
            AuditEvent.entity_id == row.id))).scalar_one()
    assert events == applied  # one audit event per applied move, none for a refused one


@given(st.sampled_from(sorted(MACHINES)), st.data())
def test_final_states_have_no_way_out_and_every_state_is_reachable(name: str, data: Any) -> None:
    machine = MACHINES[name]
    reachable = {machine.states(INITIAL[name])}
    frontier = list(reachable)
    while frontier:
        current = frontier.pop()
        for nxt in machine.table[current]:
            if nxt not in reachable:
                reachable.add(nxt)
                frontier.append(nxt)
    assert reachable == set(machine.states)
    final = data.draw(st.sampled_from(sorted(machine.final)))
    assert not [t for t in machine.states if machine.allowed(final, t)]


# --- money -----------------------------------------------------------------------------------------

currencies = st.sampled_from(sorted(EXPONENTS))
minors = st.integers(min_value=-(MAX_MINOR // 4), max_value=MAX_MINOR // 4)


@st.composite
def same_currency(draw: Any, n: int = 2) -> list[Money]:
    currency = draw(currencies)
    return [Money(draw(minors), currency) for _ in range(n)]


@given(same_currency(3))
def test_addition_and_subtraction_are_exact_and_consistent(trio: list[Money]) -> None:
    a, b, c = trio
    zero = Money(0, a.currency)
    assert a + b == b + a
    assert (a + b) + c == a + (b + c)
    assert a + zero == a and a - zero == a
    assert (a + b) - b == a
    assert (a - b).minor == a.minor - b.minor
    assert (a - a) == zero


@given(same_currency(2))
def test_ordering_follows_the_minor_units(pair: list[Money]) -> None:
    a, b = pair
    assert (a < b) == (a.minor < b.minor)
    assert (a <= b) == (a.minor <= b.minor)
    assert (a > b) == (a.minor > b.minor)
    assert (a >= b) == (a.minor >= b.minor)
    assert (a == b) == (a.minor == b.minor)


@given(minors, minors, st.lists(currencies, min_size=2, max_size=2, unique=True))
def test_mixed_currencies_are_refused_for_arithmetic_and_comparison(x: int, y: int, pair: list[str]) -> None:
    a, b = Money(x, pair[0]), Money(y, pair[1])
    assert a != b  # different currencies are never equal, whatever the numbers
    for op in (lambda: a + b, lambda: a - b, lambda: a < b, lambda: a <= b, lambda: a > b, lambda: a >= b):
        with pytest.raises(MoneyError, match="cannot combine"):
            op()


@given(currencies, st.integers(min_value=MAX_MINOR - 10**6, max_value=MAX_MINOR - 1))
def test_overflow_is_a_money_error_not_a_silent_wrap(currency: str, big: int) -> None:
    with pytest.raises(MoneyError):
        Money(big, currency) + Money(big, currency)


@given(currencies, minors)
def test_format_and_parse_round_trip(currency: str, minor: int) -> None:
    money = Money(minor, currency)
    written = money.format()
    if currency in CODE_FIRST:  # "GHS 1,234.50", as Ghanaians write it
        code, number = written.split(" ", 1)
    else:
        number, code = written.rsplit(" ", 1)
    assert code == currency
    assert money.number() == number
    assert Money.parse(number.replace(",", ""), currency) == money
    assert Money.from_api(money.to_api(), currency) == money
    assert Money.parse(str(money.major()), currency) == money


@given(st.sampled_from([c for c, e in EXPONENTS.items() if e < 6]), st.integers(1, 10**6), st.data())
def test_parse_refuses_fractions_the_currency_does_not_have(currency: str, whole: int, data: Any) -> None:
    exp = EXPONENTS[currency]
    digits = data.draw(st.integers(exp + 1, 6))
    last = data.draw(st.integers(1, 9))
    text = f"{whole}.{'0' * (digits - 1)}{last}"
    with pytest.raises(MoneyError):
        Money.parse(text, currency)
    assert Decimal(text) != Decimal(whole)


@given(st.text(max_size=30))
def test_parse_never_raises_anything_but_money_error(text: str) -> None:
    try:
        money = Money.parse(text, "KES")
    except MoneyError:
        return
    assert isinstance(money.minor, int)


# --- refund limits ---------------------------------------------------------------------------------

REFUSALS = ("exceeds the refundable", "nothing is left to refund")


@st.composite
def refund_programs(draw: Any) -> tuple[int, list[tuple[str, int]]]:
    """A collected amount and a list of steps: request N, fail the i-th refund, complete the i-th."""
    total = draw(st.integers(1, 100_000))
    steps = draw(st.lists(st.one_of(
        st.tuples(st.just("request"), st.integers(-5, total + total // 2 + 1)),
        st.tuples(st.just("rest"), st.just(0)),
        st.tuples(st.just("fail"), st.integers(0, 20)),
        st.tuples(st.just("complete"), st.integers(0, 20)),
        st.tuples(st.just("replay"), st.integers(0, 20)),
    ), min_size=1, max_size=12))
    return total, steps


@DB_EXAMPLES
@given(program=refund_programs())
async def test_random_refund_sequences_never_exceed_what_was_collected(rt: Any, demo: Any, program: Any) -> None:
    """Requests never hold more than was collected; only the provider's word that a FAILED refund went through
    after all can put more back, and then the payment says so (flagged for a person)."""
    total, steps = program
    payment = await pending_payment(rt, demo, provider="mtn_momo", method="MOBILE_MONEY_MTN",
                                    status="COMPLETED", amount_minor=total, txn=f"TX{uuid.uuid4().hex[:8]}")
    keys: list[tuple[str, Money | None]] = []  # each key with what it asked for: a replay asks the same
    for op, n in steps:
        if op in ("request", "rest", "replay"):
            if op == "replay" and not keys:
                continue
            if op == "replay":
                key, amount = keys[n % len(keys)]
            else:
                key, amount = f"prop-{uuid.uuid4().hex}", None if op == "rest" else Money(n, "RWF")
            before = await _refund_rows(rt, payment.id)
            try:
                async with rt.sessionmaker.begin() as s:
                    refund, created = await request_refund(
                        s, rt, payment_id=payment.id, cooperative_id=demo["cooperative_id"], amount=amount,
                        reason="property", idempotency_key=key, actor=ACTOR)
                assert created == (op != "replay")
                if created:
                    keys.append((key, amount))
            except ValidationError as exc:  # a request's own mistake (400), before anything is read
                assert op != "replay" and amount is not None and amount.minor <= 0, exc.message
                assert exc.message == "amount must be a positive number"
                assert await _refund_rows(rt, payment.id) == before
            except BusinessRuleError as exc:
                assert op != "replay"
                assert any(words in exc.message for words in REFUSALS), exc.message
                assert await _refund_rows(rt, payment.id) == before  # a refusal leaves no row behind
        elif keys:
            rows = await _refund_rows(rt, payment.id)
            target = rows[n % len(rows)]
            async with rt.sessionmaker.begin() as s:
                refund = await s.get(Refund, target[0], with_for_update=True)
                outcome = ProviderOutcome.FAILED if op == "fail" else ProviderOutcome.SUCCEEDED
                await apply_refund_outcome(s, rt, refund, outcome, actor=Actor("provider:mtn_momo", "provider"))
        await _check_invariants(rt, payment.id, total)


async def _refund_rows(rt: Any, payment_id: str) -> list[tuple[str, int, str]]:
    async with rt.sessionmaker() as s:
        return sorted((await s.execute(select(Refund.id, Refund.amount_minor, Refund.status)
                                       .where(Refund.payment_id == payment_id))).all())


async def _check_invariants(rt: Any, payment_id: str, total: int) -> None:
    rows = await _refund_rows(rt, payment_id)
    held = sum(a for _, a, st_ in rows if st_ != "FAILED")
    completed = sum(a for _, a, st_ in rows if st_ == "COMPLETED")
    assert all(a > 0 for _, a, _ in rows)
    async with rt.sessionmaker() as s:
        payment = await s.get(Payment, payment_id)
    assert payment.refunded_minor == completed
    if held > total:
        # Only the provider's word on a refund that had FAILED can put more back than was collected (requests are
        # refused beyond what is refundable): the refund completes, and the payment is flagged for a person.
        assert payment.mismatch and "reported sent back after it had failed" in (payment.mismatch_detail or ""), \
            (held, total, rows, payment.mismatch_detail)
    if completed > total:
        assert "more than collected has gone back to the payer" in (payment.mismatch_detail or ""), \
            (completed, total, payment.mismatch_detail)
    expected = "COMPLETED" if completed == 0 else "REFUNDED" if completed >= total else "PARTIALLY_REFUNDED"
    assert payment.status == expected, (payment.status, completed, total)


async def test_partial_refund_refused_clearly_where_the_provider_cannot_do_it(rt: Any, demo: Any) -> None:
    payment = await pending_payment(rt, demo, provider="airtel", method="MOBILE_MONEY_AIRTEL",
                                    status="COMPLETED", txn="MP123")
    async with rt.sessionmaker.begin() as s:
        with pytest.raises(BusinessRuleError, match="refunds only the full amount"):
            await request_refund(s, rt, payment_id=payment.id, cooperative_id=demo["cooperative_id"],
                                 amount=Money(100, "RWF"), reason=None, idempotency_key="partial-airtel",
                                 actor=ACTOR)
    async with rt.sessionmaker.begin() as s:
        with pytest.raises(DomainError, match="refund must be in RWF"):
            await request_refund(s, rt, payment_id=payment.id, cooperative_id=demo["cooperative_id"],
                                 amount=Money(100, "KES"), reason=None, idempotency_key="wrong-currency",
                                 actor=ACTOR)
    assert await _refund_rows(rt, payment.id) == []


async def test_refund_of_another_cooperatives_payment_is_not_found(rt: Any, demo: Any) -> None:
    payment = await pending_payment(rt, demo, provider="mtn_momo", method="MOBILE_MONEY_MTN", status="COMPLETED")
    async with rt.sessionmaker.begin() as s:
        with pytest.raises(DomainError) as info:
            await request_refund(s, rt, payment_id=payment.id, cooperative_id=str(uuid.uuid4()),
                                 amount=None, reason=None, idempotency_key="other-coop-key", actor=ACTOR)
    assert info.value.status == 404
    assert await _refund_rows(rt, payment.id) == []


@requires_pg
async def test_concurrent_partial_refunds_never_exceed_the_payment(rt: Any, demo: Any) -> None:
    payment = await pending_payment(rt, demo, provider="mtn_momo", method="MOBILE_MONEY_MTN",
                                    status="COMPLETED", amount_minor=50_000)

    async def attempt(i: int) -> str:
        try:
            async with rt.sessionmaker.begin() as s:
                await request_refund(s, rt, payment_id=payment.id, cooperative_id=demo["cooperative_id"],
                                     amount=Money(7_000, "RWF"), reason=None,
                                     idempotency_key=f"race-refund-{i:04d}", actor=ACTOR)
            return "ok"
        except (BusinessRuleError, Conflict):
            return "refused"

    results = await asyncio.gather(*(attempt(i) for i in range(12)))
    assert results.count("ok") == 7  # 7 x 7,000 = 49,000 <= 50,000 < 8 x 7,000
    await _check_invariants(rt, payment.id, 50_000)
