#!/usr/bin/env python3
"""Build the Dovecote guest image from Debian packages, cached by content hash.

    python infra/guest/build.py --cache-dir DIR      # prints the artifact directory

The artifact directory ``DIR/guest-<hash>/`` holds:

- ``vmlinuz``: the kernel of Debian's ``linux-image-amd64`` (fetched with
  ``apt-get download`` and unpacked with ``dpkg -x``; never the host's kernel);
- ``initrd.img``: a tiny busybox initramfs. Debian builds virtio_pci,
  virtio_blk, virtio_console, ext4... as modules, so this initramfs loads them
  (with their dependencies, resolved from ``modules.dep``), mounts the root disk
  (``root=`` on the kernel command line) and ``switch_root``s to
  ``/sbin/dovecote-init``. With ``dovecote.probe`` on the command line it only
  prints ``DOVECOTE-PROBE-OK`` and powers off: that is the accelerator probe of
  ``vmmgr/accel.py``;
- ``rootfs.qcow2``: ext4 root filesystem (debootstrap minbase, busybox, kmod,
  the kernel's modules, the guest agent from ``vmmgr/guest/`` (the ``agent``
  package and ``protocol.py``, under ``/opt/dovecote/python/dovecote/vmmgr/guest/``)
  and the host venv's ``msgspec`` in dist-packages, plus what a sandbox user
  expects: git, curl, ca-certificates, procps, sudo, python3 with pip and venv,
  and apt pointed at deb.debian.org).
  Commands run as ``wrenn-user`` (uid 1000, passwordless sudo, home
  ``/home/wrenn-user``): the agent's ``--default-user``. The filesystem is
  grown to its disk at every boot (``resize2fs``, online), so a capsule's root
  filesystem is the size of the disk vmmgr gave it. It is the read-only base of
  one copy-on-write overlay per capsule;
- ``manifest.json``: versions, the kernel command line, the build time.

The hash covers every input we control: this script, the package lists, the
agent files and the msgspec package. Debian's archive is not pinned (the kernel
and packages follow the mirror's security updates when the hash changes). The
build runs in a temporary directory next to the cache and is renamed into place
atomically, under a lock, so concurrent builders never see half an image.

Needs root (debootstrap, chroot) and the Debian packages ``debootstrap``,
``e2fsprogs`` and ``qemu-utils`` (see ``infra/system-deps.sh``).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gzip
import hashlib
import io
import json
import lzma
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

FORMAT_VERSION = 1
SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
# What debootstrap adds to minbase. busybox provides ip/switch_root/insmod for
# the init scripts (and the initramfs reuses its static binary); kmod provides
# depmod/modprobe; libpython3-stdlib the parts of the standard library that
# python3-minimal leaves out (asyncio, json, pty, ...).
PACKAGES = ("python3-minimal", "libpython3-stdlib", "busybox-static", "kmod",
            # What a sandbox user expects without asking (issue 10): resize2fs
            # (e2fsprogs) is already in minbase.
            "git", "curl", "ca-certificates", "procps", "sudo", "python3", "python3-pip",
            "python3-venv")
# The capsules reference's user: runs every command that names no user.
DEFAULT_USER = "wrenn-user"
DEFAULT_UID = 1000
# apt inside the guest (deb822); the build mirror may be a local one the guest cannot reach.
GUEST_APT_SOURCES = """\
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""
# Packages users install later leave their documentation out too.
DPKG_NODOC = """\
path-exclude=/usr/share/doc/*
path-include=/usr/share/doc/*/copyright
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/locale/*
path-include=/usr/share/locale/locale.alias
"""
KERNEL_PACKAGE = "linux-image-amd64"
# Loaded by the initramfs (with their dependencies) in this order.
INITRAMFS_MODULES = (
    "virtio_pci",
    "virtio_blk",
    "virtio_console",
    "virtio_net",
    "virtio_rng",
    "crc32c_generic",  # ext4's metadata checksums (a soft dependency, not in modules.dep)
    "ext4",
)
# Loaded when the kernel has them: the agent's vsock channel under Cloud
# Hypervisor, which has no virtio-serial ports.
OPTIONAL_MODULES = ("vmw_vsock_virtio_transport",)
# Module trees not worth copying into the root filesystem of a headless VM.
MODULE_TREES_LEFT_OUT = (
    "kernel/sound",
    "kernel/drivers/gpu",
    "kernel/drivers/media",
    "kernel/drivers/net/wireless",
    "kernel/drivers/infiniband",
    "kernel/drivers/staging",
    "kernel/drivers/bluetooth",
    "kernel/drivers/iio",
    "kernel/drivers/isdn",
    "kernel/net/bluetooth",
    "kernel/net/mac80211",
    "kernel/net/wireless",
    # Hardware a virtio VM never has (the image stays small: these were half its size).
    "kernel/drivers/net/ethernet",
    "kernel/drivers/net/usb",
    "kernel/drivers/net/can",
    "kernel/drivers/scsi",
    "kernel/drivers/usb",
    "kernel/drivers/hid",
    "kernel/drivers/hwmon",
    "kernel/drivers/platform",
    "kernel/drivers/input",
    "kernel/drivers/ata",
    "kernel/drivers/video",
    "kernel/drivers/mtd",
    "kernel/drivers/comedi",
    "kernel/drivers/target",
    "kernel/drivers/mmc",
    "kernel/drivers/i2c",
    "kernel/drivers/nvme",
    "kernel/drivers/watchdog",
    "kernel/fs/ocfs2",
    "kernel/fs/nfsd",
)
ROOTFS_SIZE = "2G"
ROOT_DEVICE = "/dev/vda"
CMDLINE = f"console=ttyS0 root={ROOT_DEVICE} rw panic=-1 quiet loglevel=3"
AGENT_PORT_NAME = "org.dovecote.agent"
# Fixed values so that two builds of the same inputs produce the same ext4 image.
FS_UUID = "5d0c0a1e-d0fe-4c07-8000-000000000001"
FS_HASH_SEED = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
SOURCE_DATE_EPOCH = 1_700_000_000

