"""A cooperative's time zone must put the reminders' daily scan (06:00 UTC) in its morning. Any IANA zone was
accepted: in America/Los_Angeles the scan is 22:00 the day before, past the 20:00 send cut-off, so no reminder
was ever sent, silently; east of UTC+6 they went out in the afternoon."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.mark.parametrize("zone", ["America/Los_Angeles", "America/New_York", "Asia/Tokyo"])
async def test_a_zone_where_the_scan_is_not_a_morning_is_refused(superadmin: Any, demo: Any, zone: str) -> None:
    created = await superadmin.json("POST", "/v1/cooperatives", 400, json={
        "name": "Far Away Coop", "shortCode": "FAR", "country": "RW", "timezone": zone})
    assert any("06:00 UTC" in m for m in created["message"]), created
    await superadmin.json("PATCH", f"/v1/cooperatives/{demo['cooperative_id']}", 400, json={"timezone": zone})


@pytest.mark.parametrize("zone", ["Africa/Accra", "Africa/Nairobi", "Atlantic/Cape_Verde", "Indian/Mauritius"])
async def test_african_zones_are_taken(superadmin: Any, demo: Any, zone: str) -> None:
    changed = await superadmin.json("PATCH", f"/v1/cooperatives/{demo['cooperative_id']}", 200,
                                    json={"timezone": zone})
    assert changed["timezone"] == zone
