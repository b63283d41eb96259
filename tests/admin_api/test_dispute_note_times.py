"""A dispute note's `at` is written as every API time ("2026-12-03T07:03:17Z"). Before: Python's isoformat
("2026-12-03T07:03:17.960057+00:00"); notes stored so are shown in the API's form too."""

from __future__ import annotations

import json
import re
from datetime import timedelta

from sqlalchemy import select, update

from core.db import iso_z, utcnow
from core.models import Dispute
from tests.admin_api.conftest import complete_payment, make_payment
from tests.conftest import drain
from tests.core.test_webhooks import approved_endpoint, receiver  # noqa: F401

SEED_FORMAT = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")


async def _dispute(admin, rt, demo, note="paid twice"):
    payment = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    await complete_payment(rt, payment["id"])
    return await admin.json("POST", "/v1/disputes", 201,
                            json={"paymentId": payment["id"], "reason": "WRONG_AMOUNT", "note": note})


async def test_new_notes_are_written_and_read_in_the_apis_form(admin, rt, demo):
    start = iso_z(utcnow() - timedelta(seconds=1))
    opened = await _dispute(admin, rt, demo)
    await admin.json("POST", f"/v1/disputes/{opened['id']}/transitions", 200,
                     json={"status": "UNDER_REVIEW", "note": "checking", "evidence": "line 42"})
    await admin.json("POST", f"/v1/disputes/{opened['id']}/transitions", 200,
                     json={"status": "UNDER_REVIEW", "note": "more evidence"})  # a note that keeps the status
    end = iso_z(utcnow() + timedelta(seconds=1))
    shown = await admin.json("GET", f"/v1/disputes/{opened['id']}", 200)
    listed = (await admin.json("GET", "/v1/disputes", 200))["data"]
    [in_list] = [d for d in listed if d["id"] == opened["id"]]
    ats = [n["at"] for n in shown["notes"]]
    assert [n["text"] for n in shown["notes"]] == ["paid twice", "checking", "more evidence"]
    assert ats == [n["at"] for n in in_list["notes"]] and opened["notes"][0]["at"] == ats[0]
    for at in ats:
        assert SEED_FORMAT.match(at), at
        assert start <= at <= end  # the same form compares as time
    async with rt.sessionmaker() as s:
        stored = (await s.execute(select(Dispute.notes).where(Dispute.id == opened["id"]))).scalar_one()
    assert [n["at"] for n in stored] == ats  # stored in that form, not only shown in it


async def test_every_note_has_the_same_fields_the_opening_one_too(admin, rt, demo):
    """A client reads each note's `text`, `evidence` and `status` alike: the opening note had neither `evidence`
    nor `status` (a KeyError, `undefined`, where every later note has them)."""
    opened = await _dispute(admin, rt, demo)
    assert opened["notes"] == [{"at": opened["notes"][0]["at"], "actor": opened["notes"][0]["actor"],
                                "text": "paid twice", "evidence": None, "status": "OPEN"}]
    await admin.json("POST", f"/v1/disputes/{opened['id']}/transitions", 200,
                     json={"status": "UNDER_REVIEW", "evidence": "MTN statement line 42"})
    shown = await admin.json("GET", f"/v1/disputes/{opened['id']}", 200)
    assert [{k: v for k, v in n.items() if k not in ("at", "actor")} for n in shown["notes"]] == [
        {"text": "paid twice", "evidence": None, "status": "OPEN"},
        {"text": None, "evidence": "MTN statement line 42", "status": "UNDER_REVIEW"}]
    async with rt.sessionmaker() as s:
        stored = (await s.execute(select(Dispute.notes).where(Dispute.id == opened["id"]))).scalar_one()
    assert stored[0]["status"] == "OPEN" and stored[0]["evidence"] is None  # stored so, not only shown


async def test_an_opening_note_stored_before_reads_as_a_new_one(admin, rt, demo):
    """An opening note stored without `evidence` and `status` (the only note ever written so) reads as the opening
    note written now reads: a client sorting or showing notes by status sees OPEN on both, not null on the old."""
    opened = await _dispute(admin, rt, demo)
    new = (await admin.json("GET", f"/v1/disputes/{opened['id']}", 200))["notes"]
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Dispute).where(Dispute.id == opened["id"])
                        .values(notes=[{k: v for k, v in new[0].items() if k not in ("evidence", "status")}]))
    old = (await admin.json("GET", f"/v1/disputes/{opened['id']}", 200))["notes"]
    assert old == new and list(old[0]) == ["at", "actor", "text", "evidence", "status"]
    assert old[0]["status"] == "OPEN" and old[0]["evidence"] is None


