"""What the gateway's routes share: the app, its config, the bus, the API registry."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from dovecote.gateway.openapi import ApiRegistry
from dovecote.libs.config import BaseConfig

ALL_SERVICES = "gateway,auth,vmmgr,recorder,notifier,metrics,desktops,agents,browsers,runs"


class GatewayConfig(BaseConfig, kw_only=True):
    """Settings of the gateway (``DOVECOTE_*`` variables)."""

    http_host: str = "127.0.0.1"
    http_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8080
    health_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 2.0
    health_services: str = ALL_SERVICES
    max_body_bytes: Annotated[int, msgspec.Meta(gt=0)] = 16 * 1024 * 1024
    sse_keepalive_s: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    """Seconds between ``: keepalive`` comments on an idle event stream."""
    sse_queue_events: Annotated[int, msgspec.Meta(gt=0)] = 1024
    """Live events one event-stream client may have pending before it is cut off as too slow."""
    max_upload_bytes: Annotated[int, msgspec.Meta(gt=0)] = 10 * 1024 * 1024 * 1024
    """The largest file a streaming upload may write (413 above)."""
    public_url: str = ""
    """The gateway's public origin; WebSockets authenticated by cookie must come from it
    (or from the ``Host`` they connect to)."""
    ws_ping_s: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    """Seconds between the PTY WebSocket's ``ping`` frames."""

    def service_names(self) -> list[str]:
        """The bus names ``/healthz`` checks."""
        return [name.strip() for name in self.health_services.split(",") if name.strip()]


class GatewayState(msgspec.Struct, kw_only=True):
    """Shared by every route module."""

    app: Any
    config: GatewayConfig
    bus: Any
    api: ApiRegistry
    edge: Any = None
