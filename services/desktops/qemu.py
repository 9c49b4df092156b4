"""The qemu provider: a desktop session is a capsule of the desktop template.

Everything goes through vmmgr on the bus (``bus/messages/capsules.py``), so a
session is a capsule like any other: it counts against the team's capsule
caps, vmmgr's network guard and reconciliation apply, and deleting the
session destroys the capsule.

Create asks ``vmmgr`` for a capsule of ``DOVECOTE_DESKTOP_TEMPLATE`` (a booted
desktop frozen once per host: a restore, not a boot) and answers at once with
the session ``booting``; a task then climbs the readiness ladder with real
checks through vmmgr:

* ``desktop_ready``: the capsule runs and its X display answers (``xdpyinfo``);
* ``bridge_listening``: the guest agent answers a ping;
* ``bridge_attached``: vmmgr holds the capsule on its host (``LookupCapsule``);
* ``runtime_ready``: the session's size is applied (``xrandr``) and a health
  round trip as the desktop user passes (``xdotool getmouselocation``).

Actions run in the guest through the guest agent (``ExecCommand`` wrapped in
``runuser`` for the desktop user, ``ReadFile``/``WriteFile``).
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
from dovecote.services.desktops.sessions import Desktops, Ladder, LiveSession

log = get_logger("dovecote.desktops.qemu")

VCPUS, MEMORY_MB = 2, 2048
PROFILES = {"product": "openbox", "regression": "none"}


class QemuBridge:
    """Actions through vmmgr's capsule operations, as the desktop user."""

    def __init__(self, bus: Any, actor: Principal, capsule_id: str, host: str, desktop_user: str) -> None:
        self.bus, self.actor, self.capsule_id, self.host = bus, actor, capsule_id, host
        self.desktop_user = desktop_user
        self._shot = 0

    async def exec(self, cmd: str | list[str], *, env: dict[str, str] | None = None,
                   cwd: str | None = None, user: str | None = None,
                   timeout: float = 30.0) -> tuple[str, str, int, bool]:  # noqa: ASYNC109
        line = cmd if isinstance(cmd, str) else shlex.join(cmd)
        who = user or self.desktop_user
        wrapped = f"exec runuser -u {shlex.quote(who)} -- env DISPLAY=:0 sh -c {shlex.quote(line)}"
        reply = await self.bus.request(
            f"vmmgr.{self.host}",
            c.ExecCommand(actor=self.actor, capsule_id=self.capsule_id, cmd=wrapped,
                          timeout_sec=max(1, int(timeout)), envs=env, cwd=cwd),
            timeout=timeout + 20)
        result = reply.result
        return result.stdout, result.stderr, result.exit_code, False

    async def read_file(self, path: str) -> bytes:
        reply = await self.bus.request(f"vmmgr.{self.host}", c.ReadFile(
            actor=self.actor, capsule_id=self.capsule_id, path=path), timeout=60)
        return bytes(reply.data)

    async def write_file(self, path: str, data: bytes) -> None:
        await self.bus.request(f"vmmgr.{self.host}", c.WriteFile(
            actor=self.actor, capsule_id=self.capsule_id, path=path, data=data), timeout=60)

    async def screenshot(self) -> bytes:
        self._shot += 1
        path = f"/tmp/dovecote-shot-{self._shot}.png"
        _, err, code, _ = await self.exec(["import", "-silent", "-window", "root", "png24:" + path],
                                          timeout=30)
        if code != 0:
            raise OSError(f"import exited with {code}: {err.strip()[-300:]}")
        return await self.read_file(path)


