"""The agent's one error: a request failed with a protocol error code.

:class:`AgentError` carries the code the host sees in an ``ErrorReply``;
:func:`os_error` turns an ``OSError`` into one by its errno.
"""

from __future__ import annotations

import errno


class AgentError(Exception):
    """A request failed with a protocol error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


_ERRNO_CODES = {
    errno.ENOENT: "not_found",
    errno.EACCES: "permission_denied",
    errno.EPERM: "permission_denied",
    errno.EROFS: "permission_denied",
    errno.EISDIR: "is_a_directory",
    errno.ENOTDIR: "not_a_directory",
    errno.EEXIST: "already_exists",
    errno.ENOTEMPTY: "already_exists",
    errno.ENAMETOOLONG: "invalid_path",
    errno.ELOOP: "invalid_path",
}


def os_error(exc: OSError, what: str = "") -> AgentError:
    code = _ERRNO_CODES.get(exc.errno or 0, "io_error")
    where = f"{what}: " if what else ""
    return AgentError(code, f"{where}{exc.strerror or exc}")

