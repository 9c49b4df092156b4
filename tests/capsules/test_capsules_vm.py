"""Capsules on a real QEMU VM, over real HTTP, against ``dovecote up``.

One suite and one capsule for the whole module (a TCG boot takes a while):
the tests run in file order and the last one destroys the capsule. vmmgr
uses the libvirt driver and a shared guest image cache
(``DOVECOTE_TEST_IMAGE_DIR``, default ``/var/tmp/dovecote/images``, vmmgr's own), so
the image is built once per machine, not per run.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.helpers.capsules import Api, api_client, running_capsule, wait_status
from tests.helpers.suite import Suite

pytestmark = pytest.mark.slow


class World:
    def __init__(self, suite: Suite, ana: Api, bob: Api, capsule_id: str) -> None:
        self.suite, self.ana, self.bob, self.capsule_id = suite, ana, bob, capsule_id

    def exec(self, cmd: str, **kw: Any) -> httpx.Response:
        return self.ana.post(f"/v1/capsules/{self.capsule_id}/exec", {"cmd": cmd, **kw})


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with running_capsule("dcvm-") as (suite, ana, capsule_id):
        yield World(suite, ana, api_client(suite, "Bob"), capsule_id)


def test_a_running_capsule_is_listed_and_runs_echo(world: World) -> None:
    listed = world.ana.get("/v1/capsules")
    assert listed.status_code == 200
    mine = [c for c in listed.json() if c["id"] == world.capsule_id]
    assert mine and mine[0]["status"] == "running" and mine[0]["started_at"]
    assert mine[0]["metadata"]["agent_version"]
    # It is a real VM: a libvirt domain, and the guest runs its own kernel.
    state = subprocess.run(["virsh", "-c", "qemu:///system", "domstate", f"dovecote-{world.capsule_id}"],
                           capture_output=True, text=True, check=False)
    assert state.stdout.strip() == "running", state.stderr
    health = httpx.get(world.suite.url + "/healthz").json()["services"]["vmmgr"]["details"]
    assert health["image"] == "ready" and health["accel"] in ("kvm", "tcg")
    kernel = world.exec("uname -r").json()["stdout"].strip()
    assert kernel == mine[0]["metadata"]["kernel_version"] and kernel != os.uname().release
    response = world.exec("echo hello")
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["stdout"], body["exit_code"], body["sandbox_id"]) == ("hello\n", 0, world.capsule_id)
    # The guest got its identity: the hostname is the capsule id.
    assert world.exec("hostname").json()["stdout"].strip() == world.capsule_id
    assert world.ana.post(f"/v1/capsules/{world.capsule_id}/ping").status_code == 204


def test_a_background_process_is_listed_then_killed(world: World) -> None:
    started = world.exec("sleep 300", background=True, tag="napper")
    assert started.status_code == 202, started.text
    assert started.json()["tag"] == "napper" and started.json()["pid"] > 0
    processes = world.ana.get(f"/v1/capsules/{world.capsule_id}/processes")
    assert processes.status_code == 200
    assert "napper" in [p.get("tag") for p in processes.json()["processes"]]
    killed = world.ana.delete(f"/v1/capsules/{world.capsule_id}/processes/napper",
                              params={"signal": "SIGTERM"})
    assert killed.status_code == 204, killed.text
    processes = world.ana.get(f"/v1/capsules/{world.capsule_id}/processes").json()["processes"]
    assert "napper" not in [p.get("tag") for p in processes]
    assert world.ana.delete(f"/v1/capsules/{world.capsule_id}/processes/napper").status_code == 404


def test_files_write_read_list_mkdir_remove(world: World) -> None:
    base = f"/v1/capsules/{world.capsule_id}/files"
    made = world.ana.post(f"{base}/mkdir", {"path": "/root/work"})
    assert made.status_code == 200, made.text
    assert made.json()["entry"]["type"] == "directory"
    again = world.ana.post(f"{base}/mkdir", {"path": "/root/work"})
    assert again.status_code == 409 and again.json()["error"]["code"] == "already_exists"
    payload = bytes(range(256)) * 10
    written = world.ana.post(f"{base}/write", data={"path": "/root/work/blob.bin"},
                             files={"file": ("blob.bin", payload)})
    assert written.status_code == 204, written.text
    read = world.ana.post(f"{base}/read", {"path": "/root/work/blob.bin"})
    assert read.status_code == 200 and read.content == payload
    assert read.headers["content-type"] == "application/octet-stream"
    listing = world.ana.post(f"{base}/list", {"path": "/root/work", "depth": 1})
    assert listing.status_code == 200
    assert [(e["name"], e["type"], e["size"]) for e in listing.json()["entries"]] == [
        ("blob.bin", "file", len(payload))]
    removed = world.ana.post(f"{base}/remove", {"path": "/root/work"})
    assert removed.status_code == 204
    gone = world.ana.post(f"{base}/read", {"path": "/root/work/blob.bin"})
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "not_found"


ISOLATION_PROBE = """
import json, socket, sys
out = {}
for target in json.loads(sys.argv[1]):
    host, port = target.rsplit(":", 1)
    host = host.strip("[]")
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    s.settimeout(4)
    try:
        s.connect((host, int(port)))
        out[target] = "open"
    except OSError as exc:
        out[target] = type(exc).__name__
    s.close()
try:
    out["dns"] = socket.getaddrinfo("deb.debian.org", 80)[0][4][0]
except OSError as exc:
    out["dns"] = "failed " + str(exc)
