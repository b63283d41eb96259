"""Payment types through HTTP: create, update, deactivate, lists, the active list, scoping, rate limit."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from core.models import AuditEvent, PaymentType

NEW = {
    "name": "Security Levy",
    "description": "Night guards",
    "amount": 2000,
    "currency": "RWF",
    "isRecurring": True,
    "recurringInterval": "MONTHLY",
    "dueDay": 5,
    "isActive": True,
}


async def test_create_matches_the_seed_and_is_audited(admin, rt, demo):
    body = await admin.json("POST", "/v1/payment-types", 201, json=NEW)
    assert {k: body[k] for k in NEW} == NEW
    assert body["cooperativeId"] == demo["cooperative_id"]
    async with rt.sessionmaker() as s:
        row = await s.get(PaymentType, body["id"])
        audit = (await s.execute(select(AuditEvent).where(AuditEvent.entity_id == body["id"]))).scalar_one()
    assert row.amount_minor == 2000 and audit.action == "payment_type.created"


async def test_create_validation(admin, demo):
    bad = await admin.json(
        "POST",
        "/v1/payment-types",
        400,
        json={"amount": 10, "recurringInterval": "WEEKLY", "dueDay": 40, "colour": "red"},
    )
    msgs = bad["message"]
    assert "name is required" in msgs and "property colour should not exist" in msgs
    assert "dueDay must not be greater than 31" in msgs
    assert any(m.startswith("recurringInterval must be one of") for m in msgs)
    core = await admin.json(
        "POST", "/v1/payment-types", 400, json={"name": "X", "amount": 5, "isRecurring": True}
    )
    assert core["message"] == ["recurringInterval is required when isRecurring is true",
                               "dueDay is required when isRecurring is true: reminders go out before it"]
    currency = await admin.json(
        "POST", "/v1/payment-types", 400, json={"name": "X", "amount": 5, "currency": "KES"}
    )
    assert currency["message"] == ["currency must be the cooperative's currency (RWF)"]
    await admin.json("POST", "/v1/payment-types", 400, json={"name": "X", "amount": -5})
    dup = await admin.json("POST", "/v1/payment-types", 409, json={"name": "monthly rent", "amount": 5})
    assert "already exists" in dup["message"]


async def test_rent_due_on_the_last_day_of_each_month(admin, rt, demo):
    """A due day of 31 is taken (it was refused above 28): in shorter months it falls on the last day, so the
    reminders go before 30 April and 28 February as before 31 January."""
    from datetime import date

    from core.models import PaymentType
    from core.reminders import due_dates

    made = await admin.json("POST", "/v1/payment-types", 201, json={
        "name": "End-of-month rent", "amount": 40000, "isRecurring": True, "recurringInterval": "MONTHLY",
        "dueDay": 31})
    assert made["dueDay"] == 31
    async with rt.sessionmaker() as s:
        row = await s.get(PaymentType, made["id"])
    assert due_dates(row, date(2027, 2, 10)) == (date(2027, 1, 31), date(2027, 2, 28))
    assert due_dates(row, date(2027, 4, 30)) == (date(2027, 3, 31), date(2027, 4, 30))


async def test_update_deactivate_and_lists(admin, demo):
    created = await admin.json("POST", "/v1/payment-types", 201, json=NEW)
    updated = await admin.json(
        "PATCH", f"/v1/payment-types/{created['id']}", 200, json={"amount": 2500, "description": None}
    )
    assert updated["amount"] == 2500 and updated["description"] is None
    await admin.json("PATCH", f"/v1/payment-types/{created['id']}", 400, json={})
    await admin.json("PATCH", f"/v1/payment-types/{created['id']}", 400, json={"currency": "USD"})

    active = await admin.json("GET", "/v1/payment-types/active", 200)
    assert [t["name"] for t in active] == ["Monthly Rent", "Security Levy", "Water"]
    assert set(active[0]) == {
        "id",
        "name",
        "description",
        "amount",
        "currency",
        "isRecurring",
        "recurringInterval",
        "dueDay",
    }

    gone = await admin.json("DELETE", f"/v1/payment-types/{created['id']}", 200)
    assert gone["isActive"] is False
    active = await admin.json("GET", "/v1/payment-types/active", 200)
    assert created["id"] not in [t["id"] for t in active]
    listed = await admin.json("GET", "/v1/payment-types", 200)
    assert listed["meta"]["total"] == 2
    everything = await admin.json("GET", "/v1/payment-types?includeInactive=true&limit=1", 200)
    assert everything["meta"] == {
        "page": 1,
        "limit": 1,
        "total": 3,
        "totalPages": 3,
        "hasNext": True,
        "hasPrevious": False,
    }
    await admin.json("GET", "/v1/payment-types?includeInactive=maybe", 400)
    one = await admin.json("GET", f"/v1/payment-types/{created['id']}", 200)
    assert one["isActive"] is False


async def test_tenant_reads_but_cannot_write(tenant, demo):
    assert len(await tenant.json("GET", "/v1/payment-types/active", 200)) == 2
    await tenant.json("POST", "/v1/payment-types", 403, json=NEW)
    rent = demo["payment_types"]["Monthly Rent"]
    await tenant.json("PATCH", f"/v1/payment-types/{rent}", 403, json={"amount": 1})
    await tenant.json("DELETE", f"/v1/payment-types/{rent}", 403)


async def test_cross_cooperative_payment_types_are_not_found(admin, coop_b, demo):
    b = coop_b["admin"]
    rent = demo["payment_types"]["Monthly Rent"]
    await b.json("GET", f"/v1/payment-types/{rent}", 404)
    await b.json("PATCH", f"/v1/payment-types/{rent}", 404, json={"amount": 1})
    await b.json("DELETE", f"/v1/payment-types/{rent}", 404)
    assert [t["name"] for t in await b.json("GET", "/v1/payment-types/active", 200)] == ["Levy"]
    assert (await b.json("GET", "/v1/payment-types?includeInactive=true", 200))["meta"]["total"] == 1
    await b.json("POST", "/v1/payment-types", 404, json={**NEW, "cooperativeId": demo["cooperative_id"]})
    await b.json("GET", f"/v1/payment-types/active?cooperativeId={demo['cooperative_id']}", 404)


async def test_super_admin_names_the_cooperative(superadmin, coop_b):
    await superadmin.json("POST", "/v1/payment-types", 400, json=NEW)
    made = await superadmin.json(
        "POST", "/v1/payment-types", 201, json={**NEW, "cooperativeId": coop_b["cooperative_id"]}
    )
    assert made["cooperativeId"] == coop_b["cooperative_id"]
    active = await superadmin.json(
        "GET", f"/v1/payment-types/active?cooperativeId={coop_b['cooperative_id']}", 200
    )
    assert {t["name"] for t in active} == {"Levy", "Security Levy"}


@pytest.mark.usefixtures("limiter_clock")
async def test_rate_limit_on_payment_type_creation(admin):
    for i in range(20):
        resp = await admin.req("POST", "/v1/payment-types", json={**NEW, "name": f"Levy {i:02d}"})
        assert resp.status == 201
        assert resp.headers["X-RateLimit-Limit"] == "20"
    resp = await admin.req("POST", "/v1/payment-types", json={**NEW, "name": "One too many"})
    assert resp.status == 429
    assert resp.headers["X-RateLimit-Remaining"] == "0" and "X-RateLimit-Reset" in resp.headers


async def test_a_type_renamed_to_its_own_name_in_other_letters_is_not_taken(admin, rt, demo):
    """Fixing a type's capitals ("Water" -> "WATER ") is no clash with itself; another type's name, whatever its
    case, still is (409, nothing changed, no audit row)."""
    water = demo["payment_types"]["Water"]
    renamed = await admin.json("PATCH", f"/v1/payment-types/{water}", 200, json={"name": "WATER "})
    assert renamed["name"] == "WATER"
    taken = await admin.json("PATCH", f"/v1/payment-types/{water}", 409, json={"name": "monthly rent"})
    assert taken["code"] == "NAME_TAKEN", taken
    async with rt.sessionmaker() as s:
        assert (await s.get(PaymentType, water)).name == "WATER"
        audits = (await s.execute(select(AuditEvent.after).where(
            AuditEvent.action == "payment_type.updated", AuditEvent.entity_id == water))).scalars().all()
    assert [a["name"] for a in audits] == ["WATER"]


async def test_the_service_finds_no_type_of_another_cooperative(rt, demo, coop_b):
    """core.payment_types.update_payment_type names the cooperative: another cooperative's type is not found there,
    and is left as it was."""
    import pytest

    from core.audit import Actor
    from core.errors import NotFound
    from core.payment_types import update_payment_type

    rent = demo["payment_types"]["Monthly Rent"]
    async with rt.sessionmaker.begin() as s:
        with pytest.raises(NotFound):
            await update_payment_type(s, cooperative_id=coop_b["cooperative_id"], payment_type_id=rent,
                                      changes={"name": "Taken over"}, actor=Actor("system", "system"))
    async with rt.sessionmaker() as s:
        assert (await s.get(PaymentType, rent)).name == "Monthly Rent"
