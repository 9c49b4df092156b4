"""The agents service's exceptions: one tree, each carrying its code, HTTP status and details.

::

    AgentError (ServiceError)     base; .status, .code, .message, .details
     ├── IdentityError            the /api/agent/* caller is not who it says
     │                            (401 identity_required | identity_stale |
     │                            identity_mismatch | identity_proof_invalid,
     │                            403 identity_unauthorized)
     ├── BadRequest               400: malformed input the schema cannot catch
     ├── NotFound                 404: no such object in the caller's team
     ├── Forbidden                403: not permitted (a wider permission policy)
     ├── Conflict                 409: the object's state forbids it
     │    ├── LeaseConflict       "not an active lease", "lease expired"
     │    └── BudgetExceeded      a spawn budget (children, depth, active sessions)
     └── Unprocessable            422: well-formed but refused (a raw claim token,
                                  lease_seconds past the maximum, unknown fields)

They derive from :class:`~dovecote.libs.errors.ServiceError` and from the
libs class of their status (an agents ``NotFound`` is a libs ``NotFound``), so
the bus carries them to the caller as that refusal (status, code, message,
details); the gateway renders ``/api/agent/*`` refusals in the reference's
diagnostic shape, with ``details`` as its ``evidence``.
"""

from __future__ import annotations

from typing import Any

from dovecote.libs import errors as base

__all__ = [
    "AgentError",
    "BadRequest",
    "BudgetExceeded",
    "Conflict",
    "Forbidden",
    "IdentityError",
    "LeaseConflict",
    "NotFound",
    "Unprocessable",
]


class AgentError(base.ServiceError):
    """Base of every refusal of the agents service: ``AgentError(message, code=, status=, details=)``."""

    default_status = 400
    default_code = "invalid_request"

    def __new__(cls, *args: Any, **kwargs: Any) -> AgentError:
        return Exception.__new__(cls)

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status: int | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            status or type(self).default_status, code or type(self).default_code, message, details=details
        )

    def __reduce__(self) -> Any:
        return (_restore, (type(self), self.message, self.code, self.status, self.details))


def _restore(
    cls: type[AgentError], message: str, code: str, status: int, details: dict[str, Any] | None
) -> AgentError:
    return cls(message, code=code, status=status, details=details)


class IdentityError(AgentError, base.Unauthorized):
    """401 (403 ``identity_unauthorized``): the caller is not the session it names."""

    default_status = 401
    default_code = "identity_stale"


class BadRequest(AgentError, base.BadRequest):
    default_status = 400
    default_code = "invalid_request"


class NotFound(AgentError, base.NotFound):
    default_status = 404
    default_code = "not_found"


class Forbidden(AgentError, base.Forbidden):
    default_status = 403
    default_code = "forbidden"


class Conflict(AgentError, base.Conflict):
    default_status = 409
    default_code = "conflict"


class LeaseConflict(Conflict):
    default_code = "lease_conflict"


class BudgetExceeded(Conflict):
    default_code = "spawn_budget_exceeded"


class Unprocessable(AgentError):
    default_status = 422
    default_code = "unprocessable"
