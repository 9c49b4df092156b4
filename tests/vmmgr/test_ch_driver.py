"""The Cloud Hypervisor driver, against a fake Cloud Hypervisor API (no binary needed).

The driver's process-spawning seam (``spawn``) starts, instead of
``cloud-hypervisor``, a fake VMM: a sleeping Python process whose command line
carries the API socket (so the driver's pid checks see a real process) and,
in this test's nursery, a small HTTP/1.1 server (h11) on that API socket. The
server records every request (method, endpoint, JSON body) and answers as CH
does: 204 for actions, 200 with JSON for ``vm.info``, ``vm.counters`` and
``vmm.ping``, 404 when there is no VM, 500 with CH's JSON list of messages on
errors. It also plays CH's vsock multiplexer (``CONNECT <port>`` / ``OK``) in
front of the real guest agent run on the host, for the agent relay.

The last tests run the real binary and are skipped unless ``cloud-hypervisor``
is installed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import h11
import pytest
import trio

from dovecote.vmmgr import guest
from dovecote.vmmgr.accel import Accel
from dovecote.vmmgr.ch_driver import AGENT_VSOCK_PORT, CloudHypervisorDriver, open_ch_driver, spawn_detached
from dovecote.vmmgr.driver import DriverError, DriverUnavailable, VmExists, VmNotFound, VmSpec, VmState
from dovecote.vmmgr.images import GuestImage

CH_ERROR = ["Error from API", "The VM could not be paused", "Invalid state transition: Paused to Paused"]

# -- the fake Cloud Hypervisor ---------------------------------------------


class FakeVmm:
    """One fake cloud-hypervisor process: its API server and, once a VM runs, its vsock multiplexer."""

    def __init__(self, api_socket: Path, process: trio.Process, nursery: trio.Nursery) -> None:
        self.api_socket = api_socket
        self.process = process
        self.nursery = nursery
        self.requests: list[tuple[str, str, Any]] = []
        self.config: dict[str, Any] | None = None
        self.state = "Created"
        self.failures: dict[str, tuple[int, Any]] = {}
        self.hang: set[str] = set()
        self.agent_backend: str | None = None
        self.vsock_lines: list[bytes] = []
        self._scope = trio.CancelScope()
        self._vsock_scope: trio.CancelScope | None = None

    @property
    def calls(self) -> list[str]:
        return [f"{method} {endpoint}" for method, endpoint, _body in self.requests]

    def body(self, endpoint: str) -> Any:
        return next(body for _method, path, body in self.requests if path == endpoint)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with self._scope, trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            await sock.bind(str(self.api_socket))
            sock.listen(8)
            task_status.started()
            await trio.serve_listeners(self._handle, [trio.SocketListener(sock)])

    async def exit(self) -> None:
        """What CH does on ``vmm.shutdown`` (or a crash): the process and its sockets are gone."""
        self.process.kill()
        await self.process.wait()
        self._scope.cancel()
        if self._vsock_scope is not None:
            self._vsock_scope.cancel()

    # -- HTTP ---------------------------------------------------------------

    async def _handle(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        request: h11.Request | None = None
        body = b""
        async with stream:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:
                    return
            assert request is not None
            endpoint = request.target.decode().removeprefix("/api/v1/")
            self.requests.append((request.method.decode(), endpoint, json.loads(body) if body else None))
            if endpoint in self.hang:
                await trio.sleep_forever()
            status, payload = await self._answer(endpoint, json.loads(body) if body else None)
            headers = [("server", "Cloud Hypervisor API"), ("content-type", "application/json")]
            if status == 204:
                await stream.send_all(conn.send(h11.Response(status_code=204, headers=headers)) or b"")
            else:
                data = json.dumps(payload).encode()
                headers.append(("content-length", str(len(data))))
                await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)) or b"")
                await stream.send_all(conn.send(h11.Data(data=data)) or b"")
            await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
        if endpoint == "vmm.shutdown" and status == 204:
            await self.exit()

    async def _answer(self, endpoint: str, body: Any) -> tuple[int, Any]:
        if endpoint in self.failures:
            return self.failures[endpoint]
        if endpoint == "vmm.ping":
            return 200, {"build_version": "fake", "version": "v48.0", "pid": self.process.pid, "features": []}
        if endpoint == "vmm.shutdown":
            return 204, None
        if endpoint in ("vm.create", "vm.restore"):
            if self.config is not None:
                return 500, ["Error from API", "The VM is already created"]
            if endpoint == "vm.create":
                self.config, self.state = body, "Created"
            else:
                source = Path(urlparse(body["source_url"]).path)
                self.config, self.state = json.loads((source / "config.json").read_text()), "Paused"
                await self._start_vsock()
            return 204, None
        if self.config is None:
            return 404, ["Error from API", "The VM is not created"]
        if endpoint == "vm.info":
            return 200, {"config": self.config, "state": self.state, "memory_actual_size": 1 << 28}
        if endpoint == "vm.counters":
            return 200, {"_disk0": {"read_bytes": 4096, "write_ops": 3}, "_rng": {"read_bytes": 64}}
        transitions = {"vm.boot": ("Created", "Running"), "vm.pause": ("Running", "Paused"),
                       "vm.resume": ("Paused", "Running"), "vm.snapshot": ("Paused", "Paused")}  # fmt: skip
        if endpoint in transitions:
            before, after = transitions[endpoint]
            if self.state != before:
                return 500, ["Error from API", f"Invalid state transition: {self.state} to {after}"]
            if endpoint == "vm.snapshot":
                target = Path(urlparse(body["destination_url"]).path)
                (target / "config.json").write_text(json.dumps(self.config))
                (target / "state.json").write_text("{}")
                (target / "memory-ranges").write_bytes(b"\0" * 4096)
            if endpoint == "vm.boot":
                await self._start_vsock()
            self.state = after
            return 204, None
        if endpoint == "vm.shutdown":
            self.state = "Shutdown"
            return 204, None
        return 404, ["Not Found"]

    # -- vsock --------------------------------------------------------------

    async def _start_vsock(self) -> None:
        assert self.config is not None
        self._vsock_scope = await self.nursery.start(self._serve_vsock, Path(self.config["vsock"]["socket"]))

    async def _serve_vsock(self, path: Path, *, task_status: trio.TaskStatus[trio.CancelScope]) -> None:
        with trio.CancelScope() as scope, trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            await sock.bind(str(path))
            sock.listen(8)
            task_status.started(scope)
            await trio.serve_listeners(self._vsock_connection, [trio.SocketListener(sock)])

    async def _vsock_connection(self, stream: trio.SocketStream) -> None:
        async with stream:
            line = b""
            while not line.endswith(b"\n"):
                chunk = await stream.receive_some(1)
                if not chunk:
                    return
                line += chunk
            self.vsock_lines.append(line)
            if line != b"CONNECT %d\n" % AGENT_VSOCK_PORT or self.agent_backend is None:
                return  # nothing listens on that guest port: CH closes the connection
            try:
                backend = await trio.open_unix_socket(self.agent_backend)
            except OSError:
                return
            async with backend:
                await stream.send_all(b"OK 1073741824\n")
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_splice, stream, backend, nursery.cancel_scope)
                    nursery.start_soon(_splice, backend, stream, nursery.cancel_scope)


async def _splice(source: trio.SocketStream, sink: trio.SocketStream, done: trio.CancelScope) -> None:
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        async for chunk in source:
            await sink.send_all(chunk)
    done.cancel()


class FakeHost:
    """The ``spawn`` seam: each call starts one :class:`FakeVmm`."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.argvs: list[list[str]] = []
        self.vmms: list[FakeVmm] = []
        self.prepare: list[Any] = []
        """Callables applied to the next fake VMMs before they serve (failures to inject...)."""

    def vmm(self, capsule_id: str) -> FakeVmm:
        """The latest fake VMM of a capsule."""
        return next(v for v in reversed(self.vmms) if v.api_socket.parent.name == capsule_id)

    async def spawn(self, argv: Sequence[str], log_path: Path) -> int:
        assert argv[1] == "--api-socket" and argv[2].startswith("path="), argv
        self.argvs.append(list(argv))
        api_socket = Path(argv[2].removeprefix("path="))
        process = await trio.lowlevel.open_process(
            [sys.executable, "-c", "import time; time.sleep(600)", *argv], stdin=subprocess.DEVNULL
        )
        vmm = FakeVmm(api_socket, process, self.nursery)
        if self.prepare:
            self.prepare.pop(0)(vmm)
        self.vmms.append(vmm)
        await self.nursery.start(vmm.serve)
        await trio.Path(log_path).write_text("fake cloud-hypervisor\n")
        return process.pid

    async def aclose(self) -> None:
        for vmm in self.vmms:
            if vmm.process.returncode is None:
                vmm.process.kill()
                await vmm.process.wait()


