"""English SMS texts."""

MESSAGES = {
    # One SMS for the usual receipt (a 30-character cooperative name, GHS 1,234.56: 163 septets, two SMS, when it
    # said "Transaction:" and "Date:"): "Txn", and a date that needs no label. "We received", no closing thanks: one
    # SMS too when the provider took another amount than asked (AMOUNT_TAKEN, both amounts: 175 septets before).
    "payment_receipt": "We received {amount} for {type}, {coop}. Ref: {ref}. Txn: {txn}. {date}.",
    # The receipt she (or her cooperative's desk) asks for once part or all of the money went back: what was received
    # and what was refunded since, so the SMS is never proof of money the cooperative no longer holds. No cooperative's
    # name, as the late receipt: one SMS with both amounts.
    "payment_receipt_refunded": "We received {amount} for {type}. Refunded since: {refunded}. Ref: {ref}. "
    "Txn: {txn}. {date}.",
    # A payment told failed, cancelled or not approved in time whose money was taken after all (core.provider_events:
    # late). One SMS (248 septets before): "after all" says the earlier message was wrong; no cooperative's name (the
    # type, amount and reference say which payment, and RECEIPT <ref> gives the full receipt); "Txn" and the date as the
    # receipt says them. Worded as the receipt ("We received"), for one SMS too with a seven-digit reference and
    # both amounts (AMOUNT_TAKEN: 175 septets as "Your payment of ... went through after all").
    "payment_late_receipt": "We received {amount} for {type} after all: do not pay again. Ref: {ref}. Txn: {txn}. "
    "{date}.",
    # A FAILED payment whose money the provider then reported taken (core.provider_events, success after a failure): it
    # stays FAILED, the money held until her cooperative counts it or refunds it. Two SMS, rare (tests/channels/sms/
    # test_templates.py TWO_SMS): one would lose the type, the transaction and its date. "Txn" and the date as the
    # receipt says them, for two SMS and not three with a seven-digit reference and both amounts.
    "payment_taken_after_failure": "We said your payment of {amount} for {type} ({coop}) failed, but the money was "
    "taken after all. Do not pay again: your cooperative will count it or refund it. Ref: {ref}. Txn: {txn}. {date}.",
    # One SMS for the usual failure and timeout (a payment the member declined or let lapse: frequent), with a
    # seven-figure amount and the longest usual reason: no cooperative's name (the code to dial is its own; the type,
    # amount and reference say which payment), which made them 165 to 189 septets, two SMS. The rarer reasons too
    # (REASONS: other_transaction, provider_unreachable), worded to fit.
    "payment_failed": "Payment of {amount} for {type} failed: {reason}. Ref: {ref}. Dial {dial} to try again.",
    "payment_timeout": "Payment of {amount} for {type} was not approved in time. Ref: {ref}. "
    "Dial {dial} to try again.",
    # One SMS (199 septets before), as payment_failed: no cooperative's name.
    "payment_unconfirmed": "We could not confirm your payment of {amount} for {type}. "
    "If money was taken, it will be confirmed or refunded. Ref: {ref}.",
    "payment_status": "Payment {ref}: {amount} for {type} ({coop}) - {status}. Date: {date}.",
    "refund_completed": "Refund of {amount} for payment {payment_ref} ({coop}) completed. Ref: {ref}.",
    # One SMS with any REFUND_REASONS (199 septets before): the payment's reference says which cooperative's. The
    # refund's reference first, no "Ref:", for one SMS with seven-digit references (166 septets otherwise).
    "refund_failed": "Refund {ref} of {amount} (payment {payment_ref}) failed: {reason}. "
    "Your cooperative will contact you.",
    "dispute_opened": "Your dispute {ref} about payment {payment_ref} ({coop}) is registered. "
    "We will keep you informed.",
    "dispute_updated": "Dispute {ref} about payment {payment_ref}: {status}.",
    "dispute_resolved": "Dispute {ref} about payment {payment_ref} is closed: {status}. Thank you.",
    # STATUS <ref> of one of her refunds or disputes (the references their SMS gave her): its status, the payment it
    # is of and its amount (a dispute's: the payment's). One SMS with seven-digit references and the longest status.
    "refund_status": "Refund {ref} of {amount} for payment {payment_ref} ({coop}): {status}.",
    "dispute_status": "Dispute {ref} about payment {payment_ref} of {amount} ({coop}): {status}.",
    "payment_reminder": "Reminder: {type} ({amount}) for {coop} is due on {due}. Dial {dial} to pay.",
    "member_approved": "Welcome! You are now a member of {coop}. To pay, dial {dial}.",
    "webhook_disabled": "{coop}: webhook to {host} was disabled after {failures} failed deliveries. "
    "Re-enable it in the API.",
    "help": "Dial {dial} to pay. SMS: {kw}RECEIPT <ref>, {kw}STATUS <ref>, {kw}BALANCE, "
    "{kw}STOP (no reminders), {kw}START.",
    # HELP from a member who cannot pay (suspended, or her cooperative is): no code to dial that cannot work.
    "help_inactive": "Your membership is not active, so you cannot pay by phone. Please contact your cooperative. "
    "SMS: {kw}RECEIPT <ref>, {kw}STATUS <ref>.",
    # The same to a suspended member: her RECEIPT and STATUS are not answered (her number may be someone else's).
    "help_suspended": "Your membership is not active, so you cannot pay by phone. Please contact your cooperative.",
    "not_found": "No payment {ref} found for this phone number.",
    # STATUS or RECEIPT without a reference (the keyword alone, or words that are none): how to ask.
    "no_reference_status": "Send {kw}STATUS followed by the reference, e.g. {kw}STATUS PAY_20260115_001.",
    "no_reference_receipt": "Send {kw}RECEIPT followed by the reference, e.g. {kw}RECEIPT PAY_20260115_001.",
    "opted_out": "You will no longer get reminders. Receipts still come. Send {kw}START to get them again.",
    "opted_in": "Reminders are on again. Send {kw}STOP to turn them off.",
    "unknown": "Sorry, we did not understand. Send {kw}HELP or dial {dial}.",
    # Not understood, from a member who cannot pay (as help_inactive): no code to dial that cannot work.
    "unknown_inactive": "Sorry, we did not understand. Your membership is not active: please contact your "
    "cooperative. Send {kw}HELP.",
    # BALANCE: what she still owes this period of each fixed-amount recurring type (templates.balance_items).
    "balance": "Still to pay this period ({coop}): {items}. Dial {dial} to pay.",
    # A keyword about her membership (BALANCE) from a number no member has.
    "not_member": "This phone number is not registered with any cooperative. Please contact your cooperative.",
}

