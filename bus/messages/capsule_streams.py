"""Streams of the vmmgr service for capsules: file transfer, exec, process output, PTY.

Each stream is opened (``bus.open_stream``) to ``vmmgr.<host_id>`` with a
start message that derives from :class:`~.capsules.CapsuleOp`, so the worker
checks scope and status exactly like the request/reply operations. The
worker's first frame says whether it accepted:

* :class:`StreamWriteFile`: worker → :class:`StreamReady`; caller → raw
  ``bytes`` frames, then EOF; worker → :class:`~.capsules.CapsuleDone`.
* :class:`StreamReadFile`: worker → :class:`FileStreamStarted`, then raw
  ``bytes`` frames; the worker's CLOSE ends the file.
* :class:`StreamExec`, :class:`StreamProcess`, :class:`StreamPty`: worker →
  :class:`ProcStarted`, then :class:`ProcOutput` frames and one
  :class:`ProcExit`; caller → :class:`ProcStop` (exec), :class:`PtyInput`,
  :class:`PtyResize`, :class:`PtyKill` (PTY).
* :class:`StreamTcp`: worker → :class:`TcpStarted`; then raw ``bytes`` frames
  both ways (a TCP connection to the guest's loopback, made by the guest agent).

A refusal at any point is a :class:`~.common.Failure` frame (the last one the
worker sends: 404 ``not_found``, 409 ``not_running``, 502 ``agent_*``...);
:class:`ProcError` is a non-fatal complaint (a bad control message).
"""

from __future__ import annotations

from .base import Family, Message
from .capsules import CapsuleOp, Signal

# -- start messages (caller → worker) ----------------------------------------------


class StreamWriteFile(CapsuleOp, tag="capsules.stream.write", kw_only=True):
    """Write ``path`` from the ``bytes`` frames that follow (atomically: temp + rename)."""

    path: str


class StreamReadFile(CapsuleOp, tag="capsules.stream.read", kw_only=True):
    """Send ``path`` as ``bytes`` frames."""

    path: str


class StreamExec(CapsuleOp, tag="capsules.stream.exec", kw_only=True):
    """Start a process and stream its output; it is killed if the caller goes away."""

    cmd: str
    args: list[str] | None = None
    envs: dict[str, str] | None = None
    cwd: str | None = None
    user: str | None = None


class StreamProcess(CapsuleOp, tag="capsules.stream.process", kw_only=True):
    """Stream the output of a running background process (pid or tag)."""

    selector: str


class StreamPty(CapsuleOp, tag="capsules.stream.pty", kw_only=True):
    """Open a PTY, or reattach to the one tagged ``tag`` when ``connect`` is set."""

    connect: bool = False
    tag: str | None = None
    cmd: str = "/bin/bash"
    args: list[str] | None = None
    cols: int = 80
    rows: int = 24
    envs: dict[str, str] | None = None
    cwd: str | None = None
    user: str | None = None
    since: int | None = None


class StreamTcp(CapsuleOp, tag="capsules.stream.tcp", kw_only=True):
    """A TCP connection the guest agent opens to ``port`` on the guest's own loopback
    (the browser template's DevTools endpoint): worker → :class:`TcpStarted`, then raw
    ``bytes`` frames both ways; either side's EOF is a half close. The host never reaches
    into the guest's network: the agent makes the connection and relays its bytes."""

    port: int


# -- worker → caller ---------------------------------------------------------------


class StreamReady(Message, tag="capsules.stream.ready", kw_only=True):
    """The worker accepted a write: send the data."""


class FileStreamStarted(Message, tag="capsules.stream.file", kw_only=True):
    """A read started; ``size`` is the file's size when it did."""

    size: int | None = None


class TcpStarted(Message, tag="capsules.stream.tcp_started", kw_only=True):
    """The guest agent connected to the port: ``bytes`` frames follow."""


class ProcStarted(Message, tag="capsules.stream.started", kw_only=True):
    pid: int | None = None
    tag: str = ""
    offset: int = 0


class ProcOutput(Message, tag="capsules.stream.output", kw_only=True):
    """Output of a process (``channel`` stdout/stderr) or a PTY (``channel`` "")."""

    data: bytes
    channel: str = ""
    offset: int = 0


class ProcExit(Message, tag="capsules.stream.exit", kw_only=True):
    exit_code: int | None = None


class ProcError(Message, tag="capsules.stream.error", kw_only=True):
    """A non-fatal error (e.g. a control message the agent refused)."""

    message: str


# -- caller → worker controls --------------------------------------------------------


class ProcStop(Message, tag="capsules.stream.stop", kw_only=True):
    signal: Signal = "SIGKILL"


class PtyInput(Message, tag="capsules.stream.pty_input", kw_only=True):
    data: bytes


class PtyResize(Message, tag="capsules.stream.pty_resize", kw_only=True):
    cols: int
    rows: int


class PtyKill(Message, tag="capsules.stream.pty_kill", kw_only=True):
    signal: Signal = "SIGKILL"


FAMILY = Family("capsule_streams", __name__)
"""The capsule_streams messages and their one Decoder (define every message above this line)."""
