"""What the write paths send to PostgreSQL: the budget the benchmark's figures rest on.

Counting statements is exact where timing is noisy: a change that adds a round trip to a payment, a
callback or a connection checkout fails here instead of showing up as a slower benchmark weeks later.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import event

from core.models import Payment
from core.payments import handle_provider_event
from core.ports import EventKind, ProviderEvent, ProviderOutcome
from tests.admin_api.conftest import payment_body
from tests.conftest import requires_pg

pytestmark = requires_pg


@contextmanager
def statements(engine: Any) -> Iterator[list[str]]:
    """The first words of every statement the engine sends, BEGIN and COMMIT included."""
    seen: list[str] = []
    sync = engine.sync_engine

    def before(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append(" ".join(statement.split()[:4]))

    def begin(_conn: Any) -> None:
        seen.append("BEGIN")

    def commit(_conn: Any) -> None:
        seen.append("COMMIT")

    listeners = [("before_cursor_execute", before), ("begin", begin), ("commit", commit)]
    for name, fn in listeners:
        event.listen(sync, name, fn)
    try:
        yield seen
    finally:
        for name, fn in listeners:
            event.remove(sync, name, fn)


async def test_an_api_payment_is_one_read_and_one_write(client: Any, demo: Any, rt: Any, admin: Any) -> None:
    body = payment_body(demo["payment_types"]["Monthly Rent"])
    with statements(rt.engine) as sent:
        created = await admin.json("POST", "/v1/payments", 201, json=body)
    assert sent == ["BEGIN", "SELECT payment_types.id, payment_types.cooperative_id, payment_types.name,",
                    "WITH n AS (SELECT", "COMMIT"], sent
    async with rt.sessionmaker() as s:
        stored = await s.get(Payment, created["id"])
    assert stored is not None and stored.reference == created["reference"]
    # The replay finds the first payment through the INSERT's conflict: one SELECT more, nothing written.
    with statements(rt.engine) as replay:
        again = await admin.req("POST", "/v1/payments", json=body)
    assert again.status == 200 and (await again.json())["id"] == created["id"]
    assert [s.split()[0] for s in replay] == ["BEGIN", "SELECT", "WITH", "SELECT", "COMMIT"], replay


async def test_a_callback_is_four_statements_in_one_transaction(client: Any, demo: Any, rt: Any,
                                                               admin: Any) -> None:
    created = await admin.json("POST", "/v1/payments", 201, json=payment_body(demo["payment_types"]["Monthly Rent"]))
    async with rt.sessionmaker() as s:
        payment = await s.get(Payment, created["id"])
    callback = ProviderEvent(provider=payment.provider, kind=EventKind.COLLECTION, event_id="cb-1",
                             reference=payment.provider_reference, outcome=ProviderOutcome.SUCCEEDED,
                             provider_transaction_id="TX-1")
    with statements(rt.engine) as sent:
        assert await handle_provider_event(rt, callback) == "completed"
    assert [s.split()[0] + " " + s.split()[-1] for s in sent] == [
        "BEGIN BEGIN", "WITH (INSERT", "WITH (UPDATE", "INSERT (kind,", "UPDATE payment_id=$1::VARCHAR,",
        "COMMIT COMMIT"], sent
    assert "INSERT INTO outbox_jobs" in sent[3]  # the receipt and the webhook event: one executemany


