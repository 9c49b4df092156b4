"""The capsule domain XML (no I/O) and the metadata that marks a domain ours."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from dovecote.vmmgr.accel import Accel
from dovecote.vmmgr.domain_xml import (
    METADATA_NS,
    DomainConfig,
    Metadata,
    build_domain_xml,
    capsule_id_of,
    domain_name,
    metadata_xml,
    parse_metadata,
    vnc_socket_of,
)


def config(**overrides: object) -> DomainConfig:
    values: dict[str, object] = dict(
        capsule_id="cap-123",
        accel=Accel.TCG,
        vcpus=2,
        memory_mib=512,
        kernel=Path("/img/vmlinuz"),
        initrd=Path("/img/initrd.img"),
        cmdline="console=ttyS0 root=/dev/vda rw",
        overlay_path=Path("/run/c/disk.qcow2"),
        agent_socket_path=Path("/run/c/agent.sock"),
        console_log_path=Path("/run/c/console.log"),
    )
    values.update(overrides)
    return DomainConfig(**values)


def test_domain_boots_the_kernel_directly_with_limits_and_a_tcg_type() -> None:
    root = ET.fromstring(build_domain_xml(config()))
    assert root.get("type") == "qemu"
    assert root.findtext("name") == "dovecote-cap-123"
    assert root.findtext("memory") == "512" and root.find("memory").get("unit") == "MiB"  # type: ignore[union-attr]
    assert root.findtext("vcpu") == "2"
    assert root.findtext("os/kernel") == "/img/vmlinuz"
    assert root.findtext("os/initrd") == "/img/initrd.img"
    assert "console=ttyS0" in (root.findtext("os/cmdline") or "")
    assert root.find("cpu") is None  # TCG: QEMU's default model
    assert root.findtext("on_crash") == "destroy"


def test_kvm_domain_passes_the_host_cpu_through() -> None:
    root = ET.fromstring(build_domain_xml(config(accel=Accel.KVM)))
    assert root.get("type") == "kvm"
    assert root.find("cpu").get("mode") == "host-passthrough"  # type: ignore[union-attr]


def test_devices_overlay_agent_channel_console_and_user_network() -> None:
    devices = ET.fromstring(build_domain_xml(config())).find("devices")
    assert devices is not None
    (disk,) = devices.findall("disk")
    assert disk.find("driver").get("type") == "qcow2"  # type: ignore[union-attr]
    assert disk.find("source").get("file") == "/run/c/disk.qcow2"  # type: ignore[union-attr]
    assert disk.find("target").get("bus") == "virtio"  # type: ignore[union-attr]
    (channel,) = devices.findall("channel")
    assert channel.get("type") == "unix"
    assert channel.find("source").attrib == {"mode": "bind", "path": "/run/c/agent.sock"}  # type: ignore[union-attr]
    assert channel.find("target").attrib == {"type": "virtio", "name": "org.dovecote.agent"}  # type: ignore[union-attr]
    serial = devices.find("serial")
    assert serial is not None and serial.get("type") == "file"
    assert serial.find("source").get("path") == "/run/c/console.log"  # type: ignore[union-attr]
    (interface,) = devices.findall("interface")
    assert interface.get("type") == "user"
    assert interface.find("model").get("type") == "virtio"  # type: ignore[union-attr]
    assert devices.find("rng") is not None
    assert devices.find("memballoon").get("model") == "none"  # type: ignore[union-attr]
    # the display: QEMU's VNC server on a unix socket libvirt places, no TCP listener
    (graphics,) = devices.findall("graphics")
    assert graphics.attrib == {"type": "vnc"}
    assert graphics.find("listen").attrib == {"type": "socket"}  # type: ignore[union-attr]
    assert devices.find("video/model").get("type") == "none"  # type: ignore[union-attr]


def test_metadata_marks_the_domain_and_round_trips() -> None:
    xml = build_domain_xml(config())
    assert f'xmlns:dovecote="{METADATA_NS}"' in xml
    meta = parse_metadata(xml)
    assert meta == Metadata(
        capsule_id="cap-123",
        accel=Accel.TCG,
        overlay_path=Path("/run/c/disk.qcow2"),
        agent_socket_path=Path("/run/c/agent.sock"),
        console_log_path=Path("/run/c/console.log"),
    )
    assert parse_metadata(metadata_xml(meta)) == meta


def test_metadata_as_libvirt_returns_it_without_namespace() -> None:
    returned = (
        '<vm version="1"><capsule>c1</capsule><accel>kvm</accel><overlay>/o</overlay>'
        "<agent-socket>/s</agent-socket><console-log>/l</console-log></vm>"
    )
    meta = parse_metadata(returned)
    assert meta is not None and meta.capsule_id == "c1" and meta.accel is Accel.KVM


@pytest.mark.parametrize(
    "xml",
    [
        "<domain><name>dovecote-x</name></domain>",
        "not xml",
        '<vm><capsule>c</capsule><accel>warp</accel><overlay>/o</overlay>'
        "<agent-socket>/s</agent-socket><console-log>/l</console-log></vm>",
        "<vm><capsule>c</capsule></vm>",
    ],
)
def test_domains_without_our_metadata_are_not_ours(xml: str) -> None:
    assert parse_metadata(xml) is None


def test_domain_names() -> None:
    assert domain_name("abc") == "dovecote-abc"
    assert capsule_id_of("dovecote-abc") == "abc"
    assert capsule_id_of("other-vm") is None
    assert capsule_id_of("dovecote-") is None


@pytest.mark.parametrize(
    "overrides",
    [
        {"capsule_id": "../etc"},
        {"capsule_id": ""},
        {"vcpus": 0},
        {"memory_mib": 16},
        {"agent_socket_path": Path("/" + "x" * 120)},
    ],
)
def test_invalid_configs_are_refused(overrides: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        build_domain_xml(config(**overrides))


def test_text_is_escaped() -> None:
    xml = build_domain_xml(config(cmdline="a=<b> & 'c'"))
    assert ET.fromstring(xml).findtext("os/cmdline") == "a=<b> & 'c'"


def test_the_display_socket_is_read_back_from_the_live_domain() -> None:
    live = (
        "<domain><devices><graphics type='vnc' socket='/var/lib/libvirt/qemu/d-1/vnc.sock'>"
        "<listen type='socket' socket='/var/lib/libvirt/qemu/d-1/vnc.sock'/></graphics></devices></domain>")
    assert vnc_socket_of(live) == Path("/var/lib/libvirt/qemu/d-1/vnc.sock")
    assert vnc_socket_of(build_domain_xml(config()).replace("<listen type=\"socket\" />", "")) is None
    assert vnc_socket_of("<domain><devices/></domain>") is None
    assert vnc_socket_of("not xml") is None


def test_a_desktop_guest_gets_a_standard_vga_with_room_for_4k() -> None:
    devices = ET.fromstring(build_domain_xml(config(video="vga"))).find("devices")
    assert devices is not None
    model = devices.find("video/model")
    assert model is not None and model.get("type") == "vga" and model.get("vram") == "65536"
