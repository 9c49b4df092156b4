"""Many hosts: placement latency with 3 hosts, and how fast a returning host's capsules run again.

    .venv/bin/python benchmarks/hosts.py [--creates 6] [--cuts 2]

The bed of ``tests/hosts/test_multihost_vm.py``: ``dovecote up`` with its
bus over TCP with CURVE, plus two hosts, each a ``dovecote vmmgr`` in its own
network namespace registered with a token: three hosts in all (the suite's
own ``local`` one included). It prints, in one run:

* placement: ``POST /v1/capsules`` → 202 (the receiving vmmgr asks auth for
  the team's hosts, filters by tag, picks the least loaded and forwards the
  create to that host's vmmgr, which records it) p50/p99, by tag (any host,
  a namespaced host), next to a ``GET /v1/capsules/{id}`` on the same suite
  (the floor of one gateway → vmmgr round trip);
* return: a host cut off (its link down) for twice the silence window, then
  restored: the time from the link coming back to its capsule answering an
  exec again, p50/max over ``--cuts``.

Root only (network namespaces, libvirt). Needs the guest image cached (the
first ``dovecote up`` or the VM tests build it).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dovecote.bus import generate_keypair
from tests.accounts.helpers import signed_up_user
from tests.helpers.suite import Suite, destroy_vms_under, free_port
from tests.hosts.helpers import HostProcess, Netns, create_admin, create_host, eventually

IMAGE_DIR = os.environ.get("DOVECOTE_TEST_IMAGE_DIR", "/var/tmp/dovecote/images")
SILENCE_S = 3


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def ms(values: list[float]) -> str:
    p50, p99 = statistics.median(values) * 1000, pct(values, 0.99) * 1000
    return f"p50 {p50:7.1f} ms  p99 {p99:7.1f} ms  (n={len(values)})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--creates", type=int, default=6, help="creates per placement kind")
    parser.add_argument("--cuts", type=int, default=2, help="cut/restore rounds")
    args = parser.parse_args()
    top = Path(tempfile.mkdtemp(prefix="dcbh-", dir="/tmp"))
    top.chmod(0o755)
    broker, client = generate_keypair(), generate_keypair()
    rpc, pub, sub = free_port(), free_port(), free_port()
    vm_env = {"DOVECOTE_VM_DRIVER": "libvirt", "DOVECOTE_VM_IMAGE_DIR": IMAGE_DIR,
              "DOVECOTE_VM_POOL_SIZE": "0", "DOVECOTE_TEAM_MAX_CAPSULES": "100",
              "DOVECOTE_TEAM_MAX_MEMORY_MB": "65536", "DOVECOTE_TEAM_MAX_VCPUS": "100"}
    suite = Suite(data_dir=top / "data", extra_env={
        **vm_env, "DOVECOTE_BUS_SERVER_KEY": broker.public,
        "DOVECOTE_BUS_CURVE_PUBLIC_KEY": client.public, "DOVECOTE_BUS_CURVE_SECRET_KEY": client.secret,
        "DOVECOTE_BUS_RPC": f"tcp://127.0.0.1:{rpc}", "DOVECOTE_BUS_PUB": f"tcp://127.0.0.1:{pub}",
        "DOVECOTE_BUS_SUB": f"tcp://127.0.0.1:{sub}", "DOVECOTE_BUS_RPC_BIND": f"tcp://*:{rpc}",
        "DOVECOTE_BUS_PUB_BIND": f"tcp://*:{pub}", "DOVECOTE_BUS_SUB_BIND": f"tcp://*:{sub}",
        "DOVECOTE_BUS_BROKER_CURVE_PUBLIC_KEY": broker.public,
        "DOVECOTE_BUS_BROKER_CURVE_SECRET_KEY": broker.secret, "DOVECOTE_BUS_CURVE_CLIENTS": client.public,
        "DOVECOTE_HTTP_HOST": "0.0.0.0", "DOVECOTE_SIGNUP_MAX_PER_IP": "100000",
        "DOVECOTE_HOST_SILENCE_S": str(SILENCE_S), "DOVECOTE_HOST_HEARTBEAT_S": "1"})
    spaces: list[Netns] = []
    hosts: list[HostProcess] = []
    created: list[str] = []
    api: httpx.Client | None = None
    try:
        suite.wait_ready()
        (top / "data").chmod(0o755)
        admin, _ = create_admin(suite, "Benchadmin")
        for n, tag in ((1, "alpha"), (2, "beta")):
            space = Netns(n)
            spaces.append(space)
            made = create_host(admin)
            assert admin.post(f"/v1/hosts/{made['host']['id']}/tags", {"tag": tag}).status_code == 204
            host = HostProcess(suite, **vm_env, DOVECOTE_BUS_RPC=f"tcp://{space.host_ip}:{rpc}",
                               DOVECOTE_BUS_PUB=f"tcp://{space.host_ip}:{pub}",
                               DOVECOTE_BUS_SUB=f"tcp://{space.host_ip}:{sub}")
            host.netns = space.name
            host.start("--register", made["registration_token"],
                       "--control-plane", f"http://{space.host_ip}:{suite.port}")
            hosts.append(host)
        browser, _, _ = signed_up_user(suite, "Bench")
        key = browser.post("/v1/api-keys", {"name": "bench"}).json()["key"]
        api = httpx.Client(base_url=suite.url, timeout=120, headers={"X-API-Key": key})
        client_api = api

        def create(body: dict[str, Any]) -> tuple[float, str]:
            began = time.perf_counter()
            response = client_api.post("/v1/capsules", json=body)
            took = time.perf_counter() - began
            assert response.status_code == 202, response.text
            return took, str(response.json()["id"])

        def running(capsule_id: str) -> bool:
            return bool(client_api.get(f"/v1/capsules/{capsule_id}").json()["status"] == "running")

        # Every host must answer first (a capsule on each).
        for tag in ("alpha", "beta"):
            deadline = time.monotonic() + 900
            while (response := api.post("/v1/capsules", json={"metadata": {"host_tags": tag}})).status_code \
                    == 503 and time.monotonic() < deadline:
                time.sleep(3)
            assert response.status_code == 202, response.text
            created.append(response.json()["id"])
        for capsule_id in created:
            eventually(lambda capsule_id=capsule_id: running(capsule_id), timeout=600)

        results: dict[str, list[float]] = {"any host": [], "tag alpha (a namespaced host)": []}
        for _ in range(args.creates):
            for label, body in (("any host", {}), ("tag alpha (a namespaced host)",
                                                  {"metadata": {"host_tags": "alpha"}})):
                took, capsule_id = create(body)
                results[label].append(took)
                created.append(capsule_id)
            for capsule_id in created[2:]:  # keep the machine from filling up with booting VMs
                eventually(lambda capsule_id=capsule_id: running(capsule_id), timeout=600)
                api.delete(f"/v1/capsules/{capsule_id}")
            del created[2:]
        lookups = []
        for _ in range(args.creates * 2):
            began = time.perf_counter()
            assert api.get(f"/v1/capsules/{created[0]}").status_code == 200
            lookups.append(time.perf_counter() - began)

        returns = []
        space = spaces[0]
        for _ in range(args.cuts):
            space.cut()
            eventually(lambda: api.get(f"/v1/capsules/{created[0]}").json()["host_unreachable_since"]
                       is not None, timeout=SILENCE_S * 20)
            time.sleep(SILENCE_S * 2)
            space.restore()
            began = time.perf_counter()
            eventually(lambda: api.post(f"/v1/capsules/{created[0]}/exec", json={"cmd": "true"},
                                        timeout=30).status_code == 200, timeout=300)
            returns.append(time.perf_counter() - began)

        print(f"hosts: 3 (local + 2 in network namespaces), bus over TCP with CURVE, {os.cpu_count()} cores")
        for label, values in results.items():
            print(f"placement, create -> 202, {label:32s} {ms(values)}")
        print(f"lookup, GET /v1/capsules/{{id}} (one gateway -> vmmgr trip)  {ms(lookups)}")
        print(f"return, link restored -> capsule answers an exec              p50 "
              f"{statistics.median(returns):6.2f} s  max {max(returns):6.2f} s  (n={len(returns)}; "
              f"silence window {SILENCE_S} s, cut {SILENCE_S * 2} s past it)")
        return 0
    finally:
        if api is not None:
            for capsule_id in created:
                api.delete(f"/v1/capsules/{capsule_id}")
        for space in spaces:
            space.restore()
        time.sleep(3)
        for host in hosts:
            host.close()
        suite.stop()
        destroy_vms_under(top)
        for space in spaces:
            space.close()
        shutil.rmtree(top, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
