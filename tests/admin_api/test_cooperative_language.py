"""A cooperative's language (`language`: en rw fr sw; a Tanzanian one's Swahili unless given, others English).
Before, every member added without a language, every payer who is no member and every stranger on its menu was
in English: a Tanzanian cooperative had to give each member Swahili one by one, and could not text a payer who
is no member (an API payment for her number) in Swahili at all. A member's own language always wins."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

from core.audit import Actor
from core.models import AuditEvent, Member, OutboxJob, Payment
from tests.admin_api.conftest import Caller, Irembo, bearer, idem
from tests.channels.ussd.helpers import AtPhone


@pytest.fixture
def settings(migrated_database: str) -> Any:
    from tests.conftest import make_settings

    return make_settings(AIRTEL_COUNTRY="TZ")  # the deployment's Airtel Money account is Tanzania's


@pytest.fixture
async def operator(client: Any, demo: dict[str, Any]) -> Caller:
    return await bearer(client, *demo["super_admin"])


async def _tanzania(operator: Caller, **over: Any) -> dict[str, Any]:
    made = await operator.json("POST", "/v1/cooperatives", 201, json={
        "name": "Chama cha Akiba", "shortCode": "CCA", "country": "TZ", "ussdExtension": "255", **over})
    await operator.json("POST", "/v1/payment-types", 201, json={
        "name": "Ada", "amount": "1500", "cooperativeId": made["id"]})
    return made


async def test_a_cooperative_gets_its_countrys_language_and_can_change_it(operator: Caller, rt: Any) -> None:
    tz = await _tanzania(operator)
    assert tz["language"] == "sw"
    ke = await operator.json("POST", "/v1/cooperatives", 201, json={
        "name": "Nairobi Sacco", "shortCode": "NRB", "country": "KE"})
    assert ke["language"] == "en"
    rw = await operator.json("POST", "/v1/cooperatives", 201, json={
        "name": "Kigali Abishyize", "shortCode": "KGA", "country": "RW", "language": "rw"})
    assert rw["language"] == "rw"
    refused = await operator.json("POST", "/v1/cooperatives", 400, json={
        "name": "Bad", "shortCode": "BAD", "country": "RW", "language": "de"})
    assert any("language" in m for m in refused["message"]), refused
    await operator.json("PATCH", f"/v1/cooperatives/{ke['id']}", 400, json={"language": "EN"})
    changed = await operator.json("PATCH", f"/v1/cooperatives/{ke['id']}", 200, json={"language": "sw"})
    assert changed["language"] == "sw"
    assert (await operator.json("GET", f"/v1/cooperatives/{ke['id']}", 200))["language"] == "sw"
    async with rt.sessionmaker() as s:
        audit = (await s.execute(select(AuditEvent).where(AuditEvent.entity_id == ke["id"],
                                                          AuditEvent.action == "cooperative.updated"))).scalar_one()
    assert (audit.before["language"], audit.after["language"]) == ("en", "sw")


async def test_members_added_without_a_language_get_the_cooperatives(operator: Caller, rt: Any) -> None:
    tz = await _tanzania(operator)
    plain = await operator.json("POST", "/v1/members", 201, json={
        "name": "Baraka Mwita", "phone": "0682000001", "cooperativeId": tz["id"]})
    assert plain["language"] == "sw"
    own = await operator.json("POST", "/v1/members", 201, json={
        "name": "Grace Mushi", "phone": "0682000002", "language": "en", "cooperativeId": tz["id"]})
    assert own["language"] == "en"
    listed = await operator.req("POST", f"/v1/members/import?cooperativeId={tz['id']}",
                                data=b"name,phone\nAsha Juma,0682000003\n",
                                headers={"Content-Type": "text/csv"})
    assert listed.status in (200, 201), await listed.text()
    with_column = await operator.req("POST", f"/v1/members/import?cooperativeId={tz['id']}",
                                     data=b"name,phone,language\nNeema Ally,0682000004,en\nJuma Said,0682000005,\n"
, headers={"Content-Type": "text/csv"})
    assert with_column.status in (200, 201), await with_column.text()
    async with rt.sessionmaker() as s:
        languages = dict((await s.execute(select(Member.name, Member.language)
                                          .where(Member.cooperative_id == tz["id"]))).all())
    assert languages == {"Baraka Mwita": "sw", "Grace Mushi": "en", "Asha Juma": "sw", "Neema Ally": "en",
                         "Juma Said": "sw"}


async def test_a_stranger_on_its_menu_is_greeted_in_its_language(operator: Caller, client: Any) -> None:
    await _tanzania(operator)
    stranger = AtPhone(client, "+255682000009", service_code="*384*123*255#")
    assert (await stranger.dial()).startswith("CON Karibu CoopPay\n1. Lipa\n")  # not "Welcome to", "1. Pay"
    # A member's own language wins over her cooperative's.
    kenya = await operator.json("POST", "/v1/cooperatives", 201, json={
        "name": "Nairobi Sacco", "shortCode": "NRB", "country": "KE", "ussdExtension": "254", "language": "sw"})
    await operator.json("POST", "/v1/members", 201, json={
        "name": "Wanjiku Kamau", "phone": "0712000001", "language": "en", "cooperativeId": kenya["id"]})
    member = AtPhone(client, "+254712000001", service_code="*384*123*254#")
    assert (await member.dial()).startswith("CON Welcome to Nairobi Sacco")


async def test_a_payer_who_is_no_member_is_texted_in_its_language(operator: Caller, rt: Any) -> None:
    from channels.sms.jobs import SmsJobs
    from channels.sms.templates import build_message
    from core.ports import ProviderOutcome
    from core.provider_events import apply_collection_outcome

    tz = await _tanzania(operator)
    [ptype] = (await operator.json("GET", f"/v1/payment-types?cooperativeId={tz['id']}", 200))["data"]
    made = await operator.json("POST", "/v1/payments", 201, json={
        "cooperativeId": tz["id"], "paymentTypeId": ptype["id"], "paymentMethod": "MOBILE_MONEY_AIRTEL",
        "paymentAccount": "0682000007", "amount": "1500", "idempotencyKey": idem()})
    async with rt.sessionmaker.begin() as s:
        payment = await s.get(Payment, made["id"])
        assert payment is not None and payment.member_id is None
        await apply_collection_outcome(s, rt, payment, ProviderOutcome.FAILED,
                                       actor=Actor("provider:airtel", "provider"), reason="NOT_ENOUGH_FUNDS")
    async with rt.sessionmaker() as s:
        [job] = [j for j in (await s.execute(select(OutboxJob).where(OutboxJob.kind == "sms.send"))).scalars()
                 if j.payload["template"] == "payment_failed"]
    async with rt.engine.connect() as conn:  # the payment templates' one-query path
        phone, language, body = await SmsJobs(rt)._build(conn, job.payload)
    assert (phone.e164, language) == ("+255682000007", "sw")
    assert body.startswith("Malipo ya 1,500.00 TZS kwa Ada hayakufanikiwa"), body
    async with rt.sessionmaker() as s:  # and the row-by-row path
        _, language, body = await build_message(s, rt.cipher, job.payload)
    assert language == "sw" and body.startswith("Malipo ya 1,500.00 TZS"), body


async def test_a_bank_payers_invoice_is_in_its_language(superadmin: Caller, admin: Caller, rt: Any, demo: Any,
                                                         irembo: Irembo, worker: Any) -> None:
    """IremboPay's invoice page is in the language the gateway sends: a bank payer is no member (her account is
    no phone number), and it was English whatever her cooperative's."""
    import json

    from tests.admin_api.conftest import payment_body
    from tests.conftest import drain

    await superadmin.json("PATCH", f"/v1/cooperatives/{demo['cooperative_id']}", 200, json={"language": "rw"})
    made = await admin.json("POST", "/v1/payments", 201, json=payment_body(
        demo["payment_types"]["Monthly Rent"], paymentMethod="BANK_BK", paymentAccount="aline@example.rw"))
    await drain(worker)
    [invoice] = [json.loads(body) for path, body in irembo.bodies if path == "/payments/invoices"]
    assert invoice["language"] == "RW" and invoice["transactionId"], invoice
    async with rt.sessionmaker() as s:
        payment = await s.get(Payment, made["id"])
    assert payment is not None and payment.member_id is None and payment.payment_url
