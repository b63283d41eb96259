"""French SMS texts (no ç, ê, û: they would force UCS-2 and cost twice as much).

A space before ":", as French writes it and the French USSD screens show it ("Réf : PAY_..."): the SMS wrote "Réf:"
where the screen she paid on wrote "Réf :". It costs a septet each; refund_failed was reworded to stay one SMS.
The same space before "!", "?" and ";" ("Bienvenue !"): a plain one, as a non-breaking space is not GSM-7 and would
make the SMS UCS-2."""

MESSAGES = {
    # One SMS for the usual receipt, as in English (a 30-character cooperative name, GHS 1 234,56: 161 septets, two
    # SMS, with "Date:" and "Merci!"): a date that needs no label. "Payé :", not "Paiement confirmé :", for one SMS too
    # when the provider took another amount than asked (AMOUNT_TAKEN, both amounts: 177 septets before).
    # The provider's transaction beside the reference, as in Kinyarwanda, not after "Transaction:": one SMS with a
    # seven-digit reference and both amounts (164 septets).
    "payment_receipt": "Payé : {amount} pour {type}, {coop}. Réf : {ref} ({txn}). {date}.",
    "payment_receipt_refunded": "Payé : {amount} pour {type}. Remboursé depuis : {refunded}. Réf : {ref} ({txn}). "
    "{date}.",
    # One SMS (261 septets before), as in English: no cooperative's name; "finalement" says the earlier message was
    # wrong. "Finalement payé :" as the receipt's "Payé :", for one SMS with both amounts (182 septets as "Paiement de
    # ... a finalement abouti").
    "payment_late_receipt": "Finalement payé : {amount} pour {type}. Ne payez pas à nouveau. Réf : {ref} ({txn}). "
    "{date}.",
    # Two SMS (en.py): the provider's transaction beside the reference as in the receipt, for two and not three.
    "payment_taken_after_failure": "Votre paiement de {amount} pour {type} ({coop}), annoncé comme échoué, a "
    "finalement été prélevé. Ne payez pas à nouveau : votre coopérative le comptera ou vous le remboursera. "
    "Réf : {ref} ({txn}). {date}.",
    # One SMS for the usual failure and timeout (en.py): no cooperative's name, "Votre" dropped. "Recomposez" (dial
    # again), not "Pour réessayer, composez": one SMS with a seven-digit reference and the rarer reasons (164 septets).
    "payment_failed": "Paiement de {amount} pour {type} a échoué : {reason}. Réf : {ref}. Recomposez {dial}.",
    "payment_timeout": "Paiement de {amount} pour {type} n'a pas été approuvé à temps. Réf : {ref}. "
    "Recomposez {dial}.",
    # One SMS (219 septets before): no cooperative's name. "Tout prélèvement", not "Si l'argent a été prélevé, il":
    # one SMS with a seven-digit reference (161 septets).
    "payment_unconfirmed": "Paiement de {amount} pour {type} non confirmé par l'opérateur. "
    "Tout prélèvement sera confirmé ou remboursé. Réf : {ref}.",
    "payment_status": "Paiement {ref} : {amount} pour {type} ({coop}) - {status}. Date : {date}.",
    "refund_completed": "Remboursement de {amount} effectué pour le paiement {payment_ref} ({coop}). "
    "Réf : {ref}.",
    # One SMS with any REFUND_REASONS (218 septets before): no cooperative's name. The refund's reference first, no
    # "Réf :", for one SMS with seven-digit references (168 septets as "Échec du remboursement de ..."). "La
    # coopérative", not "Votre coopérative": the space before the colon made it 161 septets with the longest reason.
    "refund_failed": "Remboursement {ref} de {amount} (paiement {payment_ref}) échoué : {reason}. "
    "La coopérative vous contactera.",
    "dispute_opened": "Votre réclamation {ref} sur le paiement {payment_ref} ({coop}) est enregistrée. "
    "Nous vous tiendrons informé.",
    "dispute_updated": "Réclamation {ref} sur le paiement {payment_ref} : {status}.",
    "dispute_resolved": "Réclamation {ref} sur le paiement {payment_ref} close : {status}. Merci.",
    "refund_status": "Remboursement {ref} de {amount} pour le paiement {payment_ref} ({coop}) : {status}.",
    # The amount in brackets, as rw and sw: "de {amount}" read "de un montant" for AMOUNT_IN_REVIEW.
    "dispute_status": "Réclamation {ref} sur le paiement {payment_ref} ({amount}, {coop}) : {status}.",
    "payment_reminder": (
        "Rappel : {type} ({amount}) pour {coop}, échéance le {due}. Composez {dial} pour payer."
    ),
    "member_approved": "Bienvenue ! Votre adhésion à {coop} est approuvée. Pour payer, composez {dial}.",
    "webhook_disabled": "{coop} : le webhook vers {host} est désactivé après {failures} échecs. "
    "Réactivez-le via l'API.",
    "help": "Composez {dial} pour payer. SMS : {kw}RECU <réf>, {kw}STATUT <réf>, {kw}SOLDE, "
    "{kw}STOP (fin des rappels), {kw}START.",
    "help_inactive": "Votre adhésion n'est pas active : pas de paiement par téléphone. Contactez votre coopérative. "
    "SMS : {kw}RECU <réf>, {kw}STATUT <réf>.",
    "help_suspended": "Votre adhésion n'est pas active : pas de paiement par téléphone. Contactez votre coopérative.",
    "not_found": "Aucun paiement {ref} trouvé pour ce numéro.",
    "no_reference_status": "Envoyez {kw}STATUT suivi de la référence, ex. {kw}STATUT PAY_20260115_001.",
    "no_reference_receipt": "Envoyez {kw}RECU suivi de la référence, ex. {kw}RECU PAY_20260115_001.",
    "opted_out": "Vous ne recevrez plus de rappels. Les confirmations de paiement continuent. "
    "Envoyez {kw}START pour les rappels.",
    "opted_in": "Rappels réactivés. Envoyez {kw}STOP pour ne plus les recevoir.",
    "unknown": "Message non compris. Envoyez {kw}AIDE ou composez {dial}.",
    "unknown_inactive": "Message non compris. Votre adhésion n'est pas active : contactez votre coopérative. "
    "Envoyez {kw}AIDE.",
    "balance": "Reste à payer ({coop}) : {items}. Composez {dial}.",
    "not_member": "Ce numéro n'est inscrit dans aucune coopérative. Contactez votre coopérative.",
}

