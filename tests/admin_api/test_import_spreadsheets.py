"""A cooperative's clerk keeps the member list in a spreadsheet and imports it: the whole list sent again to change
names and languages (existing=update), a workbook sent instead of its CSV, numbers a spreadsheet wrote in scientific
notation, a header named otherwise; and finds a member again by part of her name."""

from __future__ import annotations

import asyncio
import io
import zipfile
from typing import Any
from urllib.parse import quote

from sqlalchemy import func, select

from core import member_import
from core.models import AuditEvent, Member
from core.phone import SCIENTIFIC
from tests.conftest import requires_pg, waiting_for_locks


def already(count: int) -> str:
    rows = "1 row" if count == 1 else f"{count:,} rows"  # never "1 row(s)"
    return (f"file: {rows} with a number already a member's: leave them out, or import with existing=update "
            "to update those members' name, unit and language from the file")


async def _import(admin: Any, data: bytes, query: str = "") -> tuple[int, Any]:
    resp = await admin.req("POST", f"/v1/members/import{query}", data=data, headers={"Content-Type": "text/csv"})
    return resp.status, await resp.json()


async def _members(rt: Any, coop_id: str) -> dict[str, tuple[str, str | None, str, str]]:
    async with rt.sessionmaker() as s:
        rows = (await s.execute(select(Member.phone_masked, Member.name, Member.unit, Member.language, Member.status)
                                .where(Member.cooperative_id == coop_id))).all()
    return {r[0]: (r[1], r[2], r[3], r[4]) for r in rows}


async def test_the_whole_list_sent_again_updates_names_units_and_languages(admin, rt, demo):
    coop = demo["cooperative_id"]
    first = ("Name,Phone,Unit,Language\r\n"
             "Mutesi Beatrice,0788100101,A-1,en\r\n"
             "Nyiransengiyumva Agnes,0788100102,A-2,rw\r\n"
             "Kamanzi Eric,0788100103,A-3,sw\r\n").encode("cp1252")
    status, body = await _import(admin, first)
    assert status == 201 and body["imported"] == 3, body
    suspended = (await admin.json("GET", "/v1/members?phone=0788100103", 200))["data"][0]["id"]
    await admin.json("DELETE", f"/v1/members/{suspended}", 200)

    # The clerk fixed the accents, moved Agnès, asked Béatrice's language, left Eric's language cell empty and
    # added a new member; Aline (demo) is in the list unchanged. Sent as Excel's "CSV (Comma delimited)".
    again = ("Name,Phone,Unit,Language\r\n"
             "Mutesi Béatrice,0788100101,A-1,fr\r\n"
             "Nyiransengiyumva Agnès,+250 788 100 102,B-7,rw\r\n"
             "Kamanzi Eric,788100103,A-3,\r\n"
             "Aline Uwase,0788000001,A-101,rw\r\n"
             "Uwera Chantal,0788100104,,\r\n").encode("cp1252")
    status, body = await _import(admin, again)
    assert status == 400, body  # by default a number already registered refuses the file, saying what to do
    assert body["message"] == [already(4)] + [f"row {n}: phone: already a member of this cooperative"
                                              + (f", suspended (member {suspended}): an import never reactivates a "
                                                 "member; to have her back, set her status ACTIVE (PATCH "
                                                 f"/v1/members/{suspended})" if n == 4 else "")
                                              for n in (2, 3, 4, 5)]

    status, body = await _import(admin, again, "?existing=update")
    assert status == 201, body
    assert (body["imported"], body["updated"], body["unchanged"]) == (1, 2, 2)
    members = await _members(rt, coop)
    assert members["+25078****101"] == ("Mutesi Béatrice", "A-1", "fr", "ACTIVE")
    assert members["+25078****102"] == ("Nyiransengiyumva Agnès", "B-7", "rw", "ACTIVE")
    assert members["+25078****103"] == ("Kamanzi Eric", "A-3", "sw", "SUSPENDED")  # her language and status stay
    assert members["+25078****104"] == ("Uwera Chantal", None, "en", "ACTIVE")
    assert members["+25078****001"][:3] == ("Aline Uwase", "A-101", "rw")
    async with rt.sessionmaker() as s:
        audits = (await s.execute(select(AuditEvent.entity_id, AuditEvent.before, AuditEvent.after).where(
            AuditEvent.action == "member.updated", AuditEvent.entity_id.in_(body["updatedIds"])))).all()
    assert sorted(a.after.get("name", "") + "/" + a.after.get("unit", "") + "/" + a.after["language"]
                  for a in audits) == ["changed//fr", "changed/changed/rw"]

    # A file without a unit or language column changes names only; the same file twice changes nothing more.
    names_only = "name,phone\nMutesi B. Béatrice,0788100101\n".encode()
    status, body = await _import(admin, names_only, "?existing=update")
    assert (status, body["imported"], body["updated"]) == (201, 0, 1), body
    assert (await _members(rt, coop))["+25078****101"] == ("Mutesi B. Béatrice", "A-1", "fr", "ACTIVE")
    status, body = await _import(admin, names_only, "?existing=update")
    assert (status, body["updated"], body["unchanged"]) == (201, 0, 1), body


