"""The gateway service: the public HTTP/WebSocket/SSE API on hypercorn.

``dovecote gateway`` runs :data:`SPEC`: it joins the bus (and answers ``Ping``
like every service) and serves the Quart-Trio app with hypercorn in the
service nursery. On stop, hypercorn stops accepting and finishes in-flight
requests within the grace period.
"""

from __future__ import annotations

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from dovecote.gateway.app import create_app
from dovecote.gateway.state import GatewayConfig
from dovecote.libs.logs import get_logger
from dovecote.libs.runtime import ServiceContext, ServiceSpec

log = get_logger("dovecote.gateway")


async def main(ctx: ServiceContext[GatewayConfig], *,
               task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve HTTP until the service stops."""
    app = create_app(ctx.config, ctx.bus)
    hconfig = HypercornConfig()
    hconfig.bind = [f"{ctx.config.http_host}:{ctx.config.http_port}"]
    hconfig.graceful_timeout = ctx.config.shutdown_grace_s
    hconfig.accesslog = None
    hconfig.errorlog = None
    # hypercorn returns once it has drained in-flight requests after the stop,
    # so this main ends with it and the runtime's grace period covers both.
    async with trio.open_nursery() as nursery:
        await nursery.start(app.extensions["dovecote"].edge.serve_invalidations)
        binds = await nursery.start(_serve, app, hconfig, ctx)
        ctx.health_details["listen"] = ",".join(binds)
        log.info("gateway listening", extra={"binds": binds})
        task_status.started()


async def _serve(app: object, hconfig: HypercornConfig, ctx: ServiceContext[GatewayConfig], *,
                 task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
    await serve(app, hconfig, shutdown_trigger=ctx.stopping.wait,  # type: ignore[arg-type]
                task_status=task_status)


SPEC: ServiceSpec[GatewayConfig] = ServiceSpec(name="gateway", config_cls=GatewayConfig, main=main)
