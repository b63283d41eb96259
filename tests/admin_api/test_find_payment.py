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
