"""Kinyarwanda SMS texts."""

MESSAGES = {
    # One SMS for the usual receipt, as in English (a 30-character cooperative name, GHS 1,234.56: 169 septets, two
    # SMS, with "Itariki:" and "Murakoze!"): a date that needs no label. The provider's transaction beside the
    # reference, not after "Nimero y'ihererekanya:", for one SMS too when the provider took another amount than asked
    # (AMOUNT_TAKEN, both amounts: 177 septets before).
    "payment_receipt": "Twakiriye {amount} ya {type}, {coop}. Nimero: {ref} ({txn}). {date}.",
    "payment_receipt_refunded": "Twakiriye {amount} ya {type}. Byasubijwe nyuma: {refunded}. Nimero: {ref} ({txn}). "
    "{date}.",
    # One SMS (261 septets before), as in English: no cooperative's name, "nyuma" (after all) for "ignore our earlier
    # message". "Twakiriye" as the receipt, for one SMS with a seven-digit reference and both amounts (186 septets as
    # "Kwishyura ... byakunze nyuma: amafaranga yavuyeho").
    "payment_late_receipt": "Twakiriye {amount} ya {type} nyuma: ntimwongere kwishyura. Nimero: {ref} ({txn}). "
    "{date}.",
    # Two SMS (en.py): the provider's transaction beside the reference as in the receipt, for two and not three.
    "payment_taken_after_failure": "Kwishyura {amount} ya {type} ({coop}) twababwiye ko byanze, ariko amafaranga "
    "yavuye kuri konti yawe. Ntimwongere kwishyura: koperative yawe izayabara cyangwa izayagusubiza. "
    "Nimero: {ref} ({txn}). {date}.",
    # One SMS for the usual failure and timeout (en.py): no cooperative's name. "Ongera ukande" (dial again), not
    # "Ongera ugerageze ukanda" (try again, dialling), for the rarer reasons to fit too; no closing full stop, for the
    # unreachable provider to fit with a seven-digit reference (161 septets).
    "payment_failed": "Kwishyura {amount} ya {type} ntibyakunze: {reason}. Nimero: {ref}. Ongera ukande {dial}",
    "payment_timeout": "Kwishyura {amount} ya {type} ntibyemejwe ku gihe. Nimero: {ref}. "
    "Ongera ugerageze ukanda {dial}.",
    # One SMS (198 septets before): no cooperative's name, "yavuyeho" as PAYMENT_STATUS["UNCONFIRMED"].
    "payment_unconfirmed": "Ntitwashoboye kwemeza kwishyura {amount} ya {type}. Niba amafaranga "
    "yavuyeho, tuzabyemeza cyangwa tuyagusubize. Nimero: {ref}.",
    "payment_status": "Kwishyura {ref}: {amount} ya {type} ({coop}) - {status}. Itariki: {date}.",
    "refund_completed": "Twagusubije {amount} yo kwishyura {payment_ref} ({coop}). Nimero: {ref}.",
    # One SMS with any REFUND_REASONS (203 septets before): no cooperative's name; "Koperative", not "Koperative
    # yawe", for seven-digit references (168 septets).
    "refund_failed": "Gusubizwa {amount} yo kwishyura {payment_ref} ntibyakunze: {reason}. "
    "Koperative izakuvugisha. Nimero: {ref}.",
    "dispute_opened": "Ikirego cyawe {ref} ku kwishyura {payment_ref} ({coop}) cyakiriwe. Tuzakumenyesha.",
    "dispute_updated": "Ikirego {ref} ku kwishyura {payment_ref}: {status}.",
    "dispute_resolved": "Ikirego {ref} ku kwishyura {payment_ref} cyarangiye: {status}. Murakoze.",
    # As refund_completed and refund_failed: the refund's reference last; the amounts in brackets, as no connective
    # after them then has to agree with anything.
    "refund_status": "Gusubizwa {amount} yo kwishyura {payment_ref} ({coop}): {status}. Nimero: {ref}.",
    "dispute_status": "Ikirego {ref} ku kwishyura {payment_ref} ({amount}, {coop}): {status}.",
    # No verb or connective agrees with the type's or the cooperative's name: their noun class is any.
    "payment_reminder": "Kwibutsa: kwishyura {type} ({amount}) muri {coop} bitarenze ku wa {due}. "
    "Kanda {dial} wishyure.",
    "member_approved": "Murakaza neza! Ubu uri umunyamuryango wa {coop}. Kanda {dial} wishyure.",
    "webhook_disabled": "{coop}: webhook ya {host} yahagaritswe nyuma yo kunanirwa inshuro {failures}. "
    "Yisubizeho muri API.",
    "help": "Kanda {dial} wishyure. SMS: {kw}INYEMEZABWISHYU <nimero>, {kw}IMIMERERE <nimero>, {kw}ASIGAYE, "
    "{kw}HAGARIKA, {kw}TANGIRA.",
    "help_inactive": "Ubunyamuryango bwawe ntibukora: ntushobora kwishyura kuri telefoni. Gana koperative yawe. "
    "SMS: {kw}INYEMEZABWISHYU <nimero>, {kw}IMIMERERE <nimero>.",
    "help_suspended": "Ubunyamuryango bwawe ntibukora: ntushobora kwishyura kuri telefoni. Gana koperative yawe.",
    "not_found": "Nta kwishyura {ref} kwabonetse kuri iyi nimero ya telefone.",
    "no_reference_status": "Ohereza {kw}IMIMERERE ukurikizaho nimero y'ubwishyu, "
    "urugero {kw}IMIMERERE PAY_20260115_001.",
    "no_reference_receipt": "Ohereza {kw}INYEMEZABWISHYU ukurikizaho nimero y'ubwishyu, "
    "urugero {kw}INYEMEZABWISHYU PAY_20260115_001.",
    "opted_out": "Ntuzongera kubona ubutumwa bwo kwibutsa. Inyemezabwishyu zizakomeza. "
    "Ohereza {kw}TANGIRA kubisubizaho.",
    "opted_in": "Ubutumwa bwo kwibutsa bwasubijweho. Ohereza {kw}HAGARIKA kubihagarika.",
    "unknown": "Ntitwabyumvise. Ohereza {kw}UBUFASHA cyangwa ukande {dial}.",
    "unknown_inactive": "Ntitwabyumvise. Ubunyamuryango bwawe ntibukora: gana koperative yawe. Ohereza {kw}UBUFASHA.",
    "balance": "Ibyo usigaje kwishyura ({coop}): {items}. Kanda {dial} wishyure.",
    "not_member": "Iyi nimero ya telefone ntiyanditse muri koperative. Gana koperative yawe.",
}

