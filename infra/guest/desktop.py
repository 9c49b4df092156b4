#!/usr/bin/env python3
"""Build the Dovecote *desktop* guest image: the capsule image plus X.Org on the VM's display.

    python infra/guest/desktop.py --cache-dir DIR      # prints the artifact directory

The desktop image is the capsule image of ``build.py`` (same Debian suite,
kernel, busybox initramfs, guest agent, init) with, on top:

- X.Org (``xserver-xorg-core``, its built-in ``modesetting`` driver, no
  acceleration) on the VM's own display: QEMU's standard VGA, driven by the
  kernel's ``bochs`` DRM driver (``virtio_gpu`` is kept too). Only those DRM
  modules and their dependencies are copied from ``kernel/drivers/gpu`` (the
  capsule image leaves the whole tree out);
- openbox, xterm, mousepad (the text editor), pcmanfm (the file manager),
  Chromium, xdotool, scrot, xrandr/xdpyinfo/xprop, DejaVu fonts, a D-Bus
  session bus; installed with ``--no-install-recommends`` and no documentation;
- the desktop user ``dove`` (uid 1000, home ``/home/dove``, runtime dir
  ``/run/user/1000``, passwordless sudo): the guest agent's default user, so
  commands that name no user run as ``dove``;
- autologin straight into X: the init starts ``/opt/dovecote/desktop-session``
  (root) next to the agent. It loads the DRM driver, runs Xorg on ``:0`` (as
  root: there is no logind to hand the DRM device to a user) and, as ``dove``,
  a D-Bus session bus at ``/run/user/1000/bus`` and openbox; each is restarted
  if it exits. ``/run/dovecote-desktop.ready`` appears once X answers. The
  agent runs with ``DISPLAY=:0``, ``XDG_RUNTIME_DIR`` and
  ``DBUS_SESSION_BUS_ADDRESS`` set, so every command it runs (as ``dove``)
  reaches the desktop.

The builder reuses ``build.py``'s functions (loaded as a module; its constants
for the user, the root filesystem size, the init and the module trees are set
for this variant in that module object only). ``build.py`` itself is not
changed by this variant: the capsule image keeps its hash. The desktop
image's hash covers ``build.py``'s inputs, this file and its package lists;
it is cached as ``DIR/desktop-<hash>/`` under a lock like the capsule image,
and its build prints the same ``build.py: ...`` progress lines.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent


def _load_builder() -> ModuleType:
    spec = importlib.util.spec_from_file_location("dovecote_guest_build_desktop", HERE / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


b = _load_builder()

FORMAT_VERSION = 1
PREFIX = "desktop"
DESKTOP_PACKAGES = (
    "xserver-xorg-core", "x11-xserver-utils", "x11-utils", "xauth",
    "openbox", "xterm", "mousepad", "pcmanfm", "chromium",
    "xdotool", "scrot", "fonts-dejavu-core",
    "dbus-daemon", "dbus-session-bus-common",
)
# The display's DRM drivers (QEMU's standard VGA is bochs; virtio-gpu for later), with their
# dependencies resolved from modules.dep, whatever tree they live in.
DRM_MODULES = ("bochs", "virtio_gpu")
DESKTOP_USER = "dove"
DESKTOP_UID = 1000
ROOTFS_SIZE = "4G"
VIDEO = "vga"
"""The libvirt video model a VM of this image needs (vmmgr reads it from the manifest)."""

XORG_CONF = """\
# Dovecote desktop: X on the VM's display (bochs DRM), no acceleration, no input devices
# (xdotool drives the core devices through XTEST), never blanked.
Section "ServerFlags"
    Option "AutoAddDevices" "false"
    Option "AutoAddGPU" "false"
    Option "DontVTSwitch" "true"
    Option "BlankTime" "0"
    Option "StandbyTime" "0"
    Option "SuspendTime" "0"
    Option "OffTime" "0"
EndSection

Section "Device"
    Identifier "display"
    Driver "modesetting"
    Option "AccelMethod" "none"
EndSection

Section "Screen"
    Identifier "screen"
    Device "display"
    DefaultDepth 24
