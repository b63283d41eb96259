"""Typed domain errors that the edges translate into HTTP answers or USSD text."""

from __future__ import annotations


class DomainError(Exception):
    """Base class: a request the domain refuses; never a server fault.

    `code`: the machine-readable reason the API's error answer carries (UPPER_SNAKE_CASE, stable: integrators
    branch on it, not on the English message): the class's default unless the raise names a finer one
    (IDEMPOTENCY_KEY_REUSED). Every code the API answers is in CODES, below."""

    status = 422
    code = "BUSINESS_RULE_VIOLATED"

    def __init__(self, message: str, *, field: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        if code is not None:
            self.code = code


class ValidationError(DomainError):
    status = 400
    code = "VALIDATION_FAILED"

    def __init__(self, message: str, *, field: str | None = None, errors: list[str] | None = None,
                 code: str | None = None) -> None:
        super().__init__(message, field=field, code=code)
        self.errors = errors or [message]


class NotFound(DomainError):
    status = 404
    code = "NOT_FOUND"


class Conflict(DomainError):
    status = 409
    code = "CONFLICT"


class Forbidden(DomainError):
    status = 403
    code = "FORBIDDEN"


class BusinessRuleError(DomainError):
    status = 422
    code = "BUSINESS_RULE_VIOLATED"


class ServiceUnavailable(DomainError):
    status = 503
    code = "SERVICE_UNAVAILABLE"


# The code of an error answer that names none (an HTTP-level refusal, a fault): its status's, as the classes have.
STATUS_CODES = {
    400: "VALIDATION_FAILED", 401: "UNAUTHORIZED", 403: "FORBIDDEN", 404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED",
    408: "REQUEST_TIMEOUT", 409: "CONFLICT", 413: "BODY_TOO_LARGE", 415: "UNSUPPORTED_MEDIA_TYPE",
    422: "BUSINESS_RULE_VIOLATED", 429: "RATE_LIMITED", 500: "INTERNAL_ERROR", 503: "SERVICE_UNAVAILABLE",
}


def status_code(status: int) -> str:
    """The default `code` of an error answer of `status` (another 4xx is the request's fault, another 5xx ours)."""
    return STATUS_CODES.get(status) or ("VALIDATION_FAILED" if status < 500 else "INTERNAL_ERROR")


# The finer codes raise sites name.
IDEMPOTENCY_KEY_REUSED = "IDEMPOTENCY_KEY_REUSED"
IDEMPOTENCY_KEY_IN_FLIGHT = "IDEMPOTENCY_KEY_IN_FLIGHT"
IDEMPOTENCY_KEY_OTHER_CALLER = "IDEMPOTENCY_KEY_OTHER_CALLER"
PAYMENT_ALREADY_RECORDED = "PAYMENT_ALREADY_RECORDED"
INVALID_STATE = "INVALID_STATE"
REFUND_EXCEEDS_REFUNDABLE = "REFUND_EXCEEDS_REFUNDABLE"
PARTIAL_REFUND_UNSUPPORTED = "PARTIAL_REFUND_UNSUPPORTED"
DUPLICATE_REFERENCE = "DUPLICATE_REFERENCE"
MEMBER_NOT_FOUND = "MEMBER_NOT_FOUND"
MEMBER_NOT_ACTIVE = "MEMBER_NOT_ACTIVE"
MEMBER_PHONE_TAKEN = "MEMBER_PHONE_TAKEN"
PAYMENT_METHOD_NOT_AVAILABLE = "PAYMENT_METHOD_NOT_AVAILABLE"
PAYMENT_ACCOUNT_NOT_ACCEPTED = "PAYMENT_ACCOUNT_NOT_ACCEPTED"
PROVIDER_REFUSED = "PROVIDER_REFUSED"
WEBHOOK_URL_TAKEN = "WEBHOOK_URL_TAKEN"
NAME_TAKEN = "NAME_TAKEN"
DISPUTE_ALREADY_OPEN = "DISPUTE_ALREADY_OPEN"
SCOPE_MISSING = "SCOPE_MISSING"
TOKEN_EXPIRED = "TOKEN_EXPIRED"
TOKEN_INVALID = "TOKEN_INVALID"
ACCOUNT_LOCKED = "ACCOUNT_LOCKED"
PAYING_NUMBER_CHANGED = "PAYING_NUMBER_CHANGED"
PAYING_NUMBER_UNKNOWN = "PAYING_NUMBER_UNKNOWN"
MEMBER_ERASED = "MEMBER_ERASED"
CONCURRENT_CHANGE = "CONCURRENT_CHANGE"

# Every `code` an API error answer may carry, with what it means (the OpenAPI document's Error schema lists them):
# first each status's default, then the finer ones. Stable: a code is never renamed or given another meaning.
CODES: dict[str, str] = {
    "VALIDATION_FAILED": "400: the request's shape or a value in it is refused (message says which)",
    "UNAUTHORIZED": "401: no credentials, a wrong username or password, an unknown or inactive API key",
    "FORBIDDEN": "403: not allowed for this caller (message says why)",
    "NOT_FOUND": "404: no such route or entity, or one not visible to this caller",
    "METHOD_NOT_ALLOWED": "405: the path does not take this method (Allow lists those it takes)",
    "REQUEST_TIMEOUT": "408: the body did not arrive in time; nothing was changed, send it again",
    "CONFLICT": "409: the request conflicts with what is stored (message says how)",
    "BODY_TOO_LARGE": "413: the request body is too large",
    "UNSUPPORTED_MEDIA_TYPE": "415: the body's Content-Type is not one the route takes",
    "BUSINESS_RULE_VIOLATED": "422: a business rule refuses the request (message says which)",
    "RATE_LIMITED": "429: too many requests; wait Retry-After seconds",
    "INTERNAL_ERROR": "500: a fault of the gateway",
    "SERVICE_UNAVAILABLE": "503: the database or Redis is unavailable; nothing was changed, send it again (same "
                           "idempotency key)",
    IDEMPOTENCY_KEY_REUSED: "409: the idempotency key was used for another request (another body, amount or "
                            "member): use a new key for a new request",
    IDEMPOTENCY_KEY_IN_FLIGHT: "409: a request with this idempotency key is still being made: send it again "
                               "shortly to get its answer",
    IDEMPOTENCY_KEY_OTHER_CALLER: "409: the payment under this idempotency key was made by another API key, which "
                                  "this key cannot read",
    PAYMENT_ALREADY_RECORDED: "409: this request's money is recorded already (a payment recorded from the "
                              "provider's statement): it is not collected again",
    INVALID_STATE: "409 or 422: the payment, refund, dispute, member, job or webhook endpoint is in a state that "
                   "does not allow the operation, or one it depends on is (a member's payment still open, a "
                   "payment's open dispute); message names the state. 422: a refund of a payment whose money "
                   "was not collected, or a dispute move its states do not allow (one under review back to OPEN, "
                   "or to its own status without a note); 409 otherwise (a dispute closed already: the message "
                   "says by whom, when and how)",
    REFUND_EXCEEDS_REFUNDABLE: "422: the refund's amount exceeds what is left to refund of the payment (a "
                               "chargeback's, returnedByProvider: what was collected on it), or nothing is left "
                               "(the message says why: refunded in full, by which refunds and chargebacks; held by "
                               "refunds not settled yet, named)",
    PARTIAL_REFUND_UNSUPPORTED: "422: the payment's provider refunds only the full amount",
    DUPLICATE_REFERENCE: "409: the id, reference, gatewayReference or provider transaction id is held already by "
                         "another payment or refund (field names which)",
    MEMBER_NOT_FOUND: "404: the member named (memberId) does not exist in the cooperative, or is not visible",
    MEMBER_NOT_ACTIVE: "422: the member is not ACTIVE (pending or suspended): she cannot pay",
    MEMBER_PHONE_TAKEN: "409: another member of the cooperative has this phone number",
    PAYMENT_METHOD_NOT_AVAILABLE: "400: the payment method is not served here: no provider for it (none routed, "
                                  "or its provider not in the deployment's PROVIDERS: a refund of a payment made "
                                  "through one too), or not a mobile-money wallet of the cooperative's country",
    PAYMENT_ACCOUNT_NOT_ACCEPTED: "400: the paymentAccount number is not a wallet the method collects from: "
                                  "another country's number, or another operator's",
    PROVIDER_REFUSED: "400 or 409: the provider would refuse it, checked before anything is sent: a currency or "
                      "an amount it does not take, a refund it cannot be sent",
    WEBHOOK_URL_TAKEN: "409: an ACTIVE webhook endpoint of the cooperative has this URL already",
    NAME_TAKEN: "409: the name is another's already (field names it): a payment type's name in the cooperative, an "
                "account's username (in any case), a cooperative's shortCode or ussdExtension",
    DISPUTE_ALREADY_OPEN: "409: a dispute of the payment is open already (message names it): add a note "
                          "to it with POST /v1/disputes/{id}/transitions",
    SCOPE_MISSING: "403: the API key lacks the scope the route needs (message names it)",
    TOKEN_EXPIRED: "401: the access or refresh token has expired: refresh it, or sign in again",
    TOKEN_INVALID: "401: the token is malformed, not signed by the gateway, revoked or already used: sign in again",
    ACCOUNT_LOCKED: "429: too many failed sign-ins for this account; wait Retry-After seconds",
    PAYING_NUMBER_CHANGED: "409: the payment was paid from a number that is no longer its member's: the refund "
                           "would go back to that number; send it with toPayingNumber: true, or pay her another "
                           "way and record it with returnedByProvider",
    PAYING_NUMBER_UNKNOWN: "409: the payment was recorded from a statement line without the number that paid it "
                           "(paymentAccount \"unknown\": its member's number changed, or was released, since): "
                           "nothing can be sent; have the provider send the money back and record it with "
                           "returnedByProvider",
    MEMBER_ERASED: "409: the payment's member was erased: the number to refund is no longer known, and nothing can "
                   "be sent; have the provider send the money back and record it with returnedByProvider",
    CONCURRENT_CHANGE: "409: what the request depends on was being changed by another at that moment (a dispute of "
                       "the payment opened as its refund was made, or opened and changed as a refund's outcome or a "
                       "chargeback was recorded or a member erased): nothing was changed; send it again (a refund: the "
                       "same idempotency key)",
}
