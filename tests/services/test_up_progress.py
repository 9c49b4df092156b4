"""``dovecote up``'s capsule progress: vmmgr's health details read as a table, then printed as they change.

The end-to-end half (a real first start says "Capsules are ready" and it is
true) is in ``tests/capsules/test_capsule_cli_vm.py``.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import trio

from dovecote.services.up_progress import capsule_phase, watch_capsules
from dovecote.vmmgr.images import ImageError, ensure_guest_image

TABLE: list[tuple[dict[str, str] | None, str, bool, bool]] = [
    # details                                          text starts with                      final  ready
    (None, "capsules: waiting for vmmgr", False, False),
    ({"image": "building"}, "capsules: building the guest image", False, False),
    ({"image": "building", "image_step": "kernel"}, "capsules: guest image: kernel", False, False),
    ({"image": "disabled"}, "Capsules are disabled on this machine (DOVECOTE_VM_DRIVER=none)", True, False),
    ({"image": "disabled: libvirtd is not running (infra/start-libvirt.sh)"},
     "Capsules are disabled on this machine (libvirtd is not running", True, False),
    ({"image": "failed: guest image build failed (1)"},
     "Capsules are unavailable: the VM driver", True, False),
    ({"image": "ready", "netguard": "failed: nft is not installed (capsules are refused)",
      "template": "waiting"}, "Capsules are refused: their network guard", True, False),
    ({"image": "ready", "netguard": "on", "template": "waiting"},
     'capsules: building the built-in template "minimal"', False, False),
    ({"image": "ready", "netguard": "on", "template": "building"},
     'capsules: building the built-in template "minimal"', False, False),
    ({"image": "ready", "netguard": "on", "template": "ready"}, "Capsules are ready.", True, True),
    ({"image": "ready", "netguard": "on"}, "Capsules are ready.", True, True),  # templates off
    ({"image": "ready", "netguard": "off: DOVECOTE_VM_NETGUARD=false", "template": "ready"},
     "Capsules are ready. Warning: netguard off: DOVECOTE_VM_NETGUARD=false", True, True),
]


@pytest.mark.parametrize(("details", "text", "final", "ready"), TABLE)
def test_capsule_phase_table(details: dict[str, str] | None, text: str, final: bool, ready: bool) -> None:
    phase = capsule_phase(details)
    assert phase.text.startswith(text), phase
    assert (phase.final, phase.ready) == (final, ready)


class FakeHealth:
    """A /healthz that answers the next of ``bodies`` each time (the last one forever)."""

    def __init__(self, bodies: list[tuple[int, dict[str, Any]]]) -> None:
        self.bodies = bodies
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                status, body = fake.bodies[0] if len(fake.bodies) == 1 else fake.bodies.pop(0)
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/healthz"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def _health(details: dict[str, str], vmmgr_status: str = "ok") -> dict[str, Any]:
    return {"status": "ok", "failing": [],
            "services": {"auth": {"status": "ok"}, "vmmgr": {"status": vmmgr_status, "details": details}}}


@pytest.fixture
def fake_health() -> Iterator[type[FakeHealth]]:
    made: list[FakeHealth] = []

    def make(bodies: list[tuple[int, dict[str, Any]]]) -> FakeHealth:
        made.append(FakeHealth(bodies))
        return made[-1]

    yield make  # type: ignore[misc]
    for fake in made:
        fake.server.shutdown()
        fake.server.server_close()


async def test_watch_prints_each_step_once_then_ready(fake_health: Any) -> None:
    fake = fake_health([
        (503, _health({}, vmmgr_status="down")),
        (200, _health({"image": "building"})),
        (200, _health({"image": "building", "image_step": "debootstrap bookworm"})),
        (200, _health({"image": "building", "image_step": "debootstrap bookworm"})),
        (200, _health({"image": "building", "image_step": "kernel"})),
        (200, _health({"image": "ready", "netguard": "on", "template": "waiting"})),
        (200, _health({"image": "ready", "netguard": "on", "template": "building"})),
        (200, _health({"image": "ready", "netguard": "on", "template": "ready"})),
    ])
    lines: list[str] = []
    with trio.fail_after(30):
        phase = await watch_capsules(fake.url, out=lines.append, poll_s=0.01)
    assert phase.ready
    steps = [line.split("] ", 1)[1] for line in lines[:-1]]
    assert steps == [
        "capsules: waiting for vmmgr",
        "capsules: building the guest image (the first start on a machine takes a few minutes; "
        "later starts reuse it)",
        "capsules: guest image: debootstrap bookworm",
        "capsules: guest image: kernel",
        'capsules: building the built-in template "minimal" (one VM boots, then is frozen)',
    ]
    assert all(line.startswith("[0:0") for line in lines[:-1])
    assert lines[-1].startswith("Capsules are ready.") and "dovecote key create" in lines[-1]


async def test_watch_stops_at_a_failure_with_its_reason(fake_health: Any) -> None:
    fake = fake_health([(200, _health({"image": "building"})),
                        (200, _health({"image": "failed: guest image build failed (2): no space"}))])
    lines: list[str] = []
    with trio.fail_after(30):
        phase = await watch_capsules(fake.url, out=lines.append, poll_s=0.01)
    assert phase.final and not phase.ready
    assert "no space" in lines[-1] and lines[-1].startswith("Capsules are unavailable")


async def test_a_guest_image_build_reports_each_step_as_it_happens(tmp_path: Path) -> None:
    # A stand-in for infra/guest/build.py: announces its steps on stderr (one of
    # them split across writes), prints the artifact directory on stdout.
    artifact = tmp_path / "guest-abc"
    artifact.mkdir()
    for name in ("vmlinuz", "initrd.img", "rootfs.qcow2"):
        (artifact / name).write_bytes(b"x")
    (artifact / "manifest.json").write_text(json.dumps({
        "hash": "abc", "kernel": "vmlinuz", "initrd": "initrd.img", "rootfs": "rootfs.qcow2",
        "cmdline": "console=ttyS0", "kernel_version": "6.1"}))
    marker = tmp_path / "go"
    builder = tmp_path / "build.py"
    builder.write_text(f"""
