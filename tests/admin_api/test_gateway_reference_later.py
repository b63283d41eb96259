"""A payment recorded from MTN's statement without the request that took its money (POST /v1/payments/recorded
without gatewayReference) cannot be refunded through MTN, whose refund names that request. When the admin finds it
later (MTN's statement export, the member's SMS), `POST /v1/payments/{id}/gateway-reference` gives it to the payment,
checked as the recording checks it, and the refund goes through. Before, nothing could add it: such a payment could
never be refunded through MTN."""

from __future__ import annotations

import asyncio
import uuid
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import select, text, update

from core.models import AuditEvent, Payment
from providers.mtn_momo.simulator import REFUNDS, TRANSACTIONS
from providers.simulation import STATE
from tests.admin_api.conftest import Caller, idem, payment_body
from tests.admin_api.test_recorded_payments import _line, _said
from tests.admin_api.test_refunds_after_restore import SIM_CREDS, _lose_payment, _refund_rows, _settle_refunds
from tests.admin_api.test_retried_key_after_restore import mtn_simulator
from tests.conftest import behind_a_lock, drain, is_postgres


@pytest.fixture(autouse=True)
async def _restored(rt: Any) -> None:
    """The references' sequence past the lost ones, as `main.py advance-references` leaves it after a restore."""
    async with rt.sessionmaker.begin() as s:
        if s.get_bind().dialect.name == "postgresql":
            await s.execute(text("SELECT setval('human_reference_seq', 1000000)"))


def _url(payment: dict[str, Any]) -> str:
    return f"/v1/payments/{payment['id']}/gateway-reference"


async def _row(rt: Any, payment_id: str) -> Payment:
    async with rt.sessionmaker() as s:
        return await s.get(Payment, payment_id)


async def _audited(rt: Any, payment_id: str) -> list[AuditEvent]:
    async with rt.sessionmaker() as s:
        return list((await s.execute(select(AuditEvent).where(
            AuditEvent.entity_id == payment_id, AuditEvent.action == "payment.gateway_reference_set"))).scalars())


async def test_the_request_found_later_lets_mtn_refund_the_recorded_payment(
        admin: Caller, rt: Any, demo: dict[str, Any], worker: Any, aiohttp_server: Any) -> None:
    async with mtn_simulator(rt, aiohttp_server, SIM_CREDS) as app:
        state = app[STATE]
        first = await admin.json("POST", "/v1/payments", 201, json=payment_body(demo["payment_types"]["Monthly Rent"]))
        await drain(worker)  # MTN prompts the member, who approves
        await state.idle()
        [(request, taken)] = app[TRANSACTIONS].items()
        assert taken["status"] == "SUCCESSFUL"

        # The restore loses the payment; an admin records it from MTN's statement without its request's reference.
        await _lose_payment(rt, first["id"])
        recorded = await admin.json("POST", "/v1/payments/recorded", 201, json=_line(
            demo, memberId=None, paymentAccount="+250788000001",
            providerTransactionId=taken["financialTransactionId"]))
        assert recorded["gatewayReference"].startswith("recorded:")
        body = {"amount": 20000, "reason": "overpaid", "idempotencyKey": idem()}
        refused = await admin.json("POST", f"/v1/payments/{recorded['id']}/refunds", 409, json=body)
        assert "nothing was sent" in _said(refused)

        # The admin finds the request in MTN's statement export (its externalId) and gives it.
        before = await _row(rt, recorded["id"])
        given = await admin.json("POST", _url(recorded), 200, json={"gatewayReference": request.upper()})
        assert (given["id"], given["gatewayReference"], given["status"]) == (recorded["id"], request, "COMPLETED")
        row = await _row(rt, recorded["id"])
        assert row.provider_reference == request and row.updated_at > before.updated_at
        [audit] = await _audited(rt, recorded["id"])
        assert (audit.before, audit.after, audit.actor.startswith("admin:")) == (
            {"gatewayReference": recorded["gatewayReference"]}, {"gatewayReference": request}, True)
        assert (await admin.json("GET", f"/v1/payments/{recorded['id']}", 200))["gatewayReference"] == request

        # The same refund now goes through: MTN finds the request it names and pays the member back from it.
        refund = await admin.json("POST", f"/v1/payments/{recorded['id']}/refunds", 201, json=body)
        await _settle_refunds(rt, worker, state)
        [(sent, at_mtn)] = app[REFUNDS].items()
        assert (at_mtn["status"], app[TRANSACTIONS][request]["_refunded"]) == ("SUCCESSFUL", Decimal(20000))
        done = await admin.json("GET", f"/v1/refunds/{refund['id']}", 200)
        assert (done["status"], done["providerTransactionId"]) == ("COMPLETED", at_mtn["financialTransactionId"])
        [refund_row] = await _refund_rows(rt)
        assert refund_row.provider_reference == sent