EndSection
"""

DESKTOP_SESSION = r"""#!/bin/sh
# Dovecote desktop session (root): Xorg on the VM's display, then the desktop user's
# session bus and window manager. Each is restarted when it exits.
U=@USER@
R=@RUNTIME@
log() { echo "dovecote-desktop: $*" > /dev/console; }
mkdir -p "$R" && chown "$U:$U" "$R" && chmod 700 "$R"
i=0
while [ ! -e /dev/dri/card0 ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i + 1)); done
[ -e /dev/dri/card0 ] || log "no DRM device (/dev/dri/card0): is the VM's display missing?"
mkdir -p /tmp/.X11-unix && chmod 1777 /tmp/.X11-unix
rm -f /tmp/.X0-lock /tmp/.X11-unix/X0
(
    while :; do
        /usr/lib/xorg/Xorg :0 vt7 -nolisten tcp -noreset -novtswitch -logfile /var/log/Xorg.0.log \
            > /dev/null 2>&1
        log "Xorg exited with status $?, restarting"
        rm -f /tmp/.X0-lock /tmp/.X11-unix/X0 /run/dovecote-desktop.ready
        sleep 1
    done
) &
i=0
until DISPLAY=:0 xdpyinfo > /dev/null 2>&1; do
    sleep 0.1; i=$((i + 1))
    [ $i -lt 600 ] || { log "X did not answer within 60 s"; exit 1; }
done
DISPLAY=:0 xhost +SI:localuser:"$U" > /dev/null 2>&1
export DISPLAY=:0 XDG_RUNTIME_DIR="$R" DBUS_SESSION_BUS_ADDRESS="unix:path=$R/bus"
(
    while :; do
        runuser -u "$U" -- dbus-daemon --session --address="$DBUS_SESSION_BUS_ADDRESS" --nofork \
            --nopidfile > /dev/null 2>&1
        sleep 1
    done
) &
(
    while :; do
        runuser -u "$U" -- sh -c 'cd "$HOME" && exec openbox' > /dev/null 2>&1
        sleep 1
    done
) &
touch /run/dovecote-desktop.ready
log "desktop ready on :0 for $U"
wait
"""

# Inserted into build.py's init right before the agent loop.
INIT_DESKTOP = """\
# The desktop (infra/guest/desktop.py): the display's DRM driver, X and the session.
modprobe -q bochs 2>/dev/null || log "could not load the bochs DRM driver"
modprobe -q virtio_gpu 2>/dev/null
/opt/dovecote/desktop-session < /dev/null > /dev/console 2>&1 &
export DISPLAY=:0 XDG_RUNTIME_DIR=@RUNTIME@ DBUS_SESSION_BUS_ADDRESS=unix:path=@RUNTIME@/bus
"""
INIT_ANCHOR = "export HOME=/root LANG=C.UTF-8\n"


def log(message: str) -> None:
    print(f"build.py: {message}", file=sys.stderr, flush=True)


def runtime_dir() -> str:
    return f"/run/user/{DESKTOP_UID}"


def input_hash() -> str:
    """The capsule image's inputs, this variant's script and its configuration."""
    h = hashlib.sha256()
    for label, data in (
        ("base", b.input_hash().encode()),
        ("format", str(FORMAT_VERSION).encode()),
        ("script", Path(__file__).read_bytes()),
        ("config", json.dumps([DESKTOP_PACKAGES, DRM_MODULES, DESKTOP_USER, DESKTOP_UID, ROOTFS_SIZE,
                               VIDEO]).encode()),
    ):
        h.update(f"{label}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def configure_builder() -> None:
    """Set ``build.py``'s constants for this variant (in the loaded module object only)."""
    b.DEFAULT_USER = DESKTOP_USER
    b.DEFAULT_UID = DESKTOP_UID
    b.ROOTFS_SIZE = ROOTFS_SIZE
    if INIT_ANCHOR not in b.GUEST_INIT:
        raise SystemExit("build.py: the capsule init changed; update desktop.py's INIT_ANCHOR")
    b.GUEST_INIT = b.GUEST_INIT.replace(
        INIT_ANCHOR, INIT_DESKTOP.replace("@RUNTIME@", runtime_dir()) + INIT_ANCHOR)


