"""core.pgraw: statements compiled once and run on the session's asyncpg connection, on real PostgreSQL."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import bindparam, func, insert, literal, select, text
from sqlalchemy.exc import DBAPIError, IntegrityError

from core import pgraw
from core.db import utcnow
from core.models import OutboxJob
from tests.conftest import count_calls, requires_pg

pytestmark = requires_pg

_T = OutboxJob.__table__
_ADD = insert(_T).values(kind=bindparam("kind"), payload=bindparam("payload", type_=_T.c.payload.type),
                         dedupe_key=bindparam("key"), status=literal("PENDING"), attempts=0, max_attempts=3,
                         run_at=bindparam("at", type_=_T.c.run_at.type), created_at=bindparam("at"),
                         updated_at=bindparam("at")).returning(_T.c.id, _T.c.payload)
ADD = pgraw.compiled(_ADD)


def _params(key: str) -> dict[str, Any]:
    return {"kind": "test.raw", "payload": {"n": 1, "ü": [True, None]}, "key": key, "at": utcnow()}


async def _jobs(sm: Any) -> list[tuple[str, dict[str, Any]]]:
    async with sm() as s:
        return [tuple(r) for r in (await s.execute(select(OutboxJob.dedupe_key, OutboxJob.payload)
                                                   .order_by(OutboxJob.id))).all()]


def test_compiled_once_with_positional_parameters() -> None:
    assert "$1" in ADD.sql and ":kind" not in ADD.sql
    assert set(ADD.names) >= {"kind", "payload", "key", "at"} and "payload" in ADD.json_names
    args = ADD.args({"kind": "k", "payload": {"a": 1}, "key": None, "at": "t"})
    assert '{"a":1}' in args and "PENDING" in args  # JSON sent as text (core.db.json_text); literal() values too
    with pytest.raises(KeyError):
        ADD.args({"kind": "k"})


def test_arguments_in_order_with_the_statements_own_values_and_json_as_text() -> None:
    raw = pgraw.RawStatement("-", ("a", "doc", "own", "b"), frozenset({"doc"}), {"own": "literal"})
    assert raw.args({"b": 2, "a": 1, "doc": {"k": [1]}}) == [1, '{"k":[1]}', "literal", 2]
    assert raw.args({"a": 1, "doc": None, "own": "given", "b": 2}) == [1, None, "given", 2]  # the caller's wins
    with pytest.raises(KeyError, match="'b'"):
        raw.args({"a": 1, "doc": None})
    assert pgraw.RawStatement("-", ("only",), frozenset(), {}).args({"only": 5}) == [5]
    assert pgraw.RawStatement("-", (), frozenset(), {}).args({"unused": 1}) == []


def test_an_expanding_in_is_refused_at_compile_time() -> None:
    """IN of a list is rendered by SQLAlchemy at each execution: raw, its placeholder would reach the server."""
    with pytest.raises(ValueError, match="expanding IN"):
        pgraw.compiled(select(_T.c.id).where(_T.c.status.in_(["PENDING", "RUNNING"])))


def test_a_column_sqlalchemy_would_fill_in_must_be_passed() -> None:
    # payments.updated_at has a Python-side onupdate: SQLAlchemy computes it, asyncpg alone cannot. A raw
    # UPDATE without it must fail loudly, not write NULL.
    from sqlalchemy import update

    from core.models import Payment

    table = Payment.__table__
    raw = pgraw.compiled(update(table).where(table.c.id == bindparam("b_id"))
                         .values(failure_reason=bindparam("b_note")).cte("noted").select())
    assert "updated_at" in raw.names
    with pytest.raises(KeyError, match="updated_at"):
        raw.args({"b_id": "p", "b_note": "n"})
    assert raw.args({"b_id": "p", "b_note": "n", "updated_at": "t"}).count("t") == 1


async def test_alone_it_commits_by_itself_and_json_round_trips(sm: Any) -> None:
    async with sm() as session:
        row = await pgraw.fetchrow(session, ADD, _params("alone"))
        await session.rollback()  # nothing was open: the INSERT stood on its own
    assert row is not None and row["payload"] is not None
    assert await _jobs(sm) == [("alone", {"n": 1, "ü": [True, None]})]


async def test_it_joins_the_transaction_the_session_opened(sm: Any) -> None:
    async with sm() as session:
        await session.execute(select(func.count()).select_from(_T))  # BEGIN sent by SQLAlchemy
        await pgraw.fetchrow(session, ADD, _params("inside"))
        await session.rollback()
    assert await _jobs(sm) == []
    async with sm.begin() as session:
        await session.execute(select(1))
        await pgraw.fetchrow(session, ADD, _params("committed"))
    assert [k for k, _ in await _jobs(sm)] == ["committed"]


async def test_errors_come_out_as_sqlalchemys(sm: Any) -> None:
    async with sm() as session:
        await pgraw.fetchrow(session, ADD, _params("twice"))
        with pytest.raises(IntegrityError):
            await pgraw.fetchrow(session, ADD, _params("twice"))
    broken = pgraw.compiled(select(text("no_such_column")).select_from(_T))
    async with sm() as session:
        with pytest.raises(DBAPIError) as info:
            await pgraw.fetchrow(session, broken, {})
    assert not isinstance(info.value, IntegrityError) and "no_such_column" in str(info.value.orig)


async def test_first_on_a_core_connection_by_position(sm: Any) -> None:
    """pgraw.first: a row by position from a statement with RETURNING, None from one without; on an
    autocommit Core connection each is committed by itself."""
    from core.db import autocommit

    engine = sm.kw["bind"]
    async with autocommit(engine) as conn:
        row = await pgraw.first(conn, _ADD, _params("first-1"))
        assert row is not None and isinstance(row[0], int) and row[1] == {"n": 1, "ü": [True, None]}
        gone = await pgraw.first(conn, _T.delete().where(_T.c.dedupe_key == bindparam("key")), {"key": "nope"})
        assert gone is None
    assert [k for k, _ in await _jobs(sm)] == ["first-1"]


async def test_the_sessions_connection_is_kept_for_its_transaction_only(sm: Any, monkeypatch: Any) -> None:
    """driver() finds the session's connection once per transaction: the second raw statement of a request does
    not go through the session again, and after a commit (the connection back in the pool, where another session
    takes it) the next call checks one out as the first did, never the one the other session now holds."""
    from sqlalchemy.ext.asyncio import AsyncSession

    asked = count_calls(monkeypatch, AsyncSession, "connection")
    async with sm() as first:
        one = await pgraw.driver(first)
        assert await pgraw.driver(first) is one and len(asked) == 1
        await pgraw.fetchrow(first, ADD, _params("kept-1"))
        await first.commit()  # the connection goes back to the pool (LIFO: the next checkout takes it)
        async with sm() as other:
            held = await pgraw.driver(other)
            assert held is one
            await pgraw.fetchrow(other, ADD, _params("other"))
            again = await pgraw.driver(first)  # a new transaction of the first session: its own checkout
            assert again is not held and len(asked) == 3
            await pgraw.fetchrow(first, ADD, _params("kept-2"))
            await other.rollback()  # (the INSERT ran alone: committed already)
        await first.rollback()
        await pgraw.driver(first)  # after a rollback too
        assert len(asked) == 4
    assert sorted(k for k, _ in await _jobs(sm)) == ["kept-1", "kept-2", "other"]


async def test_a_kept_connection_follows_the_sessions_transaction(sm: Any) -> None:
    """A raw statement after SQLAlchemy opened the transaction still joins it when the connection was kept from
    before the BEGIN: rolled back with it."""
    async with sm() as session:
        await pgraw.driver(session)
        await session.execute(select(func.count()).select_from(_T))  # BEGIN sent by SQLAlchemy
        await pgraw.fetchrow(session, ADD, _params("rolled-back"))
        assert await pgraw.in_transaction(session)
        await session.rollback()
        assert not await pgraw.in_transaction(session)  # checked out again, outside any transaction
    assert await _jobs(sm) == []


async def test_a_kept_connection_does_not_skip_a_savepoint(sm: Any) -> None:
    """begin_nested() sends its SAVEPOINT only when the session is asked for its connection: a raw statement that is
    the first inside it still goes through the session (the connection kept for the outer transaction is not handed
    out), so the savepoint's rollback takes the raw write back with it."""
    async with sm() as session:
        await session.execute(select(func.count()).select_from(_T))  # the outer transaction (BEGIN)
        outer = await pgraw.driver(session)
        await pgraw.fetchrow(session, ADD, _params("outer"))
        with pytest.raises(RuntimeError):
            async with session.begin_nested():
                assert await pgraw.driver(session) is outer  # the same connection, found through the session
                await pgraw.fetchrow(session, ADD, _params("inside-the-savepoint"))
                raise RuntimeError("rolled back to the savepoint")
        await pgraw.fetchrow(session, ADD, _params("after"))
        await session.commit()
    assert sorted(k for k, _ in await _jobs(sm)) == ["after", "outer"]