async def test_notes_stored_in_the_old_form_read_in_the_apis_form(admin, rt, demo):
    opened = await _dispute(admin, rt, demo)
    old = [
        {"at": "2026-12-03T07:03:17.960057+00:00", "actor": "admin:1", "text": "before the fix"},
        {"at": "2026-12-03T10:04:00+03:00", "actor": "admin:1", "text": "another offset",
         "evidence": None, "status": "UNDER_REVIEW"},
        {"at": "2026-12-03T07:05:00Z", "actor": "admin:1", "text": "already in the API's form"},
    ]
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Dispute).where(Dispute.id == opened["id"]).values(notes=old))
    shown = await admin.json("GET", f"/v1/disputes/{opened['id']}", 200)
    assert [n["at"] for n in shown["notes"]] == ["2026-12-03T07:03:17Z", "2026-12-03T07:04:00Z",
                                                  "2026-12-03T07:05:00Z"]
    # nothing else changed, but that a note stored without `evidence` or `status` shows them as a new opening note
    # does: only the opening note was ever stored without them, and a dispute is always opened OPEN
    assert [{k: v for k, v in n.items() if k != "at"} for n in shown["notes"]] == [
        {"evidence": None, "status": "OPEN", **{k: v for k, v in n.items() if k != "at"}} for n in old]
    listed = (await admin.json("GET", "/v1/disputes", 200))["data"]
    assert [n["at"] for n in listed[0]["notes"]] == [n["at"] for n in shown["notes"]]
    async with rt.sessionmaker() as s:
        stored = (await s.execute(select(Dispute.notes).where(Dispute.id == opened["id"]))).scalar_one()
    assert stored == old  # shown in the API's form; the stored rows are left as they are


async def test_dispute_webhook_events_carry_no_notes(admin, rt, demo, receiver, worker):  # noqa: F811
    """The events' data name the dispute (its times in the API's form) without its notes: their times are the
    API's alone."""
    hook, url = receiver
    await approved_endpoint(rt, demo["cooperative_id"], url, events=["dispute.opened", "dispute.updated"])
    opened = await _dispute(admin, rt, demo)
    await admin.json("POST", f"/v1/disputes/{opened['id']}/transitions", 200,
                     json={"status": "UNDER_REVIEW", "note": "checking"})
    await drain(worker)
    bodies = [json.loads(r["body"]) for r in hook.requests]
    assert sorted(b["type"] for b in bodies) == ["dispute.opened", "dispute.updated"]
    for body in bodies:
        assert body["data"]["id"] == opened["id"] and "notes" not in body["data"]
        assert body["data"]["createdAt"] == opened["createdAt"] and SEED_FORMAT.match(body["data"]["createdAt"])


async def test_an_erasure_leaves_old_and_new_opening_notes_reading_alike(admin, rt, demo):
    """core.members._erase_disputes scrubs a note's text and evidence: an opening note stored before (no `evidence`,
    no `status`) and one stored now read the same once she is erased (text erased, evidence null, status OPEN)."""
    from tests.channels.sms.helpers import make_payment as paid

    jeanne = await admin.json("POST", "/v1/members", 201, json={"name": "Jeanne M", "phone": "+250788777111",
                                                                  "status": "PENDING"})
    await admin.json("POST", f"/v1/members/{jeanne['id']}/approve", 200)
    ids = []
    for reference in ("PAY_OLD_NOTE_1", "PAY_OLD_NOTE_2"):
        payment = await paid(rt, demo["cooperative_id"], account="+250788777111", member_id=jeanne["id"],
                             reference=reference)
        ids.append((await admin.json("POST", "/v1/disputes", 201, json={
            "paymentId": payment.id, "reason": "WRONG_AMOUNT", "note": "Jeanne says twice"}))["id"])
    async with rt.sessionmaker.begin() as s:
        note = (await s.execute(select(Dispute.notes).where(Dispute.id == ids[1]))).scalar_one()[0]
        await s.execute(update(Dispute).where(Dispute.id == ids[1]).values(
            notes=[{k: v for k, v in note.items() if k not in ("evidence", "status")}]))
    await admin.json("DELETE", f"/v1/members/{jeanne['id']}", 200)
    await admin.json("POST", f"/v1/members/{jeanne['id']}/erase", 200)
    shown = [(await admin.json("GET", f"/v1/disputes/{i}", 200))["notes"] for i in ids]
    assert [[{k: v for k, v in n.items() if k != "at"} for n in notes] for notes in shown] == [
        [{"actor": shown[0][0]["actor"], "text": "[note erased]", "evidence": None, "status": "OPEN"}]] * 2