async def test_only_a_recorded_payment_of_no_known_request_is_given_one(admin: Caller, rt: Any,
                                                                       demo: dict[str, Any]) -> None:
    # A payment the gateway asked for: its reference is the request it sent.
    asked = await admin.json("POST", "/v1/payments", 201, json=payment_body(demo["payment_types"]["Monthly Rent"]))
    refused = await admin.json("POST", _url(asked), 409, json={"gatewayReference": str(uuid.uuid4())})
    assert f"payment {asked['reference']} was not recorded" in _said(refused)
    assert (await _row(rt, asked["id"])).provider_reference == asked["gatewayReference"]
    # A payment recorded with its request: known already, not changed.
    known = str(uuid.uuid4())
    with_it = await admin.json("POST", "/v1/payments/recorded", 201, json=_line(
        demo, gatewayReference=known, providerTransactionId="MTN-1"))
    refused = await admin.json("POST", _url(with_it), 409, json={"gatewayReference": str(uuid.uuid4())})
    assert f"payment {with_it['reference']} has its gatewayReference already ({known})" in _said(refused)
    assert (await _row(rt, with_it["id"])).provider_reference == known
    # Given once, it is known: a second one (or the same again) is refused and changes nothing.
    without = await admin.json("POST", "/v1/payments/recorded", 201, json=_line(demo, providerTransactionId="MTN-2"))
    found = str(uuid.uuid4())
    await admin.json("POST", _url(without), 200, json={"gatewayReference": found})
    for again in (found, str(uuid.uuid4())):
        refused = await admin.json("POST", _url(without), 409, json={"gatewayReference": again})
        assert f"has its gatewayReference already ({found})" in _said(refused)
    assert (await _row(rt, without["id"])).provider_reference == found
    assert len(await _audited(rt, without["id"])) == 1
    assert await _audited(rt, asked["id"]) == [] and await _audited(rt, with_it["id"]) == []


async def test_a_reference_a_payment_holds_is_refused_naming_it_only_within_the_cooperative(
        admin: Caller, rt: Any, demo: dict[str, Any], coop_b: dict[str, Any]) -> None:
    recorded = await admin.json("POST", "/v1/payments/recorded", 201, json=_line(demo))
    ours = await admin.json("POST", "/v1/payments", 201, json=payment_body(demo["payment_types"]["Monthly Rent"]))
    held = await admin.json("POST", _url(recorded), 409, json={"gatewayReference": ours["gatewayReference"]})
    assert _said(held).startswith(f"gatewayReference {ours['gatewayReference']} is held already by payment "
                                  f"{ours['reference']}")
    theirs = await coop_b["admin"].json("POST", "/v1/payments", 201, json=payment_body(
        coop_b["payment_type_id"], amount=1000, paymentAccount="+250788999001"))
    other = await admin.json("POST", _url(recorded), 409, json={"gatewayReference": theirs["gatewayReference"]})
    assert "held already by another cooperative's payment" in _said(other)
    assert theirs["reference"] not in _said(other)
    row = await _row(rt, recorded["id"])
    assert row.provider_reference == recorded["gatewayReference"] and await _audited(rt, recorded["id"]) == []


