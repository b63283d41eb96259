"""CSV member import: every row is checked first, and nothing is imported unless every row is good."""

from __future__ import annotations

import asyncio
import codecs
import csv
import dataclasses
import functools
import io
import re
from collections.abc import AsyncIterator, Callable, Generator, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from core.audit import Actor, record
from core.crypto import PiiCipher
from core.db import (
    ADVISORY_XACT_LOCK,
    ADVISORY_XACT_LOCK_SHARED,
    insert_ignore,
    new_id,
    row_insert,
    serialise_on_sqlite,
    utcnow,
)
from core.errors import ValidationError
from core.members import CHANGED, LANGUAGES, MEMBER_STATUSES, PERSONAL_FIELDS, created_audit, member_row
from core.models import AuditEvent, Cooperative, Member
from core.phone import Phone, PhoneError, normalize
from core.text import has_bad_characters

COLUMNS = ("name", "phone", "unit", "language")
REQUIRED = ("name", "phone")
MAX_ROWS = 10_000
# Said of the row past the limit: the number alone did not tell a clerk with a longer list what to do.
TOO_MANY = (f"more than {MAX_ROWS} rows: an import takes at most {MAX_ROWS:,} members a file; import the list in "
            "several files, each with the header row")
MAX_COLUMNS = 50  # the four stored and what a spreadsheet export carries beside them
CHUNK = 500  # rows per INSERT: 12 parameters a row, well under SQLite's 32,766 and PostgreSQL's 65,535
# What a row whose number is already a member's does (the import's `existing`): refuse the file (the default,
# naming the row), or update that member's name, unit and language from it (the clerk's whole list sent again).
EXISTING = ("refuse", "update")
ALREADY_A_MEMBER = "already a member of this cooperative"
# A number whose member is not ACTIVE: "already a member" alone let a clerk adding back a tenant who left believe
# she was in again (and existing=update answered her row "unchanged"), while she stays unable to pay. An import
# never changes a member's status (README): it says which, and how to change it.
NOT_ACTIVE = {
    "SUSPENDED": "suspended (member {id}): an import never reactivates a member; to have her back, set her "
                 "status ACTIVE (PATCH /v1/members/{id})",
    "PENDING": "pending approval (member {id}): an import never approves a member; approve her "
               "(POST /v1/members/{id}/approve)",
}


def not_active(member_id: str, status: str) -> str | None:
    """Her status and what to do about it, for a row whose number is a member's who cannot pay (None: an ACTIVE
    one)."""
    said = NOT_ACTIVE.get(status)
    return None if said is None else said.format(id=member_id)


def _rows(count: int) -> str:
    """"1 row", "1,200 rows": a count of the file's rows as a clerk reads it (not "1 row(s)")."""
    return "1 row" if count == 1 else f"{count:,} rows"


def already_members(errors: list[RowError]) -> list[RowError]:
    """The rows whose number is already a member's, after one line saying what to do about them (said once: the
    whole list sent again names every row)."""
    if not errors:
        return errors
    return [RowError(0, "file", f"{_rows(len(errors))} with a number already a member's: leave them out, or import "
                                "with existing=update to update those members' name, unit and language from the "
                                "file"), *errors]


# Rows worked through on the event loop before other requests get a turn (turns, read_rows): about 1 ms of parsing
# (50 us a row). A USSD hop waits for the network several times, and for one such stretch each time: at 100 rows a
# turn, hops during a 10,000-row import still took up to 0.3 s on a busy machine; at 20, 30-120 ms (as busy).
TURN = 20

# Lines read past (empty, or looked at for their encoding alone: _refuse_mixed) before the event loop gets a turn:
# about a microsecond or two each, so again about 1 ms.
LINES = 500

T = TypeVar("T")


async def turns(items: Iterable[T], size: int = TURN) -> AsyncIterator[T]:
    """`items`, giving the event loop a turn (other requests run) after each `size` of them."""
    for count, item in enumerate(items, start=1):
        yield item
        if count % size == 0:
            await asyncio.sleep(0)


@dataclass(frozen=True)
class RowError:
    row: int  # line number in the file, the header being line 1; 0: the whole file
    field: str
    message: str

    def text(self) -> str:
        return f"row {self.row}: {self.field}: {self.message}" if self.row else f"{self.field}: {self.message}"


@dataclass(frozen=True)
class ImportRow:
    row: int
    name: str
    phone: Phone
    unit: str | None
    language: str | None  # None: no language given (a new member's is "en"; an updated member keeps hers)


class ImportRejected(ValidationError):
    """The file had bad rows; the list says which, and nothing was imported. `rows` are the file's rows that
    passed their own checks (parse_rows), still to be checked against the cooperative's members, so that one
    answer names every problem of the file."""

    def __init__(self, errors: list[RowError], rows: list[ImportRow] | None = None) -> None:
        texts = [e.text() for e in errors]
        said = "1 problem" if len(errors) == 1 else f"{len(errors):,} problems"
        super().__init__(f"{said} in the file; nothing was imported", errors=texts)
        self.row_errors = errors
        self.rows = rows or []


