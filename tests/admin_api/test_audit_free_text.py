"""Free text an admin wrote that reads like an instant (a dispute's note "2026-01-01T10:00:00+02:00", a payment
type's description "2026-01-01T00:00:00Z") comes back from the audit log exactly as written: only real instants
(datetimes the code records, and old rows' Python-isoformat times under a time's key) are written as the API
writes times."""

from __future__ import annotations

from sqlalchemy import insert, select

from core.models import AuditEvent
from tests.admin_api.conftest import complete_payment, make_payment

TEXTS = ("2026-01-01T10:00:00+02:00", "2026-01-01T00:00:00Z", "2026-01-01T10:00+00:00",
         "2026-01-01T00:00:00.123456+00:00", "2026-01-01T00:00:00", "2026-01-01 10:00")


async def _after(admin, entity_id: str) -> list[dict]:
    got = await admin.json("GET", f"/v1/audit-events?entityId={entity_id}", 200)
    return [e["after"] for e in sorted(got["data"], key=lambda e: e["id"])]


async def test_a_description_shaped_like_an_instant_is_shown_as_written(admin, rt, demo):
    made = await admin.json("POST", "/v1/payment-types", 201,
                            json={"name": "Dues", "description": TEXTS[0], "amount": 1000})
    for text in TEXTS[1:]:
        await admin.json("PATCH", f"/v1/payment-types/{made['id']}", 200, json={"description": text})
    assert [a["description"] for a in await _after(admin, made["id"])] == list(TEXTS)
    async with rt.sessionmaker() as s:
        stored = (await s.execute(select(AuditEvent.after).where(AuditEvent.entity_id == made["id"])
                                  .order_by(AuditEvent.id))).scalars().all()
    assert [a["description"] for a in stored] == list(TEXTS)


async def test_a_dispute_note_shaped_like_an_instant_is_shown_as_written(admin, rt, demo):
    payment = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    await complete_payment(rt, payment["id"])
    opened = await admin.json("POST", "/v1/disputes", 201,
                              json={"paymentId": payment["id"], "reason": "WRONG_AMOUNT", "note": "paid twice"})
    await admin.json("POST", f"/v1/disputes/{opened['id']}/transitions", 200,
                     json={"status": "UNDER_REVIEW", "note": TEXTS[0]})
    moved = [a for a in await _after(admin, opened["id"]) if a.get("status") == "UNDER_REVIEW"]
    assert [a["note"] for a in moved] == [TEXTS[0]]


async def test_old_rows_times_still_read_in_the_apis_form_and_their_text_as_written(admin, rt, demo):
    """A row a release before wrote: its times (Python's isoformat, under a time's key) read as the API writes
    them, as before; a note beside them that looks like one stays as written."""
    async with rt.sessionmaker.begin() as s:
        await s.execute(insert(AuditEvent).values(
            cooperative_id=demo["cooperative_id"], actor="admin:x", channel="api", action="dispute.under_review",
            entity_type="dispute", entity_id="old-row", before={"status": "OPEN"},
            after={"status": "UNDER_REVIEW", "note": "2026-11-02T07:03:17.960057+00:00",
                   "resolved_at": "2026-11-02T07:03:17.960057+00:00",
                   "attempt": {"at": "2026-11-02T09:03:17+02:00", "error": "2026-11-02T09:03:17+02:00"}}))
    [after] = await _after(admin, "old-row")
    assert after == {"status": "UNDER_REVIEW", "note": "2026-11-02T07:03:17.960057+00:00",
                     "resolvedAt": "2026-11-02T07:03:17Z",
                     "attempt": {"at": "2026-11-02T07:03:17Z", "error": "2026-11-02T09:03:17+02:00"}}