async def test_a_transaction_begun_raw_is_the_sessions_to_commit_or_roll_back(sm: Any) -> None:
    """pgraw.begin: BEGIN sent before a raw first statement, so the statement is inside the session's transaction
    (it would otherwise run alone, in autocommit): the session's rollback takes it back, its commit keeps it, and
    the connection goes back to the pool with no transaction left open on it."""
    async with sm() as session:
        conn = await pgraw.begin(session)
        assert conn.is_in_transaction()
        await pgraw.fetchrow(session, ADD, _params("begun-rolled-back"))
        await session.rollback()
        assert not conn.is_in_transaction()
    assert await _jobs(sm) == []
    async with sm.begin() as session:
        conn = await pgraw.begin(session)
        await pgraw.fetchrow(session, ADD, _params("begun-committed"))
        assert await pgraw.begin(session) is conn  # open already: joined, no second BEGIN
    assert not conn.is_in_transaction()
    assert [k for k, _ in await _jobs(sm)] == ["begun-committed"]
    with pytest.raises(RuntimeError):
        async with sm.begin() as session:
            await pgraw.begin(session)
            await pgraw.fetchrow(session, ADD, _params("begun-raised"))
            raise RuntimeError("the caller failed: rolled back on the way out")
    assert [k for k, _ in await _jobs(sm)] == ["begun-committed"]


