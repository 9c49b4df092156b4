"""The desktops service's refusals, all rooted in :class:`~dovecote.libs.errors.ServiceError`.

::

    ServiceError
     ├── SessionNotFound         404 {"error": "session not found"}
     ├── TaskNotFound            404 {"error": "task not found"}
     ├── UnsupportedProvider     400 unsupported_provider (or a provider the operator left off)
     ├── SharedHostPathInvalid   400 shared_host_path_invalid
     ├── MissingTool             424 missing_tool (a host tool the provider needs)
     ├── InvalidAction           400 {"error": StructuredError} with code invalid_action
     ├── BridgeUnavailable       409 {"error": StructuredError} provider_bridge_unavailable
     ├── TaskNotActionable       409 task_paused | task_terminated | task_completed
     └── InvalidTaskTransition   409 invalid_transition

Each carries the exact HTTP body of the reference in ``details["wire"]``, so
it crosses the bus as any refusal does and the gateway sends that body as is.
"""

from __future__ import annotations

from typing import Any

import msgspec

from dovecote.bus.messages.desktops import StructuredError
from dovecote.libs.errors import ServiceError

__all__ = [
    "BridgeUnavailable",
    "InvalidAction",
    "InvalidTaskTransition",
    "MissingTool",
    "SessionNotFound",
    "SharedHostPathInvalid",
    "TaskNotActionable",
    "TaskNotFound",
    "UnsupportedProvider",
    "structured",
]


def structured(code: str, message: str, *, category: str, retryable: bool = False,
               details: dict[str, Any] | None = None) -> StructuredError:
    """A StructuredError of the reference."""
    return StructuredError(code=code, message=message, retryable=retryable, category=category,
                           details=details or {})


def _rebuild(status: int, code: str, message: str, details: dict[str, Any] | None) -> ServiceError:
    return ServiceError(status, code, message, details=details)


class _WireError(ServiceError):
    status_code = 400
    error_code = "invalid_request"

    def __new__(cls, *args: Any, **kwargs: Any) -> _WireError:
        return Exception.__new__(cls)

    def __reduce__(self) -> Any:  # crosses threads and the bus as the plain refusal
        return (_rebuild, (self.status, self.code, self.message, self.details))

    def __init__(self, message: str, wire: Any = None) -> None:
        if wire is None:
            wire = {"error": {"code": self.error_code, "message": message}}
        super().__init__(self.status_code, self.error_code, message,
                         details={"wire": msgspec.to_builtins(wire)})


class SessionNotFound(_WireError):
    status_code, error_code = 404, "session_not_found"

    def __init__(self) -> None:
        super().__init__("session not found", {"error": "session not found"})


class TaskNotFound(_WireError):
    status_code, error_code = 404, "task_not_found"

    def __init__(self) -> None:
        super().__init__("task not found", {"error": "task not found"})


class UnsupportedProvider(_WireError):
    error_code = "unsupported_provider"


class SharedHostPathInvalid(_WireError):
    error_code = "shared_host_path_invalid"


class MissingTool(_WireError):
    status_code, error_code = 424, "missing_tool"


class InvalidAction(_WireError):
    error_code = "invalid_action"

    def __init__(self, message: str) -> None:
        super().__init__(message, {"error": structured(
            "invalid_action", message, category="validation")})


class BridgeUnavailable(_WireError):
    status_code, error_code = 409, "provider_bridge_unavailable"

    def __init__(self, details: dict[str, Any]) -> None:
        message = "actions require a guest runtime bridge inside the VM"
        super().__init__(message, {"error": structured(
            "provider_bridge_unavailable", message, category="provider", retryable=True,
            details=details)})


class TaskNotActionable(_WireError):
    status_code = 409

    def __init__(self, task_id: str, status: str) -> None:
        self.error_code = f"task_{status}"
        super().__init__(f"task {task_id} is {status}: it takes no new actions"
                         + (" (resume it first)" if status == "paused" else ""))


class InvalidTaskTransition(_WireError):
    status_code, error_code = 409, "invalid_transition"
