"""A cooperative names the USSD aggregator its members dial through (`ussdAggregator`): the SMS texts' "dial ..."
say that aggregator's code (USSD_SERVICE_CODE_<NAME>) with the cooperative's extension. Before, every SMS named
the shared USSD_SERVICE_CODE: a Ghanaian member who dials Nalo's *920*44*7# was told to dial Rwanda's
Africa's Talking code, which no Ghanaian network has."""

from __future__ import annotations

import dataclasses
from typing import Any

from sqlalchemy import select

from core.audit import Actor
from core.models import OutboxJob, Payment

NALO_CODE = "*920*44#"


async def _nalo(client: Any, sid: str, data: str, first: bool, msisdn: str) -> dict[str, Any]:
    resp = await client.post("/ussd/nalo", json={"USERID": "NALOTest", "MSISDN": msisdn, "USERDATA": data,
                                                 "MSGTYPE": first, "NETWORK": "MTN", "SESSIONID": sid})
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def _ghana(superadmin: Any) -> dict[str, Any]:
    coop = await superadmin.json("POST", "/v1/cooperatives", 201, json={
        "name": "Accra Traders Union", "shortCode": "ATU", "country": "GH", "ussdExtension": "7",
        "ussdAggregator": "nalo"})
    assert coop["ussdAggregator"] == "nalo"
    await superadmin.json("POST", "/v1/payment-types", 201, json={
        "name": "Market Levy", "amount": "150.00", "cooperativeId": coop["id"]})
    member = await superadmin.json("POST", "/v1/members", 201, json={
        "name": "Ama Mensah", "phone": "0244123456", "cooperativeId": coop["id"]})
    return {"coop": coop, "member": member}


async def _body(rt: Any, template: str) -> str:
    from channels.sms.jobs import SmsJobs

    async with rt.sessionmaker() as s:
        jobs = (await s.execute(select(OutboxJob).where(OutboxJob.kind == "sms.send"))).scalars().all()
    [job] = [j for j in jobs if j.payload["template"] == template]
    async with rt.engine.connect() as conn:
        _phone, _language, body = await SmsJobs(rt)._build(conn, job.payload)
    return str(body)


async def test_the_sms_of_a_nalo_cooperative_name_nalos_code(rt: Any, aiohttp_client: Any, demo: Any,
                                                            superadmin: Any) -> None:
    from app import create_app
    from core.ports import ProviderOutcome
    from core.provider_events import apply_collection_outcome

    made = await _ghana(superadmin)
    rt.settings = dataclasses.replace(rt.settings, ussd_service_codes={"nalo": NALO_CODE})
    client = await aiohttp_client(create_app(rt.settings, runtime=rt))
    msisdn = "233244123456"
    await _nalo(client, "gh-1", "*920*44*7#", True, msisdn)
    for key in ("1", "1", "1"):  # the levy, MTN, confirm
        await _nalo(client, "gh-1", key, False, msisdn)
    async with rt.sessionmaker.begin() as s:
        payment = (await s.execute(select(Payment))).scalar_one()
        await apply_collection_outcome(s, rt, payment, ProviderOutcome.FAILED, actor=Actor("provider:mtn", "provider"),
                                       reason="NOT_ENOUGH_FUNDS")
    failed = await _body(rt, "payment_failed")  # the payment templates' one-query path
    assert "*920*44*7#" in failed and "*384*123" not in failed, failed
    # The other templates (read row by row): the welcome of a member approved by the office.
    pending = await superadmin.json("POST", "/v1/members", 201, json={
        "name": "Kofi Boateng", "phone": "0244123457", "cooperativeId": made["coop"]["id"], "status": "PENDING"})
    await superadmin.json("POST", f"/v1/members/{pending['id']}/approve", 200)
    welcome = await _body(rt, "member_approved")
    assert "*920*44*7#" in welcome and "*384*123" not in welcome, welcome


async def test_the_aggregator_is_checked_and_can_be_cleared(superadmin: Any, demo: Any) -> None:
    coop_id = demo["cooperative_id"]
    answer = await superadmin.json("PATCH", f"/v1/cooperatives/{coop_id}", 400, json={"ussdAggregator": "orange"})
    assert any("ussdAggregator" in m for m in answer["message"]), answer
    assert (await superadmin.json("PATCH", f"/v1/cooperatives/{coop_id}", 200,
                                  json={"ussdAggregator": "hubtel"}))["ussdAggregator"] == "hubtel"
    assert (await superadmin.json("PATCH", f"/v1/cooperatives/{coop_id}", 200,
                                  json={"ussdAggregator": None}))["ussdAggregator"] is None
