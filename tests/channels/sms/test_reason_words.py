"""A failed payment's SMS says why in words the payer can act on: every reason the adapters store (their own plain
words for the providers' codes, not the codes) is sorted into a reason of the payer's catalogue, never 'unknown'."""

from __future__ import annotations

import pytest

from channels.sms.catalogs import en, fr, rw, sw
from channels.sms.encoding import GSM7, measure
from channels.sms.templates import reason_key
from providers.mpesa.adapter import REASONS as MPESA_WORDS
from providers.mtn_momo.adapter import REASON_WORDS as MTN_WORDS

MTN_EXPECTED = {
    "APPROVAL_REJECTED": "declined",
    "EXPIRED": "not_approved",
    "PAYER_NOT_FOUND": "invalid_account",
    "PAYEE_NOT_FOUND": "invalid_account",
    "NOT_ENOUGH_FUNDS": "insufficient_funds",
    "PAYER_LIMIT_REACHED": "limit",
    "COULD_NOT_PERFORM_TRANSACTION": "provider_error",
    "INTERNAL_PROCESSING_ERROR": "provider_error",
    "SERVICE_UNAVAILABLE": "provider_error",
    "TRANSACTION_CANCELED": "declined",
}
MPESA_EXPECTED = {
    "1": "insufficient_funds",
    "1032": "declined",
    "1037": "phone_unreachable",
    "2001": "wrong_pin",
    "1019": "not_approved",
    "1001": "other_transaction",
    "1025": "provider_error",
    "9999": "provider_error",
    "17": "limit",
    "26": "provider_error",
}


def test_every_mtn_reason_the_adapter_stores_has_a_reason_for_the_payer():
    assert {code: reason_key(words) for code, words in MTN_WORDS.items()} == MTN_EXPECTED


def test_every_mpesa_reason_the_adapter_stores_has_a_reason_for_the_payer():
    assert {code: reason_key(words) for code, words in MPESA_WORDS.items()} == MPESA_EXPECTED


@pytest.mark.parametrize("catalog", [en, fr, rw, sw], ids=["en", "fr", "rw", "sw"])
def test_every_reason_is_worded_in_every_language_within_gsm7(catalog):
    for key in set(MTN_EXPECTED.values()) | set(MPESA_EXPECTED.values()) | {"unknown", "provider_unreachable"}:
        assert measure(catalog.REASONS[key]).encoding == GSM7, (key, catalog.REASONS[key])
    assert set(catalog.REASONS) == set(en.REASONS)
