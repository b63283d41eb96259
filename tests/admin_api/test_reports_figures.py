"""Every payment figure of the reconciliation (byStatus, byMethod, byPaymentType, totals, settled) against the rows,
reckoned here one payment at a time: a mix of statuses, methods routed through two providers, currencies, payment
types and cooperatives, money taken short, over, nothing (held twice) and after a failure, voided recordings,
refunds, and moments on the period's edges. The report reads them all in one query (core.reports.reconciliation);
each figure must be what it was when each had its own."""

from __future__ import annotations

import random
import re
import uuid
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import event

from core.models import Payment, PaymentType, Refund
from core.money import total_to_api
from core.reports import reconciliation
from core.state.payment import holds_money

START, END = datetime(2026, 10, 1, tzinfo=UTC), datetime(2026, 11, 1, tzinfo=UTC)
TICK = timedelta(microseconds=1)
# Moments either side of the period's edges, the edges themselves, and inside it.
EDGES = (START - TICK, START, START + TICK, END - TICK, END, END + TICK, START - timedelta(days=20),
         START + timedelta(days=10), END + timedelta(days=20))
STATUSES = ("PENDING", "PROCESSING", "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "PARTIALLY_REFUNDED",
            "REFUNDED", "VOIDED")
# A method and the providers that carried it (a route changed part-way through the period: a line each).
METHODS = {"MOBILE_MONEY_MTN": ("mtn_momo", "intouch"), "MOBILE_MONEY_AIRTEL": ("airtel",), "MPESA": ("mpesa",),
           "BANK_BK": ("bk",), "BANK_IM": ("im",), "BANK_ECOBANK": ("ecobank",)}
CURRENCIES = ("RWF", "KES", "UGX")