DELIMITERS = ",;\t"
# A language column a clerk typed as words: the language's name in English, French or itself reads as its code.
LANGUAGE_NAMES = {"english": "en", "anglais": "en", "kinyarwanda": "rw", "ikinyarwanda": "rw", "french": "fr",
                  "français": "fr", "francais": "fr", "swahili": "sw", "kiswahili": "sw"}


def delimiter_of(text: str) -> str:
    """The header line's separator: a comma, or the semicolon a spreadsheet uses where the comma is the
    decimal mark (Excel in a French locale), or a tab; whichever the header holds most (a comma on a tie). The
    header is the first line with something in it: a sheet whose first rows were left empty saves them as blank
    lines or as separators only (";;;")."""
    lines = text.split("\n", 20)
    first = next((line for line in lines[:20] if line.strip(DELIMITERS + " \r\ufeff")), lines[0])
    counts = {d: first.count(d) for d in DELIMITERS}
    best = max(DELIMITERS, key=lambda d: counts[d])  # the first of equals: the comma
    return best if counts[best] else ","


@dataclass(frozen=True)
class ParsedFile:
    rows: list[ImportRow]
    ignored_columns: list[str]  # columns of the file the import does not store (an email, a member number)
    encoding: str
    columns: frozenset[str] = frozenset(COLUMNS)  # which of COLUMNS the file has (an update sets only those)


# A spreadsheet's own file sent instead of its CSV: a zip (.xlsx, .ods) or an OLE2 compound file (.xls). Read as
# text they are "not UTF-8 or Windows-1252", which does not tell the clerk what to do.
WORKBOOK = "is a spreadsheet workbook ({kind}), not a CSV file: save it as CSV (Excel: File > Save As > " \
           "CSV UTF-8 (Comma delimited); LibreOffice: Save As > Text CSV; Google Sheets: File > Download > " \
           "Comma-separated values) and import that file"
