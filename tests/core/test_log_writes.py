"""core.logs: the lines of one event-loop turn leave in one write, warnings at once, nothing lost or reordered;
the JSON of a line orjson refuses; request ids without a system call each."""

from __future__ import annotations

import asyncio
import gc
import io
import json
import logging
import os
from collections.abc import Iterator
from typing import Any

import pytest

from core import logs
from core.logs import JsonFormatter, TurnBufferedHandler, new_request_id


class Writes:
    """A stream that records each write() call and each flush()."""

    def __init__(self) -> None:
        self.writes: list[str] = []
        self.flushes = 0

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        self.flushes += 1

    def lines(self) -> list[str]:
        return [json.loads(line)["msg"] for line in "".join(self.writes).splitlines()]


@pytest.fixture
def logged() -> Iterator[tuple[logging.Logger, Writes, TurnBufferedHandler]]:
    out = Writes()
    handler = TurnBufferedHandler(out)
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("tests.log_writes")
    saved = log.handlers[:], log.propagate, log.level
    log.handlers[:], log.propagate = [handler], False
    log.setLevel(logging.DEBUG)
    try:
        yield log, out, handler
    finally:
        log.handlers[:], log.propagate = saved[0], saved[1]
        log.setLevel(saved[2])


async def test_the_lines_of_one_turn_leave_in_one_write_at_its_end(logged: Any) -> None:
    log, out, _ = logged
    log.info("one")
    log.debug("two")
    log.info("three")
    assert out.writes == []  # kept until the turn ends
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert len(out.writes) == 1 and out.lines() == ["one", "two", "three"]
    assert out.flushes >= 1
    log.info("four")
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert len(out.writes) == 2 and out.lines() == ["one", "two", "three", "four"]


async def test_a_warning_leaves_at_once_after_the_lines_kept_before_it(logged: Any) -> None:
    log, out, _ = logged
    log.info("before")
    log.warning("trouble")
    assert len(out.writes) == 1 and out.lines() == ["before", "trouble"]
    log.info("after")
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert out.lines() == ["before", "trouble", "after"]


def test_outside_an_event_loop_each_line_leaves_at_once(logged: Any) -> None:
    log, out, _ = logged
    log.info("start-up")
    assert out.lines() == ["start-up"]
    log.debug("again")
    assert out.lines() == ["start-up", "again"] and len(out.writes) == 2


async def test_a_line_logged_in_another_thread_leaves_at_once_in_order(logged: Any) -> None:
    log, out, _ = logged
    log.info("loop")
    await asyncio.to_thread(log.info, "thread")
    assert out.lines() == ["loop", "thread"]


async def test_flush_writes_what_is_kept(logged: Any) -> None:
    log, out, handler = logged
    log.info("kept")
    handler.flush()  # as logging.shutdown() at exit
    assert out.lines() == ["kept"]
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert out.lines() == ["kept"]  # not twice


async def test_past_the_limit_the_kept_lines_leave_without_waiting(logged: Any) -> None:
    log, out, _ = logged
    text = "x" * 1000
    for _ in range(70):
        log.info(text)
    [written] = out.writes  # one write, when the kept lines passed 64 KiB; the rest kept
    lines = written.splitlines(keepends=True)
    assert len(written) > TurnBufferedHandler.LIMIT >= len(written) - len(lines[-1]) and len(lines) < 70
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert len(out.lines()) == 70


def test_lines_kept_when_a_loop_ends_leave_before_the_next_ones(logged: Any) -> None:
    log, out, _ = logged
    _closed_loop_with_a_kept_line(log)  # the loop stops before the turn-end write runs

    async def next_run() -> None:
        log.info("next loop")
        await asyncio.sleep(0)
        await asyncio.sleep(0)

    asyncio.run(next_run())
    assert out.lines() == ["kept at the end", "next loop"]


async def test_a_stream_that_refuses_loses_the_turn_not_the_loop(logged: Any, capsys: Any) -> None:
    log, out, _ = logged

    def refuse(text: str) -> int:
        raise OSError("disk full")

    out.write = refuse  # type: ignore[method-assign]
    log.info("lost")
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert "disk full" in capsys.readouterr().err
    out.write = Writes.write.__get__(out)  # type: ignore[method-assign]
    log.info("kept")
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert out.lines() == ["kept"]


