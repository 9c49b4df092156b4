"""Actions without I/O: checks, the command each kind runs in the guest, receipts.

:func:`check` refuses an action that cannot be run on a session of a given
size (coordinates outside ``width x height``, an empty key, a window id that is
not one). :func:`command_for` turns an input or window action into the argv
run in the guest as the desktop user (``xdotool``), with the ``result`` the
receipt carries when it succeeds. Commands, files and browser kinds are run by
the session (:mod:`.sessions`) since they need more than one argv.

:func:`exec_error` classifies a failed command into the reference's
StructuredError codes: exit 127 (``sh`` found no such program) is
``missing_tool``, anything else ``command_failed``.
"""

from __future__ import annotations

import math
import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from dovecote.bus.messages import desktops as d
from dovecote.services.desktops.errors import InvalidAction, structured

MAX_TEXT = 64 * 1024
MAX_COMMAND = 64 * 1024
MAX_FILE = 8 * 1024 * 1024
MAX_KEYS = 16
KEY_RE = re.compile(r"^[A-Za-z0-9_+\-]{1,64}$")
WINDOW_RE = re.compile(r"^(0x[0-9a-fA-F]{1,16}|[0-9]{1,20})$")
SCROLL_STEP = 100
"""Pixels of ``delta`` per emulated wheel click."""
MAX_SCROLL_CLICKS = 100

BUTTONS = {"left": "1", "middle": "2", "right": "3"}

APPS: dict[str, str] = {
    "text_editor": "mousepad", "editor": "mousepad", "gedit": "mousepad", "mousepad": "mousepad",
    "terminal": "xterm", "xterm": "xterm",
    "file_manager": "pcmanfm", "files": "pcmanfm", "pcmanfm": "pcmanfm",
    "browser": "chromium", "chromium": "chromium", "chrome": "chromium",
}
"""``open_app`` names and the program each starts (any other plain program name runs as is)."""
APP_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")

CAPABILITIES: tuple[tuple[str, str, str], ...] = (
    ("mouse_move", "Move the pointer to (x, y)", "input"),
    ("mouse_click", "Click a button, optionally at (x, y)", "input"),
    ("mouse_drag", "Drag from one point to another with the left button", "input"),
    ("scroll", "Scroll by delta_x, delta_y pixels (emulated wheel clicks)", "input"),
    ("key_press", "Press one key (X keysym name)", "input"),
    ("type_text", "Type text into the focused window", "input"),
    ("hotkey", "Press a key combination", "input"),
    ("open_app", "Start an application by name", "apps"),
    ("focus_window", "Activate a window by id", "windows"),
    ("resize_window", "Move and resize a window", "windows"),
    ("run_command", "Run a shell command in the guest", "commands"),
    ("read_file", "Read a text file in the guest", "files"),
    ("write_file", "Write a text file in the guest", "files"),
    ("browser_open", "Open a URL in the session's browser", "browser"),
    ("browser_get_dom", "Read the page's DOM", "browser"),
    ("browser_click", "Click in the page", "browser"),
    ("browser_type", "Type into the page", "browser"),
    ("browser_screenshot", "Screenshot of the page", "browser"),
)


def now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def capabilities(*, browser: bool) -> list[d.ActionCapability]:
    """The actions a ready session lists (the browser kinds only when it drives a browser)."""
    return [d.ActionCapability(name=name, description=desc, category=cat,
                               requires_approval=name == "run_command")
            for name, desc, cat in CAPABILITIES if browser or cat != "browser"]


def _point(x: int | None, y: int | None, width: int, height: int, what: str = "") -> None:
    for axis, value, limit in (("x", x, width), ("y", y, height)):
        if value is not None and not 0 <= value < limit:
            raise InvalidAction(f"{what}{axis}={value} is outside the session's "
                                f"{width}x{height} screen (0..{limit - 1})")


def _window(window_id: str | int) -> str:
    text = str(window_id)
    if not WINDOW_RE.match(text):
        raise InvalidAction("window_id must be a decimal or 0x-hex X window id")
    return text


