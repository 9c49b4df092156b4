"""The operations on a running capsule that go through its guest agent.

:class:`AgentPool` keeps one connection per running capsule, opened on first
use and reopened when it broke. :class:`AgentOps` answers the capsule
messages that are agent calls (exec, processes, files), each one: the
caller's capsule (what the gateway's lookup found and sent along, else its
row, 404 if not theirs), require it running on this host, get its agent (the
pool's open connection; the driver is asked for the socket only to open one),
call, touch ``last_active_at``. Agent refusals become the API's errors
in :func:`agent_errors` (``not_found`` 404, ``already_exists`` 409,
``too_large`` 413...); a lost agent is 502.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal, cast

import trio

from dovecote.bus.messages import capsules as m
from dovecote.libs.errors import ServiceError
from dovecote.libs.logs import get_logger
from dovecote.vmmgr.capsule_store import CapsuleStore, Row, Status, require_local, row_of
from dovecote.vmmgr.driver import DriverError, VmNotFound
from dovecote.vmmgr.guest import AgentClient, open_agent
from dovecote.vmmgr.guest import errors as ge
from dovecote.vmmgr.machines import Machines

log = get_logger("dovecote.vmmgr.capsules")

MAX_EXEC_TIMEOUT_S = 3600
KILL_SETTLE_S = 2.0
"""How long a kill waits for the process it signalled to end before it answers."""


class AgentPool:
    """One live :class:`AgentClient` per capsule, each held open by a task in ``nursery``."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self._clients: dict[str, AgentClient] = {}
        self._scopes: dict[str, trio.CancelScope] = {}
        self._locks: dict[str, trio.Lock] = {}

    def __len__(self) -> int:
        return len(self._clients)

    def connected(self, capsule_id: str) -> AgentClient | None:
        """The capsule's client if its connection is open (no wait, no connect)."""
        client = self._clients.get(capsule_id)
        return client if client is not None and client.connected else None

    async def get(self, capsule_id: str, socket_path: str, *,
                  connect_timeout: float = 10.0) -> AgentClient:
        """The capsule's connected client, connecting (again) when there is none."""
        lock = self._locks.setdefault(capsule_id, trio.Lock())
        async with lock:
            client = self._clients.get(capsule_id)
            if client is not None and client.connected:
                return client
            self.close(capsule_id)
            return cast(AgentClient, await self._nursery.start(
                self._hold, capsule_id, socket_path, connect_timeout))

    def close(self, capsule_id: str) -> None:
        """Drop the capsule's connection (the guest's processes keep running)."""
        scope = self._scopes.pop(capsule_id, None)
        self._clients.pop(capsule_id, None)
        if scope is not None:
            scope.cancel()

    def forget(self, capsule_id: str) -> None:
        """Close and forget the capsule entirely (it is gone)."""
        self.close(capsule_id)
        self._locks.pop(capsule_id, None)

    async def _hold(self, capsule_id: str, socket_path: str, connect_timeout: float, *,
                    task_status: trio.TaskStatus[AgentClient] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as scope:
            self._scopes[capsule_id] = scope
            started = False
            try:
                async with open_agent(socket_path, connect_timeout=connect_timeout) as client:
                    self._clients[capsule_id] = client
                    task_status.started(client)
                    started = True
                    while client.connected:  # noqa: ASYNC110 - the client has no "broken" event
                        await trio.sleep(0.5)
                    log.info("agent connection lost", extra={"capsule_id": capsule_id})
            except Exception:
                if not started:
                    raise  # to the caller of get()
                # Never let one capsule's connection take the service's nursery down.
                log.warning("agent connection failed", exc_info=True, extra={"capsule_id": capsule_id})
            finally:
                if self._scopes.get(capsule_id) is scope:
                    self._scopes.pop(capsule_id, None)
                    self._clients.pop(capsule_id, None)


@asynccontextmanager
async def agent_errors(capsule_id: str) -> AsyncIterator[None]:
    """Turn guest-agent failures into the API's errors."""
    try:
        yield
    except ge.NotFound as exc:
        raise ServiceError(404, "not_found", exc.message) from exc
    except ge.AlreadyExists as exc:
        raise ServiceError(409, "already_exists", exc.message) from exc
    except ge.PermissionDenied as exc:
        raise ServiceError(403, "permission_denied", exc.message) from exc
    except ge.TooLarge as exc:
        raise ServiceError(413, "too_large", exc.message) from exc
    except ge.AgentRequestError as exc:
        if exc.code in ("is_a_directory", "not_a_directory", "invalid_path", "invalid_argument"):
            raise ServiceError(400, exc.code, exc.message) from exc
        if exc.code == "not_running":
            raise ServiceError(409, "not_running", exc.message) from exc
        raise ServiceError(502, "agent_error", f"the capsule's agent failed: {exc.message}") from exc
    except ge.AgentTimeout as exc:
        raise ServiceError(504, "agent_timeout", f"the capsule's agent did not answer: {exc}") from exc
    except ge.AgentError as exc:
        log.warning("agent unavailable", extra={"capsule_id": capsule_id, "error": str(exc)})
        raise ServiceError(502, "agent_unavailable",
                           "the capsule's agent cannot be reached; retry shortly") from exc


def check_path(path: str) -> str:
    """``path`` if it is an absolute path a guest may be asked about, else 400 ``invalid_path``."""
    if not path or not path.startswith("/") or "\x00" in path or len(path) > 4096:
        raise ServiceError(400, "invalid_path", "path must be an absolute path inside the capsule")
    return path


def file_entry(entry: Any) -> m.FileEntry:
    return m.FileEntry(name=entry.name, path=entry.path, type=entry.type, size=entry.size,
                       mode=entry.mode, permissions=entry.permissions, owner=entry.owner,
                       group=entry.group, modified_at=entry.modified_at,
                       symlink_target=entry.symlink_target)


def not_running(row: Row) -> ServiceError:
    return ServiceError(409, "not_running", f"capsule {row['id']} is {row['status']}, not running")


class AgentOps:
    """The capsule messages answered by the capsule's guest agent."""

    def __init__(self, *, store: CapsuleStore, machines: Machines, agents: AgentPool, host_id: str,
                 agent_timeout_s: float, vm_locks: dict[str, trio.Lock],
                 set_status: Callable[..., Awaitable[Row | None]]) -> None:
        self.store = store
        self.machines = machines
        self.agents = agents
        self.host_id = host_id
        self.agent_timeout_s = agent_timeout_s
        self.vm_locks = vm_locks
        self.set_status = set_status
        """The publishing status change of :class:`~dovecote.vmmgr.capsules.Capsules`."""

    async def capsule_of(self, msg: m.CapsuleOp) -> Row:
        """The caller's capsule: as the gateway's lookup found it for this actor
        (``msg.found``), else read here (404 if it is not theirs)."""
        found = msg.found
        if (found is not None and found.capsule.id == msg.capsule_id
                and (msg.actor.is_admin if msg.admin else found.team_id == msg.actor.team_id)):
            return row_of(found)  # the scope checked again on what was found, without SQL
        return await self.store.find(msg.actor, msg.capsule_id, msg.admin)

    async def agent_of(self, msg: m.CapsuleOp) -> tuple[Row, AgentClient]:
        """The caller's running capsule of this host and its connected agent (touched).

        The row is :meth:`capsule_of`'s (only ``id``, ``status``, ``host_id`` and
        ``team_id`` when the lookup's answer came along).
        """
        row = await self.capsule_of(msg)
        if row["status"] != Status.RUNNING:
            raise not_running(row)
        require_local(row, self.host_id)
        lock = self.vm_locks.get(row["id"])
        if lock is not None and lock.locked():  # a snapshot in progress: wait for the VM
            async with lock:
                pass
        client = self.agents.connected(row["id"])
        if client is None:
            socket_path = await self.agent_socket(row)
            async with agent_errors(row["id"]):
                client = await self.agents.get(row["id"], str(socket_path),
                                               connect_timeout=self.agent_timeout_s)
        await self.store.touch(row["id"])
        return row, client

    async def agent_socket(self, row: Row) -> Path:
        """The host end of the capsule's agent channel, from the driver (a VM that is
        gone makes a ``running`` record ``missing``: 409)."""
        driver, _ = await self.machines.require_soon()
        try:
            return await driver.agent_socket(row["id"])
        except VmNotFound:
            await self.set_status(row["id"], Status.MISSING, only_from=(Status.RUNNING,))
            raise ServiceError(409, "not_running", f"capsule {row['id']}'s VM is gone") from None
        except DriverError as exc:
            raise ServiceError(502, "driver_error", str(exc)) from exc

    async def exec(self, msg: m.ExecCommand) -> m.ExecReply:
        if not msg.cmd:
            raise ServiceError(400, "invalid_request", "cmd is required")
        if not 0 < msg.timeout_sec <= MAX_EXEC_TIMEOUT_S:
            raise ServiceError(400, "invalid_request",
                               f"timeout_sec must be between 1 and {MAX_EXEC_TIMEOUT_S}")
        row, client = await self.agent_of(msg)
        shown = " ".join([msg.cmd, *(msg.args or [])])
        async with agent_errors(row["id"]):
            if msg.background:
                started = await client.start_process(msg.cmd, args=msg.args, env=msg.envs,
                                                     cwd=msg.cwd, user=msg.user, tag=msg.tag or None)
                return m.ExecReply(started=m.BackgroundExecResponse(
                    sandbox_id=row["id"], cmd=shown, pid=started.pid, tag=started.tag))
            result = await client.exec(msg.cmd, args=msg.args, env=msg.envs, cwd=msg.cwd,
                                       user=msg.user, timeout=float(msg.timeout_sec))
        await self.store.touch(row["id"])
        if result.timed_out:  # killed at its deadline: no partial result passed off as a success
            raise ServiceError(408, "timeout", f"{shown[:200]!r} did not finish within its "
                               f"timeout_sec of {msg.timeout_sec} s and was killed")
        return m.ExecReply(result=m.ExecResponse(
            sandbox_id=row["id"], cmd=shown, stdout=result.stdout, stderr=result.stderr,
            exit_code=result.exit_code, duration_ms=result.duration_ms, encoding=result.encoding))

    async def list_processes(self, msg: m.ListProcesses) -> m.ProcessesReply:
        row, client = await self.agent_of(msg)
        async with agent_errors(row["id"]):
            processes = await client.list_processes(include_system=True)
        entries = [m.ProcessEntry(pid=p.pid, tag=p.tag, cmd=p.cmd, args=list(p.args))
                   for p in processes if p.running]
        return m.ProcessesReply(body=m.ProcessListResponse(processes=entries))

    async def kill_process(self, msg: m.KillProcess) -> m.CapsuleDone:
        if not msg.selector or len(msg.selector) > 128:
            raise ServiceError(400, "invalid_request", "invalid process selector")
        row, client = await self.agent_of(msg)
        signal = cast(Literal["SIGKILL", "SIGTERM"], msg.signal)
        async with agent_errors(row["id"]):
            killed = await client.kill(msg.selector, signal)
            if killed.delivered and killed.tag is not None:
                # A process the agent started: answered once it ended (a list right after
                # the kill no longer shows it), or after KILL_SETTLE_S if it ignores SIGTERM.
                async def running() -> bool:
                    return any(p.pid == killed.pid and p.running for p in await client.list_processes())

                with trio.move_on_after(KILL_SETTLE_S):
                    while await running():  # noqa: ASYNC110 (the guest is asked)
                        await trio.sleep(0.05)
        if not killed.delivered:
            raise ServiceError(404, "not_found", f"process {msg.selector} is not running")
        return m.CapsuleDone()

    async def ping(self, msg: m.PingCapsule) -> m.CapsuleDone:
        row = await self.store.find(msg.actor, msg.capsule_id, msg.admin)
        if row["status"] != Status.RUNNING:
            raise not_running(row)
        await self.store.touch(row["id"])
        return m.CapsuleDone()

    async def write_file(self, msg: m.WriteFile) -> m.CapsuleDone:
        row, client = await self.agent_of(msg)
        async with agent_errors(row["id"]):
            await client.write_file(check_path(msg.path), msg.data)
        return m.CapsuleDone()

    async def read_file(self, msg: m.ReadFile) -> m.FileContent:
        row, client = await self.agent_of(msg)
        async with agent_errors(row["id"]):
            data = await client.read_file_bytes(check_path(msg.path))
        return m.FileContent(data=data)

    async def list_dir(self, msg: m.ListDir) -> m.ListDirReply:
        row, client = await self.agent_of(msg)
        async with agent_errors(row["id"]):
            listing = await client.list_dir(check_path(msg.path), msg.depth)
        return m.ListDirReply(body=m.ListDirResponse(entries=[file_entry(e) for e in listing.entries]))

    async def make_dir(self, msg: m.MakeDir) -> m.MakeDirReply:
        row, client = await self.agent_of(msg)
        async with agent_errors(row["id"]):
            entry = await client.mkdir(check_path(msg.path))
        return m.MakeDirReply(body=m.MakeDirResponse(entry=file_entry(entry)))

    async def remove_path(self, msg: m.RemovePath) -> m.CapsuleDone:
        row, client = await self.agent_of(msg)
        async with agent_errors(row["id"]):
            await client.remove(check_path(msg.path))
        return m.CapsuleDone()
