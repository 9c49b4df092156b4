"""The live view's I/O-free pieces: the RFB relay core, the RFB client, the status table, viewer tokens."""

from __future__ import annotations

import struct

import pytest

from dovecote.gateway.errors import ApiError
from dovecote.gateway.routes.live_view import check_token, mint_token
from dovecote.vmmgr.vnc_protocol import RelayCore, RfbClient, RfbError, plan_status

SERVER_INIT = struct.pack(">HH", 640, 480) + bytes(16) + struct.pack(">I", 4) + b"QEMU"


def relay() -> tuple[RelayCore, list[bytes], list[bytes]]:
    down: list[bytes] = []
    up: list[bytes] = []
    return RelayCore(to_viewer=down.append, to_display=up.append), down, up


def test_a_viewer_asking_for_exclusive_access_is_made_shared() -> None:
    core, down, up = relay()
    core.from_display(b"RFB 003.008\n")
    core.from_viewer(b"RFB 003.008\n")
    core.from_display(b"\x01\x01")  # one security type: None
    core.from_viewer(b"\x01")
    core.from_display(b"\0\0\0\0")
    core.from_viewer(b"\x00")  # ClientInit shared-flag 0: exclusive
    assert up == [b"RFB 003.008\n", b"\x01", b"\x01"]  # ... forwarded as shared
    core.from_display(SERVER_INIT[:10])
    core.from_display(SERVER_INIT[10:] + b"\x00\x00\x00\x01")  # ServerInit, then an update begins
    assert (core.width, core.height) == (640, 480) and core.handshake_done
    assert b"".join(down) == b"RFB 003.008\n" + b"\x01\x01" + b"\0\0\0\0" + SERVER_INIT + b"\x00\x00\x00\x01"
    core.from_viewer(b"\x03\x00" + bytes(8))  # after the handshake, bytes pass untouched
    assert up[-1] == b"\x03\x00" + bytes(8)


def test_handshake_bytes_split_anyhow_come_out_the_same() -> None:
    stream = b"RFB 003.008\n" + b"\x02\x02\x01" + b"\0\0\0\0" + SERVER_INIT + b"tail"
    core, down, _ = relay()
    for i in range(len(stream)):
        core.from_display(stream[i:i + 1])
    assert b"".join(down) == b"RFB 003.008\n" + b"\x01\x01" + b"\0\0\0\0" + SERVER_INIT + b"tail"


@pytest.mark.parametrize("sectypes", [b"\x01\x02", b"\x00\x00\x00\x05nope!"])
def test_a_display_that_wants_a_password_or_refuses_is_an_error(sectypes: bytes) -> None:
    core, _, _ = relay()
    with pytest.raises(RfbError):
        core.from_display(b"RFB 003.008\n" + sectypes)


def test_the_client_reads_a_raw_frame() -> None:
    client = RfbClient(keep_pixels=True)
    assert client.feed(b"RFB 003.008\n") == b"RFB 003.008\n"
    assert client.feed(b"\x01\x01") == b"\x01"
    assert client.feed(b"\0\0\0\0") == b"\x01"
    setup = client.feed(SERVER_INIT)
    assert client.ready and (client.width, client.height) == (640, 480) and setup[0] == 0
    pixel = b"\x10\x20\x30\x00"
    update = b"\x00\x00\x00\x01" + struct.pack(">HHHHi", 1, 2, 1, 1, 0) + pixel
    client.feed(update[:7])
    assert client.frames == []
    client.feed(update[7:])
    assert len(client.frames) == 1
    start = (2 * 640 + 1) * 4
    assert client.pixels[start:start + 4] == pixel


@pytest.mark.parametrize(("connected", "handshake", "frame_s", "status"), [
    (False, False, None, "unavailable"),
    (True, False, None, "unavailable"),
    (True, True, None, "stale"),
    (True, True, 2.5, "degraded"),
    (True, True, 0.05, "ready"),
])
def test_plan_status(connected: bool, handshake: bool, frame_s: float | None, status: str) -> None:
    assert plan_status(connected=connected, handshake=handshake, frame_s=frame_s)[0] == status


def test_viewer_tokens_bind_the_target_and_expire() -> None:
    secret = b"k" * 32
    token = mint_token(secret, "capsule", "cap-1", "team-a", 1000)
    assert check_token(secret, token, "capsule", "cap-1", now=999)["team"] == "team-a"
    for args, code in (((secret, token, "capsule", "cap-1", 1001), "token_expired"),
                       ((secret, token, "capsule", "cap-2", 999), "unauthorized"),
                       ((secret, token, "session", "cap-1", 999), "unauthorized"),
                       ((b"x" * 32, token, "capsule", "cap-1", 999), "unauthorized"),
                       ((secret, token[:-2] + "AA", "capsule", "cap-1", 999), "unauthorized"),
                       ((secret, "garbage", "capsule", "cap-1", 999), "unauthorized")):
        with pytest.raises(ApiError) as refused:
            check_token(*args[:4], now=args[4])  # type: ignore[arg-type]
        assert refused.value.status == 401 and refused.value.code == code
