"""The auth service: accounts, sessions, API keys, teams and roles, host
credentials and the audit log.

This is the service's process entry: ``dovecote auth`` runs :data:`SPEC`.
It owns the ``auth`` schema; other services ask it over the bus.
"""

from __future__ import annotations

import trio

from dovecote.libs.runtime import ServiceContext, ServiceSpec
from dovecote.services.auth.accounts import Accounts
from dovecote.services.auth.admin import Admin
from dovecote.services.auth.auditlog import AuditLog
from dovecote.services.auth.context import AuthConfig, AuthContext
from dovecote.services.auth.hosts import Hosts
from dovecote.services.auth.oauth import OAuth
from dovecote.services.auth.purge import serve_purge
from dovecote.services.auth.teams import Teams


async def main(ctx: ServiceContext[AuthConfig], *,
               task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Register the handlers, then serve until stopped."""
    auth = AuthContext(ctx)
    Accounts(auth).register(ctx.handle)
    Admin(auth).register(ctx.handle)
    AuditLog(auth).register(ctx.handle)
    Teams(auth).register(ctx.handle)  # teams, members, user search, API keys
    OAuth(auth).register(ctx.handle)  # GitHub sign-in, link, unlink
    Hosts(auth).register(ctx.handle)  # hosts and host tokens; starts the silence monitor
    ctx.nursery.start_soon(serve_purge, auth)  # purge soft-deleted accounts when due
    task_status.started()
    await ctx.stopping.wait()


SPEC: ServiceSpec[AuthConfig] = ServiceSpec(
    name="auth",
    config_cls=AuthConfig,
    main=main,
    schema="auth",
    migrations="dovecote.services.auth:migrations",
)