@pytest.mark.skipif(not is_postgres(), reason="two writers at once: PostgreSQL's row and index locks")
async def test_a_reference_taken_at_the_same_moment_is_refused_with_nothing_written(
        admin: Caller, rt: Any, demo: dict[str, Any]) -> None:
    recorded = await admin.json("POST", "/v1/payments/recorded", 201, json=_line(demo))
    other = await admin.json("POST", "/v1/payments", 201, json=payment_body(demo["payment_types"]["Monthly Rent"]))
    reference = str(uuid.uuid4())
    async with rt.engine.connect() as conn:
        # Another writer takes the reference and has not committed: the route's check does not see it yet.
        await conn.execute(text("UPDATE payments SET provider_reference = :r WHERE id = :i"),
                           {"r": reference, "i": other["id"]})
        answer = asyncio.create_task(admin.req("POST", _url(recorded), json={"gatewayReference": reference}))
        await behind_a_lock(rt, answer)
        assert not answer.done()  # its write waits on the unique index for the other writer
        await conn.commit()
        response = await answer
    body = await response.json()
    assert response.status == 409, body
    assert _said(body).startswith(f"gatewayReference {reference} is held already by payment {other['reference']}")
    row = await _row(rt, recorded["id"])
    assert row.provider_reference == recorded["gatewayReference"] and await _audited(rt, recorded["id"]) == []


@pytest.mark.parametrize("body", [
    {"gatewayReference": "PAY_20261130_4821"},
    {"gatewayReference": f"recorded:{uuid.uuid4()}"},
    {"gatewayReference": "  "},
    {"gatewayReference": None},
    {"gatewayReference": 42},
    {},
    {"gatewayReference": str(uuid.uuid4()), "note": "an unknown field"},
])
async def test_a_bad_body_is_refused_naming_the_field(admin: Caller, rt: Any, demo: dict[str, Any],
                                                     body: dict[str, Any]) -> None:
    recorded = await admin.json("POST", "/v1/payments/recorded", 201, json=_line(demo))
    refused = await admin.json("POST", _url(recorded), 400, json=body)
    assert ("note" if "note" in body else "gatewayReference") in _said(refused)
    assert (await _row(rt, recorded["id"])).provider_reference == recorded["gatewayReference"]


async def test_access(admin: Caller, tenant: Caller, superadmin: Caller, coop_b: dict[str, Any], rt: Any,
                      demo: dict[str, Any]) -> None:
    recorded = await admin.json("POST", "/v1/payments/recorded", 201, json=_line(demo))
    body = {"gatewayReference": str(uuid.uuid4())}
    await tenant.json("POST", _url(recorded), 403, json=body)
    await coop_b["admin"].json("POST", _url(recorded), 404, json=body)  # another cooperative's payment
    for missing in (str(uuid.uuid4()), "not-an-id"):
        await admin.json("POST", _url({"id": missing}), 404, json=body)
    assert (await _row(rt, recorded["id"])).provider_reference == recorded["gatewayReference"]
    done = await superadmin.json("POST", _url(recorded), 200, json=body)
    assert done["gatewayReference"] == body["gatewayReference"]
    [audit] = await _audited(rt, recorded["id"])
    assert audit.actor.startswith("admin:") and audit.cooperative_id == demo["cooperative_id"]


async def test_a_voided_recording_is_given_no_request(admin: Caller, rt: Any, demo: dict[str, Any]) -> None:
    """A voided recording is final and moves no money: the request whose money the void released is left for the right
    line's recording, not taken by the voided payment (which would leave that line unrecordable with it: 409)."""
    recorded = await admin.json("POST", "/v1/payments/recorded", 201, json=_line(demo))
    await admin.json("POST", f"/v1/payments/{recorded['id']}/void", 200, json={"note": "wrong statement line"})
    request = str(uuid.uuid4())
    refused = await admin.json("POST", _url(recorded), 409, json={"gatewayReference": request})
    assert f"payment {recorded['reference']} is VOIDED" in _said(refused)
    row = await _row(rt, recorded["id"])
    assert row.status == "VOIDED" and row.provider_reference.startswith("recorded:")
    assert await _audited(rt, recorded["id"]) == []
    # The right line is recorded with that request.
    right = await admin.json("POST", "/v1/payments/recorded", 201, json=_line(
        demo, gatewayReference=request, providerTransactionId="MTN-RIGHT"))
    assert right["gatewayReference"] == request


