"""A member list mixing UTF-8 and Windows-1252 rows (core.member_import._refuse_mixed), as its lines are counted."""

import pytest

from core.member_import import LINES, MAX_ROWS, TOO_MANY, ImportRejected, _parse, parse_rows

UTF8_ROW = "Nabukeera Zoë Akéllo,0772000456".encode()
CP1252_ROW = "Namuli Bénédicte,0772000458".encode("cp1252")


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
def test_a_mixed_list_is_refused_naming_its_rows_whatever_its_line_ends(newline: bytes) -> None:
    """Excel for Mac's "CSV (Macintosh)" ends its lines with a bare CR, which the CSV reader counts as lines: split on
    LF alone, the whole file was one line, never both UTF-8 and not, and its UTF-8 names were stored garbled."""
    data = newline.join([b"name,phone", UTF8_ROW, b"Okello Jane,0772000457", CP1252_ROW]) + newline
    with pytest.raises(ImportRejected) as refused:
        parse_rows(data, region="UG")
    assert [(e.row, e.field) for e in refused.value.row_errors] == [(4, "file")]
    assert "while row 2 is" in refused.value.row_errors[0].message
    assert str(refused.value) == "1 problem in the file; nothing was imported"


def test_a_windows_1252_list_whose_row_also_reads_as_utf8_is_not_refused() -> None:
    """"RENÉ" then a no-break space (a name pasted from a web page) is bytes C9 A0 in Windows-1252, which are also
    UTF-8 (an IPA letter, "RENɠMUGISHA"): that row was taken for a UTF-8 one and a list all in Windows-1252
    refused as mixed."""
    data = "name,phone\nRENÉ\xa0MUGISHA,0772000456\nNamuli Bénédicte,0772000458\n".encode("cp1252")
    parsed = parse_rows(data, region="UG")
    assert parsed.encoding == "windows-1252"
    assert [row.name for row in parsed.rows] == ["RENÉ\xa0MUGISHA", "Namuli Bénédicte"]


def test_a_list_with_two_problems_a_row_is_not_said_to_be_over_the_row_limit() -> None:
    """The row limit counts the file's rows, not its problems: a list of 6,000 rows each with a bad name and a bad
    language was cut at row 5,002 as "more than 10000 rows", every row after it unchecked."""
    rows = [f"X,07720{n:05d},Kirundi" for n in range(6000)]
    data = ("name,phone,language\n" + "\n".join(rows) + "\n").encode()
    with pytest.raises(ImportRejected) as refused:
        parse_rows(data, region="UG")
    errors = refused.value.row_errors
    assert not [e for e in errors if e.field == "file"]
    assert len(errors) == 12_000 and errors[-1].row == 6001


def test_a_list_over_the_row_limit_is_refused_at_its_first_row_past_it() -> None:
    rows = [f"Member {n},07720{n:05d}" for n in range(10_001)]
    with pytest.raises(ImportRejected) as refused:
        parse_rows(("name,phone\n" + "\n".join(rows) + "\n").encode(), region="UG")
    assert [e.text() for e in refused.value.row_errors] == [f"row 10002: file: {TOO_MANY}"]


def test_a_long_run_of_spaces_in_a_cell_is_read_in_linear_time() -> None:
    """Line breaks typed in a cell are read as a space (core.member_import._one_line). Looked for inside each run of
    white space, a long run of spaces with no break in it (a column padded by an export) was tried from each of its
    spaces: 40,000 of them took some 20 s of CPU, the interpreter's lock held all along (the serve's USSD hops
    waiting), and the 128 KiB a cell may hold took minutes. Measured in CPU time, which a loaded machine does not
    stretch: the quadratic reading is far above the bound, the linear one far below it."""
    import time

    padded = "Grace" + " " * 40_000 + "Uwimana"
    data = f'name,phone,unit\n"{padded}",0772000456,A\n"Okello\r\n  Jane",0772000457,"Block A \nFloor 2"\n'.encode()
    started = time.process_time()
    with pytest.raises(ImportRejected) as refused:
        parse_rows(data, region="UG")
    assert time.process_time() - started < 3.0
    assert [e.text() for e in refused.value.row_errors] == ["row 2: name: must be 2 to 200 characters"]
    [row] = refused.value.rows
    assert (row.name, row.unit) == ("Okello Jane", "Block A Floor 2")


def _stops(data: bytes) -> int:
    """How many times reading `data` gives the event loop a turn (core.member_import._parse's yields), to the end
    of the file or its refusal."""
    steps = _parse(data, region="UG")
    stops = 0
    try:
        while True:
            next(steps)
            stops += 1
    except (StopIteration, ImportRejected):
        return stops


def test_empty_lines_and_a_windows_1252_files_lines_give_the_event_loop_turns() -> None:
    """Turns were given after each TURN rows only: a file of empty lines (",,," separators, 5 MB of them), and the
    look at each line of a Windows-1252 file for UTF-8 ones (_refuse_mixed, 2.6 million lines in 5 MB), were each
    read in one stretch (2-5 s, 16 s for a mixed one) while every USSD hop of the serve waited."""
    assert _stops(b"name,phone\n" + b",\n" * (10 * LINES) + b"Okello Jane,0772000457\n") >= 10
    mixed = b"name,phone\n" + UTF8_ROW + b"\n" + b"\xe9\n" * (10 * LINES)  # refused before its rows are read
    assert _stops(mixed) >= 10


def test_a_mixed_list_of_more_lines_than_an_import_takes_names_the_first_of_them() -> None:
    """Each line not UTF-8 was named: a 5 MB file of short lines was an answer of 2.6 million lines."""
    data = b"name,phone\n" + UTF8_ROW + b"\n" + (CP1252_ROW + b"\n") * (MAX_ROWS + 5)
    with pytest.raises(ImportRejected) as refused:
        parse_rows(data, region="UG")
    errors = refused.value.row_errors
    assert len(errors) == MAX_ROWS + 1
    assert [e.row for e in errors[:MAX_ROWS]] == list(range(3, MAX_ROWS + 3))
    assert errors[-1].text() == f"file: 5 more lines are not UTF-8; {TOO_MANY}"