async def test_a_transaction_sqlalchemy_opened_is_joined(sm: Any) -> None:
    async with sm() as session:
        await session.execute(select(func.count()).select_from(_T))  # BEGIN sent by SQLAlchemy
        conn = await pgraw.begin(session)
        await pgraw.fetchrow(session, ADD, _params("joined"))
        await session.rollback()
        assert not conn.is_in_transaction()
    assert await _jobs(sm) == []


async def test_a_failed_begin_is_sqlalchemys_error(sm: Any) -> None:
    """The server gone between checkout and BEGIN: DBAPIError (a callback answers 503 and is sent again)."""
    async with sm() as session:
        conn = await pgraw.driver(session)
        await conn.close()  # as a restart would: the socket ends
        with pytest.raises(DBAPIError):
            await pgraw.begin(session)
        await session.rollback()
        await session.close()
    async with sm.begin() as session:  # the pool carries on with a working connection
        await pgraw.begin(session)
        await pgraw.fetchrow(session, ADD, _params("after-the-failure"))
    assert [k for k, _ in await _jobs(sm)] == ["after-the-failure"]


async def _visible_elsewhere(sm: Any) -> list[str]:
    """The jobs' keys as another connection (straight asyncpg, outside the pool) sees them: committed ones only."""
    import asyncpg

    url = sm.kw["bind"].url.set(drivername="postgresql")
    other = await asyncpg.connect(url.render_as_string(hide_password=False))
    try:
        return sorted(r[0] for r in await other.fetch("SELECT dedupe_key FROM outbox_jobs"))
    finally:
        await other.close()


