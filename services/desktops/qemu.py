"""The qemu provider: a desktop session is a capsule of the desktop template.

Everything goes through vmmgr on the bus (``bus/messages/capsules.py``), so a
session is a capsule like any other: it counts against the team's capsule
caps, vmmgr's network guard and reconciliation apply, and deleting the
session destroys the capsule (its VM, overlay, RAM file and directory).

The desktop template (``vmmgr/desktop.py``: the desktop image booted into X
once per host and frozen) is asked for with ``EnsureDesktopTemplate``. When
it is ready, create restores a capsule of it at once (a restore, not a boot)
and answers with the session ``booting``; when it is still being built (the
first session on a host, or after the image's inputs changed), the session
stays ``booting`` while it builds (at most :data:`TEMPLATE_WAIT_S`) and the
capsule is created then. A task then climbs the readiness ladder with real
checks, within ``DOVECOTE_DESKTOP_QEMU_BRIDGE_TIMEOUT_S``:

* ``desktop_ready``: the capsule runs and its display answers the host with
  a graphical screen (``CaptureScreen``: libvirt's screenshot, no agent);
* ``bridge_listening``: the guest agent answers a round trip (it reads the
  desktop's marker file: no process is started, which costs a few hundred ms
  under TCG);
* ``bridge_attached``: vmmgr holds the capsule, running, on the host it was
  created on (``LookupCapsule``); then, in one root shell when there is
  anything to do (:func:`guest_setup_script`), the session's own desktop user
  exists, the ``shared_host_path`` is mounted (vmmgr's ``ShareDirectory`` put
  it in the VM's 9p share first) and, for the ``regression`` profile, the
  window manager is stopped;
* ``runtime_ready``: as the desktop user, ``xdotool getdisplaygeometry``
  answers the session's ``width x height`` (the template's 1440x900: no shell
  at all), else one shell applies it with xrandr (a mode is added when the
  display does not list it) and reads it back with ``xdotool``; then the
  host's screenshot has that size too. (Under TCG every first command in a
  restored guest is slow, QEMU's translation cache being empty: vmmgr's warm
  desktop spares, ``vmmgr/pool.py``, have run these once.)

``shared_host_path`` (a directory under ``DOVECOTE_DESKTOP_SHARE_ROOT``) is the
guest's ``/shared/hostshare``, read-write: the desktop template's VM carries a
9p device exporting a per-capsule directory (a device cannot be added to a
restored VM), vmmgr binds the host directory inside it as ``hostshare``, and
the guest mounts the export at ``/shared`` and gives ``hostshare`` to the
desktop user. While it is mounted, the capsule cannot be paused or snapshotted
(QEMU refuses to migrate a mounted 9p export).

Actions run in the guest through the guest agent as the desktop user
(``ExecCommand`` with ``user``; the agent's environment carries ``DISPLAY``,
``XDG_RUNTIME_DIR`` and the session bus), files through ``ReadFile`` and
``WriteFile``; screenshots come from the host (``CaptureScreen``), before the
bridge is up too.

``boot: "no-bridge"`` breaks the bridge on purpose (the test of the failure
path): once the desktop is up, the guest agent is disabled inside the guest,
so the next rungs' real checks fail until the deadline and the session ends
``failed`` with ``bridge_error``.
"""

from __future__ import annotations

import shlex
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from dovecote.bus.messages import capsules as c
from dovecote.bus.messages import desktops as d
from dovecote.bus.messages.common import Principal
from dovecote.libs.errors import ServiceError
from dovecote.libs.logs import get_logger
from dovecote.services.desktops.sessions import Desktops, Ladder, LiveSession, png_size
from dovecote.vmmgr.domain_xml import SHARE_TAG
from dovecote.vmmgr.guest import GUEST_AGENT
from dovecote.vmmgr.guest.errors import AgentConnectionLost, AgentRequestError

log = get_logger("dovecote.desktops.qemu")

TEMPLATE = "desktop"
IMAGE_USER = "dove"
"""The desktop image's own desktop user (uid 1000, ``/home/dove``, ``/run/user/1000``)."""
TEMPLATE_WAIT_S = 3600.0
"""How long a session waits for the desktop template to be built (image and template: the
first time on a host, minutes under TCG)."""
DESKTOP_MARKER = "/run/dovecote-desktop.ready"
"""Made by the image's desktop session once X answers (``infra/guest/desktop.py``)."""
TEXT_MODES = {(720, 400), (640, 400), (0, 0)}
"""Display sizes of the VGA text console: the desktop is not on screen yet."""
BREAK_BRIDGE = (f"sleep 1; mv {GUEST_AGENT} {GUEST_AGENT}.off; pkill -f {GUEST_AGENT}")
"""``boot: no-bridge``: the agent goes away for good (the init finds no agent to restart)."""


