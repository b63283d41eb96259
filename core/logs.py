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
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


def scrub(text: str) -> str:
    return _PHONE.sub(lambda m: f"{m[1]}{m[2]}{m[3]}{'*' * len(m[4])}{m[5]}", text)


def _is_bad_request(exc: BaseException | None) -> bool:
    try:
        from aiohttp.http_exceptions import HttpProcessingError
    except ImportError:  # pragma: no cover - aiohttp is a dependency
        return False
    return isinstance(exc, HttpProcessingError)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = request_id.get()
        if rid:
            entry["request_id"] = rid
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value if isinstance(value, str | int | float | bool | type(None)) else str(value)
        if record.exc_info:
            exc = record.exc_info[1]
            if record.name.startswith("aiohttp.") and _is_bad_request(exc):
                # aiohttp's parser errors quote the offending header or line, which may be a bearer
                # token or an API key: keep the kind of error only.
                entry["exc"] = type(exc).__name__
                entry["msg"] = "malformed HTTP request refused"
            else:
                entry["exc"] = self.formatException(record.exc_info)
        return scrub(json.dumps(entry, ensure_ascii=False, default=str))


def configure(level: str = "INFO", stream: Any = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("aiohttp.access", "httpx", "httpcore", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
