"""The capsule handlers of vmmgr on the fake driver, for the test modules that use them:
principals, an event recorder, :func:`open_capsules` and :func:`wait_status`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from dovecote.bus.messages import capsules as m
from dovecote.bus.messages.common import Principal
from dovecote.libs.db import Database
from dovecote.vmmgr.capsules import Capsules, CapsuleSettings, Machines
from dovecote.vmmgr.placement import Limits
from tests.capsules.fakes import AgentProcessDriver, fake_image

ANA = Principal(auth_type="api_key", user_id="usr-ana", team_id="team-a")
BOB = Principal(auth_type="api_key", user_id="usr-bob", team_id="team-b")
ADMIN = Principal(auth_type="session", user_id="usr-root", team_id="team-r", is_admin=True)


class Events:
    def __init__(self) -> None:
        self.seen: list[tuple[str, m.CapsuleStateChanged]] = []

    async def publish(self, topic: str, event: Any) -> None:
        self.seen.append((topic, event))

    def statuses(self, capsule_id: str) -> list[tuple[str | None, str]]:
        return [(e.old_status, e.new_status) for _, e in self.seen if e.capsule_id == capsule_id]


@asynccontextmanager
async def open_capsules(db: Database, driver: AgentProcessDriver, run_dir: Path, events: Events,
                        limits: Limits | None = None) -> AsyncIterator[Capsules]:
    machines = Machines()
    machines.set_ready(driver, fake_image(run_dir))
    async with trio.open_nursery() as nursery:
        capsules = Capsules(db=db, publish=events.publish, machines=machines, nursery=nursery,
                            settings=CapsuleSettings(host_id="h1", run_dir=run_dir,
                                                     limits=limits or Limits(), boot_timeout_s=20))
        yield capsules
        nursery.cancel_scope.cancel()


async def wait_status(capsules: Capsules, capsule_id: str, status: str, actor: Principal = ANA) -> m.Capsule:
    with trio.fail_after(20):
        while True:
            reply = await capsules.lookup(m.LookupCapsule(actor=actor, capsule_id=capsule_id))
            if reply.capsule.status == status:
                return reply.capsule
            await trio.sleep(0.05)
