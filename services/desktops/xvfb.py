"""The xvfb provider: a desktop on the host, in a bubblewrap sandbox (the explicit fallback).

Off unless the operator sets ``DOVECOTE_DESKTOP_XVFB=true``, and reported as
weaker isolation than a VM: the session shares the host's kernel.

Each session is one ``bwrap`` process tree, started as a dedicated
unprivileged host user (``DOVECOTE_DESKTOP_XVFB_USER``, created as a system
user when the service runs as root) with ``setpriv``, in its own user, mount,
PID, network, IPC and UTS namespaces (``--unshare-all``; the network namespace
has only a loopback, so nothing on the host, the gateway included, is
reachable). Its filesystem is ``/usr`` and ``/etc`` read-only, fresh ``/tmp``
and ``/run``, and two directories of the session's own runtime directory:
``home/`` as the desktop user's home and ``bridge/`` at
``/run/dovecote-bridge``. A generated ``/etc/passwd`` names the sandbox's uid
after the desktop user (``dove``). Inside, :data:`STARTUP` starts Xvfb on
``:0`` at the session's size, waits for it to answer (``display.ready``),
starts openbox (the ``product`` profile) and runs the Dovecote guest agent on
``bridge/agent.sock``: the same bridge a VM has, so actions run the same way
on both providers. ``--die-with-parent`` and the PID namespace make the whole
tree die with ``bwrap``.

Screenshots are ``import -window root`` written into ``bridge/`` and read by
the host.
"""

from __future__ import annotations

import os
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import trio

from dovecote.libs import sandbox
from dovecote.libs.sandbox import SandboxUser
from dovecote.services.desktops.errors import MissingTool
from dovecote.vmmgr.guest.client import AgentClient

TOOLS = ("bwrap", "Xvfb", "xdpyinfo", "xdotool", "import", "openbox")
HOST_PYTHON = "/usr/bin/python3"
BRIDGE_MOUNT = "/run/dovecote-bridge"
ISOLATION = ("weaker: the xvfb provider runs on the host kernel, in a bubblewrap sandbox "
             "(own user, mount, PID and network namespaces) as an unprivileged user")

STARTUP = r"""
set -u
B=/run/dovecote-bridge
Xvfb :0 -screen 0 "${DOVE_WIDTH}x${DOVE_HEIGHT}x24" -nolisten tcp >"$B/xvfb.log" 2>&1 &
i=0
until xdpyinfo -display :0 >/dev/null 2>&1; do
    i=$((i + 1))
    if [ $i -gt 300 ]; then echo "Xvfb did not answer within 30 s" >"$B/fatal"; exit 1; fi
    sleep 0.1
done
touch "$B/display.ready"
if [ "$DOVE_WM" = openbox ]; then openbox >"$B/openbox.log" 2>&1 & fi
mkdir -p "$XDG_RUNTIME_DIR" && chmod 700 "$XDG_RUNTIME_DIR"
if [ "$DOVE_BRIDGE" = none ]; then exec sleep infinity; fi
exec /usr/bin/python3 /opt/dovecote/python/dovecote/vmmgr/guest/agent --listen-unix "$B/agent.sock" \
    --no-system-changes --log-level WARNING 2>"$B/agent.log"
"""


def missing_tools() -> list[str]:
    """The host programs the provider needs and cannot find."""
    return [t for t in (*TOOLS, "setpriv") if shutil.which(t) is None] + (
        [] if Path(HOST_PYTHON).exists() else [HOST_PYTHON])


def check_tools() -> None:
    missing = missing_tools()
    if missing:
        raise MissingTool(f"the xvfb provider needs {', '.join(missing)} on the host "
                          "(infra/system-deps.sh installs them)")


def ensure_user(name: str) -> SandboxUser:
    """The dedicated host user of the xvfb desktops (``DOVECOTE_DESKTOP_XVFB_USER``)."""
    try:
        return sandbox.ensure_user(name, variable="DOVECOTE_DESKTOP_XVFB_USER")
    except sandbox.RootSandboxUser as exc:
        raise MissingTool(str(exc)) from None


