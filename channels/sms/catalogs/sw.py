"""Swahili SMS texts."""

MESSAGES = {
    # One SMS for the usual receipt, as in English: a date that needs no label, and no closing "Asante!", for one SMS
    # too when the provider took another amount than asked (AMOUNT_TAKEN, both amounts: 171 septets before). The
    # provider's transaction beside the reference, as in Kinyarwanda, not after "Muamala:": one SMS with a seven-digit
    # reference and both amounts (164 septets).
    "payment_receipt": "Tumepokea {amount} kwa {type}, {coop}. Kumb: {ref} ({txn}). {date}",
    "payment_receipt_refunded": "Tumepokea {amount} kwa {type}. Imerudishwa baadaye: {refunded}. Kumb: {ref} ({txn}). "
    "{date}",
    # One SMS (235 septets before), as in English: no cooperative's name, "hatimaye" says the earlier message was wrong.
    # "Tumepokea" as the receipt, for one SMS with both amounts (174 septets as "Malipo yako ya ... yamefanikiwa").
    "payment_late_receipt": "Tumepokea {amount} kwa {type} hatimaye: usilipe tena. Kumb: {ref} ({txn}). {date}",
    # Two SMS (en.py): the provider's transaction beside the reference as in the receipt.
    "payment_taken_after_failure": "Tulisema malipo yako ya {amount} kwa {type} ({coop}) hayakufanikiwa, lakini pesa "
    "zimekatwa hatimaye. Usilipe tena: chama chako kitazihesabu au kitakurudishia. Kumb: {ref} ({txn}). {date}",
    # One SMS for the usual failure and timeout (en.py): no cooperative's name, "yako" dropped, and what to do as the
    # other messages say it ("Piga {dial} kulipa"), "tena" (again) added.
    "payment_failed": "Malipo ya {amount} kwa {type} hayakufanikiwa: {reason}. Kumb: {ref}. Piga {dial} kulipa tena.",
    "payment_timeout": "Malipo ya {amount} kwa {type} hayakuthibitishwa kwa wakati. Kumb: {ref}. "
    "Piga {dial} kulipa tena.",
    # One SMS (197 septets before): no cooperative's name, "yako" dropped, as payment_failed; "utarudishiwa" without
    # "pesa" (as PAYMENT_STATUS["UNCONFIRMED"]) with a seven-digit reference (163 septets).
    "payment_unconfirmed": "Hatukuweza kuthibitisha malipo ya {amount} kwa {type}. Ikiwa pesa "
    "zilikatwa, malipo yatathibitishwa au utarudishiwa. Kumb: {ref}.",
    "payment_status": "Malipo {ref}: {amount} kwa {type} ({coop}) - {status}. Tarehe: {date}.",
    "refund_completed": "Umerudishiwa {amount} ya malipo {payment_ref} ({coop}). Kumb: {ref}.",
    # One SMS with any REFUND_REASONS (206 septets before): no cooperative's name; "Chama", not "Chama chako", for
    # seven-digit references (165 septets).
    "refund_failed": "Kurudisha {amount} ya malipo {payment_ref} hakukufanikiwa: {reason}. "
    "Chama kitawasiliana nawe. Kumb: {ref}.",
    "dispute_opened": "Malalamiko yako {ref} kuhusu malipo {payment_ref} ({coop}) yamepokelewa. "
    "Tutakujulisha.",
    "dispute_updated": "Malalamiko {ref} kuhusu malipo {payment_ref}: {status}.",
    "dispute_resolved": "Malalamiko {ref} kuhusu malipo {payment_ref} yamefungwa: {status}. Asante.",
    # As refund_completed and refund_failed: the refund's reference last.
    "refund_status": "Kurudisha {amount} ya malipo {payment_ref} ({coop}): {status}. Kumb: {ref}.",
    "dispute_status": "Malalamiko {ref} kuhusu malipo {payment_ref} ({amount}, {coop}): {status}.",
    # The verb agrees with "malipo", not with the type's or the cooperative's name: their noun class is any.
    "payment_reminder": "Kumbusho: malipo ya {type} ({amount}) kwa {coop} yanadaiwa tarehe {due}. "
    "Piga {dial} kulipa.",
    "member_approved": "Karibu! Sasa wewe ni mwanachama wa {coop}. Piga {dial} kulipa.",
    "webhook_disabled": "{coop}: webhook ya {host} imezimwa baada ya kushindwa mara {failures}. "
    "Iwashe tena kupitia API.",
    "help": "Piga {dial} kulipa. SMS: {kw}RISITI <kumb>, {kw}HALI <kumb>, {kw}SALIO, "
    "{kw}SITISHA (kusimamisha vikumbusho), {kw}ANZA.",
    "help_inactive": "Uanachama wako hauko hai, huwezi kulipa kwa simu. Wasiliana na chama chako. "
    "SMS: {kw}RISITI <kumb>, {kw}HALI <kumb>.",
    "help_suspended": "Uanachama wako hauko hai, huwezi kulipa kwa simu. Wasiliana na chama chako.",
    "not_found": "Hakuna malipo {ref} kwa namba hii ya simu.",
    "no_reference_status": "Tuma {kw}HALI ikifuatiwa na kumbukumbu, mfano {kw}HALI PAY_20260115_001.",
    "no_reference_receipt": "Tuma {kw}RISITI ikifuatiwa na kumbukumbu, mfano {kw}RISITI PAY_20260115_001.",
    "opted_out": "Hutapokea vikumbusho tena. Risiti zitaendelea. Tuma {kw}ANZA kuvirudisha.",
    "opted_in": "Vikumbusho vimerudishwa. Tuma {kw}SITISHA kuvizima.",
    "unknown": "Hatukuelewa. Tuma {kw}MSAADA au piga {dial}.",
    "unknown_inactive": "Hatukuelewa. Uanachama wako hauko hai: wasiliana na chama chako. Tuma {kw}MSAADA.",
    "balance": "Kiasi cha kulipa ({coop}): {items}. Piga {dial} kulipa.",
    "not_member": "Namba hii ya simu haijasajiliwa na chama chochote. Wasiliana na chama chako.",
}

