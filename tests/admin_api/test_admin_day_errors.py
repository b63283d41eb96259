"""A cooperative admin's day through the JSON API, where a refusal did not say what to send instead (found walking
it as a user): a period written in a form the gateway does not take, and a currency sent with a refund's amount.
Each refusal says what is taken, and nothing is written."""

from __future__ import annotations

from sqlalchemy import func, select

from core.models import PaymentType, Refund
from tests.admin_api.conftest import complete_payment, idem, make_payment

TAKEN = "must be a date (YYYY-MM-DD) or a date-time (YYYY-MM-DDThh:mm:ssZ)"


async def test_a_period_in_another_form_is_refused_saying_which_forms_are_taken(admin):
    # 20261201 is ISO 8601's basic form, 2026-02-30 no day at all, "December" a word: each was told "must be an
    # ISO 8601 date-time", which neither named the bare date the README documents nor fitted 20261201.
    for route in ("/v1/payments", "/v1/reports/reconciliation", "/v1/reports/payments.csv", "/v1/refunds",
                  "/v1/disputes", "/v1/audit-events"):
        for bad in ("20261201", "2026-02-30", "December"):
            body = await admin.json("GET", f"{route}?from={bad}", 400)
            assert body["message"] == [f"from {TAKEN}"], (route, bad, body)
            assert body["field"] == "from"
    body = await admin.json("GET", "/v1/payments?updatedFrom=yesterday", 400)
    assert body["message"] == [f"updatedFrom {TAKEN}"]
    # The forms it names are taken.
    await admin.json("GET", "/v1/reports/reconciliation?from=2026-12-01&to=2026-12-02T08:00:00Z", 200)


async def test_a_currency_sent_with_a_refund_is_refused_saying_to_send_the_amount_alone(admin, rt, demo):
    paid = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    await complete_payment(rt, paid["id"])
    said = ("property currency should not exist: the amount is in the currency its payment type (or payment) has, "
            "which a request does not change; send the amount alone")
    for currency in ("RWF", "USD"):
        body = await admin.json("POST", f"/v1/payments/{paid['id']}/refunds", 400, json={
            "amount": 1000, "currency": currency, "reason": "overpaid", "idempotencyKey": idem()})
        assert body["message"] == [said], body
    dispute = await admin.json("POST", "/v1/disputes", 201, json={"paymentId": paid["id"], "reason": "OTHER"})
    body = await admin.json("POST", f"/v1/disputes/{dispute['id']}/transitions", 400, json={
        "status": "RESOLVED", "note": "paid back", "refundAmount": 1000, "currency": "RWF"})
    assert body["message"] == [said]
    async with rt.sessionmaker() as s:
        assert await s.scalar(select(func.count(Refund.id))) == 0
    # Elsewhere an unknown property is refused as before: no hint about money where no amount is taken.
    body = await admin.json("POST", "/v1/disputes", 400, json={"paymentId": paid["id"], "reason": "OTHER",
                                                               "currency": "RWF"})
    assert body["message"] == ["property currency should not exist"]
    # A payment type, which takes its currency, is not told so.
    made = await admin.json("POST", "/v1/payment-types", 201, json={"name": "Levy", "amount": 500, "currency": "RWF"})
    assert made["currency"] == "RWF"


async def test_a_type_name_taken_names_the_type_that_has_it(admin, rt, demo):
    # 'Monthly rent' beside the seeded 'Monthly Rent': the refusal quoted the request's name, not the type that
    # has it, nor its id or what to do.
    rent = demo["payment_types"]["Monthly Rent"]
    said = (f"a payment type named 'Monthly Rent' already exists ({rent}): change it with PATCH "
            f"/v1/payment-types/{rent}, or give this one another name")
    body = await admin.json("POST", "/v1/payment-types", 409, json={"name": "monthly RENT", "amount": 50000})
    assert (body["message"], body["code"], body["field"]) == (said, "NAME_TAKEN", "name")
    water = demo["payment_types"]["Water"]
    assert (await admin.json("DELETE", f"/v1/payment-types/{water}", 200))["isActive"] is False
    body = await admin.json("PATCH", f"/v1/payment-types/{rent}", 409, json={"name": "WATER"})
    assert body["message"] == (f"a payment type named 'Water' already exists ({water}, inactive): change it with "
                               f"PATCH /v1/payment-types/{water}, or give this one another name")
    async with rt.sessionmaker() as s:
        assert (await s.get(PaymentType, rent)).name == "Monthly Rent"
        assert await s.scalar(select(func.count(PaymentType.id))) == 2


