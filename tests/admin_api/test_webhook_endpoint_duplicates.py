"""One active endpoint per URL in a cooperative, and a deleted endpoint left as it is. A setup script that
registered its URL again (retried after a lost answer) made a second endpoint with its own secret: every event
went out twice, and the copy signed with the secret not kept failed verification. The second registration is now
a 409 naming the endpoint that has the URL (its secret can be rotated if lost). A DELETEd endpoint answered 200 to
PATCH and rotate-secret, changing an endpoint that sends nothing: now 409, enable it first."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select

from core import webhooks
from core.db import utcnow
from core.models import WebhookEndpoint

DOMAIN = "erp.kigali-heights.rw"
URL = f"https://{DOMAIN}/hooks/payments"


async def _approved(admin: Any, superadmin: Any) -> None:
    domain = await admin.json("POST", "/v1/webhook-domains", 201, json={"domain": DOMAIN})
    await superadmin.json("POST", f"/v1/webhook-domains/{domain['id']}/approve", 200)


async def _register(admin: Any, url: str, status: int = 201) -> dict[str, Any]:
    return await admin.json("POST", "/v1/webhook-endpoints", status,  # type: ignore[no-any-return]
                            json={"url": url, "events": ["payment.completed"]})


async def _rows(rt: Any) -> list[WebhookEndpoint]:
    async with rt.sessionmaker() as s:
        return list((await s.execute(select(WebhookEndpoint).order_by(WebhookEndpoint.created_at))).scalars())


async def test_a_url_registered_again_is_refused_naming_the_endpoint_that_has_it(rt, admin, superadmin):
    await _approved(admin, superadmin)
    first = await _register(admin, URL)
    for again in (URL, "HTTPS://ERP.Kigali-Heights.RW:443/hooks/payments", f"{URL}/"):
        refused = await _register(admin, again, 409)
        assert first["id"] in refused["message"] and "rotate-secret" in refused["message"], refused
        assert refused.get("field") == "url"
    assert [row.id for row in await _rows(rt)] == [first["id"]]
    # Another path is another receiver (paths compare as typed).
    other = await _register(admin, f"https://{DOMAIN}/Hooks/payments")
    # A deleted endpoint's URL may be registered again.
    await admin.json("DELETE", f"/v1/webhook-endpoints/{first['id']}", 200)
    again = await _register(admin, URL)
    assert {row.id for row in await _rows(rt)} == {first["id"], other["id"], again["id"]}


async def test_two_registrations_of_a_url_at_once_make_one_endpoint(rt, admin, superadmin):
    await _approved(admin, superadmin)
    answers = await asyncio.gather(*(admin.req("POST", "/v1/webhook-endpoints",
                                               json={"url": URL, "events": ["payment.completed"]})
                                     for _ in range(2)))
    assert sorted(a.status for a in answers) == [201, 409]
    made, refused = [await a.json() for a in sorted(answers, key=lambda a: a.status)]
    async with rt.sessionmaker() as s:
        assert (await s.execute(select(func.count()).select_from(WebhookEndpoint))).scalar_one() == 1
    assert made["id"] in refused["message"]


async def test_no_change_or_enable_makes_two_active_endpoints_of_one_url(rt, admin, superadmin):
    await _approved(admin, superadmin)
    first = await _register(admin, URL)
    second = await _register(admin, f"https://{DOMAIN}/hooks/refunds")
    moved = await admin.json("PATCH", f"/v1/webhook-endpoints/{second['id']}", 409, json={"url": URL})
    assert first["id"] in moved["message"]
    # Its own URL, given again: no change, no refusal.
    await admin.json("PATCH", f"/v1/webhook-endpoints/{first['id']}", 200, json={"url": URL})
    await admin.json("DELETE", f"/v1/webhook-endpoints/{first['id']}", 200)
    await admin.json("PATCH", f"/v1/webhook-endpoints/{second['id']}", 200, json={"url": URL})
    enabled = await admin.json("POST", f"/v1/webhook-endpoints/{first['id']}/enable", 409)
    assert second["id"] in enabled["message"]
    statuses = {row.id: (row.status, row.url) for row in await _rows(rt)}
    assert statuses == {first["id"]: ("DISABLED", URL), second["id"]: ("ACTIVE", URL)}


async def test_a_deleted_endpoint_is_not_changed_or_given_a_secret(rt, admin, superadmin):
    await _approved(admin, superadmin)
    created = await _register(admin, URL)
    path = f"/v1/webhook-endpoints/{created['id']}"
    await admin.json("DELETE", path, 200)
    before = (await _rows(rt))[0]
    patched = await admin.json("PATCH", path, 409, json={"events": ["refund.completed"]})
    rotated = await admin.json("POST", f"{path}/rotate-secret", 409)
    for refused in (patched, rotated):
        assert "deleted" in refused["message"] and f"{path}/enable" in refused["message"], refused
    after = (await _rows(rt))[0]
    assert (after.url, after.events, after.secret_enc, after.previous_secrets) == (
        before.url, before.events, before.secret_enc, before.previous_secrets)
    assert (await admin.json("GET", path, 200))["status"] == "DISABLED"
    # Enabled again, it is changed and rotated as any other.
    await admin.json("POST", f"{path}/enable", 200)
    await admin.json("PATCH", path, 200, json={"events": ["refund.completed"]})
    await admin.json("POST", f"{path}/rotate-secret", 200)


async def test_an_endpoint_switched_off_after_failures_is_still_changed_and_rotated(rt, admin, superadmin):
    """Its URL fixed and its secret rotated before it is enabled again: it was not deleted."""
    await _approved(admin, superadmin)
    created = await _register(admin, URL)
    async with rt.sessionmaker.begin() as s:
        await webhooks._disable(rt, s, created["id"], 20, utcnow() - timedelta(days=1))
    path = f"/v1/webhook-endpoints/{created['id']}"
    changed = await admin.json("PATCH", path, 200, json={"url": f"https://{DOMAIN}/hooks/v2"})
    assert changed["status"] == "DISABLED"
    await admin.json("POST", f"{path}/rotate-secret", 200)


async def test_urls_differing_in_their_path_parameters_are_two_receivers(rt, admin, superadmin):
    # ";tenant=a" is part of the path the receiver routes on (urlparse kept it apart, and the key dropped it).
    await _approved(admin, superadmin)
    first = await _register(admin, f"{URL};tenant=a")
    second = await _register(admin, f"{URL};tenant=b")
    assert {row.id for row in await _rows(rt)} == {first["id"], second["id"]}
    await _register(admin, f"{URL};tenant=a", 409)


async def test_a_stored_url_the_parser_now_refuses_does_not_fail_registrations(rt, admin, superadmin, demo):
    # An endpoint registered before its port was checked (past 65535): the cooperative's next registration and a
    # PATCH of that endpoint's URL (how it is fixed) answered 500.
    await _approved(admin, superadmin)
    legacy = await _register(admin, URL)
    async with rt.sessionmaker.begin() as s:
        row = await s.get(WebhookEndpoint, legacy["id"])
        row.url = f"https://{DOMAIN}:99999/hooks/payments"
    await _register(admin, f"https://{DOMAIN}/hooks/other")
    fixed = await admin.json("PATCH", f"/v1/webhook-endpoints/{legacy['id']}", 200, json={"url": URL})
    assert fixed["url"] == URL