@contextlib.contextmanager
def chroot_mounts(root: Path) -> Iterator[None]:
    """/proc in the chroot while packages install (some postinsts need it).

    Never the host's /dev or /sys: postinsts (systemd-tmpfiles' static nodes, say)
    would change the host's device nodes with the chroot's groups (it happened:
    /dev/kvm got the chroot's ``kvm`` gid, and libvirt re-probed QEMU forever).
    debootstrap's own /dev nodes in the chroot are enough.
    """
    mounted: list[Path] = []
    try:
        path = root / "proc"
        path.mkdir(exist_ok=True)
        b.run("mount", "-t", "proc", "proc", path)
        mounted.append(path)
        yield
    finally:
        for path in reversed(mounted):
            subprocess.run(["umount", "-l", str(path)], check=False)


def install_desktop_packages(root: Path) -> None:
    policy = root / "usr" / "sbin" / "policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")  # no daemon starts inside the build
    policy.chmod(0o755)
    (root / "etc" / "dpkg" / "dpkg.cfg.d" / "dovecote-nodoc").write_text(b.DPKG_NODOC)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", LANG="C.UTF-8", SYSTEMD_OFFLINE="1")
    env.pop("LC_ALL", None)
    with chroot_mounts(root):
        b.run("chroot", root, "apt-get", "-q", "update", env=env, stdout=subprocess.DEVNULL)
        b.run("chroot", root, "apt-get", "-q", "-y", "--no-install-recommends", "install",
              *DESKTOP_PACKAGES, env=env, stdout=subprocess.DEVNULL)
        b.run("chroot", root, "apt-get", "clean", env=env)
    policy.unlink()


def install_drm_modules(kernel_root: Path, version: str, root: Path) -> list[str]:
    """The kernel's modules as the capsule image has them, plus the DRM drivers and their
    dependencies (``kernel/drivers/gpu`` and ``kernel/drivers/video`` are copied, the
    dependency closure of :data:`DRM_MODULES` is resolved, the rest of those trees removed)."""
    kept_trees = ("kernel/drivers/gpu", "kernel/drivers/video")
    b.MODULE_TREES_LEFT_OUT = tuple(t for t in b.MODULE_TREES_LEFT_OUT if t not in kept_trees)
    b.install_modules(kernel_root, version, root)  # runs depmod in the chroot
    moddir = root / "lib" / "modules" / version
    wanted = b.resolve_modules(moddir, DRM_MODULES)
    keep = {moddir / rel for rel in wanted}
    for tree in kept_trees:
        for path in sorted((moddir / tree).rglob("*.ko*")):
            if path not in keep:
                path.unlink()
    b.run("chroot", root, "depmod", version)
    return wanted


