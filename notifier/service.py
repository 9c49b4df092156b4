"""The notifier service: delivers lifecycle events to chat channels and signed webhooks.

This is the service's process entry: ``dovecote notifier`` runs :data:`SPEC`.
"""

from __future__ import annotations

from dovecote.libs.config import BaseConfig
from dovecote.libs.runtime import ServiceSpec, serve_until_stopped


class NotifierConfig(BaseConfig, kw_only=True):
    """Settings of the notifier service (``DOVECOTE_*`` variables)."""



SPEC: ServiceSpec[NotifierConfig] = ServiceSpec(
    name="notifier",
    config_cls=NotifierConfig,
    main=serve_until_stopped,
    schema="notifier",
    migrations="dovecote.notifier:migrations",
)