def size_script(width: int, height: int) -> str:
    """Shell run as the desktop user: the X screen at ``width`` x ``height`` (xrandr, unless it
    is that size already, as the template's 1440x900; a mode is added to the output when it
    does not list that size), then X's size printed as ``WxH``.

    X's size is read with ``xdotool getdisplaygeometry``: one small client (under TCG every
    process start counts), and the proof that xdotool answers as the desktop user."""
    clock = round((width + 24) * (height + 3) * 60 / 1e6, 2)
    name = f"{width}x{height}"
    mode = (f"{name}_dc {clock} {width} {width + 8} {width + 16} {width + 24} "
            f"{height} {height + 1} {height + 2} {height + 3} -hsync +vsync")
    return (f"s=$(xdotool getdisplaygeometry) || exit 1; if [ \"$s\" != '{width} {height}' ]; then "
            f"o=$(xrandr | awk '/ connected/ {{print $1; exit}}'); "
            f"xrandr --output \"$o\" --mode {name} 2>/dev/null || "
            f"{{ xrandr --newmode {mode} 2>/dev/null; xrandr --addmode \"$o\" {name}_dc && "
            f"xrandr --output \"$o\" --mode {name}_dc; }}; s=$(xdotool getdisplaygeometry); fi; "
            "echo \"${s% *}x${s#* }\"")


class QemuBridge:
    """Actions through vmmgr's capsule operations, as the desktop user."""

    def __init__(self, bus: Any, actor: Principal, capsule_id: str, host: str, desktop_user: str,
                 env: dict[str, str] | None = None) -> None:
        self.bus, self.actor, self.capsule_id, self.host = bus, actor, capsule_id, host
        self.desktop_user = desktop_user
        self.env = env or {}

    async def exec(self, cmd: str | list[str], *, env: dict[str, str] | None = None,
                   cwd: str | None = None, user: str | None = None,
                   timeout: float = 30.0) -> tuple[str, str, int, bool]:  # noqa: ASYNC109
        if isinstance(cmd, str):
            head, args = cmd, None
        else:
            head, args = cmd[0], list(cmd[1:])
        envs = {**self.env, **(env or {})} or None
        try:
            reply = await self.bus.request(
                f"vmmgr.{self.host}",
                c.ExecCommand(actor=self.actor, capsule_id=self.capsule_id, cmd=head, args=args,
                              timeout_sec=max(1, int(timeout)), envs=envs, cwd=cwd,
                              user=user or self.desktop_user),
                timeout=timeout + 20)
        except ServiceError as exc:
            if exc.status == 408:
                return "", exc.message, 124, True
            if exc.status == 400:  # a cwd that does not exist, an unknown user
                raise AgentRequestError(exc.code, exc.message) from None
            if exc.status in (409, 502, 503):
                raise AgentConnectionLost(f"{exc.code}: {exc.message}") from None
            raise
        result = reply.result
        return result.stdout, result.stderr, result.exit_code, False

    async def read_file(self, path: str) -> bytes:
        try:
            reply = await self.bus.request(f"vmmgr.{self.host}", c.ReadFile(
                actor=self.actor, capsule_id=self.capsule_id, path=path), timeout=60)
        except ServiceError as exc:
            if exc.status < 500:
                raise OSError(f"{exc.code}: {exc.message}") from None
            raise
        return bytes(reply.data)

    async def write_file(self, path: str, data: bytes) -> None:
        try:
            await self.bus.request(f"vmmgr.{self.host}", c.WriteFile(
                actor=self.actor, capsule_id=self.capsule_id, path=path, data=data), timeout=60)
        except ServiceError as exc:
            if exc.status < 500:
                raise OSError(f"{exc.code}: {exc.message}") from None
            raise

    async def screenshot(self) -> bytes:
        return await capture(self.bus, self.actor, self.capsule_id, self.host)


async def capture(bus: Any, actor: Principal, capsule_id: str, host: str) -> bytes:
    """The capsule's display as PNG, from the host (no guest agent)."""
    try:
        reply = await bus.request(f"vmmgr.{host}", c.CaptureScreen(actor=actor, capsule_id=capsule_id),
                                  timeout=30)
    except ServiceError as exc:
        raise OSError(f"{exc.code}: {exc.message}") from None
    return bytes(reply.png)


