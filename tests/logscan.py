"""Pytest plugin: every log line of the session, as the JSON formatter writes it, is scanned for full phone
numbers and secrets; any hit fails the run at the end with the offending lines listed.

Registered from tests/conftest.py (`pytest_plugins`). The root logger runs at INFO for the session, as
`core.logs.configure` sets it in production (with the same chatty loggers kept at WARNING), so what the
scan sees is what a deployed process would write.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from typing import Any

import pytest

from core.config import DEV_CREDENTIAL, DEV_KEY, Secret
from core.logs import NOISY_LOGGERS, JsonFormatter

# A full East African / Ghanaian mobile number: +2507xxxxxxxx, 2547xxxxxxxx, +233xxxxxxxxx, 07xxxxxxxx,
# also written with spaces. Runs glued to letters or hex (UUIDs, digests, tokens) are not numbers, and
# a run longer than a number (epoch ms, provider ids) is not one either.
_EDGE_BEFORE = r"(?<![0-9A-Za-z])(?<![0-9A-Fa-f]{4}-)"  # the second: the last group of a UUID
_EDGE_AFTER = r"(?![0-9A-Za-z])"
PHONE_PATTERNS = [
    re.compile(_EDGE_BEFORE + r"\+?(?:25[0-7]|233)\d{8,9}" + _EDGE_AFTER),
    re.compile(_EDGE_BEFORE + r"0[1-9]\d{8}" + _EDGE_AFTER),
    re.compile(r"\+(?:25[0-7]|233)[ -]\d{2,3}[ -]?\d{3}[ -]?\d{3,4}" + _EDGE_AFTER),
]
# Credentials recognisable by their shape: a whole API key (its 12-character prefix is fine to log),
# a JWT, an Authorization header value.
SHAPE_PATTERNS = [
    ("API key", re.compile(r"cpk_[A-Za-z0-9_\-]{20,}")),
    ("JWT", re.compile(r"eyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}")),
    ("bearer token", re.compile(r"(?i)bearer\s+[A-Za-z0-9_\-.]{20,}")),
]
MIN_SECRET_LEN = 8  # shorter test values ("abc") would match ordinary words
MAX_OFFENDERS = 200

_secrets: set[str] = {DEV_CREDENTIAL, DEV_KEY}
_lock = threading.Lock()


def register_secret(value: str | None) -> None:
    """Tell the scan about a secret a test created (API key, callback secret...)."""
    if value and len(value) >= MIN_SECRET_LEN:
        with _lock:
            _secrets.add(value)


def _track_secrets() -> None:
    """Every core.config.Secret built during the session (settings of every test) is a known secret."""
    original = Secret.__init__
    if getattr(original, "_logscan", False):
        return

    def init(self: Secret, value: str) -> None:
        original(self, value)
        register_secret(value)

    init._logscan = True  # type: ignore[attr-defined]
    Secret.__init__ = init  # type: ignore[method-assign]


def find_leaks(line: str) -> list[str]:
    """What in one formatted log line is a full phone number or a known secret (empty if clean)."""
    found: list[str] = []
    for pattern in PHONE_PATTERNS:
        found += [f"phone number {m.group(0)!r}" for m in pattern.finditer(line)]
    for name, pattern in SHAPE_PATTERNS:
        if pattern.search(line):
            found.append(name)
    with _lock:
        known = list(_secrets)
    found += [f"secret {s[:3]}…" for s in known if s in line]
    return found


def redact(line: str) -> str:
    """The line as shown in the report: known secrets replaced, so the report does not spread them."""
    with _lock:
        known = sorted(_secrets, key=len, reverse=True)
    for secret in known:
        line = line.replace(secret, "<secret>")
    return line


@dataclass
class Offender:
    test: str
    line: str
    what: list[str]


class ScanHandler(logging.Handler):
    """Formats each record with the project's JsonFormatter and keeps the lines that leak something."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.current = "<collection>"
        self.lines = 0
        self.offenders: list[Offender] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception as exc:  # a record the formatter cannot write is a bug too
            line = f"<unformattable record {record.name}: {type(exc).__name__}>"
        self.lines += 1
        what = find_leaks(line)
        if what and len(self.offenders) < MAX_OFFENDERS:
            self.offenders.append(Offender(self.current, line, what))


_HANDLER = ScanHandler()


def _attach() -> None:
    root = logging.getLogger()
    if _HANDLER not in root.handlers:  # something (logs.configure in a test) replaced the handlers
        root.addHandler(_HANDLER)


def pytest_configure(config: pytest.Config) -> None:
    _track_secrets()
    root = logging.getLogger()
    if root.level in (logging.NOTSET, logging.WARNING):
        root.setLevel(logging.INFO)
    for name in NOISY_LOGGERS:  # as core.logs.configure
        logging.getLogger(name).setLevel(logging.WARNING)
    _attach()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    _HANDLER.current = item.nodeid
    _attach()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _HANDLER.offenders and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    offenders = _HANDLER.offenders
    if not offenders:
        terminalreporter.write_line(f"logscan: {_HANDLER.lines} log lines scanned, no phone number or secret")
        return
    terminalreporter.section("logscan: full phone numbers or secrets in the logs", red=True)
    for o in offenders:
        terminalreporter.write_line(f"{o.test}: {', '.join(o.what)}")
        terminalreporter.write_line(f"    {redact(o.line)[:600]}")
    more = " (list truncated)" if len(offenders) >= MAX_OFFENDERS else ""
    terminalreporter.write_line(
        f"logscan: {len(offenders)} offending log line(s) out of {_HANDLER.lines}{more}; the run fails",
        red=True, bold=True)


def offenders() -> list[Offender]:
    """The offending lines so far (for the suite's own test of the scanner)."""
    return list(_HANDLER.offenders)
