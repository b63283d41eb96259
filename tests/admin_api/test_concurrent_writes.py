"""Writes that race: the same dispute, member or payment-type name asked for by several requests at once.

Every request but one gets the 409 a later, sequential duplicate gets; none gets a 500, and one row is made.
The races need two connections writing at once: on the embedded SQLite default writes queue on the file lock.
"""

from __future__ import annotations

import asyncio
import uuid

from sqlalchemy import func, select

from core.models import Dispute, Member, PaymentType
from tests.admin_api.conftest import make_payment
from tests.conftest import requires_pg

AT_ONCE = 8
ROUNDS = 5


async def _all_at_once(caller, method, path, body):
    answers = await asyncio.gather(*[caller.req(method, path, json=body) for _ in range(AT_ONCE)])
    return sorted(a.status for a in answers), [await a.json() for a in answers]


@requires_pg
async def test_disputes_opened_at_once_make_one_and_409_the_rest(admin, rt, demo):
    payment = await make_payment(admin, demo["payment_types"]["Water"], amount=5000)
    body = {"paymentId": payment["id"], "reason": "OTHER"}
    statuses, bodies = await _all_at_once(admin, "POST", "/v1/disputes", body)
    assert statuses == [201] + [409] * (AT_ONCE - 1), bodies
    [made] = [b for b in bodies if "reference" in b]
    assert all(b["message"] == f"dispute {made['reference']} is already open for this payment"
               for b in bodies if b is not made)
    async with rt.sessionmaker() as s:
        open_ = (await s.execute(select(func.count(Dispute.id)).where(Dispute.payment_id == payment["id"]))).scalar()
    assert open_ == 1


@requires_pg
async def test_notes_added_to_a_dispute_at_once_are_all_kept(admin, rt, demo):
    """Admins adding evidence to one dispute at the same moment: every note answered 200 is on the dispute
    (the move read the row the route had loaded before the lock, and wrote its notes over the others')."""
    for round_ in range(ROUNDS):
        payment = await make_payment(admin, demo["payment_types"]["Water"], amount=5000)
        dispute = await admin.json("POST", "/v1/disputes", 201, json={"paymentId": payment["id"], "reason": "OTHER"})
        texts = {f"evidence {round_}-{i}" for i in range(4)}
        answers = await asyncio.gather(*[admin.req("POST", f"/v1/disputes/{dispute['id']}/transitions",
                                                   json={"status": "OPEN", "note": t}) for t in sorted(texts)])
        assert [a.status for a in answers] == [200] * len(texts)
        final = await admin.json("GET", f"/v1/disputes/{dispute['id']}", 200)
        assert {n["text"] for n in final["notes"]} == texts


@requires_pg
async def test_a_note_racing_a_resolution_is_refused_not_written_over_it(admin, rt, demo):
    payment = await make_payment(admin, demo["payment_types"]["Water"], amount=5000)
    dispute = await admin.json("POST", "/v1/disputes", 201, json={"paymentId": payment["id"], "reason": "OTHER"})
    url = f"/v1/disputes/{dispute['id']}/transitions"
    resolve, note = await asyncio.gather(
        admin.req("POST", url, json={"status": "REJECTED", "note": "paid to another account, per statement"}),
        admin.req("POST", url, json={"status": "OPEN", "note": "late evidence"}))
    final = await admin.json("GET", f"/v1/disputes/{dispute['id']}", 200)
    texts = [n["text"] for n in final["notes"]]
    assert resolve.status == 200 and final["status"] == "REJECTED"
    assert "paid to another account, per statement" in texts
    # The note came first (kept, the dispute then rejected) or second (refused: a rejected dispute is closed).
    assert ("late evidence" in texts) == (note.status == 200), (note.status, texts)
    if note.status != 200:
        assert note.status in (409, 422), await note.text()


