"""Team spares on real QEMU VMs (``vmmgr/pool.py``): a team template created from often is
kept warm, its spare goes only to that team's creates of that template, and deleting the
template destroys it.

Over real HTTP against ``dovecote up`` with the libvirt driver; what the pool holds is read
from vmmgr's health (``team_spares``, ``team_spare_claims``), the spare VM itself from
libvirt's domain list and the capsule directories. The tests run in file order on one
suite: Ana's and Bob's teams each snapshot a capsule into a template of the same name.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.capsules import (
    Api,
    VmmgrHealth,
    api_client,
    domains,
    running_capsule,
    wait_status,
)
from tests.helpers.suite import Suite

pytestmark = pytest.mark.slow

TEMPLATE = "warm-tpl"
ENV = {"DOVECOTE_VM_POOL_SIZE": "0", "DOVECOTE_VM_TEAM_SPARES": "2",
       "DOVECOTE_VM_TEAM_SPARES_PER_TEAM": "1",
       "DOVECOTE_VM_PRESTARTED": "0"}  # the capsule directories without a record: team spares only


class World(VmmgrHealth):
    def __init__(self, suite: Suite, ana: Api, bob: Api) -> None:
        self.suite, self.ana, self.bob = suite, ana, bob
        self.machine_ids: set[str] = set()

    def out(self, api: Api, capsule_id: str, cmd: str) -> str:
        response = api.post(f"/v1/capsules/{capsule_id}/exec", {"cmd": cmd})
        assert response.status_code == 200 and response.json()["exit_code"] == 0, response.text
        return str(response.json()["stdout"])

    def create_from_template(self, api: Api) -> str:
        created = api.post("/v1/capsules", {"template": TEMPLATE})
        assert created.status_code == 202, created.text
        capsule_id = str(created.json()["id"])
        wait_status(api, capsule_id, "running", timeout=300)
        return capsule_id

    def destroy(self, api: Api, capsule_id: str) -> None:
        assert api.delete(f"/v1/capsules/{capsule_id}").status_code == 202
        wait_status(api, capsule_id, "stopped", timeout=120)

    def snapshot(self, api: Api, marker: str) -> None:
        """A capsule of ``api``'s team with ``marker`` in /home/wrenn-user/whose, snapshotted as TEMPLATE."""
        created = api.post("/v1/capsules", {})
        assert created.status_code == 202, created.text
        capsule_id = created.json()["id"]
        wait_status(api, capsule_id, "running", timeout=300)
        self.out(api, capsule_id, f"echo {marker} > /home/wrenn-user/whose && sync")
        made = api.post("/v1/snapshots", {"sandbox_id": capsule_id, "name": TEMPLATE}, timeout=600)
        assert made.status_code == 201, made.text
        self.destroy(api, capsule_id)

    def spare_dirs(self, known: set[str]) -> set[str]:
        """Capsule directories of this suite that belong to no record: the pool's spares."""
        root = self.suite.data_dir / "capsules"
        return {p.name for p in Path(root).iterdir() if p.is_dir() and p.name not in known}


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with running_capsule("dcteamspare-", extra_env=ENV) as (suite, ana, source_id):
        bob = api_client(suite, "Bob")
        w = World(suite, ana, bob)
        w.out(ana, source_id, "echo ana > /home/wrenn-user/whose && sync")
        made = ana.post("/v1/snapshots", {"sandbox_id": source_id, "name": TEMPLATE}, timeout=600)
        assert made.status_code == 201, made.text
        w.snapshot(bob, "bob")
        yield w


def test_a_template_created_from_twice_gets_a_spare_that_its_next_create_claims(world: World) -> None:
    ana = world.ana
    assert (world.count("team_spares"), world.count("team_spare_claims")) == (0, 0)
    first = world.create_from_template(ana)
    world.machine_ids.add(world.out(ana, first, "cat /etc/machine-id").strip())
    world.destroy(ana, first)
    time.sleep(3)  # one create is not "often": no spare is made
    assert world.count("team_spares") == 0, world.vmmgr()
    second = world.create_from_template(ana)
    world.machine_ids.add(world.out(ana, second, "cat /etc/machine-id").strip())
    world.destroy(ana, second)
    world.wait_count("team_spares", 1)

    third = world.create_from_template(ana)
    try:
        assert world.count("team_spare_claims") == 1, world.vmmgr()
        # The spare is this team's snapshot, with a fresh identity pushed before `running`.
        assert world.out(ana, third, "cat /home/wrenn-user/whose") == "ana\n"
        assert world.out(ana, third, "hostname").strip() == third
        machine_id = world.out(ana, third, "cat /etc/machine-id").strip()
        assert len(machine_id) == 32 and machine_id not in world.machine_ids
        world.machine_ids.add(machine_id)
        record = ana.get(f"/v1/capsules/{third}").json()
        assert record["template"] == TEMPLATE and record["disk_used_mb"] > 0, record
    finally:
        world.destroy(ana, third)
    world.wait_count("team_spares", 1)  # refilled after the claim


def test_another_team_never_gets_the_spare(world: World) -> None:
    bob = world.bob
    assert world.count("team_spares") == 1
    capsule_id = world.create_from_template(bob)  # Bob's own template of the same name
    try:
        assert world.out(bob, capsule_id, "cat /home/wrenn-user/whose") == "bob\n"
        assert world.count("team_spare_claims") == 1, world.vmmgr()
        assert world.count("team_spares") == 1
    finally:
        world.destroy(bob, capsule_id)


def test_deleting_the_template_destroys_its_spare(world: World) -> None:
    ana = world.ana
    known = {c["id"] for c in ana.get("/v1/capsules").json()} | {
        c["id"] for c in world.bob.get("/v1/capsules").json()}
    spares = world.spare_dirs(known)
    assert len(spares) == 1, spares
    (spare,) = spares
    assert f"dovecote-{spare}" in domains()
    assert ana.delete(f"/v1/snapshots/{TEMPLATE}").status_code == 204
    world.wait_count("team_spares", 0, timeout=10)
    assert f"dovecote-{spare}" not in domains()
    assert spare not in world.spare_dirs(known)
    # Bob's template of the same name is untouched and still creates.
    assert TEMPLATE in {t["name"] for t in world.bob.get("/v1/snapshots").json()}