def imported(count: int, added: str) -> str:
    matches = f"its {count:,} rows match {count:,} members" if count != 1 else "its 1 row matches 1 member"
    return (f"file: this list was already imported: {matches} of this cooperative "
            f"with the same name, unit and language, added {added}; nothing was imported. To change members' "
            "details, correct the file and import it with existing=update")


async def _added(rt: Any, ids: list[str]) -> str:
    """When the members `ids` were added, as the refusal of their list sent again says it (to the minute, UTC)."""
    async with rt.sessionmaker() as s:
        added = sorted({m.strftime("%Y-%m-%d %H:%M UTC") for m in (await s.execute(
            select(Member.created_at).where(Member.id.in_(ids)))).scalars()})
    return f"on {added[0]}" if len(added) == 1 else f"between {added[0]} and {added[-1]}"


async def test_the_same_list_sent_again_is_told_it_was_imported_once(admin, rt, demo):
    """Every row a member with its name, unit and language: the list was imported already (a clerk unsure her
    upload went through sends it again). It was told "already a member" for each of its rows."""
    coop = demo["cooperative_id"]
    rows = "".join(f"Member {n:03d},07881{n:05d},A-{n},{('en', 'rw', '')[n % 3]}\r\n" for n in range(120))
    data = ("Name,Phone,Unit,Language\r\n" + rows).encode()
    status, body = await _import(admin, data)
    assert status == 201 and body["imported"] == 120, body
    ids = body["memberIds"]
    before = await _members(rt, coop)

    status, body = await _import(admin, data)
    assert status == 400, body
    assert (body["code"], body["message"]) == ("VALIDATION_FAILED", [imported(120, await _added(rt, ids))])
    assert await _members(rt, coop) == before

    # Saved again by the spreadsheet (semicolons, Windows-1252), with a column more: the same list.
    again = ("Nom;Name;Phone;Unit;Language\r\n" + "".join(f"x;{line.replace(',', ';')}\r\n"
                                                           for line in rows.splitlines())).encode("cp1252")
    status, body = await _import(admin, again)
    assert (status, body["message"]) == (400, [imported(120, await _added(rt, ids))])

    # A member suspended since: she is named, with what to do, after the one line.
    await admin.json("DELETE", f"/v1/members/{ids[5]}", 200)
    status, body = await _import(admin, data)
    assert status == 400
    assert body["message"] == [
        imported(120, await _added(rt, ids)),
        f"row 7: phone: already a member of this cooperative, suspended (member {ids[5]}): an import never "
        f"reactivates a member; to have her back, set her status ACTIVE (PATCH /v1/members/{ids[5]})"]

    # One row changed, or one new: not the same list; each row already a member's is named, as before.
    status, body = await _import(admin, data.replace(b"Member 010,0788100010,A-10", b"Member 010,0788100010,B-10"))
    assert status == 400 and body["message"][0] == already(120) and len(body["message"]) == 121, body["message"][:2]
    status, body = await _import(admin, data + b"Someone New,0788100999,A-999,\r\n")
    assert status == 400 and body["message"][0] == already(120) and len(body["message"]) == 121, body["message"][:2]
    assert await _members(rt, coop) == {**before, "+25078****005": (*before["+25078****005"][:3], "SUSPENDED")}


