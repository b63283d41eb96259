"""Structured JSON logs with a request id, and a last-line filter that masks phone numbers."""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import os
import re
import sys
import weakref
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import orjson

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

# Any run of 9-15 digits (optionally after +) is treated as a phone number and masked; not inside an
# identifier (a UUID's last group can be twelve digits: "…-93b8-853737003928" must stay whole).
_PHONE = re.compile(r"(?<![\w.-])(\+?)(\d{3})(\d{2})(\d{1,7})(\d{3})(?![\w.-])")
# A run of nine digits: without one there is nothing to mask, and this is about four times cheaper to
# look for than _PHONE (which tries its lookbehind at every character). A log line has one per hop.
_NINE_DIGITS = re.compile(r"\d{9}")
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}
_PLAIN = (str, int, float, bool, type(None))
# (compact as orjson writes: one spelling for every line, whichever encoder wrote it)
_FALLBACK = json.JSONEncoder(ensure_ascii=False, default=str, separators=(",", ":")).encode


def _encode(entry: dict[str, Any]) -> str:
    """The line's JSON: orjson (a tenth of the json module's time), or the json module for what orjson refuses
    (a lone surrogate in a message, an integer past 64 bits), so that no line is lost to its content."""
    try:
        return orjson.dumps(entry, default=str).decode()
    except TypeError:  # (orjson.JSONEncodeError is one)
        return _FALLBACK(entry)


_LETTERS = str.maketrans("0123456789abcdef", "abcdefghijklmnop")


class _RequestIds:
    """A request's id when the caller sent none: 32 letters a-p (128 random bits, hex digits spelt as letters),
    drawn from random bytes read 256 ids at a time: no getrandom() system call per request. Random, not a
    per-process prefix and a counter: the id goes back to every caller (X-Request-Id), and consecutive counter
    values told any caller how many requests the process served in between (the gateway's traffic). Letters, not
    hex digits: a run of nine digits in a line makes the log mask (scrub) search the whole line for phone
    numbers, and a uuid4's hex has one about a third of the time."""

    BATCH = 256

    def __init__(self) -> None:
        self.reset()
        os.register_at_fork(after_in_child=self.reset)  # a forked child must not repeat its parent's ids

    def reset(self) -> None:
        self._ids: Iterator[str] = iter(())

    def next(self) -> str:
        rid = next(self._ids, None)  # (a list iterator's next is atomic: threads never share an id)
        if rid is None:
            text = os.urandom(16 * self.BATCH).hex().translate(_LETTERS)
            self._ids = ids = iter([text[i:i + 32] for i in range(0, len(text), 32)])
            rid = next(ids)
        return rid


new_request_id = _RequestIds().next


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
        return scrub(_encode(entry))


class TurnBufferedHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A StreamHandler that writes the INFO and DEBUG lines logged in one turn of the event loop together, at the
    turn's end: one write to the stream (one system call) for them, not one each. Under load a `serve` logs a line
    per USSD hop, and the write was a tenth of its log line's cost.

    Written at once, with every line kept before them (the order is kept): a WARNING or worse (what an operator
    needs to see even if the process dies on the next line), a line logged outside the event loop's thread or with
    no loop running (start-up, threads, tools), and the kept lines when they pass 64 KiB. flush() (at exit,
    logging.shutdown(); close()) writes what is kept. A process killed with SIGKILL loses the INFO lines of the
    turn it was in, microseconds of them."""

    LIMIT = 64 * 1024

    def __init__(self, stream: Any = None) -> None:
        super().__init__(stream)
        self._kept: list[str] = []
        self._size = 0
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop a turn-end write is scheduled on
        _TURN_BUFFERED.add(self)

    def _drop_kept(self) -> None:
        """The kept lines gone unwritten: in a forked child (they are the parent's, which writes them), and after a
        write the stream refused."""
        self._kept.clear()
        self._size = 0
        self._loop = None

    def emit(self, record: logging.LogRecord) -> None:
        # (Handler.handle holds self.lock: one thread at a time in here)
        try:
            line = self.format(record) + self.terminator
            loop = asyncio.events._get_running_loop()
            if loop is None or record.levelno >= logging.WARNING:
                self._write(line)
                return
            self._kept.append(line)
            self._size += len(line)
            if self._size > self.LIMIT:
                self._write("")
            elif self._loop is not loop:  # (or scheduled on a loop that ended before its turn's end: lines kept)
                loop.call_soon(self._turn_end)
                self._loop = loop
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def _write(self, line: str) -> None:
        """The kept lines, then `line`, in one write; then the stream's flush."""
        if self._kept:
            line = "".join(self._kept) + line
            self._kept.clear()
            self._size = 0
        if line:
            self.stream.write(line)
            super().flush()

    def _turn_end(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._loop = None
            try:
                self._write("")
            except Exception:  # the stream refused (closed, full disk): as Handler.handleError, not the loop's error
                self._drop_kept()
                if logging.raiseExceptions:  # (False in production configurations that silence handler errors)
                    import traceback

                    traceback.print_exc(file=sys.stderr)

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            if self._kept:
                self._write("")
            else:
                super().flush()


_TURN_BUFFERED: weakref.WeakSet[TurnBufferedHandler] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for handler in list(_TURN_BUFFERED):
        handler._drop_kept()


os.register_at_fork(after_in_child=_after_fork_in_child)


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
    handler = TurnBufferedHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for old in root.handlers:  # lines an old handler still keeps (a loop that closed before its turn's end)
        if isinstance(old, TurnBufferedHandler):
            old.flush()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    migration = logging.getLogger("alembic.runtime.migration")
    if not any(isinstance(f, _AlembicContextAtDebug) for f in migration.filters):
        migration.addFilter(_AlembicContextAtDebug())
