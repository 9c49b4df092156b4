"""Desktop sessions on the qemu provider: a real QEMU desktop VM under TCG, over real HTTP.

One ``dovecote up`` with the libvirt driver and ``DOVECOTE_DESKTOP_TEMPLATE=true``
for the module, and one session: the tests run in file order. The first run on
a host builds the desktop image (``infra/guest/desktop.py``, minutes) and the
desktop template (a cold boot of the desktop, a minute or two under TCG), both
cached in the shared image directory; after that a session is a restore.

The issue's done-means flow: create with the defaults, poll until
``runtime_ready``, ``open_app`` the text editor as the desktop user,
``type_text``, the screenshot changes in the editor's region, ``run_command``
and ``read_file`` round trip, ``DELETE`` leaves no VM and no capsule directory.
Then a session whose bridge is broken on purpose ends ``failed`` with a reason
and its actions get ``provider_bridge_unavailable``. vmmgr runs its warm pool
(``DOVECOTE_VM_TEMPLATES=true``): a create claims a desktop spare when one is
ready, else restores the template; a ``regression`` session shares a host
directory both ways.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.desktops.helpers import TEMPLATE_BUILD_S, Api, api_client
from tests.desktops.png import changed_pixels, decode
from tests.helpers.capsules import IMAGE_DIR, domains, libvirt_ready
from tests.helpers.suite import Suite

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]

READY_S = 180.0
"""From create to runtime_ready once the template is cached (a restore)."""
BRIDGE_TIMEOUT_S = 60


class World:
    suite: Suite
    ana: Api
    session: dict[str, Any]
    capsule_id: str
    root: Path


def wait_session(api: Api, sid: str, states: tuple[str, ...], timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        response = api.get(f"/api/sessions/{sid}")
        assert response.status_code == 200, response.text
        session: dict[str, Any] = response.json()["session"]
        if session["readiness_state"] in states or time.monotonic() > deadline:
            return session
        time.sleep(1)


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    reason = libvirt_ready()
    if reason:
        pytest.fail(f"the qemu desktop tests need libvirt: {reason}")
    root = Path(tempfile.mkdtemp(prefix="dcqdesk-", dir="/tmp"))
    root.chmod(0o755)
    w = World()
    w.root = root
    (root / "shares" / "team").mkdir(parents=True)
    w.suite = Suite(data_dir=root / "data", extra_env={
        "DOVECOTE_DESKTOP_SHARE_ROOT": str(root / "shares"),
        "DOVECOTE_SIGNUP_MAX_PER_IP": "100000", "DOVECOTE_VM_DRIVER": "libvirt",
        "DOVECOTE_VM_IMAGE_DIR": IMAGE_DIR, "DOVECOTE_VM_BOOT_TIMEOUT_S": "600",
        "DOVECOTE_VM_TEMPLATES": "true",  # the warm pool (it keeps desktop spares too)
        "DOVECOTE_VM_POOL_SIZE": "1",
        "DOVECOTE_DESKTOP_TEMPLATE": "true",
        "DOVECOTE_DESKTOP_QEMU_BRIDGE_TIMEOUT_S": str(BRIDGE_TIMEOUT_S)})
    try:
        w.suite.wait_ready()
        (root / "data").chmod(0o755)
        w.ana = api_client(w.suite, "Ana")
        deadline = time.monotonic() + TEMPLATE_BUILD_S
        while time.monotonic() < deadline:  # the first run on a host builds image and template
            health = w.ana.get("/api/health").json()
            if health["guest"]["status"] == "ok":
                break
            time.sleep(5)
        yield w
    except BaseException:
        print("".join(w.suite.output[-150:]))
        raise
    finally:
        w.suite.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_create_with_defaults_restores_the_template_and_becomes_runtime_ready(world: World) -> None:
    began = time.monotonic()
    response = world.ana.post("/api/sessions", {})
    assert response.status_code == 201, response.text
    session = response.json()["session"]
    assert session["provider"] == "qemu" and session["qemu_profile"] == "product"
    assert (session["width"], session["height"]) == (1440, 900)
    assert session["desktop_user"] == "dove" and session["desktop_home"] == "/home/dove"
    assert session["desktop_runtime_dir"] == "/run/user/1000"
    sid = session["id"]
    session = wait_session(world.ana, sid, ("runtime_ready", "failed"), READY_S)
    assert session["readiness_state"] == "runtime_ready", session
    assert session["bridge_status"] == "runtime_ready" and session["state"] == "running"
    assert session["bridge_error"] is None
    assert [r["state"] for r in session["readiness_history"]] == [
        "booting", "desktop_ready", "bridge_listening", "bridge_attached", "runtime_ready"]
    print(f"create -> runtime_ready in {time.monotonic() - began:.1f} s:",
          ", ".join(f"{r['state']} {r['at'][11:23]}" for r in session["readiness_history"]))
    world.session = session
    capsules = world.ana.get("/v1/capsules").json()
    mine = [c for c in capsules if (c.get("metadata") or {}).get("desktop_session") == sid]
    assert len(mine) == 1 and mine[0]["template"] == "desktop", capsules
    world.capsule_id = mine[0]["id"]
    assert f"dovecote-{world.capsule_id}" in domains()


def test_a_desktop_create_claims_a_warm_spare(world: World) -> None:
    """vmmgr's warm pool keeps a desktop spare (restored and warmed up ahead of time): a create
    takes it, so the session's VM was running before the create was asked for."""
    for _attempt in range(4):  # the pool makes its next spare 10 s after a claim
        time.sleep(20)
        before = domains()
        response = world.ana.post("/api/sessions", {})
        assert response.status_code == 201, response.text
        sid = response.json()["session"]["id"]
        session = wait_session(world.ana, sid, ("runtime_ready", "failed"), READY_S)
        assert session["readiness_state"] == "runtime_ready", session
        capsule_id = next(c["id"] for c in world.ana.get("/v1/capsules").json()
                          if (c.get("metadata") or {}).get("desktop_session") == sid)
        assert world.ana.delete(f"/api/sessions/{sid}").status_code == 200
        if f"dovecote-{capsule_id}" in before:
            return
    raise AssertionError("no desktop create found a warm spare")