async def test_a_pending_list_sent_again_is_told_it_was_imported_once(admin, rt, demo):
    """Imported with status=PENDING, sent again with it: its members are pending as that import makes them, which
    is not said row by row; one approved since is ACTIVE, which needs no word."""
    data = b"name,phone\nLeft Once,0788100601\nNot Yet,0788100602\n"
    status, body = await _import(admin, data, "?status=PENDING")
    assert status == 201, body
    ids = body["memberIds"]
    await admin.json("POST", f"/v1/members/{ids[0]}/approve", 200)
    status, body = await _import(admin, data, "?status=PENDING")
    assert (status, body["message"]) == (400, [imported(2, await _added(rt, ids))])


async def test_a_one_row_list_sent_again_is_told_so_in_the_singular(admin, rt, demo):
    """A one-row list sent again was told "its 1 rows match 1 members"."""
    data = b"name,phone\nOnly One,0788100701\n"
    status, body = await _import(admin, data)
    assert status == 201, body
    added = await _added(rt, body["memberIds"])
    status, body = await _import(admin, data)
    assert (status, body["message"]) == (400, [
        f"file: this list was already imported: its 1 row matches 1 member of this cooperative with the same name, "
        f"unit and language, added {added}; nothing was imported. To change members' details, correct the file and "
        "import it with existing=update"])


async def test_an_erased_members_number_in_the_list_is_a_new_member_and_she_stays_erased(admin, rt, demo):
    status, body = await _import(admin, b"name,phone\nLeft Already,0788100201\n")
    gone = body["memberIds"][0]
    await admin.json("DELETE", f"/v1/members/{gone}", 200)
    await admin.json("POST", f"/v1/members/{gone}/erase", 200)
    status, body = await _import(admin, b"name,phone\nLeft Already,0788100201\n", "?existing=update")
    assert (status, body["imported"], body["updated"]) == (201, 1, 0), body
    assert (await admin.json("GET", f"/v1/members/{gone}", 200))["name"] == "Erased member"


async def test_a_workbook_sent_instead_of_its_csv_is_told_how_to_save_it(admin, rt, demo):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("[Content_Types].xml", "<Types/>")
        z.writestr("xl/worksheets/sheet1.xml", "<worksheet><row><c><v>Aline</v></c></row></worksheet>")
    for data, kind in ((buf.getvalue(), ".xlsx or .ods"), (bytes.fromhex("d0cf11e0a1b11ae1") + bytes(512), ".xls")):
        status, body = await _import(admin, data)
        assert status == 400
        assert body["message"] == [f"file: is a spreadsheet workbook ({kind}), not a CSV file: save it as CSV "
                                   "(Excel: File > Save As > CSV UTF-8 (Comma delimited); LibreOffice: Save As > "
                                   "Text CSV; Google Sheets: File > Download > Comma-separated values) and import "
                                   "that file"]


async def test_numbers_in_scientific_notation_are_named_with_what_to_do(admin, rt, demo):
    before = len(await _members(rt, demo["cooperative_id"]))
    status, body = await _import(admin, b"name,phone\r\nMutesi Beatrice,2.50788E+11\r\nOk Person,0788100301\r\n"
                                        b"Kamanzi Eric,\"2,50788E+11\"\r\n")
    assert status == 400
    assert body["message"] == [f"row 2: phone: {SCIENTIFIC}", f"row 4: phone: {SCIENTIFIC}"]
    assert len(await _members(rt, demo["cooperative_id"])) == before
    # The same number pasted into the API.
    member = demo["members"]["+250788000001"]
    resp = await admin.json("PATCH", f"/v1/members/{member}", 400, json={"phone": "2.50788E+11"})
    assert resp["message"] == [SCIENTIFIC]


async def test_a_header_named_otherwise_shows_what_the_first_row_has(admin, rt, demo):
    status, body = await _import(admin, "Nom;Téléphone;Unit\nAline X;0788100401;A\n".encode("cp1252"))
    assert status == 400
    assert body["message"] == [
        "row 1: header: column name is required (the header row must name the columns name, phone, unit, "
        "language; it has: nom, téléphone, unit)",
        "row 1: header: column phone is required (the header row must name the columns name, phone, unit, "
        "language; it has: nom, téléphone, unit)",
    ]


