"""STATUS with a refund's (RFD_...) or a dispute's (DSP_...) reference: the member is told that refund's or dispute's
status, of her own payments only; anyone else's reference gets the "not found" a made-up one gets.

Both references are given to her by SMS (refund_completed, refund_failed, dispute_opened, ...), and the keyword
parser rebuilds them (PAY, RFD, DSP), yet STATUS looked them up among payments only: "No payment RFD_... found for
this phone number." for her own refund."""

from __future__ import annotations

from typing import Any

import pytest

from channels.sms.encoding import GSM7, measure
from channels.sms.templates import CATALOGS, render
from core.models import Dispute, Refund
from tests.channels.sms.helpers import jobs_of, make_payment
from tests.channels.sms.test_keyword_replies import ALINE, CLAUDINE, ERIC, JEAN, ask
from tests.channels.sms.test_routes import STRANGER, inbound
from tests.conftest import drain

RFD_REF, DSP_REF = "RFD_20260115_901", "DSP_20260115_902"


async def _refund(rt: Any, demo: dict[str, Any], phone: str, *, status: str = "COMPLETED") -> tuple[Refund, str]:
    """A refund of 12,500 RWF of a payment of the member of `phone`, and that payment's reference."""
    paid = await make_payment(rt, demo["cooperative_id"], account=phone, member_id=demo["members"][phone])
    async with rt.sessionmaker.begin() as session:
        refund = Refund(payment_id=paid.id, cooperative_id=demo["cooperative_id"], reference=RFD_REF,
                        amount_minor=12_500, currency="RWF", status=status, reason="test",
                        idempotency_key="rfd-status-1", provider_reference="prov-rfd-status-1")
        session.add(refund)
    return refund, paid.reference


async def _dispute(rt: Any, demo: dict[str, Any], phone: str, *, status: str = "UNDER_REVIEW") -> tuple[Dispute, str]:
    """A dispute of a payment (50,000 RWF) of the member of `phone`, and that payment's reference."""
    paid = await make_payment(rt, demo["cooperative_id"], account=phone, member_id=demo["members"][phone])
    async with rt.sessionmaker.begin() as session:
        dispute = Dispute(payment_id=paid.id, cooperative_id=demo["cooperative_id"], member_id=paid.member_id,
                          reference=DSP_REF, reason="WRONG_AMOUNT", status=status, channel="sms")
        session.add(dispute)
    return dispute, paid.reference


@pytest.mark.parametrize(("phone", "keyword", "expected"), [
    (JEAN, "STATUS", "Refund {ref} of 12,500 RWF for payment {pay} (Kigali Heights Housing Cooperative): "
                     "completed."),
    (CLAUDINE, "STATUT", "Remboursement {ref} de 12 500 RWF pour le paiement {pay} (Kigali Heights Housing "
                         "Cooperative) : effectué."),
    (ALINE, "IMIMERERE", "Gusubizwa 12,500 RWF yo kwishyura {pay} (Kigali Heights Housing Cooperative): "
                         "byarangiye. Nimero: {ref}."),
    (ERIC, "HALI", "Kurudisha 12,500 RWF ya malipo {pay} (Kigali Heights Housing Cooperative): imekamilika. "
                   "Kumb: {ref}."),
])
async def test_status_of_her_own_refund_tells_its_status_in_her_language(
    rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any, worker: Any, phone: str, keyword: str, expected: str,
) -> None:
    refund, payment_ref = await _refund(rt, demo, phone)
    reply = await ask(sms_client, sim, worker, phone, f"{keyword} {refund.reference.replace('_', ' ')}", "rfd-1")
    assert reply == expected.format(ref=RFD_REF, pay=payment_ref)
    [job] = await jobs_of(rt, "sms.send")
    assert job.payload["template"] == "refund_status"
    assert job.payload["member_id"] == demo["members"][phone]  # the support desk finds it in her messages


@pytest.mark.parametrize(("phone", "keyword", "expected"), [
    (JEAN, "STATUS", "Dispute {ref} about payment {pay} of 50,000 RWF (Kigali Heights Housing Cooperative): "
                     "under review."),
    (CLAUDINE, "ETAT", "Réclamation {ref} sur le paiement {pay} (50 000 RWF, Kigali Heights Housing "
                       "Cooperative) : en cours d'examen."),
    (ALINE, "IMIMERERE", "Ikirego {ref} ku kwishyura {pay} (50,000 RWF, Kigali Heights Housing Cooperative): "
                         "kiri gusuzumwa."),
    (ERIC, "HALI", "Malalamiko {ref} kuhusu malipo {pay} (50,000 RWF, Kigali Heights Housing Cooperative): "
                   "yanachunguzwa."),
])
async def test_status_of_her_own_dispute_tells_its_status_in_her_language(
    rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any, worker: Any, phone: str, keyword: str, expected: str,
) -> None:
    dispute, payment_ref = await _dispute(rt, demo, phone)
    reply = await ask(sms_client, sim, worker, phone, f"{keyword} {dispute.reference}", "dsp-1")
    assert reply == expected.format(ref=DSP_REF, pay=payment_ref)
    [job] = await jobs_of(rt, "sms.send")
    assert job.payload["template"] == "dispute_status"


