"""Wire protocol between the host (vmmgr) and the guest agent, without any I/O.

This module is copied verbatim into the guest image next to ``agent.py``, so it
imports only the standard library and msgspec (the guest has CPython 3.11 and a
copy of the host's msgspec).  Never import a dovecote module here.

Framing
-------
Each frame is a 4-byte big-endian length followed by that many bytes of
msgpack: one :class:`Message`, a tagged union keyed by ``"type"`` (the class
name).  Frames larger than :data:`MAX_FRAME` are a protocol error; the reader
stops rather than buffer an unbounded length.  :class:`FrameDecoder` turns a
byte stream into frame bodies without doing I/O (hypercorn style), so it is
tested without sockets.

Requests and replies
--------------------
Every request the host sends carries an ``id`` (u64, chosen by the host,
unique per connection).  The agent answers with exactly one reply carrying the
same ``id``: the request's own reply type, or :class:`ErrorReply` with a
``code`` (see :data:`ERROR_CODES`).

Streams
-------
Process output, PTY output and file transfers are streams.  A stream's id is
the ``id`` of the request that opened it.  Data moves as :class:`Chunk` frames
(``seq`` counts 0, 1, 2... per stream) and finishes with one
:class:`StreamEnd` (with an exit code for processes and PTYs, an error when it
failed).  Flow control is credit based: the receiver grants credits, one
chunk costs one credit, the sender never has more chunks in flight than it was
granted.  So at most ``window * chunk size`` bytes are buffered for any file
size.

* agent → host streams (:class:`StreamProcess`, :class:`OpenPty`,
  :class:`AttachPty`, :class:`ReadFileStream`): the request's ``window`` is the
  initial credit; the host sends :class:`Credit` as it consumes chunks and
  :class:`Cancel` to give up (a PTY keeps running; it is only detached).
* host → agent streams (:class:`WriteFileStream`): the agent answers
  :class:`StreamReady` with the initial credit, then sends :class:`Credit` as
  each chunk reaches the disk; after the host's :class:`StreamEnd` the agent
  sends the request's final reply (:class:`FileWritten` or :class:`ErrorReply`).
  A host :class:`Cancel` aborts the upload (the target file is left untouched).
* both ways (:class:`OpenTcp`): the agent connects to a port on the guest's own
  loopback and answers :class:`StreamReady` (its credits for the host's chunks);
  the request's ``window`` is the host's credits for the agent's chunks. Each side
  sends :class:`Chunk` within its credits and :class:`Credit` as it consumes
  (the agent once the bytes are written to the socket); a side's
  :class:`StreamEnd` is a half close (an ``error`` ends both directions); the
  agent's stream is over once both sides ended; a host :class:`Cancel` closes the
  connection at once.

Process and PTY output is kept by the agent in a bounded ring per process.  A
reader that falls behind the ring loses the oldest output: the next chunk says
how many bytes were ``skipped``.  ``offset`` is the chunk's absolute byte
offset in that process's output, so a reattaching reader can ask for output
``since`` the last offset it saw.

Schema evolution: new fields get defaults, annotations never change, unknown
fields are ignored.
"""

from __future__ import annotations

import struct
from typing import Literal, TypeAlias

import msgspec

PROTOCOL_VERSION = 1

MAX_FRAME = 16 * 1024 * 1024
"""Largest frame body either side accepts (bytes)."""

CHUNK_SIZE = 256 * 1024
"""Default data size of one stream chunk."""

MAX_CHUNK = 1024 * 1024
"""Largest data size of one chunk (keeps a chunk frame far below MAX_FRAME)."""

DEFAULT_WINDOW = 8
"""Default number of credits (chunks in flight) per stream."""

MAX_WINDOW = 64

MAX_INLINE_FILE = 8 * 1024 * 1024
"""Largest file ReadFile/WriteFile move in one frame; larger needs the streaming twin."""