# CAs the build host's administrator added (Debian's place for them): the guest
# trusts them too, so capsules work behind the same TLS-inspecting egress proxy
# as the host. DOVECOTE_GUEST_HOST_CAS=false leaves them out.
HOST_CA_DIR = Path("/usr/local/share/ca-certificates")

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
AGENT_DIR = REPO / "vmmgr" / "guest"

INITRAMFS_INIT = r"""#!/bin/busybox sh
# Dovecote initramfs: load the virtio and ext4 modules, mount the root disk and
# hand over to /sbin/dovecote-init.
/bin/busybox mkdir -p /proc /sys /dev /newroot /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /modules.list); do
    insmod "/lib/modules/$m" || echo "dovecote-initramfs: insmod $m failed"
done
if grep -q dovecote.probe /proc/cmdline; then
    echo "DOVECOTE-PROBE-OK"
    poweroff -f
fi
root=/dev/vda
for arg in $(cat /proc/cmdline); do
    case "$arg" in root=*) root="${arg#root=}" ;; esac
done
i=0
while [ ! -b "$root" ] && [ $i -lt 200 ]; do usleep 50000; i=$((i + 1)); done
if ! mount -t ext4 -o rw "$root" /newroot; then
    echo "dovecote-initramfs: cannot mount $root"
    exec sh
fi
umount /proc /sys
mount --move /dev /newroot/dev
exec switch_root /newroot /sbin/dovecote-init
"""