async def test_a_type_in_another_currency_is_refused_naming_the_field(admin, rt):
    body = await admin.json("POST", "/v1/payment-types", 400, json={"name": "Levy", "amount": 500, "currency": "KES"})
    assert body["message"] == ["currency must be the cooperative's currency (RWF)"]
    assert body["field"] == "currency"
    # Two fields refused: none named, each listed.
    body = await admin.json("POST", "/v1/payment-types", 400, json={"name": "Levy", "amount": 0, "currency": "KES"})
    assert "field" not in body and len(body["message"]) == 2, body
    async with rt.sessionmaker() as s:
        assert await s.scalar(select(func.count(PaymentType.id)).where(PaymentType.name == "Levy")) == 0


async def test_a_type_keeps_its_currency_and_a_patch_sending_one_is_told_so(admin, rt, demo):
    # PATCH takes an amount but no currency: the hint for a refund's or a payment's amount ("send the amount
    # alone") was said to an admin who sent a currency alone, meaning to change the type's.
    rent = demo["payment_types"]["Monthly Rent"]
    said = ("property currency should not exist: a payment type keeps the currency it was made with; make another "
            "type for another currency")
    for body in ({"currency": "USD"}, {"name": "Rent", "currency": "RWF"}, {"amount": 100, "currency": "RWF"}):
        answer = await admin.json("PATCH", f"/v1/payment-types/{rent}", 400, json=body)
        assert answer["message"] == [said], (body, answer)
    async with rt.sessionmaker() as s:
        assert (await s.get(PaymentType, rent)).name == "Monthly Rent"


async def test_a_type_name_with_accented_capitals_is_taken_whatever_the_database(admin, rt):
    # SQLite's lower() folds A-Z only: 'Électricité' was not found by its own name (Python lowered the request's to
    # 'électricité', SQLite the stored one to 'Électricité'), and a second type of the very same name was made.
    made = await admin.json("POST", "/v1/payment-types", 201, json={"name": "Électricité", "amount": 500})
    for name in ("Électricité", "ÉLECTRICITÉ", "électricité"):
        body = await admin.json("POST", "/v1/payment-types", 409, json={"name": name, "amount": 500})
        assert (body["code"], body["field"]) == ("NAME_TAKEN", "name")
        assert body["message"].startswith(f"a payment type named 'Électricité' already exists ({made['id']})")
    other = await admin.json("POST", "/v1/payment-types", 201, json={"name": "Eau", "amount": 500})
    body = await admin.json("PATCH", f"/v1/payment-types/{other['id']}", 409, json={"name": "ÉLECTRICITÉ"})
    assert body["code"] == "NAME_TAKEN"
    async with rt.sessionmaker() as s:
        assert await s.scalar(select(func.count(PaymentType.id)).where(PaymentType.name.like("%lectricit%"))) == 1


async def test_a_type_refused_for_two_fields_together_names_neither(admin, demo):
    # README "API errors": `field` is absent when a refusal is about several. The first word of these messages is
    # one of the fields they are about: isRecurring was named for a dueDay sent with it false, and amount for an
    # allowCustomAmount the request sent alone.
    body = await admin.json("POST", "/v1/payment-types", 400, json={"name": "Levy", "amount": 500,
                                                                   "isRecurring": False, "dueDay": 5})
    assert body["message"] == ["isRecurring is false, so recurringInterval and dueDay must be null (or left out)"]
    assert "field" not in body, body
    free = await admin.json("POST", "/v1/payment-types", 201, json={"name": "Gift", "amount": 0,
                                                                   "allowCustomAmount": True})
    body = await admin.json("PATCH", f"/v1/payment-types/{free['id']}", 400, json={"allowCustomAmount": False})
    assert body["message"] == ["amount is 0, so allowCustomAmount must stay true unless a positive amount is set"]
    assert "field" not in body, body