async def test_members_are_found_by_part_of_their_name(admin, rt, demo):
    status, body = await _import(admin, "name,phone\nMutesi Béatrice,0788100501\nMUTESI Jeanne,0788100502\n"
                                        "Under_Score,0788100503\nUnderXScore,0788100504\n".encode())
    assert status == 201, body
    found = await admin.json("GET", "/v1/members?name=mutesi&limit=1", 200)
    assert found["meta"]["total"] == 2 and found["data"][0]["name"] == "MUTESI Jeanne"
    found = await admin.json("GET", "/v1/members?name=%20b%C3%A9atrice", 200)
    assert [m["name"] for m in found["data"]] == ["Mutesi Béatrice"]
    found = await admin.json("GET", "/v1/members?name=r_s", 200)  # "_" is the letter, not any character
    assert [m["name"] for m in found["data"]] == ["Under_Score"]
    async with rt.sessionmaker() as s:
        total = (await s.execute(select(func.count()).select_from(Member))).scalar_one()
    found = await admin.json("GET", "/v1/members?name=%25", 200)
    assert found["meta"]["total"] == 0 < total


async def test_members_are_found_by_their_name_typed_without_its_accents(admin, rt, demo):
    """A feature phone's or a US keyboard's "zoe" finds Zoë, "eric" Éric; the accent typed where the name has none
    finds it too; a name stored with its accent as a separate mark (e + U+0301, as some phones and Macs write it) is
    one name with the precomposed é."""
    status, body = await _import(admin, "name,phone\nZoë Akéllo,0788100601\nERIC Nshuti,0788100602\n"
                                        "Mukamana Zoe,0788100603\nJose\u0301 Habimana,0788100604\n".encode())
    assert status == 201, body

    async def names(typed: str) -> list[str]:
        return sorted(m["name"] for m in (await admin.json("GET", f"/v1/members?name={quote(typed)}", 200))["data"])

    assert await names("zoe") == ["Mukamana Zoe", "Zoë Akéllo"]
    assert await names("ZOË") == ["Mukamana Zoe", "Zoë Akéllo"]
    assert await names("akello") == ["Zoë Akéllo"]
    assert await names("éric ns") == ["ERIC Nshuti"]
    assert await names("josé") == ["Jose\u0301 Habimana"] == await names("jose")
    assert await names("zoe\u0308 ak") == ["Zoë Akéllo"]


async def test_members_are_found_by_letters_that_have_no_accent_to_drop(admin, rt, demo):
    """Ł, Ø, Đ, Æ, ß... are letters of their own, not a letter and an accent (Unicode does not decompose them): a
    keyboard without them types l, o, d, ae, ss, and finds the name."""
    status, body = await _import(admin, "name,phone\nŁukasz Søren,0788100701\nĐorđe Æbelø,0788100702\n"
                                        "Straße Þór,0788100703\n".encode())
    assert status == 201, body

    async def names(typed: str) -> list[str]:
        return sorted(m["name"] for m in (await admin.json("GET", f"/v1/members?name={quote(typed)}", 200))["data"])

    assert await names("lukasz") == ["Łukasz Søren"] == await names("soren")
    assert await names("ŁUKASZ SØREN") == ["Łukasz Søren"] == await names("łukasz søren")
    assert await names("dorde aebelo") == ["Đorđe Æbelø"] == await names("ÐORÐE")
    assert await names("strasse thor") == ["Straße Þór"] == await names("STRAẞE")


async def test_empty_rows_above_the_header_and_languages_written_as_words(admin, rt, demo):
    """A sheet whose first rows were left empty saves them as blank lines, or as separators only in a French
    Excel's file (which then is only known to be `;`-separated from the header below them); a language column
    typed as words ("Kinyarwanda", "Français") reads as the codes."""
    data = (";;;\r\n;;;\r\nName;Phone;Unit;Language\r\n"
            "Mutesi Béatrice;0788100601;A-1;Kinyarwanda\r\nUwase Agnès;0788100602;A-2;Français\r\n"
            "Kamanzi Eric;0788100603;;english\r\n").encode("utf-8-sig")
    status, body = await _import(admin, data)
    assert status == 201, body
    members = await _members(rt, demo["cooperative_id"])
    assert [members[f"+25078****60{n}"] for n in (1, 2, 3)] == [
        ("Mutesi Béatrice", "A-1", "rw", "ACTIVE"), ("Uwase Agnès", "A-2", "fr", "ACTIVE"),
        ("Kamanzi Eric", None, "en", "ACTIVE")]
    # Its rows keep their own line numbers, the header's too.
    status, body = await _import(admin, b"\r\n\r\nname,mobile\r\nBad Row,0788100604\r\n")
    assert (status, body["message"]) == (400, [
        "row 3: header: column phone is required (the header row must name the columns name, phone, unit, "
        "language; it has: name, mobile)"])
    status, body = await _import(admin, b"\n,,\nname,phone,language\nBad Lang,0788100605,German\n")
    assert (status, body["message"]) == (400, ["row 4: language: must be one of en, rw, fr, sw"])