async def test_duplicate_open_disputes_left_by_an_earlier_race_answer_409_not_500(admin, rt, demo):
    payment = await make_payment(admin, demo["payment_types"]["Water"], amount=5000)
    first = await admin.json("POST", "/v1/disputes", 201, json={"paymentId": payment["id"], "reason": "OTHER"})
    async with rt.sessionmaker.begin() as s:  # what the race used to leave behind: a second OPEN dispute
        s.add(Dispute(id=str(uuid.uuid4()), cooperative_id=demo["cooperative_id"], payment_id=payment["id"],
                      reference="DSP_DUPLICATE", reason="OTHER", status="OPEN", channel="api", notes=[]))
    again = await admin.json("POST", "/v1/disputes", 409, json={"paymentId": payment["id"], "reason": "OTHER"})
    assert again["message"] == f"dispute {first['reference']} is already open for this payment"


@requires_pg
async def test_members_created_at_once_make_one_and_409_the_rest(admin, rt, demo):
    # (tests/core/test_members_concurrency.py holds the same race still; here, several rounds through HTTP)
    for n in range(ROUNDS):
        body = {"name": "Twin", "phone": f"+25078877{n:04d}"}
        statuses, bodies = await _all_at_once(admin, "POST", "/v1/members", body)
        assert statuses == [201] + [409] * (AT_ONCE - 1), bodies
        later = await admin.json("POST", "/v1/members", 409, json=body)
        assert all(b["message"] == later["message"] for b in bodies if "id" not in b)
    async with rt.sessionmaker() as s:
        count = (await s.execute(select(func.count(Member.id)).where(Member.name == "Twin"))).scalar()
    assert count == ROUNDS


@requires_pg
async def test_payment_types_named_alike_at_once_make_one_and_409_the_rest(admin, rt, demo):
    statuses, bodies = await _all_at_once(admin, "POST", "/v1/payment-types", {"name": "Levy 1", "amount": 100})
    assert statuses == [201] + [409] * (AT_ONCE - 1), bodies
    made = next(b for b in bodies if "id" in b)
    assert all(b["message"] == f"a payment type named 'Levy 1' already exists ({made['id']}): change it with PATCH "
               f"/v1/payment-types/{made['id']}, or give this one another name" for b in bodies if "id" not in b)
    # A rename races the same way: two types renamed to one free name at once.
    a = await admin.json("POST", "/v1/payment-types", 201, json={"name": "Levy A", "amount": 100})
    b = await admin.json("POST", "/v1/payment-types", 201, json={"name": "Levy B", "amount": 100})
    renames = await asyncio.gather(*[admin.req("PATCH", f"/v1/payment-types/{t['id']}", json={"name": "Levy C"})
                                     for t in (a, b)])
    assert sorted(r.status for r in renames) == [200, 409]
    async with rt.sessionmaker() as s:
        names = (await s.execute(select(PaymentType.name).where(PaymentType.cooperative_id == demo["cooperative_id"])
                                 )).scalars().all()
    levies = sorted(n for n in names if n.startswith("Levy"))
    assert levies.count("Levy 1") == 1 and levies.count("Levy C") == 1 and len(levies) == 3, levies


@requires_pg
async def test_one_username_asked_for_at_once_makes_one_account_and_409_the_rest(admin, rt):
    from core.models import AdminUser

    for round_ in range(3):
        username = f"same-{round_}-{uuid.uuid4().hex[:6]}@kh.rw"
        body = {"username": username, "password": "same-password-1", "role": "COOP_ADMIN"}
        statuses, bodies = await _all_at_once(admin, "POST", "/v1/users", body)
        assert statuses == [201] + [409] * (AT_ONCE - 1), bodies
        assert all(b["message"] == "this username is taken" for b in bodies if "id" not in b)
        async with rt.sessionmaker() as s:
            made = (await s.execute(select(func.count(AdminUser.id)).where(AdminUser.username == username))).scalar()
        assert made == 1
