"""libvirt domain XML for a capsule VM, and the metadata that marks it ours. No I/O.

A capsule is a transient libvirt domain named ``dovecote-<capsule id>``:

- direct kernel boot of the guest image (kernel, busybox initramfs, command line
  with ``console=ttyS0`` and ``root=/dev/vda``), no firmware boot menu, no
  option ROMs;
- one virtio disk: the capsule's copy-on-write qcow2 overlay over the
  template's read-only base image;
- the guest agent's virtio-serial port ``org.dovecote.agent``, exposed on the
  host as a unix socket that QEMU listens on (``mode='bind'``);
- the serial console written to a file (through virtlogd, which caps its size);
- user-mode networking (see :func:`_interface`);
- virtio-rng, no balloon, no USB, no video device unless ``video`` names one;
- optionally a 9p share (``share_dir``): QEMU's own 9p server exports that host
  directory (``accessmode='mapped'``: QEMU's unprivileged user owns what the
  guest creates, the guest's owners and modes are kept in ``user.virtfs.*``
  extended attributes) under the mount tag :data:`SHARE_TAG`. A device, so a
  template and the capsules restored from it must agree on it (the desktop
  template carries one, see :mod:`dovecote.vmmgr.templates`);
- the display as QEMU's VNC server on a unix socket (no TCP listener) for the
  live view (``vmmgr/vnc.py``): libvirt picks its path in the domain's own
  directory, where QEMU's unprivileged user may bind, and labels it
  (:func:`vnc_socket_of` reads it back from the live domain); a display
  backend, not guest hardware, so snapshots and templates made without it
  restore with it;
- ``<metadata>`` in Dovecote's namespace with the capsule id and the paths the
  driver needs after a restart of vmmgr (reconcile reads them back with
  :func:`parse_metadata`);
- optionally guest RAM in a file (VM templating, see :mod:`dovecote.vmmgr.emulator`):
  the emulator is Dovecote's wrapper around QEMU, told through ``<qemu:env>``
  which file backs the RAM, whether it is shared, and whether QEMU waits for an
  incoming device state.

The domain ``type`` is ``kvm`` or ``qemu`` (TCG), chosen at run time by
:mod:`dovecote.vmmgr.accel`.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from .accel import Accel

DOMAIN_PREFIX = "dovecote-"
METADATA_NS = "https://dovecote.dev/xmlns/libvirt/vm/1"
METADATA_PREFIX = "dovecote"
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
AGENT_PORT_NAME = "org.dovecote.agent"
SHARE_TAG = "dovecote-share"
"""The 9p mount tag of a VM's share (``mount -t 9p -o trans=virtio dovecote-share /shared``)."""
SHARE_MOUNT_POINT = "hostshare"
"""The directory of the share where a host directory is bound (the guest's ``/shared/hostshare``)."""
CAPSULE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
# sockaddr_un.sun_path is 108 bytes, including the terminating NUL.
MAX_SOCKET_PATH = 107


def domain_name(capsule_id: str) -> str:
    """The libvirt domain name of a capsule."""
    return DOMAIN_PREFIX + capsule_id


def capsule_id_of(name: str) -> str | None:
    """The capsule id of a domain name, or ``None`` if the name is not ours."""
    if not name.startswith(DOMAIN_PREFIX):
        return None
    capsule_id = name[len(DOMAIN_PREFIX) :]
    return capsule_id if CAPSULE_ID_RE.fullmatch(capsule_id) else None


def valid_capsule_id(capsule_id: str) -> bool:
    return CAPSULE_ID_RE.fullmatch(capsule_id) is not None


