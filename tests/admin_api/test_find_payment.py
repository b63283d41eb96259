"""Support's "a member paid but it shows pending": the payment the cooperative names is found by the reference on
the member's receipt or by the number that paid (stored encrypted: through its blind index). Neither filter
existed; the paying account was only in the database."""

from __future__ import annotations

from typing import Any

from tests.admin_api.conftest import make_payment


async def test_a_payment_is_found_by_its_reference_or_the_number_that_paid(admin: Any, superadmin: Any,
                                                                           demo: Any) -> None:
    rent = demo["payment_types"]["Monthly Rent"]
    target = await make_payment(admin, rent, paymentAccount="+250788123456")
    others = [await make_payment(admin, rent) for _ in range(3)]
    ref = target["reference"]
    for query in (f"reference={ref}", f"reference={ref.lower()}", "paymentAccount=%2B250788123456",
                  "paymentAccount=0788123456", "paymentAccount=250788123456"):
        listed = await admin.json("GET", f"/v1/payments?{query}", 200)
        assert [p["id"] for p in listed["data"]] == [target["id"]], query
    both = await admin.json("GET", f"/v1/payments?reference={others[0]['reference']}"
                                   "&paymentAccount=%2B250788123456", 200)
    assert both["data"] == []
    # A super admin across cooperatives: with its country code the number is found anywhere.
    assert [p["id"] for p in (await superadmin.json("GET", "/v1/payments?paymentAccount=%2B250788123456",
                                                    200))["data"]] == [target["id"]]


async def test_a_bank_payment_is_found_by_its_account(admin: Any, demo: Any) -> None:
    made = await make_payment(admin, demo["payment_types"]["Monthly Rent"], paymentMethod="BANK_BK",
                              paymentAccount="aline@example.rw")
    listed = await admin.json("GET", "/v1/payments?paymentAccount=aline@example.rw", 200)
    assert [p["id"] for p in listed["data"]] == [made["id"]]
    assert (await admin.json("GET", "/v1/payments?paymentAccount=nobody@example.rw", 200))["data"] == []


async def test_an_empty_exact_search_is_refused_not_answered_with_nothing(admin: Any, demo: Any) -> None:
    """`reference=` (a form submitted blank, a variable left unset) was a 200 listing nothing: "no such payment" for
    a search never made. Refused as an empty gatewayTransactionId is; the OpenAPI document says minLength 1."""
    await make_payment(admin, demo["payment_types"]["Monthly Rent"], paymentAccount="+250788123456")
    for path, name in (("/v1/payments", "reference"), ("/v1/payments", "paymentAccount"),
                       ("/v1/payments", "gatewayTransactionId"), ("/v1/disputes", "reference")):
        for blank in ("", "%20"):
            refused = await admin.json("GET", f"{path}?{name}={blank}", 400)
            assert f"{name} must not be empty" in str(refused), (path, name, refused)
    spec = await admin.json("GET", "/v1/openapi.json", 200)
    listed = {p["name"]: p["schema"] for p in spec["paths"]["/v1/payments"]["get"]["parameters"] if "schema" in p}
    assert listed["reference"].get("minLength") == listed["paymentAccount"].get("minLength") == 1
