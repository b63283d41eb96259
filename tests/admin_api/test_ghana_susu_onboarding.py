"""A Kumasi market women's susu group (GH, GHS) onboarded by a super admin: its members imported with Ghanaian
numbers as people write them. Found: a member on Telecel or AT, whose wallet no method collects from, was
registered without a word; she learnt it on the Pay screen ("No payment method is available for your number")."""

from __future__ import annotations

from typing import Any

import pytest

from tests.admin_api.conftest import Caller, bearer

TELECEL = ("+23320****567 is a Telecel number: this GH cooperative's members pay with MTN MoMo (from an MTN number), "
           "and no bank method collects GHS; this member can never pay")
AT = ("+23356****567 is an AirtelTigo number: this GH cooperative's members pay with MTN MoMo (from an MTN number), "
      "and no bank method collects GHS; this member can never pay")


@pytest.fixture
async def operator(client: Any, demo: dict[str, Any]) -> Caller:
    return await bearer(client, *demo["super_admin"])


async def kejetia(operator: Caller) -> str:
    made = await operator.json("POST", "/v1/cooperatives", 201, json={
        "name": "Kejetia Market Women Susu", "shortCode": "KEJSUSU", "country": "GH", "currency": "GHS"})
    assert (made["currency"], made["timezone"], made["language"]) == ("GHS", "Africa/Accra", "en")
    return str(made["id"])


async def test_members_on_a_network_no_method_collects_from_are_imported_with_a_warning(operator: Caller) -> None:
    cid = await kejetia(operator)
    data = (b"name,phone\nAkosua Mensah,024 412 3456\nAma Serwaa,+233 54 412 3457\nYaa Asantewaa,233244123458\n"
            b"Abena Boateng,024-412-3459\nEsi Donkor,020 123 4567\nAkua Tiwaa,+233 56 123 4567\n")
    imported = await operator.json("POST", f"/v1/members/import?cooperativeId={cid}", 201, data=data,
                                   headers={"Content-Type": "text/csv"})
    assert imported["imported"] == 6
    assert imported["warnings"] == [{"row": 6, "field": "phone", "message": TELECEL},
                                    {"row": 7, "field": "phone", "message": AT}]
    listed = await operator.json("GET", f"/v1/members?cooperativeId={cid}&limit=50", 200)
    assert sorted(m["phone"] for m in listed["data"]) == [
        "+23320****567", "+23324****456", "+23324****458", "+23324****459", "+23354****457", "+23356****567"]


async def test_a_member_created_or_moved_to_such_a_number_is_warned_about(operator: Caller) -> None:
    cid = await kejetia(operator)
    made = await operator.json("POST", "/v1/members", 201, json={
        "name": "Esi Donkor", "phone": "0201234567", "cooperativeId": cid})
    assert made["warnings"] == [{"field": "phone", "message": TELECEL}]
    mtn = await operator.json("POST", "/v1/members", 201, json={
        "name": "Akosua Mensah", "phone": "0244123456", "cooperativeId": cid})
    assert mtn["warnings"] == []
    moved = await operator.json("PATCH", f"/v1/members/{mtn['id']}", 200, json={"phone": "0561234567"})
    assert moved["warnings"] == [{"field": "phone", "message": AT}]
