"""Structured JSON logs with a request id, and a last-line filter that masks phone numbers."""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

# Any run of 9-15 digits (optionally after +) is treated as a phone number and masked; not inside an
# identifier (a UUID's last group can be twelve digits: "…-93b8-853737003928" must stay whole).
_PHONE = re.compile(r"(?<![\w.-])(\+?)(\d{3})(\d{2})(\d{1,7})(\d{3})(?![\w.-])")
# A run of nine digits: without one there is nothing to mask, and this is about four times cheaper to
# look for than _PHONE (which tries its lookbehind at every character). A log line has one per hop.
_NINE_DIGITS = re.compile(r"\d{9}")
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}
_PLAIN = (str, int, float, bool, type(None))
_ENCODE = json.JSONEncoder(ensure_ascii=False, default=str).encode  # one encoder, not one per line


def scrub(text: str) -> str:
    if _NINE_DIGITS.search(text) is None:
        return text
    return _PHONE.sub(lambda m: f"{m[1]}{m[2]}{m[3]}{'*' * len(m[4])}{m[5]}", text)


class _Clock:
    """The log timestamp: the date and time formatted once per second, the milliseconds appended."""

    def __init__(self) -> None:
        self.second, self.prefix = -1, ""

    def stamp(self, created: float) -> str:
        second = int(created)
        if second != self.second:
            self.prefix = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
            self.second = second
        return f"{self.prefix}.{int((created - second) * 1000):03d}+00:00"


def _is_bad_request(exc: BaseException | None) -> bool:
    try:
        from aiohttp.http_exceptions import HttpProcessingError
    except ImportError:  # pragma: no cover - aiohttp is a dependency
        return False
    return isinstance(exc, HttpProcessingError)


class JsonFormatter(logging.Formatter):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._clock = _Clock()

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": self._clock.stamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = request_id.get()
        if rid:
            entry["request_id"] = rid
        for key, value in record.__dict__.items():  # the caller's `extra` fields, in the caller's order
            if key not in _STANDARD and not key.startswith("_"):
                if not isinstance(value, _PLAIN) or (type(value) is int and abs(value) >= 100_000_000):
                    value = str(value)  # a number long enough to be masked is masked inside a JSON string
                entry[key] = value
        if record.exc_info:
            exc = record.exc_info[1]
            if record.name.startswith("aiohttp.") and _is_bad_request(exc):
                # aiohttp's parser errors quote the offending header or line, which may be a bearer
                # token or an API key: keep the kind of error only.
                entry["exc"] = type(exc).__name__
                entry["msg"] = "malformed HTTP request refused"
            else:
                entry["exc"] = self.formatException(record.exc_info)
        return scrub(_ENCODE(entry))


# Libraries whose own lines stay at WARNING even with LOG_LEVEL=DEBUG: request lines already logged our
# way, and aiosqlite, whose debug lines carry every statement with its parameters (names, ciphertexts).
NOISY_LOGGERS = ("aiohttp.access", "httpx", "httpcore", "asyncio", "aiosqlite", "hpack",
                 "alembic.runtime.plugins")  # (alembic: a line per plugin set up, at every start)
# alembic's lines about the connection, logged at INFO whenever it reads the migration state (every command, with
# nothing to migrate too): DEBUG here. Its "Running upgrade a -> b" lines, from the same logger, stay INFO.
_ALEMBIC_CONTEXT_LINES = frozenset({"Context impl %s.", "Will assume %s DDL.", "Generating static SQL"})


class _AlembicContextAtDebug(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg not in _ALEMBIC_CONTEXT_LINES:
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger().isEnabledFor(logging.DEBUG)


def configure(level: str = "INFO", stream: Any = None) -> None:
    # The formatter writes none of the caller's file, line, thread or process: do not collect them for
    # every record (the logging HOWTO's "Optimization"; finding the caller walks the stack, ~8% of a log
    # call, and a log line is written for every USSD hop).
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    migration = logging.getLogger("alembic.runtime.migration")
    if not any(isinstance(f, _AlembicContextAtDebug) for f in migration.filters):
        migration.addFilter(_AlembicContextAtDebug())