def install_lib(root: Path) -> Path:
    """Copy the guest agent and msgspec where the sandbox user can read them; returns the dir."""
    import msgspec

    from dovecote.vmmgr import guest

    lib = root / "lib"
    stage = root / f".lib-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    (stage / "python").mkdir(parents=True)
    for source, relative in guest.guest_files():  # the agent package, as in the guest image
        (stage / "python" / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, stage / "python" / relative)
    shutil.copytree(Path(msgspec.__file__).parent, stage / "python" / "msgspec",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for path in [stage, *stage.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    shutil.rmtree(lib, ignore_errors=True)
    os.rename(stage, lib)
    return lib


@dataclass(frozen=True, kw_only=True)
class SandboxSpec:
    session_dir: Path
    lib_dir: Path
    user: SandboxUser
    desktop_user: str
    desktop_home: str
    desktop_runtime_dir: str
    width: int
    height: int
    window_manager: str
    bridge: bool
    shared_host_path: str | None = None

    @property
    def bridge_dir(self) -> Path:
        return self.session_dir / "bridge"

    @property
    def home_dir(self) -> Path:
        return self.session_dir / "home"


def prepare(spec: SandboxSpec) -> None:
    """Create the session's runtime directory, owned by the sandbox user."""
    spec.session_dir.mkdir(mode=0o700, parents=True)
    for sub in (spec.home_dir, spec.bridge_dir):
        sub.mkdir(mode=0o700)
    etc = spec.session_dir / "etc"
    etc.mkdir(mode=0o755)
    u = spec.user
    (etc / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\n"
        f"{spec.desktop_user}:x:{u.uid}:{u.gid}:desktop user:{spec.desktop_home}:/bin/sh\n"
        "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n")
    (etc / "group").write_text(f"root:x:0:\n{spec.desktop_user}:x:{u.gid}:\nnogroup:x:65534:\n")
    (etc / "hostname").write_text("desktop\n")
    for path in (etc / "passwd", etc / "group", etc / "hostname"):
        path.chmod(0o644)
    if os.geteuid() == 0:
        for path in (spec.session_dir, spec.home_dir, spec.bridge_dir):
            os.chown(path, u.uid, u.gid)


def argv(spec: SandboxSpec) -> list[str]:
    """The command line of the sandbox (``setpriv`` to the sandbox user, then ``bwrap``)."""
    etc = spec.session_dir / "etc"
    env = {
        "HOME": spec.desktop_home, "USER": spec.desktop_user, "LOGNAME": spec.desktop_user,
        "DISPLAY": ":0", "XDG_RUNTIME_DIR": spec.desktop_runtime_dir, "LANG": "C.UTF-8",
        "PATH": "/usr/local/bin:/usr/bin:/bin", "PYTHONPATH": "/opt/dovecote/python",
        "PYTHONDONTWRITEBYTECODE": "1", "DOVE_WIDTH": str(spec.width),
        "DOVE_HEIGHT": str(spec.height), "DOVE_WM": spec.window_manager,
        "DOVE_BRIDGE": "agent" if spec.bridge else "none",
    }
    binds = ["--ro-bind", str(etc / "passwd"), "/etc/passwd",
             "--ro-bind", str(etc / "group"), "/etc/group",
             "--ro-bind", str(etc / "hostname"), "/etc/hostname",
             "--bind", str(spec.home_dir), spec.desktop_home,
             "--bind", str(spec.bridge_dir), BRIDGE_MOUNT,
             "--ro-bind", str(spec.lib_dir), "/opt/dovecote"]
    if spec.shared_host_path:
        binds += ["--bind", spec.shared_host_path, "/shared/hostshare"]
    return sandbox.argv(spec.user, hostname="desktop", binds=binds, env=env, chdir=spec.desktop_home,
                        command=["/bin/sh", "-c", STARTUP])


class XvfbBridge:
    """Runs a session's actions through the guest agent inside its sandbox."""

    def __init__(self, agent: AgentClient, spec: SandboxSpec) -> None:
        self.agent = agent
        self.spec = spec
        self._shot = 0

    async def exec(self, cmd: str | list[str], *, env: dict[str, str] | None = None,
                   cwd: str | None = None, user: str | None = None,
                   timeout: float = 30.0) -> tuple[str, str, int, bool]:  # noqa: ASYNC109
        del user  # the sandbox has one user: the desktop user
        result = await self.agent.exec(cmd, env={"DISPLAY": ":0", **(env or {})}, cwd=cwd,
                                       timeout=timeout)
        return result.stdout, result.stderr, result.exit_code, result.timed_out

    async def read_file(self, path: str) -> bytes:
        return await self.agent.read_file_bytes(path)

    async def write_file(self, path: str, data: bytes) -> None:
        await self.agent.write_file(path, data)

    async def screenshot(self) -> bytes:
        self._shot += 1
        name = f"shot-{self._shot}.png"
        _, err, code, _ = await self.exec(
            ["import", "-silent", "-display", ":0", "-window", "root", f"png24:{BRIDGE_MOUNT}/{name}"],
            timeout=20)
        target = self.spec.bridge_dir / name
        if code != 0:
            raise OSError(f"import exited with {code}: {err.strip()[-300:]}")
        try:
            return await trio.Path(target).read_bytes()
        finally:
            await trio.Path(target).unlink(missing_ok=True)


def describe(spec: SandboxSpec) -> str:
    """One line naming the sandbox, for logs."""
    return shlex.join(["bwrap", "...", str(spec.session_dir)])