MAX_EXEC_OUTPUT = 4 * 1024 * 1024
"""Foreground exec keeps at most this many bytes of stdout and of stderr."""

HEADER = struct.Struct(">I")

ERROR_CODES = frozenset(
    {
        "not_found",  # path, process, PTY or tag does not exist
        "already_exists",  # mkdir on an existing directory; tag in use
        "is_a_directory",
        "not_a_directory",
        "permission_denied",
        "invalid_path",  # not absolute, NUL byte, too long, "/" for remove
        "invalid_argument",
        "too_large",  # inline read/write over MAX_INLINE_FILE, chunk over MAX_CHUNK
        "not_running",  # PTY input to a PTY whose process exited
        "protocol_error",  # frame or flow-control violation
        "io_error",
        "connection_refused",  # OpenTcp: nothing listens on that port of the guest's loopback
        "internal",
    }
)


class ProtocolError(Exception):
    """The peer broke the framing or the flow-control rules."""


class Message(msgspec.Struct, tag_field="type", tag=True, kw_only=True, omit_defaults=True):
    """Base of every frame; the tag is the class name."""


class ErrorInfo(msgspec.Struct, kw_only=True):
    code: str
    message: str


class FileEntry(msgspec.Struct, kw_only=True):
    """One entry of a listing, as the capsules API's ``FileEntry``."""

    name: str
    path: str
    type: str  # "file" | "directory" | "symlink"
    size: int
    mode: int  # permission bits (st_mode & 0o7777)
    permissions: str  # "-rwxr-xr-x"
    owner: str
    group: str
    modified_at: int  # unix seconds
    symlink_target: str | None = None


class ProcessInfo(msgspec.Struct, kw_only=True):
    """One process, as the capsules API's ``ProcessEntry`` plus state."""

    pid: int
    tag: str | None
    cmd: str
    args: list[str]
    kind: str  # "process" (started by the agent), "pty", or "system" (found in /proc)
    running: bool
    exit_code: int | None = None
    started_at: float | None = None  # unix seconds


class StepResult(msgspec.Struct, kw_only=True):
    """Outcome of one step of SetIdentity: ``status`` is "ok", "skipped" or "error"."""

    step: str
    status: str
    detail: str = ""


# --------------------------------------------------------------- requests


class Ping(Message, kw_only=True):
    id: int


class SetIdentity(Message, kw_only=True):
    """Fresh identity after a restore; every field is optional (None = leave as is)."""

    id: int
    hostname: str | None = None
    machine_id: str | None = None  # 32 hex digits
    env: dict[str, str] | None = None  # merged into the environment of later processes
    rng_seed: bytes | None = None  # written to /dev/urandom
    clock_unix_ns: int | None = None  # CLOCK_REALTIME


class Exec(Message, kw_only=True):
    """Foreground exec.  ``args is None``: ``cmd`` is a shell string run by /bin/sh -c;
    otherwise argv is ``[cmd, *args]``."""

    id: int
    cmd: str
    args: list[str] | None = None
    env: dict[str, str] | None = None
    cwd: str | None = None
    user: str | None = None
    stdin: bytes | None = None
    timeout_sec: float = 30.0


class StartProcess(Message, kw_only=True):
    """Background process; ``tag`` is generated ("proc-xxxxxxxx") when omitted."""

    id: int
    cmd: str
    args: list[str] | None = None
    env: dict[str, str] | None = None
    cwd: str | None = None
    user: str | None = None
    tag: str | None = None


class ListProcesses(Message, kw_only=True):
    id: int
    include_system: bool = False  # also every other process found in /proc


class KillProcess(Message, kw_only=True):
    """``selector`` is a pid (digits) or a tag; works for PTYs too."""

    id: int
    selector: str
    signal: Literal["SIGKILL", "SIGTERM"] = "SIGKILL"


