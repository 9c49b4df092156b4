"""Placement over HTTP: host tags and BYOC hosts decide where a new capsule goes.

The suite runs no VM driver, so a capsule placed on this suite's own host is
refused with 503 ``vm_driver_disabled`` *after* placement chose the host; a
capsule placed on a registered host whose vmmgr is not on the bus is refused
with 503 ``host_unavailable``. The codes tell where placement sent it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.helpers.suite import Suite
from tests.hosts.helpers import create_admin, eventually, register, regular_user


@pytest.fixture(scope="module")
def suite() -> Iterator[Suite]:
    running = Suite()
    try:
        running.wait_ready()
        yield running
    finally:
        running.stop()


def test_tags_and_byoc_hosts_decide_where_a_capsule_goes(suite: Suite) -> None:
    root, _ = create_admin(suite)
    ana, ana_session = regular_user(suite, "Placeana")
    bob, _ = regular_user(suite, "Placebob")
    # The suite's own vmmgr registers itself as a platform host.
    eventually(lambda: any(h["status"] == "online" for h in root.get("/v1/hosts").json()))
    local = [h for h in root.get("/v1/hosts").json() if h["status"] == "online"]
    assert len(local) == 1, local

    def create(browser: object, **body: object) -> tuple[int, str]:
        response = browser.post("/v1/capsules", body)  # type: ignore[attr-defined]
        return response.status_code, response.json()["error"]["code"]

    # No online host has the tag: nowhere to go.
    assert create(ana, metadata={"host_tags": "gpu"}) == (409, "no_matching_host")
    tagged = root.post(f"/v1/hosts/{local[0]['id']}/tags", {"tag": "gpu"})
    assert tagged.status_code == 204, tagged.text
    assert create(ana, metadata={"host_tags": "gpu"}) == (503, "vm_driver_disabled")
    assert create(ana, metadata={"host_tags": "gpu, nvme"}) == (409, "no_matching_host")

    # Ana's team brings its own host: her capsules go there, Bob's never do.
    team_id = ana_session["team_id"]
    assert root.send("PUT", f"/v1/admin/teams/{team_id}/byoc", {"byoc": True}).status_code == 204
    created = ana.post("/v1/hosts", {"type": "byoc", "team_id": team_id})
    assert created.status_code == 201, created.text
    registered = register(suite, created.json()["registration_token"])
    assert registered.status_code == 201, registered.text
    assert create(ana) == (503, "host_unavailable")
    assert create(bob) == (503, "vm_driver_disabled")
    # The BYOC host lacks the tag the platform host has.
    assert create(ana, metadata={"host_tags": "gpu"}) == (503, "vm_driver_disabled")
