from tests.admin_api.conftest import payment_body


async def test_create_and_get_payment(admin, demo):
    rent = demo["payment_types"]["Monthly Rent"]
    body = await admin.json("POST", "/v1/payments", 201, json=payment_body(rent))
    assert body["amount"] == 50000 and body["status"] == "PENDING"
    got = await admin.json("GET", f"/v1/payments/{body['id']}", 200)
    assert got["reference"] == body["reference"]
    page = await admin.json("GET", "/v1/payments", 200)
    assert page["meta"]["total"] == 1
