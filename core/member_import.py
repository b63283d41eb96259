"""CSV member import: every row is checked first, and nothing is imported unless every row is good."""

from __future__ import annotations

import asyncio
import codecs
import csv
import functools
import io
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from core.audit import Actor, record
from core.crypto import PiiCipher
from core.db import insert_ignore, new_id, row_insert, utcnow
from core.errors import ValidationError
from core.members import LANGUAGES, MEMBER_STATUSES, created_audit, member_row
from core.models import AuditEvent, Cooperative, Member
from core.phone import Phone, PhoneError, normalize
from core.text import has_bad_characters

COLUMNS = ("name", "phone", "unit", "language")
REQUIRED = ("name", "phone")
MAX_ROWS = 10_000
MAX_COLUMNS = 50  # the four stored and what a spreadsheet export carries beside them
CHUNK = 500  # rows per INSERT: 12 parameters a row, well under SQLite's 32,766 and PostgreSQL's 65,535


@dataclass(frozen=True)
class RowError:
    row: int  # line number in the file, the header being line 1
    field: str
    message: str

    def text(self) -> str:
        return f"row {self.row}: {self.field}: {self.message}"


@dataclass(frozen=True)
class ImportRow:
    row: int
    name: str
    phone: Phone
    unit: str | None
    language: str


class ImportRejected(ValidationError):
    """The file had bad rows; the list says which, and nothing was imported. `rows` are the file's rows that
    passed their own checks (parse_rows), still to be checked against the cooperative's members, so that one
    answer names every problem of the file."""

    def __init__(self, errors: list[RowError], rows: list[ImportRow] | None = None) -> None:
        texts = [e.text() for e in errors]
        super().__init__(f"{len(errors)} problem(s) in the file; nothing was imported", errors=texts)
        self.row_errors = errors
        self.rows = rows or []


DELIMITERS = ",;\t"


def delimiter_of(text: str) -> str:
    """The header line's separator: a comma, or the semicolon a spreadsheet uses where the comma is the
    decimal mark (Excel in a French locale), or a tab; whichever the header holds most (a comma on a tie)."""
    first = text.split("\n", 1)[0]
    counts = {d: first.count(d) for d in DELIMITERS}
    best = max(DELIMITERS, key=lambda d: counts[d])  # the first of equals: the comma
    return best if counts[best] else ","


@dataclass(frozen=True)
class ParsedFile:
    rows: list[ImportRow]
    ignored_columns: list[str]  # columns of the file the import does not store (an email, a member number)
    encoding: str


def decode(data: bytes) -> tuple[str, str]:
    """The file's text and the encoding it was read in: UTF-8 (with or without a BOM); UTF-16 with its BOM
    (Excel's "Unicode Text"); else Windows-1252 (Excel's "CSV (Comma delimited)" on a Windows set to English or
    French: "Amélie" is one byte é). A file that is none of these is refused."""
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
                return data.decode("cp1252"), "windows-1252"
            except UnicodeDecodeError:
                pass
    raise ImportRejected([RowError(0, "file", "must be text: UTF-8, UTF-16 or Windows-1252")])