# A payment's {amount} when the provider took less or more than was asked (templates.amount_text).
AMOUNT_TAKEN = {
    "less": "{collected} kati ya {amount}",
    "more": "{collected} (ombi {amount})",  # "ombi" (request), as USSD's pay.done; "badala ya": two SMS
}

# A payment's {amount} when the provider reported money taken that cannot be counted (en.py AMOUNT_IN_REVIEW).
AMOUNT_IN_REVIEW = "pesa (zitachunguzwa na chama chako)"


PAYMENT_STATUS = {
    "PENDING": "inasubiri uthibitisho wako",
    "PROCESSING": "inashughulikiwa",
    "COMPLETED": "imelipwa",
    "FAILED": "imeshindwa",
    "CANCELLED": "imeghairiwa",
    "TIMEOUT": "haikuthibitishwa kwa wakati",
    "PARTIALLY_REFUNDED": "imelipwa, sehemu imerudishwa",
    "REFUNDED": "imerudishwa",
    "VOIDED": "haijalipwa: iliandikwa kimakosa",
    "UNCONFIRMED": "haijathibitishwa; ikiwa pesa zilikatwa, itathibitishwa au utarudishiwa",
    "TAKEN_AFTER_FAILURE": "imeshindikana lakini pesa zilikatwa: chama chako kitazihesabu au kitakurudishia",
}

REFUND_STATUS = {
    "PENDING": "inasubiri kutumwa",
    "PROCESSING": "inashughulikiwa",
    "COMPLETED": "imekamilika",
    "FAILED": "imeshindwa",
}

DISPUTE_STATUS = {
    "OPEN": "yamepokelewa",
    "UNDER_REVIEW": "yanachunguzwa",
    "RESOLVED": "yametatuliwa kwa faida yako",
    "REJECTED": "hayakukubaliwa",
    "WITHDRAWN": "yameondolewa",
}

# A recurring type whose amount the member chooses, in a reminder's "{amount}" (as USSD says it).
ANY_AMOUNT = "kiasi chochote"

BALANCE = "salio {balance} kati ya {amount}"

BALANCE_PAID = "imelipwa"
BALANCE_MORE = "+{count} zaidi"
BALANCE_NONE = "hakuna"
BALANCE_WAITING = "{amount} ({waiting} inasubiri uthibitisho wako)"
BALANCE_ALL_WAITING = "{amount} inasubiri uthibitisho wako"

REASONS = {
    "insufficient_funds": "salio halitoshi",
    "declined": "ulikataa ombi",
    "declined_or_not_approved": "ombi lilikataliwa au halikuthibitishwa",
    "cancelled_by_cooperative": "chama chako kimeyaghairi",
    "not_approved": "ombi halikuthibitishwa kwa wakati",
    "limit": "kikomo cha akaunti kimefikiwa",
    "invalid_account": "akaunti haiwezi kupokea malipo haya",
    # payment_failed then says to pay again ("Piga {dial} kulipa tena").
    "other_transaction": "kamilisha au ghairi muamala unaosubiri",
    "provider_error": "tatizo la huduma ya pesa kwa simu",  # as REFUND_REASONS: payment_failed was 162 septets
    "provider_unreachable": "huduma haikupatikana; pesa hazikukatwa",
    "wrong_pin": "PIN uliyoingiza si sahihi",
    "phone_unreachable": "simu yako haikupatikana",
    "unknown": "malipo hayakukamilika",
}

# A failed refund's {reason} (templates.refund_reason_key).
REFUND_REASONS = {
    "not_sent": "marejesho hayakuweza kutumwa",
    "receiving_account": "akaunti yako haikuweza kuyapokea",
    "provider_error": "tatizo la huduma ya pesa kwa simu",
}

KEYWORDS = {
    "RECEIPT": ("RISITI",),
    "STATUS": ("HALI",),
    "HELP": ("MSAADA",),
    "STOP": ("SITISHA",),
    "START": ("ANZA",),
    "BALANCE": ("SALIO",),
}