async def test_another_countrys_number_without_its_code_says_how_to_write_it(admin, rt, demo):
    status, body = await _import(admin, b"name,phone\nOkello Ugandan,0701234567\nKenyan Tenant,+254 712 345 678\n")
    assert (status, body["message"]) == (400, [
        "row 2: phone: not a valid phone number of RW (a number of another country is written with + and its "
        "country code, as +256 7XX XXX XXX)"])
    status, body = await _import(admin, b"name,phone\nOkello Ugandan,+256772123456\nKenyan Tenant,+254 712 345 678\n")
    assert (status, body["imported"]) == (201, 2), body
    members = await _members(rt, demo["cooperative_id"])
    assert members["+25677****456"][0] == "Okello Ugandan" and members["+25471****678"][0] == "Kenyan Tenant"


async def test_a_name_is_found_whatever_the_case_of_its_accented_letters(admin, rt, demo):
    """SQLite's lower() folds A-Z only: "ÉMILIE" stayed "ÉMILIE" and was not found by "émilie", nor "Élise" by
    "ÉLISE" or by "Élise" as typed (PostgreSQL's lower() folds every letter in a UTF-8 locale)."""
    data = "name,phone\nÉMILIE Uwase,0788100701\nÉlise Nyirahabimana,0788100702\n".encode()
    status, body = await _import(admin, data)
    assert status == 201, body
    for typed, name in (("émilie", "ÉMILIE Uwase"), ("ÉLISE", "Élise Nyirahabimana"), ("Élise", "Élise Nyirahabimana"),
                        ("NYIRAHABIMANA", "Élise Nyirahabimana")):
        found = await admin.json("GET", "/v1/members", 200, params={"name": typed})
        assert [m["name"] for m in found["data"]] == [name], typed


async def test_the_list_sent_again_updates_only_this_cooperatives_members(admin, rt, demo, coop_b):
    """existing=update with a number that is a member of another cooperative (not of this one): a new member here,
    and the other cooperative's member is left exactly as she was (name, unit, language), with no audit row."""
    coop = demo["cooperative_id"]
    before = await _members(rt, coop_b["cooperative_id"])
    data = b"name,phone,unit,language\nBeatrice Here,0788999001,Z-9,fr\n"
    status, body = await _import(admin, data, "?existing=update")
    assert status == 201, body
    assert (body["imported"], body["updated"], body["unchanged"]) == (1, 0, 0), body
    assert await _members(rt, coop_b["cooperative_id"]) == before
    async with rt.sessionmaker() as s:
        [here] = (await s.execute(select(Member).where(Member.id.in_(body["memberIds"])))).scalars().all()
        assert (here.cooperative_id, here.name, here.unit, here.language) == (coop, "Beatrice Here", "Z-9", "fr")
        updated = (await s.execute(select(func.count()).select_from(AuditEvent).where(
            AuditEvent.action == "member.updated"))).scalar_one()
    assert updated == 0


