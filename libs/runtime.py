"""The life of one Dovecote service process.

``run_service(spec)`` is what ``dovecote <service>`` calls: it reads the typed
config, sets up JSON logging and runs :func:`serve_service` under ``trio.run``
with SIGTERM/SIGINT handling. :func:`serve_service` is the same life as a Trio
task, which is how the tests run a service inside their own nursery.

A service's life, all inside one nursery:

1. connect to the bus, and when the service owns tables, open its database
   pool and apply its migrations (under an advisory lock);
2. register its RPC handlers with the bus under its name (every service answers
   :class:`~dovecote.bus.Ping`, which is its health check);
3. start the service's own ``main`` with ``nursery.start`` and report ready
   through ``task_status``;
4. on stop (signal or :meth:`ServiceContext.stop`): refuse new requests, give
   in-flight handlers and ``main`` the grace period to finish, then cancel.

Every service also answers :class:`~dovecote.bus.messages.metrics.ScrapeMetrics`
with the families of its process's Prometheus registry (the gateway merges
them into ``GET /metrics``). The :class:`Dispatcher` counts each bus request
and stream by service, message tag and outcome, and times the requests.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import msgspec
import prometheus_client
import trio
from prometheus_client import Counter, Gauge, Histogram

from dovecote.bus import BusEndpoints, Ping, Pong, open_bus
from dovecote.bus.curve import keypair_from_env
from dovecote.bus.errors import RemoteError
from dovecote.bus.messages.base import Family, family_of
from dovecote.bus.messages.metrics import Exposition, MetricFamily, MetricSample, ScrapeMetrics
from dovecote.libs.config import BaseConfig, load_config
from dovecote.libs.db import Database, open_database
from dovecote.libs.embedded_pg import resolve_database_url
from dovecote.libs.errors import ServiceError
from dovecote.libs.logs import get_logger, setup_logging
from dovecote.libs.migrations import apply_migrations

__all__ = [
    "Dispatcher",
    "ServiceContext",
    "ServiceSpec",
    "exposition_families",
    "run_service",
    "serve_service",
    "serve_until_stopped",
]

VERSION = "0.1.0"
log = get_logger("dovecote.runtime")

CfgT = TypeVar("CfgT", bound=BaseConfig)
Handler = Callable[[Any], Awaitable[msgspec.Struct]]
StreamHandler = Callable[[Any, Any], Awaitable[None]]

# One process serves one service in production; the ``service`` label keeps
# services apart when tests run several in one process.
prometheus_client.disable_created_metrics()  # no *_created series: noise for dashboards
BUS_REQUESTS = Counter("dovecote_bus_requests", "Bus requests handled, by message tag and outcome "
                       "(ok, client_error, server_error, exception, unsupported, shutting_down).",
                       ["service", "message", "outcome"])
BUS_REQUEST_SECONDS = Histogram("dovecote_bus_request_duration_seconds",
                                "Time to handle a bus request, by message tag.", ["service", "message"],
                                buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                                         2.5, 5.0, 10.0, 30.0, 120.0))
BUS_IN_FLIGHT = Gauge("dovecote_bus_requests_in_flight", "Bus requests being handled now.", ["service"])
BUS_STREAMS = Counter("dovecote_bus_streams", "Bus streams served, by start message tag and outcome.",
                      ["service", "message", "outcome"])
BUS_STREAMS_OPEN = Gauge("dovecote_bus_streams_open", "Bus streams being served now.", ["service"])


def _tag(message: Any) -> str:
    tag = getattr(type(message), "__struct_config__", None)
    value = getattr(tag, "tag", None)
    return value if isinstance(value, str) else type(message).__name__


def exposition_families(registry: Any = prometheus_client.REGISTRY) -> list[MetricFamily]:
    """The families of a Prometheus registry, as they travel on the bus."""
    return [MetricFamily(name=family.name, type=family.type, help=family.documentation,
                         samples=[MetricSample(s.name, dict(s.labels), float(s.value))
                                  for s in family.samples])
            for family in registry.collect()]


class Dispatcher:
    """Routes a service's bus requests to handlers by message type."""

    def __init__(self, service: str) -> None:
        self.service = service
        self._handlers: dict[type, Handler] = {}
        self._stream_handlers: dict[type, StreamHandler] = {}
        self.families: set[Family] = set()
        """The message families of the registered types: the bus refuses the others at decode."""
        self._inflight = 0
        self._idle = trio.Event()
        self._idle.set()
        self.accepting = True

    def register(self, message_type: type, handler: Handler) -> None:
        """Send every request of ``message_type`` to ``handler``."""
        self.families.add(family_of(message_type))
        self._handlers[message_type] = handler

    def register_stream(self, message_type: type, handler: StreamHandler) -> None:
        """Send every stream opened with a ``message_type`` start message to ``handler``."""
        self.families.add(family_of(message_type))
        self._stream_handlers[message_type] = handler

    async def stream(self, message: Any, stream: Any) -> None:
        """The bus's stream handler: ``handler(start_msg, stream)`` by type.

        A :class:`ServiceError` raised before or during the stream is sent on
        it by the bus as its last frame (the caller's ``receive`` raises it).
        Streams are not counted as in-flight work: a long-lived stream (a
        PTY) is cancelled when the shutdown grace period ends.
        """
        handler = self._stream_handlers.get(type(message))
        tag = _tag(message)
        if handler is None:
            BUS_STREAMS.labels(self.service, tag, "unsupported").inc()
            raise RemoteError("unsupported", f"{self.service} has no stream for {type(message).__name__}")
        if not self.accepting:
            BUS_STREAMS.labels(self.service, tag, "shutting_down").inc()
            raise RemoteError("shutting_down", f"{self.service} is shutting down")
        outcome = "exception"
        open_streams = BUS_STREAMS_OPEN.labels(self.service)
        open_streams.inc()
        try:
            await handler(message, stream)
            outcome = "ok"
        except ServiceError as exc:  # the bus sends it as the stream's last frame
            outcome = "client_error" if exc.status < 500 else "server_error"
            raise
        finally:
            open_streams.dec()
            BUS_STREAMS.labels(self.service, tag, outcome).inc()

    async def __call__(self, message: Any) -> msgspec.Struct:
        handler = self._handlers.get(type(message))
        tag = _tag(message)
        if handler is None:
            BUS_REQUESTS.labels(self.service, tag, "unsupported").inc()
            raise RemoteError("unsupported", f"{self.service} does not handle {type(message).__name__}")
        if not self.accepting and not isinstance(message, Ping | ScrapeMetrics):
            BUS_REQUESTS.labels(self.service, tag, "shutting_down").inc()
            raise RemoteError("shutting_down", f"{self.service} is shutting down")
        self._inflight += 1
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        in_flight = BUS_IN_FLIGHT.labels(self.service)
        in_flight.inc()
        outcome = "exception"
        began = time.perf_counter()
        try:
            reply = await handler(message)
            outcome = "ok"
            return reply
        except ServiceError as exc:  # the bus sends it to the caller, who raises it again
            outcome = "client_error" if exc.status < 500 else "server_error"
            raise
        finally:
            in_flight.dec()
            BUS_REQUESTS.labels(self.service, tag, outcome).inc()
            BUS_REQUEST_SECONDS.labels(self.service, tag).observe(time.perf_counter() - began)
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()

    async def wait_idle(self) -> None:
        """Return once no handler is running."""
        while self._inflight:
            await self._idle.wait()


