"""Keep capsules away from the host's services and private networks (nftables).

Capsules use QEMU's user-mode networking: the guest's connections are made by
the QEMU process on the host, as libvirt's unprivileged QEMU user. That lets
the guest reach the internet without any bridge between capsules, but also
lets it reach whatever listens on the host (10.0.2.2 is the host's loopback)
and the host's private networks (cloud metadata at 169.254.169.254, other
machines of the installation).

So vmmgr installs one nftables table, ``inet dovecote_capsules``, whose
output chain rejects, for sockets owned by the QEMU user only:

* any destination that is an address of this host (``fib daddr type local``:
  loopback and every local interface address);
* private, shared, link-local and unique-local ranges (RFC 1918, RFC 6598,
  169.254/16, fc00::/7, fe80::/10).

The host's configured DNS servers stay reachable on port 53 (slirp forwards
the guest's DNS to them, and in clouds they are often private addresses).
The table is replaced as a whole on every start and removed by nobody: it
only concerns QEMU processes. Without root or ``nft`` it is not installed
and vmmgr logs a warning (``/healthz`` shows ``netguard``).
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
from pathlib import Path

TABLE = "dovecote_capsules"
PRIVATE_V4 = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "169.254.0.0/16")
PRIVATE_V6 = ("fc00::/7", "fe80::/10")


class NetguardError(Exception):
    """The rules could not be installed."""


def nameservers(resolv_conf: Path = Path("/etc/resolv.conf")) -> list[str]:
    """The IP addresses of the host's DNS servers."""
    found = []
    try:
        lines = resolv_conf.read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                found.append(str(ipaddress.ip_address(parts[1].split("%")[0])))
            except ValueError:
                continue
    return found


def ruleset(uid: int, dns: list[str]) -> str:
    """The nft script for QEMU's ``uid`` (replaces the whole table)."""
    v4_dns = [a for a in dns if ipaddress.ip_address(a).version == 4]
    v6_dns = [a for a in dns if ipaddress.ip_address(a).version == 6]
    lines = [
        f"table inet {TABLE}",
        f"delete table inet {TABLE}",
        f"table inet {TABLE} {{",
        "  chain output {",
        "    type filter hook output priority 0; policy accept;",
        f"    meta skuid != {uid} accept",
    ]
    for family, addresses in (("ip", v4_dns), ("ip6", v6_dns)):
        if addresses:
            joined = ", ".join(addresses)
            lines.append(f"    {family} daddr {{ {joined} }} udp dport 53 accept")
            lines.append(f"    {family} daddr {{ {joined} }} tcp dport 53 accept")
    lines += [
        "    fib daddr type local reject",
        f"    ip daddr {{ {', '.join(PRIVATE_V4)} }} reject",
        f"    ip6 daddr {{ {', '.join(PRIVATE_V6)} }} reject",
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def install(uid: int) -> None:
    """Install (or replace) the table for QEMU's ``uid`` (blocking).

    Raises:
        NetguardError: no ``nft``, not permitted, or a rule refused.
    """
    nft = shutil.which("nft") or shutil.which("nft", path="/usr/sbin:/sbin")
    if nft is None:
        raise NetguardError("nft is not installed")
    result = subprocess.run([nft, "-f", "-"], input=ruleset(uid, nameservers()), text=True,
                            capture_output=True, check=False, timeout=30)
    if result.returncode != 0:
        raise NetguardError(f"nft refused the rules: {result.stderr.strip()[:500]}")