def test_editor_typing_changes_the_screenshot_in_the_editor(world: World) -> None:
    sid = world.session["id"]
    shot = world.ana.get(f"/api/sessions/{sid}/screenshot")
    assert shot.status_code == 200 and shot.headers["content-type"] == "image/png"
    assert decode(shot.content)[:2] == (1440, 900)
    receipt = world.ana.act(sid, {"kind": "open_app", "name": "text_editor", "run_as_user": "desktop"})
    assert receipt["status"] == "ok" and receipt["result"] == {"command": "mousepad"}, receipt
    deadline = time.monotonic() + 120
    window = None
    while time.monotonic() < deadline:
        observation = world.ana.get(f"/api/sessions/{sid}/observation").json()
        window = observation["active_window"]
        if window and "mousepad" in (window["class_name"] + window["title"]).lower():
            break
        time.sleep(1)
    assert window and "mousepad" in (window["class_name"] + window["title"]).lower(), window
    assert observation["screenshot"]["width"] == 1440 and observation["screenshot"]["height"] == 900
    geometry = world.ana.act(sid, {"kind": "run_command",
                                   "command": "xdotool getactivewindow getwindowgeometry --shell"})
    assert geometry["status"] == "ok", geometry
    values = dict(line.split("=", 1) for line in geometry["result"]["stdout"].split())
    box = (int(values["X"]), int(values["Y"]), int(values["WIDTH"]), int(values["HEIGHT"]))
    time.sleep(3)  # the editor finishes drawing (software rendering under TCG)
    before = world.ana.get(f"/api/sessions/{sid}/screenshot").content
    typed = world.ana.act(sid, {"kind": "type_text", "text": "hello from dovecote"})
    assert typed["status"] == "ok" and typed["result"] == {"typed": "hello from dovecote"}, typed
    deadline = time.monotonic() + 30
    changed = 0
    while time.monotonic() < deadline and changed <= 50:
        time.sleep(1)
        after = world.ana.get(f"/api/sessions/{sid}/screenshot").content
        changed = changed_pixels(before, after, box)
    assert changed > 50