def parse_rows(data: bytes, *, region: str) -> ParsedFile:
    """Decode and check the whole file; raise ImportRejected listing every problem found."""
    text, encoding = decode(data)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter_of(text))
    try:
        header = [h.strip().lower() for h in next(reader)]
    except StopIteration:
        raise ImportRejected([RowError(1, "header", "the file is empty")]) from None
    except csv.Error as exc:
        raise ImportRejected([RowError(1, "header", f"not CSV: {exc}")]) from None
    errors: list[RowError] = []
    # Other columns (a SACCO's export has an email, a member number...) are read past and named in the answer.
    # Columns with no name (a spreadsheet's trailing separators) likewise.
    ignored = [h for h in header if h and h not in COLUMNS]
    if len(header) > MAX_COLUMNS:
        raise ImportRejected([RowError(1, "header", f"more than {MAX_COLUMNS} columns")])
    if any(has_bad_characters(h) or len(h) > 64 for h in ignored):
        errors.append(RowError(1, "header", "a column name has characters that are not allowed or is over 64 long"))
    for col in REQUIRED:
        if col not in header:
            errors.append(RowError(1, "header", f"column {col} is required"))
    known = [h for h in header if h in COLUMNS]
    if len(set(known)) != len(known):
        errors.append(RowError(1, "header", "a column appears twice"))
    if errors:
        raise ImportRejected(errors)

    rows: list[ImportRow] = []
    seen: dict[str, int] = {}
    line = 1
    try:
        for cells in reader:
            line = reader.line_num
            if not any(c.strip() for c in cells):
                continue
            if len(rows) + len(errors) >= MAX_ROWS:
                errors.append(RowError(line, "file", f"more than {MAX_ROWS} rows"))
                break
            if len(cells) != len(header):
                errors.append(RowError(line, "row", f"has {len(cells)} fields, expected {len(header)}"))
                continue
            # Checked as POST /members checks JSON: a NUL would reach the database (which refuses it), and
            # other control characters would be stored in names the API refuses.
            bad = [RowError(line, h, "contains characters that are not allowed")
                   for h, c in zip(header, cells, strict=True) if h in COLUMNS and has_bad_characters(c)]
            if bad:
                errors.extend(bad)
                continue
            values = {h: c.strip() for h, c in zip(header, cells, strict=True) if h in COLUMNS}
            row_errors: list[RowError] = []
            name = values.get("name", "")
            if not 2 <= len(name) <= 200:
                row_errors.append(RowError(line, "name", "must be 2 to 200 characters"))
            phone: Phone | None = None
            try:
                phone = normalize(values.get("phone", ""), region)
            except PhoneError as exc:
                row_errors.append(RowError(line, "phone", exc.message))
            unit = values.get("unit") or None
            if unit is not None and len(unit) > 64:
                row_errors.append(RowError(line, "unit", "must be at most 64 characters"))
            language = (values.get("language") or "en").lower()
            if language not in LANGUAGES:
                row_errors.append(RowError(line, "language", f"must be one of {', '.join(LANGUAGES)}"))
            if phone is not None:
                first = seen.get(phone.e164)
                if first is not None:
                    row_errors.append(RowError(line, "phone", f"same number as row {first}"))
                else:
                    seen[phone.e164] = line
            if row_errors or phone is None:
                errors.extend(row_errors)
                continue
            rows.append(ImportRow(line, name, phone, unit, language))
    except csv.Error as exc:
        errors.append(RowError(line + 1, "row", f"not valid CSV: {exc}"))
    if errors:
        raise ImportRejected(errors, rows)
    if not rows:
        raise ImportRejected([RowError(2, "file", "no member rows")])
    return ParsedFile(rows, ignored, encoding)


@dataclass(frozen=True)
class Imported:
    member_ids: list[str]
    ignored_columns: list[str]
    encoding: str


async def import_members(
    session: AsyncSession,
    cipher: PiiCipher,
    *,
    cooperative: Cooperative,
    data: bytes,
    actor: Actor,
    status: str = "ACTIVE",
) -> Imported:
    """Validate the file, refuse numbers already in the cooperative, then create every member; returns
    the new members' ids in the file's order, with the file's columns it did not store and its encoding.

    The caller commits; on any error nothing has been written (the caller rolls back).
    """
    if status not in MEMBER_STATUSES:  # as create_member checks it
        raise ValidationError(f"status must be one of {', '.join(MEMBER_STATUSES)}", field="status")
    # Parsing 10,000 rows (phonenumbers) is about half a second of CPU: in a thread, so the event loop keeps
    # serving other requests between its turns.
    try:
        parsed = await asyncio.to_thread(parse_rows, data, region=cooperative.country)
    except ImportRejected as exc:
        if not exc.rows:
            raise
        # The file's good rows are checked against the members too: an admin who fixed the rows first named
        # would otherwise learn of its numbers already registered only on sending it again.
        known = await _already_members(session, cipher, cooperative.id, exc.rows)
        raise ImportRejected(sorted(exc.row_errors + known, key=lambda e: e.row)) from None
    rows = parsed.rows
    known = await _already_members(session, cipher, cooperative.id, rows)
    if known:
        raise ImportRejected(known)
    ids = await _insert_rows(session, cipher, cooperative.id, rows, actor=actor, status=status)
    await record(
        session,
        actor=actor,
        action="member.imported",
        entity_type="cooperative",
        entity_id=cooperative.id,
        after={"count": len(ids), "ignoredColumns": parsed.ignored_columns, "encoding": parsed.encoding},
        cooperative_id=cooperative.id,
    )
    return Imported(ids, parsed.ignored_columns, parsed.encoding)


