"""A real QEMU capsule's samples through ``/v1/capsules/{id}/metrics`` (one VM boot).

Skipped like the capsule VM tests when libvirt cannot be used here.
"""

from __future__ import annotations

import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers.capsules import api_client, running_capsule

pytestmark = pytest.mark.slow

BUSY_S = 8


def test_a_busy_capsule_shows_cpu_memory_and_disk() -> None:
    with running_capsule("dcmet-") as (suite, ana, capsule_id):
        response = ana.post(f"/v1/capsules/{capsule_id}/exec", {
            "cmd": f"timeout {BUSY_S} sh -c 'while :; do :; done'", "timeout_sec": 60})
        assert response.status_code == 200, response.text
        busy_until = time.time()

        points: list[dict[str, float]] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            response = ana.get(f"/v1/capsules/{capsule_id}/metrics?range=5m")
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["sandbox_id"] == capsule_id and body["range"] == "5m"
            points = body["points"]
            if points and max(p["cpu_pct"] for p in points) > 50:
                break
            time.sleep(1)
        busy = [p for p in points if busy_until - BUSY_S + 1 <= p["timestamp_unix"] <= busy_until - 1]
        assert len(busy) >= 2 * (BUSY_S - 3), points  # 500 ms samples while the loop ran
        assert max(p["cpu_pct"] for p in busy) > 50, busy
        assert all(0 <= p["cpu_pct"] <= 100 for p in points)
        assert all(p["mem_bytes"] > 0 and p["disk_bytes"] > 0 for p in points), points[-3:]

        # Another team does not see it; the exposition counts it as running and sampled.
        bob = api_client(suite, "Bob")
        assert bob.get(f"/v1/capsules/{capsule_id}/metrics").status_code == 404
        text = httpx.get(suite.url + "/metrics", timeout=10).text
        families = {f.name: f for f in text_string_to_metric_families(text)}
        running = [s.value for s in families["dovecote_capsules"].samples if s.labels["status"] == "running"]
        assert running == [1.0]
        (sampled,) = families["dovecote_sampler_samples"].samples
        assert sampled.value >= len(busy)  # every point shown was counted