class StreamProcess(Message, kw_only=True):
    """Replay what the ring still holds (from ``since`` if given), then live output."""

    id: int
    selector: str
    since: int | None = None
    window: int = DEFAULT_WINDOW


class OpenPty(Message, kw_only=True):
    id: int
    cmd: str = "/bin/bash"
    args: list[str] | None = None
    cols: int = 80
    rows: int = 24
    env: dict[str, str] | None = None
    cwd: str | None = None
    user: str | None = None
    tag: str | None = None  # generated ("pty-xxxxxxxx") when omitted
    window: int = DEFAULT_WINDOW


class AttachPty(Message, kw_only=True):
    """Reconnect by tag: replay from ``since`` (or all the ring holds), then live."""

    id: int
    tag: str
    since: int | None = None
    window: int = DEFAULT_WINDOW


class PtyInput(Message, kw_only=True):
    id: int
    tag: str
    data: bytes


class PtyResize(Message, kw_only=True):
    id: int
    tag: str
    cols: int
    rows: int


class WriteFile(Message, kw_only=True):
    """Inline write (``len(data) <= MAX_INLINE_FILE``); atomic (temp file + rename)."""

    id: int
    path: str
    data: bytes
    mode: int | None = None  # default 0o644 for new files, kept for existing ones
    parents: bool = True


class WriteFileStream(Message, kw_only=True):
    id: int
    path: str
    mode: int | None = None
    parents: bool = True
    window: int = DEFAULT_WINDOW  # credits the agent should grant (the agent may lower it)


class OpenTcp(Message, kw_only=True):
    """Connect to ``port`` on the guest's loopback (``host`` must be a loopback address) and
    relay the connection's bytes as a two-way stream (see Streams above)."""

    id: int
    port: int
    host: str = "127.0.0.1"
    window: int = DEFAULT_WINDOW


class ReadFile(Message, kw_only=True):
    """Inline read; refused with ``too_large`` above MAX_INLINE_FILE."""

    id: int
    path: str


class ReadFileStream(Message, kw_only=True):
    id: int
    path: str
    chunk_size: int = CHUNK_SIZE
    window: int = DEFAULT_WINDOW


class ListDir(Message, kw_only=True):
    """``depth`` as the capsules API: 0 and 1 list the immediate children, n > 1 recurses."""

    id: int
    path: str
    depth: int = 1
    max_entries: int = 10_000


class MakeDir(Message, kw_only=True):
    id: int
    path: str
    parents: bool = True
    mode: int = 0o755


class Remove(Message, kw_only=True):
    """Removes a file, a symlink (not its target) or a directory tree."""

    id: int
    path: str


class Stat(Message, kw_only=True):
    id: int
    path: str


# --------------------------------------------------------------- replies


class Pong(Message, kw_only=True):
    id: int
    agent_version: str
    protocol: int
    boot_id: str
    uptime: float  # seconds since the guest booted
    agent_uptime: float
    agent_pid: int
    disk_total_bytes: int = 0  # the root filesystem as df counts it (0: an agent that does not say)
    disk_used_bytes: int = 0


class IdentitySet(Message, kw_only=True):
    id: int
    steps: list[StepResult]


class ExecResult(Message, kw_only=True):
    """As the capsules API's ExecResponse: text is UTF-8, or base64 of both streams."""

    id: int
    stdout: str
    stderr: str
    exit_code: int  # 128 + n when killed by signal n
    duration_ms: int
    encoding: str = "utf-8"  # "utf-8" | "base64"
    timed_out: bool = False
    truncated: bool = False


class ProcessStarted(Message, kw_only=True):
    id: int
    pid: int
    tag: str
    cmd: str
    args: list[str]


class ProcessList(Message, kw_only=True):
    id: int
    processes: list[ProcessInfo]


class Killed(Message, kw_only=True):
    id: int
    pid: int
    tag: str | None
    delivered: bool  # False when the process had already exited


