"""The recorder service: review bundles (timeline and deduplicated screenshots) and artifacts.

This is the service's process entry: ``dovecote recorder`` runs :data:`SPEC`.
"""

from __future__ import annotations

from dovecote.libs.config import BaseConfig
from dovecote.libs.runtime import ServiceSpec, serve_until_stopped


class RecorderConfig(BaseConfig, kw_only=True):
    """Settings of the recorder service (``DOVECOTE_*`` variables)."""



SPEC: ServiceSpec[RecorderConfig] = ServiceSpec(
    name="recorder",
    config_cls=RecorderConfig,
    main=serve_until_stopped,
    schema="recorder",
    migrations="dovecote.recorder:migrations",
)
