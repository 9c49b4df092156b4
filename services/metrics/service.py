"""The metrics service: per-capsule samples, team stats and usage, Prometheus exposition.

This is the service's process entry: ``dovecote metrics`` runs :data:`SPEC`.
"""

from __future__ import annotations

from dovecote.libs.config import BaseConfig
from dovecote.libs.runtime import ServiceSpec, serve_until_stopped


class MetricsConfig(BaseConfig, kw_only=True):
    """Settings of the metrics service (``DOVECOTE_*`` variables)."""



SPEC: ServiceSpec[MetricsConfig] = ServiceSpec(
    name="metrics",
    config_cls=MetricsConfig,
    main=serve_until_stopped,
    schema="metrics",
    migrations="dovecote.services.metrics:migrations",
)
