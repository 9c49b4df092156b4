"""CURVE keys and the broker's ZAP policy.

Across machines the broker's sockets are CURVE servers.  The broker answers
ZAP (ZeroMQ authentication protocol) requests itself, in its poll loop, from
an allow-list of client public keys; no extra thread.  Keys are handled as z85
text (40 characters) so they fit in env vars and config files.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import zmq
from zmq.utils import z85

from .errors import CurveError


@dataclass(frozen=True)
class Keypair:
    """A CURVE keypair in z85 text."""

    public: str
    secret: str = field(repr=False)


def generate_keypair() -> Keypair:
    """Generate a new CURVE keypair.

    Raises:
        CurveError: libzmq was built without CURVE.
    """
    if not zmq.has("curve"):
        raise CurveError("libzmq has no CURVE support")
    public, secret = zmq.curve_keypair()
    return Keypair(public.decode("ascii"), secret.decode("ascii"))


def check_key(key: str) -> bytes:
    """Validate a z85 key and return its bytes form for setsockopt.

    Raises:
        CurveError: not a 40-character z85 key.
    """
    try:
        raw = z85.decode(key)
    except Exception as exc:
        raise CurveError(f"bad z85 CURVE key: {exc}") from exc
    if len(raw) != 32:
        raise CurveError("a CURVE key is 32 bytes (40 z85 characters)")
    return key.encode("ascii")


@dataclass(frozen=True)
class BrokerSecurity:
    """The broker's CURVE identity and who may connect.

    Attributes:
        server: The broker's keypair; its ``public`` goes into ``BusEndpoints.server_key``.
        allowed_clients: z85 public keys allowed to connect, or None for any client that
            knows the server key (encryption without authorization).
    """

    server: Keypair
    allowed_clients: frozenset[str] | None = None

    @classmethod
    def create(cls, server: Keypair, allowed_clients: Iterable[str] | None = None
               ) -> BrokerSecurity:
        return cls(server, None if allowed_clients is None else frozenset(allowed_clients))

    def apply_server(self, sock: zmq.Socket[Any]) -> None:
        sock.curve_server = True
        sock.curve_secretkey = check_key(self.server.secret)
        sock.zap_domain = b"dovecote"

    def zap_reply(self, request: list[bytes]) -> list[bytes]:
        """Answer one ZAP request (RFC 27) from the allow-list."""
        version, request_id = request[0], request[1]
        mechanism = request[5] if len(request) > 5 else b""
        if mechanism != b"CURVE":
            return [version, request_id, b"400", b"CURVE required", b"", b""]
        key = z85.encode(request[6]).decode("ascii")
        if self.allowed_clients is not None and key not in self.allowed_clients:
            return [version, request_id, b"400", b"unknown client key", b"", b""]
        return [version, request_id, b"200", b"OK", key.encode("ascii"), b""]


def apply_client(sock: zmq.Socket[Any], server_key: str, keypair: Keypair) -> None:
    """Make ``sock`` a CURVE client of the server with public key ``server_key``."""
    sock.curve_serverkey = check_key(server_key)
    sock.curve_publickey = check_key(keypair.public)
    sock.curve_secretkey = check_key(keypair.secret)


ENV_PUBLIC = "DOVECOTE_BUS_CURVE_PUBLIC_KEY"
ENV_SECRET = "DOVECOTE_BUS_CURVE_SECRET_KEY"
ENV_CLIENTS = "DOVECOTE_BUS_CURVE_CLIENTS"
ENV_CLIENTS_FILE = "DOVECOTE_BUS_CURVE_CLIENTS_FILE"


def keypair_from_env(environ: Mapping[str, str]) -> Keypair | None:
    """This process's CURVE keypair from ``DOVECOTE_BUS_CURVE_{PUBLIC,SECRET}_KEY``.

    Raises:
        CurveError: only one of the two is set, or a key is malformed.
    """
    public, secret = environ.get(ENV_PUBLIC, "").strip(), environ.get(ENV_SECRET, "").strip()
    if not public and not secret:
        return None
    if not (public and secret):
        raise CurveError(f"set both {ENV_PUBLIC} and {ENV_SECRET}, or neither")
    check_key(public)
    check_key(secret)
    return Keypair(public, secret)


def broker_security_from_env(environ: Mapping[str, str]) -> BrokerSecurity | None:
    """The broker's CURVE setup: its keypair and ``DOVECOTE_BUS_CURVE_CLIENTS``.

    ``DOVECOTE_BUS_CURVE_CLIENTS`` is a comma-separated list of client public
    keys (z85 has no comma) and ``DOVECOTE_BUS_CURVE_CLIENTS_FILE`` a file with
    one key per line; with neither, any client that knows the server key may
    connect (encryption without authorization).
    """
    server = keypair_from_env(environ)
    if server is None:
        return None
    raw = environ.get(ENV_CLIENTS, "").strip()
    path = environ.get(ENV_CLIENTS_FILE, "").strip()
    if not raw and not path:
        return BrokerSecurity.create(server)
    keys = [k.strip() for k in raw.split(",") if k.strip()]
    if path:
        with open(path) as fh:
            keys += [line.strip() for line in fh if line.strip() and not line.startswith("#")]
    for key in keys:
        check_key(key)
    return BrokerSecurity.create(server, keys)
