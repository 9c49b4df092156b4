"""Streaming capsule routes: large files over HTTP, exec and PTY over WebSockets.

The frame codec and origin check run without a VM; the rest against one
``dovecote up`` with the libvirt driver and ONE capsule for the module (see
``test_capsules_vm.py`` for the image cache).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from dovecote.bus.messages import capsule_streams as cs
from dovecote.gateway.routes.capsule_streams import FrameCodec, FrameError, origin_allowed
from dovecote.libs.errors import ServiceError
from tests.helpers.capsules import (
    Api,
    running_capsule,
)
from tests.helpers.suite import Suite, get_json

LIMIT = 60 * 1024 * 1024
MiB = 1024 * 1024

# -- without a VM ----------------------------------------------------------------------


def test_pty_frames_are_base64_and_errors_carry_fatal() -> None:
    codec = FrameCodec("pty")
    start = codec.start('{"type":"connect","tag":"pty-1"}', {"actor": None, "capsule_id": "c"})
    assert isinstance(start, cs.StreamPty) and start.connect and start.tag == "pty-1"
    data = base64.b64encode(b"\x1b[1mls\r").decode()
    assert codec.control(json.dumps({"type": "input", "data": data})) == cs.PtyInput(data=b"\x1b[1mls\r")
    assert codec.control('{"type":"resize","cols":120,"rows":40}') == cs.PtyResize(cols=120, rows=40)
    with pytest.raises(FrameError):
        codec.control('{"type":"input","data":"not base64!"}')
    assert codec.frames(cs.ProcStarted(pid=7, tag="pty-1")) == [{"type": "started", "tag": "pty-1", "pid": 7}]
    assert codec.frames(cs.ProcOutput(data=b"\xff\x00")) == [{"type": "output", "data": "/wA="}]
    assert codec.refused(ServiceError(404, "not_found", "gone")) == {
        "type": "error", "data": "gone", "fatal": True}


def test_exec_frames_decode_utf8_split_across_chunks() -> None:
    codec = FrameCodec("exec")
    assert codec.frames(cs.ProcStarted(pid=3, tag="t")) == [{"type": "start", "pid": 3}]
    euro = "€".encode()
    assert codec.frames(cs.ProcOutput(data=b"a" + euro[:1], channel="stdout")) == [
        {"type": "stdout", "data": "a"}]
    assert codec.frames(cs.ProcOutput(data=euro[1:], channel="stdout")) == [
        {"type": "stdout", "data": "€"}]
    assert codec.frames(cs.ProcExit(exit_code=3)) == [{"type": "exit", "exit_code": 3}]
    with pytest.raises(FrameError):
        codec.start('{"type":"connect","tag":"x"}', {})


def test_cookie_websockets_must_come_from_our_origin() -> None:
    assert origin_allowed(None, "gw:8080", "")
    assert origin_allowed("http://gw:8080", "gw:8080", "")
    assert origin_allowed("https://app.example", "gw:8080", "https://app.example")
    assert not origin_allowed("https://evil.example", "gw:8080", "https://app.example")
    assert not origin_allowed("null", "gw:8080", "")


def test_a_client_lying_about_content_length_cannot_kill_the_gateway(api_suite: Suite) -> None:
    host, port = api_suite.url.removeprefix("http://").split(":")
    for path in ("/v1/capsules/cap-0000000000000000/files/stream/write", "/v1/auth/login", "/healthz"):
        for _ in range(3):
            with socket.create_connection((host, int(port)), timeout=10) as conn:
                conn.sendall((f"POST {path} HTTP/1.1\r\nHost: {host}\r\n"
                              "Content-Type: multipart/form-data; boundary=b\r\n"
                              "Content-Length: 1000\r\n\r\n").encode() + b"0123456789")
                conn.shutdown(socket.SHUT_WR)
                try:
                    conn.recv(4096)
                except OSError:
                    pass
    time.sleep(0.5)
    status, _ = get_json(api_suite.url + "/healthz")
    assert status == 200
    assert api_suite.proc.poll() is None, "".join(api_suite.output[-50:])


# -- against a VM ----------------------------------------------------------------------------


class World:
    def __init__(self, suite: Suite, api: Api, key: str, capsule_id: str) -> None:
        self.suite, self.api, self.key, self.capsule_id = suite, api, key, capsule_id
        self.base = f"/v1/capsules/{capsule_id}"
        self.ws = suite.url.replace("http://", "ws://") + self.base


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with running_capsule("dcst-", {"DOVECOTE_MAX_UPLOAD_BYTES": str(LIMIT)}) as (suite, api, capsule_id):
        yield World(suite, api, api.http.headers["X-API-Key"], capsule_id)


def _multipart(path: str, chunks: Iterator[bytes], boundary: str = "dovecote-b0undary") -> Iterator[bytes]:
    yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"path\"\r\n\r\n{path}\r\n"
           f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"f\"\r\n"
           "Content-Type: application/octet-stream\r\n\r\n").encode()
    yield from chunks
    yield f"\r\n--{boundary}--\r\n".encode()


def _blocks(total: int, seed: bytes = b"dovecote") -> Iterator[bytes]:
    block = hashlib.sha256(seed).digest() * (MiB // 32)
    for n in range(total // MiB):
        yield block[n % 32:] + block[:n % 32]


@pytest.mark.slow
def test_a_50_mb_file_streams_up_and_back_byte_identical(world: World) -> None:
    size = 50 * MiB
    digest = hashlib.sha256()
    for block in _blocks(size):
        digest.update(block)
    began = time.monotonic()
    up = world.api.post(f"{world.base}/files/stream/write",
                        content=_multipart("/root/big.bin", _blocks(size)),
                        headers={"Content-Type": "multipart/form-data; boundary=dovecote-b0undary"},
                        timeout=600)
    assert up.status_code == 204, up.text
    print(f"upload: {size / MiB / (time.monotonic() - began):.1f} MiB/s")
    listed = world.api.post(f"{world.base}/files/list", {"path": "/root", "depth": 1}).json()
    assert [e["size"] for e in listed["entries"] if e["name"] == "big.bin"] == [size]
    back = hashlib.sha256()
    received = 0
    with world.api.http.stream("POST", f"{world.base}/files/stream/read",
                               json={"path": "/root/big.bin"}, timeout=600) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/octet-stream"
        for chunk in response.iter_bytes():
            received += len(chunk)
            back.update(chunk)
    assert received == size and back.hexdigest() == digest.hexdigest()
    missing = world.api.post(f"{world.base}/files/stream/read", {"path": "/root/nope"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


@pytest.mark.slow
def test_an_upload_over_the_limit_is_413_and_writes_nothing(world: World) -> None:
    # Announced: refused from the headers alone.
    host, port = world.suite.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall((f"POST {world.base}/files/stream/write HTTP/1.1\r\nHost: {host}\r\n"
                      f"X-API-Key: {world.key}\r\n"
                      "Content-Type: multipart/form-data; boundary=b\r\n"
                      f"Content-Length: {LIMIT + MiB}\r\n\r\n").encode())
        assert conn.recv(4096).startswith(b"HTTP/1.1 413")
    # Chunked: refused once the file passes the limit; the temp file is discarded.
    chunked = world.api.post(
        f"{world.base}/files/stream/write",
        content=_multipart("/root/huge.bin", _blocks(LIMIT + 2 * MiB)),
        headers={"Content-Type": "multipart/form-data; boundary=dovecote-b0undary"}, timeout=600)
    assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "too_large"
    gone = world.api.post(f"{world.base}/files/read", {"path": "/root/huge.bin"})
    assert gone.status_code == 404


async def _frames_until(ws: Any, pred: Any, limit_s: float = 60) -> list[dict[str, Any]]:
    frames: list[dict[str, Any]] = []
    with trio.fail_after(limit_s):
        while True:
            frame = json.loads(await ws.get_message())
            frames.append(frame)
            if pred(frame, frames):
                return frames


def _output(frames: list[dict[str, Any]]) -> bytes:
    return b"".join(base64.b64decode(f["data"]) for f in frames if f["type"] == "output")


@pytest.mark.slow
async def test_exec_stream_sends_stdout_stderr_and_the_exit_code(world: World) -> None:
    headers = [("X-API-Key", world.key)]
    async with open_websocket_url(world.ws + "/exec/stream", extra_headers=headers) as ws:
        await ws.send_message(json.dumps({"type": "start", "cmd": "echo hi; echo err >&2; exit 3"}))
        frames = await _frames_until(ws, lambda f, _: f["type"] == "exit")
        with trio.fail_after(10), pytest.raises(ConnectionClosed):
            await ws.get_message()  # the server closes after the exit
    assert frames[0]["type"] == "start" and frames[0]["pid"] > 0
    assert "".join(f["data"] for f in frames if f["type"] == "stdout") == "hi\n"
    assert "".join(f["data"] for f in frames if f["type"] == "stderr") == "err\n"
    assert frames[-1] == {"type": "exit", "exit_code": 3}


@pytest.mark.slow
async def test_websockets_refuse_strangers_before_the_upgrade(world: World) -> None:
    async with httpx.AsyncClient(base_url=world.suite.url) as client:
        upgrade = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
                   "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode()}
        anonymous = await client.get(world.base + "/pty", headers=upgrade)
        assert anonymous.status_code == 401
        # The server closes a refused upgrade's connection, and says so.
        assert anonymous.headers.get("connection") == "close"
        other = await client.get("/v1/capsules/cap-0000000000000000/pty",
                                 headers={**upgrade, "X-API-Key": world.key})
        assert other.status_code == 404


@pytest.mark.slow
async def test_a_pty_resizes_survives_a_disconnect_and_replays_what_was_missed(world: World) -> None:
    headers = [("X-API-Key", world.key)]

    def typed(text: str) -> str:
        return json.dumps({"type": "input", "data": base64.b64encode(text.encode()).decode()})

    async with open_websocket_url(world.ws + "/pty", extra_headers=headers) as ws:
        await ws.send_message(json.dumps({"type": "start", "cmd": "/bin/sh", "cols": 80, "rows": 24,
                                          "envs": {"TERM": "dumb"}}))
        started = json.loads(await ws.get_message())
        assert started["type"] == "started" and started["tag"] and started["pid"] > 0
        tag = started["tag"]
        await ws.send_message(json.dumps({"type": "resize", "cols": 132, "rows": 43}))
        await ws.send_message(typed("stty size\n"))
        await _frames_until(ws, lambda _, fs: b"43 132" in _output(fs))
        # Something that finishes while nobody is connected.
        await ws.send_message(typed("sleep 2; echo missed-$((6*7))\n"))
    await trio.sleep(4)
    async with open_websocket_url(world.ws + "/pty", extra_headers=headers) as ws:
        await ws.send_message(json.dumps({"type": "connect", "tag": tag}))
        again = json.loads(await ws.get_message())
        assert again["type"] == "started" and again["tag"] == tag
        await _frames_until(ws, lambda _, fs: b"missed-42" in _output(fs))
        await ws.send_message(json.dumps({"type": "kill"}))
        frames = await _frames_until(ws, lambda f, _: f["type"] == "exit")
        assert frames[-1]["exit_code"] is None or frames[-1]["exit_code"] != 0
