"""Keep capsules away from the host's services and private networks (nftables).

Capsules use QEMU's user-mode networking: the guest's connections are made by
the QEMU process on the host, as libvirt's unprivileged QEMU user. That lets
the guest reach the internet without any bridge between capsules, but also
lets it reach whatever listens on the host (10.0.2.2 is the host's loopback)
and the host's private networks (cloud metadata at 169.254.169.254, other
machines of the installation).

So vmmgr installs one nftables table, ``inet dovecote_capsules``. Its output
chain sends the packets whose socket belongs to the QEMU user, and only those
(``meta skuid <uid> jump capsule``), to a chain that rejects:

* any destination that is an address of this host (``fib daddr type local``:
  loopback, every address of every interface, libvirt's bridge included, IPv4
  and IPv6), and broadcast/multicast;
* private, shared, link-local and unique-local ranges (RFC 1918, RFC 6598,
  169.254/16 with cloud metadata, fc00::/7, fe80::/10).

The uid is matched positively on purpose. Packets with no owning socket (the
kernel's RST for a closed port, the final ACK of a socket in TIME-WAIT, the
retransmits of an orphaned socket) have no ``skuid``: a rule written as
``meta skuid != <uid> accept`` lets them fall through to the rejects, which
broke the host's own loopback (connections to a closed port hung instead of
being refused, closed server sockets piled up in LAST-ACK). The host's own
traffic never enters the ``capsule`` chain.

The host's configured DNS servers stay reachable on port 53 (slirp forwards
the guest's DNS to them, and in clouds they are often private addresses).
The table is replaced as a whole on every start and removed by nobody: it
only concerns QEMU processes.

Isolation fails closed: when the table cannot be installed (no ``nft``, not
root, rules refused), vmmgr refuses to create or resume capsules (503
``isolation_unavailable``) unless the operator turned the guard off with
``DOVECOTE_VM_NETGUARD=false``; ``/healthz`` shows ``netguard`` either way.
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
from pathlib import Path

from dovecote.vmmgr.errors import VmmgrError

TABLE = "dovecote_capsules"
PRIVATE_V4 = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "169.254.0.0/16")
PRIVATE_V6 = ("fc00::/7", "fe80::/10")


class NetguardError(VmmgrError):
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


def ruleset(uid: int, dns: list[str], *, table: str = TABLE) -> str:
    """The nft script for QEMU's ``uid`` (replaces the whole ``table``)."""
    v4_dns = [a for a in dns if ipaddress.ip_address(a).version == 4]
    v6_dns = [a for a in dns if ipaddress.ip_address(a).version == 6]
    lines = [
        f"table inet {table}",
        f"delete table inet {table}",
        f"table inet {table} {{",
        "  chain output {",
        "    type filter hook output priority 0; policy accept;",
        f"    meta skuid {uid} jump capsule",
        "  }",
        "  chain capsule {",
    ]
    for family, addresses in (("ip", v4_dns), ("ip6", v6_dns)):
        if addresses:
            joined = ", ".join(addresses)
            lines.append(f"    {family} daddr {{ {joined} }} udp dport 53 accept")
            lines.append(f"    {family} daddr {{ {joined} }} tcp dport 53 accept")
    lines += [
        "    fib daddr type { local, broadcast, multicast } reject",
        f"    ip daddr {{ {', '.join(PRIVATE_V4)} }} reject",
        f"    ip6 daddr {{ {', '.join(PRIVATE_V6)} }} reject",
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def nft_binary(name: str = "nft") -> str | None:
    """The path of ``nft`` (``name`` may be a path), or None when it is not installed."""
    if "/" in name:
        return name if Path(name).is_file() else None
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def install(uid: int, *, nft: str = "nft", table: str = TABLE) -> None:
    """Install (or replace) the table for QEMU's ``uid`` (blocking).

    Raises:
        NetguardError: no ``nft``, not permitted, or a rule refused.
    """
    binary = nft_binary(nft)
    if binary is None:
        raise NetguardError(f"nft is not installed ({nft!r} not found; infra/system-deps.sh installs it)")
    result = subprocess.run([binary, "-f", "-"], input=ruleset(uid, nameservers(), table=table), text=True,
                            capture_output=True, check=False, timeout=30)
    if result.returncode != 0:
        raise NetguardError(f"nft refused the rules: {result.stderr.strip()[:500]}")


def remove(*, nft: str = "nft", table: str = TABLE) -> None:
    """Delete ``table`` if it exists (blocking; for tests and tools)."""
    binary = nft_binary(nft)
    if binary is not None:
        subprocess.run([binary, "delete", "table", "inet", table], capture_output=True,
                       check=False, timeout=30)
