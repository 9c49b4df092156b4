"""The live view of a real QEMU VM's display, through the gateway, against ``dovecote up``.

One capsule for the module (its display: QEMU's VNC server on a unix socket,
through libvirt). Viewers are trio WebSocket clients speaking RFB
(``vmmgr.vnc_protocol.RfbClient``) and a real headless Chromium (Debian's
``chromium``, driven over CDP by Playwright) running noVNC from Debian's
``novnc`` package, served by the gateway.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from trio_websocket import ConnectionRejected, open_websocket_url

from dovecote.gateway.routes.live_view import mint_token
from tests.desktops.png import decode
from tests.helpers.capsules import Api, api_client, running_capsule
from tests.helpers.suite import Suite
from tests.recorder.helpers import Viewer

pytestmark = pytest.mark.slow
SECRET = "live-view-test-secret-0123456789"


class World:
    suite: Suite
    ana: Api
    bob: Api
    capsule_id: str
    key: str


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    for tool in ("chromium",):
        if shutil.which(tool) is None:
            pytest.fail(f"infra/system-deps.sh did not install {tool}")
    if not os.path.exists("/usr/share/novnc/vnc_lite.html"):
        pytest.fail("infra/system-deps.sh did not install novnc")
    with running_capsule("dclv-", {"DOVECOTE_LIVE_VIEW_SECRET": SECRET}) as (suite, ana, capsule_id):
        w = World()
        w.suite, w.ana, w.capsule_id = suite, ana, capsule_id
        w.key = ana.http.headers["X-API-Key"]
        w.bob = api_client(suite, "Bob")
        yield w


def _token(world: World) -> dict[str, Any]:
    response = world.ana.post(f"/v1/capsules/{world.capsule_id}/live-view/token")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def _ws_url(world: World, path: str) -> str:
    return world.suite.url.replace("http://", "ws://") + path


def test_the_status_comes_from_a_real_probe_of_the_display(world: World) -> None:
    response = world.ana.get(f"/v1/capsules/{world.capsule_id}/live-view/status")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "ready", body
    assert body["width"] > 0 and body["height"] > 0 and body["frame_age_ms"] is not None
    assert world.bob.get(f"/v1/capsules/{world.capsule_id}/live-view/status").status_code == 404


async def test_several_viewers_get_frames_and_a_stalled_one_holds_back_nobody(world: World) -> None:
    token = _token(world)
    assert world.key not in token["url"] and world.key not in token["websocket_path"]
    url = _ws_url(world, token["websocket_path"])
    async with open_websocket_url(url, subprotocols=["binary"]) as one, \
            open_websocket_url(url, subprotocols=["binary"]) as two, \
            open_websocket_url(url, subprotocols=["binary"], message_queue_size=1) as stalled:
        assert one.subprotocol == "binary"
        a, b, s = Viewer(one), Viewer(two), Viewer(stalled)
        for v in (a, b, s):
            await v.handshake()
        assert (a.rfb.width, a.rfb.height) == (b.rfb.width, b.rfb.height) and a.rfb.width > 0
        await a.frame()
        await b.frame()
        assert any(p for p in a.rfb.pixels[:: 4 * 97])  # the display is not blank
        assert a.rfb.pixels == b.rfb.pixels
        # the stalled viewer asks for many full frames and never reads them
        for _ in range(40):
            await stalled.send_message(s.rfb.request(False))
        took = [await a.frame() for _ in range(10)] + [await b.frame() for _ in range(10)]
        assert max(took) < 5, took
    status = world.ana.get(f"/v1/capsules/{world.capsule_id}/live-view/status").json()
    assert status["status"] == "ready", status  # the VM's display still answers


async def test_the_socket_refuses_no_token_a_forged_or_expired_token_and_another_team(world: World) -> None:
    cid = world.capsule_id
    base = f"/v1/capsules/{cid}/live-view/websockify"
    bad = [
        base,
        f"{base}?token={mint_token(b'not-the-secret', 'capsule', cid, 'x', int(time.time()) + 60)}",
        f"{base}?token={mint_token(SECRET.encode(), 'capsule', cid, 'x', int(time.time()) - 1)}",
    ]
    team = world.ana.get(f"/v1/capsules/{cid}")
    assert team.status_code == 200
    for path in bad:
        with pytest.raises(ConnectionRejected) as refused:
            async with open_websocket_url(_ws_url(world, path), subprotocols=["binary"]):
                pass
        assert refused.value.status_code == 401, path
    # Bob's team cannot mint a token for Ana's capsule, nor open the page
    assert world.bob.post(f"/v1/capsules/{cid}/live-view/token").status_code == 404
    assert world.bob.http.get(f"/v1/capsules/{cid}/live-view/", follow_redirects=False).status_code == 404


def test_the_page_is_refused_without_credentials_or_with_an_expired_token(world: World) -> None:
    plain = httpx.Client(base_url=world.suite.url, timeout=30)
    page = f"/v1/capsules/{world.capsule_id}/live-view/"
    assert plain.get(page).status_code == 401
    expired = mint_token(SECRET.encode(), "capsule", world.capsule_id, "t", int(time.time()) - 1)
    response = plain.get(f"{page}?token={expired}&path=x")
    assert response.status_code == 401 and response.json()["error"]["code"] == "token_expired"
    # with the API key, the page redirects to a tokened URL (the key is not in it)
    response = world.ana.http.get(page, follow_redirects=False)
    assert response.status_code == 302 and "token=" in response.headers["location"]
    assert world.key not in response.headers["location"]


def test_headless_chromium_renders_the_display_through_the_gateway(world: World) -> None:
    from playwright.sync_api import sync_playwright

    url = world.suite.url + _token(world)["url"]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium",
                                     args=["--headless", "--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 900, "height": 700})
            notes: list[str] = []
            page.on("console", lambda m: notes.append(f"console {m.type}: {m.text}"))
            page.on("response", lambda r: r.status >= 400 and notes.append(f"{r.status} {r.url[:120]}"))
            page.on("requestfailed", lambda r: notes.append(f"failed {r.url[:120]}: {r.failure}"))
            response = page.goto(url, timeout=60_000)
            assert response is not None and response.status == 200
            try:
                page.wait_for_function(
                    "() => { const c = document.querySelector('#screen canvas');"
                    " return c && c.width > 0 && document.getElementById('status').textContent"
                    ".startsWith('Connected'); }", timeout=60_000)
            except Exception:
                status = page.evaluate("() => document.getElementById('status').textContent")
                raise AssertionError(f"noVNC did not connect: {status!r}; {notes}") from None
            time.sleep(1.0)  # let the first full update paint
            box = page.locator("#screen canvas").bounding_box()
            assert box is not None and box["width"] > 100 and box["height"] > 100
            shot = page.screenshot(clip=box)
        finally:
            browser.close()
    width, height, rows = decode(shot)
    colours = {row[i:i + 3] for row in rows for i in range(0, len(row), 3 * 7)}
    assert len(colours) > 1, "the canvas is blank"
    lit = sum(1 for row in rows for i in range(0, len(row), 3) if row[i:i + 3] != b"\0\0\0")
    assert lit > 50, (width, height, lit)
