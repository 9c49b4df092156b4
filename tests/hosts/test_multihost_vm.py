"""Many hosts for real, on one machine: the suite plus two hosts in network namespaces.

The suite's bus runs over TCP with CURVE (the broker's own keypair, an
allow-list of the client key), as a deployment across machines does. Each
extra host is a ``dovecote vmmgr`` in its own network namespace (a veth link
to this machine) and data directory, reaching the broker and the control
plane over that link, registered with a token and tagged. The VMs themselves
are run by this machine's libvirtd, as on any host.

The tests cover placement by tag, a host cut off (its link down) for longer
than the silence window and restored (its capsule unreachable meanwhile,
answered with 503 at once; then running again with its counter still
counting and its file intact), and a host deleted by the operator with a
capsule on it (the VM destroyed, the host's vmmgr stopping with the reason).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from dovecote.bus import generate_keypair
from tests.accounts.helpers import Browser
from tests.helpers.capsules import BOOT_TIMEOUT_S, IMAGE_DIR, Api, api_client, libvirt_ready
from tests.helpers.suite import Suite, free_port
from tests.hosts.helpers import HostProcess, Netns, create_admin, create_host, eventually

pytestmark = pytest.mark.slow

SILENCE_S = 3


class Bed:
    def __init__(self, suite: Suite, admin: Browser, api: Api) -> None:
        self.suite, self.admin, self.api = suite, admin, api
        self.hosts: dict[str, tuple[Netns, HostProcess, str]] = {}

    def capsule(self, capsule_id: str) -> dict[str, Any]:
        response = self.api.get(f"/v1/capsules/{capsule_id}")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def exec(self, capsule_id: str, cmd: str, timeout: float = 60) -> httpx.Response:
        return self.api.post(f"/v1/capsules/{capsule_id}/exec", {"cmd": cmd, "timeout_sec": 60},
                             timeout=timeout)

    def create_on(self, tag: str) -> str:
        deadline = time.monotonic() + 600
        while True:
            response = self.api.post("/v1/capsules", {"template": "minimal", "metadata": {"host_tags": tag}})
            if response.status_code != 503 or time.monotonic() > deadline:
                break
            time.sleep(3)
        assert response.status_code == 202, response.text
        capsule_id: str = response.json()["id"]

        def running() -> bool:
            body = self.capsule(capsule_id)
            assert body["status"] not in ("error", "missing", "stopped"), body
            return bool(body["status"] == "running")

        eventually(running, timeout=BOOT_TIMEOUT_S)
        return capsule_id

    def counter(self, capsule_id: str) -> int:
        response = self.exec(capsule_id, "cat /tmp/counter")
        assert response.status_code == 200, response.text
        return int(response.json()["stdout"].strip())


@pytest.fixture(scope="module")
def bed() -> Iterator[Bed]:
    reason = libvirt_ready()
    assert reason is None, reason
    top = Path(tempfile.mkdtemp(prefix="dcmh-", dir="/tmp"))
    top.chmod(0o755)
    broker, client = generate_keypair(), generate_keypair()
    rpc, pub, sub = free_port(), free_port(), free_port()
    vm_env = {"DOVECOTE_VM_DRIVER": "libvirt", "DOVECOTE_VM_IMAGE_DIR": IMAGE_DIR,
              "DOVECOTE_VM_BOOT_TIMEOUT_S": str(BOOT_TIMEOUT_S), "DOVECOTE_VM_POOL_SIZE": "0"}
    curve = {"DOVECOTE_BUS_SERVER_KEY": broker.public,
             "DOVECOTE_BUS_CURVE_PUBLIC_KEY": client.public, "DOVECOTE_BUS_CURVE_SECRET_KEY": client.secret}
    suite = Suite(data_dir=top / "data", extra_env={
        **vm_env, **curve,
        "DOVECOTE_BUS_RPC": f"tcp://127.0.0.1:{rpc}", "DOVECOTE_BUS_PUB": f"tcp://127.0.0.1:{pub}",
        "DOVECOTE_BUS_SUB": f"tcp://127.0.0.1:{sub}",
        "DOVECOTE_BUS_RPC_BIND": f"tcp://*:{rpc}", "DOVECOTE_BUS_PUB_BIND": f"tcp://*:{pub}",
        "DOVECOTE_BUS_SUB_BIND": f"tcp://*:{sub}",
        "DOVECOTE_BUS_BROKER_CURVE_PUBLIC_KEY": broker.public,
        "DOVECOTE_BUS_BROKER_CURVE_SECRET_KEY": broker.secret,
        "DOVECOTE_BUS_CURVE_CLIENTS": client.public,
        "DOVECOTE_HTTP_HOST": "0.0.0.0", "DOVECOTE_SIGNUP_MAX_PER_IP": "100000",
        "DOVECOTE_HOST_SILENCE_S": str(SILENCE_S), "DOVECOTE_HOST_HEARTBEAT_S": "1"})
    spaces: list[Netns] = []
    bed: Bed | None = None
    try:
        suite.wait_ready()
        (top / "data").chmod(0o755)
        admin, _ = create_admin(suite, "Multiadmin")
        bed = Bed(suite, admin, api_client(suite, "Multi"))
        for n, tag in ((1, "alpha"), (2, "beta")):
            space = Netns(n)
            spaces.append(space)
            created = create_host(admin)
            host_id = created["host"]["id"]
            assert admin.post(f"/v1/hosts/{host_id}/tags", {"tag": tag}).status_code == 204
            host = HostProcess(suite, **vm_env,
                               DOVECOTE_BUS_RPC=f"tcp://{space.host_ip}:{rpc}",
                               DOVECOTE_BUS_PUB=f"tcp://{space.host_ip}:{pub}",
                               DOVECOTE_BUS_SUB=f"tcp://{space.host_ip}:{sub}")
            host.netns = space.name
            host.start("--register", created["registration_token"],
                       "--control-plane", f"http://{space.host_ip}:{suite.port}")
            bed.hosts[tag] = (space, host, host_id)
        yield bed
    except BaseException:
        print("".join(suite.output[-150:]))
        if bed is not None:
            for _, host, _ in bed.hosts.values():
                print(host.log.read_text()[-5000:])
        raise
    finally:
        if bed is not None:
            for capsule in bed.api.get("/v1/capsules").json():
                bed.api.delete(f"/v1/capsules/{capsule['id']}")
            for space, _, _ in bed.hosts.values():
                space.restore()
            time.sleep(5)
            for _, host, _ in bed.hosts.values():
                host.close()
        suite.stop()
        for space in spaces:
            space.close()
        shutil.rmtree(top, ignore_errors=True)


def test_the_hosts_join_over_tcp_with_curve_from_their_namespaces(bed: Bed) -> None:
    for _, host, host_id in bed.hosts.values():
        try:
            eventually(lambda host_id=host_id: bed.admin.get(f"/v1/hosts/{host_id}").json()["status"]
                       == "online", timeout=120)
        except AssertionError:
            print(host.log.read_text()[-5000:])
            raise
    # An untagged create stays on any host; a tag picks its host.
    assert bed.api.post("/v1/capsules", {"metadata": {"host_tags": "gamma"}}).json()["error"]["code"] \
        == "no_matching_host"


def test_a_host_cut_off_and_restored_loses_nothing(bed: Bed) -> None:
    space, _, host_id = bed.hosts["alpha"]
    capsule_id = bed.create_on("alpha")
    started = bed.api.post(f"/v1/capsules/{capsule_id}/exec", {
        "cmd": "sh -c 'i=0; while true; do i=$((i+1)); echo $i > /tmp/c.new; "
               "mv /tmp/c.new /tmp/counter; sleep 1; done'", "background": True, "tag": "counter"})
    assert started.status_code == 202, started.text
    assert bed.exec(capsule_id, "sh -c 'echo kept > /tmp/kept.txt'").status_code == 200
    eventually(lambda: bed.counter(capsule_id) >= 2, timeout=60)
    before = bed.counter(capsule_id)

    space.cut()
    try:
        eventually(lambda: bed.capsule(capsule_id)["host_unreachable_since"] is not None,
                   timeout=SILENCE_S * 10)
        began = time.monotonic()
        refused = bed.exec(capsule_id, "true")
        assert time.monotonic() - began < 1.0
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "host_unavailable"
        assert bed.capsule(capsule_id)["status"] == "running"
        time.sleep(SILENCE_S * 2)
    finally:
        space.restore()
    eventually(lambda: bed.capsule(capsule_id)["host_unreachable_since"] is None, timeout=120)
    eventually(lambda: bed.exec(capsule_id, "true").status_code == 200, timeout=120)
    assert bed.capsule(capsule_id)["status"] == "running"
    eventually(lambda: bed.counter(capsule_id) > before + SILENCE_S, timeout=30)
    assert bed.exec(capsule_id, "cat /tmp/kept.txt").json()["stdout"] == "kept\n"
    assert bed.admin.get(f"/v1/hosts/{host_id}").json()["status"] == "online"


def test_a_host_deleted_with_a_capsule_destroys_it_and_stops(bed: Bed) -> None:
    _, host, host_id = bed.hosts["beta"]
    capsule_id = bed.create_on("beta")
    preview = bed.admin.get(f"/v1/hosts/{host_id}/delete-preview").json()
    assert preview["sandbox_ids"] == [capsule_id]
    assert bed.admin.send("DELETE", f"/v1/hosts/{host_id}").status_code == 409
    assert bed.admin.send("DELETE", f"/v1/hosts/{host_id}?force=true").status_code == 204
    eventually(lambda: bed.capsule(capsule_id)["status"] == "stopped", timeout=120)
    assert host.proc is not None
    host.proc.wait(60)  # its heartbeat is refused: it stops with the reason
    assert "refused" in host.log.read_text()