async def test_a_number_of_a_member_who_cannot_pay_says_her_status_and_what_to_do(admin, rt, demo):
    """A clerk adding back a tenant who left was told "already a member" (and, with existing=update, her row was
    "unchanged"): she believed her in again while the member stayed suspended, unable to pay by USSD."""
    status, body = await _import(admin, b"name,phone\nLeft Once,0788100601\nNot Yet,0788100602\n", "?status=PENDING")
    left, waiting = body["memberIds"]
    await admin.json("POST", f"/v1/members/{left}/approve", 200)
    await admin.json("DELETE", f"/v1/members/{left}", 200)
    again = b"name,phone\nLeft Once,0788100601\nNot Yet,0788100602\nAline Uwase,0788000001\n"
    status, body = await _import(admin, again)
    assert status == 400
    assert body["message"] == [
        already(3),
        f"row 2: phone: already a member of this cooperative, suspended (member {left}): an import never "
        f"reactivates a member; to have her back, set her status ACTIVE (PATCH /v1/members/{left})",
        f"row 3: phone: already a member of this cooperative, pending approval (member {waiting}): an import never "
        f"approves a member; approve her (POST /v1/members/{waiting}/approve)",
        "row 4: phone: already a member of this cooperative",
    ]
    status, body = await _import(admin, again.replace(b"Left Once", b"Left Once B"), "?existing=update")
    assert (status, body["updated"], body["unchanged"]) == (201, 1, 2), body
    assert body["warnings"] == [
        {"row": 2, "field": "status", "message": f"this number's member is suspended (member {left}): an import "
                                                 "never reactivates a member; to have her back, set her status "
                                                 f"ACTIVE (PATCH /v1/members/{left})"},
        {"row": 3, "field": "status", "message": f"this number's member is pending approval (member {waiting}): an "
                                                 "import never approves a member; approve her "
                                                 f"(POST /v1/members/{waiting}/approve)"},
    ]
    members = await _members(rt, demo["cooperative_id"])
    assert members["+25078****601"] == ("Left Once B", None, "en", "SUSPENDED")
    assert members["+25078****602"][3] == "PENDING"


async def test_a_line_break_typed_in_a_cell_is_read_as_a_space(admin, rt, demo):
    """Alt+Enter wraps a long name or unit in its cell; the CSV keeps it as a quoted cell over two lines. Stored so,
    "Uwimana<line break>Grace" was not found as "uwimana grace" and ran over two lines in every list."""
    status, body = await _import(admin, b'name,phone,unit\r\n"Uwimana\r\nGrace",0788100701,"Block A \nFloor 2"\r\n'
                                        b'Next Row,0788100702,B\r\n')
    assert (status, body["imported"]) == (201, 2), body
    members = await _members(rt, demo["cooperative_id"])
    assert members["+25078****701"][:2] == ("Uwimana Grace", "Block A Floor 2")
    found = await admin.json("GET", "/v1/members?name=uwimana%20grace", 200)
    assert [m["id"] for m in found["data"]] == [body["memberIds"][0]]


async def test_a_number_a_digit_short_or_long_says_so(admin, rt, demo):
    """078812345 (a digit left out) was refused as "not a valid phone number of RW (a number of another country is
    written with +...)": the clerk looked for a country code where a digit was missing. Typed without +, a number of
    the wrong length may as well be another country's (a Burundian tenant's 79123456, eight digits): told "too short"
    alone, the clerk added a digit and registered someone else's number. Both are said."""
    before = len(await _members(rt, demo["cooperative_id"]))
    status, body = await _import(admin, b"name,phone\nShort Number,078812345\nLong Number,07881234567\n"
                                        b"Kenyan Short,+2547123456\nUgandan Local,0701234567\n"
                                        b"Burundian Local,79123456\n")
    assert status == 400
    foreign = "a number of another country is written with + and its country code, as +256 7XX XXX XXX"
    assert body["message"] == [
        "row 2: phone: too short for a mobile number of RW: one is written as 07XX XXX XXX or +250 7XX XXX XXX; "
        + foreign,
        "row 3: phone: too long for a mobile number of RW: one is written as 07XX XXX XXX or +250 7XX XXX XXX; "
        + foreign,
        "row 4: phone: too short for a mobile number of KE: one is written as 07XX XXXXXX or +254 7XX XXXXXX",
        f"row 5: phone: not a valid phone number of RW ({foreign})",
        "row 6: phone: too short for a mobile number of RW: one is written as 07XX XXX XXX or +250 7XX XXX XXX; "
        + foreign,
    ]
    assert len(await _members(rt, demo["cooperative_id"])) == before