def check(action: d.ActionBase, width: int, height: int) -> None:
    """Raise :class:`InvalidAction` if ``action`` cannot run on a ``width x height`` session."""
    match action:
        case d.MouseMove(x=x, y=y):
            _point(x, y, width, height)
        case d.MouseClick(x=x, y=y):
            if (x is None) != (y is None):
                raise InvalidAction("mouse_click takes both x and y, or neither")
            _point(x, y, width, height)
        case d.MouseDrag():
            _point(action.start_x, action.start_y, width, height, "start_")
            _point(action.end_x, action.end_y, width, height, "end_")
        case d.Scroll(delta_x=dx, delta_y=dy):
            if abs(dx) > SCROLL_STEP * MAX_SCROLL_CLICKS or abs(dy) > SCROLL_STEP * MAX_SCROLL_CLICKS:
                raise InvalidAction(f"scroll deltas are at most {SCROLL_STEP * MAX_SCROLL_CLICKS} pixels")
        case d.KeyPress(key=key):
            if not KEY_RE.match(key):
                raise InvalidAction("key must be an X keysym name such as Return, ctrl+s or F5")
        case d.Hotkey(keys=keys):
            if not keys or len(keys) > MAX_KEYS or not all(KEY_RE.match(k) for k in keys):
                raise InvalidAction(f"keys must be 1 to {MAX_KEYS} key names such as ctrl, shift, s")
        case d.TypeText(text=text):
            if len(text) > MAX_TEXT:
                raise InvalidAction(f"text is longer than {MAX_TEXT} characters")
        case d.OpenApp(name=name):
            if not APP_NAME_RE.match(name):
                raise InvalidAction("name must be an application name such as text_editor, "
                                    "terminal, file_manager or a program name")
        case d.FocusWindow(window_id=wid):
            _window(wid)
        case d.ResizeWindow(window_id=wid, bounds=b):
            _window(wid)
            if b.width <= 0 or b.height <= 0 or b.width > 16384 or b.height > 16384:
                raise InvalidAction("bounds width and height must be between 1 and 16384")
            if abs(b.x) > 16384 or abs(b.y) > 16384:
                raise InvalidAction("bounds x and y must be within ±16384")
        case d.RunCommand(command=command, env=env):
            if not command.strip() or len(command) > MAX_COMMAND:
                raise InvalidAction(f"command must be non-empty and at most {MAX_COMMAND} characters")
            if "\0" in command or any("=" in k or "\0" in k or not k or "\0" in v
                                      for k, v in (env or {}).items()):
                raise InvalidAction("command and env must not contain NUL; env names must not contain '='")
        case d.ReadFileAction(path=path) | d.WriteFileAction(path=path):
            if not path or "\0" in path or len(path) > 4096:
                raise InvalidAction("path must be a non-empty path without NUL")
            if isinstance(action, d.WriteFileAction) and len(action.contents) > MAX_FILE:
                raise InvalidAction(f"contents are larger than {MAX_FILE} bytes")
        case d.BrowserClick(x=x, y=y):
            _point(x, y, width, height)
        case _:
            pass


@dataclass(frozen=True, kw_only=True)
class Command:
    """One argv run in the guest as the desktop user, and the result it means."""

    argv: list[str]
    result: dict[str, Any] = field(default_factory=dict)
    tool: str = "xdotool"


def scroll_clicks(delta: int) -> int:
    """Wheel clicks emulating ``delta`` pixels (at least one for any non-zero delta)."""
    return 0 if delta == 0 else max(1, min(MAX_SCROLL_CLICKS, math.ceil(abs(delta) / SCROLL_STEP)))


def command_for(action: d.ActionBase) -> Command | None:
    """The ``xdotool`` argv of an input or window action, or None for the other kinds."""
    match action:
        case d.MouseMove(x=x, y=y):
            return Command(argv=["xdotool", "mousemove", str(x), str(y)],
                           result={"x": x, "y": y})
        case d.MouseClick(x=x, y=y, button=button):
            argv = ["xdotool"]
            if x is not None and y is not None:
                argv += ["mousemove", str(x), str(y)]
            return Command(argv=[*argv, "click", BUTTONS[button]], result={"button": button})
        case d.MouseDrag():
            a = action
            return Command(argv=["xdotool", "mousemove", str(a.start_x), str(a.start_y),
                                 "mousedown", "1", "mousemove", str(a.end_x), str(a.end_y),
                                 "mouseup", "1"],
                           result={"start": [a.start_x, a.start_y], "end": [a.end_x, a.end_y]})
        case d.Scroll(delta_x=dx, delta_y=dy):
            argv = ["xdotool"]
            vertical, horizontal = scroll_clicks(dy), scroll_clicks(dx)
            if vertical:
                argv += ["click", "--repeat", str(vertical), "5" if dy > 0 else "4"]
            if horizontal:
                argv += ["click", "--repeat", str(horizontal), "7" if dx > 0 else "6"]
            if len(argv) == 1:
                argv = ["true"]
            return Command(argv=argv, result={"delta_y": dy, "emulated_clicks": vertical + horizontal})
        case d.KeyPress(key=key):
            return Command(argv=["xdotool", "key", "--clearmodifiers", key], result={"key": key})
        case d.TypeText(text=text):
            return Command(argv=["xdotool", "type", "--delay", "8", "--", text], result={"typed": text})
        case d.Hotkey(keys=keys):
            return Command(argv=["xdotool", "key", "--clearmodifiers", "+".join(keys)],
                           result={"keys": list(keys)})
        case d.FocusWindow(window_id=wid):
            return Command(argv=["xdotool", "windowactivate", "--sync", _window(wid)],
                           result={"window_id": wid})
        case d.ResizeWindow(window_id=wid, bounds=b):
            w = _window(wid)
            return Command(argv=["xdotool", "windowsize", "--sync", w, str(b.width), str(b.height),
                                 "windowmove", "--sync", w, str(b.x), str(b.y)],
                           result={"window_id": wid, "bounds": {"x": b.x, "y": b.y, "width": b.width,
                                                                 "height": b.height}})
    return None


