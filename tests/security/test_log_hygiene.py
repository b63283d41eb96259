"""A real flow end to end (USSD hops, API payments through the in-process simulators and their callbacks,
SMS receipts with delivery reports, keyword SMS, a refund, refused forgeries) with every log record
captured: no full phone number and no secret in any line, and none in the raw records before the
formatter's last-line masking either. Also checks the log scanner itself on known good and bad lines."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from core.logs import JsonFormatter
from core.models import Payment, SmsMessage
from tests import logscan
from tests.conftest import clean_database, drain, make_settings
from tests.integration.helpers import wait_for
from tests.security.conftest import SECRETS

DEMO_NUMBERS = ["+250788000001", "+250788000002", "+250733000001", "+250733000002", "+250788000003"]


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
async def live(settings: Any, aiohttp_server: Any) -> AsyncIterator[tuple[Any, str, dict[str, Any]]]:
    """The whole service on a real port with the provider and SMS simulators in process, so collections,
    callbacks, status queries, SMS and delivery reports all travel over HTTP on 127.0.0.1."""
    from app import create_app, open_runtime
    from core.demo import seed_demo

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    s = make_settings(**SECRETS, PORT=str(port), PUBLIC_BASE_URL=base, SIMULATORS_IN_PROCESS="1",
                      SIM_DELAY="0.05", POLL_AFTER_SECONDS="1", RATE_LIMIT_MULTIPLIER="100")
    async with open_runtime(s) as rt:
        await clean_database(rt)
        await rt.redis.flushdb()
        async with rt.sessionmaker.begin() as session:
            demo = await seed_demo(session, rt.cipher)
        await aiohttp_server(create_app(s, runtime=rt), host="127.0.0.1", port=port)
        yield rt, base, demo


async def _wait_final(rt: Any, worker: Any, ids: list[str], within: float = 20.0) -> dict[str, str]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        await drain(worker)
        async with rt.sessionmaker() as s:
            rows = dict((await s.execute(select(Payment.id, Payment.status).where(Payment.id.in_(ids)))).all())
        if all(v not in ("PENDING", "PROCESSING") for v in rows.values()) or loop.time() > deadline:
            return rows
        await asyncio.sleep(0.1)


async def test_a_full_flow_logs_no_phone_number_and_no_secret(live: Any) -> None:
    from app import create_worker
    from core.config import DEV_CREDENTIAL

    rt, base, demo = live
    capture = Capture()
    root = logging.getLogger()
    root.addHandler(capture)
    old_level = root.level
    root.setLevel(logging.DEBUG)  # stricter than production: even debug lines must be clean
    from core.logs import NOISY_LOGGERS

    for noisy in (*NOISY_LOGGERS, "sqlalchemy"):
        logging.getLogger(noisy).setLevel(logging.WARNING)  # as core.logs.configure does
    api_key = ""
    try:
        async with httpx.AsyncClient(base_url=base, timeout=10) as http:
            # USSD: a few hops from two phones, one with garbage.
            at = f"/ussd/africastalking?secret={SECRETS['CALLBACK_SECRET_AFRICASTALKING']}"
            for phone, texts in (("+250788000001", ["", "1", "1*1"]), ("0788000002", ["", "9", "9*x"])):
                for text in texts:
                    r = await http.post(at, data={"sessionId": f"ATUid_log_{phone[-3:]}", "phoneNumber": phone,
                                                  "serviceCode": "*384*123#", "text": text})
                    assert r.status_code == 200 and r.text.startswith(("CON ", "END "))
            # API: sign in, an API key, payments through MTN (unsigned, confirmed) and Airtel (signed).
            token = (await http.post("/v1/auth/token", json={"username": demo["admin"][0],
                                                             "password": demo["admin"][1]})).json()
            auth = {"Authorization": f"Bearer {token['accessToken']}"}
            key = (await http.post("/v1/api-keys", headers=auth,
                                   json={"name": "ERP", "scopes": ["payments:write", "payments:read"]})).json()
            api_key = key["key"]
            logscan.register_secret(api_key)
            logscan.register_secret(token["accessToken"])
            rent = demo["payment_types"]["Monthly Rent"]
            ids = []
            for i, (account, method) in enumerate((("+250788000001", "MOBILE_MONEY_MTN"),
                                                   ("+250733000001", "MOBILE_MONEY_AIRTEL"),
                                                   ("0788000002", "MOBILE_MONEY_MTN"))):
                r = await http.post("/v1/payments", headers={"X-API-Key": api_key}, json={
                    "paymentTypeId": rent, "amount": 50000, "paymentMethod": method, "paymentAccount": account,
                    "idempotencyKey": f"log-hygiene-{i:04d}", "memberId": demo["members"]["+250788000001"]})
                assert r.status_code == 201, r.text
                ids.append(r.json()["id"])
            # Wrong credentials along the way: refusals are logged, the guesses are not.
            await http.get("/v1/payments", headers={"X-API-Key": api_key + "x"})
            await http.post("/webhooks/payments/mtn_momo?secret=guessed-secret-123", json={"status": "x"})
            await http.post("/ussd/africastalking?secret=guessed-secret-123", data={"phoneNumber": "+250788000001"})

            worker = create_worker(rt)
            statuses = await _wait_final(rt, worker, ids)
            assert statuses[ids[0]] == "COMPLETED" and statuses[ids[1]] == "COMPLETED", statuses
            assert statuses[ids[2]] == "FAILED", statuses  # the simulator's "payment fails" number

            # A refund, a keyword SMS asking for a receipt, and the SMS jobs with delivery reports.
            r = await http.post(f"/v1/payments/{ids[0]}/refunds", headers=auth,
                                json={"amount": 1000, "idempotencyKey": "log-hygiene-refund"})
            assert r.status_code == 201, r.text
            async with rt.sessionmaker() as s:
                reference = (await s.get(Payment, ids[0])).reference
            r = await http.post(f"/sms/africastalking/inbound?secret={SECRETS['CALLBACK_SECRET_SMS']}",
                                data={"from": "+250788000001", "text": f"RECEIPT {reference}", "id": "in-1"})
            assert r.status_code == 200

            async def delivered() -> list[str]:
                # The refund settled and every SMS sent, its delivery report taken: all of it is in the capture.
                await drain(worker)
                async with rt.sessionmaker() as s:
                    sent = (await s.execute(select(SmsMessage.template, SmsMessage.status))).all()
                templates = sorted(template for template, status in sent if status == "DELIVERED")
                return templates if len(templates) == len(sent) == 5 else []

            # A receipt each for the two payments and one asked for by SMS, the failed one's, the refund's.
            assert await wait_for(delivered, timeout=15, interval=0.1, what="every SMS delivered") == [
                "payment_failed", "payment_receipt", "payment_receipt", "payment_receipt", "refund_completed"]
    finally:
        root.removeHandler(capture)
        root.setLevel(old_level)

    messages = {r.getMessage() for r in capture.records}
    for expected in ("ussd hop", "provider callback handled", "provider callback refused"):
        assert expected in messages, f"the flow never logged {expected!r}: the check would prove little"
    formatter = JsonFormatter()
    secrets = [*SECRETS.values(), DEV_CREDENTIAL, api_key, token["accessToken"], "guessed-secret-123"]
    offenders = []
    for record in capture.records:
        line = formatter.format(record)
        json.loads(line)  # every line is one JSON object
        leaks = logscan.find_leaks(line) + [s[:6] for s in secrets if s and s in line]
        # Before the formatter's masking: the code itself must not hand a full number to the logger.
        raw = record.getMessage() + " " + " ".join(
            str(v) for k, v in vars(record).items() if k not in ("msg", "args", "exc_info", "exc_text"))
        leaks += [f"raw {n}" for n in (*DEMO_NUMBERS, "250788000001", "0788000002") if n in raw]
        if leaks:
            offenders.append((record.name, leaks, logscan.redact(line)[:300]))
    assert not offenders, "\n".join(map(str, offenders))


# --- the scanner itself --------------------------------------------------------------------------------


@pytest.mark.parametrize("line", [
    '{"msg": "payment created", "payment_id": "3f0c8a52-6a8e-4c1e-9d0b-250788000001"}',
    '{"msg": "ok", "reference": "PAY_20261122_000", "ref2": "RFD_20261122_123456789"}',
    '{"msg": "ussd hop", "phone": "+25078****001", "masked": "25478****149"}',
    '{"msg": "x", "checkout": "ws_CO_191220191020363925", "txn": "1843215792", "ts": 1764490000123}',
    '{"msg": "x", "digest": "a2507880000019f3e", "blind": "9f2507880000017a"}',
    '{"msg": "api key created", "prefix": "cpk_AbCdEfGh"}',
    '{"ts": "2026-11-30T09:05:42.951+00:00", "ms": 12.5, "hops": 3}',
])
def test_scanner_accepts_legitimate_ids(line: str) -> None:
    assert logscan.find_leaks(line) == []


@pytest.mark.parametrize("line", [
    '{"msg": "paying +250788000001"}',
    '{"phone": "254708374149"}',
    '{"account": "0788000002"}',
    '{"msg": "from +250 788 000 001"}',
    '{"msisdn": "233200000001"}',
    '{"msg": "credential sim-dev-credential refused"}',
    '{"key": "cpk_' + "x" * 43 + '"}',
    '{"auth": "Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.abcdefghijklmnop"}',
])
def test_scanner_flags_numbers_and_secrets(line: str) -> None:
    assert logscan.find_leaks(line), line


def test_scanner_knows_the_secrets_of_every_settings_object() -> None:
    s = make_settings(JWT_SECRET="a-jwt-secret-made-for-this-test-only-0001")
    assert logscan.find_leaks('{"msg": "a-jwt-secret-made-for-this-test-only-0001"}')
    assert logscan.redact("x a-jwt-secret-made-for-this-test-only-0001 y") == "x <secret> y"
    assert s.jwt_secret.get().startswith("a-jwt")


@pytest.mark.parametrize(("raw", "expected"), [
    ("payer +250788123456 approved", "payer +25078****456 approved"),
    ("payer 0788123456", "payer 07881**456"),
    ("ref dc82dd83-341a-4e97-93b8-853737003928 done", "ref dc82dd83-341a-4e97-93b8-853737003928 done"),
    ("txn MP-254712345678-x", "txn MP-254712345678-x"),
])
def test_the_last_line_mask_keeps_identifiers_whole(raw: str, expected: str) -> None:
    from core.logs import scrub

    assert scrub(raw) == expected


def test_a_number_long_enough_to_be_a_phone_is_masked_and_the_line_stays_json() -> None:
    import logging

    record = logging.LogRecord("gateway.test", logging.INFO, __file__, 1, "payer %s ok", ("+250788123456",), None)
    record.account = 250788123456  # an integer in `extra`, as a careless caller might pass one
    record.amount = 50_000
    line = JsonFormatter().format(record)
    entry = json.loads(line)
    assert entry["msg"] == "payer +25078****456 ok"
    assert entry["account"] == "25078****456" and entry["amount"] == 50_000
    assert logscan.find_leaks(line) == []


def test_library_debug_lines_with_statements_stay_off_in_production() -> None:
    # aiosqlite's debug lines carry each statement's parameters; LOG_LEVEL=DEBUG must not turn them on.
    import io

    from core.logs import configure

    root = logging.getLogger()
    saved = (root.level, root.handlers[:], {n: logging.getLogger(n).level for n in ("aiosqlite", "asyncio")})
    out = io.StringIO()
    try:
        configure("DEBUG", stream=out)
        logging.getLogger("aiosqlite").debug("executing %s", ("INSERT ...", ("Aline Uwase", "0788000001")))
        logging.getLogger("gateway.test").debug("ours")
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]
        for name, level in saved[2].items():
            logging.getLogger(name).setLevel(level)
    assert "Aline" not in out.getvalue() and '"msg":"ours"' in out.getvalue(), out.getvalue()
