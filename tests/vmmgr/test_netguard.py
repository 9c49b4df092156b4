"""The capsule network guard on the host's real nftables (root, ``nft``).

Each test loads the guard's rules into a table of its own, for a uid no
process of the machine uses, so a running vmmgr's table is left alone. The
guard must reject that uid's traffic to every local address and touch
nothing else: the host's own loopback keeps refusing closed ports at once and
closes connections without leaving sockets in LAST-ACK.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import pytest

from dovecote.vmmgr import netguard
from tests.helpers.suite import free_port

GUARDED_UID = 64_999  # no account on the machine; processes get it from setuid


@pytest.fixture
def guard() -> Iterator[str]:
    assert os.geteuid() == 0, "the guard is installed as root (as vmmgr does); run the tests as root"
    assert netguard.nft_binary() is not None, "nft is missing: infra/system-deps.sh installs nftables"
    table = f"dc_test_{uuid.uuid4().hex[:8]}"
    netguard.install(GUARDED_UID, table=table)
    try:
        yield table
    finally:
        netguard.remove(table=table)


def _host_addresses() -> list[str]:
    out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, check=True).stdout
    return [a for a in out.split() if not a.startswith("fe80")]


def _states(port: int) -> list[str]:
    """TCP states of the sockets on ``port`` (local or remote), from /proc/net/tcp{,6}."""
    names = {"01": "ESTABLISHED", "06": "TIME_WAIT", "08": "CLOSE_WAIT", "09": "LAST_ACK",
             "0A": "LISTEN", "04": "FIN_WAIT1", "05": "FIN_WAIT2", "0B": "CLOSING"}
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                local, remote, state = fields[1], fields[2], fields[3]
                if int(local.rsplit(":", 1)[1], 16) == port or int(remote.rsplit(":", 1)[1], 16) == port:
                    found.append(names.get(state, state))
    return found


def test_the_host_still_gets_refused_at_once_on_a_closed_port(guard: str) -> None:
    for family, address in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        port = free_port()
        began = time.monotonic()
        with socket.socket(family) as s, pytest.raises(ConnectionRefusedError):
            s.settimeout(5)
            s.connect((address, port))
        assert time.monotonic() - began < 1.0


def test_no_socket_lingers_in_last_ack_when_the_host_closes_connections(guard: str) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(64)
        port = server.getsockname()[1]
        for _ in range(40):
            client = socket.create_connection(("127.0.0.1", port), timeout=5)
            accepted, _ = server.accept()
            client.sendall(b"x")
            assert accepted.recv(1) == b"x"
            client.close()  # the client closes first: its final ACK comes from TIME-WAIT
            accepted.recv(1)
            accepted.close()
        deadline = time.monotonic() + 3
        while "LAST_ACK" in _states(port) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "LAST_ACK" not in _states(port), _states(port)


PROBE = """
import socket, sys
results = []
for host, port in zip(sys.argv[1::2], sys.argv[2::2]):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family)
    s.settimeout(3)
    try:
        s.connect((host, int(port)))
        results.append("open")
    except OSError as exc:
        results.append(type(exc).__name__)
    s.close()
print(" ".join(results))
"""


def _probe_as(uid: int | None, targets: list[tuple[str, int]]) -> list[str]:
    def drop() -> None:
        if uid is not None:
            os.setgid(uid)
            os.setuid(uid)

    # The system's Python: the venv's interpreter may sit under root's home.
    python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    argv = [python, "-c", PROBE] + [str(x) for t in targets for x in t]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True,
                         preexec_fn=drop).stdout
    return out.split()


def test_the_guarded_user_reaches_no_address_of_the_host(guard: str) -> None:
    listeners = []
    targets: list[tuple[str, int]] = []
    try:
        for family, address in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
            s = socket.socket(family)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind((address, 0))
            s.listen(16)
            listeners.append(s)
        v4, v6 = (s.getsockname()[1] for s in listeners)
        targets = [("127.0.0.1", v4), ("::1", v6)]
        targets += [(a, v6 if ":" in a else v4) for a in _host_addresses()]
        # The host itself reaches every one of them...
        assert _probe_as(None, targets) == ["open"] * len(targets)
        # ...the guarded user none: refused at once, not left to time out.
        began = time.monotonic()
        assert _probe_as(GUARDED_UID, targets) == ["ConnectionRefusedError"] * len(targets)
        assert time.monotonic() - began < 10
    finally:
        for s in listeners:
            s.close()


def test_the_rules_match_the_qemu_user_positively() -> None:
    rules = netguard.ruleset(107, ["10.0.0.53", "fd00::53"], table="t")
    assert "meta skuid 107 jump capsule" in rules
    assert "!=" not in rules  # packets without a socket must never reach the rejects
    assert "ip daddr { 10.0.0.53 } udp dport 53 accept" in rules
    assert "ip6 daddr { fd00::53 } tcp dport 53 accept" in rules


def test_a_missing_nft_is_an_error_naming_the_cause() -> None:
    with pytest.raises(netguard.NetguardError, match="nft is not installed"):
        netguard.install(GUARDED_UID, nft="/nonexistent/nft", table="dc_never")
