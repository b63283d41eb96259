"""Two administrators editing at the same moment: a payment type's cross-field rule holds against the row as
committed, and a cooperative's unique shortCode or ussdExtension given to two at once answers the second 409.

The interleavings are forced: each request, once it has read, waits up to WAIT seconds for the other to have
read too. Without a lock both read before either writes; with one the second waits on the row and the first
goes on after WAIT.
"""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import select

import admin_api.payments
from core import cooperatives
from core import payment_types as service
from core.models import AdminUser, AuditEvent, Cooperative, OutboxJob, PaymentType
from tests.admin_api.conftest import make_payment
from tests.admin_api.test_cooperatives import NEW as NEW_COOP
from tests.admin_api.test_payment_void import _line as recorded_line

WAIT = 1.0


def _both_read(monkeypatch: Any, module: Any, name: str) -> None:
    """`module.name` (a read) returns once the other request has read too, or after WAIT."""
    original, seen, both = getattr(module, name), [], asyncio.Event()

    async def read_then_wait(*args: Any, **kwargs: Any) -> Any:
        out = await original(*args, **kwargs)
        seen.append(1)
        if len(seen) == 2:
            both.set()
        await asyncio.wait([asyncio.ensure_future(both.wait())], timeout=WAIT)
        return out

    monkeypatch.setattr(module, name, read_then_wait)


async def test_two_edits_of_a_payment_type_at_once_cannot_make_it_unpayable(admin, rt, demo, monkeypatch):
    """{"amount": 0} (fine while custom amounts are allowed) and {"allowCustomAmount": false} (fine while the
    amount is positive), at once: each was checked against the row the other had not yet changed, and together
    they saved a type that shows 0 RWF and can never be paid. Now the second is checked against the first."""
    made = await admin.json("POST", "/v1/payment-types", 201,
                            json={"name": "Donation", "amount": 5000, "allowCustomAmount": True})
    _both_read(monkeypatch, service, "get_payment_type")
    answers = await asyncio.gather(
        admin.req("PATCH", f"/v1/payment-types/{made['id']}", json={"amount": 0}),
        admin.req("PATCH", f"/v1/payment-types/{made['id']}", json={"allowCustomAmount": False}))
    assert sorted(a.status for a in answers) == [200, 400], [await a.json() for a in answers]
    async with rt.sessionmaker() as s:
        row = await s.get(PaymentType, made["id"])
    assert row is not None
    assert not (row.amount_minor == 0 and not row.allow_custom_amount), "an unpayable type was saved"
    [refused] = [await a.json() for a in answers if a.status == 400]
    assert refused["message"] in (["amount must be a positive number"],
                                  ["amount is 0, so allowCustomAmount must stay true unless a positive amount is set"])


async def test_one_ussd_extension_given_to_two_cooperatives_at_once(superadmin, rt, coop_b, demo, monkeypatch):
    """Both pass the uniqueness check before either writes: the unique index refused the second with a 500.
    Now it gets the 409 the check gives, and the one that won keeps the extension."""
    _both_read(monkeypatch, cooperatives, "_unique")
    a, b = demo["cooperative_id"], coop_b["cooperative_id"]
    answers = await asyncio.gather(
        superadmin.req("PATCH", f"/v1/cooperatives/{a}", json={"ussdExtension": "77"}),
        superadmin.req("PATCH", f"/v1/cooperatives/{b}", json={"ussdExtension": "77"}))
    assert sorted(r.status for r in answers) == [200, 409], [await r.json() for r in answers]
    [refused] = [await r.json() for r in answers if r.status == 409]
    assert refused["message"] == "ussdExtension '77' is already used"
    async with rt.sessionmaker() as s:
        holders = list((await s.execute(select(Cooperative.id).where(Cooperative.ussd_extension == "77"))).scalars())
    [winner] = [coop_id for coop_id, r in zip((a, b), answers, strict=True) if r.status == 200]
    assert holders == [winner]
    # Nothing was left half done: the loser still takes another extension.
    loser = b if winner == a else a
    changed = await superadmin.json("PATCH", f"/v1/cooperatives/{loser}", 200, json={"ussdExtension": "78"})
    assert changed["ussdExtension"] == "78"


async def test_one_short_code_given_to_two_new_cooperatives_at_once(superadmin, rt, demo, monkeypatch):
    body = {k: v for k, v in NEW_COOP.items() if k != "ussdExtension"}
    _both_read(monkeypatch, cooperatives, "_unique")
    answers = await asyncio.gather(superadmin.req("POST", "/v1/cooperatives", json=body),
                                   superadmin.req("POST", "/v1/cooperatives", json={**body, "name": "Another SACCO"}))
    assert sorted(r.status for r in answers) == [201, 409], [await r.json() for r in answers]
    [refused] = [await r.json() for r in answers if r.status == 409]
    assert refused["message"] == "shortCode 'MFS' is already used"
    async with rt.sessionmaker() as s:
        made = (await s.execute(select(Cooperative.name).where(Cooperative.short_code == "MFS"))).scalars().all()
    assert len(made) == 1


async def test_the_desk_cancels_or_voids_one_payment_twice_at_once(admin, rt, demo, monkeypatch):
    """Two desk clerks (or a client retrying) cancel one open payment, or void one recording, at the same moment,
    both having read it open: one effect (one audit row naming the clerk, one SMS, one webhook event, one watch)
    and a 409 saying why for the other, which waits on the payment's lock and reads it as the first left it."""
    opened = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    recorded = await admin.json("POST", "/v1/payments/recorded", 201, json=recorded_line(demo))
    async with rt.sessionmaker() as s:
        clerk = (await s.execute(select(AdminUser.id).where(AdminUser.username == demo["admin"][0]))).scalar_one()
    _both_read(monkeypatch, admin_api.payments, "one")
    for payment, act, action, jobs, said in (
            (opened, "cancel", "payment.cancelled", 3,
             "payment is CANCELLED (cancelled by the cooperative: {note}): only an open payment (PENDING or "
             "PROCESSING) can be cancelled"),
            (recorded, "void", "payment.voided", 1, "payment is VOIDED already: recording voided: {note}")):
        async with rt.sessionmaker() as s:
            jobs_before = set((await s.execute(select(OutboxJob.dedupe_key))).scalars())
        notes = ("first clerk's note", "second clerk's note")
        answers = await asyncio.gather(*(
            admin.req("POST", f"/v1/payments/{payment['id']}/{act}", json={"note": note}) for note in notes))
        assert sorted(r.status for r in answers) == [200, 409], [await r.json() for r in answers]
        [won] = [note for note, r in zip(notes, answers, strict=True) if r.status == 200]
        [refused] = [await r.json() for r in answers if r.status == 409]
        assert refused["message"] == said.format(note=won)
        async with rt.sessionmaker() as s:
            audited = (await s.execute(select(AuditEvent.actor, AuditEvent.after).where(
                AuditEvent.entity_id == payment["id"], AuditEvent.action == action))).all()
            new_jobs = [k for k in (await s.execute(select(OutboxJob.dedupe_key))).scalars() if k not in jobs_before]
        assert [(actor, after["note"]) for actor, after in audited] == [(f"admin:{clerk}", won)]
        assert len(new_jobs) == jobs, new_jobs
