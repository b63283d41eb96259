"""Routes of the pages: /simulator only when enabled, /ops/data only for admins, scoped by cooperative."""

from __future__ import annotations

import asyncio
import re
from datetime import timedelta
from typing import Any

import jwt
import pytest

from core import auth
from core.audit import Actor
from core.db import utcnow
from core.models import Cooperative, PaymentType
from core.payments import NewPayment, create_payment
from tests.conftest import make_settings
from tests.web.conftest import page_client

ACTOR = Actor("admin:test", "api")


async def _token(client: Any, username: str, password: str) -> str:
    resp = await client.post("/v1/auth/token", json={"username": username, "password": password})
    body = await resp.json()
    assert resp.status == 200, body
    return body["accessToken"]


async def _pay(rt: Any, cooperative_id: str, payment_type_id: str, key: str,
               account: str = "0788000001") -> Any:
    async with rt.sessionmaker.begin() as s:
        payment, created = await create_payment(s, rt, NewPayment(
            cooperative_id=cooperative_id, payment_type_id=payment_type_id, method="MOBILE_MONEY_MTN",
            account=account, idempotency_key=key, channel="api"), actor=ACTOR)
    assert created
    return payment


@pytest.fixture
async def other_coop(rt: Any, demo: dict[str, Any]) -> dict[str, Any]:
    """A second cooperative with its own admin and two payments."""
    async with rt.sessionmaker.begin() as s:
        coop = Cooperative(name="Other Coop", short_code="OTHER", country="RW", currency="RWF",
                           timezone="Africa/Kigali", status="ACTIVE", self_registration=True)
        s.add(coop)
        await s.flush()
        ptype = PaymentType(cooperative_id=coop.id, name="Levy", amount_minor=1000, currency="RWF",
                            is_active=True)
        s.add(ptype)
        await auth.create_user(s, username="admin@other.rw", password="other-admin-password",
                               role="COOP_ADMIN", cooperative_id=coop.id)
        await s.flush()
        ids = {"cooperative_id": coop.id, "payment_type_id": ptype.id}
    for i in range(2):
        await _pay(rt, ids["cooperative_id"], ids["payment_type_id"], f"other-coop-{i:04d}", "0788999001")
    return {**ids, "admin": ("admin@other.rw", "other-admin-password")}


# --- the phone simulator page ------------------------------------------------------------------------

async def test_simulator_is_not_served_when_disabled(pages: Any) -> None:
    for path in ("/simulator", "/simulator/config", "/simulator/phones", "/simulator/payment?reference=X",
                 "/static/phone.js", "/static/phone.html"):
        resp = await pages.get(path)
        assert resp.status == 404, path
    # The ops page is always there.
    assert (await pages.get("/static/ops.js")).status == 200


async def test_simulator_page_and_assets_when_enabled(sim: Any) -> None:
    resp = await sim.get("/simulator")
    assert resp.status == 200
    assert resp.content_type == "text/html"
    html = await resp.text()
    assert '<script src="/static/phone.js" defer></script>' in html
    assert "http://" not in html and "https://" not in html  # no CDN, no external font
    assert "script-src 'self'" in resp.headers["Content-Security-Policy"]
    for name, kind in (("phone.js", "text/javascript"), ("phone.css", "text/css")):
        asset = await sim.get(f"/static/{name}")
        assert asset.status == 200 and asset.content_type == kind
        assert "http://" not in await asset.text() and "https://" not in await asset.text()
    for bad in ("/static/..%2Fpages.py", "/static/pages.py", "/static/nope.js"):
        assert (await sim.get(bad)).status == 404, bad


async def test_simulator_phones_lists_the_demo_numbers(sim: Any) -> None:
    from core.demo import DEMO_MEMBERS

    body = await (await sim.get("/simulator/phones")).json()
    assert [p["phone"] for p in body["phones"]] == [m[1] for m in DEMO_MEMBERS]
    first = body["phones"][1]
    assert first == {"phone": "+250788000002", "name": "Jean Bosco Habimana", "unit": "A-102",
                     "language": "en", "does": "MTN MoMo: payment fails", "network": "63510"}
    # Each phone dials on its own network (the menu offers the method of the network's operator): Airtel's for
    # the Airtel number, not MTN Rwanda's for every phone.
    assert {p["phone"]: p["network"] for p in body["phones"]}["+250733000001"] == "63513"


