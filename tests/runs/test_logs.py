"""The services' log files over real HTTP, against ``dovecote up``: files, one file, the live stream.

Every service writes its JSON lines to ``<data dir>/logs/<service>.log``
(rotated at ``DOVECOTE_LOG_FILE_MAX_BYTES``, 4 KiB here so sign-ups rotate the auth log);
only a platform admin's session reads them; a bad name is 400 before the file
system is touched.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.accounts.helpers import Browser, signed_up_user
from tests.helpers.suite import Suite
from tests.helpers.users import PASSWORD, create_admin, regular_user

pytestmark = pytest.mark.slow


class World:
    suite: Suite
    admin: Browser
    user: Browser
    key: str


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    w = World()
    w.suite = Suite(extra_env={"DOVECOTE_SIGNUP_MAX_PER_IP": "100000",
                               "DOVECOTE_LOG_FILE_MAX_BYTES": "4096", "DOVECOTE_LOG_FILE_BACKUPS": "3"})
    try:
        w.suite.wait_ready()
        w.admin, _ = create_admin(w.suite)
        w.user, _, _ = regular_user(w.suite, "Ana")
        created = w.user.post("/v1/api-keys", {"name": "Ana's key"})
        assert created.status_code == 201, created.text
        w.key = created.json()["key"]
        yield w
    finally:
        w.suite.stop()


def test_only_platform_admins_read_logs(world: World) -> None:
    for path in ("/api/logs/files", "/api/logs/files/gateway.log", "/api/logs/stream"):
        refused = world.user.get(path)
        assert refused.status_code == 403, (path, refused.text)
        assert refused.json()["error"]["code"] == "forbidden"
        keyed = httpx.get(world.suite.url + path, headers={"X-API-Key": world.key}, timeout=10)
        assert keyed.status_code == 403, (path, keyed.text)
        anonymous = httpx.get(world.suite.url + path, timeout=10)
        assert anonymous.status_code == 401, (path, anonymous.text)


def test_files_are_listed_and_read_and_rotated(world: World) -> None:
    listed = world.admin.get("/api/logs/files")
    assert listed.status_code == 200, listed.text
    files = {f["name"]: f for f in listed.json()}
    for service in ("up", "gateway", "auth", "runs", "vmmgr", "desktops"):
        assert f"{service}.log" in files, sorted(files)
    assert all(set(f) == {"name", "size", "modified"} and f["modified"].endswith("Z")
               for f in files.values())
    for n in range(60):  # each sign-up logs a queued mail: the 4 KiB auth.log rotates
        if "auth.log.1" in files:
            break
        signed_up_user(world.suite, f"Filler{n}")
        files = {f["name"]: f for f in world.admin.get("/api/logs/files").json()}
    assert "auth.log.1" in files, sorted(files)
    assert all(f["size"] <= 4096 + 2048 for f in files.values()), files
    rotated = world.admin.get("/api/logs/files/auth.log.1")
    assert rotated.status_code == 200 and "mail queued" in rotated.text
    text = world.admin.get("/api/logs/files/gateway.log")
    assert text.status_code == 200 and text.headers["content-type"].startswith("text/plain")
    lines = [json.loads(line) for line in text.text.splitlines() if line.strip()]
    assert lines and all(e["service"] == "gateway" and {"ts", "level", "msg"} <= set(e) for e in lines)
    everything = "".join(world.admin.get(f"/api/logs/files/{n}").text for n in files)
    assert PASSWORD not in everything and world.key not in everything  # secrets never logged


@pytest.mark.parametrize("name", ["..%2Fx", "..%2F..%2Fetc%2Fpasswd", ".hidden.log", "gateway.txt",
                                  "x%00.log", "a%5Cb.log", "gateway.log.1.2"])
def test_bad_names_are_400(world: World, name: str) -> None:
    response = world.admin.get(f"/api/logs/files/{name}")
    assert response.status_code == 400, (name, response.text)
    error = response.json()["error"]
    assert error["code"] in ("invalid_log_file", "invalid_request"), error


def test_traversal_on_the_raw_wire_is_refused(world: World) -> None:
    """``GET /api/logs/files/../x`` sent as is (an HTTP client would normalise the dots)."""
    cookies = "; ".join(f"{k}={v}" for k, v in world.admin.http.cookies.items())
    with socket.create_connection(("127.0.0.1", world.suite.port), timeout=10) as sock:
        sock.sendall(f"GET /api/logs/files/../../etc/passwd HTTP/1.1\r\nHost: x\r\nCookie: {cookies}\r\n"
                     f"Connection: close\r\n\r\n".encode())
        answer = b""
        while b"\r\n\r\n" not in answer:  # the status line and headers are enough
            answer += sock.recv(65536)
        head, _, body = answer.partition(b"\r\n\r\n")
        length = int(next((line.split(b":", 1)[1] for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), b"0"))
        while len(body) < length:
            body += sock.recv(65536)
    status = int(answer.split(b" ", 2)[1])
    assert status == 400, answer[:300]
    assert json.loads(body)["error"]["code"] == "invalid_log_file" and b"root:" not in body


def test_unknown_file_is_404(world: World) -> None:
    response = world.admin.get("/api/logs/files/nosuchservice.log")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


def test_stream_sends_recent_entries_then_live_ones(world: World) -> None:
    got: list[dict[str, Any]] = []
    caught_up = threading.Event()
    live = threading.Event()
    marker: dict[str, str] = {}

    def read() -> None:
        with world.admin.http.stream("GET", "/api/logs/stream?tail=20",
                                     timeout=httpx.Timeout(60, read=30)) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            for line in response.iter_lines():
                assert not line.startswith("event:")
                if line.startswith("data: "):
                    entry = json.loads(line[6:])
                    got.append(entry)
                    if len(got) >= 20:
                        caught_up.set()
                    if marker and entry.get("msg", "").startswith("mail queued") and caught_up.is_set():
                        live.set()
                        return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert caught_up.wait(30), len(got)
    recent = got[:20]
    assert [e["ts"] for e in recent] == sorted(e["ts"] for e in recent)
    assert len({e["service"] for e in recent}) >= 2
    began = time.monotonic()
    marker["armed"] = "yes"
    signed_up_user(world.suite, "Late")  # the auth service logs the queued mail
    assert live.wait(30), got[-5:]
    assert time.monotonic() - began < 30
    assert got[-1]["service"] == "auth"
    assert httpx.get(world.suite.url + "/openapi.json", timeout=10).json()["paths"]["/api/logs/stream"]
