"""Metrics over real HTTP against ``dovecote up`` (no VMs).

Samples are handed to the metrics service over the suite's bus, as a vmmgr
would, and a stopped capsule's record is written into vmmgr's table, so the
persisted path of ``/v1/capsules/{id}/metrics`` and the team scoping of stats
and usage are seen end to end without booting anything.
"""

from __future__ import annotations

import secrets
import time
from datetime import UTC, datetime
from typing import Any

import httpx
import psycopg
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from dovecote.bus import BusEndpoints, open_bus
from dovecote.bus.messages.metrics import CapsulePoint, RecordSamples, SamplesRecorded
from dovecote.libs.embedded_pg import start_embedded_postgres
from dovecote.services.supervisor import bus_socket_dir
from tests.accounts.helpers import Browser, signed_up_user
from tests.helpers.suite import Suite

SERVICES = ["gateway", "auth", "vmmgr", "recorder", "notifier", "metrics", "agents", "desktops", "browsers",
            "runs"]


def team_of(browser: Browser) -> str:
    response = browser.get("/v1/teams")
    assert response.status_code == 200, response.text
    (team,) = response.json()
    return str(team["id"])


def record(suite: Suite, points: list[CapsulePoint]) -> SamplesRecorded:
    """Hand points to the suite's metrics service over its bus, as a vmmgr does."""

    async def send() -> Any:
        endpoints = BusEndpoints.local(bus_socket_dir(suite.data_dir))
        async with open_bus(endpoints, name="tests.metrics") as bus:
            return await bus.request("metrics", RecordSamples(host_id="test", points=points), timeout=10)

    reply = trio.run(send)
    assert isinstance(reply, SamplesRecorded), reply
    return reply


def stopped_capsule(suite: Suite, team_id: str) -> str:
    """A capsule record of ``team_id`` that ran and stopped (written where vmmgr keeps them)."""
    capsule_id = "cap-" + secrets.token_hex(8)
    url = start_embedded_postgres(suite.data_dir).url  # the suite's cluster, borrowed
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO vmmgr.capsules (id, team_id, host_id, template, vcpus, memory_mb, "
                     "disk_size_mb, status, started_at, stopped_at) "
                     "VALUES (%s, %s, 'gone-host', 'minimal', 2, 512, 5120, 'stopped', now(), now())",
                     (capsule_id, team_id))
    return capsule_id


def points_for(capsule_id: str, team_id: str, count: int) -> list[CapsulePoint]:
    last = int(time.time()) // 30 * 30 - 30
    return [CapsulePoint(capsule_id=capsule_id, team_id=team_id, ts=last - 30 * i, samples=60,
                         cpu_pct=10.0 + i, mem_bytes=(100 + i) << 20, disk_bytes=5 << 20, vcpus=2,
                         memory_mb=512) for i in range(count)]