@dataclass(frozen=True, kw_only=True)
class DomainConfig:
    """Everything the domain XML depends on (see :class:`dovecote.vmmgr.driver.VmSpec`)."""

    capsule_id: str
    accel: Accel
    vcpus: int
    memory_mib: int
    kernel: Path
    initrd: Path
    cmdline: str
    overlay_path: Path
    agent_socket_path: Path
    console_log_path: Path
    emulator: Path | None = None
    """Dovecote's QEMU wrapper; needed for ``memory_file`` and ``incoming``."""
    memory_file: Path | None = None
    """Back the guest RAM with this file (``memory_shared``: written through; else copy-on-write)."""
    memory_shared: bool = False
    incoming: bool = False
    """Start QEMU waiting for a device state (``-incoming defer``)."""
    video: str = "none"
    """libvirt's video model (``none``, ``vga``, ``virtio``...): a desktop guest needs one."""
    share_dir: Path | None = None
    """Export this host directory to the guest over 9p (mount tag :data:`SHARE_TAG`)."""


@dataclass(frozen=True, kw_only=True)
class Metadata:
    """What Dovecote stores in a domain's ``<metadata>`` element."""

    capsule_id: str
    accel: Accel
    overlay_path: Path
    agent_socket_path: Path
    console_log_path: Path


def vnc_socket_of(xml: str) -> Path | None:
    """The unix socket of a live domain's VNC display (None: no such display)."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    for graphics in root.findall("devices/graphics[@type='vnc']"):
        socket = graphics.get("socket")
        listen = graphics.find("listen[@type='socket']")
        if not socket and listen is not None:
            socket = listen.get("socket")
        if socket:
            return Path(socket)
    return None


def share_dir_of(xml: str) -> Path | None:
    """The host directory of a live domain's 9p share (None: it has none)."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    for fs in root.findall("devices/filesystem"):
        target, source = fs.find("target"), fs.find("source")
        if target is not None and target.get("dir") == SHARE_TAG and source is not None:
            directory = source.get("dir")
            if directory:
                return Path(directory)
    return None