import os, sys, time
def say(text):
    sys.stderr.write(text); sys.stderr.flush()
say("build.py: debootstrap bookworm\\nnoise from a tool\\nbuild.py: ker")
time.sleep(0.2)
say("nel\\n")
while not os.path.exists({str(marker)!r}):
    time.sleep(0.05)
say("build.py: root filesystem\\n")
print({str(artifact)!r})
""")
    steps: list[str] = []
    kernel_seen = trio.Event()

    def progress(step: str) -> None:
        steps.append(step)
        if step == "kernel":
            kernel_seen.set()

    async def release_when_kernel_is_seen() -> None:
        await kernel_seen.wait()
        assert steps == ["debootstrap bookworm", "kernel"]  # seen while the build still runs
        marker.write_text("")

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(release_when_kernel_is_seen)
            image = await ensure_guest_image(tmp_path, builder=builder, on_progress=progress)
    assert image.image_id == "abc"
    assert steps == ["debootstrap bookworm", "kernel", "root filesystem"]


async def test_a_failed_image_build_keeps_its_error_output(tmp_path: Path) -> None:
    builder = tmp_path / "build.py"
    builder.write_text("import sys\n"
                       "sys.stderr.write('build.py: kernel\\nE: no space left\\n')\n"
                       "sys.exit(3)\n")
    steps: list[str] = []
    with pytest.raises(ImageError, match=r"failed \(3\)[\s\S]*no space left"):
        await ensure_guest_image(tmp_path, builder=builder, on_progress=steps.append)
    assert steps == ["kernel"]
    assert sys.executable  # the builder ran with this interpreter
