"""An erasure scrubs her payments', refunds' and disputes' stored webhook events in the database, one UPDATE for
many rows (core.members._erased_event_sql), where it read each row into Python and wrote it back
(_erased_event_data): the SQL leaves every payload as _erased_event_data does, on PostgreSQL (JSONB) and SQLite
(JSON text) alike."""

from __future__ import annotations

import itertools
import json
from typing import Any

from sqlalchemy import insert, select, update

from core import members
from core.members import _erased_event_data, _erased_event_sql, _json_text_at
from core.models import OutboxJob, WebhookDelivery
from core.provider_events import CANCELLED_BY_COOPERATIVE
from core.recorded_payments import VOIDED_RECORDING
from core.refunds import RECORDED_BY_ADMIN, WITHDRAWN_BY_ADMIN
from tests.core.test_webhooks import approved_endpoint

ABSENT = object()
NOTE = "Jeanne M. D-707 +250788777111"
REASONS = [ABSENT, None, 5, True, {"a": 1}, "insufficient funds", NOTE, CANCELLED_BY_COOPERATIVE + NOTE,
           CANCELLED_BY_COOPERATIVE, VOIDED_RECORDING + "Jéanne ✓", RECORDED_BY_ADMIN + NOTE, WITHDRAWN_BY_ADMIN + "x",
           CANCELLED_BY_COOPERATIVE.upper() + NOTE,  # case as written: not the gateway's words
           CANCELLED_BY_COOPERATIVE.replace(" ", "_") + NOTE,  # a LIKE wildcard's match, not a prefix
           "x " + RECORDED_BY_ADMIN + NOTE]
REVIEWS = [ABSENT, None, "called her", [1], {}, {"note": None, "mismatchDetail": "60000, expected 50000"},
           {"note": f"called {NOTE}", "mismatchDetail": "x", "by": "admin:1"}, {"note": 0}, {"note": False},
           {"note": {"n": NOTE}}]
ACCOUNTS = [ABSENT, None, "078***111"]
RESOLUTIONS = [ABSENT, None, "resolved", "rejected", "withdrawn", NOTE, "Rejected", "rejected " + NOTE, "", 5, True,
               False, 0, {"a": NOTE}, ["rejected"]]


def _data(**fields: Any) -> dict[str, Any]:
    return {"id": "p-1", "amount": 50_000, "nested": {"paymentAccount": "078***111", "reason": NOTE},
            **{key: value for key, value in fields.items() if value is not ABSENT}}


def _payloads() -> list[tuple[str | None, Any]]:
    """(event type, data): each family's keys present and absent, null or not, each failureReason prefix, non-dict
    data, other families' events (left as sent)."""
    payment = [_data(paymentAccount=account, failureReason=reason, review=review, reason=NOTE)
               for account, reason, review in itertools.product(ACCOUNTS, REASONS, REVIEWS)]
    refund = [_data(reason=reason, failureReason=failure, paymentAccount="078***111", review={"note": NOTE})
              for reason, failure in itertools.product([ABSENT, None, NOTE, 7], REASONS)]
    dispute = [_data(resolution=resolution, status="REJECTED", reason="OTHER", paymentAccount="078***111",
                     failureReason=NOTE, review={"note": NOTE}) for resolution in RESOLUTIONS]
    odd = [None, "text", 12, [{"id": "p-1", "paymentAccount": "078***111"}], {}]
    return [*((kind, data) for kind in ("payment.completed", "payment.failed") for data in payment),
            *((kind, data) for kind in ("refund.completed", "refund.failed") for data in refund),
            *((kind, data) for kind in ("dispute.opened", "dispute.updated") for data in dispute),
            *((kind, data) for kind in ("payment.completed", "refund.failed", "dispute.opened", "Payment.completed",
                                        "payment_completed", "refunds", "Dispute.updated", "disputes", None)
              for data in [*odd, *payment[:20], *refund[:10], *dispute])]


