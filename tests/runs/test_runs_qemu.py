"""Agent runs on a real QEMU desktop VM (TCG), with the scripted agent and no model, over real HTTP.

The issue's done-means on the qemu provider: ``POST /api/runs`` of the note
scenario → the SSE stream shows the ladder to ``Succeeded`` with
``computer_action`` and ``screenshot`` events, the verifier read the note
mousepad saved inside the VM, the replay zip holds the events and a review
bundle whose screenshots are deduplicated, and the run's VM is gone
afterwards; then a second run is stopped while it types and ends
``Stopped.ByOperator`` within seconds, its VM destroyed.

One ``dovecote up`` with the libvirt driver and the desktop template for the
module (the template is built once per host and cached in the shared image
directory, like ``tests/desktops/test_qemu_vm.py``); two VM sessions in all.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.desktops.helpers import TEMPLATE_BUILD_S
from tests.helpers.capsules import IMAGE_DIR, domains, libvirt_ready
from tests.helpers.suite import Suite
from tests.runs.helpers import Api, api_client

pytestmark = pytest.mark.slow

RUN_S = 900.0
"""A whole run: restore the template, start mousepad, type, save, verify (TCG, a loaded host)."""
STOP_S = 20.0
"""From ``stop`` to ``Stopped`` (the VM is destroyed before the final status is written)."""


class World:
    suite: Suite
    ana: Api
    bob: Api
    root: Path


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    reason = libvirt_ready()
    if reason:
        pytest.fail(f"the qemu run tests need libvirt: {reason}")
    root = Path(tempfile.mkdtemp(prefix="dcqruns-", dir="/tmp"))
    root.chmod(0o755)
    w = World()
    w.root = root
    w.suite = Suite(data_dir=root / "data", extra_env={
        "DOVECOTE_SIGNUP_MAX_PER_IP": "100000", "DOVECOTE_VM_DRIVER": "libvirt",
        "DOVECOTE_VM_IMAGE_DIR": IMAGE_DIR, "DOVECOTE_VM_BOOT_TIMEOUT_S": "600",
        "DOVECOTE_VM_TEMPLATES": "false",  # only the desktop template is needed
        "DOVECOTE_DESKTOP_TEMPLATE": "true",
        "DOVECOTE_RUNS_DESKTOP_PROVIDER": "qemu",
        "DOVECOTE_RUNS_READY_TIMEOUT_S": "600"})
    try:
        w.suite.wait_ready()
        (root / "data").chmod(0o755)
        w.ana, w.bob = api_client(w.suite, "Ana"), api_client(w.suite, "Bob")
        deadline = time.monotonic() + TEMPLATE_BUILD_S
        health: dict[str, Any] = {}
        while time.monotonic() < deadline:  # the first run on a host builds image and template
            health = w.ana.get("/api/health").json()
            if health["guest"]["status"] == "ok":
                break
            time.sleep(5)
        assert health["guest"]["status"] == "ok", health
        yield w
    except BaseException:
        print("".join(w.suite.output[-200:]))
        raise
    finally:
        w.suite.stop()
        shutil.rmtree(root, ignore_errors=True)


def capsule_of(api: Api, session_id: str) -> str:
    for capsule in api.get("/v1/capsules").json():
        if (capsule.get("metadata") or {}).get("desktop_session") == session_id:
            return str(capsule["id"])
    raise AssertionError(f"no capsule for desktop session {session_id}")


def wait_run(api: Api, run_id: str, statuses: tuple[str, ...], timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        run: dict[str, Any] = api.get(f"/api/runs/{run_id}").json()["run"]
        if run["status"] in statuses or time.monotonic() > deadline:
            return run
        time.sleep(0.5)


def wait_vm_gone(capsule_id: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while f"dovecote-{capsule_id}" in domains() and time.monotonic() < deadline:
        time.sleep(1)
    assert f"dovecote-{capsule_id}" not in domains()


def test_system_health_names_the_vm_driver_template_auth_scenarios_and_proxy(world: World) -> None:
    response = world.ana.get("/api/system/health")
    assert response.status_code == 200, response.text
    health = response.json()
    assert health["ok"] is True, health
    machine = health["machine"]
    assert machine["vmDriver"] == "libvirt" and machine["provider"] == "qemu", machine
    assert machine["desktopTemplate"] == "ok" and machine["status"] == "ok", machine
    assert health["scenarios"] >= 3
    assert set(health["auth"]) == {"api-key", "codex-oauth"}
    assert health["auth"]["codex-oauth"]["configured"] is False  # no issuer configured here
    assert health["proxy"] == {"configured": False}  # no model: runs are scripted


def test_note_run_on_qemu_succeeds_with_ladder_screens_verifier_and_replay(world: World) -> None:
    text = "hello from a qemu desktop"
    began = time.monotonic()
    created = world.ana.post("/api/runs", {"scenarioId": "note-editor", "agentType": "scripted",
                                           "input": {"text": text, "filename": "qemu-note.txt"}})
    assert created.status_code == 202, created.text
    run = created.json()
    assert run["status"] == "Draft" and run["agentType"] == "scripted" and run["model"] is None
    running = wait_run(world.ana, run["id"], ("Running", "Failed", "Stopped", "Succeeded"), RUN_S)
    assert running["machineId"], running
    capsule_id = capsule_of(world.ana, running["machineId"])
    events = world.ana.events(run["id"], timeout=RUN_S)
    print(f"the run took {time.monotonic() - began:.1f} s")
    statuses = [e["payload"]["status"] for e in events if e["type"] == "status"]
    assert statuses == ["Draft", "PreparingMachine", "Ready", "Running", "Verifying", "Succeeded"], [
        (e["type"], e["message"]) for e in events]
    types = [e["type"] for e in events]
    assert {"computer_action", "screenshot", "tool_result", "agent_route", "verifier", "final"} <= set(types)
    kinds = [e["payload"]["action"]["kind"] for e in events if e["type"] == "computer_action"]
    assert "type_text" in kinds and "hotkey" in kinds, kinds
    verifier = next(e for e in events if e["type"] == "verifier")
    assert verifier["payload"]["passed"] is True, verifier
    assert verifier["payload"]["verifier"]["path"] == "Documents/qemu-note.txt"
    assert verifier["payload"]["actual"].rstrip("\n") == text  # read back from the VM's disk
    ids = [e["id"] for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    detail = world.ana.get(f"/api/runs/{run['id']}").json()
    assert detail["run"]["status"] == "Succeeded" and detail["run"]["error"] is None, detail["run"]
    assert world.ana.get(f"/api/sessions/{running['machineId']}").status_code == 404
    wait_vm_gone(capsule_id)

    replay = world.ana.get(f"/api/runs/{run['id']}/replay")
    assert replay.status_code == 200 and replay.headers["content-type"] == "application/zip"
    archive = zipfile.ZipFile(io.BytesIO(replay.content))
    names = archive.namelist()
    stored = [json.loads(line) for line in archive.read("events.jsonl").splitlines()]
    assert [e["id"] for e in stored] == ids
    assert json.loads(archive.read("run.json"))["status"] == "Succeeded"
    shot_events = [e for e in events if e["type"] == "screenshot"]
    hashes = [e["payload"]["sha256"] for e in shot_events]
    files = sorted(n for n in names if n.startswith("review/screenshots/"))
    assert files == sorted(f"review/screenshots/{h}.png" for h in set(hashes))  # one file per content
    assert len(shot_events) >= 4
    for name in files:  # each file is the PNG its name hashes
        assert hashlib.sha256(archive.read(name)).hexdigest() == name.split("/")[-1][:-4]
    assert sum(1 for e in shot_events if e["payload"]["new"]) == len(set(hashes))
    review = json.loads(archive.read("review/review.json"))
    assert review["screenshot_count"] == len(set(hashes)) and review["status"] == "Succeeded"
    timeline = [json.loads(line) for line in archive.read("review/timeline.jsonl").splitlines()]
    assert {"computer_action", "screenshot", "verifier", "final"} <= {e["type"] for e in timeline}
    assert world.bob.get(f"/api/runs/{run['id']}/replay").status_code == 404


def test_stop_mid_run_on_qemu_ends_stopped_by_operator_and_destroys_the_vm(world: World) -> None:
    created = world.ana.post("/api/runs", {"scenarioId": "note-editor-save", "agentType": "scripted",
                                           "input": {"text": "slow typing " * 40}})
    assert created.status_code == 202, created.text
    run_id = created.json()["id"]
    deadline = time.monotonic() + RUN_S
    typing = False
    while time.monotonic() < deadline and not typing:  # stop it while it types (a long action)
        events = world.ana.get(f"/api/runs/{run_id}").json()["events"]
        typing = any(e["type"] == "computer_action" and e["payload"]["action"]["kind"] == "type_text"
                     for e in events)
        assert not any(e["type"] == "final" for e in events), events
        time.sleep(0.3)
    assert typing
    machine = world.ana.get(f"/api/runs/{run_id}").json()["run"]["machineId"]
    capsule_id = capsule_of(world.ana, machine)
    started = time.monotonic()
    stopped = world.ana.post(f"/api/runs/{run_id}/stop")
    assert stopped.status_code == 200 and stopped.json()["stopRequested"] is True, stopped.text
    run = wait_run(world.ana, run_id, ("Stopped", "Failed", "Succeeded"), STOP_S + 30)
    took = time.monotonic() - started
    print(f"stop -> Stopped in {took:.1f} s")
    assert run["status"] == "Stopped" and run["error"]["code"] == "Stopped.ByOperator", run
    assert took < STOP_S
    assert world.ana.get(f"/api/sessions/{machine}").status_code == 404
    wait_vm_gone(capsule_id, timeout=10)
    events = world.ana.events(run_id, timeout=60)
    assert events[-1]["type"] == "final" and events[-1]["payload"]["status"] == "Stopped"
    assert "Verifying" not in [e["payload"]["status"] for e in events if e["type"] == "status"]
