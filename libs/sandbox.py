"""Host sandboxes: bubblewrap under a dedicated unprivileged user.

The providers that run on the host instead of in a VM (the xvfb desktop, the
host browser) start their processes the same way: ``setpriv`` to a system user
made for them (no capabilities, no supplementary groups), then ``bwrap`` with
every namespace unshared, a read-only ``/usr`` and ``/etc``, fresh ``/proc``,
``/dev``, ``/tmp``, ``/run`` and ``/var``, a cleared environment, and what the
provider binds in. This is weaker isolation than a VM, and reported as such.
"""

from __future__ import annotations

import os
import pwd
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

SYSTEM = ("--ro-bind", "/usr", "/usr", "--symlink", "usr/bin", "/bin", "--symlink", "usr/lib", "/lib",
          "--symlink", "usr/lib64", "/lib64", "--symlink", "usr/sbin", "/sbin",
          "--ro-bind", "/etc", "/etc")
"""The host's programs and configuration, read-only."""
SCRATCH = ("--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--tmpfs", "/run",
           "--tmpfs", "/var", "--dir", "/var/tmp")
"""Fresh kernel views and empty writable directories."""


class RootSandboxUser(ValueError):
    """The configured sandbox user is root."""


@dataclass(frozen=True, kw_only=True)
class SandboxUser:
    name: str
    uid: int
    gid: int


def ensure_user(name: str, *, variable: str) -> SandboxUser:
    """The dedicated host user ``name`` (created as a system user when we are root), or our own
    user when we are not root.

    Raises:
        RootSandboxUser: ``name`` is root (``variable`` names the setting in the message).
    """
    if os.geteuid() != 0:
        me = pwd.getpwuid(os.geteuid())
        return SandboxUser(name=me.pw_name, uid=me.pw_uid, gid=me.pw_gid)
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
                        "--shell", "/usr/sbin/nologin", name], check=True, capture_output=True)
        pw = pwd.getpwnam(name)
    if pw.pw_uid == 0:
        raise RootSandboxUser(f"{variable} {name!r} is root; choose an unprivileged user")
    return SandboxUser(name=pw.pw_name, uid=pw.pw_uid, gid=pw.pw_gid)


def argv(user: SandboxUser, *, hostname: str, binds: Sequence[str], env: Mapping[str, str],
         chdir: str, command: Sequence[str]) -> list[str]:
    """The command line running ``command`` in a sandbox as ``user``: ``setpriv`` (when we are
    root), then ``bwrap`` with :data:`SYSTEM`, :data:`SCRATCH`, then ``binds`` (bubblewrap
    options, applied in order after them), the environment ``env`` only, in ``chdir``."""
    cmd = ["bwrap", "--unshare-all", "--die-with-parent", "--new-session", "--clearenv",
           "--hostname", hostname, *SYSTEM, *SCRATCH, *binds, "--chdir", chdir]
    for key, value in env.items():
        cmd += ["--setenv", key, value]
    cmd += command
    if os.geteuid() == 0:
        cmd = ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--clear-groups",
               "--inh-caps=-all", "--bounding-set=-all", "--", *cmd]
    return cmd