async def _already_members(session: AsyncSession, cipher: PiiCipher, cooperative_id: str,
                           rows: list[ImportRow]) -> list[RowError]:
    """A RowError, in the file's order, for each row whose number is already a member's of the cooperative."""
    by_index = {cipher.blind_index(r.phone.e164): r for r in rows}
    existing: set[str] = set()
    keys = list(by_index)
    for start in range(0, len(keys), 500):
        chunk = keys[start : start + 500]
        found = await session.execute(
            select(Member.phone_index).where(
                Member.cooperative_id == cooperative_id, Member.phone_index.in_(chunk)
            )
        )
        existing.update(i for i in found.scalars() if i is not None)
    return sorted((RowError(by_index[i].row, "phone", "already a member of this cooperative") for i in existing),
                  key=lambda e: e.row)


@functools.cache
def _insert_members(dialect: str) -> Any:
    return (insert_ignore(dialect, Member.__table__)
            .on_conflict_do_nothing(index_elements=["cooperative_id", "phone_index"])
            .returning(Member.__table__.c.id))


async def _insert_rows(session: AsyncSession, cipher: PiiCipher, cooperative_id: str, rows: list[ImportRow], *,
                       actor: Actor, status: str) -> list[str]:
    """Every row as create_member would write it (the member and its "member.created" audit row), CHUNK
    rows to a statement: a 10,000-row file is 20 member INSERTs and a batched audit insert, where a row at
    a time was 20,000 round trips (25-34 s in one request). The unique (cooperative, phone) index still
    decides: a number added by another request since the check above inserts nothing, and the file is
    refused naming its row."""
    dialect = session.get_bind().dialect.name
    ids: list[str] = []
    for start in range(0, len(rows), CHUNK):
        chunk = rows[start : start + CHUNK]
        now = utcnow()
        values = [{
            **member_row(cipher, cooperative_id=cooperative_id, name=r.name, phone=r.phone, language=r.language,
                         unit=r.unit, status=status),
            "id": new_id(), "created_at": now, "updated_at": now,
        } for r in chunk]
        # A number that sent STOP (before the import, or as a member elsewhere) gets no reminders here either,
        # as with create_member, without its membership's flag or audit row saying so: the send-time check reads
        # the number (core.members, a number's opt-out). A file of numbers does not read the STOP list.
        # One statement with the rows as parameters: SQLAlchemy sends it as multi-row INSERTs
        # ("insertmanyvalues") without compiling a statement per chunk.
        written = set((await session.execute(_insert_members(dialect), values)).scalars())
        if len(written) != len(values):
            raise ImportRejected([RowError(r.row, "phone", "already a member of this cooperative")
                                  for r, v in zip(chunk, values, strict=True) if v["id"] not in written])
        await session.execute(row_insert(dialect, AuditEvent), [{
            "cooperative_id": cooperative_id, "actor": actor.id, "channel": actor.channel,
            "action": "member.created", "entity_type": "member", "entity_id": v["id"], "before": None,
            "after": created_audit(status, v["phone_masked"]), "at": now,
        } for v in values])
        ids.extend(str(v["id"]) for v in values)
    return ids