async def test_a_begin_cancelled_in_flight_never_hands_its_connection_on(sm: Any) -> None:
    """Cancelled with BEGIN sent and its answer unread (a shutdown cutting the request): asyncpg holds a transaction
    the adapter never recorded, which no rollback would end. The connection is closed, not given back to the pool
    inside it, where the next session's commits would silently be lost."""
    import asyncio

    async with sm() as session:
        conn = await pgraw.driver(session)
        begin = asyncio.create_task(pgraw.begin(session))
        await asyncio.sleep(0)  # BEGIN written, its answer not read yet
        begin.cancel()
        with pytest.raises(asyncio.CancelledError):
            await begin
    assert conn.is_closed()
    async with sm.begin() as session:
        again = await pgraw.begin(session)
        assert again is not conn
        await pgraw.fetchrow(session, ADD, _params("after-a-cancelled-begin"))
    assert await _visible_elsewhere(sm) == ["after-a-cancelled-begin"]


async def test_a_transaction_the_session_does_not_track_is_refused(sm: Any) -> None:
    """A transaction open on the server that SQLAlchemy's adapter did not begin is never joined: the session's commit
    would send no COMMIT. Refused, and the connection closed."""
    async with sm() as session:
        conn = await pgraw.driver(session)
        await conn.execute("BEGIN")  # behind the adapter's back
        with pytest.raises(RuntimeError, match="does not track"):
            await pgraw.begin(session)
    assert conn.is_closed()
    async with sm.begin() as session:
        await pgraw.begin(session)
        await pgraw.fetchrow(session, ADD, _params("on-a-clean-connection"))
    assert await _visible_elsewhere(sm) == ["on-a-clean-connection"]


def _pool_idle(sm: Any) -> bool:
    return sm.kw["bind"].sync_engine.pool.checkedout() == 0


async def test_a_core_transaction_commits_its_raw_and_orm_writes_once(sm: Any) -> None:
    """pgraw.transaction: BEGIN at once, raw statements on the Core connection, an ORM session joined only when
    asked for (its pending rows flushed before the COMMIT), one COMMIT; the connection back in the pool with nothing
    open on it."""
    engine = sm.kw["bind"]
    async with pgraw.transaction(engine) as tx:
        conn = await pgraw.driver(tx.conn)
        assert conn.is_in_transaction() and tx.joined is None
        await pgraw.fetchrow(tx.conn, ADD, _params("core-raw"))
        assert await _visible_elsewhere(sm) == []  # inside the transaction, not committed yet
        session = tx.session()
        assert tx.session() is session and tx.joined is session
        session.add(OutboxJob(kind="test.orm", payload={}, dedupe_key="core-orm", status="PENDING", attempts=0,
                              max_attempts=3, run_at=utcnow(), created_at=utcnow(), updated_at=utcnow()))
    assert not conn.is_in_transaction() and _pool_idle(sm)
    assert await _visible_elsewhere(sm) == ["core-orm", "core-raw"]


async def test_a_core_transaction_rolls_back_whole_when_its_block_raises(sm: Any) -> None:
    """The raw write and the joined session's (flushed already) are taken back together."""
    engine = sm.kw["bind"]
    with pytest.raises(RuntimeError):
        async with pgraw.transaction(engine) as tx:
            conn = await pgraw.driver(tx.conn)
            await pgraw.fetchrow(tx.conn, ADD, _params("raised-raw"))
            session = tx.session()
            session.add(OutboxJob(kind="test.orm", payload={}, dedupe_key="raised-orm", status="PENDING",
                                  attempts=0, max_attempts=3, run_at=utcnow(), created_at=utcnow(),
                                  updated_at=utcnow()))
            await session.flush()
            raise RuntimeError("the caller failed: rolled back on the way out")
    assert not conn.is_in_transaction() and not conn.is_closed() and _pool_idle(sm)
    assert await _visible_elsewhere(sm) == []