async def test_simulator_config_without_a_callback_secret(sim: Any) -> None:
    body = await (await sim.get("/simulator/config")).json()
    assert body["serviceCode"] == "*384*123#"
    assert body["ussdUrl"] == "/ussd/africastalking"
    assert body["providers"] == {"mtn_momo": "/_sim/mtn_momo", "airtel": "/_sim/airtel",
                                 "mpesa": "/_sim/mpesa", "irembopay": "/_sim/irembopay"}
    assert body["smsInbox"] == "/_sim/africastalking/_inbox/"
    assert len(body["phones"]) == 5
    # The provider simulators the page talks to are really there, with the prompt control API.
    resp = await sim.get(body["providers"]["mtn_momo"] + "/_control/pending?msisdn=%2B250788000001")
    assert resp.status == 200 and await resp.json() == {"prompts": []}


async def test_simulator_config_carries_the_callback_secret_and_it_works(
        aiohttp_client: Any, rt: Any, demo: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PHONE_SIMULATOR_ENABLED", raising=False)
    client = await page_client(aiohttp_client, rt, make_settings(SIMULATORS_IN_PROCESS="1",
                                                              CALLBACK_SECRET_AFRICASTALKING="s3cret-value"))
    body = await (await client.get("/simulator/config")).json()
    assert body["ussdUrl"] == "/ussd/africastalking?secret=s3cret-value"
    form = {"sessionId": "ATUid_pages_1", "serviceCode": body["serviceCode"], "phoneNumber": "+250788000002",
            "networkCode": body["networkCode"], "text": ""}
    assert (await client.post("/ussd/africastalking", data=form)).status == 403
    hop = await client.post(body["ussdUrl"], data=form)
    assert hop.status == 200
    assert (await hop.text()).startswith("CON Welcome to Kigali Heights Housing Cooperative")


async def test_simulator_enabled_by_the_environment_switch(aiohttp_client: Any, rt: Any) -> None:
    settings = make_settings(PHONE_SIMULATOR_ENABLED="1")
    assert settings.simulators_in_process is False
    client = await page_client(aiohttp_client, rt, settings)
    assert (await client.get("/simulator")).status == 200
    body = await (await client.get("/simulator/config")).json()
    assert body["serviceCode"] == rt.settings.ussd_service_code


async def test_simulator_payment_lookup(sim: Any, rt: Any, demo: dict[str, Any]) -> None:
    resp = await sim.get("/simulator/payment")
    assert resp.status == 400
    assert "reference" in (await resp.json())["message"]
    assert (await sim.get("/simulator/payment", params={"reference": "x" * 129})).status == 400
    assert (await sim.get("/simulator/payment", params={"reference": "PAY_20000101_9"})).status == 404
    payment = await _pay(rt, demo["cooperative_id"], demo["payment_types"]["Monthly Rent"], "pages-lookup-1")
    for ref in (payment.reference, payment.reference.lower(), payment.provider_reference):
        body = await (await sim.get("/simulator/payment", params={"reference": ref})).json()
        assert body["reference"] == payment.reference, ref
        assert body["cooperative"] == "Kigali Heights Housing Cooperative"
        assert body["paymentType"] == "Monthly Rent"
        assert (body["amountMinor"], body["currency"], body["status"]) == (50_000, "RWF", "PENDING")
    assert "account" not in str(body).lower()  # never the payer's number


# --- the operations page -----------------------------------------------------------------------------

async def test_ops_page_is_served(pages: Any) -> None:
    resp = await pages.get("/ops")
    assert resp.status == 200 and resp.content_type == "text/html"
    html = await resp.text()
    assert '<script src="/static/ops.js" defer></script>' in html
    assert re.search(r"<script>(?!</script>)", html) is None  # no inline script (the CSP forbids it)
    assert resp.headers["X-Frame-Options"] == "DENY"


async def test_ops_data_refuses_missing_and_bad_tokens(pages: Any, rt: Any, demo: dict[str, Any]) -> None:
    resp = await pages.get("/ops/data")
    assert resp.status == 401
    body = await resp.json()
    assert set(body) == {"statusCode", "message", "error", "code", "timestamp", "path"}
    assert (body["path"], body["code"]) == ("/ops/data", "UNAUTHORIZED")
    # UTC to the millisecond with `Z`, as the API's errors write it (admin_api.errors.timestamp).
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", body["timestamp"]), body["timestamp"]
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    secret = rt.settings.jwt_secret.get()
    now = utcnow()
    claims = {"sub": "u", "role": "SUPER_ADMIN", "coop": None, "iss": auth.ISSUER, "aud": auth.AUDIENCE,
              "iat": now, "exp": now + timedelta(minutes=5), "typ": "access", "jti": "j1"}
    bad = {
        "garbage": "Bearer not-a-jwt",
        "wrong scheme": "Basic " + jwt.encode(claims, secret, algorithm="HS256"),
        "empty": "Bearer ",
        "other secret": "Bearer " + jwt.encode(claims, "another-secret-entirely-32-bytes", algorithm="HS256"),
        "expired": "Bearer " + jwt.encode({**claims, "iat": now - timedelta(hours=2),
                                           "exp": now - timedelta(hours=1)}, secret, algorithm="HS256"),
        "refresh token": "Bearer " + jwt.encode({**claims, "typ": "refresh"}, secret, algorithm="HS256"),
        "unknown role": "Bearer " + jwt.encode({**claims, "role": "ROOT"}, secret, algorithm="HS256"),
        "alg none": "Bearer " + jwt.encode(claims, None, algorithm="none"),
    }
    for name, header in bad.items():
        resp = await pages.get("/ops/data", headers={"Authorization": header})
        assert resp.status == 401, name
    # A well-formed token with the real secret is accepted: the refusals above are about the token.
    good = jwt.encode(claims, secret, algorithm="HS256")
    assert (await pages.get("/ops/data", headers={"Authorization": f"Bearer {good}"})).status == 200


async def test_ops_data_for_the_demo_admin(pages: Any, rt: Any, demo: dict[str, Any]) -> None:
    await _pay(rt, demo["cooperative_id"], demo["payment_types"]["Monthly Rent"], "pages-ops-0001")
    token = await _token(pages, *demo["admin"])
    resp = await pages.get("/ops/data", headers={"Authorization": f"Bearer {token}"})
    assert resp.status == 200
    assert resp.headers["Cache-Control"] == "no-store"
    body = await resp.json()
    assert body["scope"] == {"cooperativeId": demo["cooperative_id"],
                             "name": "Kigali Heights Housing Cooperative", "role": "COOP_ADMIN",
                             "minutes": 60}
    assert [(r["status"], r["method"], r["count"]) for r in body["paymentsPerMinute"]] == \
        [("PENDING", "MOBILE_MONEY_MTN", 1)]
    assert body["openPayments"]["count"] == 1 and body["openPayments"]["buckets"]["under_1m"] == 1
    assert body["outbox"]["pending"] >= 2  # payment.collect + payment.poll
    for key in ("providers", "ussdFunnel", "sms", "webhooks"):
        assert key in body
    resp = await pages.get("/ops/data?minutes=0", headers={"Authorization": f"Bearer {token}"})
    assert resp.status == 400
    resp = await pages.get("/ops/data?minutes=abc", headers={"Authorization": f"Bearer {token}"})
    assert resp.status == 400
    resp = await pages.get("/ops/data?minutes=%C2%B3", headers={"Authorization": f"Bearer {token}"})  # "³"
    assert resp.status == 400 and "minutes must be an integer" in (await resp.json())["message"]


async def test_ops_data_is_scoped_to_the_admins_cooperative(pages: Any, rt: Any, demo: dict[str, Any],
                                                            other_coop: dict[str, Any]) -> None:
    await _pay(rt, demo["cooperative_id"], demo["payment_types"]["Water"], "pages-scope-0001")

    async def figures(user: tuple[str, str], query: str = "") -> tuple[int, Any]:
        token = await _token(pages, *user)
        resp = await pages.get(f"/ops/data{query}", headers={"Authorization": f"Bearer {token}"})
        return resp.status, await resp.json()

    def count(body: Any) -> int:
        return sum(r["count"] for r in body["paymentsPerMinute"])

    status, mine = await figures(demo["admin"])
    assert status == 200 and count(mine) == 1 and mine["openPayments"]["count"] == 1
    status, theirs = await figures(other_coop["admin"])
    assert status == 200 and count(theirs) == 2 and theirs["scope"]["name"] == "Other Coop"
    # A cooperative admin cannot look at another cooperative by asking for it.
    status, body = await figures(demo["admin"], f"?cooperativeId={other_coop['cooperative_id']}")
    assert status == 404 and "cooperative" in body["message"]
    status, body = await figures(demo["admin"], f"?cooperativeId={demo['cooperative_id']}")
    assert status == 200 and count(body) == 1
    # The super admin sees everything, or one cooperative on request.
    status, everything = await figures(demo["super_admin"])
    assert status == 200 and count(everything) == 3 and everything["scope"]["cooperativeId"] is None
    status, one = await figures(demo["super_admin"], f"?cooperativeId={other_coop['cooperative_id']}")
    assert status == 200 and count(one) == 2
    status, _ = await figures(demo["super_admin"], "?cooperativeId=00000000-0000-0000-0000-000000000000")
    assert status == 404


async def test_ops_data_refuses_tenants(pages: Any, demo: dict[str, Any]) -> None:
    token = await _token(pages, *demo["tenant"])
    resp = await pages.get("/ops/data", headers={"Authorization": f"Bearer {token}"})
    assert resp.status == 403
    assert (await resp.json())["error"] == "Forbidden"


async def test_ops_data_read_at_once_by_many_takes_few_connections(pages: Any, rt: Any, demo: dict[str, Any],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Each /ops/data read its figures on a pooled connection of its own, with no limit outside /v1's: one
    admin's token sending a few hundred at once took every connection, and USSD hops, provider callbacks and the
    API waiting for one were answered "unavailable". At most OPS_READS_AT_ONCE are read at once per process; the
    others wait their turn, and each still gets its figures."""
    import core.ops
    from admin_api.pages import OPS_READS_AT_ONCE

    token = await _token(pages, *demo["admin"])
    running = most = 0
    dashboard = core.ops.dashboard

    async def watched(*args: Any, **kwargs: Any) -> Any:
        nonlocal running, most
        running += 1
        most = max(most, running)
        try:
            await asyncio.sleep(0.05)  # a dashboard over a busy day's rows takes a while
            return await dashboard(*args, **kwargs)
        finally:
            running -= 1

    monkeypatch.setattr(core.ops, "dashboard", watched)
    answers = await asyncio.gather(*(pages.get("/ops/data", headers={"Authorization": f"Bearer {token}"})
                                     for _ in range(30)))
    assert [resp.status for resp in answers] == [200] * 30
    assert {(await resp.json())["scope"]["cooperativeId"] for resp in answers} == {demo["cooperative_id"]}
    assert most <= OPS_READS_AT_ONCE


async def test_ops_data_reports_the_ussd_funnel(pages: Any, rt: Any, demo: dict[str, Any],
                                                other_coop: dict[str, Any]) -> None:
    """Sessions that stop at each step, then the reached and dropped numbers the ops page draws.

    Needs admin_api/pages.ops_data to hand the runtime's Redis to core.ops.dashboard (redis=rt.redis).
    """
    from tests.core.test_ops import drive_funnel_sessions

    await drive_funnel_sessions(pages)

    async def funnel(user: tuple[str, str], query: str = "") -> dict[str, tuple[int, int]]:
        token = await _token(pages, *user)
        resp = await pages.get(f"/ops/data{query}", headers={"Authorization": f"Bearer {token}"})
        assert resp.status == 200
        body = await resp.json()
        assert body["ussdFunnel"], "ops_data does not pass redis=rt.redis to core.ops.dashboard"
        assert [r["label"] for r in body["ussdFunnel"]] == [
            "Main menu", "Pay: what to pay", "Pay: confirmation", "Pay: confirmed"]
        screens[user] = {r["screen"] for r in body["ussdLastScreens"]}
        return {r["step"]: (r["reached"], r["dropped"]) for r in body["ussdFunnel"]}

    screens: dict[tuple[str, str], set[str]] = {}
    assert await funnel(demo["admin"]) == {"home": (6, 1), "pay_type": (5, 2), "pay_confirm": (3, 2),
                                           "pay_done": (1, 0)}
    # Where sessions ended (drop-off by last screen, from the session records) is still reported.
    assert screens[demo["admin"]] >= {"pay_done", "pay_cancelled"}
    assert await funnel(demo["super_admin"]) == {"home": (7, 2), "pay_type": (5, 2), "pay_confirm": (3, 2),
                                                 "pay_done": (1, 0)}
    assert (await funnel(other_coop["admin"]))["home"] == (0, 0)
    assert screens[other_coop["admin"]] == set()


async def test_ops_data_tells_unconfirmed_and_parked_sms_apart(pages: Any, rt: Any, demo: dict[str, Any]) -> None:
    from core.db import utcnow
    from core.models import SmsMessage

    rows = [("DELIVERED", "Success", "ATX1"), ("SENT", "Sent", "ATX2"), ("SENT", "Unconfirmed", None),
            ("QUEUED", "RetriesExhausted", None), ("QUEUED", None, None)]
    async with rt.sessionmaker.begin() as s:
        for n, (status, provider_status, message_id) in enumerate(rows):
            s.add(SmsMessage(cooperative_id=demo["cooperative_id"], phone_enc=rt.cipher.encrypt("+250788000001",
                             context="sms"), phone_index=rt.cipher.blind_index("+250788000001"),
                             phone_masked="+25078****001", template="payment_receipt", language="en", body="x",
                             encoding="GSM-7", length=1, segments=1, status=status, provider_status=provider_status,
                             provider_message_id=message_id, idempotency_key=f"ops-sms-{n}", sent_at=utcnow()))
    token = await _token(pages, *demo["admin"])
    body = await (await pages.get("/ops/data", headers={"Authorization": f"Bearer {token}"})).json()
    assert body["sms"]["counts"] == {"DELIVERED": 1, "SENT": 1, "SENT_UNCONFIRMED": 1, "QUEUED_PARKED": 1,
                                     "QUEUED": 1}
    # Delivered of those whose delivery can be known (no report will ever name an unconfirmed one).
    assert (body["sms"]["delivered"], body["sms"]["sent"], body["sms"]["deliveryRate"]) == (1, 2, 0.5)


async def test_ops_data_does_not_count_reminders_dropped_at_their_turn_as_sent(pages: Any, rt: Any,
                                                                             demo: dict[str, Any]) -> None:
    """A reminder dropped at its turn (the member paid since the scan, sent STOP: FAILED `Skipped`) never reached the
    aggregator: a morning when members paid before their reminder went out is no delivery failure."""
    from core.db import utcnow
    from core.models import SmsMessage

    reminder = "payment_reminder"
    rows = [("DELIVERED", "Success", "ATX1", reminder), ("DELIVERED", "Success", "ATX2", reminder),
            ("FAILED", "Skipped", None, reminder), ("FAILED", "Skipped", None, reminder),
            ("FAILED", "Skipped", None, reminder), ("FAILED", "InsufficientCredit", "ATX3", "payment_receipt")]
    async with rt.sessionmaker.begin() as s:
        for n, (status, provider_status, message_id, template) in enumerate(rows):
            s.add(SmsMessage(cooperative_id=demo["cooperative_id"], phone_enc=rt.cipher.encrypt("+250788000001",
                             context="sms"), phone_index=rt.cipher.blind_index("+250788000001"),
                             phone_masked="+25078****001", template=template, language="en", body="x",
                             encoding="GSM-7", length=1, segments=1, status=status, provider_status=provider_status,
                             provider_message_id=message_id, idempotency_key=f"ops-skipped-{n}", sent_at=utcnow()))
    token = await _token(pages, *demo["admin"])
    body = await (await pages.get("/ops/data", headers={"Authorization": f"Bearer {token}"})).json()
    assert body["sms"]["counts"] == {"DELIVERED": 2, "SKIPPED": 3, "FAILED": 1}
    assert (body["sms"]["delivered"], body["sms"]["sent"], body["sms"]["deliveryRate"]) == (2, 3, 0.6667)