async def test_a_list_over_the_limits_is_told_to_split_it(admin, rt, demo):
    """"more than 10000 rows" and "request body is larger than 5242880 bytes" told a clerk neither what to do nor,
    for the second, a limit she can read."""
    rows = "".join(f"Person {i:05d},07886{i:05d}\n" for i in range(10_001))
    status, body = await _import(admin, ("name,phone\n" + rows).encode())
    assert (status, body["message"]) == (400, [
        "row 10002: file: more than 10000 rows: an import takes at most 10,000 members a file; import the list in "
        "several files, each with the header row"])
    big = b"name,phone\n" + b"Aaaa Bbbb,0788123456\n" * (5 * 1024 * 1024 // 21 + 1)
    for headers, data in (({"Content-Type": "text/csv"}, big),
                          ({"Content-Type": "multipart/form-data; boundary=zz"},
                           b'--zz\r\nContent-Disposition: form-data; name="file"; filename="m.csv"\r\n\r\n' + big
                           + b"\r\n--zz--\r\n")):
        resp = await admin.req("POST", "/v1/members/import", data=data, headers=headers)
        assert (resp.status, (await resp.json())["message"]) == (413, (
            "the file is larger than 5 MB: an import takes at most 10,000 members a file; import the list in "
            "several files, each with the header row")), headers


@requires_pg  # SQLite has one writer at a time: a change waits for the import's writes (test_member_import_turns)
async def test_the_cooperative_is_changed_while_its_list_is_imported_with_existing_update(admin, superadmin, rt, demo,
                                                                                        monkeypatch):
    """existing=update held the cooperative's row (FOR NO KEY UPDATE) to the import's commit, so that two such
    imports take turns: a change of the cooperative meanwhile (PATCH /v1/cooperatives/{id}, a super admin renaming
    it) waited for the whole import, and past the statement timeout was answered 503. The imports take turns on a
    lock of their own now (test_members_concurrency: a list sent twice with existing=update at once)."""
    coop = demo["cooperative_id"]
    data = ("name,phone\n" + "".join(f"Member {n:03d},07881{n:05d}\n" for n in range(50))).encode()
    assert (await _import(admin, data))[0] == 201
    reached, go_on = asyncio.Event(), asyncio.Event()
    original = member_import._update_rows

    async def paused(*args, **kwargs):
        reached.set()  # the members read and locked, the import not yet committed
        await go_on.wait()
        return await original(*args, **kwargs)

    monkeypatch.setattr(member_import, "_update_rows", paused)
    importing = asyncio.create_task(_import(admin, data.replace(b"Member", b"Membre"), "?existing=update"))
    try:
        await asyncio.wait_for(reached.wait(), 60)
        renamed = await superadmin.json("PATCH", f"/v1/cooperatives/{coop}", 200, json={"name": "Renamed Coop"})
        assert renamed["name"] == "Renamed Coop"
        assert not importing.done()  # answered while the import was still under way
    finally:
        go_on.set()
    status, body = await importing
    assert (status, body["updated"]) == (201, 50), body


@requires_pg  # SQLite: the update import reads its members again under the write lock, after the other's commit
async def test_a_list_sent_with_existing_update_while_the_same_list_is_imported_updates_its_members(
        admin, rt, demo, monkeypatch):
    """A clerk imports a list, and (unsure it went through) sends it again with existing=update while the first is
    still writing. The update import read none of the first's members (not yet committed), tried to add them, waited
    for the first's commit on the unique index and was refused: "50 row(s) with a number already a member's: leave
    them out, or import with existing=update", the very option it was sent with. It waits for the first import
    before reading its members now, and finds them."""
    data = ("name,phone\n" + "".join(f"Member {n:03d},07882{n:05d}\n" for n in range(50))).encode()
    written, go_on = asyncio.Event(), asyncio.Event()
    original = member_import._insert_rows

    async def paused(*args, **kwargs):
        ids = await original(*args, **kwargs)
        if not written.is_set():  # the first import: its members written, not yet committed
            written.set()
            await go_on.wait()
        return ids

    monkeypatch.setattr(member_import, "_insert_rows", paused)
    first = asyncio.create_task(_import(admin, data))
    try:
        await asyncio.wait_for(written.wait(), 60)
        again = asyncio.create_task(_import(admin, data.replace(b"Member 007", b"Membre 007"), "?existing=update"))
        await asyncio.wait_for(waiting_for_locks(rt, 1), 60)  # the update import waits for the first
    finally:
        go_on.set()
    assert (await first)[0] == 201
    status, body = await again
    assert status == 201, body
    assert (body["imported"], body["updated"], body["unchanged"]) == (0, 1, 49), body
    assert (await _members(rt, demo["cooperative_id"]))["+25078****007"][0] == "Membre 007"