async def test_a_core_transactions_commit_refused_is_sqlalchemys_error(sm: Any) -> None:
    """A COMMIT the server refuses (a deferred constraint) is IntegrityError, nothing is kept, and the connection
    (its transaction ended by the server) goes on serving the pool."""
    engine = sm.kw["bind"]
    with pytest.raises(IntegrityError):
        async with pgraw.transaction(engine) as tx:
            conn = await pgraw.driver(tx.conn)
            await conn.execute("CREATE TEMP TABLE once (n int UNIQUE DEFERRABLE INITIALLY DEFERRED) ON COMMIT DROP")
            await conn.execute("INSERT INTO once VALUES (1), (1)")  # checked at the COMMIT
            await pgraw.fetchrow(tx.conn, ADD, _params("refused"))
    assert not conn.is_in_transaction() and not conn.is_closed() and _pool_idle(sm)
    async with pgraw.transaction(engine) as tx:
        assert await pgraw.driver(tx.conn) is conn  # (LIFO pool: the same one, still good)
        await pgraw.fetchrow(tx.conn, ADD, _params("after-the-refusal"))
    assert await _visible_elsewhere(sm) == ["after-the-refusal"]


async def test_a_core_transaction_whose_commit_gets_no_answer_closes_its_connection(sm: Any) -> None:
    """The connection lost before the COMMIT's answer: SQLAlchemy's DBAPIError (a callback answers 503 and is sent
    again), the connection closed rather than handed on, and the pool carries on with another."""
    engine = sm.kw["bind"]
    with pytest.raises(DBAPIError):
        async with pgraw.transaction(engine) as tx:
            conn = await pgraw.driver(tx.conn)
            await pgraw.fetchrow(tx.conn, ADD, _params("lost"))
            await conn.close()  # as a restart would: the socket ends
    assert conn.is_closed() and _pool_idle(sm)
    async with pgraw.transaction(engine) as tx:
        assert await pgraw.driver(tx.conn) is not conn
        await pgraw.fetchrow(tx.conn, ADD, _params("after-the-loss"))
    assert await _visible_elsewhere(sm) == ["after-the-loss"]


async def test_a_move_on_a_core_connection_takes_only_jobs_it_can_carry(sm: Any) -> None:
    """transition on a Core connection (a callback's common path) has no session to queue a job without a dedupe key
    after the move: refused before anything is sent, not written half."""
    from core.audit import Actor
    from core.outbox import NewJob
    from core.state import transition
    from core.state.payment import PAYMENT, PaymentStatus

    with pytest.raises(ValueError, match="dedupe keys"):
        async with pgraw.transaction(sm.kw["bind"]) as tx:
            await transition(tx.conn, PAYMENT, "no-such-payment", PaymentStatus.PENDING, PaymentStatus.FAILED,
                             actor=Actor("test", "test"), jobs=[NewJob("test.raw", {}, dedupe_key=None)])
    assert _pool_idle(sm) and await _visible_elsewhere(sm) == []