class StreamStarted(Message, kw_only=True):
    """Reply to StreamProcess/OpenPty/AttachPty/ReadFileStream; chunks follow."""

    id: int
    stream: int
    pid: int | None = None
    tag: str | None = None
    offset: int = 0  # absolute output offset of the first chunk (processes, PTYs)
    size: int | None = None  # file size (ReadFileStream)


class StreamReady(Message, kw_only=True):
    """Reply to WriteFileStream: the host may send ``credits`` chunks."""

    id: int
    stream: int
    credits: int


class Done(Message, kw_only=True):
    """Generic success (PtyInput, PtyResize, Remove)."""

    id: int


class FileData(Message, kw_only=True):
    id: int
    data: bytes
    entry: FileEntry


class FileWritten(Message, kw_only=True):
    id: int
    entry: FileEntry


class DirListing(Message, kw_only=True):
    id: int
    entries: list[FileEntry]
    truncated: bool = False


class DirMade(Message, kw_only=True):
    id: int
    entry: FileEntry


class StatResult(Message, kw_only=True):
    id: int
    entry: FileEntry


class ErrorReply(Message, kw_only=True):
    id: int
    code: str
    message: str


# --------------------------------------------------------------- the agent endpoint relay

# A capsule bound to an agent session serves the agent runtime's API to its own
# code on a loopback port (``agentapi.py`` of the agent). The host pulls what
# that code asked: TakeRelay waits (at most ``wait_s``) for the next request and
# answers RelayTaken (``request`` None when none came); AnswerRelay gives the
# answer of one (reply Done). The first TakeRelay starts the endpoint.


class RelayedRequest(msgspec.Struct, kw_only=True):
    """One HTTP request of code in the guest to the agent endpoint."""

    no: int  # the agent's number for it, named again by AnswerRelay
    method: str
    path: str  # with its query string
    headers: dict[str, str]
    body: bytes = b""


class TakeRelay(Message, kw_only=True):
    id: int
    wait_s: float = 20.0
    port: int = 7070  # where the endpoint listens (on 127.0.0.1) once started


class RelayTaken(Message, kw_only=True):
    id: int
    request: RelayedRequest | None = None


class AnswerRelay(Message, kw_only=True):
    id: int
    no: int
    status: int
    content_type: str = "application/json"
    body: bytes = b""


# --------------------------------------------------------------- streams (both ways)


class Chunk(Message, kw_only=True):
    stream: int
    seq: int
    data: bytes
    channel: str = ""  # "stdout" | "stderr" for processes, "" otherwise
    offset: int = 0
    skipped: int = 0  # bytes lost (ring overrun) just before this chunk


class StreamEnd(Message, kw_only=True):
    stream: int
    seq: int
    exit_code: int | None = None
    error: ErrorInfo | None = None


class Credit(Message, kw_only=True):
    stream: int
    credits: int


class Cancel(Message, kw_only=True):
    stream: int


Request: TypeAlias = (
    Ping
    | SetIdentity
    | Exec
    | StartProcess
    | ListProcesses
    | KillProcess
    | StreamProcess
    | OpenPty
    | AttachPty
    | PtyInput
    | PtyResize
    | WriteFile
    | WriteFileStream
    | OpenTcp
    | ReadFile
    | ReadFileStream
    | ListDir
    | MakeDir
    | Remove
    | Stat
    | TakeRelay
    | AnswerRelay
)
Reply: TypeAlias = (
    Pong
    | IdentitySet
    | ExecResult
    | ProcessStarted
    | ProcessList
    | Killed
    | StreamStarted
    | StreamReady
    | Done
    | FileData
    | FileWritten
    | DirListing
    | DirMade
    | StatResult
    | RelayTaken
    | ErrorReply
)
StreamFrame: TypeAlias = Chunk | StreamEnd | Credit | Cancel

HostMessage: TypeAlias = Request | StreamFrame
"""What the host sends (and the agent decodes)."""

