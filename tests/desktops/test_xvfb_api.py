"""Desktop sessions on the xvfb provider, over real HTTP, against ``dovecote up``.

One suite and one session for the module (``DOVECOTE_DESKTOP_XVFB=true``): the
tests run in file order and the last one deletes the session and checks that
nothing of it is left. Everything is real: Xvfb, openbox, mousepad, xdotool
and the guest agent in a bubblewrap sandbox as an unprivileged user.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dovecote.bus.messages.desktops import ACTION_KINDS
from tests.desktops.helpers import Api, api_client
from tests.desktops.png import changed_pixels, decode
from tests.helpers.suite import Suite

pytestmark = pytest.mark.slow

TOOLS = ("bwrap", "Xvfb", "xdotool", "import", "openbox", "mousepad", "setpriv")


class World:
    suite: Suite
    ana: Api
    bob: Api
    session: dict[str, Any]
    root: Path


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.fail(f"infra/system-deps.sh did not install {missing}")
    root = Path(tempfile.mkdtemp(prefix="dcdesk-", dir="/var/tmp"))
    root.chmod(0o755)
    share = root / "share"
    (share / "project").mkdir(parents=True)
    w = World()
    w.root = root
    w.suite = Suite(extra_env={"DOVECOTE_SIGNUP_MAX_PER_IP": "100000", "DOVECOTE_DESKTOP_XVFB": "true",
                               "DOVECOTE_DESKTOP_XVFB_ROOT": str(root / "runtime"),
                               "DOVECOTE_DESKTOP_SHARE_ROOT": str(share),
                               "DOVECOTE_DESKTOP_BRIDGE_TIMEOUT_S": "8"})
    try:
        w.suite.wait_ready()
        w.ana, w.bob = api_client(w.suite, "Ana"), api_client(w.suite, "Bob")
        yield w
    finally:
        w.suite.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_create_xvfb_session_is_runtime_ready_at_once(world: World) -> None:
    response = world.ana.post("/api/sessions", {"provider": "xvfb", "width": 1024, "height": 768})
    assert response.status_code == 201, response.text
    session = response.json()["session"]
    assert session["provider"] == "xvfb" and session["state"] == "running"
    assert (session["width"], session["height"]) == (1024, 768)
    assert session["readiness_state"] == "runtime_ready" and session["bridge_status"] == "runtime_ready"
    assert session["bridge_error"] is None and session["desktop_user"] == "dove"
    assert [r["state"] for r in session["readiness_history"]] == [
        "booting", "desktop_ready", "bridge_listening", "bridge_attached", "runtime_ready"]
    view = session["live_desktop_view"]
    assert view["mode"] == "screenshot_poll" and view["provider_surface"] == "guest_xvfb_screenshot"
    assert view["canonical_url"] == f"/api/sessions/{session['id']}/screenshot"
    assert session["review_recording"]["mode"] == "unavailable"
    for key in ("id", "provider", "qemu_profile", "display", "width", "height", "state", "created_at",
                "artifacts_dir", "capabilities", "browser_command", "desktop_user", "desktop_home",
                "desktop_runtime_dir", "runtime_base_url", "viewer_url", "live_desktop_view",
                "review_recording", "bridge_status", "readiness_state", "bridge_error"):
        assert key in session, key
    world.session = session
    got = world.ana.get(f"/api/sessions/{session['id']}")
    assert got.status_code == 200 and got.json()["browser_adapter"] is False
    listed = world.ana.get("/api/sessions").json()["sessions"]
    assert [s["id"] for s in listed] == [session["id"]]


def test_editor_typing_changes_the_screenshot_in_the_editor(world: World) -> None:
    sid = world.session["id"]
    before = world.ana.get(f"/api/sessions/{sid}/screenshot")
    assert before.status_code == 200 and before.headers["content-type"] == "image/png"
    assert decode(before.content)[:2] == (1024, 768)
    receipt = world.ana.act(sid, {"kind": "open_app", "name": "text_editor", "run_as_user": "desktop"})
    assert receipt["status"] == "ok", receipt
    assert receipt["action_type"] == "open_app" and receipt["result"] == {"command": "mousepad"}
    deadline = time.monotonic() + 60
    window = None
    while time.monotonic() < deadline:
        observation = world.ana.get(f"/api/sessions/{sid}/observation").json()
        window = observation["active_window"]
        if window and "mousepad" in (window["class_name"] + window["title"]).lower():
            break
        time.sleep(0.5)
    assert window and "mousepad" in (window["class_name"] + window["title"]).lower(), window
    geometry = world.ana.act(sid, {"kind": "run_command",
                                   "command": "xdotool getactivewindow getwindowgeometry --shell"})
    assert geometry["status"] == "ok", geometry
    values = dict(line.split("=", 1) for line in geometry["result"]["stdout"].split())
    box = (int(values["X"]), int(values["Y"]), int(values["WIDTH"]), int(values["HEIGHT"]))
    time.sleep(1)  # the editor finishes drawing
    before = world.ana.get(f"/api/sessions/{sid}/screenshot").content
    typed = world.ana.act(sid, {"kind": "type_text", "text": "hello from dovecote"})
    assert typed["status"] == "ok" and typed["result"] == {"typed": "hello from dovecote"}, typed
    time.sleep(0.5)
    after = world.ana.get(f"/api/sessions/{sid}/screenshot").content
    assert changed_pixels(before, after, box) > 50


def test_run_command_and_files_round_trip(world: World) -> None:
    sid = world.session["id"]
    written = world.ana.act(sid, {"kind": "write_file", "path": "notes/todo.txt", "contents": "ünïcode\n"})
    assert written["status"] == "ok" and written["result"] == {
        "path": "notes/todo.txt", "bytes_written": len("ünïcode\n".encode())}, written
    ran = world.ana.act(sid, {"kind": "run_command", "command": "cat notes/todo.txt; echo $FOO; pwd; id -un",
                              "env": {"FOO": "bar"}, "run_as_user": "desktop"})
    assert ran["status"] == "ok", ran
    assert ran["result"] == {"stdout": "ünïcode\nbar\n/home/dove\ndove\n", "stderr": "", "exit_code": 0}
    read = world.ana.act(sid, {"kind": "read_file", "path": "/home/dove/notes/todo.txt"})
    assert read["result"] == {"path": "/home/dove/notes/todo.txt", "contents": "ünïcode\n"}
    failed = world.ana.act(sid, {"kind": "run_command", "command": "echo oops >&2; exit 3"})
    assert failed["status"] == "error" and failed["result"] == {}
    assert failed["error"]["code"] == "command_failed" and failed["error"]["category"] == "execution"
    assert failed["error"]["retryable"] is True and failed["error"]["details"]["exit_code"] == 3
    missing = world.ana.act(sid, {"kind": "read_file", "path": "/nope/none"})
    assert missing["status"] == "error" and missing["error"]["code"] == "io_error"
    tool = world.ana.act(sid, {"kind": "open_app", "name": "no-such-app"})
    assert tool["error"]["code"] == "missing_tool" and tool["error"]["category"] == "environment"
    browser = world.ana.act(sid, {"kind": "browser_open", "url": "https://example.com"})
    assert browser["status"] == "error" and browser["error"]["code"] == "unsupported"
    for action, result in (
            ({"kind": "mouse_move", "x": 10, "y": 20}, {"x": 10, "y": 20}),
            ({"kind": "mouse_click", "button": "right", "x": 5, "y": 5}, {"button": "right"}),
            ({"kind": "key_press", "key": "Escape"}, {"key": "Escape"}),
            ({"kind": "hotkey", "keys": ["ctrl", "a"]}, {"keys": ["ctrl", "a"]}),
            ({"kind": "scroll", "delta_x": 0, "delta_y": 250}, {"delta_y": 250, "emulated_clicks": 3}),
            ({"kind": "mouse_drag", "start_x": 1, "start_y": 2, "end_x": 30, "end_y": 40},
             {"start": [1, 2], "end": [30, 40]})):
        receipt = world.ana.act(sid, action)
        assert receipt["status"] == "ok" and receipt["result"] == result, receipt
    pointer = world.ana.get(f"/api/sessions/{sid}/observation").json()["cursor_position"]
    assert (pointer["x"], pointer["y"]) == (30, 40)


def test_sandbox_keeps_run_command_off_the_host(world: World) -> None:
    sid = world.session["id"]
    secret = Path(f"/var/tmp/dovecote-secret-{secrets.token_hex(4)}")
    secret.write_text("root only\n")
    secret.chmod(0o600)
    try:
        for path in (str(secret), "/etc/shadow"):
            receipt = world.ana.act(sid, {"kind": "run_command", "command": f"cat {path}"})
            assert receipt["status"] == "error", receipt
            assert "root only" not in json.dumps(receipt)
    finally:
        secret.unlink()
    port = world.suite.port
    probe = ("python3 -c \"import socket,sys\n"
             f"for host in ('127.0.0.1', '::1', '10.0.2.2', '{_host_address()}'):\n"
             "    try:\n"
             f"        socket.create_connection((host, {port}), timeout=3); print('CONNECTED', host)\n"
             "    except OSError as exc:\n"
             "        print('refused', host, exc)\n\"")
    receipt = world.ana.act(sid, {"kind": "run_command", "command": probe})
    assert receipt["status"] == "ok", receipt
    lines = receipt["result"]["stdout"].splitlines()
    assert len(lines) == 4 and all(line.startswith("refused ") for line in lines), lines
    ps = world.ana.act(sid, {"kind": "run_command",
                             "command": "ls /proc | grep -c '^[0-9]'; "
                                        "test -e /root && echo root || echo no-root"})
    count, root = ps["result"]["stdout"].split()
    assert int(count) < 30 and root == "no-root"  # its own PID and mount namespaces
    own = world.ana.act(sid, {"kind": "run_command", "command": "id -u"})
    assert own["result"]["stdout"].strip() != "0"


def _host_address() -> str:
    out = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
    return out[0] if out else "127.0.0.2"


def test_tasks_take_receipts_and_refuse_when_paused(world: World) -> None:
    sid = world.session["id"]
    created = world.ana.post("/api/tasks", {"session_id": sid, "description": "write notes",
                                            "thought_summary": "start", "require_approval": False})
    assert created.status_code == 201, created.text
    task = created.json()["task"]
    assert set(task) == {"id", "sessionId", "description", "status", "createdAt", "updatedAt",
                         "thoughtSummary", "requireApproval", "lastReceipt"}
    assert task["status"] == "pending" and task["sessionId"] == sid and task["lastReceipt"] is None
    receipt = world.ana.act(sid, {"kind": "mouse_move", "x": 3, "y": 4, "taskId": task["id"]})
    got = world.ana.get(f"/api/tasks/{task['id']}").json()["task"]
    assert got["status"] == "running" and got["lastReceipt"]["receipt_id"] == receipt["receipt_id"]
    paused = world.ana.post(f"/api/tasks/{task['id']}/pause")
    assert paused.status_code == 200 and paused.json()["task"]["status"] == "paused"
    refused = world.ana.post(f"/api/sessions/{sid}/actions",
                             {"kind": "mouse_move", "x": 3, "y": 4, "task_id": task["id"]})
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "task_paused"
    assert world.ana.post(f"/api/tasks/{task['id']}/resume").json()["task"]["status"] == "running"
    assert world.ana.post(f"/api/tasks/{task['id']}/terminate").json()["task"]["status"] == "terminated"
    refused = world.ana.post(f"/api/sessions/{sid}/actions",
                             {"kind": "key_press", "key": "a", "task_id": task["id"]})
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "task_terminated"
    again = world.ana.post(f"/api/tasks/{task['id']}/resume")
    assert again.status_code == 409 and again.json()["error"]["code"] == "invalid_transition"
    reset = world.ana.post(f"/api/tasks/{task['id']}/reset").json()["task"]
    assert reset["status"] == "pending" and reset["lastReceipt"] is None
    assert world.ana.post(f"/api/tasks/{task['id']}/complete").json()["task"]["status"] == "completed"
    unknown = world.ana.get("/api/tasks/task-nope")
    assert unknown.status_code == 404 and unknown.json() == {"error": "task not found"}
    assert world.ana.post("/api/tasks/task-nope/pause").json() == {"error": "task not found"}
    assert world.bob.get(f"/api/tasks/{task['id']}").json() == {"error": "task not found"}
    dashboard = world.ana.get("/api/dashboard").json()
    assert task["id"] in [t["id"] for t in dashboard["tasks"]]
    history = dashboard["action_history"][sid]
    assert history[0]["receipt"]["action_type"] == "mouse_move" and len(history) <= 250
    assert set(history[0]) == {"action", "receipt", "source"}
    assert world.bob.get("/api/dashboard").json() == {"tasks": [], "action_history": {}}


def test_observation_capabilities_and_health(world: World) -> None:
    sid = world.session["id"]
    obs = world.ana.get(f"/api/sessions/{sid}/observation").json()
    assert obs["screenshot"]["mime_type"] == "image/png"
    assert (obs["screenshot"]["width"], obs["screenshot"]["height"]) == (1024, 768)
    assert obs["screenshot_url"] == f"/api/sessions/{sid}/screenshot" and obs["summary"]
    assert obs["action_history"][0]["receipt"]["status"] in ("ok", "error")
    times = [e["receipt"]["completed_at"] for e in obs["action_history"]]
    assert times == sorted(times, reverse=True)
    caps = world.ana.get(f"/api/sessions/{sid}/actions").json()
    names = {a["name"] for a in caps["actions"]}
    assert {"mouse_move", "type_text", "run_command", "read_file"} <= names
    assert caps["provider"] == "xvfb" and caps["isolation"].startswith("weaker")
    service = world.ana.get("/api/capabilities").json()
    assert "actions" in service and "weaker" in service["isolation"]
    health = world.ana.get("/api/health").json()
    assert health["ok"] is True and health["guest"]["session_count"] == 1
    assert health["providers"]["xvfb"]["enabled"] is True
    assert health["providers"]["xvfb"]["isolation"].startswith("weaker")
    assert world.bob.get("/api/health").json()["guest"]["session_count"] == 0
    live = world.ana.get(f"/api/sessions/{sid}/live-view/")
    assert live.status_code == 409 and live.json()["error"]["code"] == "live_desktop_view_unavailable"
    export = world.ana.post(f"/api/sessions/{sid}/review/export")
    assert export.status_code == 409 and export.json()["error"]["mode"] == "unavailable"


def test_other_teams_and_unknown_ids_get_404(world: World) -> None:
    sid = world.session["id"]
    for api, path in ((world.bob, sid), (world.ana, "desk-nope"), (world.ana, "x" * 300)):
        for method, suffix, body in (("GET", "", None), ("DELETE", "", None),
                                     ("POST", "/actions", {"kind": "key_press", "key": "a"}),
                                     ("GET", "/actions", None), ("GET", "/observation", None),
                                     ("GET", "/screenshot", None)):
            response = api.http.request(method, f"/api/sessions/{path}{suffix}", json=body)
            assert response.status_code == 404 and response.json() == {"error": "session not found"}, \
                (method, suffix, response.text)
    assert world.bob.get("/api/sessions").json() == {"sessions": []}
    anonymous = httpx.get(world.suite.url + f"/api/sessions/{sid}", timeout=10)
    assert anonymous.status_code == 401
    task = world.bob.post("/api/tasks", {"session_id": sid, "description": "steal"})
    assert task.status_code == 404 and task.json() == {"error": "session not found"}


def test_bad_create_requests(world: World) -> None:
    bad = world.ana.post("/api/sessions", {"provider": "docker"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "unsupported_provider"
    for path in ("/etc", "../../etc", str(world.root / "share" / "nope")):
        response = world.ana.post("/api/sessions", {"provider": "xvfb", "shared_host_path": path})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["code"] == "shared_host_path_invalid"
    for body in ({"provider": "xvfb", "width": "wide"}, {"provider": "xvfb", "width": 10},
                 {"provider": "xvfb", "qemu_profile": "fancy"}, {"provider": "xvfb", "boot": "bios"}):
        response = world.ana.post("/api/sessions", body)
        assert response.status_code == 400 and response.json()["error"]["code"], response.text


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6)
FIELDS = ("x", "y", "button", "start_x", "start_y", "end_x", "end_y", "delta_x", "delta_y", "key",
          "keys", "name", "window_id", "bounds", "command", "cwd", "env", "run_as_user", "path",
          "contents", "url", "selector", "text", "task_id", "taskId")


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(kind=st.sampled_from([*ACTION_KINDS, "", "launch_missiles"]) | st.integers(),
       fields=st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES | st.integers(-5000, 5000), max_size=5))
def test_bad_actions_never_500(world: World, kind: Any, fields: dict[str, Any]) -> None:
    if kind in ("run_command", "open_app", "write_file") or (kind == "hotkey" and fields.get("keys")):
        return  # these could really run something; the schema checks are covered by the others
    body = {"kind": kind, **fields}
    if isinstance(body.get("task_id"), str) or isinstance(body.get("taskId"), str):
        body.pop("task_id", None)
        body.pop("taskId", None)
    response = world.ana.post(f"/api/sessions/{world.session['id']}/actions", body)
    assert response.status_code in (200, 400), response.text
    payload = response.json()
    if response.status_code == 400:
        error = payload["error"]
        assert error["code"] == "invalid_action" and error["category"] == "validation" and error["message"]
    else:
        assert payload["status"] in ("ok", "error") and payload["action_type"] == kind


def test_out_of_range_and_malformed_actions(world: World) -> None:
    sid = world.session["id"]
    for body in ({"kind": "mouse_move", "x": 1024, "y": 0}, {"kind": "mouse_move", "x": -1, "y": 0},
                 {"kind": "mouse_click", "x": 5}, {"kind": "mouse_drag", "start_x": 0, "start_y": 0,
                                                   "end_x": 0, "end_y": 768},
                 {"kind": "nope"}, {"kind": "type_text"}, {"kind": "mouse_move", "x": "1", "y": 2},
                 {"kind": "hotkey", "keys": []}, {"kind": "focus_window", "window_id": "abc; rm"},
                 {"x": 1}, [], "text"):
        response = world.ana.post(f"/api/sessions/{sid}/actions", body)
        assert response.status_code == 400, (body, response.text)
        assert response.json()["error"]["code"] == "invalid_action"
    raw = world.ana.http.post(f"/api/sessions/{sid}/actions", content=b"{nope",
                              headers={"Content-Type": "application/json"})
    assert raw.status_code == 400 and raw.json()["error"]["code"] == "invalid_action"


def test_broken_bridge_ends_failed_and_refuses_actions(world: World) -> None:
    response = world.bob.post("/api/sessions", {"provider": "xvfb", "boot": "no-bridge",
                                                "width": 800, "height": 600})
    assert response.status_code == 201, response.text
    session = response.json()["session"]
    assert session["readiness_state"] == "failed" and session["bridge_status"] == "failed"
    assert session["state"] == "failed" and "did not come up" in session["bridge_error"]
    assert [r["state"] for r in session["readiness_history"]] == ["booting", "desktop_ready", "failed"]
    refused = world.bob.post(f"/api/sessions/{session['id']}/actions", {"kind": "key_press", "key": "a"})
    assert refused.status_code == 409, refused.text
    error = refused.json()["error"]
    assert error["code"] == "provider_bridge_unavailable" and error["category"] == "provider"
    details = error["details"]
    assert details["provider"] == "xvfb" and details["bridge_status"] == "failed"
    assert details["readiness_state"] == "failed" and details["bridge_error"] == session["bridge_error"]
    assert set(details) >= {"provider", "qemu_profile", "viewer_url", "live_desktop_view",
                            "review_recording", "bridge_status", "readiness_state", "bridge_error"}
    assert world.bob.get(f"/api/sessions/{session['id']}/actions").json()["actions"] == []
    assert world.bob.delete(f"/api/sessions/{session['id']}").json() == {"ok": True}


def test_the_regression_profile_is_a_bare_fixed_size_desktop(world: World) -> None:
    response = world.bob.post("/api/sessions", {"provider": "xvfb", "qemu_profile": "regression",
                                                "width": 1600, "height": 1000})
    assert response.status_code == 201, response.text
    session = response.json()["session"]
    assert (session["width"], session["height"]) == (1024, 768)
    assert session["readiness_state"] == "runtime_ready", session
    shot = world.bob.get(f"/api/sessions/{session['id']}/screenshot")
    assert shot.status_code == 200 and decode(shot.content)[:2] == (1024, 768)
    wm = world.bob.act(session["id"], {"kind": "run_command", "command": "pgrep -x openbox || echo none"})
    assert wm["status"] == "ok" and wm["result"]["stdout"] == "none\n", wm
    assert world.bob.delete(f"/api/sessions/{session['id']}").json() == {"ok": True}


def test_delete_leaves_nothing_behind(world: World) -> None:
    sid = world.session["id"]
    runtime = Path(world.session["artifacts_dir"])
    assert runtime.is_dir()
    assert _processes_mentioning(str(runtime))
    response = world.ana.delete(f"/api/sessions/{sid}")
    assert response.status_code == 200 and response.json() == {"ok": True}
    deadline = time.monotonic() + 15
    while (_processes_mentioning(str(runtime)) or _processes_of("dovecote-desktop")) \
            and time.monotonic() < deadline:  # orphaned sandbox zombies wait for init to reap them
        time.sleep(0.2)
    assert not _processes_mentioning(str(runtime))
    assert not runtime.exists()
    assert _processes_of("dovecote-desktop") == []
    assert world.ana.get(f"/api/sessions/{sid}").json() == {"error": "session not found"}
    assert world.ana.get("/api/health").json()["guest"]["session_count"] == 0
    again = world.ana.post("/api/sessions", {"provider": "xvfb", "width": 640, "height": 480})
    assert again.status_code == 201 and again.json()["session"]["readiness_state"] == "runtime_ready"
    assert world.ana.delete(f"/api/sessions/{again.json()['session']['id']}").json() == {"ok": True}


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if text.encode() in cmdline:
                found.append(int(entry))
    return found


def _processes_of(user: str) -> list[str]:
    out = subprocess.run(["ps", "-u", user, "-o", "pid=,args="], capture_output=True, text=True)
    return [line for line in out.stdout.splitlines() if line.strip()]