async def test_a_core_transaction_cancelled_with_its_commit_in_flight_closes_its_connection(sm: Any) -> None:
    """Cancelled while the server runs the COMMIT (no answer read): the connection's state is unknown, so it is closed
    rather than handed on (the test above cannot tell: the connection it loses is closed already, and the pool's
    checkout would drop it anyway); nothing is left open at the server and the pool carries on with another."""
    import asyncio

    engine = sm.kw["bind"]
    held: list[Any] = []

    async def run() -> None:
        async with pgraw.transaction(engine) as tx:
            conn = await pgraw.driver(tx.conn)
            held.append(conn)
            # A deferred trigger that sleeps: the COMMIT takes two seconds at the server.
            await conn.execute("CREATE FUNCTION pg_temp.slow() RETURNS trigger LANGUAGE plpgsql AS "
                               "$$ BEGIN PERFORM pg_sleep(2); RETURN NULL; END $$")
            await conn.execute("CREATE TEMP TABLE slow (n int) ON COMMIT DROP")
            await conn.execute("CREATE CONSTRAINT TRIGGER slow AFTER INSERT ON slow DEFERRABLE INITIALLY DEFERRED "
                               "FOR EACH ROW EXECUTE FUNCTION pg_temp.slow()")
            await conn.execute("INSERT INTO slow VALUES (1)")
            await pgraw.fetchrow(tx.conn, ADD, _params("in-flight"))

    async def committing() -> bool:
        async with sm() as s:
            return bool((await s.execute(text(
                "select count(*) from pg_stat_activity where datname = current_database() and state = 'active' "
                "and query like 'COMMIT%'"))).scalar_one())

    task = asyncio.create_task(run())
    for _ in range(200):
        if await committing():
            break
        await asyncio.sleep(0.01)
    else:
        raise AssertionError("the COMMIT was never seen in flight")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert held[0].is_closed() and _pool_idle(sm)
    async with pgraw.transaction(engine) as tx:
        assert await pgraw.driver(tx.conn) is not held[0]
        await pgraw.fetchrow(tx.conn, ADD, _params("after-the-cancel"))
    assert "after-the-cancel" in await _visible_elsewhere(sm)


async def test_an_autocommit_connection_goes_back_without_the_task_unless_something_is_left(
    sm: Any, monkeypatch: Any
) -> None:
    """core.db.autocommit gives a connection back straight to the pool when nothing is left to send (an API payment's,
    a USSD hop's: no greenlet, no shielded task); one its block left invalidated, or one whose block raised, is closed
    the shielded way (AsyncConnection.close), and the pool holds nothing either way."""
    from sqlalchemy.ext.asyncio import AsyncConnection

    from core.db import autocommit

    engine = sm.kw["bind"]
    closes = count_calls(monkeypatch, AsyncConnection, "close")
    async with autocommit(engine) as conn:
        assert (await pgraw.first(conn, select(literal(7)), {}))[0] == 7
    assert closes == [] and engine.sync_engine.pool.checkedout() == 0
    with pytest.raises(RuntimeError):
        async with autocommit(engine) as conn:
            raise RuntimeError("the block failed")
    assert closes == [1] and engine.sync_engine.pool.checkedout() == 0
    async with autocommit(engine) as conn:
        await conn.invalidate()
    assert closes == [1, 1] and engine.sync_engine.pool.checkedout() == 0
    async with autocommit(engine) as conn:  # the pool replaced the invalidated one
        assert (await pgraw.first(conn, select(literal(8)), {}))[0] == 8


@pytest.mark.parametrize("how", ["returned", "raised"])
async def test_an_autocommit_block_that_left_a_raw_transaction_open_does_not_hand_it_on(sm: Any, how: str) -> None:
    """A block that sent BEGIN straight on asyncpg and never ended it (neither SQLAlchemy nor its adapter track it, so
    the pool's reset sends no ROLLBACK): the connection is not handed on inside that transaction. Handed on, the next
    checkout's autocommit writes (a USSD hop's, an API payment's) joined it and were never committed; a session's
    transaction could not begin on it. Closed instead, its uncommitted writes gone, as an unended transaction's are."""
    from core.db import autocommit

    engine = sm.kw["bind"]
    with pytest.raises(RuntimeError) if how == "raised" else _nothing():
        async with autocommit(engine) as conn:
            raw = await pgraw.driver(conn)
            await raw.execute("BEGIN")
            await raw.execute("CREATE TABLE r7_left_open (x int)")
            if how == "raised":
                raise RuntimeError("the block failed")
    assert engine.sync_engine.pool.checkedout() == 0
    async with autocommit(engine) as conn:  # (the pool is LIFO: the same connection, were it handed on)
        raw = await pgraw.driver(conn)
        assert not raw.is_in_transaction()
        await raw.execute("CREATE TABLE IF NOT EXISTS r7_after (x int)")
    try:
        async with sm() as s:
            assert (await s.execute(text("select to_regclass('r7_left_open')"))).scalar() is None
            assert (await s.execute(text("select to_regclass('r7_after')"))).scalar() is not None
    finally:
        async with autocommit(engine) as conn:
            await (await pgraw.driver(conn)).execute("DROP TABLE IF EXISTS r7_after; DROP TABLE IF EXISTS r7_left_open")