# A payment's {amount} when the provider took less or more than was asked (templates.amount_text).
AMOUNT_TAKEN = {
    "less": "{collected} aho kuba {amount}",
    "more": "{collected} aho kuba {amount}",
}

# A payment's {amount} when the provider reported money taken that cannot be counted (en.py AMOUNT_IN_REVIEW):
# "amafaranga" (class 6), as "izayabara" in payment_taken_after_failure; "ya {type}" agrees with it.
AMOUNT_IN_REVIEW = "amafaranga (koperative yawe izayasuzuma)"


PAYMENT_STATUS = {
    "PENDING": "dutegereje ko wemeza",
    "PROCESSING": "biri gukorwa",
    "COMPLETED": "byishyuwe",
    "FAILED": "ntibyakunze",
    "CANCELLED": "byahagaritswe",
    "TIMEOUT": "ntibyemejwe ku gihe",
    "PARTIALLY_REFUNDED": "byishyuwe, igice cyasubijwe",
    "REFUNDED": "byasubijwe",
    "VOIDED": "ntibyishyuwe: byanditswe ku makosa",
    "UNCONFIRMED": "ntibiremezwa; niba amafaranga yavuyeho, tuzabyemeza cyangwa tuyagusubize",
    "TAKEN_AFTER_FAILURE": "ntibyakunze ariko amafaranga yavuyeho: koperative yawe izayabara cyangwa izayagusubiza",
}

REFUND_STATUS = {
    "PENDING": "bitegereje koherezwa",
    "PROCESSING": "biri gukorwa",
    "COMPLETED": "byarangiye",
    "FAILED": "ntibyakunze",
}

DISPUTE_STATUS = {
    "OPEN": "cyakiriwe",
    "UNDER_REVIEW": "kiri gusuzumwa",
    "RESOLVED": "cyakemuwe uko wabisabye",
    "REJECTED": "nticyemewe",
    "WITHDRAWN": "cyakuweho",
}

# A recurring type whose amount the member chooses, in a reminder's "{amount}" (as USSD says it).
ANY_AMOUNT = "amafaranga ushaka"

BALANCE = "asigaye {balance} kuri {amount}"

BALANCE_PAID = "byishyuwe"
BALANCE_MORE = "+{count} ibindi"
BALANCE_NONE = "nta na kimwe"
BALANCE_WAITING = "{amount} ({waiting} dutegereje ko wemeza)"
BALANCE_ALL_WAITING = "{amount} dutegereje ko wemeza"

REASONS = {
    "insufficient_funds": "amafaranga ntahagije kuri konti",
    "declined": "wanze kwemeza",
    "declined_or_not_approved": "ubusabe bwanzwe cyangwa ntibwemejwe",
    "cancelled_by_cooperative": "koperative yawe yabuhagaritse",
    "not_approved": "ntiwemeje ku gihe",
    "limit": "konti yageze ku rugero ntarengwa",
    "invalid_account": "konti ntishobora kwakira ubu bwishyu",
    # payment_failed then says to dial again ("Ongera ukande").
    "other_transaction": "emeza cyangwa uhagarike ubundi bwishyu",
    "provider_error": "serivisi ya mobile money yagize ikibazo",
    "provider_unreachable": "serivisi ntiyabonetse; nta mafaranga yakuweho",
    "wrong_pin": "PIN winjije si yo",
    "phone_unreachable": "telefoni yawe ntiyabonetse",
    "unknown": "ubwishyu ntibwarangiye",
}

# A failed refund's {reason} (templates.refund_reason_key).
REFUND_REASONS = {
    "not_sent": "amafaranga ntiyashoboye koherezwa",
    "receiving_account": "konti yawe ntishobora kuyakira",
    "provider_error": "ikibazo cya mobile money",  # "cya serivisi ya": refund_failed was 163 septets
}

KEYWORDS = {
    # INYEMEZABWISHYU is the USSD menu's word for the receipt (ussd/locale/rw.json), the one the help names.
    "RECEIPT": ("INYEMEZABWISHYU", "INYEMEZABUGUZI", "INYEMEZA"),
    "STATUS": ("IMIMERERE",),
    "HELP": ("UBUFASHA",),
    "STOP": ("HAGARIKA",),
    "START": ("TANGIRA",),
    "BALANCE": ("ASIGAYE",),
}