GUEST_INIT = r"""#!/bin/sh
# Dovecote guest init (PID 1): mount the API filesystems, set up the network for
# QEMU user-mode networking (static: the guest is always 10.0.2.15, the host
# 10.0.2.2, the DNS forwarder 10.0.2.3), name the virtio-serial ports the way udev
# would, then run the guest agent, restarting it whenever it exits. dash reaps
# every child (waitpid(-1)), including orphans reparented to us.
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH
bb=/bin/busybox
log() { echo "dovecote-init: $*" > /dev/console; }
mountpoint -q /dev 2>/dev/null || $bb mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t tmpfs -o mode=755 tmpfs /run
mount -t tmpfs -o mode=1777 tmpfs /tmp
[ -e /dev/ptmx ] || ln -s pts/ptmx /dev/ptmx
ln -sf /proc/self/fd /dev/fd
$bb hostname capsule
# Grow the root filesystem to its disk (online; nothing to do when it fills it).
rootdev=/dev/vda
for arg in $(cat /proc/cmdline); do
    case "$arg" in root=*) rootdev="${arg#root=}" ;; esac
done
if [ -b "$rootdev" ]; then
    resize2fs "$rootdev" > /dev/null 2>&1 || log "could not grow the root filesystem on $rootdev"
fi
$bb ip link set lo up
if [ -e /sys/class/net/eth0 ]; then
    $bb ip addr add 10.0.2.15/24 dev eth0
    $bb ip link set eth0 up
    $bb ip route add default via 10.0.2.2
fi
port=/dev/virtio-ports/@PORT@
mkdir -p /dev/virtio-ports
i=0
while [ ! -e "$port" ] && [ $i -lt 100 ]; do
    for p in /sys/class/virtio-ports/*; do
        [ -r "$p/name" ] || continue
        name="$(cat "$p/name")"
        [ -n "$name" ] && ln -sf "../${p##*/}" "/dev/virtio-ports/$name"
    done
    [ -e "$port" ] || $bb usleep 50000
    i=$((i + 1))
done
# QEMU gives the agent a virtio-serial port; Cloud Hypervisor has none, the
# agent then listens on vsock port 1024 (the host relays to it).
if [ -e "$port" ]; then
    log "ready, agent port $port"; where="--device $port"
elif [ -e /dev/vsock ]; then
    log "ready, agent on vsock port 1024"; where="--listen-vsock 1024"
else
    log "ready, agent port $port MISSING"; where="--device $port"
fi
export HOME=/root LANG=C.UTF-8
while :; do
    if [ -f @AGENT@/__main__.py ]; then
        python3 -B -u @AGENT@ $where --default-user @USER@ < /dev/null > /dev/console 2>&1
        log "agent exited with status $?, restarting"
        $bb sleep 1
    else
        log "no agent installed in /opt/dovecote"
        $bb sleep 3600
    fi
done
"""


def log(message: str) -> None:
    print(f"build.py: {message}", file=sys.stderr, flush=True)


def run(*args: str | Path, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], check=True, text=True, **kwargs)  # type: ignore[call-overload]


def msgspec_dir() -> Path:
    import msgspec

    return Path(msgspec.__file__).parent


# The guest side of vmmgr/guest/ (stdlib + msgspec): protocol.py and the agent package; the rest
# (client.py, ...) is host-side Trio code. vmmgr.guest.guest_files() lists the same (this script
# does not import the project). The guest's init runs the package by path.
AGENT_PYTHON_DIR = "/opt/dovecote/python"
AGENT_PACKAGE = f"{AGENT_PYTHON_DIR}/dovecote/vmmgr/guest/agent"


def agent_files() -> list[tuple[Path, str]]:
    """(host file, path under AGENT_PYTHON_DIR) of each file the agent needs in the guest."""
    files = [(AGENT_DIR / "protocol.py", "dovecote/vmmgr/guest/protocol.py")]
    files += [(path, f"dovecote/vmmgr/guest/agent/{path.name}")
              for path in sorted((AGENT_DIR / "agent").glob("*.py"))]
    return files


def host_cas() -> list[Path]:
    """The build host's local CA certificates the guest will trust (see HOST_CA_DIR)."""
    if os.environ.get("DOVECOTE_GUEST_HOST_CAS", "true").lower() in ("0", "false", "no", "off"):
        return []
    if not HOST_CA_DIR.is_dir():
        return []
    return sorted(p for p in HOST_CA_DIR.rglob("*.crt") if p.is_file())


