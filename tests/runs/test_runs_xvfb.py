"""Agent runs with the scripted agent on the xvfb provider, over real HTTP, against ``dovecote up``.

One suite for the module (``DOVECOTE_DESKTOP_XVFB=true``, runs on xvfb). Real
Xvfb, openbox, mousepad and xdotool; the run's verifier reads the saved file.
"""

from __future__ import annotations

import io
import json
import shutil
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.suite import Suite
from tests.runs.helpers import TOOLS, Api, api_client

pytestmark = pytest.mark.slow

BUILTIN = Path(__file__).parents[2] / "services" / "runs" / "builtin_scenarios"


class World:
    suite: Suite
    ana: Api
    bob: Api


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.fail(f"infra/system-deps.sh did not install {missing}")
    root = Path(tempfile.mkdtemp(prefix="dcruns-", dir="/var/tmp"))
    root.chmod(0o755)
    scenarios = root / "scenarios"
    note = json.loads((BUILTIN / "note-editor" / "manifest.json").read_text())
    for folder, change in (("note-rejected", {"id": "note-rejected",
                                              "verifiers": [{"type": "file_text_equals",
                                                             "path": "Documents/{{input.filename}}",
                                                             "value": "{{input.text}} and more"}]}),
                           ("note-blocked", {"id": "note-blocked",
                                             "policy": {"forbidden_actions": ["type_text"]}})):
        (scenarios / folder).mkdir(parents=True)
        (scenarios / folder / "manifest.json").write_text(json.dumps({**note, **change}))
        (scenarios / folder / "prompt.md").write_text("{{input.text}}")
    w = World()
    w.suite = Suite(
        extra_env={
            "DOVECOTE_SIGNUP_MAX_PER_IP": "100000",
            "DOVECOTE_DESKTOP_XVFB": "true",
            "DOVECOTE_DESKTOP_XVFB_ROOT": str(root / "runtime"),
            "DOVECOTE_RUNS_DESKTOP_PROVIDER": "xvfb",
            "DOVECOTE_RUNS_READY_TIMEOUT_S": "60",
            "DOVECOTE_SCENARIOS_DIR": str(scenarios),
        }
    )
    try:
        w.suite.wait_ready()
        w.ana, w.bob = api_client(w.suite, "Ana"), api_client(w.suite, "Bob")
        yield w
    finally:
        w.suite.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_scenarios_are_listed_and_bad_runs_refused(world: World) -> None:
    response = world.ana.get("/api/scenarios")
    assert response.status_code == 200, response.text
    ids = {s["id"]: s for s in response.json()}
    assert {"note-editor-save", "file-manager-folder-tree", "terminal-hostname-report"} <= set(ids)
    note = ids["note-editor-save"]
    assert note["folder"] == "note-editor" and note["verifiers"][0]["type"] == "file_text_equals"
    bad = world.ana.post("/api/runs", {"scenarioId": "no-such", "input": {}})
    assert bad.status_code == 400 and bad.json() == {"error": "Unknown scenario: no-such"}
    bad = world.ana.post("/api/runs", {"scenarioId": "note-editor", "input": {"text": 5}})
    assert bad.status_code == 400 and "input.text" in bad.json()["error"], bad.text
    bad = world.ana.post("/api/runs", {"scenarioId": "note-editor", "input": {}})
    assert bad.status_code == 400 and "input.text" in bad.json()["error"], bad.text
    missing = world.ana.get("/api/runs/run-nope")
    assert missing.status_code == 404 and missing.json() == {"error": "Run not found."}
    assert world.ana.get("/api/runs/run-nope/events").status_code == 404
    assert world.ana.get("/api/runs/run-nope/replay").status_code == 404