def test_run_command_and_read_file_round_trip(world: World) -> None:
    sid = world.session["id"]
    ran = world.ana.act(sid, {"kind": "run_command", "run_as_user": "desktop", "env": {"FOO": "bar"},
                              "command": "printf 'ünïcode %s\\n' \"$FOO\" > notes.txt; id -un; pwd"})
    assert ran["status"] == "ok", ran
    assert ran["result"] == {"stdout": "dove\n/home/dove\n", "stderr": "", "exit_code": 0}
    read = world.ana.act(sid, {"kind": "read_file", "path": "/home/dove/notes.txt"})
    assert read["status"] == "ok" and read["result"] == {
        "path": "/home/dove/notes.txt", "contents": "ünïcode bar\n"}, read
    written = world.ana.act(sid, {"kind": "write_file", "path": "notes/b.txt", "contents": "two\n"})
    assert written["status"] == "ok" and written["result"]["bytes_written"] == 4, written
    back = world.ana.act(sid, {"kind": "run_command", "command": "cat notes/b.txt"})
    assert back["result"]["stdout"] == "two\n", back
    failed = world.ana.act(sid, {"kind": "run_command", "command": "echo oops >&2; exit 3"})
    assert failed["status"] == "error" and failed["error"]["code"] == "command_failed"
    missing = world.ana.act(sid, {"kind": "read_file", "path": "/nope/none"})
    assert missing["status"] == "error" and missing["error"]["code"] == "io_error", missing
    clicked = world.ana.act(sid, {"kind": "mouse_click", "button": "left", "x": 1439, "y": 899})
    assert clicked["status"] == "ok", clicked
    pointer = world.ana.get(f"/api/sessions/{sid}/observation").json()["cursor_position"]
    assert (pointer["x"], pointer["y"]) == (1439, 899)
    out_of_range = world.ana.post(f"/api/sessions/{sid}/actions", {"kind": "mouse_move", "x": 1440, "y": 0})
    assert out_of_range.status_code == 400, out_of_range.text


def test_delete_leaves_no_vm_and_no_capsule_directory(world: World) -> None:
    sid, capsule_id = world.session["id"], world.capsule_id
    response = world.ana.delete(f"/api/sessions/{sid}")
    assert response.status_code == 200 and response.json() == {"ok": True}
    assert world.ana.get(f"/api/sessions/{sid}").status_code == 404
    run_dir = world.root / "data"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        left = [p for p in run_dir.rglob(capsule_id)]
        if f"dovecote-{capsule_id}" not in domains() and not left:
            break
        time.sleep(1)
    assert f"dovecote-{capsule_id}" not in domains()
    assert not [p for p in run_dir.rglob(capsule_id)]
    capsule = world.ana.get(f"/v1/capsules/{capsule_id}").json()
    assert capsule["status"] in ("stopped", "missing"), capsule


def test_another_size_is_applied_after_the_restore(world: World) -> None:
    response = world.ana.post("/api/sessions", {"width": 1280, "height": 720})
    assert response.status_code == 201, response.text
    sid = response.json()["session"]["id"]
    session = wait_session(world.ana, sid, ("runtime_ready", "failed"), READY_S)
    assert session["readiness_state"] == "runtime_ready", session
    shot = world.ana.get(f"/api/sessions/{sid}/screenshot")
    assert shot.status_code == 200 and decode(shot.content)[:2] == (1280, 720)
    edge = world.ana.act(sid, {"kind": "mouse_move", "x": 1279, "y": 719})
    assert edge["status"] == "ok", edge
    pointer = world.ana.get(f"/api/sessions/{sid}/observation").json()["cursor_position"]
    assert (pointer["x"], pointer["y"]) == (1279, 719)
    assert world.ana.delete(f"/api/sessions/{sid}").status_code == 200


