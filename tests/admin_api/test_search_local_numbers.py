"""A number searched in its local form (0712345678) by a super admin across cooperatives: which country's it is.

Found walking a Kenyan SACCO: without cooperativeId the number was read as Rwanda's (the default region), so
`GET /v1/members?phone=0712...` answered 400 ("not a valid phone number of RW") and `GET /v1/payments?
paymentAccount=0712...` answered nothing at all (the number, unreadable as Rwanda's, was looked up as a bank
account). The rule now, the same on both routes: the country of the cooperative searched (cooperativeId, or a
cooperative admin's own); without one, the country of every cooperative when they share one; when they span
several countries, a local number is refused (400) asking for its + form or cooperativeId."""

from __future__ import annotations

from typing import Any

from sqlalchemy import update

from core.models import Cooperative
from tests.admin_api.conftest import Caller, make_payment
from tests.admin_api.test_payments_countries import country_admin, settings  # noqa: F401 (MTN Rwanda, as there)
from tests.channels.sms import helpers

WANJIRU = "0712345678"


def refusal(field: str) -> list[str]:
    return [f"{field} has no country code and the cooperatives are in several countries (KE, RW): give it with + "
            "and its country code (as +254712345678), or cooperativeId to read it as that cooperative's country's"]


async def test_a_local_number_searched_across_countries_is_refused_alike_on_both_routes(
        superadmin: Caller, rt: Any, client: Any) -> None:
    kenyan, levy = await country_admin(superadmin, rt, client, "KE", "NRB", "1500.00")
    made = await kenyan.json("POST", "/v1/members", 201, json={"name": "Wanjiru", "phone": WANJIRU})
    paid = await make_payment(kenyan, levy, amount="1500.00", paymentMethod="MPESA", paymentAccount=WANJIRU)
    # Across cooperatives of Kenya and Rwanda: 0712... could be either's. Refused alike on both routes.
    body = await superadmin.json("GET", f"/v1/members?phone={WANJIRU}", 400)
    assert body["message"] == refusal("phone")
    body = await superadmin.json("GET", f"/v1/payments?paymentAccount={WANJIRU}", 400)
    assert body["message"] == refusal("paymentAccount")
    # A Rwandan local number too: the rule does not depend on which country's numbers happen to be valid.
    assert (await superadmin.json("GET", "/v1/members?phone=0788000002", 400))["message"] == refusal("phone")
    # With its + form: found anywhere.
    found = await superadmin.json("GET", "/v1/members?phone=%2B254712345678", 200)
    assert [m["id"] for m in found["data"]] == [made["id"]]
    found = await superadmin.json("GET", "/v1/payments?paymentAccount=%2B254712345678", 200)
    assert [p["id"] for p in found["data"]] == [paid["id"]]
    # With cooperativeId: read as that cooperative's country's.
    kenya = made["cooperativeId"]
    found = await superadmin.json("GET", f"/v1/members?cooperativeId={kenya}&phone={WANJIRU}", 200)
    assert [m["id"] for m in found["data"]] == [made["id"]]
    found = await superadmin.json("GET", f"/v1/payments?cooperativeId={kenya}&paymentAccount={WANJIRU}", 200)
    assert [p["id"] for p in found["data"]] == [paid["id"]]
    # Her cooperative's admin: its own country's, as always.
    assert [m["id"] for m in (await kenyan.json("GET", f"/v1/members?phone={WANJIRU}", 200))["data"]] == [made["id"]]
    found = await kenyan.json("GET", f"/v1/payments?paymentAccount={WANJIRU}", 200)
    assert [p["id"] for p in found["data"]] == [paid["id"]]


async def test_a_tel_link_is_a_number_with_its_country_code(superadmin: Caller, rt: Any, client: Any) -> None:
    """tel:+254712345678 (copied from a click-to-call link) says its country: found across countries, not refused
    for lacking a country code it carries."""
    kenyan, _ = await country_admin(superadmin, rt, client, "KE", "NRB", "1500.00")
    made = await kenyan.json("POST", "/v1/members", 201, json={"name": "Wanjiru", "phone": WANJIRU})
    found = await superadmin.json("GET", "/v1/members?phone=tel:%2B254712345678", 200)
    assert [m["id"] for m in found["data"]] == [made["id"]]


async def test_a_deployment_of_one_country_reads_a_local_number_as_that_countrys(
        superadmin: Caller, rt: Any, demo: dict[str, Any]) -> None:
    """A Kenyan deployment (its one cooperative Kenyan): the super admin types numbers as they are written there."""
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Cooperative).where(Cooperative.id == demo["cooperative_id"]).values(country="KE"))
    made = await superadmin.json("POST", "/v1/members", 201, json={
        "name": "Wanjiru", "phone": WANJIRU, "cooperativeId": demo["cooperative_id"]})
    paid = await helpers.make_payment(rt, demo["cooperative_id"], account="+254712345678", status="FAILED")
    found = await superadmin.json("GET", f"/v1/members?phone={WANJIRU}", 200)
    assert [m["id"] for m in found["data"]] == [made["id"]]
    found = await superadmin.json("GET", f"/v1/payments?paymentAccount={WANJIRU}", 200)
    assert [p["id"] for p in found["data"]] == [paid.id]


async def test_a_bank_account_is_looked_up_as_it_was_given(superadmin: Caller, admin: Caller, rt: Any,
                                                          client: Any, demo: dict[str, Any]) -> None:
    """A bank payment's account is stored as given, never read as a phone number: found so, across countries too,
    and with paymentMethod a bank's even when its digits would make a phone number of the cooperative's country."""
    await country_admin(superadmin, rt, client, "KE", "NRB", "1500.00")
    rent = demo["payment_types"]["Monthly Rent"]
    by_mail = await make_payment(admin, rent, paymentMethod="BANK_BK", paymentAccount="aline@example.rw")
    by_digits = await make_payment(admin, rent, paymentMethod="BANK_BK", paymentAccount="0788123456")
    found = await superadmin.json("GET", "/v1/payments?paymentAccount=aline@example.rw", 200)
    assert [p["id"] for p in found["data"]] == [by_mail["id"]]
    found = await admin.json("GET", "/v1/payments?paymentMethod=BANK_BK&paymentAccount=0788123456", 200)
    assert [p["id"] for p in found["data"]] == [by_digits["id"]]
    found = await superadmin.json("GET", "/v1/payments?paymentMethod=BANK_BK&paymentAccount=0788123456", 200)
    assert [p["id"] for p in found["data"]] == [by_digits["id"]]


async def test_the_document_states_the_rule_on_both_parameters(client: Any) -> None:
    doc = await (await client.get("/v1/openapi.json")).json()
    for path, name in (("/v1/members", "phone"), ("/v1/payments", "paymentAccount")):
        [param] = [p for p in doc["paths"][path]["get"]["parameters"] if p["name"] == name]
        assert "a 400 when they span several" in param["description"], path
        assert "+254712345678" in param["description"], path