def customize_desktop(root: Path) -> None:
    conf = root / "etc" / "X11" / "xorg.conf.d"
    conf.mkdir(parents=True, exist_ok=True)
    (conf / "10-dovecote.conf").write_text(XORG_CONF)
    session = root / "opt" / "dovecote" / "desktop-session"
    session.write_text(DESKTOP_SESSION.replace("@USER@", DESKTOP_USER).replace("@RUNTIME@", runtime_dir()))
    session.chmod(0o755)
    for name in ("hostname",):
        (root / "etc" / name).write_text("desktop\n")
    (root / "etc" / "hosts").write_text("127.0.0.1\tlocalhost\n127.0.1.1\tdesktop\n::1\tlocalhost\n")
    home = root / "home" / DESKTOP_USER
    for sub in ("Desktop", "Documents", ".config/openbox"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    # Chromium as the desktop user, software rendering, no first-run dialogs.
    flags = root / "etc" / "chromium.d" / "dovecote"
    flags.parent.mkdir(parents=True, exist_ok=True)
    flags.write_text('export CHROMIUM_FLAGS="$CHROMIUM_FLAGS --no-first-run --disable-gpu '
                     '--no-default-browser-check --password-store=basic"\n')
    b.run("chroot", root, "chown", "-R", f"{DESKTOP_USER}:{DESKTOP_USER}", f"/home/{DESKTOP_USER}")


def build(out: Path, work: Path, mirror: str, digest: str) -> None:
    started = time.monotonic()
    configure_builder()
    root = work / "root"
    log(f"debootstrap {b.SUITE} ({', '.join(b.PACKAGES)}) from {mirror}")
    b.run("debootstrap", "--variant=minbase", f"--include={','.join(b.PACKAGES)}", b.SUITE, root, mirror,
          stdout=subprocess.DEVNULL)
    log(f"desktop packages ({', '.join(DESKTOP_PACKAGES)})")
    install_desktop_packages(root)
    log("kernel")
    kernel_root, version, pkg_version = b.fetch_kernel(work)
    shutil.copy2(kernel_root / "boot" / f"vmlinuz-{version}", out / "vmlinuz")
    drm = install_drm_modules(kernel_root, version, root)
    shutil.rmtree(kernel_root)
    log("initramfs")
    modules = b.build_initramfs(root, version, out / "initrd.img")
    log("root filesystem")
    agents = b.customize_rootfs(root)
    customize_desktop(root)
    used_mib = b._tree_mib(root)
    log(f"root filesystem holds {used_mib} MiB")
    b.make_image(root, out / "rootfs.qcow2", work)
    manifest = {
        "format": b.FORMAT_VERSION,
        "variant": PREFIX,
        "hash": digest,
        "suite": b.SUITE,
        "packages": [*b.PACKAGES, *DESKTOP_PACKAGES],
        "kernel_package": f"linux-image-{version}={pkg_version}",
        "kernel_version": version,
        "initramfs_modules": modules,
        "drm_modules": drm,
        "cmdline": b.CMDLINE,
        "root_device": b.ROOT_DEVICE,
        "agent_port": b.AGENT_PORT_NAME,
        "agent_files": agents,
        "default_user": DESKTOP_USER,
        "desktop_user": DESKTOP_USER,
        "desktop_home": f"/home/{DESKTOP_USER}",
        "desktop_runtime_dir": runtime_dir(),
        "display": ":0",
        "video": VIDEO,
        "host_cas": [p.name for p in b.host_cas()],
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
    log(f"desktop image built in {manifest['build_seconds']} s ({used_mib} MiB)")


def ensure_image(cache_dir: Path, mirror: str = b.DEFAULT_MIRROR, force: bool = False) -> Path:
    """Return the desktop image's artifact directory for the current inputs, building it if needed."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    cache_dir.chmod(cache_dir.stat().st_mode | 0o055)  # libvirt's QEMU user reads the images
    digest = input_hash()
    final = cache_dir / f"{PREFIX}-{digest[:16]}"
    with b.locked(cache_dir / f".{PREFIX}-{digest[:16]}.lock"):
        if final.is_dir() and not force:
            return final
        if os.geteuid() != 0:
            raise SystemExit("build.py: building the desktop image needs root (debootstrap, chroot)")
        work = Path(tempfile.mkdtemp(prefix=f".build-{PREFIX}-{digest[:16]}-", dir=cache_dir))
        try:
            out = work / "artifacts"
            out.mkdir(mode=0o755)
            build(out, work, mirror, digest)
            if final.exists():
                shutil.rmtree(final)
            os.rename(out, final)
        finally:
            mounts = [work / "root" / name for name in ("proc", "sys", "dev")]
            for mount in mounts:
                if os.path.ismount(mount):
                    subprocess.run(["umount", "-l", str(mount)], check=False)
            if any(os.path.ismount(mount) for mount in mounts):  # never rmtree through a bind mount
                log(f"{work} still has mounts; left in place")
            else:
                shutil.rmtree(work, ignore_errors=True)
    return final


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", type=Path, required=True)
    parser.add_argument("--mirror", default=os.environ.get("DOVECOTE_DEBIAN_MIRROR", b.DEFAULT_MIRROR))
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