AgentMessage: TypeAlias = Reply | StreamFrame
"""What the agent sends (and the host decodes)."""

_encoder = msgspec.msgpack.Encoder()
_host_decoder = msgspec.msgpack.Decoder(HostMessage)
_agent_decoder = msgspec.msgpack.Decoder(AgentMessage)


def encode_frame(message: Message) -> bytes:
    """Header + msgpack body of ``message``; raises ProtocolError above MAX_FRAME."""
    body = _encoder.encode(message)
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"frame of {len(body)} bytes exceeds the {MAX_FRAME}-byte limit")
    return HEADER.pack(len(body)) + body


def decode_host_message(body: bytes) -> HostMessage:
    try:
        return _host_decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"bad host frame: {exc}") from None


def decode_agent_message(body: bytes) -> AgentMessage:
    try:
        return _agent_decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"bad agent frame: {exc}") from None


class FrameDecoder:
    """Splits a byte stream into frame bodies; no I/O.

    >>> d = FrameDecoder()
    >>> d.feed(HEADER.pack(2) + b"hi" + HEADER.pack(1))
    [b'hi']
    >>> d.feed(b"!")
    [b'!']
    """

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self._max = max_frame
        self._need: int | None = None  # body length of the frame being read

    @property
    def buffered(self) -> int:
        """Bytes held waiting for the rest of a frame."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Add ``data``; return every frame body it completed (possibly none)."""
        self._buf += data
        frames: list[bytes] = []
        pos = 0
        buf = self._buf
        while True:
            if self._need is None:
                if len(buf) - pos < HEADER.size:
                    break
                (length,) = HEADER.unpack_from(buf, pos)
                if length > self._max:
                    raise ProtocolError(f"frame of {length} bytes exceeds the {self._max}-byte limit")
                self._need = length
                pos += HEADER.size
            if len(buf) - pos < self._need:
                break
            frames.append(bytes(buf[pos : pos + self._need]))
            pos += self._need
            self._need = None
        if pos:
            del buf[:pos]
        return frames


class SendWindow:
    """Sender side of one stream's credit accounting; no I/O."""

    def __init__(self, credits: int = 0) -> None:
        self.credits = credits
        self.next_seq = 0

    def grant(self, credits: int) -> None:
        if credits <= 0 or credits > MAX_WINDOW:
            raise ProtocolError(f"bad credit grant {credits}")
        self.credits += credits
        if self.credits > MAX_WINDOW * 2:
            raise ProtocolError(f"credits piled up to {self.credits}")

    def can_send(self) -> bool:
        return self.credits > 0

    def take(self) -> int:
        """Spend one credit; return the seq of the chunk to send."""
        if self.credits <= 0:
            raise ProtocolError("no credit to send a chunk")
        self.credits -= 1
        seq = self.next_seq
        self.next_seq += 1
        return seq


class ReceiveWindow:
    """Receiver side of one stream: checks order and credit; no I/O."""

    def __init__(self, window: int) -> None:
        if not 1 <= window <= MAX_WINDOW:
            raise ProtocolError(f"window {window} outside 1..{MAX_WINDOW}")
        self.window = window
        self.outstanding = window  # credits granted and not yet used by the sender
        self.next_seq = 0

    def receive(self, seq: int) -> None:
        """Account one chunk; raises ProtocolError on a gap or a credit overrun."""
        if seq != self.next_seq:
            raise ProtocolError(f"chunk seq {seq}, expected {self.next_seq}")
        if self.outstanding <= 0:
            raise ProtocolError("chunk sent without credit")
        self.outstanding -= 1
        self.next_seq += 1

    def end(self, seq: int) -> None:
        if seq != self.next_seq:
            raise ProtocolError(f"end seq {seq}, expected {self.next_seq}")

    def consumed(self, n: int = 1) -> int:
        """The application consumed ``n`` chunks; return the credits to grant back."""
        self.outstanding += n
        return n
