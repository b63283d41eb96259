"""Typed domain errors that the edges translate into HTTP answers or USSD text."""

from __future__ import annotations


class DomainError(Exception):
    """Base class: a request the domain refuses; never a server fault."""

    status = 422
    code = "Unprocessable Entity"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class ValidationError(DomainError):
    status = 400
    code = "Bad Request"

    def __init__(self, message: str, *, field: str | None = None, errors: list[str] | None = None) -> None:
        super().__init__(message, field=field)
        self.errors = errors or [message]


class NotFound(DomainError):
    status = 404
    code = "Not Found"


class Conflict(DomainError):
    status = 409
    code = "Conflict"


class Forbidden(DomainError):
    status = 403
    code = "Forbidden"


class BusinessRuleError(DomainError):
    status = 422
    code = "Unprocessable Entity"


class ServiceUnavailable(DomainError):
    status = 503
    code = "Service Unavailable"