class QemuProvider:
    """Creates, readies and tears down qemu desktop sessions."""

    def __init__(self, bus: Any) -> None:
        self.bus = bus

    async def template(self, actor: Principal, *, build: bool = True) -> c.DesktopTemplateStatus:
        """The desktop template's status on the host that answers (``build``: its build starts
        if needed)."""
        reply: c.DesktopTemplateStatus = await self.bus.request(
            "vmmgr", c.EnsureDesktopTemplate(actor=actor, build=build), timeout=10)
        return reply

    async def health(self, desktops: Desktops) -> d.ProviderHealth:
        try:
            status = await self.template(Principal(auth_type="system"), build=False)
        except Exception as exc:
            return d.ProviderHealth(enabled=True, status="unavailable", isolation="vm",
                                    reason=f"vmmgr does not answer: {exc}")
        if status.status == "ready":
            return d.ProviderHealth(enabled=True, status="ok", isolation="vm")
        if status.status == "building":
            return d.ProviderHealth(enabled=True, status="degraded", isolation="vm",
                                    reason=f"the desktop template is being built: {status.detail}")
        return d.ProviderHealth(enabled=True, status="unavailable", isolation="vm",
                                reason=f"the desktop template is {status.status}: {status.detail}")

    async def create(self, desktops: Desktops, actor: Principal, body: d.CreateSessionBody,
                     shared: str | None) -> LiveSession:
        await desktops.check_caps(actor)
        try:
            status = await self.template(actor)
        except ServiceError:
            raise
        except Exception as exc:
            raise ServiceError(503, "provider_unavailable", f"vmmgr does not answer: {exc}") from None
        if status.status in ("failed", "unavailable"):
            raise ServiceError(503, "desktop_template_unavailable",
                               f"the desktop template is {status.status} on this host: {status.detail}; "
                               "use provider xvfb where the operator enabled it", retry_after=60)
        session_id = "desk-" + uuid.uuid4().hex[:16]
        user = body.desktop_user or IMAGE_USER
        runtime = body.desktop_runtime_dir or (
            "/run/user/1000" if user == IMAGE_USER else f"/tmp/runtime-{user}")
        record = desktops.new_record(session_id, body, runtime_dir=None,
                                     home=body.desktop_home or f"/home/{user}", user=user, runtime=runtime)
        session = LiveSession(record, actor.team_id, None)
        session.isolation = "vm: a QEMU capsule with its own kernel, behind vmmgr's network guard"
        session.shared_host_path = shared
        if status.status == "ready":
            await self._create_capsule(session, actor)
        await desktops.store.insert_session(record, team_id=actor.team_id,
                                            host_id=desktops.settings.host_id, runtime_dir=None)
        await desktops.save(session)
        desktops.live[session_id] = session
        if desktops.recording is not None:
            await desktops.recording.opened(session)
        await desktops.store.audit(team_id=actor.team_id, actor=actor, event="session.create",
                                   session_id=session_id,
                                   detail={"provider": "qemu", "capsule_id": session.capsule_id,
                                           "template": status.status})
        desktops.nursery.start_soon(self._serve, desktops, session, actor, body)
        return session

    async def _create_capsule(self, session: LiveSession, actor: Principal) -> None:
        spec = c.CapsuleSpec(template=TEMPLATE, metadata={"desktop_session": session.id})
        reply = await self.bus.request("vmmgr", c.CreateCapsule(actor=actor, spec=spec), timeout=60)
        session.capsule_id, session.capsule_host = reply.capsule.id, reply.host_id

    async def _wait_template(self, session: LiveSession, actor: Principal) -> None:
        """The session waits (``booting``) while the template is built, then gets its capsule."""
        with trio.fail_after(TEMPLATE_WAIT_S):
            while True:
                status = await self.template(actor)
                if status.status == "ready":
                    break
                if status.status in ("failed", "unavailable"):
                    raise RuntimeError(f"the desktop template is {status.status}: {status.detail}")
                await trio.sleep(2)
        await self._create_capsule(session, actor)

    async def _serve(self, desktops: Desktops, session: LiveSession, actor: Principal,
                     body: d.CreateSessionBody) -> None:
        ladder: Ladder | None = None
        try:
            with trio.CancelScope() as scope:
                async def stop_waiting() -> None:
                    await session.stop.wait()
                    scope.cancel()

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(stop_waiting)
                    if session.capsule_id is None:
                        await self._wait_template(session, actor)
                        await desktops.save(session)
                    ladder = Ladder(session, desktops.settings.qemu_bridge_timeout_s, desktops.save)
                    await self._climb(desktops, session, actor, body, ladder)
                    if desktops.recording is not None:  # runtime_ready or failed, with the screen
                        await desktops.recording.state(session, actor)
                        await desktops.save(session)
                    await session.stop.wait()
                    nursery.cancel_scope.cancel()
        except Exception as exc:
            log.warning("qemu session failed", exc_info=True, extra={"session_id": session.id})
            if ladder is None:
                ladder = Ladder(session, desktops.settings.qemu_bridge_timeout_s, desktops.save)
            cause: BaseException = exc
            while isinstance(cause, BaseExceptionGroup) and len(cause.exceptions) == 1:
                cause = cause.exceptions[0]
            if session.record.readiness_state not in ("runtime_ready", "failed"):
                await ladder.move("failed", f"the desktop could not start: {cause}")
                if desktops.recording is not None:
                    await desktops.recording.state(session, actor)
            await session.stop.wait()
        finally:
            session.bridge = None
            session.ladder_done.set()
            if session.capsule_id is not None and session.capsule_host is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(60):
                    try:
                        await self.bus.request(f"vmmgr.{session.capsule_host}", c.DestroyCapsule(
                            actor=actor, capsule_id=session.capsule_id), timeout=60)
                    except Exception:
                        log.warning("could not destroy a desktop capsule", exc_info=True,
                                    extra={"capsule_id": session.capsule_id})
            session.stopped.set()

    async def _climb(self, desktops: Desktops, session: LiveSession, actor: Principal,
                     body: d.CreateSessionBody, ladder: Ladder) -> None:
        """The readiness ladder, each rung a real check (see the module's docstring)."""
        assert session.capsule_id is not None and session.capsule_host is not None
        host, capsule_id = session.capsule_host, session.capsule_id
        rec = session.record
        user = rec.desktop_user or IMAGE_USER
        env = {} if user == IMAGE_USER else {"XDG_RUNTIME_DIR": rec.desktop_runtime_dir or "",
                                              "DBUS_SESSION_BUS_ADDRESS": ""}
        bridge = QemuBridge(self.bus, actor, capsule_id, host, user, env)
        status = {"value": "starting"}

        async def lookup() -> c.CapsuleReply:
            reply: c.CapsuleReply = await self.bus.request(
                "vmmgr", c.LookupCapsule(actor=actor, capsule_id=capsule_id), timeout=10)
            status["value"] = reply.capsule.status
            return reply

        def fatal() -> str | None:
            if status["value"] in ("error", "missing", "stopped", "stopping"):
                return f"the desktop capsule is {status['value']}"
            return None

        async def display() -> bool:
            if (await lookup()).capsule.status != "running":
                return False
            return png_size(await capture(self.bus, actor, capsule_id, host)) not in TEXT_MODES

        async def listening() -> bool:
            # A round trip that starts no process in the guest (under TCG a process start is
            # a few hundred ms): the agent reads the desktop's marker file.
            await bridge.read_file(DESKTOP_MARKER)
            return True

        shared = {"done": session.shared_host_path is None}

        async def attached() -> bool:
            reply = await lookup()
            if reply.host_id != host or reply.capsule.status != "running":
                return False
            if not shared["done"]:  # the host directory into the VM's 9p share (vmmgr)
                await self.bus.request(f"vmmgr.{host}", c.ShareDirectory(
                    actor=actor, capsule_id=capsule_id, host_path=session.shared_host_path or ""),
                    timeout=30)
                shared["done"] = True
            script = guest_setup_script(
                user=None if user == IMAGE_USER else user, home=rec.desktop_home or f"/home/{user}",
                runtime=rec.desktop_runtime_dir or "", share=session.shared_host_path is not None,
                bare=rec.qemu_profile == "regression")
            if script:  # as root, in one round trip
                _, err, code, _ = await bridge.exec(script, user="root", timeout=30)
                if code != 0:
                    raise OSError(f"could not set up the desktop: {err.strip()[-300:]}")
            return True

        async def healthy() -> bool:
            # One guest round trip: the size applied and read back by xdotool as the desktop
            # user; then the host's view of the display agrees.
            w, h = rec.width, rec.height
            out, _, code, _ = await bridge.exec(["xdotool", "getdisplaygeometry"], timeout=30)
            if code == 0 and out.split() == [str(w), str(h)]:  # the template's size: no shell
                out = f"{w}x{h}"
            else:
                out, _, code, _ = await bridge.exec(size_script(w, h), timeout=30)
            if code != 0 or out.strip() != f"{w}x{h}":
                raise OSError(f"the display could not be set to {w}x{h} (X reports {out.strip()!r})")
            if png_size(await bridge.screenshot()) != (w, h):
                return False
            session.bridge = bridge
            return True

        checks: tuple[Callable[[], Awaitable[bool]], ...] = (display, listening, attached, healthy)
        for check in checks:
            if not await ladder.rung(check, fatal):
                return
            if check is display and body.boot == "no-bridge":
                await bridge.exec(f"setsid sh -c {shlex.quote(BREAK_BRIDGE)} >/dev/null 2>&1 &",
                                  user="root", timeout=10)
                # The agent goes a second later (so that this exec is answered): the next
                # rungs must not race it on a fast machine.
                with trio.move_on_after(30):
                    for _ in range(60):  # polling the guest: nothing to wait on but its answers
                        if not await self._answers(listening):
                            break
                        await trio.sleep(0.5)

    @staticmethod
    async def _answers(listening: Callable[[], Awaitable[bool]]) -> bool:
        """Whether the guest agent still runs a command (any failure is a no)."""
        try:
            return await listening()
        except Exception:
            return False

    async def destroy_leftovers(self, leftovers: list[tuple[str, str]], wait_s: float = 300.0) -> None:
        """Destroy the capsules of sessions a previous run of this service left (its sessions
        are stopped: nobody can reach them), retrying while vmmgr is not answering yet."""
        with trio.move_on_after(wait_s):
            for team_id, capsule_id in leftovers:
                actor = Principal(auth_type="system", team_id=team_id)
                while True:
                    try:
                        reply = await self.bus.request(
                            "vmmgr", c.LookupCapsule(actor=actor, capsule_id=capsule_id), timeout=10)
                        if reply.capsule.status not in ("stopped", "stopping", "missing"):
                            await self.bus.request(f"vmmgr.{reply.host_id}", c.DestroyCapsule(
                                actor=actor, capsule_id=capsule_id), timeout=60)
                        log.info("destroyed the capsule of a previous run's session",
                                 extra={"capsule_id": capsule_id})
                        break
                    except ServiceError as exc:
                        if exc.status == 404:
                            break
                        await trio.sleep(5)
                    except Exception:
                        await trio.sleep(5)

    async def screenshot(self, desktops: Desktops, session: LiveSession, actor: Principal) -> bytes:
        """The display from the host, before the bridge is up too (409 without a running VM)."""
        if session.capsule_id is None or session.capsule_host is None:
            raise desktops.unavailable(session)
        try:
            return await capture(self.bus, actor, session.capsule_id, session.capsule_host)
        except OSError:
            raise desktops.unavailable(session) from None


