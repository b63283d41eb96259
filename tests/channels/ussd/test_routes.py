"""Callback authentication, malformed bodies and the end-of-session notification."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from core.models import UssdSession
from tests.channels.ussd.helpers import AtPhone

FORM = {"sessionId": "ATUid_auth", "serviceCode": "*384*123#", "phoneNumber": "+250788000002",
        "networkCode": "63510", "text": ""}


@pytest.fixture
async def secured(rt: Any, aiohttp_client: Any, settings_factory: Any) -> Any:
    from app import create_app

    settings = settings_factory(CALLBACK_SECRET_AFRICASTALKING="s3cret-at",
                                CALLBACK_SECRET_HUBTEL="s3cret-hb", CALLBACK_SECRET_NALO="s3cret-nl")
    return await aiohttp_client(create_app(settings, runtime=rt))


@pytest.mark.parametrize("query", ["", "?secret=wrong", "?secret=", "?secret=s3cret-hb"])
async def test_wrong_or_missing_secret_is_refused_and_nothing_happens(
        secured: Any, demo: Any, db: Any, rt: Any, query: str, caplog: Any) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.ussd")
    resp = await secured.post(f"/ussd/africastalking{query}", data=FORM)
    assert resp.status == 403
    assert await db.count(UssdSession) == 0
    assert await rt.redis.dbsize() == 0
    assert "wrong or missing secret" in caplog.text
    assert "s3cret" not in caplog.text


async def test_right_secret_is_accepted(secured: Any, demo: Any) -> None:
    phone = AtPhone(secured, "+250788000002", query="?secret=s3cret-at")
    assert (await phone.dial()).startswith("CON Welcome")
    resp = await secured.post("/ussd/hubtel?secret=s3cret-at", json={})
    assert resp.status == 403
    resp = await secured.post("/ussd/africastalking/events", data={"sessionId": "x", "status": "Success",
                                                                   "phoneNumber": "+250788000002"})
    assert resp.status == 403


async def test_source_address_outside_the_allowlist_is_refused(rt: Any, aiohttp_client: Any, demo: Any,
                                                               settings_factory: Any) -> None:
    from app import create_app

    outside = await aiohttp_client(create_app(settings_factory(USSD_IP_ALLOWLIST="10.1.2.0/24"), runtime=rt))
    assert (await outside.post("/ussd/africastalking", data=FORM)).status == 403
    inside = await aiohttp_client(create_app(settings_factory(USSD_IP_ALLOWLIST="10.1.2.0/24,127.0.0.1"),
                                             runtime=rt))
    resp = await inside.post("/ussd/africastalking", data=FORM)
    assert resp.status == 200 and (await resp.text()).startswith("CON ")


async def test_allowlist_per_aggregator_and_behind_trusted_proxies(rt: Any, aiohttp_client: Any, demo: Any,
                                                                   settings_factory: Any) -> None:
    from app import create_app

    # Africa's Talking has its own list (not us); the shared list still lets Hubtel in.
    split = await aiohttp_client(create_app(settings_factory(
        USSD_IP_ALLOWLIST="127.0.0.1", USSD_IP_ALLOWLIST_AFRICASTALKING="10.9.0.0/16"), runtime=rt))
    assert (await split.post("/ussd/africastalking", data=FORM)).status == 403
    # Behind our own proxy (127.0.0.1 here), the aggregator's address is the nearest untrusted hop.
    proxied = await aiohttp_client(create_app(settings_factory(
        USSD_IP_ALLOWLIST_AFRICASTALKING="10.9.0.0/16", TRUSTED_PROXIES="127.0.0.1,192.168.5.0/24"), runtime=rt))

    async def post(forwarded: str) -> int:
        return (await proxied.post("/ussd/africastalking", data=FORM,
                                   headers={"X-Forwarded-For": forwarded})).status

    assert await post("10.9.3.4") == 200
    assert await post("10.9.3.4, 192.168.5.7") == 200  # through two of our proxies
    # A client cannot buy its way in by prepending an allowed address: the nearest untrusted hop counts.
    assert await post("10.9.3.4, 203.0.113.9") == 403
    assert await post("not-an-address") == 403
    assert (await proxied.post("/ussd/africastalking", data=FORM)).status == 403  # the proxy itself


@pytest.mark.parametrize("variable", ["USSD_IP_ALLOWLIST", "USSD_IP_ALLOWLIST_NALO", "TRUSTED_PROXIES"])
def test_bad_addresses_stop_the_process_at_start(variable: str) -> None:
    from core.config import ConfigError, load_settings

    with pytest.raises(ConfigError) as info:
        load_settings({variable: "10.0.0.0/8,not-an-ip"})
    assert info.value.variable == variable


async def test_no_secret_configured_warns_at_start(rt: Any, settings: Any, caplog: Any) -> None:
    from app import create_app

    caplog.set_level(logging.WARNING, logger="gateway.ussd")
    create_app(settings, runtime=rt)
    warnings = [r for r in caplog.records if r.name == "gateway.ussd" and "without a URL secret" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].aggregators == "africastalking,hubtel,nalo"


async def test_malformed_bodies(client: Any, demo: Any) -> None:
    resp = await client.post("/ussd/africastalking", data={"sessionId": "x", "serviceCode": "*384*123#"})
    assert resp.status == 200
    assert (await resp.text()).startswith("END Sorry")
    resp = await client.post("/ussd/africastalking", data=b"\xff\xfe", headers={"Content-Type": "text/plain"})
    assert resp.status == 200 and (await resp.text()).startswith("END ")
    for path in ("/ussd/hubtel", "/ussd/nalo"):
        resp = await client.post(path, data=b"{not json", headers={"Content-Type": "application/json"})
        assert resp.status == 400
        assert await resp.json() == {"error": "Bad Request", "message": "body is not JSON"}
    resp = await client.post("/ussd/nalo", json={"MSISDN": "233244123456", "SESSIONID": "1"})
    assert resp.status == 400 and (await resp.json())["message"] == "MSGTYPE is required"
    resp = await client.post("/ussd/hubtel", data=b"x" * 20_000, headers={"Content-Type": "application/json"})
    assert resp.status == 400 and (await resp.json())["message"] == "body too large"


async def test_a_hop_whose_body_arrives_in_two_tcp_segments_is_read_whole(client: Any, demo: Any) -> None:
    """aiohttp's read(n) returns what has arrived so far: a cut form would read "20000" as "200"."""
    from urllib.parse import urlencode

    from tests.rawhttp import post_in_two_parts

    phone = AtPhone(client, "+250788000002")
    await phone.dial()
    phone.inputs.append("1")
    whole = urlencode(phone.form()).encode()
    status, answer = await post_in_two_parts(client.server.host, client.server.port, "/ussd/africastalking", whole,
                                             content_type="application/x-www-form-urlencoded",
                                             split_at=len(whole) - 1)
    assert status == 200 and answer.decode().startswith("CON Choose what to pay:"), answer