class ServiceContext(Generic[CfgT]):
    """What a running service gets: its config, bus, database and nursery."""

    def __init__(self, name: str, config: CfgT, bus: Any, db: Database | None,
                 nursery: trio.Nursery) -> None:
        self.name = name
        self.config = config
        self.bus = bus
        self.db = db
        self.nursery = nursery
        self.dispatcher = Dispatcher(name)
        self.stopping = trio.Event()
        self.started_at = time.monotonic()
        self.health_details: dict[str, str] = {"pid": str(os.getpid())}
        self.dispatcher.register(Ping, self._ping)
        self.dispatcher.register(ScrapeMetrics, self._scrape)

    @property
    def data_dir(self) -> Path:
        """The service's data directory (created on start)."""
        return Path(self.config.data_dir)

    def handle(self, message_type: type, handler: Handler) -> None:
        """Answer bus requests of ``message_type`` with ``handler``."""
        self.dispatcher.register(message_type, handler)

    def handle_stream(self, message_type: type, handler: StreamHandler) -> None:
        """Serve bus streams opened with a ``message_type`` start message with ``handler``."""
        self.dispatcher.register_stream(message_type, handler)

    def stop(self) -> None:
        """Begin a graceful shutdown."""
        self.stopping.set()

    async def _ping(self, _: Ping) -> Pong:
        return Pong(
            service=self.name,
            status="stopping" if self.stopping.is_set() else "ok",
            version=VERSION,
            uptime_s=round(time.monotonic() - self.started_at, 3),
            details=dict(self.health_details),
        )

    async def _scrape(self, _: ScrapeMetrics) -> Exposition:
        return Exposition(service=self.name, host_id=self.config.host_id,
                          families=exposition_families())


