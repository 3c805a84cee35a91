"""The error hierarchy. `api/middleware.py` is the one place that maps it to HTTP."""

from __future__ import annotations

from typing import Any


class TokensForgeError(Exception):
    """Base error: carries the SPEC §2 status, code and extra machine-readable fields."""

    status = 500
    code = "internal_error"
    type = "server_error"
    #: retrying cannot fix it: the answer carries x-should-retry: false
    final = False

    def __init__(self, message: str, *, param: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.extra = extra
        self.headers: dict[str, str] = {}

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {
            "message": self.message,
            "type": self.type,
            "code": self.code,
            "param": self.param,
        }
        error.update(self.extra)
        return {"error": error}


class InvalidRequest(TokensForgeError):
    status, code, type, final = 400, "invalid_request", "invalid_request_error", True


class InvalidApiKey(TokensForgeError):
    status, code, type, final = 401, "invalid_api_key", "authentication_error", True


class PermissionDenied(TokensForgeError):
    status, code, type, final = 403, "permission_denied", "permission_error", True


class ModelNotAllowed(PermissionDenied):
    code = "model_not_allowed"


class RouteNotAllowed(PermissionDenied):
    code = "route_not_allowed"


class BudgetExceeded(PermissionDenied):
    code = "budget_exceeded"


class NotFound(TokensForgeError):
    status, code, type, final = 404, "not_found", "invalid_request_error", True


class ModelNotFound(NotFound):
    code = "model_not_found"


class RequestTooLarge(TokensForgeError):
    status, code, type, final = 413, "request_too_large", "invalid_request_error", True


class RateLimited(TokensForgeError):
    status, code, type = 429, "rate_limited", "rate_limit_error"

    def __init__(self, message: str, *, retry_after_s: int, **extra: Any) -> None:
        super().__init__(message, **extra)
        self.headers["retry-after"] = str(retry_after_s)


class UpstreamError(TokensForgeError):
    status, code, type = 502, "upstream_error", "upstream_error"


class NoHealthyChannel(TokensForgeError):
    status, code, type = 503, "no_healthy_channel", "upstream_error"


class UpstreamTimeout(TokensForgeError):
    status, code, type = 504, "upstream_timeout", "upstream_error"


class LedgerError(TokensForgeError):
    """Money could not move as asked."""


class LedgerUnavailable(LedgerError):
    status, code, type = 503, "ledger_unavailable", "server_error"


class LedgerOutcomeUnknown(LedgerUnavailable):
    """The database went away while a settlement was in flight and could not be asked afterwards
    whether it committed: the charge may stand. `LedgerStore.outcome()` tells once it is back."""


class LedgerRejected(LedgerError):
    """The database refused this one operation's data (a check or a value it cannot store);
    nothing moved, and the other operations that shared its transaction went through."""


class InsufficientBalance(LedgerError):
    status, code, type, final = 402, "insufficient_balance", "insufficient_balance", True

    def __init__(self, bucket: str, needed_nanos: int, available_nanos: int) -> None:
        super().__init__(
            f"bucket {bucket!r} cannot cover this request: needs {needed_nanos} nano-USD, "
            f"{available_nanos} available; top up the {bucket!r} bucket (other buckets are not used)",
            bucket=bucket,
            needed_nanos=needed_nanos,
            available_nanos=available_nanos,
        )


class ReservationResolved(LedgerError):
    """A reservation was already settled, voided or expired: money moves exactly once."""

    status, code, type = 409, "reservation_resolved", "invalid_request_error"


class IdempotencyConflict(LedgerError):
    status, code, type, final = 409, "idempotency_conflict", "invalid_request_error", True