def test_a_shared_host_path_is_read_write_in_a_bare_regression_desktop(world: World) -> None:
    """``shared_host_path`` is the guest's ``/shared/hostshare`` both ways (9p); the
    ``regression`` profile has a fixed 1024x768 screen and no window manager."""
    share = world.root / "shares" / "team"
    (share / "from-host.txt").write_text("written on the host\n")
    outside = world.ana.post("/api/sessions", {"shared_host_path": str(world.root / "data")})
    assert outside.status_code == 400, outside.text
    assert outside.json()["error"]["code"] == "shared_host_path_invalid"
    response = world.ana.post("/api/sessions", {"qemu_profile": "regression", "width": 1600,
                                                "height": 1000, "shared_host_path": "team"})
    assert response.status_code == 201, response.text
    session = response.json()["session"]
    assert session["qemu_profile"] == "regression"
    assert (session["width"], session["height"]) == (1024, 768)
    sid = session["id"]
    session = wait_session(world.ana, sid, ("runtime_ready", "failed"), READY_S)
    assert session["readiness_state"] == "runtime_ready", session
    shot = world.ana.get(f"/api/sessions/{sid}/screenshot")
    assert shot.status_code == 200 and decode(shot.content)[:2] == (1024, 768)
    wm = world.ana.act(sid, {"kind": "run_command", "command": "sleep 2; pgrep -x openbox || echo none"})
    assert wm["status"] == "ok" and wm["result"]["stdout"] == "none\n", wm
    read = world.ana.act(sid, {"kind": "read_file", "path": "/shared/hostshare/from-host.txt"})
    assert read["status"] == "ok" and read["result"]["contents"] == "written on the host\n", read
    wrote = world.ana.act(sid, {"kind": "run_command", "run_as_user": "desktop",
                                "command": "mkdir -p /shared/hostshare/out && echo written in the guest"
                                           " > /shared/hostshare/out/g.txt && id -un"})
    assert wrote["status"] == "ok" and wrote["result"]["stdout"] == "dove\n", wrote
    assert (share / "out" / "g.txt").read_text() == "written in the guest\n"
    assert world.ana.delete(f"/api/sessions/{sid}").status_code == 200
    assert (share / "out" / "g.txt").exists() and (share / "from-host.txt").exists()


def test_a_restarted_desktops_service_destroys_the_vms_of_its_lost_sessions(world: World) -> None:
    response = world.ana.post("/api/sessions", {})
    assert response.status_code == 201, response.text
    sid = response.json()["session"]["id"]
    session = wait_session(world.ana, sid, ("runtime_ready", "failed"), READY_S)
    assert session["readiness_state"] == "runtime_ready", session
    capsule_id = next(c["id"] for c in world.ana.get("/v1/capsules").json()
                      if (c.get("metadata") or {}).get("desktop_session") == sid)
    health = world.ana.http.get("/healthz").json()
    pid = int(health["services"]["desktops"]["details"]["pid"])
    os.kill(pid, signal.SIGKILL)  # the supervisor starts it again; its sessions are gone
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        status = world.ana.get(f"/v1/capsules/{capsule_id}").json().get("status")
        if status in ("stopped", "missing") and f"dovecote-{capsule_id}" not in domains():
            break
        time.sleep(2)
    assert status in ("stopped", "missing") and f"dovecote-{capsule_id}" not in domains(), status
    # The restarted service may still be starting (503) when its lost VM is already gone.
    deadline = time.monotonic() + 60
    while (answer := world.ana.get(f"/api/sessions/{sid}")).status_code == 503:
        assert time.monotonic() < deadline, answer.text
        time.sleep(1)
    assert answer.status_code == 404, answer.text


def test_a_broken_bridge_ends_failed_and_actions_are_refused(world: World) -> None:
    response = world.ana.post("/api/sessions", {"boot": "no-bridge", "width": 1024, "height": 768})
    assert response.status_code == 201, response.text
    sid = response.json()["session"]["id"]
    began = time.monotonic()
    session = wait_session(world.ana, sid, ("failed", "runtime_ready"), BRIDGE_TIMEOUT_S + 90)
    assert session["readiness_state"] == "failed", session
    assert time.monotonic() - began < BRIDGE_TIMEOUT_S + 60
    assert session["bridge_status"] == "failed" and session["state"] == "failed"
    assert session["bridge_error"] and "did not come up" in session["bridge_error"], session
    states = [r["state"] for r in session["readiness_history"]]
    assert states[:2] == ["booting", "desktop_ready"] and states[-1] == "failed", states
    refused = world.ana.post(f"/api/sessions/{sid}/actions", {"kind": "run_command", "command": "true"})
    assert refused.status_code == 409, refused.text
    error = refused.json()["error"]
    assert error["code"] == "provider_bridge_unavailable" and error["category"] == "provider"
    assert error["details"]["bridge_status"] == "failed" and error["details"]["bridge_error"]
    shot = world.ana.get(f"/api/sessions/{sid}/screenshot")  # from the host: no bridge needed
    assert shot.status_code == 200 and decode(shot.content)[:2][0] > 0
    assert world.ana.delete(f"/api/sessions/{sid}").status_code == 200