class MainFn(Protocol[CfgT]):
    def __call__(self, ctx: ServiceContext[CfgT], *,
                 task_status: trio.TaskStatus[None] = ...) -> Awaitable[None]: ...


class ServiceSpec(msgspec.Struct, Generic[CfgT], frozen=True, kw_only=True):
    """Describes a service: its bus name, config class, tables and main task.

    Attributes:
        name: bus service name (also the log ``service`` field).
        config_cls: the service's typed config.
        main: ``async def main(ctx, *, task_status)``; it reports ready, then
            runs until ``ctx.stopping`` is set (or forever; it is cancelled
            after the grace period).
        schema: the PostgreSQL schema the service owns, or None if stateless.
        migrations: ``"package.module:folder"`` holding ``NNNN_name.sql`` files.
        extra_names: more bus names the service answers on (``vmmgr.<host>``).
        stop_grace_s: how long its stop may take, if longer than
            ``shutdown_grace_s`` (vmmgr pauses its capsules when it stops).
    """

    name: str
    config_cls: type[CfgT]
    main: Any
    schema: str | None = None
    migrations: str | None = None
    extra_names: Callable[[CfgT], list[str]] | None = None
    stop_grace_s: Callable[[CfgT], float] | None = None


async def serve_until_stopped(ctx: ServiceContext[Any], *,
                              task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """A ``main`` for a service whose whole work is answering bus requests."""
    task_status.started()
    await ctx.stopping.wait()


def _migrations_dir(ref: str) -> Path:
    package, _, folder = ref.partition(":")
    return Path(str(resources.files(package).joinpath(folder)))


async def serve_service(spec: ServiceSpec[CfgT], config: CfgT, *,
                        task_status: trio.TaskStatus[ServiceContext[CfgT]] = trio.TASK_STATUS_IGNORED,
                        environ: dict[str, str] | None = None) -> None:
    """Run one service until it is stopped; reports its context when ready."""
    env = dict(os.environ if environ is None else environ)
    await trio.Path(config.data_dir).mkdir(parents=True, exist_ok=True)
    async with AsyncExitStack() as stack:
        bus = await stack.enter_async_context(open_bus(
            BusEndpoints.from_env(env), name=spec.name, keypair=keypair_from_env(env)))
        db: Database | None = None
        starts = 0
        if spec.schema:
            url = config.database_url
            if not url:
                url = await trio.to_thread.run_sync(resolve_database_url, env, Path(config.data_dir))
            database = await stack.enter_async_context(open_database(url, schema=spec.schema))
            if spec.migrations:
                await apply_migrations(database, spec.schema, _migrations_dir(spec.migrations))
                starts = await _record_start(database, config.host_id)
            db = database
        async with trio.open_nursery() as nursery:
            ctx: ServiceContext[CfgT] = ServiceContext(spec.name, config, bus, db, nursery)
            if db is not None and spec.migrations:
                ctx.health_details["starts"] = str(starts)
            main_done = trio.Event()

            async def run_main(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
                try:
                    await spec.main(ctx, task_status=task_status)
                finally:
                    main_done.set()

            # main registers its handlers before it reports ready, so the
            # service joins the bus only once it can answer everything.
            await nursery.start(run_main)
            names = [spec.name, *(spec.extra_names(config) if spec.extra_names else [])]
            for bus_name in names:
                await nursery.start(partial(bus.serve, stream_handler=ctx.dispatcher.stream,
                                            accepts=ctx.dispatcher.families),
                                    bus_name, ctx.dispatcher)
            log.info("service ready", extra={"bus_names": names})
            task_status.started(ctx)
            await ctx.stopping.wait()
            grace_s = spec.stop_grace_s(config) if spec.stop_grace_s else config.shutdown_grace_s
            log.info("service stopping", extra={"grace_s": grace_s})
            ctx.dispatcher.accepting = False
            with trio.move_on_after(grace_s):
                await main_done.wait()
                await ctx.dispatcher.wait_idle()
            nursery.cancel_scope.cancel()
    log.info("service stopped")


async def _record_start(db: Database, host_id: str) -> int:
    await db.execute("INSERT INTO service_starts (host_id, pid) VALUES (%s, %s)", (host_id, os.getpid()))
    return int(await db.fetchval("SELECT count(*) FROM service_starts WHERE host_id = %s", (host_id,)))


async def watch_parent(stop: Callable[[], None], parent_pid: int, interval_s: float = 1.0) -> None:
    """Call ``stop`` once the process that started us is gone.

    ``dovecote up`` sets ``DOVECOTE_PARENT_PID``; if the supervisor dies
    without stopping its children (SIGKILL), they notice here and shut down.
    """
    while os.getppid() == parent_pid:  # noqa: ASYNC110 - no event exists for a parent's death
        await trio.sleep(interval_s)
    log.warning("parent process gone; stopping", extra={"parent_pid": parent_pid})
    stop()


async def _signal_stop(ctx_box: list[ServiceContext[Any]], cancel: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        count = 0
        async for signum in signals:
            count += 1
            log.info("signal received", extra={"signal": signal.Signals(signum).name})
            if ctx_box and count == 1:
                ctx_box[0].stop()
            else:
                cancel.cancel()


GC_THRESHOLDS = (20_000, 20, 20)
"""The cyclic collector's thresholds in a service process (Python's are 700, 10, 10).

A request allocates many container objects (its tasks' coroutines and cancel
scopes, the bus envelope, rows, the reply), nearly all freed by reference
counting, so with the default first threshold a busy service ran the collector
over and over, each pass scanning the young objects of every request in flight.
Measured on the agent runtime's claim → complete loop (``benchmarks/agents.py``,
four alternated runs), these thresholds and :func:`gc.freeze` at ready took
about 5% off the gateway's CPU per round trip (1.23-1.26 → 1.16-1.17 ms) and a
little off the agents service's. Cycles are still collected, a little later:
the young generation holds up to 20 000 objects before a pass."""


def _tune_gc_at_ready() -> None:
    """Move what the service built at start (modules, app, routes, pools) out of the collector's
    sight (:func:`gc.freeze`): it lives as long as the process, and was rescanned by every
    full collection."""
    gc.collect()
    gc.freeze()


def run_service(spec: ServiceSpec[CfgT], environ: dict[str, str] | None = None) -> int:
    """Run ``spec`` as this process's only service; returns the exit status."""
    env = dict(os.environ if environ is None else environ)
    gc.set_threshold(*GC_THRESHOLDS)
    try:
        config = load_config(spec.config_cls, env)
    except Exception as exc:  # ConfigError: say it plainly and refuse to start
        print(f"dovecote {spec.name}: {exc}", file=sys.stderr)
        return 2
    setup_logging(spec.name, config.log_level, config.log_format, log_dir=Path(config.data_dir) / "logs",
                  max_bytes=config.log_file_max_bytes, backups=config.log_file_backups)

    async def main() -> None:
        box: list[ServiceContext[Any]] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_signal_stop, box, nursery.cancel_scope)

            async def run(*, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
                try:
                    await serve_service(spec, config, task_status=task_status, environ=env)
                finally:
                    nursery.cancel_scope.cancel()  # the service ended: so does the watcher

            box.append(await nursery.start(run))
            _tune_gc_at_ready()
            parent = env.get("DOVECOTE_PARENT_PID", "")
            if parent.isdigit():
                nursery.start_soon(watch_parent, box[0].stop, int(parent))

    try:
        trio.run(main)
    except KeyboardInterrupt:
        return 130
    except Exception:
        log.exception("service crashed")
        return 1
    return 0
