"""``dovecote capsule ...``: capsules from the command line, over the public API.

A client like any other: HTTP for the REST routes, WebSockets for exec and
the PTY, with the API key and gateway of :mod:`dovecote.services.cli_config`
(``DOVECOTE_API_KEY``/``DOVECOTE_URL`` or the file ``dovecote key create``
writes)::

    dovecote capsule create [--template T] [--vcpus N] [--memory-mb M]   # prints the id once running
    dovecote capsule list [--json]
    dovecote capsule exec ID -- CMD [ARG...]     # one argument: a shell command line
    dovecote capsule shell ID                    # an interactive terminal (PTY)
    dovecote capsule cp LOCAL ID:PATH | ID:PATH LOCAL   # '-' is stdin/stdout
    dovecote capsule pause|resume|destroy ID

``exec`` streams the command's output as it comes (``/exec/stream``) and exits
with its exit code; Ctrl-C asks the capsule to stop it. ``shell`` puts the
terminal in raw mode and speaks the PTY WebSocket (``/pty``): the PTY runs in
the capsule, so when the connection drops (a network blip, a gateway
restart) the command reconnects with the PTY's tag and the offset of the last
output byte it printed, and the session goes on where it was; what was typed
meanwhile is sent once it is back. It gives up after
:data:`RECONNECT_TIMEOUT_S`, or at once when the API says the capsule or the
PTY is gone.

Errors print the API's ``message (code)`` and exit 1.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import sys
import time
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from dovecote.services.cli_config import ClientSettings, ConfigFileError, load_settings

WAIT_TIMEOUT_S = 900.0
"""How long create/pause/resume/destroy wait for the capsule to get there (a cold boot under TCG)."""
RECONNECT_TIMEOUT_S = 120.0
"""How long ``shell`` keeps trying to get a dropped PTY connection back."""
SILENCE_S = 75.0
"""A PTY connection with no frame for this long is dead (the server pings every 30 s)."""
HTTP_TIMEOUT_S = 60.0

if TYPE_CHECKING:
    import httpx


class CliError(Exception):
    """A failure to report as ``dovecote capsule <command>: <message>`` (exit 1)."""


# -- the parser --------------------------------------------------------------------------


def add_parser(sub: Any) -> None:
    """Add ``capsule`` and its subcommands to the ``dovecote`` parser."""
    capsule = sub.add_parser("capsule", help="create and use capsules (the public API, with an API key)")
    cs = capsule.add_subparsers(dest="capsule_command", required=True, metavar="ACTION")

    create = cs.add_parser("create", help="create a capsule; prints its id once it runs")
    create.add_argument("--template", default="minimal")
    create.add_argument("--vcpus", type=int)
    create.add_argument("--memory-mb", type=int)
    create.add_argument("--disk-mb", type=int)
    create.add_argument("--timeout-sec", type=int, help="pause after this many idle seconds (0: never)")
    create.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE")
    create.add_argument("--no-wait", action="store_true", help="print the id at once (status starting)")
    create.add_argument("--json", action="store_true", help="print the capsule as JSON")

    listing = cs.add_parser("list", help="list your team's capsules")
    listing.add_argument("--json", action="store_true")

    show = cs.add_parser("show", help="print one capsule as JSON")
    show.add_argument("id")

    run = cs.add_parser("exec", help="run a command, streaming its output; exits with its code",
                        usage="dovecote capsule exec [--cwd DIR] [--user USER] [--env KEY=VALUE]... "
                              "ID [--cwd ...] -- COMMAND [ARG...]")
    _exec_options(run)
    run.add_argument("id")
    run.add_argument("argv", nargs=argparse.REMAINDER, metavar="COMMAND",
                     help="one argument: a shell command line; several: a program and its arguments")

    shell = cs.add_parser("shell", help="an interactive terminal in the capsule")
    shell.add_argument("id")
    shell.add_argument("--cmd", default="/bin/bash", help="the program to run (default /bin/bash)")
    shell.add_argument("--cwd")
    shell.add_argument("--user")

    cp = cs.add_parser("cp", help="copy a file into (LOCAL ID:PATH) or out of (ID:PATH LOCAL) a capsule")
    cp.add_argument("source")
    cp.add_argument("destination")

    for name, text in (("pause", "pause a running capsule (memory to disk)"),
                       ("resume", "resume a paused capsule"), ("destroy", "destroy a capsule")):
        action = cs.add_parser(name, help=text)
        action.add_argument("id")
        action.add_argument("--no-wait", action="store_true", help="do not wait for the new status")


def _exec_options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--cwd")
    parser.add_argument("--user")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    return parser


def _split_exec(args: argparse.Namespace) -> list[str]:
    """The command of ``exec``; options between the id and ``--`` are exec's own."""
    argv = list(args.argv)
    if "--" not in argv:
        return argv
    head, command = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    if head:
        extra = _exec_options(argparse.ArgumentParser(prog="dovecote capsule exec", add_help=False))
        try:
            more, unknown = extra.parse_known_args(head)
        except SystemExit:
            raise CliError(f"cannot read the options {' '.join(head)}") from None
        if unknown:
            raise CliError(f"unknown options before --: {' '.join(unknown)}")
        args.cwd = more.cwd or args.cwd
        args.user = more.user or args.user
        args.env = [*args.env, *more.env]
    return command