def test_note_run_succeeds_with_its_ladder_screens_and_replay(world: World) -> None:
    text = "hello from dovecote"
    created = world.ana.post(
        "/api/runs",
        {
            "scenarioId": "note-editor",
            "agentType": "scripted",
            "input": {"text": text, "filename": "hello.txt"},
        },
    )
    assert created.status_code == 202, created.text
    run = created.json()
    assert run["status"] == "Draft" and run["scenarioId"] == "note-editor-save" and run["retryOf"] is None
    for key in (
        "id",
        "scenarioId",
        "machineId",
        "status",
        "createdAt",
        "updatedAt",
        "input",
        "model",
        "authProvider",
        "summary",
        "error",
        "replayDir",
        "stopRequested",
        "retryOf",
    ):
        assert key in run, key
    events = world.ana.events(run["id"])
    statuses = [e["payload"]["status"] for e in events if e["type"] == "status"]
    assert statuses == ["Draft", "PreparingMachine", "Ready", "Running", "Verifying", "Succeeded"], events
    types = {e["type"] for e in events}
    assert {"computer_action", "screenshot", "tool_result", "agent_route", "verifier", "final"} <= types
    assert all(e["runId"] == run["id"] for e in events)
    ids = [e["id"] for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    verifier = next(e for e in events if e["type"] == "verifier")
    assert verifier["payload"]["passed"] is True and verifier["payload"]["actual"].rstrip("\n") == text
    # A reconnect gets everything once; Last-Event-ID resumes after it.
    again = world.ana.events(run["id"])
    assert [e["id"] for e in again] == ids
    tail = world.ana.events(run["id"], headers={"Last-Event-ID": str(ids[-3])})
    assert [e["id"] for e in tail] == ids[-2:]
    detail = world.ana.get(f"/api/runs/{run['id']}").json()
    assert detail["run"]["status"] == "Succeeded" and detail["run"]["error"] is None
    assert [e["id"] for e in detail["events"]] == ids
    machine = detail["run"]["machineId"]
    assert machine and world.ana.get(f"/api/sessions/{machine}").status_code == 404  # freed
    replay = world.ana.get(f"/api/runs/{run['id']}/replay")
    assert replay.status_code == 200 and replay.headers["content-type"] == "application/zip"
    archive = zipfile.ZipFile(io.BytesIO(replay.content))
    names = archive.namelist()
    assert "run.json" in names and "events.jsonl" in names and "review/timeline.jsonl" in names
    stored = [json.loads(line) for line in archive.read("events.jsonl").splitlines()]
    assert [e["id"] for e in stored] == ids
    shots = [n for n in names if n.startswith("review/screenshots/")]
    hashes = {e["payload"]["sha256"] for e in events if e["type"] == "screenshot"}
    assert shots and sorted(shots) == sorted(f"review/screenshots/{h}.png" for h in hashes)
    # Other teams see nothing of it.
    assert world.bob.get(f"/api/runs/{run['id']}").status_code == 404
    assert world.bob.get(f"/api/runs/{run['id']}/events").status_code == 404
    assert world.bob.get(f"/api/runs/{run['id']}/replay").status_code == 404
    assert world.bob.post(f"/api/runs/{run['id']}/retry").status_code == 404
    assert run["id"] not in [r["id"] for r in world.bob.get("/api/runs").json()]
    assert world.ana.get("/api/runs").json()[0]["id"] == run["id"]


def test_terminal_scenario_succeeds(world: World) -> None:
    created = world.ana.post("/api/runs", {"scenarioId": "terminal-task", "input": {"word": "ready"}})
    assert created.status_code == 202, created.text
    events = world.ana.events(created.json()["id"])
    final = next(e for e in events if e["type"] == "final")
    assert final["payload"]["status"] == "Succeeded", events


def test_verifier_rejection_fails_the_run(world: World) -> None:
    created = world.ana.post("/api/runs", {"scenarioId": "note-rejected", "input": {"text": "short note"}})
    assert created.status_code == 202, created.text
    events = world.ana.events(created.json()["id"])
    verifier = next(e for e in events if e["type"] == "verifier")
    assert verifier["payload"]["passed"] is False and verifier["payload"]["actual"].rstrip() == "short note"
    run = world.ana.get(f"/api/runs/{created.json()['id']}").json()["run"]
    assert run["status"] == "Failed" and run["error"]["code"] == "Failed.VerifierRejected", run


def test_a_forbidden_action_blocks_the_run(world: World) -> None:
    created = world.ana.post("/api/runs", {"scenarioId": "note-blocked", "input": {"text": "nope"}})
    assert created.status_code == 202, created.text
    events = world.ana.events(created.json()["id"])
    assert not any(e["type"] == "computer_action" and e["payload"]["action"]["kind"] == "type_text"
                   for e in events)
    run = world.ana.get(f"/api/runs/{created.json()['id']}").json()["run"]
    assert run["status"] == "Blocked" and run["error"]["code"] == "Blocked.SecurityBoundary", run


def test_stop_mid_run_ends_stopped_by_operator_and_frees_the_machine(world: World) -> None:
    created = world.ana.post(
        "/api/runs", {"scenarioId": "note-editor-save", "agentType": "scripted", "input": {"text": "x" * 400}}
    )
    assert created.status_code == 202
    run_id = created.json()["id"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if world.ana.get(f"/api/runs/{run_id}").json()["run"]["status"] == "Running":
            break
        time.sleep(0.2)
    time.sleep(1.0)
    started = time.monotonic()
    stopped = world.ana.post(f"/api/runs/{run_id}/stop")
    assert stopped.status_code == 200 and stopped.json()["stopRequested"] is True
    while time.monotonic() - started < 15:
        run = world.ana.get(f"/api/runs/{run_id}").json()["run"]
        if run["status"] == "Stopped":
            break
        time.sleep(0.2)
    assert run["status"] == "Stopped" and run["error"]["code"] == "Stopped.ByOperator", run
    assert time.monotonic() - started < 15
    assert world.ana.get(f"/api/sessions/{run['machineId']}").status_code == 404
    retried = world.ana.post(f"/api/runs/{run_id}/retry")
    assert retried.status_code == 202 and retried.json()["retryOf"] == run_id
    world.ana.post(f"/api/runs/{retried.json()['id']}/stop")
