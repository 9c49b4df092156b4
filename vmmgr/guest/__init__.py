"""The guest agent that runs inside each capsule VM, and its host-side client.

Guest side (copied into the image; stdlib + msgspec only):

* ``protocol.py`` — frames, messages, the I/O-free decoder and credit windows;
* ``agent.py`` — the agent: ``python3 agent.py --device /dev/virtio-ports/org.dovecote.agent``.

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

GUEST_FILES = (Path(__file__).with_name("agent.py"), Path(__file__).with_name("protocol.py"))
"""Files the image builder copies into one directory of the guest (plus msgspec on its sys.path)."""

AGENT_DEVICE = "/dev/virtio-ports/org.dovecote.agent"
AGENT_PORT_NAME = "org.dovecote.agent"

__all__ = [
    "AGENT_DEVICE",
    "AGENT_PORT_NAME",
    "GUEST_FILES",
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
    "open_agent",
]
