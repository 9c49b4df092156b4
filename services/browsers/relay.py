"""The CDP relay core: many DevTools clients over one browser connection, without I/O.

A browser session has exactly one DevTools connection to its Chromium (a pipe
on the host, a bus stream through vmmgr and the guest agent in a VM). Every
client (a Playwright or Puppeteer connection through the gateway, and the
service's own monitor, which captures console, network and navigations) gets
its own *root session* on that connection: ``Target.attachToBrowserTarget``
for a browser-level client, ``Target.attachToTarget {flatten: true}`` for a
client of one page's WebSocket. Chromium then keeps the clients apart by
itself (flat session mode):

* client → browser: a message without ``sessionId`` gets the client's root
  session; a message naming a session is only passed when that session is the
  client's (its root or a child attached through it), else the client gets an
  error reply at once. Ids are not rewritten (Chromium matches replies per
  session), so nothing grows per message.
* browser → client: a message for a root session goes to its client without
  the ``sessionId``; one for a child session goes to the child's owner as is.
  ``Target.attachedToTarget`` received on a client's session makes the new
  child session that client's; ``detachedFromTarget`` forgets it.
* A client's messages sent before its root session exists are held (bounded by
  :data:`MAX_PENDING`; the caller stops reading the client meanwhile).
* Removing a client detaches its root session (Chromium detaches its children).

The core also *observes* the commands clients send (:data:`OBSERVED`) and
reports each one with its reply and the time between them
(:class:`Observation`): the action log of CDP clients comes from here. Time is
read through the ``clock`` callable given at construction.

Every call returns a list of :class:`Out` (where each message goes); the
caller does the I/O. Messages are ``bytes`` of JSON.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

BROWSER = -1
"""The destination of messages for the browser connection."""

RELAY_ID_BASE = 2_000_000_000
"""Ids of the relay's own root-level commands (clients never send root-level ones)."""

MAX_PENDING = 256
"""Messages a client may send before its root session exists."""

MAX_IN_FLIGHT_OBSERVED = 4096
"""Observed commands awaiting a reply per client (oldest forgotten beyond it)."""

OBSERVED = frozenset({
    "Page.navigate", "Page.reload", "Page.captureScreenshot", "Input.dispatchMouseEvent",
    "Input.insertText", "Input.dispatchKeyEvent", "Runtime.evaluate", "Page.navigateToHistoryEntry",
})
"""Commands whose replies become :class:`Observation` s (see :func:`action_of`)."""


class RelayError(Exception):
    """A client message the relay cannot pass (not JSON, not an object, a foreign session)."""


@dataclass(frozen=True, slots=True)
class Out:
    dest: int
    """A client id, or :data:`BROWSER`."""
    data: bytes


@dataclass(frozen=True, slots=True)
class Observation:
    client_id: int
    method: str
    params: dict[str, Any]
    result: dict[str, Any] | None
    error: dict[str, Any] | None
    started: float
    finished: float


@dataclass(slots=True)
class _Client:
    id: int
    target_id: str | None
    attach_id: int
    root: str | None = None
    failed: str | None = None
    children: set[str] = field(default_factory=set)
    pending: list[dict[str, Any]] = field(default_factory=list)
    in_flight: dict[tuple[str, int], tuple[str, dict[str, Any], float]] = field(default_factory=dict)


