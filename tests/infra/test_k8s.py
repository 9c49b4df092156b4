"""The Kubernetes manifests (``infra/k8s``) validate and match the code they deploy.

Schema validation is kubernetes-validate's (strict: an unknown field is an
error); the rest checks what a schema cannot: every service of the suite is
deployed and probed over its own health RPC, the bus variables are the ones
the code reads, and the CURVE Secret that ``dovecote bus-keygen --kubernetes``
prints holds working keypairs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
import zmq

from dovecote.bus.curve import ENV_CLIENTS, ENV_PUBLIC, ENV_SECRET
from dovecote.bus.endpoints import ENV_PUB, ENV_RPC, ENV_SERVER_KEY, ENV_SUB
from dovecote.services.cli import SERVICE_MODULES
from dovecote.services.kube import SECRET_NAME
from tests.helpers.suite import Suite

K8S = Path(__file__).resolve().parents[2] / "infra" / "k8s"
VERSION = "1.30.0"  # the oldest Kubernetes these manifests promise to work on


def _load(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]


def _documents() -> list[dict[str, Any]]:
    kustomization = _load("kustomization.yaml")[0]
    return [doc for name in kustomization["resources"] for doc in _load(name)]


def _workloads() -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in _documents() if d["kind"] in ("Deployment", "DaemonSet")}


def test_every_file_is_listed_and_every_resource_validates_strictly() -> None:
    kustomization = _load("kustomization.yaml")[0]
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == on_disk
    docs = _documents()
    assert len(docs) >= 10
    for doc in docs:
        for version in (VERSION, kubernetes_validate.latest_version()):
            kubernetes_validate.validate(doc, version, strict=True)
        assert doc["metadata"].get("namespace", "dovecote") == "dovecote"


def test_a_broken_manifest_is_refused() -> None:
    broken = dict(_workloads()["dovecote-gateway"])
    broken["spec"] = {**broken["spec"], "replicas": "two"}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSION, strict=True)


def test_every_service_is_deployed_and_probed_over_its_health_rpc() -> None:
    workloads = _workloads()
    probed = set()
    for name, workload in workloads.items():
        spec = workload["spec"]["template"]["spec"]
        for container in spec["containers"]:
            assert "readinessProbe" in container and "livenessProbe" in container, name
            for probe in (container["readinessProbe"], container["livenessProbe"]):
                command = probe.get("exec", {}).get("command", [])
                if command[:2] == ["dovecote", "probe"]:
                    probed.add(command[2])
            assert container["args"][0] in {*SERVICE_MODULES, "broker"}, name
    deployed = {w["spec"]["template"]["spec"]["containers"][0]["args"][0] for w in workloads.values()}
    assert deployed == {*SERVICE_MODULES, "broker"}
    assert probed == set(SERVICE_MODULES)  # the broker is probed on its TCP port
    assert workloads["dovecote-vmmgr"]["kind"] == "DaemonSet"


def test_the_bus_variables_are_the_ones_the_code_reads() -> None:
    config = next(d for d in _documents() if d["kind"] == "ConfigMap")["data"]
    assert {ENV_RPC, ENV_PUB, ENV_SUB} <= set(config)
    for name, workload in _workloads().items():
        env = {e["name"]: e for e in workload["spec"]["template"]["spec"]["containers"][0]["env"]}
        curve_keys = {ENV_PUBLIC, ENV_SECRET, ENV_CLIENTS} if name == "dovecote-broker" \
            else {ENV_PUBLIC, ENV_SECRET, ENV_SERVER_KEY}
        assert curve_keys <= set(env), name
        for key in curve_keys:
            assert env[key]["valueFrom"]["secretKeyRef"]["name"] == SECRET_NAME


def test_bus_keygen_prints_a_valid_secret_with_matching_keypairs() -> None:
    out = subprocess.run([sys.executable, "-m", "dovecote.services.cli", "bus-keygen", "--kubernetes"],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    secret = json.loads(out)
    kubernetes_validate.validate(secret, VERSION, strict=True)
    keys = secret["stringData"]
    for who in ("broker", "client"):
        public = zmq.curve_public(keys[f"{who}-secret-key"].encode()).decode()
        assert public == keys[f"{who}-public-key"]
    referenced = {e["valueFrom"]["secretKeyRef"]["key"]
                  for w in _workloads().values()
                  for e in w["spec"]["template"]["spec"]["containers"][0]["env"]
                  if "valueFrom" in e and "secretKeyRef" in e["valueFrom"]
                  and e["valueFrom"]["secretKeyRef"]["name"] == SECRET_NAME}
    assert referenced == set(keys)


def test_the_probe_command_answers_for_a_live_service_and_fails_for_a_dead_one() -> None:
    suite = Suite()
    try:
        suite.wait_ready()
        alive = suite.cli("probe", "auth", "--data-dir", str(suite.data_dir))
        assert alive.returncode == 0, alive.stderr
        assert alive.stdout.startswith("auth: ok")
        dead = suite.cli("probe", "nosuch", "--timeout", "1", "--data-dir", str(suite.data_dir))
        assert dead.returncode == 1 and "no answer" in dead.stderr
    finally:
        suite.stop()