async def test_the_database_scrubs_stored_events_as_erased_event_data_does(rt: Any, demo: Any) -> None:
    endpoint, _ = await approved_endpoint(rt, demo["cooperative_id"], "http://127.0.0.1:9/hook")
    cases = _payloads()
    jobs = [{"kind": "webhook.event", "cooperative_id": demo["cooperative_id"], "dedupe_key": f"wh:{n}",
             "payload": {**({} if kind is None else {"event_type": kind}), "event_id": f"evt_{n}", "data": data}}
            for n, (kind, data) in enumerate(cases)]
    deliveries = [{"cooperative_id": demo["cooperative_id"], "endpoint_id": endpoint.id, "event_id": f"evt_{n}",
                   "event_type": kind or "", "payload": {"id": f"evt_{n}", "type": kind, "data": data}}
                  for n, (kind, data) in enumerate(cases)]
    async with rt.sessionmaker.begin() as s:
        await s.execute(insert(OutboxJob), jobs)
        await s.execute(insert(WebhookDelivery), deliveries)
    async with rt.sessionmaker() as s:
        wanted = {
            **{("job", row.dedupe_key): {**row.payload, "data": _erased_event_data(
                str(row.payload.get("event_type")), row.payload["data"])}
               for row in (await s.execute(select(OutboxJob))).scalars()},
            **{("delivery", row.event_id): {**row.payload, "data": _erased_event_data(row.event_type,
                                                                                       row.payload["data"])}
               for row in (await s.execute(select(WebhookDelivery))).scalars()}}
    assert sum(wanted[("job", job["dedupe_key"])] != job["payload"] for job in jobs) > 200  # some to scrub

    async with rt.sessionmaker.begin() as s:
        dialect = s.get_bind().dialect.name
        await s.execute(update(OutboxJob).values(payload=_erased_event_sql(
            dialect, OutboxJob.payload, _json_text_at(dialect, OutboxJob.payload, "event_type"))))
        await s.execute(update(WebhookDelivery).values(payload=_erased_event_sql(
            dialect, WebhookDelivery.payload, WebhookDelivery.event_type)))

    async with rt.sessionmaker() as s:
        got = {**{("job", row.dedupe_key): row.payload for row in (await s.execute(select(OutboxJob))).scalars()},
               **{("delivery", row.event_id): row.payload
                  for row in (await s.execute(select(WebhookDelivery))).scalars()}}
    assert len(got) == 2 * len(cases)
    wrong = {key: (got[key], wanted[key]) for key in wanted  # as JSON: True == 1 in Python
             if json.dumps(got[key], sort_keys=True) != json.dumps(wanted[key], sort_keys=True)}
    assert not wrong, list(wrong.items())[:3]
    assert members.NOTE_ERASED in str(got)
    assert {json.dumps(payload["data"]["resolution"]) for payload in got.values()  # a dispute's, as its row's
            if str(payload.get("type", payload.get("event_type"))).startswith("dispute.")
            and isinstance(payload["data"], dict) and "resolution" in payload["data"]} == {
        "null", json.dumps(members.NOTE_ERASED), '"resolved"', '"rejected"', '"withdrawn"'}


def test_the_sqlite_statement_runs_on_sqlite_before_3_38() -> None:
    """SQLite's -> and ->> operators came with 3.38 (Debian 11's is 3.34, Ubuntu 22.04's 3.37): a statement with
    them is a syntax error there, and her erasure failed on the embedded default. json_extract, as every other
    statement of the gateway on SQLite."""
    from sqlalchemy.dialects import sqlite

    dialect = "sqlite"
    for statement in (
            update(OutboxJob).values(payload=_erased_event_sql(
                dialect, OutboxJob.payload, _json_text_at(dialect, OutboxJob.payload, "event_type"))),
            update(WebhookDelivery).values(payload=_erased_event_sql(
                dialect, WebhookDelivery.payload, WebhookDelivery.event_type))):
        sql = str(statement.compile(dialect=sqlite.dialect()))
        assert "->" not in sql, sql