# A payment of the gateway's own holding a request, moved to each status (values written on its row), and what each
# route's refusal must say of that request's money: recording the line as a new payment (POST /v1/payments/recorded)
# or giving the request to a payment recorded already (this route), whose money is recorded there.
_HELD_BY = {
    "FAILED": ({"status": "FAILED", "failure_reason": "declined"},
               "the provider said that request failed, so its money is not recorded there; the request stays that "
               "payment's: record the statement line without gatewayReference (an MTN refund of it, which names "
               "the request, is then refused: have the provider send the money back and record that with "
               "returnedByProvider)",
               "the provider said that request failed, so its money is recorded only here; the request stays that "
               "payment's, and this one keeps none (an MTN refund of it, which names the request, is then refused: "
               "have the provider send the money back and record that with returnedByProvider)"),
    "FAILED, money taken after": ({"status": "FAILED", "failure_reason": "declined", "collected_minor": 50000,
                                   "completed_at": "now"},
                                  "that request's money is recorded there (taken after the payment had failed), and "
                                  "is not recorded twice",
                                  "that request's money is recorded there (taken after the payment had failed), and "
                                  "this payment records money too: if both are the same statement line, void this "
                                  "recording (POST /v1/payments/{id}/void)"),
    "COMPLETED": ({"status": "COMPLETED", "collected_minor": 50000, "completed_at": "now"},
                  "that request's money is recorded there, and is not recorded twice",
                  "that request's money is recorded there, and this payment records money too"),
    "TIMEOUT": ({"status": "TIMEOUT"},
                "its outcome never reached the gateway, so its money is not recorded: record it on that payment "
                "(POST /v1/payments/{id}/outcome), not as a new one",
                "its outcome never reached the gateway, so its money is recorded only here; the request stays that "
                "payment's: to refund by it, void this recording (POST /v1/payments/{id}/void) and record the money "
                "on payment {held} instead (POST /v1/payments/{id}/outcome)"),
    "VOIDED": ({"status": "VOIDED"}, "that payment's recording was voided, so its money is not recorded there",
               "that payment's recording was voided, so its money is recorded only here"),
    "PENDING": ({}, "the provider has not answered for it yet, and its money is recorded there when it does",
                "the provider has not answered for it yet: if it answers paid, this payment and that one record the "
                "same money: void this recording then (POST /v1/payments/{id}/void)"),
}


@pytest.mark.parametrize("held_by", list(_HELD_BY))
async def test_a_request_a_payment_holds_is_refused_saying_what_its_status_makes_true(
        admin: Caller, rt: Any, demo: dict[str, Any], held_by: str) -> None:
    """A FAILED payment's request named for a statement line was refused "that request's money is recorded": untrue,
    the provider said it failed and nothing of it is recorded (and /outcome, refusing that FAILED payment, sends the
    admin to POST /v1/payments/recorded). Each route now says what the holder's status makes true: recording a new
    line, that the money is not recorded there and to record the line without the request; giving the request to a
    payment recorded already, that its money is recorded only on that payment, which keeps no request."""
    from datetime import UTC, datetime

    values, recording, giving = _HELD_BY[held_by]
    holder = await admin.json("POST", "/v1/payments", 201, json=payment_body(demo["payment_types"]["Monthly Rent"]))
    if values:
        async with rt.sessionmaker.begin() as s:
            await s.execute(update(Payment).where(Payment.id == holder["id"]).values(
                {k: datetime.now(UTC) if v == "now" else v for k, v in values.items()}))
    request = holder["gatewayReference"]
    start = f"gatewayReference {request} is held already by payment {holder['reference']}, which is "
    status = values.get("status", "PENDING")

    refused = await admin.json("POST", "/v1/payments/recorded", 409, json=_line(
        demo, gatewayReference=request, providerTransactionId="MTN-LINE-1"))
    assert (refused["code"], refused["field"]) == ("DUPLICATE_REFERENCE", "gatewayReference")
    assert _said(refused).startswith(f"{start}{status}: {recording}"), _said(refused)
    assert ("request's money is recorded there" in _said(refused)) is bool(values.get("collected_minor"))

    recorded = await admin.json("POST", "/v1/payments/recorded", 201, json=_line(
        demo, providerTransactionId="MTN-LINE-2"))
    refused = await admin.json("POST", _url(recorded), 409, json={"gatewayReference": request})
    assert (refused["code"], refused["field"]) == ("DUPLICATE_REFERENCE", "gatewayReference")
    assert _said(refused).startswith(f"{start}{status}: {giving.replace('{held}', holder['reference'])}"), \
        _said(refused)
    row = await _row(rt, recorded["id"])
    assert row.provider_reference == recorded["gatewayReference"] and await _audited(rt, recorded["id"]) == []