# A cooperative's full name as registered (up to 200 characters): its refunds' and disputes' replies were two SMS.
LONG_NAME = "Kigali Heights Housing Cooperative of Nyarutarama, Kacyiru and Kimihurura Sectors"


@pytest.mark.parametrize(("phone", "keyword", "expected"), [
    (JEAN, "STATUS", "Dispute {ref} about payment {pay} of 50,000 RWF (KHHC): under review."),
    (CLAUDINE, "ETAT", "Réclamation {ref} sur le paiement {pay} (50 000 RWF, KHHC) : en cours d'examen."),
])
async def test_a_status_reply_too_long_with_the_cooperatives_name_names_its_short_code(
    rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any, worker: Any, phone: str, keyword: str, expected: str,
) -> None:
    """Two SMS (paid for twice) with the name; one with the short code its texts begin with. A refund's reply that
    fits with the name keeps it."""
    from sqlalchemy import update

    from core.models import Cooperative

    async with rt.sessionmaker.begin() as session:
        await session.execute(update(Cooperative).where(Cooperative.id == demo["cooperative_id"])
                              .values(name=LONG_NAME))
    dispute, payment_ref = await _dispute(rt, demo, phone)
    reply = await ask(sms_client, sim, worker, phone, f"{keyword} {dispute.reference}", "dsp-long")
    assert reply == expected.format(ref=DSP_REF, pay=payment_ref)
    assert measure(reply).segments == 1
    assert measure(reply.replace("KHHC", LONG_NAME)).segments == 2  # what she was sent before
    refund, refund_payment = await _refund(rt, demo, phone)
    reply = await ask(sms_client, sim, worker, phone, f"{keyword} {refund.reference}", "rfd-long")
    assert LONG_NAME not in reply and "(KHHC)" in reply and measure(reply).segments == 1, reply
    async with rt.sessionmaker.begin() as session:
        await session.execute(update(Cooperative).where(Cooperative.id == demo["cooperative_id"])
                              .values(name="Kigali Heights"))
    reply = await ask(sms_client, sim, worker, phone, f"{keyword} {refund.reference}", "rfd-short")
    assert "(Kigali Heights)" in reply and refund_payment in reply, reply


async def test_a_refund_or_dispute_of_someone_elses_payment_is_not_found_as_a_made_up_one(
    rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any, worker: Any
) -> None:
    """Aline's refund and dispute: Jean (a member of the same cooperative) and a stranger are told what a made-up
    reference gets, nothing of the amount, the payment or the cooperative."""
    refund, _ = await _refund(rt, demo, ALINE)
    async with rt.sessionmaker.begin() as session:
        dispute = Dispute(payment_id=refund.payment_id, cooperative_id=demo["cooperative_id"],
                          member_id=demo["members"][ALINE], reference=DSP_REF, reason="WRONG_AMOUNT",
                          status="OPEN", channel="sms")
        session.add(dispute)
    for n, phone in enumerate((JEAN, STRANGER)):
        for reference in (RFD_REF, DSP_REF, "RFD_20260115_999999", "DSP_20260115_999999"):
            reply = await ask(sms_client, sim, worker, phone, f"STATUS {reference}", f"other-{n}-{reference}")
            assert reply == render("not_found", "en", {"ref": reference})
            for secret in ("12,500", "50,000", "PAY_", "Kigali"):
                assert secret not in reply
    assert sim.messages(ALINE) == []


async def test_a_refund_of_a_suspended_members_payment_is_not_answered(
    rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any, worker: Any
) -> None:
    """As her payments: a suspended member's number may be someone else's by now."""
    from sqlalchemy import update

    from core.models import Member

    await _refund(rt, demo, JEAN)
    async with rt.sessionmaker.begin() as session:
        await session.execute(update(Member).where(Member.id == demo["members"][JEAN]).values(status="SUSPENDED"))
    await inbound(sms_client, JEAN, f"STATUS {RFD_REF}", "susp-1")
    await drain(worker)
    [reply] = sim.messages(JEAN)
    assert reply["message"] == render("not_found", "en", {"ref": RFD_REF})


@pytest.mark.parametrize("language", sorted(CATALOGS))
def test_a_refunds_or_disputes_status_is_one_sms_in_every_language(language: str) -> None:
    """With a 30-character cooperative name, seven-figure amounts, seven-digit references and the longest status."""
    catalog = CATALOGS[language]
    values = {"amount": "1,234,567 RWF", "coop": "Kejetia Market Women Susu Assn",
              "payment_ref": "PAY_20260115_1234567"}
    for template, ref, statuses in (("refund_status", "RFD_20260115_1234568", catalog.REFUND_STATUS),
                                    ("dispute_status", "DSP_20260115_1234569", catalog.DISPUTE_STATUS)):
        for status in statuses.values():
            body = render(template, language, {**values, "ref": ref, "status": status})
            size = measure(body)
            assert (size.encoding, size.segments) == (GSM7, 1), f"{size.length} septets: {body!r}"
            for value in (*values.values(), ref, status):
                assert value in body, (value, body)
