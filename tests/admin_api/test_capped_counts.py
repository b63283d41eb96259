"""A list's meta.total is counted no further than COUNT_CAP rows past the page's start (admin_api.common): past it
the total is that bound and `totalCapped: true` says there are more; below it the seed's meta is unchanged. The
page itself, totalPages and hasNext stay consistent either way."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from tests.admin_api.conftest import Caller, make_payment
from tests.conftest import sql_sent

CAP = 3


@pytest.fixture
def small_cap(monkeypatch: Any) -> None:
    monkeypatch.setattr("admin_api.common.COUNT_CAP", CAP)
    monkeypatch.setattr("admin_api.common.SYNC_LAG", timedelta(0))  # listed once committed (made one by one)


async def _payments(admin: Caller, demo: dict[str, Any], n: int) -> list[str]:
    rent = demo["payment_types"]["Monthly Rent"]
    return [(await make_payment(admin, rent))["id"] for _ in range(n)]


async def test_a_payment_list_longer_than_the_cap_says_its_total_is_capped(admin, demo, small_cap):
    made = await _payments(admin, demo, 6)
    first = await admin.json("GET", "/v1/payments?page=1&limit=2", 200)
    assert [p["id"] for p in first["data"]] == made[:-3:-1]  # the page is read as before
    assert first["meta"] == {"page": 1, "limit": 2, "total": 3, "totalPages": 2, "hasNext": True,
                             "hasPrevious": False, "totalCapped": True}
    # Counted from the page's start: page 2 (rows 3-4) counts up to row 5, still fewer than there are.
    second = await admin.json("GET", "/v1/payments?page=2&limit=2", 200)
    assert second["meta"] == {"page": 2, "limit": 2, "total": 5, "totalPages": 3, "hasNext": True,
                              "hasPrevious": True, "totalCapped": True}
    # The last page: the count reaches the end, so it is exact and the seed's meta has no flag.
    last = await admin.json("GET", "/v1/payments?page=3&limit=2", 200)
    assert [p["id"] for p in last["data"]] == made[1::-1]
    assert last["meta"] == {"page": 3, "limit": 2, "total": 6, "totalPages": 3, "hasNext": False,
                            "hasPrevious": True}


async def test_a_list_within_the_cap_keeps_the_seeds_meta(admin, demo, small_cap):
    await _payments(admin, demo, 3)
    page = await admin.json("GET", "/v1/payments?page=1&limit=2", 200)
    assert page["meta"] == {"page": 1, "limit": 2, "total": 3, "totalPages": 2, "hasNext": True,
                            "hasPrevious": False}


async def test_a_sync_counts_what_is_left_up_to_the_cap(admin, demo, small_cap):
    """A sync's meta counts what is left from the cursor (this page included): capped while more than the cap is
    left, exact (no flag) once it is within it."""
    made = await _payments(admin, demo, 5)
    first = await admin.json("GET", "/v1/payments?updatedFrom=2000-01-01T00:00:00Z&limit=2", 200)
    assert [p["id"] for p in first["data"]] == made[:2]
    assert first["meta"] == {"page": 1, "limit": 2, "total": 3, "totalPages": 2, "hasNext": True,
                             "hasPrevious": False, "totalCapped": True}
    second = await admin.json("GET", f"/v1/payments?after={first['nextCursor']}&limit=2", 200)
    assert [p["id"] for p in second["data"]] == made[2:4]
    assert second["meta"] == {"page": 1, "limit": 2, "total": 3, "totalPages": 2, "hasNext": True,
                              "hasPrevious": True}


async def test_the_audit_log_count_is_capped_for_a_super_admin(superadmin, admin, demo, small_cap):
    await _payments(admin, demo, 2)  # each payment is audited; the demo's setup is too
    page = await superadmin.json("GET", "/v1/audit-events?limit=2", 200)
    assert len(page["data"]) == 2
    assert page["meta"] == {"page": 1, "limit": 2, "total": 3, "totalPages": 2, "hasNext": True,
                            "hasPrevious": False, "totalCapped": True}


async def test_the_count_reads_no_further_than_the_cap(rt, admin, demo):
    """The statement itself stops: a count over a LIMIT of the cap and one past the page's start, whatever the
    database (not a full count cut down afterwards)."""
    await _payments(admin, demo, 1)
    with sql_sent(rt) as sent:
        await admin.json("GET", "/v1/payments?page=3&limit=10", 200)
        await admin.json("GET", "/v1/payments?updatedFrom=2000-01-01T00:00:00Z&limit=10", 200)
    counts = [q for q in sent if q.startswith("SELECT count(*)") and "FROM payments" in q]
    assert len(counts) == 2 and all(" LIMIT " in q for q in counts), counts


def test_the_meta_schema_documents_the_flag():
    from admin_api.common import META

    assert META["properties"]["totalCapped"]["type"] == "boolean"
    assert "totalCapped" not in META["required"]