def _files_under(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            yield path


def input_hash() -> str:
    """The cache key: a hash of everything that goes into the image that we control."""
    h = hashlib.sha256()

    def add(label: str, data: bytes) -> None:
        h.update(f"{label}\0{len(data)}\0".encode())
        h.update(data)

    add("format", str(FORMAT_VERSION).encode())
    add("script", Path(__file__).read_bytes())
    add("config", json.dumps([SUITE, PACKAGES, KERNEL_PACKAGE, INITRAMFS_MODULES, OPTIONAL_MODULES,
                              ROOTFS_SIZE, DEFAULT_USER, DEFAULT_UID, GUEST_APT_SOURCES,
                              DPKG_NODOC]).encode())
    for path, relative in agent_files():
        add(f"agent/{relative}", path.read_bytes())
    for path in host_cas():
        add(f"ca/{path.relative_to(HOST_CA_DIR)}", path.read_bytes())
    mdir = msgspec_dir()
    for path in _files_under(mdir):
        add(f"msgspec/{path.relative_to(mdir)}", path.read_bytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------
# Kernel and modules


def fetch_kernel(work: Path) -> tuple[Path, str, str]:
    """Download and unpack the kernel package; return (unpacked root, version, package version)."""
    depends = run("apt-cache", "depends", KERNEL_PACKAGE, capture_output=True).stdout
    images = [
        line.split(":", 1)[1].strip()
        for line in depends.splitlines()
        if line.strip().startswith("Depends:") and "linux-image-" in line
    ]
    if not images:
        raise SystemExit(f"build.py: cannot resolve {KERNEL_PACKAGE} (run apt-get update?)")
    package = images[0]
    debs = work / "debs"
    debs.mkdir()
    run("apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", package, cwd=debs,
        stdout=subprocess.DEVNULL)
    (deb,) = debs.glob("*.deb")
    pkg_version = run("dpkg-deb", "-f", deb, "Version", capture_output=True).stdout.strip()
    unpacked = work / "kernel"
    run("dpkg", "-x", deb, unpacked)
    (modroot,) = (unpacked / "lib" / "modules").iterdir()
    return unpacked, modroot.name, pkg_version


def install_modules(kernel_root: Path, version: str, root: Path) -> None:
    src = kernel_root / "lib" / "modules" / version
    dst = root / "lib" / "modules" / version
    left_out = {src / tree for tree in MODULE_TREES_LEFT_OUT}

    def ignore(directory: str, names: list[str]) -> list[str]:
        return [n for n in names if Path(directory) / n in left_out]

    shutil.copytree(src, dst, ignore=ignore, symlinks=True)
    for link in ("build", "source"):
        (dst / link).unlink(missing_ok=True)
    run("chroot", root, "depmod", version)


def resolve_modules(moddir: Path, wanted: tuple[str, ...], optional: tuple[str, ...] = ()) -> list[str]:
    """Paths (relative to ``moddir``) of ``wanted`` and their dependencies, dependencies first.

    ``optional`` modules are added the same way when the kernel has them.
    """
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        by_name[_module_name(path)] = path
    builtin = {_module_name(p) for p in (moddir / "modules.builtin").read_text().split()}
    ordered: list[str] = []

    def visit(path: str) -> None:
        if path in ordered:
            return
        for dep in deps[path]:
            visit(dep)
        ordered.append(path)

    for name in wanted:
        name = name.replace("-", "_")
        if name in builtin:
            continue
        if name not in by_name:
            raise SystemExit(f"build.py: kernel module {name} not found")
        visit(by_name[name])
    for name in optional:
        name = name.replace("-", "_")
        if name in by_name and name not in builtin:
            visit(by_name[name])
    return ordered


def _module_name(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    for suffix in (".xz", ".zst", ".gz"):
        base = base.removesuffix(suffix)
    return base.removesuffix(".ko").replace("-", "_")


# ---------------------------------------------------------------------------
# Initramfs: a reproducible newc cpio, gzip-compressed


def _cpio_entry(
    out: io.BytesIO, ino: int, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
) -> None:
    fields = [ino, mode, 0, 0, 1, SOURCE_DATE_EPOCH, len(data), 0, 0, *rdev, len(name) + 1, 0]
    out.write(b"070701" + b"".join(b"%08X" % f for f in fields))
    out.write(name.encode() + b"\0")
    out.write(b"\0" * (-out.tell() % 4))
    out.write(data)
    out.write(b"\0" * (-out.tell() % 4))


def build_initramfs(root: Path, version: str, dest: Path) -> list[str]:
    moddir = root / "lib" / "modules" / version
    modules = resolve_modules(moddir, INITRAMFS_MODULES, OPTIONAL_MODULES)
    files: dict[str, tuple[int, bytes]] = {
        "init": (0o100755, INITRAMFS_INIT.encode()),
        "bin/busybox": (0o100755, (root / "bin" / "busybox").read_bytes()),
    }
    names = []
    for rel in modules:
        data = (moddir / rel).read_bytes()
        if rel.endswith(".xz"):
            data = lzma.decompress(data)
        name = rel.rsplit("/", 1)[-1].removesuffix(".xz")
        files[f"lib/modules/{name}"] = (0o100644, data)
        names.append(name)
    files["modules.list"] = (0o100644, ("\n".join(names) + "\n").encode())
    dirs = ["bin", "dev", "lib", "lib/modules", "newroot", "proc", "sys"]
    out = io.BytesIO()
    ino = 1
    for d in dirs:
        _cpio_entry(out, ino, d, stat.S_IFDIR | 0o755)
        ino += 1
    # The kernel opens /dev/console for /init before anything is mounted.
    _cpio_entry(out, ino, "dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))
    ino += 1
    for name in sorted(files):
        mode, data = files[name]
        _cpio_entry(out, ino, name, mode, data)
        ino += 1
    _cpio_entry(out, 0, "TRAILER!!!", 0)
    with open(dest, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, compresslevel=6) as gz:
        gz.write(out.getvalue())
    return names


# ---------------------------------------------------------------------------
# Root filesystem


def add_default_user(root: Path) -> None:
    """``wrenn-user``: a login shell, a home, passwordless sudo."""
    env = dict(os.environ, SOURCE_DATE_EPOCH=str(SOURCE_DATE_EPOCH))
    run("chroot", root, "useradd", "--create-home", "--shell", "/bin/bash", "--uid", str(DEFAULT_UID),
        "--user-group", DEFAULT_USER, env=env)
    sudoers = root / "etc" / "sudoers.d" / DEFAULT_USER
    sudoers.write_text(f"{DEFAULT_USER} ALL=(ALL:ALL) NOPASSWD: ALL\n")
    sudoers.chmod(0o440)
    run("chroot", root, "visudo", "-c", "-q", "-f", f"/etc/sudoers.d/{DEFAULT_USER}")


def customize_rootfs(root: Path) -> list[str]:
    init = root / "sbin" / "dovecote-init"
    init.write_text(GUEST_INIT.replace("@PORT@", AGENT_PORT_NAME).replace("@USER@", DEFAULT_USER)
                    .replace("@AGENT@", AGENT_PACKAGE))
    init.chmod(0o755)
    python_dir = root / AGENT_PYTHON_DIR.lstrip("/")
    copied = []
    for path, relative in agent_files():
        (python_dir / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, python_dir / relative)
        copied.append(relative)
    shutil.copytree(
        msgspec_dir(),
        root / "usr" / "lib" / "python3" / "dist-packages" / "msgspec",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    (root / "etc" / "hostname").write_text("capsule\n")
    (root / "etc" / "hosts").write_text("127.0.0.1\tlocalhost\n127.0.1.1\tcapsule\n::1\tlocalhost\n")
    (root / "etc" / "resolv.conf").unlink(missing_ok=True)
    (root / "etc" / "resolv.conf").write_text("nameserver 10.0.2.3\n")
    (root / "etc" / "machine-id").write_text("")
    mtab = root / "etc" / "mtab"
    if not mtab.is_symlink() and not mtab.exists():
        mtab.symlink_to("../proc/self/mounts")  # resize2fs looks for the mounted root there
    add_default_user(root)
    # A sandbox, not a system to keep tidy: pip installs (to ~/.local as a user) without
    # --break-system-packages.
    for marker in (root / "usr" / "lib").glob("python3*/EXTERNALLY-MANAGED"):
        marker.unlink()
    (root / "etc" / "apt" / "sources.list").unlink(missing_ok=True)
    (root / "etc" / "apt" / "sources.list.d" / "debian.sources").write_text(GUEST_APT_SOURCES)
    (root / "etc" / "dpkg" / "dpkg.cfg.d" / "dovecote-nodoc").write_text(DPKG_NODOC)
    cas = host_cas()
    if cas:
        target = root / "usr" / "local" / "share" / "ca-certificates" / "dovecote-host"
        target.mkdir(parents=True, exist_ok=True)
        for path in cas:
            shutil.copyfile(path, target / path.name)
        run("chroot", root, "update-ca-certificates", capture_output=True)
        log(f"the guest trusts the host's local CAs: {', '.join(p.name for p in cas)}")
    for junk in ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale",
                 "var/cache/apt", "var/lib/apt/lists"):
        target = root / junk
        if target.exists():
            shutil.rmtree(target)
            target.mkdir(mode=0o755)
    for partial in ("var/cache/apt/archives/partial", "var/lib/apt/lists/partial"):
        (root / partial).mkdir(parents=True, exist_ok=True)
    for path in sorted((root / "var" / "log").rglob("*")):  # keep the directories dpkg and apt expect
        if path.is_file() or path.is_symlink():
            path.unlink()
    return copied


def make_image(root: Path, dest: Path, work: Path) -> None:
    raw = work / "rootfs.raw"
    env = dict(os.environ, E2FSPROGS_FAKE_TIME=str(SOURCE_DATE_EPOCH))
    run("mke2fs", "-q", "-F", "-t", "ext4", "-L", "dovecote-root", "-U", FS_UUID,
        "-E", f"hash_seed={FS_HASH_SEED},root_owner=0:0", "-d", root, raw, ROOTFS_SIZE,
        env=env, stdout=subprocess.DEVNULL)
    run("qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", raw, dest)
    raw.unlink()


# ---------------------------------------------------------------------------


def build(out: Path, work: Path, mirror: str, digest: str) -> None:
    started = time.monotonic()
    root = work / "root"
    log(f"debootstrap {SUITE} ({', '.join(PACKAGES)}) from {mirror}")
    run("debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, root, mirror,
        stdout=subprocess.DEVNULL)
    log("kernel")
    kernel_root, version, pkg_version = fetch_kernel(work)
    shutil.copy2(kernel_root / "boot" / f"vmlinuz-{version}", out / "vmlinuz")
    install_modules(kernel_root, version, root)
    shutil.rmtree(kernel_root)
    log("initramfs")
    modules = build_initramfs(root, version, out / "initrd.img")
    log("root filesystem")
    agents = customize_rootfs(root)
    used_mib = _tree_mib(root)
    log(f"root filesystem holds {used_mib} MiB")
    make_image(root, out / "rootfs.qcow2", work)
    manifest = {
        "format": FORMAT_VERSION,
        "hash": digest,
        "suite": SUITE,
        "packages": list(PACKAGES),
        "kernel_package": f"linux-image-{version}={pkg_version}",
        "kernel_version": version,
        "initramfs_modules": modules,
        "cmdline": CMDLINE,
        "root_device": ROOT_DEVICE,
        "agent_port": AGENT_PORT_NAME,
        "agent_files": agents,
        "default_user": DEFAULT_USER,
        "host_cas": [p.name for p in host_cas()],
        "rootfs_used_mib": used_mib,
        "kernel": "vmlinuz",
        "initrd": "initrd.img",
        "rootfs": "rootfs.qcow2",
        "rootfs_format": "qcow2",
        "build_seconds": round(time.monotonic() - started, 1),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    for path in out.iterdir():
        path.chmod(0o644)


def _tree_mib(root: Path) -> int:
    total = 0
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            total += path.lstat().st_blocks * 512
    return total // (1024 * 1024)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def ensure_image(cache_dir: Path, mirror: str = DEFAULT_MIRROR, force: bool = False) -> Path:
    """Return the artifact directory for the current inputs, building it if needed."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    cache_dir.chmod(cache_dir.stat().st_mode | 0o055)  # libvirt's QEMU user reads the images
    digest = input_hash()
    final = cache_dir / f"guest-{digest[:16]}"
    with locked(cache_dir / f".guest-{digest[:16]}.lock"):
        if final.is_dir() and not force:
            return final
        if os.geteuid() != 0:
            raise SystemExit("build.py: building the guest image needs root (debootstrap, chroot)")
        work = Path(tempfile.mkdtemp(prefix=f".build-{digest[:16]}-", dir=cache_dir))
        try:
            out = work / "artifacts"
            out.mkdir(mode=0o755)
            build(out, work, mirror, digest)
            if final.exists():
                shutil.rmtree(final)
            os.rename(out, final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return final


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", type=Path, required=True)
    parser.add_argument("--mirror", default=os.environ.get("DOVECOTE_DEBIAN_MIRROR", DEFAULT_MIRROR))
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    parser.add_argument("--print-hash", action="store_true", help="print the input hash and exit")
    args = parser.parse_args(argv)
    if args.print_hash:
        print(input_hash())
        return 0
    print(ensure_image(args.cache_dir.resolve(), args.mirror, args.force))
    return 0


if __name__ == "__main__":
    sys.exit(main())