def main(args: argparse.Namespace) -> int:
    """Run ``dovecote capsule <action>``; returns the exit status."""
    command = args.capsule_command
    try:
        settings = load_settings()
        if not settings.api_key:
            raise CliError("no API key: run `dovecote key create --email you@example.com` "
                           f"(it saves one in {settings.config_path}) or set DOVECOTE_API_KEY")
        with Api(settings) as api:
            if command == "exec":
                return _exec(settings, args)
            if command == "shell":
                return _shell(settings, args)
            return int(COMMANDS[command](api, args) or 0)
    except CliError as exc:
        print(f"dovecote capsule {command}: {exc}", file=sys.stderr)
        return 1
    except ConfigFileError as exc:
        print(f"dovecote capsule {command}: the config file is unusable: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


# -- REST ------------------------------------------------------------------------------------


class Api:
    """The REST routes, with the API key; an error answer raises :class:`CliError`."""

    def __init__(self, settings: ClientSettings) -> None:
        import httpx  # only here: every `dovecote` process imports this module

        self.url = settings.url
        self.http = httpx.Client(base_url=settings.url, timeout=HTTP_TIMEOUT_S,
                                 headers={"X-API-Key": settings.api_key or ""})

    def __enter__(self) -> Api:
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        import httpx

        try:
            response = self.http.request(method, path, **kw)
        except httpx.TransportError as exc:
            raise CliError(f"cannot reach the gateway at {self.url} ({exc}); "
                           "is `dovecote up` running?") from None
        if response.status_code >= 400:
            raise CliError(error_text(response.status_code, response.content))
        return response

    def capsule(self, capsule_id: str) -> dict[str, Any]:
        body: dict[str, Any] = self.request("GET", capsule_path(capsule_id)).json()
        return body

    def wait_status(self, capsule_id: str, wanted: set[str], timeout_s: float = WAIT_TIMEOUT_S,
                    gone_ok: bool = False) -> dict[str, Any]:
        """Poll until the capsule's status is one of ``wanted`` (``error`` stops the wait)."""
        import httpx

        deadline = time.monotonic() + timeout_s
        body: dict[str, Any] = {}
        while time.monotonic() < deadline:
            try:
                response = self.http.get(capsule_path(capsule_id))
            except httpx.TransportError:
                time.sleep(1)  # a gateway restarting: keep waiting
                continue
            if response.status_code == 404 and gone_ok:
                return {"id": capsule_id, "status": "gone"}
            if response.status_code >= 400:
                raise CliError(error_text(response.status_code, response.content))
            body = response.json()
            if body.get("status") in wanted:
                return body
            if body.get("status") in ("error", "missing"):
                raise CliError(f"capsule {capsule_id} is {body['status']}")
            time.sleep(0.5)
        raise CliError(f"capsule {capsule_id} did not become {'/'.join(sorted(wanted))} within "
                       f"{timeout_s:.0f}s (it is {body.get('status', 'unknown')})")


def error_text(status: int, content: bytes) -> str:
    """``message (code)`` of the API's error body, or the HTTP status."""
    try:
        error = json.loads(content)["error"]
        return f"{error['message']} ({error['code']})"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {status}"


def capsule_path(capsule_id: str) -> str:
    return "/v1/capsules/" + quote(capsule_id, safe="")


def _pairs(items: list[str], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CliError(f"{what} must be KEY=VALUE, not {item!r}")
        out[key] = value
    return out


def _create(api: Api, args: argparse.Namespace) -> None:
    import httpx

    body: dict[str, Any] = {"template": args.template}
    for field, value in (("vcpus", args.vcpus), ("memory_mb", args.memory_mb),
                         ("disk_size_mb", args.disk_mb), ("timeout_sec", args.timeout_sec)):
        if value is not None:
            body[field] = value
    if args.metadata:
        body["metadata"] = _pairs(args.metadata, "--metadata")
    deadline = time.monotonic() + WAIT_TIMEOUT_S
    told = False
    while True:
        try:
            response = api.http.post("/v1/capsules", json=body)
        except httpx.TransportError as exc:
            raise CliError(f"cannot reach the gateway at {api.url} ({exc}); "
                           "is `dovecote up` running?") from None
        code = _code(response)
        # The first start of a machine builds the guest image: wait for it rather than fail.
        if response.status_code == 503 and code == "image_not_ready" and time.monotonic() < deadline:
            if not told:
                print("dovecote capsule create: the guest image is still being built "
                      "(see `dovecote up`); waiting...", file=sys.stderr)
                told = True
            time.sleep(min(float(response.headers.get("Retry-After") or 5), 10))
            continue
        if response.status_code >= 400:
            raise CliError(error_text(response.status_code, response.content))
        capsule: dict[str, Any] = response.json()
        break
    if not args.no_wait:
        capsule = api.wait_status(capsule["id"], {"running"})
    print(json.dumps(capsule, indent=2) if args.json else capsule["id"])


def _code(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return ""


def _list(api: Api, args: argparse.Namespace) -> None:
    capsules: list[dict[str, Any]] = api.request("GET", "/v1/capsules").json()
    if args.json:
        print(json.dumps(capsules, indent=2))
        return
    rows = [("ID", "STATUS", "TEMPLATE", "VCPUS", "MEMORY_MB", "CREATED")]
    rows += [(c["id"], c["status"], c["template"], str(c["vcpus"]), str(c["memory_mb"]),
              c.get("created_at", "")) for c in capsules]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def _show(api: Api, args: argparse.Namespace) -> None:
    print(json.dumps(api.capsule(args.id), indent=2))


def _lifecycle(api: Api, args: argparse.Namespace) -> None:
    command = args.capsule_command
    if command == "destroy":
        api.request("DELETE", capsule_path(args.id))
        if not args.no_wait:
            api.wait_status(args.id, {"stopped"}, timeout_s=120, gone_ok=True)
        print(f"{args.id} destroyed" if not args.no_wait else f"{args.id} stopping")
        return
    capsule = api.request("POST", capsule_path(args.id) + "/" + command).json()
    if not args.no_wait:
        capsule = api.wait_status(args.id, {"paused" if command == "pause" else "running"})
    print(f"{args.id} {capsule['status']}")


# -- cp ----------------------------------------------------------------------------------------


def remote_spec(text: str) -> tuple[str, str] | None:
    """``(capsule_id, path)`` of ``ID:PATH``, or None for a local path (``./a:b`` is local)."""
    head, sep, tail = text.partition(":")
    if not sep or not head or "/" in head or head in (".", ".."):
        return None
    return head, tail


def _cp(api: Api, args: argparse.Namespace) -> None:
    source, destination = remote_spec(args.source), remote_spec(args.destination)
    if (source is None) == (destination is None):
        raise CliError("one of SOURCE and DESTINATION must be ID:PATH, the other a local path")
    if destination is not None:
        capsule_id, path = destination
        local = args.source
        if not path:
            raise CliError("give the path in the capsule (ID:PATH)")
        if path.endswith("/"):
            if local == "-":
                raise CliError("name the file in the capsule when copying from stdin")
            path += Path(local).name
        _upload(api, capsule_id, path, local)
        return
    assert source is not None
    capsule_id, path = source
    if not path or path.endswith("/"):
        raise CliError("give the path of a file in the capsule (ID:PATH)")
    _download(api, capsule_id, path, args.destination)


def _upload(api: Api, capsule_id: str, path: str, local: str) -> None:
    import httpx

    if local == "-":  # no fileno: a pipe's size is unknown, so the upload goes chunked
        stream: Any = _Unsized(sys.stdin.buffer)
    else:
        try:
            stream = open(local, "rb")
        except OSError as exc:
            raise CliError(f"{local}: {exc.strerror}") from None
    try:
        api.request("POST", capsule_path(capsule_id) + "/files/stream/write",
                    data={"path": path},
                    files={"file": (PurePosixPath(path).name, stream, "application/octet-stream")},
                    timeout=httpx.Timeout(HTTP_TIMEOUT_S, write=None, read=None))
    finally:
        if local != "-":
            stream.close()


class _Unsized:
    """A readable stream that only reads (httpx would take fstat's size of a pipe for its length)."""

    def __init__(self, raw: Any) -> None:
        self._raw = raw

    def read(self, size: int = -1) -> bytes:
        return bytes(self._raw.read(size))


def _download(api: Api, capsule_id: str, path: str, local: str) -> None:
    import httpx

    target: Path | None = None
    if local != "-":
        target = Path(local)
        if target.is_dir():
            target = target / PurePosixPath(path).name
    url = capsule_path(capsule_id) + "/files/stream/read"
    try:
        with api.http.stream("POST", url, json={"path": path},
                             timeout=httpx.Timeout(HTTP_TIMEOUT_S, read=None)) as response:
            if response.status_code >= 400:
                raise CliError(error_text(response.status_code, response.read()))
            if target is None:
                for chunk in response.iter_bytes():
                    sys.stdout.buffer.write(chunk)
                sys.stdout.buffer.flush()
                return
            partial = target.with_name(f".{target.name}.part")
            try:
                with open(partial, "wb") as out:
                    for chunk in response.iter_bytes():
                        out.write(chunk)
                os.replace(partial, target)
            except BaseException:
                partial.unlink(missing_ok=True)
                raise
    except httpx.TransportError as exc:
        raise CliError(f"the download broke off ({exc})") from None
    except OSError as exc:
        raise CliError(f"{local}: {exc.strerror}") from None


COMMANDS = {"create": _create, "list": _list, "show": _show, "cp": _cp,
            "pause": _lifecycle, "resume": _lifecycle, "destroy": _lifecycle}


# -- WebSockets: exec and shell ------------------------------------------------------------------


def ws_url(settings: ClientSettings, path: str) -> str:
    base = settings.url
    if base.startswith("https://"):
        return "wss://" + base[len("https://"):] + path
    if base.startswith("http://"):
        return "ws://" + base[len("http://"):] + path
    return "ws://" + base + path


def _headers(settings: ClientSettings) -> list[tuple[bytes, bytes]]:
    return [(b"X-API-Key", (settings.api_key or "").encode())]


def _single(exc: BaseException) -> BaseException:
    """The one exception inside (nested) single-member groups."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _rejection(exc: BaseException) -> CliError | None:
    """A refused WebSocket upgrade as the API's error (None for other failures)."""
    from trio_websocket import ConnectionRejected

    if isinstance(exc, ConnectionRejected):
        return CliError(error_text(exc.status_code, exc.body or b""))
    return None


def _exec(settings: ClientSettings, args: argparse.Namespace) -> int:
    import trio

    command = _split_exec(args)
    if not command:
        raise CliError("give the command to run: dovecote capsule exec ID -- CMD [ARG...]")
    start: dict[str, Any] = {"type": "start", "cmd": command[0]}
    if len(command) > 1:
        start["args"] = command[1:]
    if args.env:
        start["envs"] = _pairs(args.env, "--env")
    if args.cwd:
        start["cwd"] = args.cwd
    if args.user:
        start["user"] = args.user
    url = ws_url(settings, capsule_path(args.id) + "/exec/stream")

    async def run() -> int:
        from trio_websocket import ConnectionClosed, open_websocket_url

        async with open_websocket_url(url, extra_headers=_headers(settings)) as ws:
            await ws.send_message(json.dumps(start))
            async with trio.open_nursery() as nursery:

                async def stop_on_interrupt() -> None:
                    # Ctrl-C asks the capsule to stop the command; a second one leaves at once.
                    with trio.open_signal_receiver(signal.SIGINT) as signals:
                        interrupts = 0
                        async for _ in signals:
                            interrupts += 1
                            if interrupts > 1:
                                break
                            await ws.send_message(json.dumps({"type": "stop"}))
                    nursery.cancel_scope.cancel()

                nursery.start_soon(stop_on_interrupt)
                try:
                    while True:
                        frame = json.loads(await ws.get_message())
                        kind = frame.get("type")
                        if kind in ("stdout", "stderr"):
                            out = sys.stdout if kind == "stdout" else sys.stderr
                            out.write(frame.get("data", ""))
                            out.flush()
                        elif kind == "exit":
                            code = frame.get("exit_code")
                            nursery.cancel_scope.cancel()
                            return int(code) if isinstance(code, int) else 137
                        elif kind == "error":
                            raise CliError(str(frame.get("data", "error")))
                except ConnectionClosed:
                    raise CliError("the connection closed before the command ended") from None
        return 130

    try:
        return trio.run(run)
    except BaseException as group:  # trio and trio-websocket wrap errors in groups
        exc = _single(group)
        rejected = _rejection(exc)
        if rejected is not None:
            raise rejected from None
        if isinstance(exc, CliError):
            raise exc from None
        if isinstance(exc, OSError):
            raise CliError(f"cannot reach the gateway at {settings.url} ({exc}); "
                           "is `dovecote up` running?") from None
        raise


class _Terminal:
    """Raw mode on a terminal for the session's length (nothing when stdin is not one)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.is_tty = os.isatty(fd)
        self._saved: Any = None

    def __enter__(self) -> _Terminal:
        if self.is_tty:
            import termios
            import tty

            self._saved = termios.tcgetattr(self.fd)
            tty.setraw(self.fd, termios.TCSADRAIN)  # not TCSAFLUSH: keep what was typed already
        return self

    def __exit__(self, *exc: object) -> None:
        if self._saved is not None:
            import termios

            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)

    def size(self) -> tuple[int, int]:
        try:
            size = os.get_terminal_size(sys.stdout.fileno() if os.isatty(1) else self.fd)
        except OSError:
            return 80, 24
        if size.columns <= 0 or size.lines <= 0:  # a terminal that never set its size
            return 80, 24
        return size.columns, size.lines


def _note(text: str) -> None:
    """A line of our own on a terminal in raw mode."""
    os.write(2, f"\r\n[dovecote: {text}]\r\n".encode())


def _shell(settings: ClientSettings, args: argparse.Namespace) -> int:
    import trio

    session = _PtySession(settings, args)
    try:
        with session.terminal:
            return trio.run(session.run)
    except BaseException as group:
        exc = _single(group)
        if isinstance(exc, CliError):
            raise exc from None
        raise


class _PtySession:
    """One PTY in the capsule, kept across connections by its tag."""

    def __init__(self, settings: ClientSettings, args: argparse.Namespace) -> None:
        self.settings = settings
        self.args = args
        self.url = ws_url(settings, capsule_path(args.id) + "/pty")
        self.terminal = _Terminal(sys.stdin.fileno())
        self.tag: str | None = None
        self.received = 0  # offset just past the last output byte written
        self.ws: Any = None

    def start_frame(self) -> dict[str, Any]:
        cols, rows = self.terminal.size()
        if self.tag is not None:
            return {"type": "connect", "tag": self.tag, "since": self.received}
        frame: dict[str, Any] = {"type": "start", "cmd": self.args.cmd, "cols": cols, "rows": rows,
                                 "envs": {"TERM": os.environ.get("TERM") or "xterm-256color"}}
        if self.args.cwd:
            frame["cwd"] = self.args.cwd
        if self.args.user:
            frame["user"] = self.args.user
        return frame

    async def run(self) -> int:
        import trio

        typed_send, typed = trio.open_memory_channel[bytes](256)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._read_stdin, typed_send)
            nursery.start_soon(self._follow_resizes)
            code = await self._connections(typed)
            nursery.cancel_scope.cancel()
        return code

    async def _connections(self, typed: Any) -> int:
        """Connect, and reconnect while the PTY lives; returns its exit code."""
        import trio

        lost_at: float | None = None
        while True:
            try:
                code = await self._connection(typed)
                if code is not None:
                    return code
                failure: str = "the connection closed"
            except BaseException as group:
                exc = _single(group)
                if isinstance(exc, trio.Cancelled | KeyboardInterrupt):
                    raise
                rejected = _rejection(exc)
                if isinstance(exc, CliError):
                    raise exc from None
                if rejected is not None:
                    status = getattr(exc, "status_code", 500)
                    if self.tag is None or 400 <= status < 500:
                        raise rejected from None
                    failure = str(rejected)
                elif self.tag is None:
                    if isinstance(exc, OSError):
                        raise CliError(f"cannot reach the gateway at {self.settings.url} ({exc}); "
                                       "is `dovecote up` running?") from None
                    raise
                else:
                    failure = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if self.ws is not None:  # this connection had worked: a new loss starts now
                lost_at = None
            self.ws = None
            now = trio.current_time()
            if lost_at is None:
                lost_at = now
                _note(f"connection lost ({failure}); reconnecting")
            if now - lost_at > RECONNECT_TIMEOUT_S:
                raise CliError(f"could not reconnect within {RECONNECT_TIMEOUT_S:.0f}s ({failure}); "
                               f"the PTY may still run in the capsule (tag {self.tag})")
            await trio.sleep(1.0)

    async def _connection(self, typed: Any) -> int | None:
        """One WebSocket: the exit code, or None when it dropped with the PTY alive."""
        import trio
        from trio_websocket import ConnectionClosed, open_websocket_url

        async with open_websocket_url(self.url, extra_headers=_headers(self.settings),
                                      connect_timeout=15, disconnect_timeout=2) as ws:
            reconnecting = self.tag is not None
            await ws.send_message(json.dumps(self.start_frame()))
            with trio.fail_after(30):
                first = json.loads(await ws.get_message())
            if first.get("type") == "error":
                raise CliError(str(first.get("data", "the PTY could not start")))
            if first.get("type") != "started":
                raise CliError(f"unexpected first frame {first.get('type')!r}")
            self.tag = str(first["tag"])
            self.ws = ws
            if reconnecting:
                _note("reconnected")
                cols, rows = self.terminal.size()
                await ws.send_message(json.dumps({"type": "resize", "cols": cols, "rows": rows}))
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._send_typed, ws, typed)
                    while True:
                        with trio.move_on_after(SILENCE_S) as silent:
                            raw = await ws.get_message()
                        if silent.cancelled_caught:
                            nursery.cancel_scope.cancel()
                            return None
                        frame = json.loads(raw)
                        kind = frame.get("type")
                        if kind == "output":
                            data = base64.b64decode(frame.get("data", ""))
                            _write_all(1, data)
                            self.received += len(data)
                        elif kind == "exit":
                            nursery.cancel_scope.cancel()
                            code = frame.get("exit_code")
                            return int(code) if isinstance(code, int) else 137
                        elif kind == "error":
                            if frame.get("fatal"):
                                _note(str(frame.get("data", "error")))
                                nursery.cancel_scope.cancel()
                                return None
                            if frame.get("data"):
                                _note(str(frame["data"]))
            except ConnectionClosed:
                return None

    async def _send_typed(self, ws: Any, typed: Any) -> None:
        async for data in typed:
            await ws.send_message(json.dumps(
                {"type": "input", "data": base64.b64encode(data).decode()}))

    async def _read_stdin(self, typed_send: Any) -> None:
        import trio

        fd = self.terminal.fd
        async with typed_send:
            while True:
                try:
                    await trio.lowlevel.wait_readable(fd)
                    data = os.read(fd, 4096)
                except (OSError, ValueError):  # a regular file cannot be polled: read it in a thread
                    data = await trio.to_thread.run_sync(os.read, fd, 4096, abandon_on_cancel=True)
                if not data:  # end of input (a pipe): the PTY's program decides when to end
                    await trio.sleep_forever()
                await typed_send.send(data)

    async def _follow_resizes(self) -> None:
        import trio

        if not self.terminal.is_tty or not hasattr(signal, "SIGWINCH"):
            return
        with trio.open_signal_receiver(signal.SIGWINCH) as resizes:
            async for _ in resizes:
                cols, rows = self.terminal.size()
                if self.ws is not None:
                    try:
                        await self.ws.send_message(json.dumps(
                            {"type": "resize", "cols": cols, "rows": rows}))
                    except Exception:
                        pass


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]

