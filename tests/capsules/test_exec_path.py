"""The exec path reads the capsule row once: the lookup's answer travels with the operation.

vmmgr runs on the fake driver (the real guest agent in a host process) and the
real PostgreSQL. The test replays what the gateway's ``capsule_op`` sends for
``POST /v1/capsules/{id}/exec`` (``LookupCapsule(operation=True)``, then
``ExecCommand`` with ``found``) and records every statement vmmgr sends to the
database meanwhile: one read of the row, one touch before the command and one
after it. Without ``found`` (another service's exec) the host reads the row
itself; a ``found`` that is not the caller's is not taken on trust.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from dovecote.bus.messages import capsules as m
from dovecote.libs.db import Database
from dovecote.libs.errors import ServiceError
from tests.capsules.fakes import AgentProcessDriver
from tests.capsules.vmmgr_harness import ANA, BOB, Events, open_capsules, wait_status

READ_ROW = "SELECT * FROM capsules WHERE id = %s"
TOUCH = "UPDATE capsules SET last_active_at = now() WHERE id = %s"


@contextmanager
def recorded(db: Database, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The SQL text of every statement sent through ``db`` inside the block."""
    seen: list[str] = []
    with monkeypatch.context() as patch:
        for name in ("execute", "fetchone", "fetchall", "fetchval"):
            original = getattr(db, name)

            def wrapper(query: Any, params: Any = None, *, _original: Any = original) -> Any:
                seen.append(str(query))
                return _original(query, params)

            patch.setattr(db, name, wrapper)

        def no_transactions(*_: Any, **__: Any) -> Any:
            raise AssertionError("the exec path opened a transaction")

        patch.setattr(db, "transaction", no_transactions)
        yield seen


async def test_an_exec_reads_the_capsule_row_once_and_touches_it_around_the_command(
        vmmgr_db: Database, run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    driver = AgentProcessDriver()
    try:
        async with open_capsules(vmmgr_db, driver, run_dir, Events()) as capsules:
            created = await capsules.create(m.CreateCapsule(actor=ANA, spec=m.CapsuleSpec()))
            capsule_id = created.capsule.id
            await wait_status(capsules, capsule_id, "running")
            warm = await capsules.exec(m.ExecCommand(actor=ANA, capsule_id=capsule_id, cmd="true"))
            assert warm.result is not None and warm.result.exit_code == 0

            with recorded(vmmgr_db, monkeypatch) as statements:
                found = await capsules.lookup(m.LookupCapsule(actor=ANA, capsule_id=capsule_id,
                                                              operation=True))
                reply = await capsules.exec(m.ExecCommand(actor=ANA, capsule_id=capsule_id,
                                                          cmd="echo hi", found=found))
            assert reply.result is not None and reply.result.stdout == "hi\n"
            assert statements == [READ_ROW, TOUCH, TOUCH]

            # Another service's exec (no lookup before it): the host reads the row itself.
            with recorded(vmmgr_db, monkeypatch) as statements:
                reply = await capsules.exec(m.ExecCommand(actor=ANA, capsule_id=capsule_id,
                                                          cmd="echo again"))
            assert reply.result is not None and reply.result.stdout == "again\n"
            assert statements == [READ_ROW, TOUCH, TOUCH]

            # What Ana's lookup found does not let Bob in: his scope is checked again.
            for admin, expected in ((False, (404, "not_found")), (True, (403, "forbidden"))):
                with pytest.raises(ServiceError) as refused:
                    await capsules.exec(m.ExecCommand(actor=BOB, capsule_id=capsule_id, cmd="id",
                                                      found=found, admin=admin))
                assert (refused.value.status, refused.value.code) == expected
            # A found capsule that is not the one named is not used for it.
            with pytest.raises(ServiceError) as missing:
                await capsules.exec(m.ExecCommand(actor=ANA, capsule_id="cap-nope", cmd="id",
                                                  found=found))
            assert (missing.value.status, missing.value.code) == (404, "not_found")
    finally:
        driver.kill_all()
