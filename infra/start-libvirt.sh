#!/usr/bin/env bash
# Start the system libvirt daemons (virtlogd, libvirtd) if they are not running,
# and wait until libvirtd answers on its socket. Idempotent; needs root.
#
#   infra/start-libvirt.sh            # exits 0 once qemu:///system answers
#
# On a machine booted with systemd the units are started instead; in containers
# and CI (no systemd) the daemons are started directly with -d. Install the
# packages first with infra/system-deps.sh.
set -euo pipefail

socket=/run/libvirt/libvirt-sock
timeout="${DOVECOTE_LIBVIRT_TIMEOUT:-30}"
log() { printf 'start-libvirt.sh: %s\n' "$*" >&2; }

answers() { virsh -q -c qemu:///system uri >/dev/null 2>&1; }

# Without udev (containers), /dev/kvm stays root:root 0600. libvirtd probes
# QEMU's capabilities as root (KVM found) but then checks the device as its QEMU
# user (KVM not usable), decides its capability cache is outdated and probes
# again on every call: starting a domain then takes a minute. Apply udev's own
# rule (group kvm, mode 0660; Debian's libvirt-qemu user is in group kvm). This
# does not make Dovecote use KVM: vmmgr/accel.py decides that with a boot probe.
if [ "$(id -u)" -eq 0 ] && [ -c /dev/kvm ] && getent group kvm >/dev/null && [ "$(stat -c %G /dev/kvm)" = root ]; then
    chgrp kvm /dev/kvm && chmod 0660 /dev/kvm
fi

if answers; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    log "libvirtd is not running and starting it needs root"
    exit 1
fi
for tool in libvirtd virtlogd virsh; do
    command -v "$tool" >/dev/null 2>&1 || { log "$tool is missing: run infra/system-deps.sh"; exit 1; }
done

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }


if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    systemctl start virtlogd.socket libvirtd.socket libvirtd.service >&2 || true
else
    running /run/virtlogd.pid || virtlogd -d
    # libvirtd double-forks QEMU, so an exited QEMU is reaped by the nearest child
    # subreaper above it, else by PID 1, and libvirt waits for that reap before a
    # destroy returns. Without systemd, PID 1 may be a container's init that reaps
    # about once a second: every VM destroy (a pause's release, a delete) then took
    # 1.2-1.7 s. Under `tini -s` (a subreaper that reaps at once) it takes ms.
    if ! running /run/libvirtd.pid; then
        if command -v tini >/dev/null 2>&1 && mkdir -p /var/log/libvirt; then
            setsid tini -s -- libvirtd </dev/null >>/var/log/libvirt/dovecote-libvirtd.log 2>&1 &
        else
            libvirtd -d
        fi
    fi
fi

deadline=$((SECONDS + timeout))
until [ -S "$socket" ] && answers; do
    if [ "$SECONDS" -ge "$deadline" ]; then
        log "libvirtd did not answer on $socket within ${timeout}s"
        exit 1
    fi
    sleep 0.2
done
