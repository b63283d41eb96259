"""The CSV member import checks its cells as the JSON API checks its fields (no NUL or other control
characters), reads a spreadsheet's `;`-separated file, and a value the database refuses is the request's
fault (400), never an outage to send again (503)."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from sqlalchemy import func, select, text

from admin_api.errors import error_middleware
from core.models import Member
from tests.conftest import requires_pg


async def _count(rt: Any, coop_id: str) -> int:
    async with rt.sessionmaker() as s:
        return int((await s.execute(select(func.count()).select_from(Member)
                                    .where(Member.cooperative_id == coop_id))).scalar_one())


async def _import(admin: Any, data: bytes) -> tuple[int, Any]:
    resp = await admin.req("POST", "/v1/members/import", data=data, headers={"Content-Type": "text/csv"})
    return resp.status, await resp.json()


async def test_import_refuses_control_characters_like_the_json_api(admin, rt, demo):
    created = await admin.req("POST", "/v1/members", json={"name": "Esc\x1b Name", "phone": "0788100021"})
    assert created.status == 400
    before = await _count(rt, demo["cooperative_id"])
    status, body = await _import(admin, (
        b"name,phone,unit\n"
        b"Esc\x1b Name,0788100022,A-1\n"
        b"Nul\x00 Name,0788100023,A-2\n"
        b"Good Name,0788100024,A\x07-3\n"
        b"Fine Name,0788100025,A-4\n"
    ))
    assert status == 400, body
    assert body["message"] == [
        "row 2: name: contains characters that are not allowed",
        "row 3: name: contains characters that are not allowed",
        "row 4: unit: contains characters that are not allowed",
    ]
    assert await _count(rt, demo["cooperative_id"]) == before  # nothing imported


async def test_a_unit_longer_than_its_column_is_named_on_its_row(admin, rt, demo):
    """The unit holds 64 characters (as POST /members allows): a longer one is that row's error, named, and nothing
    of the file is imported."""
    before = await _count(rt, demo["cooperative_id"])
    status, body = await _import(admin, b"name,phone,unit\nFine Name,0788100041,A-1\nLong Unit,0788100042,"
                                 + b"U" * 65 + b"\nEdge Unit,0788100043," + b"U" * 64 + b"\n")
    assert status == 400, body
    assert body["message"] == ["row 3: unit: must be at most 64 characters"]
    assert await _count(rt, demo["cooperative_id"]) == before


async def test_a_nul_alone_is_a_bad_row_not_an_outage(admin, rt, demo):
    status, body = await _import(admin, b"name,phone\nNul\x00 Name,0788100023\n")
    assert status == 400 and body["message"] == ["row 2: name: contains characters that are not allowed"]


async def test_tabs_inside_a_cell_are_still_allowed(admin, rt, demo):
    # Tab, like line feed and carriage return, is text (JSON allows it too): only the rest of C0 is refused.
    status, body = await _import(admin, b'name,phone\n"Tab\tName",0788100031\n')
    assert status == 201, body


async def test_a_french_excel_file_is_read(admin, rt, demo):
    """Excel in a French locale separates with `;` (the comma is the decimal mark), writes a BOM with
    "CSV UTF-8", and ends lines with CRLF."""
    before = await _count(rt, demo["cooperative_id"])
    data = ("\ufeffname;phone;unit;language\r\n"
            "Amélie Uwase;0788100041;B-1, étage 2;fr\r\n"
            "Jean Habimana;0788100042;;rw\r\n")
    status, body = await _import(admin, data.encode("utf-8"))
    assert status == 201, body
    assert body["imported"] == 2 and await _count(rt, demo["cooperative_id"]) == before + 2
    found = await admin.json("GET", "/v1/members?phone=%2B250788100041", 200)
    assert found["data"][0]["name"] == "Amélie Uwase" and found["data"][0]["unit"] == "B-1, étage 2"
    # Tab-separated works too; a comma file with a `;` inside a cell stays a comma file.
    status, body = await _import(admin, b"name\tphone\nTab Person\t0788100043\n")
    assert status == 201, body
    status, body = await _import(admin, b'name,phone,unit\n"Semi; Colon",0788100044,C;2\n')
    assert status == 201, body


async def _through_the_middleware(aiohttp_client: Any, rt: Any, statement: str, params: dict[str, Any]) -> Any:
    async def handler(request: web.Request) -> web.Response:
        async with rt.sessionmaker() as s:
            await s.execute(text(statement), params)
        return web.json_response({})

    app = web.Application(middlewares=[error_middleware])
    app.router.add_post("/x", handler)
    return await (await aiohttp_client(app)).post("/x")


@requires_pg
async def test_a_value_postgresql_refuses_is_400_not_an_outage(rt, aiohttp_client):
    # SQLSTATE 22021 (character not in repertoire): PostgreSQL text cannot hold a NUL.
    resp = await _through_the_middleware(aiohttp_client, rt, "SELECT CAST(:v AS text)", {"v": "a\x00b"})
    body = await resp.json()
    assert resp.status == 400 and "Retry-After" not in resp.headers, body
    assert "cannot be stored" in body["message"]
    # 22P02 (invalid text representation), 22003 (numeric out of range), and a parameter asyncpg cannot
    # encode for its type (22000): the same every time they are sent.
    for statement, params in (("SELECT CAST(:v AS text)::integer", {"v": "twelve"}),
                              ("SELECT CAST(:v AS text)::smallint", {"v": "99999"}),
                              ("SELECT :v + 1", {"v": "one"})):
        resp = await _through_the_middleware(aiohttp_client, rt, statement, params)
        assert resp.status == 400, (statement, await resp.json())


async def test_a_row_is_named_by_the_line_it_starts_on(admin, rt, demo):
    """A cell may hold a line break when quoted (an address typed over two lines), so a row can run over several
    lines: a problem of it is named by the line it starts on, and one quote left open (a name typed "JB Habimana
    with no closing quote) swallows every line after it into one cell: named where it opens, not at the file's end
    where nothing is wrong."""
    before = await _count(rt, demo["cooperative_id"])
    status, body = await _import(admin, (
        b'name,phone,unit\n'
        b'Amina Uwase,0788100051,"B-1\nfloor 2"\n'
        b'Bad Phone,12345,"C-1\nback"\n'
        b'Good Name,0788100053,D-1\n'
    ))
    assert status == 400 and body["message"] == [
        "row 4: phone: too short for a mobile number of RW: one is written as 07XX XXX XXX or +250 7XX XXX XXX; a "
        "number of another country is written with + and its country code, as +256 7XX XXX XXX"], body
    status, body = await _import(admin, (
        b'name,phone\n'
        b'Amina Uwase,0788100061\n'
        b'"JB Habimana,0788100062\n'
        b'Good Name,0788100063\n'
        b'Other Name,0788100064\n'
    ))
    assert status == 400 and body["message"] == [
        "row 3: row: has 1 fields, expected 2 (it runs from line 3 to line 5: a quote opening a cell and never "
        "closed takes in the lines after it)"
    ], body
    assert await _count(rt, demo["cooperative_id"]) == before


async def test_a_letter_o_typed_for_a_zero_is_refused_not_another_persons_number(admin, rt, demo):
    """0788OOO456 was read on a phone keypad (O is 6) and registered as +250788666456, a stranger's number."""
    before = await _count(rt, demo["cooperative_id"])
    created = await admin.json("POST", "/v1/members", 400, json={"name": "Olive Uwase", "phone": "0788OOO456"})
    assert created["message"] == ["has a letter among its digits (an O typed for a 0?): type the number in digits "
                                  "only"]
    status, body = await _import(admin, b"name,phone\nOlive Uwase,0788OOO456\nGood Name,0788100071\n")
    assert status == 400 and body["message"] == [
        "row 2: phone: has a letter among its digits (an O typed for a 0?): type the number in digits only"], body
    assert await _count(rt, demo["cooperative_id"]) == before
    assert (await admin.json("GET", "/v1/members?phone=0788666456", 200))["data"] == []