def test_lines_orjson_refuses_are_written_by_the_json_module() -> None:
    formatter = JsonFormatter()
    record = logging.LogRecord("x", logging.INFO, "", 0, "bad \udc80 byte", (), None)
    record.big = 2**70  # (masked as a string: a number this long)
    record.huge = [2**70]  # an integer past 64 bits inside a list
    entry = json.loads(formatter.format(record))
    assert entry["msg"] == "bad \udc80 byte" and entry["huge"] == "[1180591620717411303424]"
    record = logging.LogRecord("x", logging.INFO, "", 0, "plain", (), None)
    record.when = object()
    assert json.loads(formatter.format(record))["when"].startswith("<object object")


def test_configure_installs_the_turn_buffered_handler() -> None:
    root = logging.getLogger()
    saved = root.level, root.handlers[:]
    try:
        logs.configure("INFO", stream=Writes())
        assert [type(h) for h in root.handlers] == [TurnBufferedHandler]
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]


def test_request_ids_are_32_letters_unique_and_new_in_a_forked_child() -> None:
    ids = [new_request_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    # No digits: nothing in a line's own request id sends the log mask looking for phone numbers.
    assert all(len(i) == 32 and set(i) <= set("abcdefghijklmnop") for i in ids)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next id, then out
        try:
            os.write(write, new_request_id().encode())
        finally:
            os._exit(0)
    os.close(write)
    parents_next = new_request_id()
    os.waitpid(pid, 0)
    child = os.read(read, 64).decode()
    os.close(read)
    # The child drew its own: not the id the parent had next (which a child going on with the parent's ids gets).
    assert len(child) == 32 and child.isalpha() and child != parents_next


def _closed_loop_with_a_kept_line(log: logging.Logger) -> None:
    """A loop stopped (then closed) before its turn-end write ran: the line stays kept in the handler."""

    async def last_words() -> None:
        log.info("kept at the end")
        asyncio.get_running_loop().stop()

    loop = asyncio.new_event_loop()
    try:
        task = loop.create_task(last_words())
        loop.run_forever()
        assert task.done()
    finally:
        loop.close()


def test_configure_again_does_not_lose_the_lines_the_old_handler_kept() -> None:
    root = logging.getLogger()
    saved = root.level, root.handlers[:]
    first, second = io.StringIO(), io.StringIO()
    try:
        logs.configure("INFO", stream=first)
        _closed_loop_with_a_kept_line(logging.getLogger("tests.log_review"))
        logs.configure("INFO", stream=second)  # the old handler is dropped from the root ...
        gc.collect()  # ... and, nothing else holding it, collected
        logging.getLogger("tests.log_review").warning("next")
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]
    written = [json.loads(line)["msg"] for line in (first.getvalue() + second.getvalue()).splitlines()]
    assert written == ["kept at the end", "next"]


def test_a_forked_child_does_not_write_its_parents_kept_lines_again() -> None:
    read, write = os.pipe()
    out = os.fdopen(write, "w")
    handler = TurnBufferedHandler(out)
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("tests.log_review.fork")
    log.handlers[:], log.propagate = [handler], False
    log.setLevel(logging.INFO)

    async def fork_mid_turn() -> int:
        log.info("parent's line")  # kept until this turn ends
        pid = os.fork()
        if pid == 0:
            try:
                log.warning("child's line")  # at once: the child's own line only
                handler.flush()
            finally:
                os._exit(0)
        return pid

    try:
        pid = asyncio.run(fork_mid_turn())
        os.waitpid(pid, 0)
        handler.flush()
    finally:
        log.handlers[:] = []
        out.close()
    with os.fdopen(read) as got:
        written = [json.loads(line)["msg"] for line in got.read().splitlines()]
    assert sorted(written) == ["child's line", "parent's line"], written


def test_a_request_id_does_not_tell_how_many_requests_the_process_served() -> None:
    # The id goes back to every caller (X-Request-Id): consecutive ones must not count the process's requests
    # (a caller reading two of them learns how many other requests the gateway served in between).
    first, second = new_request_id(), new_request_id()
    gap = abs(int(second[16:].translate(_HEX), 16) - int(first[16:].translate(_HEX), 16))
    assert first[:16] != second[:16] or gap > 2**32


_HEX = str.maketrans("abcdefghijklmnop", "0123456789abcdef")


def test_a_line_the_json_module_writes_is_spelt_as_orjson_writes_the_others() -> None:
    # Operators' and log shippers' patterns ('"level":"WARNING"') must match every line, not all but the few
    # orjson refuses (a lone surrogate in a message) and the json module writes with spaces.
    formatter = JsonFormatter()
    plain = formatter.format(logging.LogRecord("x", logging.WARNING, "", 0, "plain", (), None))
    odd = formatter.format(logging.LogRecord("x", logging.WARNING, "", 0, "bad \udc80 byte", (), None))
    assert '"level":"WARNING"' in plain and '"level":"WARNING"' in odd, (plain, odd)