def _payment(rng: random.Random, coop: str, ptype: str, n: int) -> Payment:
    status = rng.choice(STATUSES)
    method = rng.choice(sorted(METHODS))
    amount = rng.randint(1, 90_000)
    created = rng.choice(EDGES) + timedelta(seconds=rng.choice((0, 0, 1, 3600)))
    completed = None
    if status not in ("PENDING", "PROCESSING") and rng.random() < 0.8:
        completed = rng.choice([*EDGES, created])
    # What the provider took: the amount (NULL), short, over, nothing (the other of a transaction id held twice).
    collected = rng.choice((None, None, None, amount // 2, amount + 700, 0))
    return Payment(
        cooperative_id=coop, payment_type_id=ptype, reference=f"FIG{n:06d}", amount_minor=amount,
        currency=rng.choice(CURRENCIES), fee_minor=rng.choice((0, 0, 30, 125)),
        refunded_minor=rng.choice((0, 0, amount // 3, amount)), collected_minor=collected, status=status,
        method=method, provider=rng.choice(METHODS[method]), provider_reference=f"fig-{n}",
        payment_account_enc="x", payment_account_index=f"i{n}", payment_account_masked="+25078****001",
        idempotency_key=f"fig-{n}", request_hash="h", channel="api", expires_at=created + timedelta(minutes=5),
        created_at=created, updated_at=created, completed_at=completed)


def _taken(p: Payment) -> int:
    return p.amount_minor if p.collected_minor is None else p.collected_minor


def _expected(payments: list[Payment], refunds: list[Refund], names: dict[str, str], start: datetime | None,
              end: datetime | None) -> dict[str, Any]:
    """The figures as the report describes them, one payment at a time."""

    def inside(moment: datetime | None) -> bool:
        return moment is not None and (start is None or moment >= start) and (end is None or moment < end)

    def money(minor: int, currency: str) -> int | str:
        return total_to_api(minor, currency)

    asked = [p for p in payments if inside(p.created_at)]
    by_status: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    lines: dict[str, dict[Any, list[int]]] = {"method": defaultdict(lambda: [0] * 5),
                                               "type": defaultdict(lambda: [0] * 5)}
    totals: dict[str, list[int]] = defaultdict(lambda: [0] * 4)
    for p in asked:
        by_status[(p.status, p.currency)][0] += 1
        by_status[(p.status, p.currency)][1] += p.amount_minor
        held = holds_money(p)
        for kind, key in (("method", (p.method, p.currency)), ("type", (names[p.payment_type_id], p.currency))):
            line = lines[kind][key]
            line[0] += 1
            line[1] += p.amount_minor
            if held:
                line[2] += 1
                line[3] += _taken(p)
                line[4] += p.refunded_minor
        if held:
            total = totals[p.currency]
            total[0] += _taken(p) > 0
            total[1] += _taken(p)
            total[2] += p.fee_minor
            total[3] += p.refunded_minor
    settled: dict[tuple[str, str, str], list[int]] = defaultdict(lambda: [0] * 5)
    for p in payments:
        if holds_money(p) and inside(p.completed_at):
            line = settled[(p.method, p.provider, p.currency)]
            line[0] += _taken(p) > 0
            line[1] += _taken(p)
            line[2] += p.fee_minor
    by_id = {p.id: p for p in payments}
    for r in refunds:
        if r.status == "COMPLETED" and inside(r.completed_at):
            paid = by_id[r.payment_id]
            line = settled[(paid.method, paid.provider, r.currency)]
            line[3] += 1
            line[4] += r.amount_minor

    def figures(kind: str, key_name: str) -> list[dict[str, Any]]:
        return [{key_name: k, "currency": c, "count": n, "amount": money(a, c), "completedCount": cn,
                 "completedAmount": money(ca, c), "refundedAmount": money(ra, c)}
                for (k, c), (n, a, cn, ca, ra) in sorted(lines[kind].items())]

    return {
        "byStatus": [{"status": s, "currency": c, "count": n, "amount": money(a, c)}
                     for (s, c), (n, a) in sorted(by_status.items())],
        "byMethod": figures("method", "paymentMethod"),
        "byPaymentType": figures("type", "name"),
        "totals": [{"currency": c, "collectedCount": n, "collected": money(a, c), "fees": money(f, c),
                    "refunded": money(r, c), "net": money(a - f - r, c)}
                   for c, (n, a, f, r) in sorted(totals.items())],
        "settled": [{"provider": pr, "paymentMethod": m, "currency": c, "collectedCount": n,
                     "collected": money(a, c), "fees": money(f, c), "refundedCount": rn,
                     "refunded": money(ra, c), "net": money(a - f - ra, c)}
                    for (m, pr, c), (n, a, f, rn, ra) in sorted(settled.items())],
    }


async def test_every_payment_figure_is_the_rows_own(rt: Any, demo: dict[str, Any],
                                                   coop_b: dict[str, Any]) -> None:
    rng = random.Random(20261206)
    coops: dict[str, list[str]] = {demo["cooperative_id"]: [], coop_b["cooperative_id"]: []}
    names: dict[str, str] = {}
    async with rt.sessionmaker.begin() as s:
        # Names that sort alike in any collation (the lines are in the order of their names).
        for n, (coop, name) in enumerate([(c, name) for c in coops for name in ("Alpha", "Bravo", "Charlie")]):
            ptype = PaymentType(cooperative_id=coop, name=f"{name} {n}", amount_minor=1000, currency="RWF")
            s.add(ptype)
            await s.flush()
            coops[coop].append(ptype.id)
            names[ptype.id] = ptype.name
        payments = [_payment(rng, coop, rng.choice(types), n) for n in range(600)
                    for coop, types in [rng.choice(list(coops.items()))]]
        s.add_all(payments)
        await s.flush()
        refunds = []
        for n, paid in enumerate(p for p in payments if holds_money(p) or p.status == "VOIDED"):
            for k in range(rng.choice((0, 1, 2))):
                completed = rng.choice([*EDGES, None])
                refunds.append(Refund(
                    cooperative_id=paid.cooperative_id, payment_id=paid.id, reference=f"FIGR{n:05d}{k}",
                    amount_minor=rng.randint(1, 5000), currency=paid.currency,
                    status="COMPLETED" if completed else rng.choice(("PENDING", "FAILED")),
                    idempotency_key=str(uuid.uuid4()), provider_reference=str(uuid.uuid4()),
                    created_at=rng.choice(EDGES), updated_at=END, completed_at=completed))
        s.add_all(refunds)
    # Every kind of row is there, in and out of the period.
    assert {p.status for p in payments} == set(STATUSES)
    assert any(p.status == "FAILED" and holds_money(p) for p in payments)  # taken after it failed
    assert any(p.status == "FAILED" and p.completed_at and not holds_money(p) for p in payments)
    assert any(holds_money(p) and p.collected_minor == 0 for p in payments)  # held twice: counts nothing
    assert any(p.status == "VOIDED" and p.completed_at for p in payments)
    assert {(p.method, p.provider) for p in payments} == {(m, pr) for m, prs in METHODS.items() for pr in prs}
    assert {r.status for r in refunds} == {"COMPLETED", "PENDING", "FAILED"}

    def everyone(query: Any, model: Any) -> Any:
        return query

    def only(coop: str) -> Any:
        return lambda query, model: query.where(model.cooperative_id == coop)

    scopes: list[tuple[Any, str | None]] = [(everyone, None), *((only(c), c) for c in coops)]
    async with rt.sessionmaker() as s:
        for scope, whose in scopes:
            mine = [p for p in payments if whose in (None, p.cooperative_id)]
            theirs = [r for r in refunds if whose in (None, r.cooperative_id)]
            for start, end in ((START, END), (None, None), (START, None), (None, END),
                               (START + timedelta(days=10), END + timedelta(days=20))):
                report = await reconciliation(s, scope=scope, start=start, end=end)
                expected = _expected(mine, theirs, names, start, end)
                got = {**report["payments"], "totals": report["totals"], "settled": report["settled"]}
                got["byPaymentType"] = [{k: v for k, v in line.items() if k != "paymentTypeId"}
                                        for line in got["byPaymentType"]]
                assert [names[line["paymentTypeId"]] for line in report["payments"]["byPaymentType"]] == [
                    line["name"] for line in report["payments"]["byPaymentType"]]
                assert got == expected, (whose, start, end)
                assert expected["settled"] and expected["byStatus"]


async def test_the_payments_are_read_once_for_their_figures(rt: Any, demo: dict[str, Any]) -> None:
    """byStatus, byMethod, byPaymentType, totals and settled's collections: one read of the payments, not one each
    (a year's payments read five times, about 300 ms each at 400,000 payments)."""
    grouped: list[str] = []

    streamed: list[bool] = []

    def seen(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, *args: Any) -> None:
        if re.search(r"FROM payments\b", statement) and "GROUP BY" in statement:
            grouped.append(statement)
            streamed.append(bool(context.execution_options.get("stream_results")))

    event.listen(rt.engine.sync_engine, "before_cursor_execute", seen)
    try:
        async with rt.sessionmaker() as s:
            await reconciliation(s, scope=lambda query, model: query, start=START, end=END)
    finally:
        event.remove(rt.engine.sync_engine, "before_cursor_execute", seen)
    assert len(grouped) == 1, grouped
    # Not on a server-side cursor: read a batch at a time, PostgreSQL runs the plan without its parallel workers
    # (a year's payments scanned by one process: 0.87 s against 0.57 s at 400,000).
    assert streamed == [False]


async def test_the_figures_come_back_as_their_lines_not_as_the_groups_they_are_summed_from(
        rt: Any, demo: dict[str, Any]) -> None:
    """The payments are summed by every key a figure groups by (a group for each status, method, provider and
    payment type that has payments): a super admin's year over 200 cooperatives is 35,000 groups, which were
    fetched and held at once (~1.2 KB each: 44 MB for the request). They are added up into the report's lines in the
    database: 30 payment types with a payment in each of 9 statuses by 2 methods are 540 groups, and 44 lines."""
    statuses = [s for s in STATUSES if s not in ("PENDING", "PROCESSING")] + ["PENDING", "PROCESSING"]
    async with rt.sessionmaker.begin() as s:
        types = [PaymentType(cooperative_id=demo["cooperative_id"], name=f"Levy {k:02d}", amount_minor=1000,
                             currency="RWF") for k in range(30)]
        s.add_all(types)
        await s.flush()
        n = 0
        for ptype in types:
            for status in statuses:
                for method, provider in (("MOBILE_MONEY_MTN", "mtn_momo"), ("BANK_BK", "bk")):
                    n += 1
                    created = START + timedelta(hours=n)
                    s.add(Payment(
                        cooperative_id=demo["cooperative_id"], payment_type_id=ptype.id, reference=f"GRP{n:06d}",
                        amount_minor=1000, currency="RWF", fee_minor=0, refunded_minor=0, status=status,
                        method=method, provider=provider, provider_reference=f"grp-{n}", payment_account_enc="x",
                        payment_account_index=f"i{n}", payment_account_masked="+25078****001",
                        idempotency_key=f"grp-{n}", request_hash="h", channel="api",
                        expires_at=created + timedelta(minutes=5), created_at=created, updated_at=created,
                        completed_at=None if status in ("PENDING", "PROCESSING") else created))
    sent: list[tuple[str, Any]] = []

    def seen(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, *args: Any) -> None:
        if re.search(r"FROM payments\b", statement) and "GROUP BY" in statement:
            sent.append((statement, parameters))

    event.listen(rt.engine.sync_engine, "before_cursor_execute", seen)
    try:
        async with rt.sessionmaker() as s:
            report = await reconciliation(s, scope=lambda query, model: query, start=START, end=END)
    finally:
        event.remove(rt.engine.sync_engine, "before_cursor_execute", seen)
    figures = report["payments"]
    assert [(line["name"], line["count"], line["completedCount"]) for line in figures["byPaymentType"]
            if line["name"].startswith("Levy")] == [(f"Levy {k:02d}", 18, 6) for k in range(30)]
    assert {(line["status"], line["count"]) for line in figures["byStatus"]} == {(s, 60) for s in statuses}
    assert [(line["paymentMethod"], line["collectedCount"]) for line in report["settled"]] == [
        ("BANK_BK", 90), ("MOBILE_MONEY_MTN", 90)]
    # What the database sent back for them: the lines (a few a figure), not the 540 groups.
    [(statement, parameters)] = sent
    async with rt.engine.connect() as conn:
        rows = (await conn.exec_driver_sql(statement, parameters)).all()
    assert len(rows) <= 50, len(rows)
