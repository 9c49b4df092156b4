"""The gateway service: the public HTTP/WebSocket/SSE API on hypercorn.

``dovecote gateway`` runs :data:`SPEC`: it joins the bus (and answers ``Ping``
like every service) and serves the Quart-Trio app with hypercorn in the
service nursery. On stop, hypercorn stops accepting and finishes in-flight
requests within the grace period.
"""

from __future__ import annotations

from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.events import Closed
from hypercorn.trio import run as hypercorn_run
from hypercorn.trio import serve
from hypercorn.trio.tcp_server import TCPServer

from dovecote.gateway import h11_send
from dovecote.gateway.agent_relay import AgentRelay
from dovecote.gateway.app import create_app
from dovecote.gateway.idle_watch import IdleWatch
from dovecote.gateway.state import GatewayConfig
from dovecote.libs.logs import get_logger
from dovecote.libs.runtime import ServiceContext, ServiceSpec

log = get_logger("dovecote.gateway")


class GuardedTCPServer(TCPServer):
    """hypercorn's per-connection server, which a client can no longer use to stop the gateway.

    hypercorn closes a connection (``send_eof``) from whichever task notices
    the end, without its send lock, so a client that lies about its
    ``Content-Length`` and hangs up can have hypercorn's 400 (or the app's
    answer) written while the socket is being shut down: ``send_all`` raises
    ``trio.BusyResourceError``, which hypercorn only expects as
    Broken/ClosedResourceError, and which escaped its connection task into
    ``serve`` — ending the gateway's main task. Here such a send counts as
    "the client is gone", and anything else a single connection raises is
    logged and ends that connection only.

    Its idle timeout is one task per connection (:class:`IdleWatch`), not one
    per keep-alive period, and it ends with the connection's reader.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._idle_watch = IdleWatch(self)
        self.idle_task = self._idle_watch

    async def protocol_send(self, event: Any) -> None:
        try:
            await super().protocol_send(event)
        except trio.BusyResourceError:
            # The socket is being closed by the other task: the client is gone.
            await self.protocol.handle(Closed())

    async def run(self) -> None:
        try:
            await super().run()
        except Exception:
            log.warning("a client connection failed", exc_info=True)

    async def _read_data(self) -> None:
        try:
            await super()._read_data()
        finally:
            self._idle_watch.end()


def _guard_connections() -> None:
    """Make hypercorn's Trio worker serve each connection with :class:`GuardedTCPServer` (and
    HTTP/1.1 answers of known length in one write, :mod:`dovecote.gateway.h11_send`)."""
    hypercorn_run.TCPServer = GuardedTCPServer  # type: ignore[misc]
    h11_send.install()


async def main(ctx: ServiceContext[GatewayConfig], *,
               task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve HTTP until the service stops."""
    _guard_connections()
    app = create_app(ctx.config, ctx.bus)
    AgentRelay(app).register(ctx.handle)  # capsules' agent endpoints (gateway/agent_relay.py)
    hconfig = HypercornConfig()
    hconfig.bind = [f"{ctx.config.http_host}:{ctx.config.http_port}"]
    hconfig.graceful_timeout = ctx.config.shutdown_grace_s
    hconfig.accesslog = None
    hconfig.errorlog = None
    # hypercorn returns once it has drained in-flight requests after the stop,
    # so this main ends with it and the runtime's grace period covers both.
    async with trio.open_nursery() as nursery:
        await nursery.start(app.extensions["dovecote"].edge.serve_invalidations)
        binds = await nursery.start(_serve, app, hconfig, ctx, nursery.cancel_scope)
        ctx.health_details["listen"] = ",".join(binds)
        log.info("gateway listening", extra={"binds": binds})
        task_status.started()


async def _serve(app: object, hconfig: HypercornConfig, ctx: ServiceContext[GatewayConfig],
                 done: trio.CancelScope, *,
                 task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
    await serve(app, hconfig, shutdown_trigger=ctx.stopping.wait,  # type: ignore[arg-type]
                task_status=task_status)
    # Drained: the background tasks (bus subscriptions) end with the server.
    done.cancel()


SPEC: ServiceSpec[GatewayConfig] = ServiceSpec(name="gateway", config_cls=GatewayConfig, main=main)
