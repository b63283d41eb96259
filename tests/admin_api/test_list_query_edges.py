"""The edges of the list's query parameters and of a body's shape check: the documented largest page size is
taken, a flag given as 1/0 filters as true/false does, and every unknown body field is named, not the first."""

from __future__ import annotations

from typing import Any

from sqlalchemy import update

from core.models import Payment
from tests.admin_api.conftest import Caller, make_payment, payment_body


async def test_the_largest_page_size_and_page_are_taken(admin: Caller, demo: dict[str, Any]) -> None:
    rent = demo["payment_types"]["Monthly Rent"]
    made = [await make_payment(admin, rent) for _ in range(2)]
    listed = await admin.json("GET", "/v1/payments?limit=100", 200)
    assert sorted(p["id"] for p in listed["data"]) == sorted(p["id"] for p in made)
    assert listed["meta"] == {"page": 1, "limit": 100, "total": 2, "totalPages": 1, "hasNext": False,
                              "hasPrevious": False}
    far = await admin.json("GET", "/v1/payments?page=100000&limit=1", 200)
    assert far["data"] == [] and far["meta"]["page"] == 100000 and far["meta"]["hasPrevious"] is True
    refused = await admin.json("GET", "/v1/payments?page=100001&limit=101", 400)
    assert sorted(refused["message"]) == ["limit must not be greater than 100",
                                          "page must not be greater than 100000"]


async def test_a_flag_written_1_or_0_filters_as_true_or_false(admin: Caller, rt: Any, demo: dict[str, Any]) -> None:
    rent = demo["payment_types"]["Monthly Rent"]
    flagged, late, clean = [await make_payment(admin, rent) for _ in range(3)]
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Payment).where(Payment.id == flagged["id"])
                        .values(mismatch=True, mismatch_detail="expected 50000, received 49000"))
        await s.execute(update(Payment).where(Payment.id == late["id"]).values(late=True))

    async def ids(query: str) -> set[str]:
        return {p["id"] for p in (await admin.json("GET", f"/v1/payments?{query}", 200))["data"]}

    for true, false in (("true", "false"), ("1", "0"), ("TRUE", "False")):
        assert await ids(f"mismatch={true}") == {flagged["id"]}, true
        assert await ids(f"mismatch={false}") == {late["id"], clean["id"]}, false
        assert await ids(f"late={true}") == {late["id"]}, true
        assert await ids(f"late={false}") == {flagged["id"], clean["id"]}, false
    assert await ids("late=0&mismatch=0") == {clean["id"]}


async def test_every_unknown_body_field_is_named(admin: Caller, demo: dict[str, Any]) -> None:
    body = payment_body(demo["payment_types"]["Monthly Rent"], zeta=1, alpha=2, note="x")
    refused = await admin.json("POST", "/v1/payments", 400, json=body)
    assert refused["message"] == ["property alpha should not exist", "property note should not exist",
                                  "property zeta should not exist"]
    assert "field" not in refused  # about several fields: each named in message
    assert (await admin.json("GET", "/v1/payments", 200))["meta"]["total"] == 0


async def test_a_period_takes_its_start_and_leaves_out_its_end(admin: Caller, rt: Any, demo: dict[str, Any]) -> None:
    """`from` inclusive, `to` exclusive: a payment made at midnight UTC on 1 October is in October's list by UTC
    instants and not in September's, on both bases (created, completed)."""
    from datetime import UTC, datetime

    rent = demo["payment_types"]["Monthly Rent"]
    at, other = await make_payment(admin, rent), await make_payment(admin, rent)
    midnight = datetime(2026, 10, 1, tzinfo=UTC)
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Payment).where(Payment.id == at["id"])
                        .values(created_at=midnight, completed_at=midnight, status="COMPLETED"))
        await s.execute(update(Payment).where(Payment.id == other["id"])
                        .values(created_at=datetime(2026, 10, 3, tzinfo=UTC), status="PENDING"))

    async def ids(query: str) -> list[str]:
        return [p["id"] for p in (await admin.json("GET", f"/v1/payments?{query}", 200))["data"]]

    september = "from=2026-09-01T00:00:00Z&to=2026-10-01T00:00:00Z"
    october = "from=2026-10-01T00:00:00Z&to=2026-10-03T00:00:00Z"
    for basis in ("created", "completed"):
        assert await ids(f"{september}&basis={basis}") == [], basis
        assert await ids(f"{october}&basis={basis}") == [at["id"]], basis
    assert await ids("from=2026-10-01T00:00:00Z&to=2026-10-03T00:00:01Z") == [other["id"], at["id"]]