def app_command(name: str) -> str:
    """The program ``open_app`` starts for ``name``."""
    return APPS.get(name.lower(), name)


def launch_script(program: str) -> str:
    """A shell line starting ``program`` detached, failing with 127 when it is not installed."""
    log = f"/tmp/open_app-{program}.log"
    return (f"command -v {program} >/dev/null 2>&1 || {{ echo '{program}: not installed' >&2; exit 127; }}; "
            f"setsid nohup {program} >{log} 2>&1 </dev/null & echo started")


def receipt(action: d.ActionBase, started_at: str, *, result: dict[str, Any] | None = None,
            error: d.StructuredError | None = None) -> d.ActionReceipt:
    """An ActionReceipt: ``ok`` with ``result``, or ``error`` (result ``{}``)."""
    return d.ActionReceipt(
        status="error" if error else "ok", receipt_id=str(uuid.uuid4()),
        action_type=str(type(action).__struct_config__.tag), started_at=started_at,
        completed_at=now_iso(), result={} if error else (result or {}), artifacts=[], error=error)


def exec_error(tool: str, exit_code: int, stdout: str, stderr: str, *,
               timed_out: bool = False) -> d.StructuredError:
    """The StructuredError of a command that exited non-zero."""
    details = {"exit_code": exit_code, "stdout": stdout[-4096:], "stderr": stderr[-4096:]}
    if exit_code == 127:
        return structured("missing_tool", f"{tool} is not installed in the session",
                          category="environment", details=details)
    why = "timed out" if timed_out else f"exited with status {exit_code}"
    return structured("command_failed", f"{tool} {why}: {stderr.strip()[-300:]}".rstrip(": "),
                      category="execution", retryable=True, details=details)


def unsupported(kind: str, why: str) -> d.StructuredError:
    return structured("unsupported", f"{kind} is not supported: {why}", category="unsupported")


def io_error(message: str, path: str) -> d.StructuredError:
    return structured("io_error", message, category="io", details={"path": path})


PROBE_SCRIPT = (
    "w=$(xdotool getactivewindow 2>/dev/null); echo \"WINDOW=$w\"; "
    "if [ -n \"$w\" ]; then echo \"TITLE=$(xdotool getwindowname \"$w\" 2>/dev/null)\"; "
    "echo \"CLASS=$(xprop -id \"$w\" WM_CLASS 2>/dev/null)\"; fi; "
    "xdotool getmouselocation --shell 2>/dev/null"
)
"""Run in the guest by ``observation``: the active window and the pointer."""


def parse_probe(stdout: str) -> tuple[d.ActiveWindow | None, d.CursorPosition | None]:
    """The active window and pointer position from :data:`PROBE_SCRIPT`'s output."""
    values: dict[str, str] = {}
    for line in stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = value.strip()
    window = None
    if values.get("WINDOW", "").isdigit():
        classes = re.findall(r'"([^"]*)"', values.get("CLASS", ""))
        window = d.ActiveWindow(id=values["WINDOW"], title=values.get("TITLE", ""),
                                class_name=classes[-1] if classes else "")
    cursor = None
    if values.get("X", "").lstrip("-").isdigit() and values.get("Y", "").lstrip("-").isdigit():
        screen = values.get("SCREEN", "0")
        cursor = d.CursorPosition(x=int(values["X"]), y=int(values["Y"]),
                                  screen=int(screen) if screen.isdigit() else 0)
    return window, cursor