# A payment's {amount} when the provider took less or more than was asked (templates.amount_text).
AMOUNT_TAKEN = {
    "less": "{collected} of {amount}",
    "more": "{collected} ({amount} due)",  # "asked": the receipt was 162 septets with a seven-digit reference
}

# A payment's {amount} when the provider reported money taken that cannot be counted as the amount asked (another
# currency, a negative or zero amount: collected 0, flagged for a person, templates.amount_text): received, and
# her cooperative reviews it, with no figure ("0 RWF of 50,000 RWF" said nothing was taken from a charged wallet).
AMOUNT_IN_REVIEW = "an amount (under review by your cooperative)"


PAYMENT_STATUS = {
    "PENDING": "waiting for your approval",
    "PROCESSING": "being processed",
    "COMPLETED": "paid",
    "FAILED": "failed",
    "CANCELLED": "cancelled",
    "TIMEOUT": "not approved in time",
    "PARTIALLY_REFUNDED": "paid, partly refunded",
    "REFUNDED": "refunded",
    "VOIDED": "not paid: recorded in error",
    "UNCONFIRMED": "not confirmed by the provider; if money was taken it will be confirmed or refunded",
    "TAKEN_AFTER_FAILURE": "failed, but the money was taken: your cooperative will count it or refund it",
}

# A refund's {status} in refund_status (STATUS <its reference>).
REFUND_STATUS = {
    "PENDING": "waiting to be sent",
    "PROCESSING": "being sent",
    "COMPLETED": "completed",
    "FAILED": "failed",
}

DISPUTE_STATUS = {
    "OPEN": "received",
    "UNDER_REVIEW": "under review",
    "RESOLVED": "resolved in your favour",
    "REJECTED": "not accepted",
    "WITHDRAWN": "withdrawn",
}

# A recurring type whose amount the member chooses, in a reminder's "{amount}" (as USSD says it).
ANY_AMOUNT = "any amount"

# A fixed amount the provider took only part of this period, in a reminder's "{amount}": what is left to pay,
# and the price.
BALANCE = "balance {balance} of {amount}"

# The BALANCE reply's {items}: a type paid this period, the types left out ("+2 more"), and none to list.
BALANCE_PAID = "paid"
BALANCE_MORE = "+{count} more"
BALANCE_NONE = "nothing"
# A type of which a payment is still open (awaiting her PIN): what it asks, beside what is left to pay; the
# amount left once, when the open payment asks all of it (the usual case: USSD offers the balance).
BALANCE_WAITING = "{amount} ({waiting} awaiting approval)"
BALANCE_ALL_WAITING = "{amount} awaiting approval"

REASONS = {
    "insufficient_funds": "not enough money on the account",
    "declined": "you declined the request",
    "declined_or_not_approved": "the request was declined or not approved",
    "cancelled_by_cooperative": "your cooperative cancelled it",
    "not_approved": "the request was not approved in time",
    "limit": "an account limit was reached",
    "invalid_account": "the account cannot receive this payment",
    # M-Pesa's 1001: a prompt of another payment is still open on her phone; M-Pesa takes one at a time. Then she
    # pays again: payment_failed ends "Dial {dial} to try again". This one and the unreachable provider as short as
    # the others, for one SMS with a seven-digit reference (161 and 162 septets as "another transaction is open:
    # finish or cancel it", "mobile money was unreachable; ...").
    "other_transaction": "finish or cancel your other transaction",
    "provider_error": "the mobile money service had a problem",
    "provider_unreachable": "mobile money unreachable; nothing was taken",
    "wrong_pin": "the PIN entered was wrong",
    "phone_unreachable": "your phone could not be reached",
    "unknown": "the payment was not completed",
}

# A failed refund's {reason} (templates.refund_reason_key): its own set, never the payment's (in a refund the
# member declined nothing, and an account short of money is the cooperative's).
REFUND_REASONS = {
    "not_sent": "the refund could not be sent",
    "receiving_account": "your account could not receive it",
    "provider_error": "the mobile money service had a problem",
}

KEYWORDS = {
    "RECEIPT": ("RECEIPT",),
    "STATUS": ("STATUS",),
    "HELP": ("HELP",),
    "STOP": ("STOP",),
    "START": ("START",),
    "BALANCE": ("BALANCE", "BAL"),
}
