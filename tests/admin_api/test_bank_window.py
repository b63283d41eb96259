"""A bank payment (an IremboPay invoice the payer settles on their bank's page, reached from the paymentUrl the
worker adds after the 201) is open BANK_PAYMENT_TIMEOUT_SECONDS, and its invoice expires then; it had the
mobile-money PIN prompt's 5 minutes, which the payer's bank visit rarely fits."""

from __future__ import annotations

from datetime import timedelta

from core.config import load_settings
from core.models import Payment
from tests.admin_api.conftest import make_payment


async def test_a_bank_payment_gets_the_bank_window_and_mobile_money_the_pin_prompts(admin, rt, demo):
    bank = await make_payment(admin, demo["payment_types"]["Monthly Rent"], paymentMethod="BANK_BK",
                              paymentAccount="aline@example.rw")
    mobile = await make_payment(admin, demo["payment_types"]["Water"], amount=5000)
    async with rt.sessionmaker() as s:
        by_bank, by_phone = await s.get(Payment, bank["id"]), await s.get(Payment, mobile["id"])
    assert by_bank.expires_at - by_bank.created_at == timedelta(seconds=rt.settings.bank_payment_timeout_seconds)
    assert by_phone.expires_at - by_phone.created_at == timedelta(seconds=rt.settings.payment_timeout_seconds)
    assert rt.settings.bank_payment_timeout_seconds == 3600


def test_the_bank_window_is_configured_and_bounded():
    assert load_settings({"BANK_PAYMENT_TIMEOUT_SECONDS": "86400"}).bank_payment_timeout_seconds == 86400
    import pytest

    from core.config import ConfigError

    with pytest.raises(ConfigError):
        load_settings({"BANK_PAYMENT_TIMEOUT_SECONDS": "30"})