_WORKBOOKS = ((b"PK\x03\x04", ".xlsx or .ods"), (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", ".xls"))


def decode(data: bytes) -> Generator[None, None, tuple[str, str]]:
    """The file's text and the encoding it was read in: UTF-8 (with or without a BOM); UTF-16 with its BOM
    (Excel's "Unicode Text"); else Windows-1252 (Excel's "CSV (Comma delimited)" on a Windows set to English or
    French: "Amélie" is one byte é). A file that is none of these is refused; a workbook is told how to save it as
    CSV. Stops (yield) as _refuse_mixed does."""
    for magic, kind in _WORKBOOKS:
        if data.startswith(magic):
            raise ImportRejected([RowError(0, "file", WORKBOOK.format(kind=kind))])
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return data.decode("utf-16"), "utf-16"
        except UnicodeDecodeError:
            pass
    else:
        try:
            return data.decode("utf-8-sig"), "utf-8"
        except UnicodeDecodeError:
            try:
                text = data.decode("cp1252")
            except UnicodeDecodeError:
                pass
            else:
                yield from _refuse_mixed(data)
                return text, "windows-1252"
    raise ImportRejected([RowError(0, "file", "must be text: UTF-8, UTF-16 or Windows-1252")])


# Two-byte UTF-8 from U+0180 (IPA, Greek, Cyrillic...) is also Windows-1252's capital accented letter before a
# symbol or a no-break space ("RENÉ" + NBSP is C9 A0, "ɠ"): a line reading so is no sign the list mixes UTF-8 in.
_CP1252_LOOKALIKE = ("\u0180", "\u07ff")


def _refuse_mixed(data: bytes) -> Generator[None, None, None]:
    """A file not UTF-8 as a whole whose lines beyond ASCII are partly UTF-8 (a list saved as CSV UTF-8, then rows
    pasted in from an older Windows export): read as Windows-1252, its UTF-8 names were stored as "ZoÃ« AkÃ©llo".
    Refused naming the lines that are not UTF-8 (the first MAX_ROWS of them), beside the first that is.

    Stops (yield) after each LINES lines: a 5 MB file of short lines is 2.6 million of them, 2-5 s read in one
    stretch while every USSD hop of this serve waited (and, all named, an answer of 2.6 million lines)."""
    utf8 = 0  # the first UTF-8 line
    other: list[int] = []
    more = 0  # lines not UTF-8 past the first MAX_ROWS, counted, not named
    # Lines as the CSV reader counts them (parse_rows' row numbers): LF, CRLF or a bare CR (Excel for Mac).
    for number, line in enumerate(data.splitlines(), start=1):
        if number % LINES == 0:
            yield
        if line.isascii():
            continue
        try:
            read = line.decode("utf-8")
        except UnicodeDecodeError:
            if len(other) < MAX_ROWS:
                other.append(number)
            else:
                more += 1
        else:
            if not utf8 and not any(_CP1252_LOOKALIKE[0] <= char <= _CP1252_LOOKALIKE[1] for char in read):
                utf8 = number
    if utf8 and other:
        errors = [RowError(n, "file", f"is not UTF-8 while row {utf8} is: its letters beyond A-Z would be read "
                                      "wrong; save the whole list again as CSV UTF-8 and import that file")
                  for n in other]
        if more:
            errors.append(RowError(0, "file", f"{more:,} more lines are not UTF-8; {TOO_MANY}"))
        raise ImportRejected(errors)


# A line break typed inside a cell (Alt+Enter, to wrap a long name or "Block A / Floor 2" in its column) is kept in
# the CSV as a quoted cell over two lines: stored so, "Uwimana<line break>Grace" was not found as "uwimana grace"
# and her name ran over two lines in every list and text.
# Each run of white space is matched once, and only one holding a line break becomes a space: a pattern that looks
# for the break inside the run (\s*[\r\n]+\s*) tries every space of a long run of spaces from every start, which
# is quadratic: a cell of 100,000 spaces (a column padded by an export) held the CPU, and the interpreter's lock
# with it, for minutes, while every USSD hop of that serve waited.
_SPACES = re.compile(r"\s+")


def _one_line(cell: str) -> str:
    """A cell trimmed, its line breaks (and the spaces around them) read as one space."""
    cell = cell.strip()
    if "\n" not in cell and "\r" not in cell:
        return cell
    return _SPACES.sub(lambda run: " " if "\n" in run[0] or "\r" in run[0] else run[0], cell)


def parse_rows(data: bytes, *, region: str) -> ParsedFile:
    """Decode and check the whole file; raise ImportRejected listing every problem found. read_rows run to its end
    in one go, where no event loop runs (a script, a test): the turns it gives (asyncio.sleep(0), a bare yield to
    the task running it) are passed straight over."""
    reading = read_rows(data, region=region).__await__()
    try:
        while True:
            next(reading)
    except StopIteration as done:
        parsed: ParsedFile = done.value
        return parsed


async def read_rows(data: bytes, *, region: str) -> ParsedFile:
    """The file decoded and checked (parse_rows) on the event loop, giving it a turn after each TURN rows. Parsing
    10,000 rows (phonenumbers) is about half a second of CPU: in one stretch every USSD hop of this serve waited for
    it, and in a thread (as it was) the hops still waited, each time they came back from the network, for the
    interpreter's lock the thread held (hops 7-15 ms, the worst 0.4-0.7 s, while an import ran). It awaits nothing
    else: parse_rows runs it where no event loop runs."""
    steps = _parse(data, region=region)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value
        await asyncio.sleep(0)


def _parse(data: bytes, *, region: str) -> Generator[None, None, ParsedFile]:
    """parse_rows, stopping (yield) after each TURN rows."""
    text, encoding = yield from decode(data)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter_of(text))
    try:
        cells = next(reader)
        while not any(c.strip() for c in cells):  # empty rows above the header (delimiter_of)
            cells = next(reader)
        header = [h.strip().lower() for h in cells]
        head = reader.line_num  # 1 unless empty rows came first
    except StopIteration:
        raise ImportRejected([RowError(1, "header", "the file is empty")]) from None
    except csv.Error as exc:
        raise ImportRejected([RowError(max(reader.line_num, 1), "header", f"not CSV: {exc}")]) from None
    errors: list[RowError] = []
    # Other columns (a SACCO's export has an email, a member number...) are read past and named in the answer.
    # Columns with no name (a spreadsheet's trailing separators) likewise.
    ignored = [h for h in header if h and h not in COLUMNS]
    if len(header) > MAX_COLUMNS:
        raise ImportRejected([RowError(head, "header", f"more than {MAX_COLUMNS} columns")])
    if any(has_bad_characters(h) or len(h) > 64 for h in ignored):
        errors.append(RowError(head, "header", "a column name has characters that are not allowed or is over 64 long"))
    # A header a clerk named otherwise ("Phone Number", "Nom"), or a file with no header row at all: the
    # answer shows the header row as it was read, so what to rename is plain.
    found = ", ".join(h for h in header if h)[:300] or "nothing"
    for col in REQUIRED:
        if col not in header:
            errors.append(RowError(head, "header", f"column {col} is required (the header row must name the columns "
                                                f"name, phone, unit, language; it has: {found})"))
    known = [h for h in header if h in COLUMNS]
    if len(set(known)) != len(known):
        errors.append(RowError(head, "header", "a column appears twice"))
    if errors:
        raise ImportRejected(errors)

    rows: list[ImportRow] = []
    seen: dict[str, int] = {}
    line = head
    count = 0  # the file's rows so far (not its problems: a row may have several)
    empty = 0  # empty lines read past
    try:
        for cells in reader:
            # A row is named by the line it starts on: a quoted cell may hold line breaks, and the reader's count
            # is of the row's last line.
            start, line = line + 1, reader.line_num
            if not any(c.strip() for c in cells):
                # Empty lines are not rows (count), and a turn is not given after TURN of them: a 5 MB file of
                # them (separators only, ",,,") held the event loop 2-4 s in one stretch.
                empty += 1
                if empty % LINES == 0:
                    yield
                continue
            count += 1
            if count % TURN == 0:
                yield
            if count > MAX_ROWS:
                errors.append(RowError(start, "file", TOO_MANY))
                break
            if len(cells) != len(header):
                over = "" if line == start else (f" (it runs from line {start} to line {line}: a quote opening a "
                                                 "cell and never closed takes in the lines after it)")
                errors.append(RowError(start, "row", f"has {len(cells)} fields, expected {len(header)}{over}"))
                continue
            # Checked as POST /members checks JSON: a NUL would reach the database (which refuses it), and
            # other control characters would be stored in names the API refuses.
            bad = [RowError(start, h, "contains characters that are not allowed")
                   for h, c in zip(header, cells, strict=True) if h in COLUMNS and has_bad_characters(c)]
            if bad:
                errors.extend(bad)
                continue
            values = {h: _one_line(c) for h, c in zip(header, cells, strict=True) if h in COLUMNS}
            row_errors: list[RowError] = []
            name = values.get("name", "")
            if not 2 <= len(name) <= 200:
                row_errors.append(RowError(start, "name", "must be 2 to 200 characters"))
            phone: Phone | None = None
            try:
                phone = normalize(values.get("phone", ""), region)
            except PhoneError as exc:
                row_errors.append(RowError(start, "phone", exc.message))
            unit = values.get("unit") or None
            if unit is not None and len(unit) > 64:
                row_errors.append(RowError(start, "unit", "must be at most 64 characters"))
            language = values.get("language", "").lower() or None
            language = LANGUAGE_NAMES.get(language or "", language)
            if language is not None and language not in LANGUAGES:
                row_errors.append(RowError(start, "language", f"must be one of {', '.join(LANGUAGES)}"))
            if phone is not None:
                first = seen.get(phone.e164)
                if first is not None:
                    row_errors.append(RowError(start, "phone", f"same number as row {first}"))
                else:
                    seen[phone.e164] = start
            if row_errors or phone is None:
                errors.extend(row_errors)
                continue
            rows.append(ImportRow(start, name, phone, unit, language))
    except csv.Error as exc:
        errors.append(RowError(line + 1, "row", f"not valid CSV: {exc}"))
    if errors:
        raise ImportRejected(errors, rows)
    if not rows:
        raise ImportRejected([RowError(2, "file", "no member rows")])
    return ParsedFile(rows, ignored, encoding, frozenset(h for h in header if h in COLUMNS))


@dataclass(frozen=True)
class Imported:
    member_ids: list[str]
    ignored_columns: list[str]
    encoding: str
    updated_ids: list[str] = dataclasses.field(default_factory=list)  # existing=update: members the file changed
    unchanged: int = 0  # existing=update: rows whose member already had the file's name, unit and language
    # New members imported all the same whose number the admin should look at (phone_warning: another country's),
    # and (existing=update) members updated who are not ACTIVE (not_active), in the file's order
    warnings: list[RowError] = dataclasses.field(default_factory=list)


async def import_members(
    session: AsyncSession,
    cipher: PiiCipher,
    *,
    cooperative: Cooperative,
    data: bytes,
    actor: Actor,
    status: str = "ACTIVE",
    existing: str = "refuse",
    phone_warning: Callable[[Phone], str | None] | None = None,
) -> Imported:
    """Validate the file, refuse numbers already in the cooperative (or, `existing="update"`, update those
    members' name, unit and language from their rows), then create every other row's member; returns the new
    members' ids in the file's order, with the file's columns it did not store and its encoding, and a warning
    for each new member's row whose number `phone_warning` has something to say about (not a refusal: a member
    living abroad is still one).

    The caller commits; on any error nothing has been written (the caller rolls back).
    """
    if status not in MEMBER_STATUSES:  # as create_member checks it
        raise ValidationError(f"status must be one of {', '.join(MEMBER_STATUSES)}", field="status")
    if existing not in EXISTING:
        raise ValidationError(f"existing must be one of {', '.join(EXISTING)}", field="existing")
    try:
        parsed = await read_rows(data, region=cooperative.country)
    except ImportRejected as exc:
        if not exc.rows or existing == "update":
            raise
        # The file's good rows are checked against the members too: an admin who fixed the rows first named
        # would otherwise learn of its numbers already registered only on sending it again.
        known = await _already_members(session, cipher, cooperative.id, exc.rows)
        raise ImportRejected(sorted(exc.row_errors + known, key=lambda e: e.row)) from None
    rows = parsed.rows
    updated: list[str] = []
    unchanged = 0
    inactive: list[RowError] = []
    # Each number's blind index, read once for the whole import (the members it finds, the order it writes in).
    indexes = [cipher.blind_index(r.phone.e164) async for r in turns(rows)]
    dialect = session.get_bind().dialect.name
    prepared: tuple[dict[str, Member], _NewMembers, list[RowError]] | None = None
    if existing == "update":
        keys = sorted(set(indexes))
        if dialect != "postgresql":
            # The members read before SQLite's write lock (_read_locked), and the new rows' members worked out from
            # that read, before it too: taken first, the lock was held while half a list grown since was encrypted.
            read = await _read_members(session, cooperative.id, keys, lock=False)
            prepared = (read, *await _prepare(cipher, cooperative, *_new_rows(rows, indexes, read), actor=actor,
                                              status=status, phone_warning=phone_warning))
        members = await _members_of(session, cooperative.id, keys, read=prepared[0] if prepared else None)
        pairs = [(r, members[i]) for r, i in zip(rows, indexes, strict=True) if i in members]
        updated = await _update_rows(session, pairs, parsed.columns, actor=actor)
        # Updated (or unchanged) all the same, as the file says, but she still cannot pay: said beside the rows.
        inactive = [RowError(r.row, "status", f"this number's member is {said}")
                    async for r, m in turns(pairs) if (said := not_active(m.id, m.status))]
        unchanged = len(members) - len(updated)
        rows, indexes = _new_rows(rows, indexes, members)
        if prepared is not None and prepared[0].keys() != members.keys():
            prepared = None  # a member added, erased or released between the read and the lock: worked out again
    else:
        if dialect == "postgresql":
            # Create-only imports of the cooperative do not wait for each other (the unique index decides between
            # them), but an existing=update import waits for them, and they for it (_members_of): unheld, the list
            # sent again with existing=update while its first upload was still being written read none of its
            # members, tried to add them, and was refused "50 row(s) with a number already a member's: leave them
            # out, or import with existing=update", the option it was sent with.
            await session.execute(ADVISORY_XACT_LOCK_SHARED, {"key": _imports_key(cooperative.id)})
        known = await _already_members(session, cipher, cooperative.id, rows, indexes=indexes, whole=status)
        if known:
            raise ImportRejected(known)
    new, warnings = prepared[1:] if prepared is not None else await _prepare(
        cipher, cooperative, rows, indexes, actor=actor, status=status, phone_warning=phone_warning)
    # `whole`: existing=update inserts only the rows with no member, and a race it loses (a number registered
    # meanwhile) is not the same list sent again.
    ids = await _insert_rows(session, cipher, cooperative.id, rows, indexes, new,
                             whole=None if existing == "update" else status)
    after: dict[str, Any] = {"count": len(ids), "ignoredColumns": parsed.ignored_columns, "encoding": parsed.encoding}
    if existing == "update":
        after.update(updated=len(updated), unchanged=unchanged)
    await record(
        session,
        actor=actor,
        action="member.imported",
        entity_type="cooperative",
        entity_id=cooperative.id,
        after=after,
        cooperative_id=cooperative.id,
    )
    warnings = sorted(warnings + inactive, key=lambda w: w.row)
    return Imported(ids, parsed.ignored_columns, parsed.encoding, updated, unchanged, warnings)


def _new_rows(rows: list[ImportRow], indexes: list[str],
              members: dict[str, Member]) -> tuple[list[ImportRow], list[str]]:
    """The rows (and their numbers' blind indexes, `indexes`) whose number is none of `members`'."""
    new = [(r, i) for r, i in zip(rows, indexes, strict=True) if i not in members]
    return [r for r, _ in new], [i for _, i in new]


async def _prepare(cipher: PiiCipher, cooperative: Cooperative, rows: list[ImportRow], indexes: list[str], *,
                   actor: Actor, status: str,
                   phone_warning: Callable[[Phone], str | None] | None) -> tuple[_NewMembers, list[RowError]]:
    """Everything the new members' rows need worked out before the first of them is written, and their warnings:
    on SQLite the first write takes the database's write lock, held to the commit, and every other writer of this
    serve (a member confirming a payment by USSD) waits for it. Encrypted between the inserts, and the warnings
    read after them, a 10,000-row import held it 1.8-2.5 s (of 2.8-3.9 s, on a busy 2-CPU machine); its writes
    alone, 1.0-1.7 s. Committed a chunk at a time it would hold it less, but a failure past the first chunk (a
    number registered meanwhile, the serve stopped) would leave part of a file imported, and another import of the
    list would read that part: the import is all or nothing (README)."""
    new = await _member_values(cipher, cooperative.id, rows, indexes, actor=actor, status=status,
                               language=cooperative.language or "en")
    # About 40 us a row (the number's country and operator, read by phonenumbers): 0.4 s of a 10,000-row file in
    # one stretch held the event loop, and every USSD hop of this serve waited for it.
    warnings = [RowError(r.row, "phone", said) async for r in turns(rows)
                if phone_warning is not None and (said := phone_warning(r.phone)) is not None]
    return new, warnings


async def _already_members(session: AsyncSession, cipher: PiiCipher, cooperative_id: str,
                           rows: list[ImportRow], *, indexes: list[str] | None = None,
                           ours: set[str] | frozenset[str] = frozenset(),
                           whole: str | None = None) -> list[RowError]:
    """A RowError, in the file's order, for each row whose number is already a member's of the cooperative (not
    one of `ours`: the members this import has inserted so far). `indexes`: the rows' numbers' blind indexes, when
    the import has them (import_members): computed here again, they were an HMAC a row more, 10,000 of a full file.
    `whole`: `rows` are the whole file, to be imported with that status; when each of them is a member with its
    row's details, the file was imported already, and one error says so (already_imported)."""
    if indexes is None:
        indexes = [cipher.blind_index(r.phone.e164) async for r in turns(rows)]
    by_index = dict(zip(indexes, rows, strict=True))
    # One statement for the whole file (at most MAX_ROWS numbers: within asyncpg's 32,767 parameters and SQLite's
    # 32,766), so one snapshot: read 500 at a time, an import of the same list committing between two reads was
    # named for the numbers read after it alone ("200 row(s) ... already a member's" of 1,200), and the clerk who
    # left those out was refused again.
    found = await session.execute(
        select(Member.phone_index, Member.id, Member.status, Member.name, Member.unit, Member.language,
               Member.created_at).where(Member.cooperative_id == cooperative_id,
                                        Member.phone_index.in_(list(by_index))))
    # blind index -> its member (id, status, name, unit, language, created_at)
    existing: dict[str, Any] = {m.phone_index: m for m in found.all()
                                if m.phone_index is not None and m.id not in ours}
    if whole is not None and len(existing) == len(by_index) and all(
            _same(by_index[i], m) for i, m in existing.items()):
        return already_imported(existing, by_index, status=whole)
    return already_members(sorted([RowError(by_index[i].row, "phone", ALREADY_A_MEMBER + (
        f", {said}" if (said := not_active(m.id, m.status)) else "")) async for i, m in turns(existing.items())],
                                  key=lambda e: e.row))


def _same(row: ImportRow, member: Any) -> bool:
    """Whether the member has the row's name, unit and language (a row without a language: any)."""
    return (member.name == row.name and member.unit == ((row.unit or "").strip() or None)
            and row.language in (None, member.language))


def already_imported(members: dict[str, Any], rows: dict[str, ImportRow], *, status: str) -> list[RowError]:
    """The same list sent again (`members`: each row's, by blind index, with its details): one error saying so,
    where it was "already a member" for each of its rows, thousands of lines hiding that nothing in it was new (a
    clerk unsure whether her upload went through sends it again). Then the rows whose member is no longer in the
    status this import gives (suspended since): they still cannot pay, and the list sent again will not change
    that (NOT_ACTIVE)."""
    added = [m.created_at for m in members.values()]
    first, last = _minute(min(added)), _minute(max(added))
    when = f"on {last}" if first == last else f"between {first} and {last}"
    count = len(members)
    matches = f"its {count:,} rows match {count:,} members" if count != 1 else "its 1 row matches 1 member"
    said = RowError(0, "file", f"this list was already imported: {matches} of this cooperative with the same name, "
                               f"unit and language, added {when}; nothing was imported. To change members' details, "
                               "correct the file and import it with existing=update")
    others = [RowError(rows[i].row, "phone", f"{ALREADY_A_MEMBER}, {text}") for i, m in members.items()
              if m.status != status and (text := not_active(m.id, m.status))]
    return [said, *sorted(others, key=lambda e: e.row)]


def _minute(moment: datetime) -> str:
    """A time as the import's messages give it: UTC, to the minute (SQLite hands back a naive UTC one)."""
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _imports_key(cooperative_id: str) -> str:
    """The advisory lock's key on which the cooperative's imports take turns: an existing=update one holds it alone
    (_members_of), create-only ones shared (import_members)."""
    return f"member-import:{cooperative_id}"


async def _members_of(session: AsyncSession, cooperative_id: str, keys: list[str], *,
                      read: dict[str, Member] | None = None) -> dict[str, Member]:
    """The cooperative's members holding the file's numbers (`keys`: their blind indexes, sorted), by blind index,
    locked (FOR UPDATE): an erasure or a release running meanwhile waits for the import, or the import for it, so a
    name is never written back onto an erased member. (SQLite has no row locks: the database's write lock,
    _read_locked, after `read`: the members read before it.)

    Two existing=update imports into one cooperative (a clerk's upload sent twice) take turns first, as SQLite's
    write lock makes them: on PostgreSQL a transaction-scoped advisory lock of the cooperative's imports, so the
    second reads every member the first added (create-only imports hold it shared: import_members). Unheld, the
    second read the first's members in part (those its chunks of numbers read after the first committed), tried to
    add the others again, and a 1,201-row list sent with existing=update was refused "this list was already
    imported: its 499 rows match 499 members ... import it with existing=update". It was the cooperative's row,
    locked FOR NO KEY UPDATE to the import's commit: every change of the cooperative's own (PATCH
    /v1/cooperatives/{id}, its settings) waited for the whole import, a few seconds of 10,000 rows, and past the
    statement timeout was answered 503."""
    # Locked in one order whatever the file's (its numbers' blind indexes, across the chunks too): two imports of
    # overlapping lists at once take turns instead of deadlocking.
    if session.get_bind().dialect.name == "postgresql":
        await session.execute(ADVISORY_XACT_LOCK, {"key": _imports_key(cooperative_id)})
        return await _read_members(session, cooperative_id, keys, lock=True)
    if read is None:
        read = await _read_members(session, cooperative_id, keys, lock=False)
    return await _read_locked(session, cooperative_id, keys, read)


async def _read_members(session: AsyncSession, cooperative_id: str, keys: list[str], *,
                        lock: bool) -> dict[str, Member]:
    """The members holding the numbers `keys` (sorted blind indexes), by blind index: read fresh, and `lock`ed
    FOR UPDATE (PostgreSQL)."""
    members: dict[str, Member] = {}
    for start in range(0, len(keys), 500):
        query = (select(Member).where(Member.cooperative_id == cooperative_id,
                                      Member.phone_index.in_(keys[start : start + 500]))
                 .order_by(Member.phone_index).execution_options(populate_existing=True))
        found = await session.execute(query.with_for_update() if lock else query)
        members.update((m.phone_index, m) for m in found.scalars() if m.phone_index is not None)
    return members


_AS_READ = (Member.phone_index, Member.id, Member.updated_at, Member.status, Member.name, Member.unit,
            Member.language)


async def _read_locked(session: AsyncSession, cooperative_id: str, keys: list[str],
                       members: dict[str, Member]) -> dict[str, Member]:
    """_members_of on SQLite: the members read before (`members`, _read_members), then the database's write lock
    taken (serialise_on_sqlite: another import, an erasure, a payment's confirmation wait for this import's commit
    from here on) and what was read checked against the database, a few columns of each; read again when anything
    changed in between (a member erased, suspended or added). Read under the lock, as PostgreSQL does, the 10,000
    members of a list sent again (0.6-0.7 s of the ORM's work) were that much more that every other writer of the
    serve waited for."""
    seen = {(i, m.id, m.updated_at, m.status, m.name, m.unit, m.language) for i, m in members.items()}
    await serialise_on_sqlite(session, Cooperative, cooperative_id)
    now: set[tuple[Any, ...]] = set()
    for start in range(0, len(keys), 500):
        found = await session.execute(select(*_AS_READ).where(Member.cooperative_id == cooperative_id,
                                                              Member.phone_index.in_(keys[start : start + 500])))
        now.update(tuple(row) for row in found.all())
    return members if now == seen else await _read_members(session, cooperative_id, keys, lock=False)


async def _update_rows(session: AsyncSession, pairs: list[tuple[ImportRow, Member]], columns: frozenset[str], *,
                       actor: Actor) -> list[str]:
    """Each member whose row says otherwise gets the row's name, and its unit and language where the file has
    those columns (an empty language cell keeps hers; an empty unit cell clears it, as the file says); her status
    and number are not the file's to change. Audited as PATCH /members/{id} audits (member.updated), the audit
    rows in batched inserts. The ids of the members changed, in the file's order.

    Written CHUNK members at a time: the flush of 10,000 changed members (the ORM comparing each) and their audit
    rows' insert each held the event loop for 0.1-0.3 s in one stretch, and the USSD hops of this serve waited."""
    changed: list[Member] = []
    audits: list[dict[str, Any]] = []
    dialect = session.get_bind().dialect.name
    now = utcnow()

    async def write() -> None:
        await session.flush()  # one UPDATE per set of columns changed, its rows sent together
        await session.execute(row_insert(dialect, AuditEvent), audits)
        audits.clear()

    async for row, member in turns(pairs):
        was = {field: getattr(member, field) for field in PERSONAL_FIELDS}
        before = {"language": member.language, "status": member.status}
        member.name = row.name
        if "unit" in columns:
            member.unit = row.unit
        if row.language is not None:
            member.language = row.language
        after: dict[str, Any] = {"language": member.language, "status": member.status}
        after.update({field: CHANGED for field in PERSONAL_FIELDS if getattr(member, field) != was[field]})
        if after == before:
            continue
        changed.append(member)
        audits.append({"cooperative_id": member.cooperative_id, "actor": actor.id, "channel": actor.channel,
                       "action": "member.updated", "entity_type": "member", "entity_id": member.id,
                       "before": before, "after": after, "at": now})
        if len(audits) == CHUNK:
            await write()
    if audits:
        await write()
    return [m.id for m in changed]


@functools.cache
def _insert_members(dialect: str) -> Any:
    return (insert_ignore(dialect, Member.__table__)
            .on_conflict_do_nothing(index_elements=["cooperative_id", "phone_index"])
            .returning(Member.__table__.c.id))


@dataclass(frozen=True)
class _NewMembers:
    """The rows' members as they are written (member_row, with their ids and creation audit rows), in the order of
    their numbers' blind indexes (`places`: each one's row in the file)."""
    places: list[int]
    members: list[dict[str, Any]]
    audits: list[dict[str, Any]]


async def _member_values(cipher: PiiCipher, cooperative_id: str, rows: list[ImportRow], indexes: list[str], *,
                         actor: Actor, status: str, language: str) -> _NewMembers:
    """Every row's member as create_member would write it (the member and its "member.created" audit row),
    worked out row by row between turns of the event loop, in the order of the numbers' blind indexes
    (`indexes`, the rows')."""
    places = sorted(range(len(rows)), key=indexes.__getitem__)
    now = utcnow()
    members: list[dict[str, Any]] = []
    audits: list[dict[str, Any]] = []
    async for r in turns([rows[n] for n in places]):
        member = {**member_row(cipher, cooperative_id=cooperative_id, name=r.name, phone=r.phone,
                               language=r.language or language, unit=r.unit, status=status),
                  "id": new_id(), "created_at": now, "updated_at": now}
        members.append(member)
        audits.append({"cooperative_id": cooperative_id, "actor": actor.id, "channel": actor.channel,
                       "action": "member.created", "entity_type": "member", "entity_id": member["id"],
                       "before": None, "after": created_audit(status, member["phone_masked"]), "at": now})
    return _NewMembers(places, members, audits)


async def _insert_rows(session: AsyncSession, cipher: PiiCipher, cooperative_id: str, rows: list[ImportRow],
                       indexes: list[str], new: _NewMembers, *, whole: str | None) -> list[str]:
    """The rows' members and their "member.created" audit rows (`new`, _member_values) written, CHUNK rows to a
    statement: a 10,000-row file is 20 member INSERTs and a batched audit insert, where a row at a time was
    20,000 round trips (25-34 s in one request). The unique (cooperative, phone) index still decides: a number
    added by another request since the check above inserts nothing, and the file is refused naming its row
    (`indexes`: the rows' numbers' blind indexes, to read which).

    Written in the order of the numbers' blind indexes, whatever the file's (the ids are still returned in the
    file's order): two imports of overlapping lists at once take turns on PostgreSQL's unique index, the second
    told which rows the first added. In the file's order, a list and the same list sorted otherwise (by name,
    by unit) each waited for a number the other had written first, and one was answered 503 (a deadlock)."""
    dialect = session.get_bind().dialect.name
    ids = [""] * len(rows)  # by the row's place in the file
    for start in range(0, len(rows), CHUNK):
        places = new.places[start : start + CHUNK]
        values = new.members[start : start + CHUNK]
        # A number that sent STOP (before the import, or as a member elsewhere) gets no reminders here either,
        # as with create_member, without its membership's flag or audit row saying so: the send-time check reads
        # the number (core.members, a number's opt-out). A file of numbers does not read the STOP list.
        # One statement with the rows as parameters: SQLAlchemy sends it as multi-row INSERTs
        # ("insertmanyvalues") without compiling a statement per chunk.
        written = set((await session.execute(_insert_members(dialect), values)).scalars())
        if len(written) != len(values):
            # Read again for the whole file, not this chunk alone: the same file sent again after a timeout while
            # the first upload was still being written was told "500 row(s) already a member's" of its 5,000 (the
            # first chunk to meet the other's rows), and the clerk who left those out was refused again.
            known = await _already_members(session, cipher, cooperative_id, rows, indexes=indexes,
                                           ours={*filter(None, ids), *written}, whole=whole)
            if whole is None and known:
                # An existing=update import (the rows it read as having no member): "import with existing=update",
                # said to one, was the option it was sent with. The file, sent again, updates them.
                known[0] = RowError(0, "file", f"{_rows(len(known) - 1)} with a number registered while this import "
                                               "ran (by USSD or another request): nothing was imported; send the "
                                               "file again to update those members too")
            raise ImportRejected(known)
        await session.execute(row_insert(dialect, AuditEvent), new.audits[start : start + CHUNK])
        for n, v in zip(places, values, strict=True):
            ids[n] = str(v["id"])
    return ids