def build_domain_xml(config: DomainConfig) -> str:
    """The ``<domain>`` document for ``config``.

    Raises:
        ValueError: an invalid capsule id, vCPU count, memory size or socket path.
    """
    if not valid_capsule_id(config.capsule_id):
        raise ValueError(f"invalid capsule id {config.capsule_id!r}")
    if config.vcpus < 1:
        raise ValueError("vcpus must be at least 1")
    if config.memory_mib < 64:
        raise ValueError("memory_mib must be at least 64")
    if len(str(config.agent_socket_path).encode()) > MAX_SOCKET_PATH:
        raise ValueError(f"agent socket path longer than {MAX_SOCKET_PATH} bytes: {config.agent_socket_path}")

    if (config.memory_file is not None or config.incoming) and config.emulator is None:
        raise ValueError("memory_file and incoming need Dovecote's emulator wrapper")
    domain = ET.Element("domain", type=config.accel.domain_type)
    _text(domain, "name", domain_name(config.capsule_id))
    domain.append(
        metadata_element(
            Metadata(
                capsule_id=config.capsule_id,
                accel=config.accel,
                overlay_path=config.overlay_path,
                agent_socket_path=config.agent_socket_path,
                console_log_path=config.console_log_path,
            )
        )
    )
    _text(domain, "memory", str(config.memory_mib), unit="MiB")
    _text(domain, "currentMemory", str(config.memory_mib), unit="MiB")
    _text(domain, "vcpu", str(config.vcpus), placement="static")

    os_ = ET.SubElement(domain, "os")
    _text(os_, "type", "hvm", arch="x86_64", machine="pc")
    _text(os_, "kernel", str(config.kernel))
    _text(os_, "initrd", str(config.initrd))
    _text(os_, "cmdline", config.cmdline)
    ET.SubElement(os_, "bios", useserial="no")

    features = ET.SubElement(domain, "features")
    ET.SubElement(features, "acpi")  # PCI interrupt routing and a clean power-off
    ET.SubElement(features, "apic")
    if config.accel is Accel.KVM:
        ET.SubElement(domain, "cpu", mode="host-passthrough", check="none", migratable="on")
    ET.SubElement(domain, "clock", offset="utc")
    # Transient domains: when the guest stops, the domain is gone; vmmgr notices.
    _text(domain, "on_poweroff", "destroy")
    _text(domain, "on_reboot", "destroy")
    _text(domain, "on_crash", "destroy")

    devices = ET.SubElement(domain, "devices")
    if config.emulator is not None:
        _text(devices, "emulator", str(config.emulator))
    disk = ET.SubElement(devices, "disk", type="file", device="disk")
    ET.SubElement(disk, "driver", name="qemu", type="qcow2", discard="unmap")
    ET.SubElement(disk, "source", file=str(config.overlay_path))
    ET.SubElement(disk, "target", dev="vda", bus="virtio")

    if config.share_dir is not None:
        fs = ET.SubElement(devices, "filesystem", type="mount", accessmode="mapped")
        ET.SubElement(fs, "driver", type="path")
        ET.SubElement(fs, "source", dir=str(config.share_dir))
        ET.SubElement(fs, "target", dir=SHARE_TAG)

    devices.append(_interface())

    serial = ET.SubElement(devices, "serial", type="file")
    ET.SubElement(serial, "source", path=str(config.console_log_path), append="off")
    ET.SubElement(serial, "target", port="0")
    console = ET.SubElement(devices, "console", type="file")
    ET.SubElement(console, "source", path=str(config.console_log_path), append="off")
    ET.SubElement(console, "target", type="serial", port="0")

    channel = ET.SubElement(devices, "channel", type="unix")
    ET.SubElement(channel, "source", mode="bind", path=str(config.agent_socket_path))
    ET.SubElement(channel, "target", type="virtio", name=AGENT_PORT_NAME)

    rng = ET.SubElement(devices, "rng", model="virtio")
    _text(rng, "backend", "/dev/urandom", model="random")
    ET.SubElement(devices, "controller", type="usb", model="none")
    graphics = ET.SubElement(devices, "graphics", type="vnc")
    ET.SubElement(graphics, "listen", type="socket")
    video = ET.SubElement(devices, "video")
    # A desktop's standard VGA gets 64 MiB of video memory: 3840x2160 at 32 bpp fits (xrandr).
    model = ET.SubElement(video, "model", type=config.video)
    if config.video == "vga":
        model.set("vram", "65536")
    ET.SubElement(devices, "memballoon", model="none")

    env = emulator_env(config)
    if env:
        commandline = ET.SubElement(domain, f"{{{QEMU_NS}}}commandline")
        for name, value in env.items():
            ET.SubElement(commandline, f"{{{QEMU_NS}}}env", name=name, value=value)

    ET.register_namespace("qemu", QEMU_NS)
    ET.indent(domain)
    return ET.tostring(domain, encoding="unicode")


def emulator_env(config: DomainConfig) -> dict[str, str]:
    """The wrapper's environment for ``config`` (empty: plain QEMU behaviour)."""
    env: dict[str, str] = {}
    if config.memory_file is not None:
        env["DOVECOTE_MEM_PATH"] = str(config.memory_file)
        env["DOVECOTE_MEM_SHARE"] = "true" if config.memory_shared else "false"
    if config.incoming:
        env["DOVECOTE_INCOMING"] = "defer"
    return env


def set_emulator_env(xml: str, env: dict[str, str], emulator: Path | None = None) -> str:
    """``xml`` (a domain document) with the wrapper's environment replaced by ``env``.

    Used to restore a saved VM with its RAM somewhere else (or in anonymous
    memory again: ``env`` empty).
    """
    ET.register_namespace("qemu", QEMU_NS)
    root = ET.fromstring(xml)
    for old in root.findall(f"{{{QEMU_NS}}}commandline"):
        root.remove(old)
    devices = root.find("devices")
    if emulator is not None and devices is not None:
        element = devices.find("emulator")
        if element is None:
            element = ET.Element("emulator")
            devices.insert(0, element)
        element.text = str(emulator)
    if env:
        commandline = ET.SubElement(root, f"{{{QEMU_NS}}}commandline")
        for name, value in env.items():
            ET.SubElement(commandline, f"{{{QEMU_NS}}}env", name=name, value=value)
    return ET.tostring(root, encoding="unicode")


