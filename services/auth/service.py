"""The auth service: accounts, sessions, API keys, teams and roles, host credentials and the audit log.

This is the service's process entry: ``dovecote auth`` runs :data:`SPEC`.
"""

from __future__ import annotations

from dovecote.libs.config import BaseConfig
from dovecote.libs.runtime import ServiceSpec, serve_until_stopped


class AuthConfig(BaseConfig, kw_only=True):
    """Settings of the auth service (``DOVECOTE_*`` variables)."""



SPEC: ServiceSpec[AuthConfig] = ServiceSpec(
    name="auth",
    config_cls=AuthConfig,
    main=serve_until_stopped,
    schema="auth",
    migrations="dovecote.services.auth:migrations",
)