@pytest.mark.parametrize("how", ["returned", "raised", "read through the orm"])
async def test_a_connection_back_from_autocommit_begins_as_one_never_in_it(sm: Any, how: str) -> None:
    """A connection core.db.autocommit gave back begins its next transaction with a plain BEGIN, as one never in
    autocommit does, so the server's default_transaction_isolation (a role's, a database's: here the connection's own)
    holds. The pool's reset of the isolation_level execution option had set SQLAlchemy's adapter to the dialect's
    default, read once at the first connect, and every later transaction on the connection sent BEGIN ISOLATION LEVEL
    READ COMMITTED. "raised" and "read through the orm" (SQLAlchemy's own transaction record on the connection) give
    it back through AsyncConnection's close."""
    from core.db import autocommit

    engine = sm.kw["bind"]
    begins: list[str] = []

    async def isolation() -> str:
        async with sm() as s:
            assert await pgraw.driver(s) is raw  # (the pool is LIFO: the one connection, each time)
            return str((await s.execute(text("show transaction_isolation"))).scalar_one())

    async with sm() as s:
        raw = await pgraw.driver(s)
        await raw.execute("SET default_transaction_isolation = 'repeatable read'")
    raw.add_query_logger(lambda record: begins.append(record.query) if record.query.startswith("BEGIN") else None)
    assert await isolation() == "repeatable read"
    with pytest.raises(RuntimeError) if how == "raised" else _nothing():
        async with autocommit(engine) as conn:
            assert await pgraw.driver(conn) is raw
            if how == "read through the orm":
                async with pgraw.orm(conn) as orm:
                    assert (await orm.execute(select(literal(5)))).scalar_one() == 5
            else:
                assert (await pgraw.first(conn, select(literal(6)), {}))[0] == 6
            if how == "raised":
                raise RuntimeError("the block failed")
    assert engine.sync_engine.pool.checkedout() == 0
    assert await isolation() == "repeatable read"
    assert begins == ["BEGIN;", "BEGIN;"]


@pytest.mark.parametrize("how", ["closed in the block", "closed, then raised"])
async def test_a_connection_given_back_from_inside_an_autocommit_block_is_not_left_in_autocommit(
    sm: Any, how: str
) -> None:
    """However the connection goes back to the pool (here the block closes it itself, before autocommit's exit, which
    then finds it closed and has no adapter to clear), the adapter is not left in autocommit: a later session on it
    would begin no transaction, each of its statements committed alone (its rollback undoing nothing)."""
    from core.db import autocommit

    engine = sm.kw["bind"]
    with pytest.raises(RuntimeError) if how == "closed, then raised" else _nothing():
        async with autocommit(engine) as conn:
            raw = await pgraw.driver(conn)
            await conn.close()
            if how == "closed, then raised":
                raise RuntimeError("the block failed")
    assert engine.sync_engine.pool.checkedout() == 0
    async with sm() as s:
        assert await pgraw.driver(s) is raw  # (the pool is LIFO: the same connection)
        await s.execute(select(literal(1)))
        assert await pgraw.in_transaction(s)


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None