def _interface() -> ET.Element:
    # User-mode networking (QEMU's slirp): the guest is 10.0.2.15 behind a NAT
    # that lives inside its own QEMU process, so a capsule has outbound access
    # but no capsule can reach another one (there is no shared bridge). The host
    # is reachable from the guest at 10.0.2.2, which slirp maps to the host's
    # 127.0.0.1: every service listening on the host's loopback is reachable by
    # the guest. Later hardening: switch to passt (<backend type='passt'/>) or
    # slirp with restrict=on plus explicit guestfwd rules for the host services
    # a capsule may use, and filter egress (no RFC 1918/link-local/metadata
    # addresses) per capsule policy.
    interface = ET.Element("interface", type="user")
    ET.SubElement(interface, "model", type="virtio")
    ET.SubElement(interface, "rom", enabled="no")  # no iPXE: we boot the kernel directly
    return interface


def metadata_element(meta: Metadata) -> ET.Element:
    """``<metadata>`` with Dovecote's element (the libvirt metadata API's unit)."""
    metadata = ET.Element("metadata")
    metadata.append(_metadata_vm(meta))
    return metadata


def metadata_xml(meta: Metadata) -> str:
    """Dovecote's metadata element alone, as ``virDomainSetMetadata`` takes it."""
    return ET.tostring(_metadata_vm(meta), encoding="unicode")


def _metadata_vm(meta: Metadata) -> ET.Element:
    # Literal prefixed tags with their own xmlns declaration, so that the
    # declaration stays on this element when it is serialized inside <domain>.
    vm = ET.Element(f"{METADATA_PREFIX}:vm", {f"xmlns:{METADATA_PREFIX}": METADATA_NS, "version": "1"})
    _text(vm, f"{METADATA_PREFIX}:capsule", meta.capsule_id)
    _text(vm, f"{METADATA_PREFIX}:accel", meta.accel.value)
    _text(vm, f"{METADATA_PREFIX}:overlay", str(meta.overlay_path))
    _text(vm, f"{METADATA_PREFIX}:agent-socket", str(meta.agent_socket_path))
    _text(vm, f"{METADATA_PREFIX}:console-log", str(meta.console_log_path))
    return vm


def parse_metadata(xml: str) -> Metadata | None:
    """Dovecote's metadata from a domain document, or from the element ``virDomainGetMetadata`` returns.

    Returns ``None`` when the document carries no (readable) Dovecote metadata:
    such a domain is not ours.
    """
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    if root.tag == "vm":
        # virDomainGetMetadata returns the element without its namespace (it
        # selected the element by namespace already).
        vm: ET.Element | None = root
        prefix = ""
    else:
        prefix = f"{{{METADATA_NS}}}"
        vm = root if root.tag == f"{prefix}vm" else root.find(f"metadata/{prefix}vm")
    if vm is None:
        return None

    def field(name: str) -> str | None:
        element = vm.find(f"{prefix}{name}")
        return element.text if element is not None and element.text else None

    values = {name: field(name) for name in ("capsule", "accel", "overlay", "agent-socket", "console-log")}
    if any(v is None for v in values.values()):
        return None
    try:
        accel = Accel(str(values["accel"]))
    except ValueError:
        return None
    return Metadata(
        capsule_id=str(values["capsule"]),
        accel=accel,
        overlay_path=Path(str(values["overlay"])),
        agent_socket_path=Path(str(values["agent-socket"])),
        console_log_path=Path(str(values["console-log"])),
    )


def _text(parent: ET.Element, tag: str, text: str, **attrs: str) -> ET.Element:
    element = ET.SubElement(parent, tag, attrs)
    element.text = text
    return element


def emulator_env_of(xml: str) -> dict[str, str]:
    """The wrapper's environment a domain document carries (``<qemu:env>``), empty if none."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return {}
    env: dict[str, str] = {}
    for commandline in root.findall(f"{{{QEMU_NS}}}commandline"):
        for element in commandline.findall(f"{{{QEMU_NS}}}env"):
            name = element.get("name")
            if name:
                env[name] = element.get("value") or ""
    return env