def _dump(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


class RelayCore:
    """See the module docstring. Not thread-safe; one per browser connection."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self._clients: dict[int, _Client] = {}
        self._owner: dict[str, int] = {}
        self._attaching: dict[int, int] = {}
        self._next_client = 1
        self._next_relay_id = RELAY_ID_BASE
        self.observations: list[Observation] = []

    # -- clients -------------------------------------------------------------------

    def add_client(self, target_id: str | None = None) -> tuple[int, list[Out]]:
        """A new client (of the browser, or of one page); returns its id and what to send."""
        client_id = self._next_client
        self._next_client += 1
        attach_id = self._relay_id()
        client = _Client(id=client_id, target_id=target_id, attach_id=attach_id)
        self._clients[client_id] = client
        self._attaching[attach_id] = client_id
        if target_id is None:
            message: dict[str, Any] = {"id": attach_id, "method": "Target.attachToBrowserTarget"}
        else:
            message = {"id": attach_id, "method": "Target.attachToTarget",
                       "params": {"targetId": target_id, "flatten": True}}
        return client_id, [Out(BROWSER, _dump(message))]

    def remove_client(self, client_id: int) -> list[Out]:
        """Forget a client; detach its root session (and so its children)."""
        client = self._clients.pop(client_id, None)
        if client is None:
            return []
        for child in client.children:
            self._owner.pop(child, None)
        if client.root is None:
            return []
        self._owner.pop(client.root, None)
        return [Out(BROWSER, _dump({"id": self._relay_id(), "method": "Target.detachFromTarget",
                                    "params": {"sessionId": client.root}}))]

    def clients(self) -> list[int]:
        return list(self._clients)

    def is_ready(self, client_id: int) -> bool:
        client = self._clients.get(client_id)
        return client is not None and client.root is not None

    def failure(self, client_id: int) -> str | None:
        """Why the client could not attach (its target is gone), or None."""
        client = self._clients.get(client_id)
        return client.failed if client else None

    def pending_count(self, client_id: int) -> int:
        client = self._clients.get(client_id)
        return len(client.pending) if client else 0

    # -- client -> browser -------------------------------------------------------------

    def from_client(self, client_id: int, data: bytes | str) -> list[Out]:
        """One message a client sent.

        Raises:
            RelayError: the message is not a JSON object with an integer ``id``
                and a ``method``; the client is unknown; too many messages before
                its session exists.
        """
        client = self._clients.get(client_id)
        if client is None:
            raise RelayError("unknown client")
        try:
            message = json.loads(data)
        except ValueError:
            raise RelayError("not JSON") from None
        if not isinstance(message, dict) or not isinstance(message.get("id"), int) \
                or isinstance(message.get("id"), bool) or not isinstance(message.get("method"), str):
            raise RelayError("a CDP command is a JSON object with an integer id and a method")
        if client.root is None:
            if client.failed is not None:
                return [Out(client_id, _dump({"id": message["id"], "error": {
                    "code": -32001, "message": client.failed}}))]
            if len(client.pending) >= MAX_PENDING:
                raise RelayError("too many commands before the session is attached")
            client.pending.append(message)
            return []
        return self._forward(client, message)

    def _forward(self, client: _Client, message: dict[str, Any]) -> list[Out]:
        session = message.get("sessionId")
        if session is None:
            message["sessionId"] = client.root
            session = client.root
        elif session != client.root and session not in client.children:
            error = {"id": message["id"], "sessionId": session,
                     "error": {"code": -32001, "message": f"Session with given id not found: {session}"}}
            return [Out(client.id, _dump(error))]
        method = message["method"]
        if method in OBSERVED:
            if len(client.in_flight) >= MAX_IN_FLIGHT_OBSERVED:
                client.in_flight.pop(next(iter(client.in_flight)))
            params = message.get("params")
            client.in_flight[(str(session), message["id"])] = (
                method, params if isinstance(params, dict) else {}, self.clock())
        return [Out(BROWSER, _dump(message))]

    # -- browser -> clients -------------------------------------------------------------

    def from_browser(self, data: bytes | str) -> list[Out]:
        """One message from the browser; where it goes (nowhere if its client is gone)."""
        try:
            message = json.loads(data)
        except ValueError:
            return []
        if not isinstance(message, dict):
            return []
        session = message.get("sessionId")
        if session is None:
            return self._root_level(message)
        owner = self._owner.get(session)
        if owner is None:
            return []
        client = self._clients[owner]
        if "id" in message:
            self._observe(client, str(session), message)
        elif message.get("method") == "Target.attachedToTarget":
            child = (message.get("params") or {}).get("sessionId")
            if isinstance(child, str):
                client.children.add(child)
                self._owner[child] = owner
        elif message.get("method") == "Target.detachedFromTarget":
            child = (message.get("params") or {}).get("sessionId")
            if isinstance(child, str) and child in client.children:
                client.children.discard(child)
                self._owner.pop(child, None)
        if session == client.root:
            del message["sessionId"]
            return [Out(owner, _dump(message))]
        return [Out(owner, data if isinstance(data, bytes) else data.encode())]

    def _root_level(self, message: dict[str, Any]) -> list[Out]:
        msg_id = message.get("id")
        if not isinstance(msg_id, int) or msg_id not in self._attaching:
            return []  # our detach replies, root-level events nobody asked for
        client = self._clients.get(self._attaching.pop(msg_id))
        if client is None:
            # The client left before its session existed: detach it now.
            root = (message.get("result") or {}).get("sessionId")
            return [] if not isinstance(root, str) else [Out(BROWSER, _dump({
                "id": self._relay_id(), "method": "Target.detachFromTarget", "params": {"sessionId": root}}))]
        root = (message.get("result") or {}).get("sessionId")
        if not isinstance(root, str):
            client.failed = str((message.get("error") or {}).get("message") or "cannot attach")
            refused = [Out(client.id, _dump({"id": m["id"], "error": {"code": -32001,
                                                                      "message": client.failed}}))
                       for m in client.pending]
            client.pending.clear()
            return refused
        client.root = root
        self._owner[root] = client.id
        out: list[Out] = []
        for pending in client.pending:
            out += self._forward(client, pending)
        client.pending.clear()
        return out

    def _observe(self, client: _Client, session: str, message: dict[str, Any]) -> None:
        msg_id = message.get("id")
        if not isinstance(msg_id, int):
            return
        entry = client.in_flight.pop((session, msg_id), None)
        if entry is None:
            return
        method, params, started = entry
        result = message.get("result")
        error = message.get("error")
        self.observations.append(Observation(
            client_id=client.id, method=method, params=params,
            result=result if isinstance(result, dict) else None,
            error=error if isinstance(error, dict) else None, started=started, finished=self.clock()))

    def take_observations(self) -> list[Observation]:
        taken, self.observations = self.observations, []
        return taken

    def _relay_id(self) -> int:
        self._next_relay_id += 1
        return self._next_relay_id


INTERNAL_MARKERS = ("__playwright", "__puppeteer", "//# sourceURL=__")


def action_of(obs: Observation) -> tuple[str, dict[str, Any]] | None:
    """The action-log entry ``(type, details)`` of an observed command, or None.

    A click is a ``mousePressed`` (the move and release around it are not
    actions), a scroll a ``mouseWheel``; typing is ``insertText`` or a key
    press that types text; evaluations by the automation library itself
    (Playwright's and Puppeteer's utility scripts) are not actions.
    """
    p = obs.params
    if obs.method in ("Page.navigate", "Page.navigateToHistoryEntry"):
        return "navigate", {"url": p.get("url", "")} if "url" in p else {"entryId": p.get("entryId")}
    if obs.method == "Page.reload":
        return "navigate", {"reload": True}
    if obs.method == "Page.captureScreenshot":
        return "screenshot", {"format": p.get("format", "png")}
    if obs.method == "Input.dispatchMouseEvent":
        if p.get("type") == "mousePressed":
            return "click", {"x": p.get("x"), "y": p.get("y"), "button": p.get("button", "left"),
                             "clickCount": p.get("clickCount", 1)}
        if p.get("type") == "mouseWheel":
            return "scroll", {"deltaX": p.get("deltaX", 0), "deltaY": p.get("deltaY", 0)}
        return None
    if obs.method == "Input.insertText":
        return "type", {"text": str(p.get("text", ""))[:500]}
    if obs.method == "Input.dispatchKeyEvent":
        if p.get("type") in ("keyDown", "char") and p.get("text"):
            return "type", {"text": str(p.get("text"))[:500], "key": p.get("key")}
        return None
    if obs.method == "Runtime.evaluate":
        expression = str(p.get("expression", ""))
        if any(marker in expression for marker in INTERNAL_MARKERS):
            return None
        return "evaluate", {"expression": expression[:500]}
    return None