def test_metrics_exposition_gathers_every_service(api_suite: Suite) -> None:
    assert httpx.get(api_suite.url + "/healthz", timeout=10).status_code == 200  # pings every service
    response = httpx.get(api_suite.url + "/metrics", timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    up = {s.labels["service"]: s.value for s in families["dovecote_scrape_up"].samples}
    assert up == dict.fromkeys(SERVICES, 1.0)
    processes = {s.labels["service"] for s in families["process_resident_memory_bytes"].samples}
    assert processes == set(SERVICES)
    pinged = {s.labels["service"] for s in families["dovecote_bus_requests"].samples
              if s.labels["message"] == "health.ping" and s.labels["outcome"] == "ok"}
    assert pinged >= {"auth", "vmmgr", "recorder", "notifier", "metrics"}
    assert any(s.name == "dovecote_bus_request_duration_seconds_bucket" and s.labels["service"] == "metrics"
               for s in families["dovecote_bus_request_duration_seconds"].samples)
    http = {(s.labels["route"], s.labels["status"]) for s in families["dovecote_http_requests"].samples}
    assert ("/healthz", "200") in http
    capsules = {s.labels["status"]: s.labels["service"] for s in families["dovecote_capsules"].samples}
    assert capsules.get("running") == "vmmgr" and "stopped" in capsules


def test_stats_and_usage_are_scoped_to_the_team(api_suite: Suite) -> None:
    ana, _, _ = signed_up_user(api_suite, "Ana")
    bob, _, _ = signed_up_user(api_suite, "Bob")
    ana_team = team_of(ana)
    record(api_suite, points_for("cap-" + secrets.token_hex(8), ana_team, 4))

    response = ana.get("/v1/capsules/stats", params={"range": "5m"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["range"] == "5m"
    assert set(body["current"]) == {"running_count", "vcpus_reserved", "memory_mb_reserved", "sampled_at"}
    assert body["current"]["running_count"] == 0  # nothing runs now (no VM driver here)
    assert body["peaks"] == {"running_count": 1, "vcpus": 2, "memory_mb": 512}
    series = body["series"]
    assert set(series) == {"labels", "running", "vcpus", "memory_mb"}
    assert len(series["labels"]) == len(series["running"]) == len(series["vcpus"]) == 10
    assert datetime.fromisoformat(series["labels"][-1]) <= datetime.now(UTC)
    assert series["running"].count(1) == 4 and max(series["memory_mb"]) == 512
    default = ana.get("/v1/capsules/stats").json()
    assert default["range"] == "1h" and len(default["series"]["labels"]) == 120

    bobs = bob.get("/v1/capsules/stats", params={"range": "5m"}).json()
    assert set(bobs["series"]["running"]) == {0}
    assert bobs["peaks"] == {"running_count": 0, "vcpus": 0, "memory_mb": 0}

    response = ana.get("/v1/capsules/usage")
    assert response.status_code == 200, response.text
    usage = response.json()
    today = datetime.now(UTC).date()
    assert usage["to"] == today.isoformat() and len(usage["points"]) == 30
    assert usage["points"][-1]["date"] == today.isoformat()
    assert sum(p["cpu_minutes"] for p in usage["points"]) == pytest.approx(4 * 2 * 0.5)
    assert sum(p["ram_mb_minutes"] for p in usage["points"]) == pytest.approx(4 * 512 * 0.5)
    bobs_usage = bob.get("/v1/capsules/usage").json()
    assert {p["cpu_minutes"] for p in bobs_usage["points"]} == {0.0}

    for path, params in [("/v1/capsules/stats", {"range": "7d"}), ("/v1/capsules/usage", {"from": "May 1"}),
                         ("/v1/capsules/usage", {"from": "2024-05-02", "to": "2024-05-01"}),
                         ("/v1/capsules/usage", {"from": "2024-01-01", "to": "2024-06-01"})]:
        response = ana.get(path, params=params)
        assert response.status_code == 400, (path, params, response.text)
        assert response.json()["error"]["code"] == "invalid_request"
    assert httpx.get(api_suite.url + "/v1/capsules/stats").status_code == 401


def test_a_capsules_metrics_are_its_teams_only(api_suite: Suite) -> None:
    ana, _, _ = signed_up_user(api_suite, "Ana")
    bob, _, _ = signed_up_user(api_suite, "Bob")
    capsule_id = stopped_capsule(api_suite, team_of(ana))
    assert record(api_suite, points_for(capsule_id, team_of(ana), 5)).accepted == 5

    response = ana.get(f"/v1/capsules/{capsule_id}/metrics")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["sandbox_id"] == capsule_id and body["range"] == "10m"
    points = body["points"]
    assert [set(p) for p in points] == [{"timestamp_unix", "cpu_pct", "mem_bytes", "disk_bytes"}] * 5
    assert [p["cpu_pct"] for p in points] == [14.0, 13.0, 12.0, 11.0, 10.0]  # oldest first
    assert points[-1]["mem_bytes"] == 100 << 20 and points[-1]["disk_bytes"] == 5 << 20
    assert ana.get(f"/v1/capsules/{capsule_id}/metrics", params={"range": "24h"}).status_code == 200

    for who in (bob, ana):  # another team's capsule, and one that does not exist
        target = capsule_id if who is bob else "cap-" + secrets.token_hex(8)
        response = who.get(f"/v1/capsules/{target}/metrics")
        assert response.status_code == 404, response.text
        assert response.json()["error"]["code"] == "not_found"
    response = ana.get(f"/v1/capsules/{capsule_id}/metrics", params={"range": "1d"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_request"
    # A stopped capsule without persisted points has no metrics (the reference's 404).
    silent = stopped_capsule(api_suite, team_of(ana))
    assert ana.get(f"/v1/capsules/{silent}/metrics").status_code == 404
    # The admin variant is for platform admins' sessions.
    assert ana.get(f"/v1/admin/capsules/{capsule_id}/metrics").status_code == 403


def test_the_metrics_operations_are_documented(api_suite: Suite) -> None:
    doc = httpx.get(api_suite.url + "/openapi.json", timeout=10).json()
    served = {(method, path) for path, methods in doc["paths"].items() for method in methods}
    assert {("get", "/v1/capsules/stats"), ("get", "/v1/capsules/usage"),
            ("get", "/v1/capsules/{id}/metrics"), ("get", "/v1/admin/capsules/{id}/metrics"),
            ("get", "/metrics")} <= served
    params = {p["name"]: p for p in doc["paths"]["/v1/capsules/usage"]["get"]["parameters"]}
    assert set(params) == {"from", "to"}
    ranges = doc["paths"]["/v1/capsules/{id}/metrics"]["get"]["parameters"]
    assert any(p["name"] == "range" and "24h" in str(p["schema"]) for p in ranges)