print(json.dumps(out))
"""


def _host_listeners() -> tuple[list[socket.socket], int]:
    """Listeners on every address of the host (IPv4 and IPv6), on one port."""
    v4 = socket.socket(socket.AF_INET)
    v4.bind(("0.0.0.0", 0))
    port = v4.getsockname()[1]
    v6 = socket.socket(socket.AF_INET6)
    v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    v6.bind(("::", port))
    for s in (v4, v6):
        s.listen(16)
    return [v4, v6], port


def test_the_capsule_reaches_dns_but_nothing_of_the_host_nor_another_capsule(world: World) -> None:
    health = httpx.get(world.suite.url + "/healthz").json()["services"]["vmmgr"]["details"]
    assert health["netguard"] == "on", health
    listeners, port = _host_listeners()
    other = world.ana.post("/v1/capsules", {"template": "minimal", "vcpus": 1, "memory_mb": 512})
    assert other.status_code == 202, other.text
    other_id = other.json()["id"]
    try:
        wait_status(world.ana, other_id, "running")
        served = world.ana.post(f"/v1/capsules/{other_id}/exec", {
            "cmd": "python3 -m http.server 7000", "background": True, "tag": "web"})
        assert served.status_code == 202, served.text
        addresses = subprocess.run(["hostname", "-I"], capture_output=True, text=True,
                                   check=True).stdout.split()
        targets = [f"10.0.2.2:{world.suite.port}", f"10.0.2.2:{port}", "169.254.169.254:80",
                   f"[fec0::2]:{port}", "10.0.2.15:7000", "10.0.2.2:7000"]
        targets += [f"[{a}]:{port}" if ":" in a else f"{a}:{port}" for a in addresses]
        written = world.ana.post(f"/v1/capsules/{world.capsule_id}/files/write",
                                 files={"file": ("p.py", ISOLATION_PROBE.encode())},
                                 data={"path": "/tmp/isolation_probe.py"})
        assert written.status_code == 204, written.text
        answer = world.exec(f"python3 /tmp/isolation_probe.py '{json.dumps(targets)}'", timeout_sec=120)
        assert answer.status_code == 200, answer.text
        result = json.loads(answer.json()["stdout"])
        # The guest's DNS works (slirp forwards it to the host's resolvers)...
        assert not result.pop("dns").startswith("failed"), result
        # ...and nothing of the host, of its networks or of the other capsule answers.
        assert set(result) == set(targets)
        assert "open" not in result.values(), result
    finally:
        for s in listeners:
            s.close()
        world.ana.delete(f"/v1/capsules/{other_id}")
        wait_status(world.ana, other_id, "stopped", "error", "missing", timeout=120)


def test_another_team_gets_404_everywhere(world: World) -> None:
    for response in (world.bob.get(f"/v1/capsules/{world.capsule_id}"),
                     world.bob.post(f"/v1/capsules/{world.capsule_id}/exec", {"cmd": "id"}),
                     world.bob.delete(f"/v1/capsules/{world.capsule_id}")):
        assert response.status_code == 404, response.text
        assert response.json()["error"]["code"] == "not_found"
    assert world.capsule_id not in [c["id"] for c in world.bob.get("/v1/capsules").json()]


def test_session_cookies_with_csrf_and_the_admin_routes(world: World) -> None:
    ana, bob = world.ana.browser, world.bob.browser
    assert ana is not None and bob is not None
    assert world.capsule_id in [c["id"] for c in ana.get("/v1/capsules").json()]
    ping = f"/v1/capsules/{world.capsule_id}/ping"
    refused = ana.post(ping, csrf=False)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "csrf_failed"
    assert ana.post(ping).status_code == 204
    # Ana signed up first: she is the platform admin; Bob is not.
    everyone = ana.get("/v1/admin/capsules")
    assert everyone.status_code == 200 and world.capsule_id in [c["id"] for c in everyone.json()]
    assert bob.get("/v1/admin/capsules").status_code == 403
    assert bob.post(f"/v1/admin/capsules/{world.capsule_id}/exec", {"cmd": "id"}).status_code == 403
    ran = ana.post(f"/v1/admin/capsules/{world.capsule_id}/exec", {"cmd": "echo admin"})
    assert ran.status_code == 200 and ran.json()["stdout"] == "admin\n"
    # An API key never reaches the admin routes.
    assert world.ana.get("/v1/admin/capsules").status_code == 403


def test_a_sigkilled_vmmgr_comes_back_and_the_capsule_keeps_running(world: World) -> None:
    health = httpx.get(world.suite.url + "/healthz").json()
    pid = int(health["services"]["vmmgr"]["details"]["pid"])
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 120
    response = None
    while time.monotonic() < deadline:
        health = httpx.get(world.suite.url + "/healthz").json()
        vmmgr = health["services"]["vmmgr"]
        if vmmgr["status"] == "ok" and vmmgr["details"].get("pid") != str(pid):
            response = world.exec("echo back")
            if response.status_code == 200:
                break
        time.sleep(1)
    assert response is not None and response.status_code == 200, response and response.text
    assert response.json()["stdout"] == "back\n"
    assert wait_status(world.ana, world.capsule_id, "running", timeout=5)["status"] == "running"


def test_destroy_stops_the_capsule_and_exec_is_then_409(world: World) -> None:
    response = world.ana.delete(f"/v1/capsules/{world.capsule_id}")
    assert response.status_code == 202, response.text
    assert response.json()["status"] in ("stopping", "stopped")
    wait_status(world.ana, world.capsule_id, "stopped", timeout=120)
    refused = world.exec("echo hello")
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "not_running"