class QemuProvider:
    """Creates, readies and tears down qemu desktop sessions."""

    def __init__(self, bus: Any) -> None:
        self.bus = bus

    async def _template_exists(self, actor: Principal, name: str) -> bool:
        reply = await self.bus.request("vmmgr", c.ListTemplates(actor=actor), timeout=10)
        return any(t.name == name for t in reply.templates)

    async def health(self, desktops: Desktops) -> d.ProviderHealth:
        name = desktops.settings.qemu_template
        try:
            found = await self._template_exists(Principal(auth_type="system"), name)
        except Exception as exc:
            return d.ProviderHealth(enabled=True, status="unavailable", isolation="vm",
                                    reason=f"vmmgr does not answer: {exc}")
        if not found:
            return d.ProviderHealth(enabled=True, status="unavailable", isolation="vm",
                                    reason=f"the desktop template {name!r} is not built on this host")
        return d.ProviderHealth(enabled=True, status="ok", isolation="vm")

    async def create(self, desktops: Desktops, actor: Principal, body: d.CreateSessionBody,
                     shared: str | None) -> LiveSession:
        name = desktops.settings.qemu_template
        if shared is not None:
            raise ServiceError(501, "unsupported", "shared_host_path is not supported by the qemu "
                               "provider yet")
        if not await self._template_exists(actor, name):
            raise ServiceError(503, "desktop_template_unavailable",
                               f"the desktop template {name!r} is not built on this host yet; "
                               "use provider xvfb where the operator enabled it")
        session_id = "desk-" + uuid.uuid4().hex[:16]
        spec = c.CapsuleSpec(template=name, vcpus=VCPUS, memory_mb=MEMORY_MB,
                             metadata={"desktop_session": session_id})
        reply = await self.bus.request("vmmgr", c.CreateCapsule(actor=actor, spec=spec), timeout=60)
        user = body.desktop_user or "dove"
        record = desktops.new_record(session_id, body, runtime_dir=None,
                                     home=body.desktop_home or f"/home/{user}", user=user,
                                     runtime=body.desktop_runtime_dir or "/run/user/1000")
        session = LiveSession(record, actor.team_id, None)
        session.capsule_id, session.capsule_host = reply.capsule.id, reply.host_id
        session.isolation = "vm: a QEMU capsule with its own kernel, behind vmmgr's network guard"
        await desktops.store.insert_session(record, team_id=actor.team_id,
                                            host_id=desktops.settings.host_id, runtime_dir=None)
        await desktops.save(session)
        desktops.live[session_id] = session
        await desktops.store.audit(team_id=actor.team_id, actor=actor, event="session.create",
                                   session_id=session_id,
                                   detail={"provider": "qemu", "capsule_id": reply.capsule.id})
        desktops.nursery.start_soon(self._serve, desktops, session, actor, body)
        return session

    async def _serve(self, desktops: Desktops, session: LiveSession, actor: Principal,
                     body: d.CreateSessionBody) -> None:
        assert session.capsule_id is not None and session.capsule_host is not None
        host, capsule_id = session.capsule_host, session.capsule_id
        bridge = QemuBridge(self.bus, actor, capsule_id, host, session.record.desktop_user or "dove")
        ladder = Ladder(session, desktops.settings.qemu_bridge_timeout_s, desktops.save)
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
            _, _, code, _ = await bridge.exec("xdpyinfo >/dev/null", timeout=10)
            return code == 0

        async def listening() -> bool:
            await self.bus.request(f"vmmgr.{host}", c.PingCapsule(actor=actor, capsule_id=capsule_id),
                                   timeout=10)
            return True

        async def attached() -> bool:
            reply = await lookup()
            return reply.host_id == host and reply.capsule.status == "running"

        async def healthy() -> bool:
            w, h = session.record.width, session.record.height
            await bridge.exec(f"xrandr -s {w}x{h} || xrandr --fb {w}x{h}", timeout=20)
            _, _, code, _ = await bridge.exec("xdotool getmouselocation", timeout=10)
            if code == 0:
                session.bridge = bridge
            return code == 0

        try:
            checks: tuple[Callable[[], Awaitable[bool]], ...] = (display, listening, attached, healthy)
            if body.boot == "no-bridge":
                checks = (display,)
            for check in checks:
                if not await ladder.rung(check, fatal):
                    break
            if body.boot == "no-bridge":
                await ladder.rung(_never, fatal)
            await session.stop.wait()
        except Exception as exc:
            log.warning("qemu session failed", exc_info=True, extra={"session_id": session.id})
            await ladder.move("failed", f"the desktop could not start: {exc}")
            await session.stop.wait()
        finally:
            session.bridge = None
            session.ladder_done.set()
            with trio.CancelScope(shield=True), trio.move_on_after(60):
                try:
                    await self.bus.request(f"vmmgr.{host}", c.DestroyCapsule(
                        actor=actor, capsule_id=capsule_id), timeout=60)
                except Exception:
                    log.warning("could not destroy a desktop capsule", exc_info=True,
                                extra={"capsule_id": capsule_id})
            session.stopped.set()

    async def screenshot(self, desktops: Desktops, session: LiveSession) -> bytes:
        raise desktops.unavailable(session)


async def _never() -> bool:
    return False