# A payment's {amount} when the provider took less or more than was asked (templates.amount_text).
AMOUNT_TAKEN = {
    "less": "{collected} sur {amount}",
    "more": "{collected} et non {amount}",  # "({amount} demandés)": the receipt was two SMS
}

# A payment's {amount} when the provider reported money taken that cannot be counted (en.py AMOUNT_IN_REVIEW).
AMOUNT_IN_REVIEW = "un montant (à vérifier par votre coopérative)"


PAYMENT_STATUS = {
    "PENDING": "en attente de votre approbation",
    "PROCESSING": "en cours",
    "COMPLETED": "payé",
    "FAILED": "échoué",
    "CANCELLED": "annulé",
    "TIMEOUT": "non approuvé à temps",
    "PARTIALLY_REFUNDED": "payé, remboursé en partie",
    "REFUNDED": "remboursé",
    "VOIDED": "non payé : enregistré par erreur",
    "UNCONFIRMED": "non confirmé par l'opérateur ; si l'argent a été prélevé, il sera confirmé ou remboursé",
    "TAKEN_AFTER_FAILURE": "échoué, mais l'argent a été prélevé : votre coopérative le comptera ou vous le remboursera",
}

REFUND_STATUS = {
    "PENDING": "en attente d'envoi",
    "PROCESSING": "en cours",
    "COMPLETED": "effectué",
    "FAILED": "échoué",
}

DISPUTE_STATUS = {
    "OPEN": "enregistrée",  # as dispute_opened says it; "reçue" is not GSM-7
    "UNDER_REVIEW": "en cours d'examen",
    "RESOLVED": "résolue en votre faveur",
    "REJECTED": "non retenue",
    "WITHDRAWN": "retirée",
}

# A recurring type whose amount the member chooses, in a reminder's "{amount}" (as USSD says it).
ANY_AMOUNT = "montant libre"

BALANCE = "reste {balance} sur {amount}"

BALANCE_PAID = "payé"
BALANCE_MORE = "+{count} autre(s)"
BALANCE_NONE = "rien"
BALANCE_WAITING = "{amount} ({waiting} en attente d'approbation)"
BALANCE_ALL_WAITING = "{amount} en attente d'approbation"

REASONS = {
    "insufficient_funds": "solde insuffisant",
    "declined": "vous avez refusé la demande",
    # Short enough for payment_failed to stay one SMS ("non approuvé" as PAYMENT_STATUS["TIMEOUT"] says it).
    "declined_or_not_approved": "demande refusée ou non approuvée",
    "cancelled_by_cooperative": "votre coopérative l'a annulé",
    "not_approved": "demande non approuvée à temps",
    "limit": "une limite du compte est atteinte",
    # The rarer reasons as short, for one SMS too (payment_failed then says to dial again).
    "invalid_account": "le compte ne peut recevoir ce paiement",
    "other_transaction": "terminez ou annulez l'autre transaction",
    "provider_error": "problème du service mobile money",
    "provider_unreachable": "service injoignable, aucun prélèvement",
    "wrong_pin": "le code PIN saisi était erroné",
    "phone_unreachable": "votre téléphone était injoignable",
    "unknown": "le paiement n'a pas abouti",
}

# A failed refund's {reason} (templates.refund_reason_key).
REFUND_REASONS = {
    "not_sent": "l'envoi n'a pas abouti",
    "receiving_account": "votre compte n'a pu le recevoir",
    "provider_error": "problème du service mobile money",
}

KEYWORDS = {
    "RECEIPT": ("RECU", "REÇU", "RECUS"),
    "STATUS": ("STATUT", "ETAT", "ÉTAT"),
    "HELP": ("AIDE",),
    "STOP": ("ARRET", "ARRÊT", "ARRETER"),
    "START": ("REPRENDRE", "DEMARRER"),
    "BALANCE": ("SOLDE",),
}
