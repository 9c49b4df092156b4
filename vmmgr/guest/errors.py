"""Exceptions of the host-side guest-agent client.

::

    AgentError                  (vmmgr/errors.py: a VmmgrError, so a DovecoteError)
    ├── AgentConnectError       could not connect and handshake within connect_timeout
    ├── AgentConnectionLost     the channel closed or broke; every pending call fails with it
    ├── AgentTimeout            a reply, chunk or credit did not come in time (also a TimeoutError)
    ├── AgentProtocolError      bad frame, flow-control violation, unexpected reply
    └── AgentRequestError       the agent refused the request; ``code`` is the protocol's code
        ├── NotFound            not_found (path, process, PTY, tag, command, user)
        ├── AlreadyExists       already_exists (mkdir on an existing path, tag in use)
        ├── PermissionDenied    permission_denied
        ├── IsADirectory        is_a_directory
        ├── NotADirectory       not_a_directory
        ├── InvalidPath         invalid_path
        └── TooLarge            too_large

Codes without a subclass (``io_error``, ``invalid_argument``, ``not_running``,
``internal``...) raise a plain :class:`AgentRequestError`.
"""

from __future__ import annotations

from dovecote.vmmgr.errors import VmmgrError


class AgentError(VmmgrError):
    """Base of every guest-agent client error."""


class AgentConnectError(AgentError):
    """The agent's socket did not accept a connection or answer a ping in time."""


class AgentConnectionLost(AgentError):
    """The connection to the agent closed or broke while calls were pending."""


class AgentTimeout(AgentError, TimeoutError):
    """A bounded wait on the agent expired."""


class AgentProtocolError(AgentError):
    """The agent broke the framing or flow-control rules, or answered the wrong thing."""


class AgentRequestError(AgentError):
    """The agent answered with an error; ``code`` is the protocol's error code."""

    code = "error"

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class NotFound(AgentRequestError):
    pass


class AlreadyExists(AgentRequestError):
    pass


class PermissionDenied(AgentRequestError):
    pass


class IsADirectory(AgentRequestError):
    pass


class NotADirectory(AgentRequestError):
    pass


class InvalidPath(AgentRequestError):
    pass


class TooLarge(AgentRequestError):
    pass


_BY_CODE: dict[str, type[AgentRequestError]] = {
    "not_found": NotFound,
    "already_exists": AlreadyExists,
    "permission_denied": PermissionDenied,
    "is_a_directory": IsADirectory,
    "not_a_directory": NotADirectory,
    "invalid_path": InvalidPath,
    "too_large": TooLarge,
}


def request_error(code: str, message: str) -> AgentRequestError:
    """The exception for an agent error reply."""
    return _BY_CODE.get(code, AgentRequestError)(code, message)
