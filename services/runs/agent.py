"""The agents that drive a desktop: the scripted one (a scenario's own steps) and the planner's tools.

A scripted step is a desktop action (``kind`` as in ``POST /api/sessions/:id/actions``)
or one of two waits (``wait {seconds}``, ``wait_for_window {name | class, timeout_s}``).
The planner (``libs/planner.py``) gets :data:`DESKTOP_TOOLS`: ``computer``
(an ``action`` of the desktop's kinds and its fields), ``run_command``,
``read_file``, ``write_file``, ``ask_confirmation`` and ``done``.

Policy: a scenario's ``policy.forbidden_actions`` lists action kinds the run
may not take (a step or tool call of such a kind ends the run
``Blocked.SecurityBoundary``); ``policy.sensitive_actions`` lists kinds a live
session asks to confirm first.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import trio

from dovecote.bus.messages import desktops as d
from dovecote.services.runs.desk import Desk

MAX_WAIT_S = 30.0
MAX_WINDOW_WAIT_S = 100.0
"""A window may take over a minute to show on a qemu desktop under TCG (below the 120 s of a command)."""


class Refused(Exception):
    """The run's policy forbids an action (``Blocked.SecurityBoundary``)."""


class StepFailed(Exception):
    """An action's receipt was an error (``Failed.ExecutionError`` or ``Failed.ElementNotFound``)."""

    def __init__(
        self, message: str, code: str = "Failed.ExecutionError", details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.details = details or {}


def to_action(step: dict[str, Any]) -> d.ActionBase:
    try:
        action: d.ActionBase = msgspec.convert(step, d.Action)
    except msgspec.ValidationError as exc:
        raise StepFailed(f"not a desktop action: {exc}") from None
    return action


def check_policy(kind: str, policy: dict[str, Any]) -> None:
    if kind in (policy.get("forbidden_actions") or []):
        raise Refused(f"the run's policy forbids {kind}")


async def run_step(desk: Desk, step: dict[str, Any], policy: dict[str, Any]) -> d.ActionReceipt | None:
    kind = str(step.get("kind", ""))
    if kind == "wait":
        await desk.emit("log", f"wait {step.get('seconds', 1)} s")
        await trio.sleep(min(MAX_WAIT_S, float(step.get("seconds", 1))))
        return None
    if kind == "wait_for_window":
        timeout = min(MAX_WINDOW_WAIT_S, float(step.get("timeout_s", 15)))
        what = (
            f"--class {shlex.quote(str(step['class']))}"
            if step.get("class")
            else f"--name {shlex.quote(str(step.get('name', '')))}"
        )
        # A deadline, not a count of tries: under TCG one xdotool call takes a while.
        command = (
            f"end=$(( $(date +%s) + {int(timeout)} )); while [ $(date +%s) -lt $end ]; do "
            f"xdotool search --onlyvisible {what} >/dev/null 2>&1 && exit 0; sleep 0.5; done; exit 1"
        )
        check_policy("run_command", policy)
        receipt = await desk.act(d.RunCommand(command=command), screenshot=True)
        if receipt.status != "ok":
            raise StepFailed(
                f"no window {step.get('class') or step.get('name')} within {timeout} s",
                "Failed.ElementNotFound",
            )
        return receipt
    check_policy(kind, policy)
    action = to_action(step)
    receipt = await desk.act(
        action,
        screenshot=kind not in ("read_file", "write_file"),
        announce=[("tool_call", kind, {"name": "computer", "arguments": step})],
    )
    if receipt.status != "ok":
        error = receipt.error
        raise StepFailed(
            f"{kind} failed: {error.message if error else 'error'}",
            details={"receipt": msgspec.to_builtins(receipt)},
        )
    return receipt


def _tool(name: str, description: str, properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {"type": "object", "properties": properties, "required": required},
        },
    }


DESKTOP_TOOLS = [
    _tool(
        "computer",
        "One desktop action: action is one of "
        + ", ".join(k for k in d.ACTION_KINDS if not k.startswith("browser_"))
        + ", with that action's fields",
        {
            "action": {"type": "string"},
            "x": {"type": "integer"},
            "y": {"type": "integer"},
            "text": {"type": "string"},
            "key": {"type": "string"},
            "keys": {"type": "array", "items": {"type": "string"}},
            "name": {"type": "string"},
            "button": {"type": "string"},
        },
        ["action"],
    ),
    _tool(
        "run_command", "Run a shell command as the desktop user", {"command": {"type": "string"}}, ["command"]
    ),
    _tool(
        "read_file",
        "Read a file (relative to the desktop user's home)",
        {"path": {"type": "string"}},
        ["path"],
    ),
    _tool(
        "write_file",
        "Write a file",
        {"path": {"type": "string"}, "contents": {"type": "string"}},
        ["path", "contents"],
    ),
    _tool(
        "ask_confirmation",
        "Ask the operator to confirm before going on",
        {"message": {"type": "string"}, "options": {"type": "array", "items": {"type": "string"}}},
        ["message"],
    ),
    _tool("done", "The task is finished", {"summary": {"type": "string"}}, []),
]

SYSTEM_PROMPT = (
    "You operate a Linux desktop (openbox, mousepad, xterm, pcmanfm) for the user with the "
    "tools given. Call one or more tools per turn; call done when the task is finished."
)

Confirm = Callable[[str, list[str]], Awaitable[str]]


class DesktopTools:
    """The planner's tools on a :class:`Desk` (``libs.planner.Tools``)."""

    def __init__(self, desk: Desk, policy: dict[str, Any], confirm: Confirm | None) -> None:
        self.desk = desk
        self.policy = policy
        self.confirm = confirm

    async def call(self, name: str, arguments: dict[str, Any]) -> str:
        call_event = ("tool_call", name, {"name": name, "arguments": arguments})
        if name not in ("computer", "run_command", "read_file", "write_file"):
            await self.desk.emit(*call_event)
        if name == "ask_confirmation":
            if self.confirm is None:
                raise Refused("a confirmation was asked where nobody can answer")
            options = [str(o) for o in arguments.get("options") or ["confirmed", "rejected"]]
            choice = await self.confirm(str(arguments.get("message", "")), options)
            await self.desk.emit("tool_result", f"ask_confirmation: {choice}", {"choice": choice})
            return choice
        if name == "computer":
            step = {k: v for k, v in arguments.items() if k != "action"}
            step["kind"] = str(arguments.get("action", ""))
        elif name == "run_command":
            step = {"kind": "run_command", "command": str(arguments.get("command", ""))}
        elif name in ("read_file", "write_file"):
            step = {"kind": name, **arguments}
        else:
            raise ValueError(f"unknown tool {name}")
        kind = str(step["kind"])
        announce = [call_event]
        try:
            check_policy(kind, self.policy)
            action = to_action(step)
        except (Refused, StepFailed):
            await self.desk.emit(*call_event)
            raise
        if kind in (self.policy.get("sensitive_actions") or []) and self.confirm is not None:
            await self.desk.emit(*call_event)
            announce = []
            choice = await self.confirm(f"allow {kind}?", ["confirmed", "rejected"])
            if choice != "confirmed":
                return "the operator rejected this action"
        receipt = await self.desk.act(
            action, screenshot=kind not in ("read_file", "write_file"), announce=announce
        )
        return json.dumps(
            {"status": receipt.status, "result": receipt.result, "error": msgspec.to_builtins(receipt.error)}
        )
