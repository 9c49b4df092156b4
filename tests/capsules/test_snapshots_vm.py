"""Pause/resume, live snapshots into templates, create-as-restore and the TTL, on real QEMU VMs.

Over real HTTP against ``dovecote up`` with the libvirt driver (see
``test_capsules_vm.py`` for the shared image cache and the skip rule). The
tests run in file order on one suite and one source capsule.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import trio

from tests.events.helpers import open_sse
from tests.helpers.capsules import Api, api_client, running_capsule, wait_status
from tests.helpers.suite import Suite
from tests.hosts.helpers import create_admin

pytestmark = pytest.mark.slow

COUNTER = "i=0; while true; do i=$((i+1)); echo $i > /tmp/counter; sleep 0.2; done"


class World:
    def __init__(self, suite: Suite, ana: Api, capsule_id: str) -> None:
        self.suite, self.ana, self.capsule_id = suite, ana, capsule_id
        self.counter_pid = 0

    def exec(self, cmd: str, capsule_id: str | None = None, **kw: Any) -> httpx.Response:
        return self.ana.post(f"/v1/capsules/{capsule_id or self.capsule_id}/exec", {"cmd": cmd, **kw})

    def out(self, cmd: str, capsule_id: str | None = None) -> str:
        response = self.exec(cmd, capsule_id)
        assert response.status_code == 200, response.text
        return str(response.json()["stdout"])

    def counter(self, capsule_id: str | None = None) -> int:
        return int(self.out("cat /tmp/counter", capsule_id).strip())


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with running_capsule("dcsnap-") as (suite, ana, capsule_id):
        yield World(suite, ana, capsule_id)


def events_about(api: Api, resource_id: str, *, until: str) -> list[dict[str, Any]]:
    """The team's logged events about ``resource_id``, read from the log's start
    (``Last-Event-ID: 0``) up to the first named ``until``."""
    found: list[dict[str, Any]] = []
    data = ""
    with api.http.stream("GET", "/v1/events/stream", headers={"Last-Event-ID": "0"},
                         timeout=httpx.Timeout(30.0, read=30.0)) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data:"):
                data = line[5:].strip()
            elif not line and data:
                event, data = json.loads(data), ""
                if event.get("resource", {}).get("id") == resource_id:
                    found.append(event)
                    if event["event"] == until:
                        return found
    raise AssertionError(f"the stream ended before {until} of {resource_id}: {found}")


def wait_template_ready(suite: Suite, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        details = httpx.get(suite.url + "/healthz").json()["services"]["vmmgr"]["details"]
        if details.get("template") == "ready":
            return
        time.sleep(1)
    raise AssertionError("the built-in template was never made")


def test_pause_and_resume_keep_files_and_processes(world: World) -> None:
    assert world.exec("echo kept > /home/wrenn-user/kept.txt").status_code == 200
    started = world.exec(COUNTER, background=True, tag="counter")
    assert started.status_code == 202, started.text
    world.counter_pid = started.json()["pid"]
    time.sleep(1)
    for round_ in range(5):
        before = world.counter()
        paused = world.ana.post(f"/v1/capsules/{world.capsule_id}/pause")
        assert paused.status_code == 202, paused.text
        assert paused.json()["status"] in ("pausing", "paused")
        wait_status(world.ana, world.capsule_id, "paused", timeout=120)
        # A paused capsule runs nothing and says so.
        refused = world.exec("true")
        assert refused.status_code == 409 and refused.json()["error"]["code"] == "not_running"
        assert world.ana.post(f"/v1/capsules/{world.capsule_id}/pause").json()["status"] == "paused"
        resumed = world.ana.post(f"/v1/capsules/{world.capsule_id}/resume")
        assert resumed.status_code == 202, resumed.text
        wait_status(world.ana, world.capsule_id, "running", timeout=120)
        assert world.out("cat /home/wrenn-user/kept.txt") == "kept\n", f"round {round_}"
        processes = world.ana.get(f"/v1/capsules/{world.capsule_id}/processes").json()["processes"]
        assert any(p["pid"] == world.counter_pid and p["tag"] == "counter" for p in processes), processes
        time.sleep(1)
        assert world.counter() > before, f"the counter stopped in round {round_}"
    not_paused = world.ana.post(f"/v1/capsules/{world.capsule_id}/resume")
    assert not_paused.status_code == 202 and not_paused.json()["status"] == "running"


def test_a_snapshot_makes_a_template_whose_capsules_share_nothing(world: World) -> None:
    wait_template_ready(world.suite)
    source_machine_id = world.out("cat /etc/machine-id").strip()
    made = world.ana.post("/v1/snapshots", {"sandbox_id": world.capsule_id, "name": "tmpl-a"})
    assert made.status_code == 201, made.text
    template = made.json()
    assert (template["name"], template["type"], template["platform"]) == ("tmpl-a", "snapshot", False)
    assert template["vcpus"] == 1 and template["memory_mb"] == 512 and template["size_bytes"] > 0
    # The source keeps running, with its process.
    before = world.counter()
    time.sleep(1)
    assert world.counter() > before
    again = world.ana.post("/v1/snapshots", {"sandbox_id": world.capsule_id, "name": "tmpl-a"})
    assert again.status_code == 409, again.text
    listed = world.ana.http.get("/v1/snapshots", params={"type": "snapshot"}).json()
    assert [t["name"] for t in listed] == ["tmpl-a"]
    assert {t["name"] for t in world.ana.get("/v1/snapshots").json()} == {"minimal", "tmpl-a"}
    assert world.ana.http.get("/v1/snapshots", params={"type": "nope"}).status_code == 400
    # Another team neither sees nor uses it.
    bob = api_client(world.suite, "Bob")
    assert [t["name"] for t in bob.get("/v1/snapshots").json()] == ["minimal"]
    assert bob.post("/v1/capsules", {"template": "tmpl-a"}).status_code == 404
    assert bob.delete("/v1/snapshots/tmpl-a").status_code == 404

    clones = []
    for _ in range(2):
        created = world.ana.post("/v1/capsules", {"template": "tmpl-a"})
        assert created.status_code == 202, created.text
        clones.append(created.json()["id"])
    try:
        for clone in clones:
            body = wait_status(world.ana, clone, "running", timeout=300)
            assert body["template"] == "tmpl-a"
            assert world.out("cat /home/wrenn-user/kept.txt", clone) == "kept\n"
            # The frozen counter runs on in each clone.
            first = world.counter(clone)
            time.sleep(1)
            assert world.counter(clone) > first
        machine_ids = {world.out("cat /etc/machine-id", clone).strip() for clone in clones}
        assert len(machine_ids) == 2 and source_machine_id not in machine_ids
        assert world.exec("echo one > /home/wrenn-user/only-in-one", clones[0]).status_code == 200
        assert world.exec("test -e /home/wrenn-user/only-in-one", clones[1]).json()["exit_code"] != 0
        assert world.exec("test -e /home/wrenn-user/only-in-one").json()["exit_code"] != 0
        in_use = world.ana.delete("/v1/snapshots/tmpl-a")
        assert in_use.status_code == 409, in_use.text
    finally:
        for clone in clones:
            world.ana.delete(f"/v1/capsules/{clone}")
        for clone in clones:
            wait_status(world.ana, clone, "stopped", "error", "missing", timeout=120)
    assert world.ana.delete("/v1/snapshots/tmpl-a").status_code == 204
    assert world.ana.delete("/v1/snapshots/tmpl-a").status_code == 404
    assert world.ana.delete("/v1/snapshots/minimal").status_code == 403
    # The team's event log has the template's making and its deletion, once each.
    logged = events_about(world.ana, "tmpl-a", until="template.snapshot.delete")
    assert [(e["event"], e["outcome"]) for e in logged] == [
        ("template.snapshot.create", "success"), ("template.snapshot.delete", "success")]
    assert logged[0]["metadata"]["sandbox_id"] == world.capsule_id
    assert logged[0]["resource"] == {"id": "tmpl-a", "type": "template"}


def test_an_idle_capsule_is_paused_after_its_timeout_and_a_pinged_one_is_not(world: World) -> None:
    idle = world.ana.post("/v1/capsules", {"timeout_sec": 30})  # clamped to 60
    pinged = world.ana.post("/v1/capsules", {"timeout_sec": 60})
    assert idle.status_code == 202 and pinged.status_code == 202, (idle.text, pinged.text)
    assert idle.json()["timeout_sec"] == 60
    ids = [idle.json()["id"], pinged.json()["id"]]
    try:
        for capsule_id in ids:
            wait_status(world.ana, capsule_id, "running", timeout=300)
        began = time.monotonic()
        status = "running"
        while time.monotonic() - began < 80:
            if int(time.monotonic() - began) % 30 < 2:
                assert world.ana.post(f"/v1/capsules/{ids[1]}/ping").status_code == 204
            status = world.ana.get(f"/v1/capsules/{ids[0]}").json()["status"]
            if status == "paused":
                break
            time.sleep(2)
        assert status == "paused", "the idle capsule was not paused within 80 s"
        assert time.monotonic() - began < 80
        assert world.ana.get(f"/v1/capsules/{ids[1]}").json()["status"] == "running"
        # It resumes like any paused capsule.
        assert world.ana.post(f"/v1/capsules/{ids[0]}/resume").status_code == 202
        wait_status(world.ana, ids[0], "running", timeout=120)
        assert world.out("echo back", ids[0]) == "back\n"
    finally:
        for capsule_id in ids:
            world.ana.delete(f"/v1/capsules/{capsule_id}")
        for capsule_id in ids:
            wait_status(world.ana, capsule_id, "stopped", "error", "missing", timeout=120)


def wait_build(admin: Any, build_id: str, *statuses: str, timeout: float = 600) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        response = admin.get(f"/v1/admin/builds/{build_id}")
        assert response.status_code == 200, response.text
        body = response.json()
        if body["status"] in statuses:
            return body
        time.sleep(1)
    raise AssertionError(f"build never became {statuses}: {body}")


def test_a_build_runs_its_steps_and_publishes_a_platform_template(world: World) -> None:
    root, _ = create_admin(world.suite, "Buildadmin")
    assert world.ana.post("/v1/admin/builds", {"name": "x", "steps": ["true"]}).status_code in (401, 403)
    assert root.post("/v1/admin/builds", {"name": "tools", "steps": []}).status_code == 400
    submitted = root.post("/v1/admin/builds", {
        "name": "tools", "steps": ["mkdir -p /opt/tools", "echo built > /opt/tools/marker",
                                   "cat /opt/tools/marker; echo to-stderr >&2"]})
    assert submitted.status_code == 202, submitted.text
    build = submitted.json()
    assert build["status"] in ("queued", "running") and len(build["steps"]) == 3
    assert root.post("/v1/admin/builds", {"name": "tools", "steps": ["true"]}).status_code == 409
    done = wait_build(root, build["id"], "succeeded", "failed", "cancelled")
    assert done["status"] == "succeeded", done
    assert done["template"] == "tools" and done["duration_ms"] > 0
    last = done["steps"][2]
    assert (last["exit_code"], last["stdout"], last["stderr"]) == (0, "built\n", "to-stderr\n")
    assert all(step["status"] == "succeeded" and step["duration_ms"] is not None for step in done["steps"])
    assert any(b["id"] == build["id"] for b in root.get("/v1/admin/builds").json())
    # A platform template: every team sees and uses it.
    listed = {t["name"]: t for t in world.ana.get("/v1/snapshots").json()}
    assert listed["tools"]["platform"] is True and listed["tools"]["type"] == "snapshot"
    assert "tools" in {t["name"] for t in root.get("/v1/admin/templates").json()}
    created = world.ana.post("/v1/capsules", {"template": "tools"})
    assert created.status_code == 202, created.text
    capsule_id = created.json()["id"]
    try:
        wait_status(world.ana, capsule_id, "running", timeout=300)
        assert world.out("cat /opt/tools/marker", capsule_id) == "built\n"
    finally:
        world.ana.delete(f"/v1/capsules/{capsule_id}")
        wait_status(world.ana, capsule_id, "stopped", "error", "missing", timeout=120)
    # Teams cannot delete it; an admin can.
    assert world.ana.delete("/v1/snapshots/tools").status_code == 404
    assert root.send("DELETE", "/v1/admin/templates/tools").status_code == 204

    # A failing step fails the build, with its log; a long one can be cancelled.
    failing = root.post("/v1/admin/builds", {"name": "broken", "steps": ["echo oops; exit 3", "true"]})
    assert failing.status_code == 202, failing.text
    failed = wait_build(root, failing.json()["id"], "succeeded", "failed", "cancelled")
    assert failed["status"] == "failed" and "code 3" in failed["error"]
    assert failed["steps"][0]["exit_code"] == 3 and failed["steps"][0]["stdout"] == "oops\n"
    assert failed["steps"][1]["status"] == "pending" and failed["template"] is None
    slow = root.post("/v1/admin/builds", {"name": "slow", "steps": ["sleep 600"]}).json()
    wait_build(root, slow["id"], "running")
    time.sleep(3)
    assert root.post(f"/v1/admin/builds/{slow['id']}/cancel").status_code == 204
    cancelled = wait_build(root, slow["id"], "cancelled", "failed", "succeeded", timeout=120)
    assert cancelled["status"] == "cancelled"
    assert root.post(f"/v1/admin/builds/{slow['id']}/cancel").status_code == 409
    assert root.get("/v1/admin/builds/bld-unknown").status_code == 404
    names = {t["name"] for t in root.get("/v1/admin/templates").json()}
    assert not names & {"tools", "broken", "slow"}

    # An admin may snapshot any team's capsule; the template is that team's.
    made = root.post(f"/v1/admin/capsules/{world.capsule_id}/snapshot", {"name": "by-admin"})
    assert made.status_code == 201, made.text
    assert made.json()["platform"] is False
    assert "by-admin" in {t["name"] for t in world.ana.get("/v1/snapshots").json()}
    assert world.ana.delete("/v1/snapshots/by-admin").status_code == 204
    assert world.ana.post(f"/v1/admin/capsules/{world.capsule_id}/snapshot",
                          {"name": "nope"}).status_code in (401, 403)


async def test_the_teams_event_stream_sees_its_capsules_lifecycle_and_no_other_team(
        world: World) -> None:
    bob = await trio.to_thread.run_sync(api_client, world.suite, "Eventbob")
    ana_key, bob_key = world.ana.http.headers["X-API-Key"], bob.http.headers["X-API-Key"]
    async with open_sse(world.suite, key=ana_key) as ana_stream, \
            open_sse(world.suite, key=bob_key) as bob_stream:
        assert (await ana_stream.frame()).event == "connected"
        assert (await bob_stream.frame()).event == "connected"

        def lifecycle() -> str:
            created = world.ana.post("/v1/capsules", {})
            assert created.status_code == 202, created.text
            capsule_id = str(created.json()["id"])
            wait_status(world.ana, capsule_id, "running", timeout=300)
            assert world.ana.post(f"/v1/capsules/{capsule_id}/pause").status_code == 202
            wait_status(world.ana, capsule_id, "paused", timeout=120)
            assert world.ana.post(f"/v1/capsules/{capsule_id}/resume").status_code == 202
            wait_status(world.ana, capsule_id, "running", timeout=120)
            world.ana.delete(f"/v1/capsules/{capsule_id}")
            wait_status(world.ana, capsule_id, "stopped", timeout=120)
            return capsule_id

        capsule_id = await trio.to_thread.run_sync(lifecycle)
        seen: list[dict[str, Any]] = []
        with trio.fail_after(60):
            while not any(f["event"] == "capsule.destroy" for f in seen):
                frame = await ana_stream.until(capsule_id)
                assert frame.data is not None and frame.id is not None
                seen.append(frame.data)
        names = [f["event"] for f in seen]
        for name in ("capsule.create", "capsule.pause", "capsule.resume", "capsule.destroy"):
            assert names.count(name) == 1, names
        assert names.index("capsule.create") < names.index("capsule.pause") < names.index(
            "capsule.resume") < names.index("capsule.destroy")
        pause = seen[names.index("capsule.pause")]
        assert pause["outcome"] == "success" and pause["metadata"]["reason"] == "user"
        assert pause["sandbox"]["id"] == capsule_id and pause["actor"]["type"] == "api_key"
        changes = {(f["metadata"]["from"], f["metadata"]["to"]) for f in seen
                   if f["event"] == "capsule.state.changed"}
        assert {("starting", "running"), ("running", "pausing"), ("pausing", "paused"),
                ("paused", "resuming"), ("resuming", "running"), ("stopping", "stopped")} <= changes
        # Bob's stream carries nothing of Ana's.
        with trio.move_on_after(3):
            while True:
                frame = await bob_stream.frame()
                assert not frame.data or frame.data.get("resource", {}).get("id") != capsule_id
