"""The admin API at a big cooperative's volume: lists whose query grew with the rows behind them (a Python list
of ids bound one parameter each) and broke past the driver's limit of 32,767 bind parameters a statement."""

from __future__ import annotations

from typing import Any

from sqlalchemy import text

from tests.admin_api.conftest import Caller
from tests.channels.sms.helpers import make_payment
from tests.conftest import requires_pg

ALINE = "+250788000001"
_SMS = ("INSERT INTO sms_messages (id, cooperative_id, member_id, phone_enc, phone_index, phone_masked, template,"
        " language, body, encoding, length, segments, status, idempotency_key, created_at, updated_at)"
        " SELECT gen_random_uuid()::text, :coop, NULL, 'x', md5(k), '+25078****001', t, 'en', 'b', 'GSM-7', 1, 1,"
        " 'DELIVERED', k, now() - (n || ' seconds')::interval, now() FROM (VALUES {rows}) v (n, t, k)")


@requires_pg
async def test_a_payments_messages_are_listed_whatever_the_number_of_its_refunds(
    rt: Any, demo: dict[str, Any], admin: Caller
) -> None:
    """A payment refunded in 16,400 parts (an integration paying members back a little at a time): its SMS were
    matched by an exact key per refund and notice template, 32,800 parameters, and the list answered 503 "a
    dependency is unavailable" for ever. It lists the payment's receipt and its refunds' notices."""
    payment = await make_payment(rt, demo["cooperative_id"], account=ALINE, member_id=demo["members"][ALINE])
    async with rt.engine.begin() as conn:
        await conn.execute(text(
            "INSERT INTO refunds (id, cooperative_id, payment_id, reference, amount_minor, currency, status,"
            " idempotency_key, provider_reference, created_at, updated_at, completed_at, returned_by_provider)"
            " SELECT md5('vol-refund' || i)::uuid::text, :coop, :payment, 'RFV' || i, 1, 'RWF', 'COMPLETED',"
            " 'vol-' || i, 'vol-ref-' || i, now(), now(), now(), false FROM generate_series(1, 16400) i"),
            {"coop": demo["cooperative_id"], "payment": payment.id})
        first, last = (await conn.execute(text(
            "SELECT md5('vol-refund' || i)::uuid::text FROM unnest(ARRAY[1, 16400]) i"))).scalars()
        await conn.execute(text(_SMS.format(rows=", ".join(f"({n}, '{t}', '{k}')" for n, t, k in (
            (1, "payment_receipt", f"payment_receipt:{payment.id}"),
            (2, "refund_completed", f"refund_completed:{first}"),
            (3, "refund_failed", f"refund_failed:{last}"),
            (4, "payment_receipt", "payment_receipt:00000000-0000-4000-8000-000000000000"))))),
            {"coop": demo["cooperative_id"]})
    page = await admin.json("GET", f"/v1/payments/{payment.id}/messages", 200)
    assert [(m["template"], m["paymentId"]) for m in page["data"]] == [
        ("payment_receipt", payment.id), ("refund_completed", payment.id), ("refund_failed", payment.id)]
    assert page["meta"]["total"] == 3
