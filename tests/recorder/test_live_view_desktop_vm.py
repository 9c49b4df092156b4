"""The live view of a desktop VM (the desktop template: X.Org on the VM's VGA), through the gateway.

A capsule of template ``desktop``; a viewer (RFB over the gateway's WebSocket)
sees the X desktop, and a change made by an action (``xsetroot`` run through
the capsule exec API as the desktop user) appears in the live view within
2 seconds, every time.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import trio
from trio_websocket import open_websocket_url

from tests.helpers.capsules import Api
from tests.helpers.suite import Suite
from tests.recorder.helpers import COLOURS, Viewer, action_to_frame, desktop_capsule

pytestmark = pytest.mark.slow
@pytest.fixture(scope="module")
def desktop() -> Iterator[tuple[Suite, Api, str]]:
    with desktop_capsule() as found:
        yield found


async def test_an_action_shows_in_the_live_view_within_two_seconds(desktop: tuple[Suite, Api, str]) -> None:
    suite, api, capsule_id = desktop
    status = api.get(f"/v1/capsules/{capsule_id}/live-view/status").json()
    assert status["status"] == "ready" and status["width"] >= 800, status
    token = api.post(f"/v1/capsules/{capsule_id}/live-view/token").json()
    url = suite.url.replace("http://", "ws://") + token["websocket_path"]
    async with open_websocket_url(url, max_message_size=64 * 1024 * 1024) as ws:
        viewer = Viewer(ws)
        await viewer.handshake()
        await viewer.frame()
        assert (viewer.rfb.width, viewer.rfb.height) == (status["width"], status["height"])
        took = []
        for i in range(6):
            if i:
                await trio.sleep(3)  # idle, as between an agent's actions
            took.append(await action_to_frame(api, capsule_id, viewer, COLOURS[i % 3]))
    print("(action s, action answered -> changed frame seen s):", took)
    assert max(after for _, after in took) < 2.0, took