async def test_the_member_filter_lists_that_members_payments_only(admin: Caller, rt: Any,
                                                                   demo: dict[str, Any]) -> None:
    rent = demo["payment_types"]["Monthly Rent"]
    aline, bosco = demo["members"]["+250788000001"], demo["members"]["+250788000002"]
    hers = await make_payment(admin, rent, memberId=aline, paymentAccount="+250788000001")
    his = await make_payment(admin, rent, memberId=bosco, paymentAccount="+250788000002")
    async with rt.sessionmaker() as s:
        assert (await s.get(Payment, hers["id"])).member_id == aline  # type: ignore[union-attr]
        assert (await s.get(Payment, his["id"])).member_id == bosco  # type: ignore[union-attr]
    listed = await admin.json("GET", f"/v1/payments?member={aline}", 200)
    assert [p["id"] for p in listed["data"]] == [hers["id"]] and listed["meta"]["total"] == 1
    listed = await admin.json("GET", f"/v1/payments?member={bosco}&status=PENDING", 200)
    assert [p["id"] for p in listed["data"]] == [his["id"]]


async def test_a_field_name_with_a_control_character_is_refused_saying_so(admin: Caller,
                                                                          demo: dict[str, Any]) -> None:
    body = {**payment_body(demo["payment_types"]["Monthly Rent"]), "note\u0000x": 1}
    refused = await admin.json("POST", "/v1/payments", 400, json=body)
    # Said once, and the name is not repeated back (a control character in an answer a client may log or show).
    assert refused["message"] == ["body has a field name with characters that are not allowed"]
    assert (await admin.json("GET", "/v1/payments", 200))["meta"]["total"] == 0


async def test_a_local_number_with_a_wallet_method_is_found_as_its_wallet(admin: Caller, demo: dict[str, Any]) -> None:
    """paymentMethod a wallet's: the account searched is a phone number, read in the cooperative's country."""
    rent = demo["payment_types"]["Monthly Rent"]
    mtn = await make_payment(admin, rent, paymentAccount="+250788000001")
    await make_payment(admin, rent, paymentAccount="+250788000002")
    for method in ("MOBILE_MONEY_MTN", ""):
        query = f"paymentMethod={method}&" if method else ""
        found = await admin.json("GET", f"/v1/payments?{query}paymentAccount=0788000001", 200)
        assert [p["id"] for p in found["data"]] == [mtn["id"]], method


async def test_a_bare_date_with_a_trailing_space_is_still_a_local_day(admin: Caller, rt: Any,
                                                                      demo: dict[str, Any]) -> None:
    """`2026-10-01 ` (a space copied along) is the date it is read as: midnight in Kigali (UTC+2), as without it."""
    from datetime import UTC, datetime

    paid = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    async with rt.sessionmaker.begin() as s:  # 00:30 on 1 October in Kigali
        await s.execute(update(Payment).where(Payment.id == paid["id"])
                        .values(created_at=datetime(2026, 9, 30, 22, 30, tzinfo=UTC)))
    for start in ("2026-10-01", "2026-10-01%20"):
        listed = await admin.json("GET", f"/v1/payments?from={start}&to=2026-10-02%20", 200)
        assert [p["id"] for p in listed["data"]] == [paid["id"]], start
        assert (await admin.json("GET", f"/v1/payments?from=2026-09-29&to={start}", 200))["data"] == [], start


async def test_a_json_media_type_with_a_suffix_is_taken(admin: Caller, demo: dict[str, Any]) -> None:
    """application/vnd.api+json (a +json suffix, RFC 6839) is JSON; text/plain is not."""
    import json

    body = payment_body(demo["payment_types"]["Monthly Rent"])
    made = await admin.req("POST", "/v1/payments", data=json.dumps(body),
                           headers={"Content-Type": "application/vnd.api+json"})
    assert made.status == 201, await made.json()
    refused = await admin.req("POST", "/v1/payments", data=json.dumps(payment_body(body["paymentTypeId"])),
                              headers={"Content-Type": "text/plain"})
    assert (refused.status, (await refused.json())["message"]) == (415, "Content-Type must be application/json")
    assert [p["id"] for p in (await admin.json("GET", "/v1/payments", 200))["data"]] == [(await made.json())["id"]]


async def test_a_chunked_body_past_the_limit_is_413_and_makes_nothing(admin: Caller, demo: dict[str, Any]) -> None:
    """No Content-Length (Transfer-Encoding: chunked): the body is refused as soon as it passes 64 KiB, not read
    whole and then taken."""
    import json
    from collections.abc import AsyncIterator

    body = payment_body(demo["payment_types"]["Monthly Rent"], description="Rent")
    text = json.dumps(body).encode()
    padded = text[:-1] + b" " * (70 * 1024) + b"}"

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(padded), 8 * 1024):
            yield padded[start:start + 8 * 1024]

    resp = await admin.req("POST", "/v1/payments", data=chunks(), headers={"Content-Type": "application/json"})
    refused = await resp.json()
    assert (resp.status, refused["code"]) == (413, "BODY_TOO_LARGE"), refused
    assert refused["message"] == f"request body is larger than {64 * 1024} bytes"
    assert (await admin.json("GET", "/v1/payments", 200))["meta"]["total"] == 0
