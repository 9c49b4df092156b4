"""The guest agent that runs inside each capsule VM, and its host-side client.

Guest side (copied into the image; stdlib + msgspec only):

* ``protocol.py`` — frames, messages, the I/O-free decoder and credit windows;
* ``agent/`` — the agent, a package by concern (see its ``__init__``): in the
  guest ``python3 /opt/dovecote/python/dovecote/vmmgr/guest/agent --device ...``,
  on the host ``python3 -m dovecote.vmmgr.guest.agent --listen-unix ...``.

Host side (Trio): :func:`open_agent` gives an :class:`AgentClient`; errors are in
:mod:`dovecote.vmmgr.guest.errors`.
"""

from pathlib import Path

from .client import AgentClient, Exited, FileReader, Output, ProcessStream, PtySession, open_agent
from .errors import (
    AgentConnectError,
    AgentConnectionLost,
    AgentError,
    AgentProtocolError,
    AgentRequestError,
    AgentTimeout,
)

AGENT_MODULE = "dovecote.vmmgr.guest.agent"
"""The agent as a module: ``python3 -m AGENT_MODULE --listen-unix PATH`` runs it on the host."""

GUEST_PYTHON_DIR = "/opt/dovecote/python"
"""The directory of the guest (and of the xvfb sandbox) that holds the agent's files
(``dovecote/vmmgr/guest/...``, as :func:`guest_files` places them)."""

GUEST_AGENT = f"{GUEST_PYTHON_DIR}/dovecote/vmmgr/guest/agent"
"""The agent package in the guest, run by path: ``python3 -B -u GUEST_AGENT --device ...``."""


def guest_files() -> list[tuple[Path, str]]:
    """What the guest runs: (host file, path under :data:`GUEST_PYTHON_DIR`) for ``protocol.py``
    and every module of the agent package (msgspec comes on the guest's sys.path besides)."""
    here = Path(__file__).parent
    files = [(here / "protocol.py", "dovecote/vmmgr/guest/protocol.py")]
    files += [(path, f"dovecote/vmmgr/guest/agent/{path.name}")
              for path in sorted((here / "agent").glob("*.py"))]
    return files

AGENT_DEVICE = "/dev/virtio-ports/org.dovecote.agent"
AGENT_PORT_NAME = "org.dovecote.agent"

__all__ = [
    "AGENT_DEVICE",
    "AGENT_MODULE",
    "AGENT_PORT_NAME",
    "GUEST_AGENT",
    "GUEST_PYTHON_DIR",
    "AgentClient",
    "AgentConnectError",
    "AgentConnectionLost",
    "AgentError",
    "AgentProtocolError",
    "AgentRequestError",
    "AgentTimeout",
    "Exited",
    "FileReader",
    "Output",
    "ProcessStream",
    "PtySession",
    "guest_files",
    "open_agent",
]
