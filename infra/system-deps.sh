#!/usr/bin/env bash
# Debian packages the suite needs on the host, installed once (as root).
# Quiet and idempotent: does nothing when every package is present, prints one
# line when it installs some, and apt's own output only when a step fails.
set -euo pipefail
packages=(
    docker-compose
    # capsule VMs: QEMU, libvirt (libvirt-python builds against libvirt-dev),
    # and the guest image builder (infra/guest/build.py)
    qemu-system-x86 qemu-utils libvirt-daemon-system libvirt-clients
    libvirt-dev pkg-config gcc python3-dev
    debootstrap e2fsprogs
    # a child subreaper for libvirtd where PID 1 is not systemd (infra/start-libvirt.sh)
    tini
    # the capsule network guard (vmmgr/netguard.py): without nft, creates are refused
    nftables
    # desktop sessions, xvfb provider (services/desktops/xvfb.py): a sandboxed X
    # display with a window manager, input, screenshots and a few GUI apps
    xvfb openbox xdotool x11-utils x11-xserver-utils imagemagick bubblewrap
    mousepad xterm pcmanfm
    # the live desktop view (gateway/routes/live_view.py): noVNC's page and assets,
    # and the headless browser its tests open it with
    novnc chromium
)
missing=()
for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
    echo "dovecote: please install: ${missing[*]} (sudo apt-get install ${missing[*]})" >&2
    exit 0
fi
echo "dovecote: installing Debian packages: ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
# apt and dpkg talk a lot even with -qq (debconf notes, "Selecting previously
# unselected package", triggers): keep it all, and show it only if a step fails.
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
for step in "update" "install -y --no-install-recommends ${missing[*]}"; do
    # shellcheck disable=SC2086  # the step is split into apt-get's arguments on purpose
    if ! apt-get -q $step </dev/null >>"$log" 2>&1; then
        cat "$log" >&2
        echo "dovecote: apt-get $step failed (its output is above)" >&2
        exit 1
    fi
done