def add_user_script(user: str, home: str, runtime: str) -> str:
    """Root shell: ``user`` with ``home`` and ``runtime`` dir, allowed on the X display."""
    q = shlex.quote
    return (f"id -u {q(user)} >/dev/null 2>&1 || useradd -m -d {q(home)} -s /bin/bash {q(user)}; "
            f"mkdir -p {q(runtime)} && chown {q(user)}: {q(runtime)} && chmod 700 {q(runtime)} && "
            f"xhost +SI:localuser:{q(user)} >/dev/null")


SHARE_MOUNT = (
    "modprobe -q 9pnet_virtio 2>/dev/null; mkdir -p /shared && "
    "{ mountpoint -q /shared || mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,cache=none "
    f"{SHARE_TAG} /shared; }} && test -d /shared/hostshare"
)
"""Root shell: the VM's 9p share at ``/shared`` (the host directory is its ``hostshare``)."""
STOP_WINDOW_MANAGER = (
    # The session script restarts openbox when it exits: its restart loop (the subshell
    # running runuser, openbox's grandparent) goes first, then openbox.
    "for p in $(pgrep -x openbox); do r=$(ps -o ppid= -p $p); l=$(ps -o ppid= -p $r); "
    "kill $l; kill $p; done; true"
)
"""Root shell: the ``regression`` profile's desktop runs no window manager."""


def guest_setup_script(*, user: str | None, home: str, runtime: str, share: bool, bare: bool) -> str:
    """Root shell run once when the bridge is attached (empty: nothing to do): the session's
    own desktop user (``user``), the host share mounted and writable by the desktop user
    (``share``), the window manager stopped (``bare``, the ``regression`` profile)."""
    q = shlex.quote
    parts = []
    if user is not None:
        parts.append(add_user_script(user, home, runtime))
    if share:
        owner = q(user or IMAGE_USER)
        parts.append(f"{{ {SHARE_MOUNT} && chown {owner}: /shared/hostshare; }} || "
                     "{ echo 'the host share could not be mounted at /shared/hostshare' >&2; exit 1; }")
    if bare:
        parts.append(STOP_WINDOW_MANAGER)
    return "; ".join(f"{{ {part}; }} || exit 1" for part in parts)
