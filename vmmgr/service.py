"""The vmmgr service: runs on every host and drives its VMs (libvirt/QEMU).

This is the service's process entry: ``dovecote vmmgr`` runs :data:`SPEC`.
"""

from __future__ import annotations

from dovecote.libs.config import BaseConfig
from dovecote.libs.runtime import ServiceSpec, serve_until_stopped


class VmmgrConfig(BaseConfig, kw_only=True):
    """Settings of the vmmgr service (``DOVECOTE_*`` variables)."""



SPEC: ServiceSpec[VmmgrConfig] = ServiceSpec(
    name="vmmgr",
    config_cls=VmmgrConfig,
    main=serve_until_stopped,
    schema="vmmgr",
    migrations="dovecote.vmmgr:migrations",
    # Placement goes to any host ("vmmgr"); operations on a capsule go to the
    # host that runs it ("vmmgr.<host_id>").
    extra_names=lambda config: [f"vmmgr.{config.host_id}"],
)
