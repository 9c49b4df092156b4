"""Where the broker listens, as one value that travels through the environment.

Three endpoints: the RPC ROUTER (clients and workers connect), the event
plane's XSUB (publishers connect: ``pub``) and XPUB (subscribers connect:
``sub``).  On one machine they are ``ipc://`` paths in a directory; across
machines, TCP, normally with CURVE (``server_key`` is then the broker's public
key in z85 text, which clients need to connect).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

ENV_RPC = "DOVECOTE_BUS_RPC"
ENV_PUB = "DOVECOTE_BUS_PUB"
ENV_SUB = "DOVECOTE_BUS_SUB"
ENV_SERVER_KEY = "DOVECOTE_BUS_SERVER_KEY"


@dataclass(frozen=True)
class BusEndpoints:
    """The broker's three endpoints (and its CURVE public key, if any).

    Attributes:
        rpc: ROUTER endpoint for requests, replies, streams.
        pub: XSUB endpoint; publishers connect here.
        sub: XPUB endpoint; subscribers connect here.
        server_key: The broker's CURVE public key (z85), or None for no CURVE.
    """

    rpc: str
    pub: str
    sub: str
    server_key: str | None = None

    @classmethod
    def local(cls, where: str | os.PathLike[str] = "127.0.0.1", base_port: int | None = None
              ) -> BusEndpoints:
        """Endpoints on this machine.

        Args:
            where: A directory (``ipc://<dir>/bus/{rpc,events-in,events-out}.sock``;
                the ``bus`` folder is created) or, with ``base_port``, a host for TCP
                on ports ``base_port``, ``+1``, ``+2``.
            base_port: First TCP port; when given, ``where`` is a host.
        """
        if base_port is not None:
            return cls.tcp(str(where), base_port, base_port + 1, base_port + 2)
        d = Path(where) / "bus"
        d.mkdir(parents=True, exist_ok=True)
        return cls(
            rpc=f"ipc://{d / 'rpc.sock'}",
            pub=f"ipc://{d / 'events-in.sock'}",
            sub=f"ipc://{d / 'events-out.sock'}",
        )

    @classmethod
    def tcp(cls, host: str, rpc_port: int, pub_port: int, sub_port: int,
            server_key: str | None = None) -> BusEndpoints:
        """TCP endpoints on ``host``."""
        return cls(f"tcp://{host}:{rpc_port}", f"tcp://{host}:{pub_port}",
                   f"tcp://{host}:{sub_port}", server_key)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> BusEndpoints:
        """Read ``DOVECOTE_BUS_RPC``/``_PUB``/``_SUB`` (and ``_SERVER_KEY``).

        Raises:
            KeyError: one of the three endpoint variables is missing.
        """
        env = os.environ if environ is None else environ
        return cls(env[ENV_RPC], env[ENV_PUB], env[ENV_SUB], env.get(ENV_SERVER_KEY) or None)

    def to_env(self) -> dict[str, str]:
        """The environment variables that :meth:`from_env` reads back."""
        env = {ENV_RPC: self.rpc, ENV_PUB: self.pub, ENV_SUB: self.sub}
        if self.server_key:
            env[ENV_SERVER_KEY] = self.server_key
        return env

    def with_server_key(self, server_key: str | None) -> BusEndpoints:
        return BusEndpoints(self.rpc, self.pub, self.sub, server_key)