# -- fixtures --------------------------------------------------------------


@pytest.fixture
def run_dir() -> Iterator[Path]:
    # Short, under /tmp: the API and vsock sockets live here (108-byte limit).
    path = Path(tempfile.mkdtemp(prefix="dcch-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def image() -> GuestImage:
    images = Path("/nonexistent/guest-fake")
    return GuestImage(directory=images, image_id="fake", kernel=images / "vmlinuz",
                      initrd=images / "initrd.img", rootfs=images / "rootfs.qcow2",
                      cmdline="console=ttyS0 root=/dev/vda rw", kernel_version="6.1.0-fake")  # fmt: skip


@pytest.fixture
async def host(nursery: trio.Nursery) -> AsyncIterator[FakeHost]:
    fake = FakeHost(nursery)
    try:
        yield fake
    finally:
        await fake.aclose()


@pytest.fixture
async def driver(
    run_dir: Path, host: FakeHost, nursery: trio.Nursery
) -> AsyncIterator[CloudHypervisorDriver]:
    async with open_ch_driver(run_dir, accel=Accel.KVM, nursery=nursery, spawn=host.spawn) as opened:
        yield opened


def make_spec(run_dir: Path, image: GuestImage, capsule_id: str = "c1", *, vcpus: int = 2,
              memory_mib: int = 512) -> VmSpec:  # fmt: skip
    """A spec whose overlay exists already (so that no qemu-img runs)."""
    directory = run_dir / capsule_id
    directory.mkdir(exist_ok=True)
    spec = VmSpec.in_dir(capsule_id, directory, image=image, vcpus=vcpus, memory_mib=memory_mib)
    spec.overlay_path.write_bytes(b"qcow2 overlay")
    return spec


async def wait_for(predicate: Callable[[], bool], interval: float = 0.02) -> None:
    while True:
        if predicate():
            return
        await trio.sleep(interval)


def is_our_child(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return False
    return True


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_bytes().rpartition(b")")[2].split()[0] not in (b"Z", b"X")
    except OSError:
        return False


async def gone(pid: int) -> None:
    """The process exits at once (a SIGKILLed one may still show as running for a moment)."""
    with trio.fail_after(2):
        await wait_for(lambda: not alive(pid), 0.005)


# -- create, state, list ----------------------------------------------------


async def test_create_starts_one_vmm_then_sends_vm_create_and_vm_boot(
    driver: CloudHypervisorDriver, host: FakeHost, run_dir: Path, image: GuestImage
) -> None:
    spec = make_spec(run_dir, image, vcpus=2, memory_mib=512)
    with trio.fail_after(10):
        handle = await driver.create(spec)

    directory = run_dir / "c1"
    assert host.argvs == [["cloud-hypervisor", "--api-socket", f"path={directory / 'ch.sock'}"]]
    vmm = host.vmm("c1")
    assert vmm.calls == ["GET vmm.ping", "PUT vm.create", "PUT vm.boot"]
    assert vmm.body("vm.create") == {
        "cpus": {"boot_vcpus": 2, "max_vcpus": 2},
        "memory": {"size": 512 * 1024 * 1024},
        "payload": {
            "kernel": "/nonexistent/guest-fake/vmlinuz",
            "initramfs": "/nonexistent/guest-fake/initrd.img",
            "cmdline": "console=ttyS0 root=/dev/vda rw",
        },
        "disks": [{"path": str(spec.overlay_path), "image_type": "Qcow2", "backing_files": True}],
        "rng": {"src": "/dev/urandom"},
        "serial": {"mode": "File", "file": str(spec.console_log_path)},
        "console": {"mode": "Off"},
        "vsock": {"cid": 3, "socket": str(directory / "vsock.sock")},
    }
    assert vmm.body("vm.boot") is None

    assert handle.capsule_id == "c1" and handle.name == "dovecote-c1" and handle.accel is Accel.KVM
    assert (handle.overlay_path, handle.agent_socket_path, handle.console_log_path) == (
        spec.overlay_path, spec.agent_socket_path, spec.console_log_path)  # fmt: skip
    assert int((directory / "ch.pid").read_text()) == vmm.process.pid
    assert json.loads((directory / "ch.json").read_text())["capsule"] == "c1"
    assert spec.agent_socket_path.is_socket()  # the relay listens

    assert await driver.state("c1") is VmState.RUNNING
    [info] = await driver.list()
    assert info.handle == handle and info.state is VmState.RUNNING
    assert await driver.agent_socket("c1") == spec.agent_socket_path


async def test_create_refuses_a_second_vm_for_the_same_capsule(
    driver: CloudHypervisorDriver, host: FakeHost, run_dir: Path, image: GuestImage
) -> None:
    spec = make_spec(run_dir, image)
    with trio.fail_after(10):
        await driver.create(spec)
        with pytest.raises(VmExists):
            await driver.create(spec)
    assert len(host.argvs) == 1
    assert await driver.state("c1") is VmState.RUNNING


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")
async def test_create_makes_the_overlay_over_the_base_disk_with_qemu_img(
    driver: CloudHypervisorDriver, run_dir: Path, image: GuestImage
) -> None:
    base = run_dir / "base.qcow2"
    await trio.run_process(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "16M"])
    (run_dir / "c1").mkdir()
    spec = VmSpec.in_dir("c1", run_dir / "c1", image=image)
    spec = VmSpec(**{**spec.__dict__, "base_disk": base, "disk_size_mib": 32})
    with trio.fail_after(10):
        await driver.create(spec)
    result = await trio.run_process(["qemu-img", "info", "--output=json", str(spec.overlay_path)],
                                    capture_stdout=True)  # fmt: skip
    info = json.loads(result.stdout)
    assert info["format"] == "qcow2" and info["backing-filename"] == str(base)
    assert info["virtual-size"] == 32 * 1024 * 1024
    with trio.fail_after(10):
        await driver.destroy("c1")
    assert not spec.overlay_path.exists()


@pytest.mark.parametrize(
    ("ch_state", "state"),
    [("Created", VmState.OTHER), ("Running", VmState.RUNNING), ("Paused", VmState.PAUSED),
     ("Shutdown", VmState.STOPPED), ("BreakPoint", VmState.OTHER)],
)  # fmt: skip
async def test_state_maps_cloud_hypervisors_states(
    driver: CloudHypervisorDriver, host: FakeHost, run_dir: Path, image: GuestImage,
    ch_state: str, state: VmState,
) -> None:  # fmt: skip
    with trio.fail_after(10):
        await driver.create(make_spec(run_dir, image))
        host.vmm("c1").state = ch_state
        assert await driver.state("c1") is state
        assert [info.state for info in await driver.list()] == [state]


async def test_pause_and_resume_send_vm_pause_and_vm_resume(
    driver: CloudHypervisorDriver, host: FakeHost, run_dir: Path, image: GuestImage
) -> None:
    with trio.fail_after(10):
        await driver.create(make_spec(run_dir, image))
        vmm = host.vmm("c1")
        del vmm.requests[:]
        await driver.pause("c1")
        assert await driver.state("c1") is VmState.PAUSED
        await driver.resume("c1")
        assert await driver.state("c1") is VmState.RUNNING
    assert vmm.calls == ["PUT vm.pause", "GET vm.info", "PUT vm.resume", "GET vm.info"]
    assert vmm.body("vm.pause") is None and vmm.body("vm.resume") is None


async def test_stats_and_counters(
    driver: CloudHypervisorDriver, host: FakeHost, run_dir: Path, image: GuestImage
) -> None:
    spec = make_spec(run_dir, image, vcpus=3)
    with trio.fail_after(10):
        await driver.create(spec)
        stats = await driver.stats("c1")
        counters = await driver.counters("c1")
    assert stats.vcpus == 3
    assert stats.cpu_time_ns >= 0 and stats.memory_bytes > 0  # the fake VMM's own process
    assert stats.disk_bytes == spec.overlay_path.stat().st_blocks * 512
    assert counters == {"_disk0": {"read_bytes": 4096, "write_ops": 3}, "_rng": {"read_bytes": 64}}
    assert host.vmm("c1").calls[-1] == "GET vm.counters"  # stats() reads /proc, not the API


# -- save, restore, destroy -------------------------------------------------


async def test_save_snapshots_and_stops_the_vmm_and_restore_resumes_it_on_demand(
    driver: CloudHypervisorDriver, host: FakeHost, run_dir: Path, image: GuestImage
) -> None:
    spec = make_spec(run_dir, image)
    saved = run_dir / "c1" / "state.save"
    with trio.fail_after(10):
        handle = await driver.create(spec)
        first = host.vmm("c1")
        del first.requests[:]
        await driver.save("c1", saved)

    assert first.calls == ["PUT vm.pause", "PUT vm.snapshot", "PUT vm.shutdown", "PUT vmm.shutdown"]
    assert first.body("vm.snapshot") == {"destination_url": f"file://{saved}"}
    await gone(first.process.pid)
    assert sorted(p.name for p in saved.iterdir()) == ["config.json", "dovecote-vm.json", "memory-ranges",
                                                       "state.json"]  # fmt: skip
    assert await driver.list() == []
    with pytest.raises(VmNotFound):
        await driver.state("c1")
    assert spec.overlay_path.exists() and not spec.agent_socket_path.exists()
    assert not (run_dir / "c1" / "ch.sock").exists() and not (run_dir / "c1" / "ch.json").exists()

    with trio.fail_after(10):
        restored = await driver.restore(saved)
    second = host.vmm("c1")
    assert second is not first
    assert second.calls == ["GET vmm.ping", "PUT vm.restore", "PUT vm.resume"]
    assert second.body("vm.restore") == {
        "source_url": f"file://{saved}", "memory_restore_mode": "OnDemand", "resume": False}  # fmt: skip
    assert restored == handle
    assert await driver.state("c1") is VmState.RUNNING
    assert spec.agent_socket_path.is_socket()  # re-plumbed
    with trio.fail_after(10), pytest.raises(VmExists):
        await driver.restore(saved)


async def test_save_of_a_paused_vm_skips_the_pause_and_restore_can_stay_paused(
    driver: CloudHypervisorDriver, host: FakeHost, run_dir: Path, image: GuestImage
) -> None:
    saved = run_dir / "saved"
    with trio.fail_after(10):
        await driver.create(make_spec(run_dir, image))
        await driver.pause("c1")
        first = host.vmm("c1")
        del first.requests[:]
        await driver.save("c1", saved)
        # CH refused the second pause; the driver saw the VM paused and went on.
        assert first.calls == ["PUT vm.pause", "GET vm.info", "PUT vm.snapshot", "PUT vm.shutdown",
                               "PUT vmm.shutdown"]  # fmt: skip
        await driver.restore(saved, paused=True)
        assert host.vmm("c1").calls == ["GET vmm.ping", "PUT vm.restore"]
        assert await driver.state("c1") is VmState.PAUSED
        with pytest.raises(DriverError):
            await driver.restore(saved, memory_file=run_dir / "ram")


async def test_destroy_stops_the_vmm_and_removes_its_files(
    driver: CloudHypervisorDriver, host: FakeHost, run_dir: Path, image: GuestImage
) -> None:
    spec = make_spec(run_dir, image)
    with trio.fail_after(10):
        await driver.create(spec)
        vmm = host.vmm("c1")
        spec.console_log_path.write_text("guest console\n")
        del vmm.requests[:]
        await driver.destroy("c1")

    assert vmm.calls == ["PUT vm.shutdown", "PUT vmm.shutdown"]
    await gone(vmm.process.pid)
    directory = run_dir / "c1"
    assert sorted(p.name for p in directory.iterdir()) == ["ch.log", "console.log"]
    assert await driver.list() == []
    with pytest.raises(VmNotFound):
        await driver.state("c1")
    with pytest.raises(VmNotFound):
        await driver.destroy("c1")

    with trio.fail_after(10):  # the capsule can run again; remove_disk=False keeps its overlay
        await driver.create(make_spec(run_dir, image))
        await driver.destroy("c1", remove_disk=False)
    assert spec.overlay_path.exists()


async def test_destroy_kills_a_vmm_that_ignores_vmm_shutdown(
    run_dir: Path, host: FakeHost, nursery: trio.Nursery, image: GuestImage
) -> None:
    driver = CloudHypervisorDriver(run_dir, accel=Accel.KVM, nursery=nursery, limiter=trio.CapacityLimiter(4),
                                   spawn=host.spawn, stop_timeout_s=0.5)  # fmt: skip
    host.prepare.append(lambda vmm: vmm.failures.update({"vmm.shutdown": (500, ["Error from API", "busy"])}))
    with trio.fail_after(10):
        await driver.create(make_spec(run_dir, image))
        vmm = host.vmm("c1")
        await driver.destroy("c1")
    assert vmm.calls[-2:] == ["PUT vm.shutdown", "PUT vmm.shutdown"]
    with trio.fail_after(5):
        await vmm.process.wait()  # SIGKILLed by the driver
    assert vmm.process.returncode == -signal.SIGKILL
    await driver.aclose()


# -- errors -----------------------------------------------------------------


async def test_an_error_of_cloud_hypervisor_becomes_a_driver_error_with_its_message(
    driver: CloudHypervisorDriver, host: FakeHost, run_dir: Path, image: GuestImage
) -> None:
    with trio.fail_after(10):
        await driver.create(make_spec(run_dir, image))
        host.vmm("c1").failures["vm.pause"] = (500, CH_ERROR)
        with pytest.raises(DriverError) as caught:
            await driver.pause("c1")
    assert type(caught.value) is DriverError
    assert "The VM could not be paused: Invalid state transition: Paused to Paused" in str(caught.value)
    assert await driver.state("c1") is VmState.RUNNING


async def test_a_failed_boot_stops_the_vmm_and_leaves_no_files(
    driver: CloudHypervisorDriver, host: FakeHost, run_dir: Path, image: GuestImage
) -> None:
    spec = make_spec(run_dir, image)
    host.prepare.append(lambda vmm: vmm.failures.update(
        {"vm.boot": (500, ["Error from API", "Error booting VM", "Kernel not found"])}))  # fmt: skip
    with trio.fail_after(10), pytest.raises(DriverError, match="Error booting VM: Kernel not found"):
        await driver.create(spec)
    vmm = host.vmm("c1")
    assert vmm.calls == ["GET vmm.ping", "PUT vm.create", "PUT vm.boot",
                         "PUT vm.shutdown", "PUT vmm.shutdown"]  # fmt: skip
    await gone(vmm.process.pid)
    # The overlay was there before create: it stays.
    assert sorted(p.name for p in (run_dir / "c1").iterdir()) == ["ch.log", "disk.qcow2"]
    assert await driver.list() == []


async def test_no_vm_for_an_unknown_capsule(driver: CloudHypervisorDriver, run_dir: Path) -> None:
    (run_dir / "empty").mkdir()  # a directory without a VM record
    for capsule_id in ("nope", "empty", "../etc"):
        calls = (driver.state, driver.pause, driver.resume, driver.destroy, driver.agent_socket, driver.stats)
        for call in calls:
            with pytest.raises(VmNotFound):
                await call(capsule_id)
    with pytest.raises(VmNotFound):
        await driver.save("nope", run_dir / "saved")
    with pytest.raises(DriverError, match="not a saved Dovecote VM"):
        await driver.restore(run_dir / "empty")


async def test_a_vmm_that_died_is_crashed_until_destroy_removes_its_files(
    driver: CloudHypervisorDriver, host: FakeHost, run_dir: Path, image: GuestImage
) -> None:
    spec = make_spec(run_dir, image)
    with trio.fail_after(10):
        await driver.create(spec)
        await host.vmm("c1").exit()  # killed: the API socket stays, nobody listens
        assert (run_dir / "c1" / "ch.sock").exists()

        assert await driver.state("c1") is VmState.CRASHED
        assert [info.state for info in await driver.list()] == [VmState.CRASHED]
        for call in (driver.pause, driver.resume, driver.agent_socket, driver.stats):
            with pytest.raises(VmNotFound):
                await call("c1")
        with pytest.raises(VmNotFound):
            await driver.save("c1", run_dir / "saved")

        await driver.destroy("c1")  # what reconcile does with a crashed VM
    assert await driver.list() == []
    assert not spec.overlay_path.exists() and not (run_dir / "c1" / "ch.sock").exists()


async def test_create_over_the_files_of_a_dead_vmm_starts_afresh(
    driver: CloudHypervisorDriver, host: FakeHost, run_dir: Path, image: GuestImage
) -> None:
    spec = make_spec(run_dir, image)
    with trio.fail_after(10):
        await driver.create(spec)
        await host.vmm("c1").exit()
        await driver.create(spec)
    assert len(host.argvs) == 2
    assert await driver.state("c1") is VmState.RUNNING


async def test_a_vmm_that_does_not_answer_makes_the_driver_unavailable(
    run_dir: Path, host: FakeHost, nursery: trio.Nursery, image: GuestImage
) -> None:
    driver = CloudHypervisorDriver(run_dir, accel=Accel.KVM, nursery=nursery, limiter=trio.CapacityLimiter(4),
                                   spawn=host.spawn, api_timeout_s=0.3, probe_timeout_s=0.3)  # fmt: skip
    with trio.fail_after(10):
        await driver.create(make_spec(run_dir, image))
        host.vmm("c1").hang.update({"vm.info", "vm.pause"})
        with pytest.raises(DriverUnavailable):
            await driver.state("c1")
        with pytest.raises(DriverUnavailable):
            await driver.pause("c1")
        assert [info.state for info in await driver.list()] == [VmState.OTHER]
    await driver.aclose()


async def test_open_refuses_tcg_and_a_missing_binary(run_dir: Path, nursery: trio.Nursery) -> None:
    with pytest.raises(DriverUnavailable, match="KVM"):
        async with open_ch_driver(run_dir, accel=Accel.TCG, nursery=nursery):
            pass
    with pytest.raises(DriverUnavailable, match="no cloud-hypervisor executable"):
        async with open_ch_driver(run_dir, accel=Accel.KVM, nursery=nursery, binary="/nonexistent/ch"):
            pass


async def test_create_refuses_bad_specs(
    driver: CloudHypervisorDriver, run_dir: Path, image: GuestImage
) -> None:
    spec = make_spec(run_dir, image)
    bad = [
        VmSpec(**{**spec.__dict__, "capsule_id": "../x"}),
        VmSpec(**{**spec.__dict__, "vcpus": 0}),
        VmSpec(**{**spec.__dict__, "memory_file": run_dir / "ram"}),
        VmSpec(**{**spec.__dict__, "agent_socket_path": run_dir / ("x" * 120)}),
    ]
    for each in bad:
        with pytest.raises(DriverError):
            await driver.create(each)
    assert await driver.list() == []


# -- the guest agent channel -------------------------------------------------


@pytest.fixture
def agent_socket() -> Iterator[str]:
    """The real guest agent on the host (``--listen-unix``), standing in for the guest's vsock listener."""
    workdir = Path(tempfile.mkdtemp(prefix="dcha-", dir="/tmp"))
    sock = str(workdir / "a.sock")
    with open(workdir / "agent.log", "wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", guest.AGENT_MODULE, "--listen-unix", sock, "--no-system-changes",
             "--machine-id-path", str(workdir / "machine-id"), "--hostname-path", str(workdir / "hostname")],
            stdout=log_file, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        yield sock
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(workdir, ignore_errors=True)


async def test_the_agent_socket_relays_to_the_guest_vsock_port_also_after_a_driver_restart(
    run_dir: Path, host: FakeHost, nursery: trio.Nursery, image: GuestImage, agent_socket: str
) -> None:
    spec = make_spec(run_dir, image)
    async with open_ch_driver(run_dir, accel=Accel.KVM, nursery=nursery, spawn=host.spawn) as driver:
        with trio.fail_after(10):
            handle = await driver.create(spec)
            vmm = host.vmm("c1")
            # No agent in the guest yet: the relay closes the connection, open_agent retries.
            with pytest.raises(guest.AgentConnectError):
                async with guest.open_agent(str(handle.agent_socket_path), connect_timeout=0.5):
                    pass
            vmm.agent_backend = agent_socket
            async with guest.open_agent(str(handle.agent_socket_path), connect_timeout=5) as agent:
                result = await agent.exec("echo relayed")
                assert result.stdout == "relayed\n"
    assert vmm.vsock_lines[-1] == b"CONNECT %d\n" % AGENT_VSOCK_PORT

    # A new driver (vmmgr restarted) relays for the VMs it finds.
    async with open_ch_driver(run_dir, accel=Accel.KVM, nursery=nursery, spawn=host.spawn) as driver:
        with trio.fail_after(10):
            async with guest.open_agent(str(handle.agent_socket_path), connect_timeout=5) as agent:
                assert agent.pong.protocol
            assert await driver.state("c1") is VmState.RUNNING
            await driver.destroy("c1")
    assert len(host.argvs) == 1


# -- spawning ---------------------------------------------------------------


async def test_spawn_detached_starts_a_session_leader_that_is_not_our_child(run_dir: Path) -> None:
    log_path = run_dir / "out.log"
    code = "import os, time; print('up', os.getsid(0) == os.getpid(), flush=True); time.sleep(60)"
    with trio.fail_after(10):
        pid = await spawn_detached([sys.executable, "-c", code, "marker-arg"], log_path)
    try:
        assert b"marker-arg" in await trio.Path(f"/proc/{pid}/cmdline").read_bytes()
        assert not is_our_child(pid)
        with trio.fail_after(10):
            await wait_for(lambda: "up True" in log_path.read_text())
    finally:
        os.kill(pid, signal.SIGKILL)
    await gone(pid)
    with pytest.raises(DriverError, match="nonexistent"):
        await spawn_detached(["/nonexistent/cloud-hypervisor", "--api-socket", "path=/tmp/x"], log_path)


# -- the real binary ----------------------------------------------------------

CH_BINARY = shutil.which("cloud-hypervisor")
VM_DIR = Path(os.environ.get("DOVECOTE_TEST_VM_DIR", "/var/tmp/dovecote"))
AGENT_LISTENS_ON_VSOCK = any("--listen-vsock" in source.read_text() for source, _ in guest.guest_files())


@pytest.fixture
def real_image() -> GuestImage:
    if CH_BINARY is None:
        pytest.skip("no cloud-hypervisor binary")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("Cloud Hypervisor needs /dev/kvm")
    candidates = sorted((VM_DIR / "images").glob("guest-*"), key=lambda p: p.stat().st_mtime, reverse=True)
    for directory in candidates:
        with contextlib.suppress(Exception):
            return GuestImage.from_dir(directory)
    pytest.skip(f"no guest image under {VM_DIR / 'images'} (tests/vmmgr/test_libvirt_driver.py builds one)")


@pytest.mark.slow
async def test_real_cloud_hypervisor_boots_the_guest_pauses_resumes_and_destroys(
    real_image: GuestImage, run_dir: Path, nursery: trio.Nursery
) -> None:
    """The guest boots under CH; its agent is waited for only once the image's agent listens on vsock.

    Until then (see the guest side in ``vmmgr/ch_driver.py``) the agent looks
    for the virtio-serial port, which CH does not have, and the guest's init
    reporting itself ready is the proof of boot.
    """
    spec = VmSpec.in_dir("t-ch", run_dir / "t-ch", image=real_image)
    spec.overlay_path.parent.mkdir()
    async with open_ch_driver(run_dir, accel=Accel.KVM, nursery=nursery) as driver:
        try:
            with trio.fail_after(120):
                await driver.create(spec)
                assert await driver.state("t-ch") is VmState.RUNNING
                # The guest's init ran (it names its agent channel, found or not).
                await wait_for(lambda: b"dovecote-init: ready" in spec.console_log_path.read_bytes(), 0.2)
                if AGENT_LISTENS_ON_VSOCK:
                    async with guest.open_agent(str(spec.agent_socket_path), connect_timeout=60) as agent:
                        assert (await agent.exec("true")).exit_code == 0
                await driver.pause("t-ch")
                assert await driver.state("t-ch") is VmState.PAUSED
                await driver.resume("t-ch")
                assert await driver.state("t-ch") is VmState.RUNNING
        finally:
            with trio.CancelScope(shield=True), contextlib.suppress(VmNotFound):
                await driver.destroy("t-ch")
        assert await driver.list() == []
        assert not spec.overlay_path.exists()
