"""Dovecote guest agent: exec, processes, PTYs and files over one byte channel.

This package runs INSIDE each capsule VM (Debian bookworm, python3-minimal), so
it uses only the standard library and msgspec, and its sibling module
``dovecote.vmmgr.guest.protocol``. The image builder (``infra/guest/build.py``)
copies both under ``/opt/dovecote/python`` (``dovecote/vmmgr/guest/...``, plain
namespace directories above the package) and the guest's init runs the package
by path; the tests run it on the host as a module::

    python3 /opt/dovecote/python/dovecote/vmmgr/guest/agent --device /dev/virtio-ports/org.dovecote.agent
    python3 -m dovecote.vmmgr.guest.agent --listen-unix /tmp/x/agent.sock   # tests

Why the shape
-------------
One asyncio loop holds the state that must outlive a host connection: the
background processes and PTYs the agent started, each with a bounded output
ring. A *session* is one host connection: it owns a frame decoder, a writer
task, the requests in flight and the streams attached to processes. When the
channel reports EOF the session ends, its tasks are cancelled, and processes
and PTYs keep running; the device is reopened with backoff and a new session
starts. The unix-socket mode serves one connection at a time through exactly
the same session code.

The agent never blocks on a slow host: process and PTY output is read as fast
as it comes into the ring (oldest output is dropped past the ring size and the
reader is told how much it skipped); file transfers use the protocol's credits.

The modules, by concern (each imports only the ones above it):

* :mod:`.errors` — :class:`AgentError` (a protocol error code) and ``os_error``;
* :mod:`.files` — paths, entries, listings, atomic writes, reads, removal;
* :mod:`.processes` — :class:`Processes`: exec, background processes, PTYs,
  their :class:`Managed` records and :class:`OutputRing`;
* :mod:`.identity` — the identity push (hostname, hosts, machine id, env, RNG,
  clock) and the facts a ``Pong`` reports;
* :mod:`.channel` — :class:`FdChannel`, :class:`OutStream`, :class:`Session`
  (framing, credits, cancels, uploads' chunks);
* :mod:`.tcp` — ``OpenTcp``: a connection to a port on the guest's loopback,
  relayed both ways with credits (the browser template's DevTools endpoint);
* :mod:`.dispatch` — :class:`Agent`: a request in, a reply or a stream out;
* :mod:`.serve` — the command line and the device/unix/vsock loops;
* ``__main__`` — the entry point.
"""

from .channel import FdChannel, OutStream, Session
from .dispatch import AGENT_VERSION, Agent
from .errors import AgentError
from .processes import Managed, OutputRing, Processes
from .serve import main, parse_args

__all__ = [
    "AGENT_VERSION",
    "Agent",
    "AgentError",
    "FdChannel",
    "Managed",
    "OutStream",
    "OutputRing",
    "Processes",
    "Session",
    "main",
    "parse_args",
]