async def test_end_of_session_event_is_recorded_on_the_session(client: Any, demo: Any, db: Any) -> None:
    phone = AtPhone(client, "+250788000002")
    await phone.dial()
    await phone.send("1")
    resp = await client.post("/ussd/africastalking/events", data={
        "date": "2026-11-22 05:00:00", "sessionId": phone.session_id, "serviceCode": "*384*123#",
        "networkCode": "63510", "phoneNumber": "+250788000002", "status": "Incomplete", "cost": "RWF 10.0000",
        "durationInMillis": "35120", "hopsCount": "2", "input": "1", "lastAppResponse": "CON Choose",
        "errorMessage": "USER_TIMEOUT"})
    assert resp.status == 200
    row = await db.one(UssdSession)
    assert (row.status, row.hops, row.duration_ms, row.cost, row.error) == (
        "Incomplete", 2, 35120, "RWF 10.0000", "USER_TIMEOUT")
    assert row.ended_at is not None and row.member_id is not None


async def test_event_for_an_unknown_session_creates_the_row(client: Any, db: Any) -> None:
    resp = await client.post("/ussd/africastalking/events", data={
        "sessionId": "ATUid_never_seen", "phoneNumber": "+250788000002", "serviceCode": "*384*123#",
        "status": "Failed", "errorMessage": "APP_TIMEOUT"})
    assert resp.status == 200
    row = await db.one(UssdSession)
    assert (row.session_id, row.status, row.error, row.phone_masked) == (
        "ATUid_never_seen", "Failed", "APP_TIMEOUT", "+25078****002")
    # The same notification again updates the same row.
    resp = await client.post("/ussd/africastalking/events", data={
        "sessionId": "ATUid_never_seen", "phoneNumber": "+250788000002", "status": "Failed",
        "hopsCount": "4"})
    assert resp.status == 200
    assert (await db.one(UssdSession)).hops == 4


async def test_malformed_event_is_refused(client: Any, db: Any) -> None:
    resp = await client.post("/ussd/africastalking/events", data={"sessionId": "x", "status": "Done",
                                                                   "phoneNumber": "+250788000002"})
    assert resp.status == 400
    assert await db.count(UssdSession) == 0
