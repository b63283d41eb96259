"""Each audit row of an SMS (sms.sent, sms.delivered, sms.failed, ...) says which template went to which member
(`template`, `memberId`; null for a number of no member), read from the message's row as it moved: before, it held
only the status and the aggregator's fields, and an admin reading the log could not tell a receipt from a reminder,
nor whose it was. Never the number, masked or not, nor the text: the audit log is append-only, so erasing a member
could not clear them there."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import select

from core.db import utcnow
from core.models import AuditEvent, SmsMessage
from core.notify import send_sms
from core.phone import normalize
from tests.admin_api.conftest import bearer
from tests.channels.sms.helpers import make_payment
from tests.channels.sms.test_jobs import ALINE, queue_receipt, sms_rows
from tests.conftest import drain


async def _audits(rt: Any, sms_id: str) -> list[AuditEvent]:
    async with rt.sessionmaker() as s:
        return list((await s.execute(select(AuditEvent).where(
            AuditEvent.entity_type == "sms", AuditEvent.entity_id == sms_id).order_by(AuditEvent.id))).scalars())


def _nothing_personal(after: dict[str, Any], row: SmsMessage, phone: str) -> None:
    said = json.dumps(after)
    assert row.body and row.body not in said, said
    assert row.phone_masked not in said and phone[-9:] not in said, said


async def test_a_receipts_audit_rows_name_its_template_and_member(rt: Any, demo: dict[str, Any], sim: Any,
                                                                  worker: Any, client: Any) -> None:
    aline = demo["members"][ALINE]
    payment = await make_payment(rt, demo["cooperative_id"], account=ALINE, member_id=aline)
    await queue_receipt(rt, demo, payment.id)
    assert await drain(worker) == 1
    [row] = await sms_rows(rt)
    assert row.status == "SENT" and row.member_id == aline
    report = await client.post("/sms/africastalking/delivery", data={"id": row.provider_message_id,
                                                                      "status": "Success"})
    assert report.status == 200, await report.text()

    sent, delivered = await _audits(rt, row.id)
    assert (sent.action, delivered.action) == ("sms.sent", "sms.delivered")
    for event in (sent, delivered):
        after = event.after or {}
        assert event.cooperative_id == demo["cooperative_id"]
        assert (after["template"], after["memberId"]) == ("payment_receipt", aline)
        _nothing_personal(after, row, ALINE)
    # What it said before stays, in the log's one format (camelCase) on every database.
    assert (sent.after or {})["providerMessageId"] == row.provider_message_id

    # As the cooperative's admin reads it.
    admin = await bearer(client, *demo["admin"])
    listed = await admin.json("GET", "/v1/audit-events?action=sms.sent", 200)
    assert [(e["entityId"], e["after"]["template"], e["after"]["memberId"]) for e in listed["data"]] == [
        (row.id, "payment_receipt", aline)]


async def test_a_refusal_of_a_text_to_no_member_says_so(rt: Any, demo: dict[str, Any], sim: Any,
                                                        worker: Any) -> None:
    """A payer who is no member (a relative's number paid): memberId null, the template still named."""
    payer = "+250788000555"
    payment = await make_payment(rt, demo["cooperative_id"], account=payer, created_at=utcnow())
    sim.set_failure("UserInBlackList", number=payer)  # refused for good: REJECTED, not retried
    async with rt.sessionmaker.begin() as session:
        await send_sms(session, template="payment_receipt", cooperative_id=demo["cooperative_id"],
                       context={"payment_id": payment.id}, cipher=rt.cipher, phone=normalize(payer),
                       dedupe="receipt-payer")
    await drain(worker)
    [row] = await sms_rows(rt)
    assert (row.status, row.member_id) == ("REJECTED", None)
    [event] = await _audits(rt, row.id)
    after = event.after or {}
    assert event.action == "sms.rejected"
    assert (after["template"], after["memberId"]) == ("payment_receipt", None)
    _nothing_personal(after, row, payer)
