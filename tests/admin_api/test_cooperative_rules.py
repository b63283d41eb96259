"""A cooperative as a super admin makes and edits it: its country's defaults, the zones it may be in, its contact
phone read in its own country, and the audit rows each change leaves (who, what it was, what it became; never the
contact phone)."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

from core.models import AuditEvent, Cooperative

DEFAULTS = [
    ("RW", "RWF", "Africa/Kigali", "en"),
    ("KE", "KES", "Africa/Nairobi", "en"),
    ("UG", "UGX", "Africa/Kampala", "en"),
    ("TZ", "TZS", "Africa/Dar_es_Salaam", "sw"),
    ("GH", "GHS", "Africa/Accra", "en"),
    ("ZM", "ZMW", "Africa/Lusaka", "en"),
    ("BI", "BIF", "Africa/Bujumbura", "en"),
    ("MW", "MWK", "Africa/Blantyre", "en"),
    ("NG", "NGN", "Africa/Lagos", "en"),
    ("ZA", "ZAR", "Africa/Johannesburg", "en"),
]


async def _audit(rt: Any, coop_id: str, action: str) -> list[AuditEvent]:
    async with rt.sessionmaker() as s:
        return list((await s.execute(select(AuditEvent).where(
            AuditEvent.entity_id == coop_id, AuditEvent.action == action).order_by(AuditEvent.id))).scalars())


@pytest.mark.parametrize(("country", "currency", "zone", "language"), DEFAULTS)
async def test_a_cooperative_gets_its_countrys_currency_zone_and_language(
        superadmin: Any, rt: Any, country: str, currency: str, zone: str, language: str) -> None:
    made = await superadmin.json("POST", "/v1/cooperatives", 201, json={
        "name": f"{country} Savers", "shortCode": f"SV{country}", "country": country})
    assert (made["currency"], made["timezone"], made["language"], made["status"]) == (
        currency, zone, language, "ACTIVE")
    async with rt.sessionmaker() as s:
        row = await s.get(Cooperative, made["id"])
    assert (row.currency, row.timezone, row.language, row.status) == (currency, zone, language, "ACTIVE")


async def test_creating_one_leaves_an_audit_row_without_its_phone(superadmin: Any, rt: Any, demo: Any) -> None:
    made = await superadmin.json("POST", "/v1/cooperatives", 201, json={
        "name": "Nakuru Dairy", "shortCode": "NKD", "country": "KE", "contactPhone": "0712 345 678",
        "ussdExtension": "254"})
    # A Kenyan national number is read as Kenyan, not Rwandan.
    assert made["contactPhone"] == "+25471****678"
    async with rt.sessionmaker() as s:
        assert (await s.get(Cooperative, made["id"])).contact_phone == "+254712345678"
    [row] = await _audit(rt, made["id"], "cooperative.created")
    assert (row.entity_type, row.cooperative_id, row.before) == ("cooperative", made["id"], None)
    assert row.actor.startswith("admin:")  # the super admin who made it
    assert row.after == {"name": "Nakuru Dairy", "shortCode": "NKD", "country": "KE", "currency": "KES",
                         "timezone": "Africa/Nairobi", "ussdExtension": "254", "ussdAggregator": None,
                         "status": "ACTIVE", "selfRegistration": True, "language": "en"}
    assert "712345678" not in str(row.after)
    assert await _audit(rt, made["id"], "cooperative.updated") == []


async def test_an_edit_and_a_suspension_each_leave_what_was_and_what_became(superadmin: Any, rt: Any) -> None:
    made = await superadmin.json("POST", "/v1/cooperatives", 201, json={
        "name": "Huye Growers", "shortCode": "HGR", "country": "RW"})
    # Its own shortCode, sent again in another case, is no clash with itself.
    await superadmin.json("PATCH", f"/v1/cooperatives/{made['id']}", 200,
                          json={"name": "Huye Coffee Growers", "shortCode": "hgr", "contactPhone": "0788123456"})
    await superadmin.json("DELETE", f"/v1/cooperatives/{made['id']}", 200)
    edit, suspension = await _audit(rt, made["id"], "cooperative.updated")
    assert edit.before and edit.after and suspension.before and suspension.after
    assert (edit.before["name"], edit.after["name"]) == ("Huye Growers", "Huye Coffee Growers")
    assert (edit.before["shortCode"], edit.after["shortCode"]) == ("HGR", "hgr")
    assert "contactPhone" not in edit.before and "788123456" not in str(edit.after)
    assert (suspension.before["status"], suspension.after["status"]) == ("ACTIVE", "SUSPENDED")
    assert suspension.before["name"] == suspension.after["name"] == "Huye Coffee Growers"
    assert {edit.cooperative_id, suspension.cooperative_id} == {made["id"]}
    listed = await superadmin.json("GET", "/v1/cooperatives?status=ACTIVE", 200)
    assert made["id"] not in [c["id"] for c in listed["data"]]
    listed = await superadmin.json("GET", "/v1/cooperatives?status=SUSPENDED", 200)
    assert [c["id"] for c in listed["data"]] == [made["id"]]


async def test_a_name_of_200_characters_is_taken_and_201_refused(superadmin: Any) -> None:
    made = await superadmin.json("POST", "/v1/cooperatives", 201, json={
        "name": "N" * 200, "shortCode": "LONG", "country": "RW"})
    assert made["name"] == "N" * 200
    await superadmin.json("PATCH", f"/v1/cooperatives/{made['id']}", 400, json={"name": "N" * 201})


@pytest.mark.parametrize("zone", [
    "America/Nuuk",  # the scan at 05:00 in its summer, 04:00 in its winter: no reminder half the year
    "Asia/Dhaka",  # UTC+6: the scan at 12:00, the afternoon
])
async def test_a_zone_whose_scan_is_not_a_morning_all_year_is_refused(superadmin: Any, demo: Any, zone: str) -> None:
    refused = await superadmin.json("POST", "/v1/cooperatives", 400, json={
        "name": "Edge Coop", "shortCode": "EDGE", "country": "RW", "timezone": zone})
    assert any("06:00 UTC" in m for m in refused["message"]), refused
    await superadmin.json("PATCH", f"/v1/cooperatives/{demo['cooperative_id']}", 400, json={"timezone": zone})


async def test_the_zones_at_the_ends_of_the_morning_are_taken(superadmin: Any, demo: Any) -> None:
    for zone in ("Atlantic/Cape_Verde", "Indian/Maldives"):  # UTC-1 (05:00) and UTC+5 (11:00)
        changed = await superadmin.json("PATCH", f"/v1/cooperatives/{demo['cooperative_id']}", 200,
                                        json={"timezone": zone})
        assert changed["timezone"] == zone
