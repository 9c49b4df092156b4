"""vmmgr's answers for an exec past its timeout and a missing cwd, and the disk figures it records.

The hypervisor is :class:`~tests.capsules.fakes.AgentProcessDriver` (the real
guest agent in a host process), so "the root filesystem" is the host's; the
same behaviour on a real VM is in ``test_workspace_vm.py``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import trio

from dovecote.bus.messages import capsules as m
from dovecote.libs.db import Database
from dovecote.libs.errors import ServiceError
from tests.capsules.fakes import AgentProcessDriver
from tests.capsules.vmmgr_harness import ANA, Events, open_capsules, wait_status


async def test_a_foreground_exec_past_its_timeout_is_a_timeout_error_and_a_missing_cwd_a_400(
        vmmgr_db: Database, run_dir: Path) -> None:
    driver = AgentProcessDriver()
    try:
        async with open_capsules(vmmgr_db, driver, run_dir, Events()) as capsules:
            created = await capsules.create(m.CreateCapsule(actor=ANA, spec=m.CapsuleSpec()))
            capsule_id = created.capsule.id
            running = await wait_status(capsules, capsule_id, "running")

            began = time.monotonic()
            with trio.fail_after(20), pytest.raises(ServiceError) as timed_out:
                await capsules.exec(m.ExecCommand(actor=ANA, capsule_id=capsule_id,
                                                  cmd="echo partial; sleep 30", timeout_sec=1))
            assert (timed_out.value.status, timed_out.value.code) == (408, "timeout")
            assert "timeout_sec of 1 s" in timed_out.value.message
            assert time.monotonic() - began < 10

            for background in (False, True):
                with pytest.raises(ServiceError) as missing:
                    await capsules.exec(m.ExecCommand(actor=ANA, capsule_id=capsule_id, cmd="pwd",
                                                      cwd="/no/such/dir", background=background))
                assert (missing.value.status, missing.value.code) == (400, "invalid_argument")
            here = await capsules.exec(m.ExecCommand(actor=ANA, capsule_id=capsule_id, cmd="pwd",
                                                     cwd=str(run_dir)))
            assert here.result is not None and here.result.stdout == f"{run_dir}\n"

            # The record holds the size and usage of the (here: host's) root filesystem.
            st = os.statvfs("/")
            assert running.disk_size_mb == -(-st.f_blocks * st.f_frsize // (1024 * 1024))
            assert running.disk_used_mb is not None and running.disk_used_mb > 0
    finally:
        driver.kill_all()
