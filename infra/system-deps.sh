#!/usr/bin/env bash
# Debian packages the suite needs on the host, installed once (as root).
# Quiet and idempotent: does nothing when every package is present.
set -euo pipefail
packages=(
    docker-compose
    # capsule VMs: QEMU, libvirt (libvirt-python builds against libvirt-dev),
    # and the guest image builder (infra/guest/build.py)
    qemu-system-x86 qemu-utils libvirt-daemon-system libvirt-clients
    libvirt-dev pkg-config gcc python3-dev
    debootstrap e2fsprogs
    # the capsule network guard (vmmgr/netguard.py): without nft, creates are refused
    nftables
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
apt-get update -qq >&2
apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
