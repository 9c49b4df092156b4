"""The bus as services see it: requests, serving, events and streams, no zmq.

One :class:`Bus` per process (or per service) is opened with
:func:`open_bus`.  It owns:

- one DEALER socket for requests and caller-side streams, shared by every
  task: a receiver task correlates replies by a per-request id, so any number
  of tasks may wait on requests at once;
- one DEALER socket per :meth:`Bus.serve` call (a worker), reconnected with a
  fresh socket whenever the broker goes silent for ``liveness`` heartbeats or
  tells the worker it does not know it (broker restart);
- one PUB socket (lazily) for :meth:`Bus.publish`, and one SUB socket per
  :meth:`Bus.subscribe` block.

Requests never hang: each one waits at most ``timeout`` and then raises
:class:`BusTimeout`; a lost worker turns into ``RemoteError("worker_lost")``
as soon as the broker notices.  RPC sockets set ``ZMQ_IMMEDIATE`` so nothing is
queued for a broker that is not there.

The request id in ``dovecote.libs.context.request_id`` is copied into every
envelope and restored around the handler on the worker side.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Container
from typing import Any, overload

import trio
import zmq

from dovecote.libs.context import bind_request_id, new_request_id, request_id
from dovecote.libs.errors import ServiceError

from . import protocol as P
from .curve import Keypair, apply_client, generate_keypair
from .endpoints import BusEndpoints
from .errors import (
    INTERNAL,
    PROTOCOL,
    UNSUPPORTED,
    WORKER_LOST,
    BusClosed,
    BusError,
    BusTimeout,
    RemoteError,
)
from .messages.base import Family, Message, R, Request
from .messages.common import Failure, failure_of, refusal
from .stream import Stream
from .zmqtrio import TrioSocket

log = logging.getLogger("dovecote.bus")

Handler = Callable[[Any], Awaitable[Message]]
StreamHandler = Callable[[Any, Stream], Awaitable[None]]

_PROBE = b"\x00probe."


class _Call:
    """One request waiting for its reply: the receiver task hands the frames over."""

    __slots__ = ("frames", "lost", "over", "task")

    def __init__(self) -> None:
        self.frames: list[bytes] | None = None
        self.task: trio.lowlevel.Task | None = None  # parked in wait()
        self.over = False  # the request has returned: the deadline timer may forget it
        self.lost = False  # the broker connection dropped: no reply can come

    def finish(self, frames: list[bytes] | None) -> None:
        if self.frames is None:
            self.frames = frames
        task, self.task = self.task, None
        if task is not None:
            trio.lowlevel.reschedule(task)

    async def wait(self) -> None:
        """Park until :meth:`finish` (cancellable; a cheaper trio.Event.wait)."""
        if self.frames is not None:
            await trio.lowlevel.checkpoint()
            return
        self.task = trio.lowlevel.current_task()

        def abort(_: Any) -> trio.lowlevel.Abort:
            self.task = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)


class Subscription:
    """Events on the subscribed prefixes: ``async for topic, event in sub``."""

    def __init__(self, sock: TrioSocket) -> None:
        self._sock = sock

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> tuple[str, Message]:
        return await self.receive()

    async def receive(self) -> tuple[str, Message]:
        """Wait for the next event; returns ``(topic, event)``."""
        while True:
            try:
                frames = await self._sock.recv_multipart()
            except trio.ClosedResourceError:
                raise BusClosed("subscription closed") from None
            if len(frames) != 2 or frames[0].startswith(_PROBE):
                continue
            try:
                msg, _ = P.decode_envelope(frames[1])
            except P.ProtocolError as exc:
                log.warning("dropping undecodable event on %r: %s", frames[0], exc)
                continue
            return frames[0].decode(), msg


class Bus:
    """A connection to the broker.  Create with :func:`open_bus`."""

    def __init__(self, endpoints: BusEndpoints, name: str, *, keypair: Keypair | None = None,
                 heartbeat: float = 1.0, liveness: int = 3,
                 context: zmq.Context[Any] | None = None) -> None:
        self.endpoints = endpoints
        self.name = name
        self.heartbeat = heartbeat
        self.liveness = liveness
        self._ctx = context or zmq.Context.instance()
        if endpoints.server_key and keypair is None:
            keypair = generate_keypair()  # encrypted, but anonymous to the allow-list
        self._keypair = keypair
        self._ids = itertools.count(1)
        self._calls: dict[bytes, _Call] = {}
        self._streams: dict[bytes, Stream] = {}
        self._closed = False
        self._rpc = TrioSocket(self._socket(zmq.DEALER, self.endpoints.rpc))
        self._heard_broker = False  # a reply came through the request socket (_watch_broker)
        # Publishing uses an XPUB socket: it hears the broker replay its current
        # subscriptions on connect, so early publishes can wait for them (see publish).
        self._pub = TrioSocket(self._socket(zmq.XPUB, self.endpoints.pub))
        self._pub_ready = trio.Event()
        self._pub_ready_deadline = 0.0
        # Request deadlines: one timer task and a heap instead of a cancel scope
        # per request.  Entries of finished calls are dropped lazily.
        self._deadlines: list[tuple[float, int, _Call]] = []
        self._timer_scope: trio.CancelScope | None = None

    # -- sockets --------------------------------------------------------------------

    def _socket(self, kind: int, endpoint: str) -> zmq.Socket[Any]:
        sock = self._ctx.socket(kind)
        sock.linger = 0
        if kind == zmq.DEALER:
            sock.immediate = True
            sock.sndhwm = sock.rcvhwm = 100_000
        if self.endpoints.server_key:
            assert self._keypair is not None
            apply_client(sock, self.endpoints.server_key, self._keypair)
        sock.connect(endpoint)
        return sock

    def _check_open(self) -> None:
        if self._closed:
            raise BusClosed("bus is closed")

    async def _receive_replies(self) -> None:
        await self._rpc.deliver(self._on_reply)

    def _on_reply(self, frames: list[bytes]) -> None:
        """A message on the request socket: hand a reply to its call, a frame to its stream.

        Runs in the receiver task, or in a requesting task right after its send
        (zmqtrio's delivery mode): a reply that is already there is delivered
        without a task switch.
        """
        self._heard_broker = True
        try:
            cmd = P.check(frames, P.C_HDR, 2)
            if cmd == P.STREAM:
                stream = self._streams.get(frames[1])
                if stream is not None:
                    stream._feed(frames[2], P.unpack_int(frames[3]), frames[4])
                return
            call = self._calls.get(frames[0][P.CORR])
            if call is not None and call.frames is None:
                call.finish(frames)
        except (P.ProtocolError, IndexError) as exc:
            log.warning("dropping malformed reply: %s", exc)

    async def _expire_requests(self) -> None:
        """Wake each request whose deadline passed (with no reply: a timeout)."""
        heap = self._deadlines
        while True:
            now = trio.current_time()
            while heap:
                deadline, _, call = heap[0]
                if call.over:
                    heapq.heappop(heap)
                elif deadline <= now:
                    heapq.heappop(heap)
                    call.finish(None)
                else:
                    break
            with trio.CancelScope(deadline=heap[0][0] if heap else math.inf) as scope:
                self._timer_scope = scope
                try:
                    await trio.sleep_forever()
                finally:
                    self._timer_scope = None

    async def _watch_subscriptions(self) -> None:
        with contextlib.suppress(trio.ClosedResourceError):
            while True:
                await self._pub.recv_multipart()
                self._pub_ready.set()

    async def _watch_broker(self) -> None:
        """Fail the requests and streams in flight when the connection to the broker drops.

        A broker that dies (or restarts) forgets the requests it was routing: their
        replies can never come. Without this they would wait out their whole
        timeout (an exec's is its command's timeout plus a grace), and so would the
        HTTP clients behind them. Requests sent after the drop wait for the new
        broker (``ZMQ_IMMEDIATE``), as at start.
        """
        monitor = TrioSocket(self._rpc.socket.get_monitor_socket(zmq.EVENT_DISCONNECTED))
        try:
            while True:
                frames = await monitor.recv_multipart()
                # Only a broker that answered was lost: a connection refused at its
                # handshake (an unknown CURVE key) leaves its requests to time out.
                if int.from_bytes(frames[0][:2], "little") == zmq.EVENT_DISCONNECTED \
                        and self._heard_broker:
                    self._heard_broker = False
                    log.warning("bus %s: the broker connection dropped; failing %d requests and "
                                "%d streams in flight", self.name, len(self._calls), len(self._streams))
                    self._broker_lost()
        except trio.ClosedResourceError:
            return
        finally:
            # Stop the socket's monitor before its reader goes (libzmq would otherwise
            # keep writing events to a closed pipe).
            with contextlib.suppress(zmq.ZMQError):
                self._rpc.socket.disable_monitor()
            monitor.close()

    def _broker_lost(self) -> None:
        for call in list(self._calls.values()):
            if call.frames is None:
                call.lost = True
                call.finish(None)
        for stream in list(self._streams.values()):
            stream._fail(RemoteError(WORKER_LOST, "the bus broker went away"))

    def _close(self) -> None:
        self._closed = True
        self._rpc.close()
        self._pub.close()
        for call in self._calls.values():
            call.finish(None)
        for stream in self._streams.values():
            stream._fail(RemoteError("closed", "bus closed"))

    # -- requests -------------------------------------------------------------------

    @overload
    async def request(self, service: str, msg: Request[R], *,
                      timeout: float = 5.0) -> R: ...  # noqa: ASYNC109

    @overload
    async def request(self, service: str, msg: Message, *,
                      timeout: float = 5.0) -> Any: ...  # noqa: ASYNC109

    async def request(
        self, service: str, msg: Message, *, timeout: float = 5.0  # noqa: ASYNC109
    ) -> Any:
        """Send ``msg`` to a worker of ``service`` and return its decoded reply.

        A :class:`Request` subclass declares its reply type: the reply is
        decoded as that type (anything else is ``RemoteError("protocol")``).
        A refusal never comes back as a value: it is raised. A message whose
        class says ``idempotent = True`` (a lookup, a listing) is sent again,
        within the same deadline, when the worker that had it was lost (say a
        host that went silent): another worker of the service answers.

        Args:
            service: Service name (``"auth"``, ``"vmmgr.<host_id>"``).
            msg: The request message.
            timeout: Seconds to wait for the reply, queueing in the broker included.

        Raises:
            ServiceError: the service refused (the subclass of its status, e.g.
                ``NotFound``, with ``code``, ``message``, ``details``).
            BusTimeout: no reply within ``timeout``.
            RemoteError: the handler failed (its code, or ``internal``), the worker
                was lost (``worker_lost``) or no worker came (``no_worker``).
            BusClosed: the bus was closed.
        """
        if not msg.idempotent:
            return await self._request_once(service, msg, timeout)
        deadline = trio.current_time() + timeout
        while True:
            try:
                return await self._request_once(service, msg, max(0.0, deadline - trio.current_time()))
            except RemoteError as exc:
                if exc.code != WORKER_LOST or deadline - trio.current_time() < 0.1:
                    raise

    async def _request_once(self, service: str, msg: Message, timeout: float) -> Any:  # noqa: ASYNC109
        self._check_open()
        await trio.lowlevel.checkpoint_if_cancelled()
        n = next(self._ids)
        corr = P.pack_u64(n)
        frames = P.client_request(service, corr, timeout,
                                  P.encode_envelope(msg, request_id.get()))
        deadline = trio.current_time() + timeout
        call = _Call()
        self._calls[corr] = call
        try:
            try:
                self._rpc.send_multipart_nowait(frames)
            except trio.WouldBlock:  # not connected yet, or the queue is full
                with trio.move_on_at(deadline):
                    await self._rpc.send_multipart(frames)
                    await self._wait_reply(call, deadline, n)
            else:
                await self._wait_reply(call, deadline, n)
        except trio.ClosedResourceError:
            raise BusClosed("bus is closed") from None
        finally:
            call.over = True
            del self._calls[corr]
        reply_frames = call.frames
        if reply_frames is None:
            self._check_open()
            if call.lost:
                raise RemoteError(WORKER_LOST, "the bus broker went away before the reply")
            raise BusTimeout(f"no reply from {service!r} within {timeout} s")
        frames = reply_frames
        if frames[0][P.CMD] == P.ERROR:
            err = P.decode_error(frames[1])
            raise RemoteError(err.code, err.message)
        try:
            if isinstance(msg, Request):
                reply = P.decode_reply(frames[1], msg.reply_decoder())
            else:
                reply, _ = P.decode_envelope(frames[1])
        except P.ProtocolError as exc:
            raise RemoteError(PROTOCOL, str(exc)) from None
        if type(reply) is Failure:
            raise refusal(reply)
        return reply

    async def _wait_reply(self, call: _Call, deadline: float, n: int) -> None:
        """Park until the reply arrives or ``deadline`` passes (then ``call.frames`` is None)."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        timer = self._timer_scope
        if timer is None:  # no timer task (a Bus used outside open_bus)
            with trio.move_on_at(deadline):
                await call.wait()
            return
        heapq.heappush(self._deadlines, (deadline, n, call))
        if deadline < timer.deadline:
            timer.deadline = deadline
        await call.wait()

    # -- streams --------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def open_stream(self, service: str, start: Message, *, timeout: float = 10.0,  # noqa: ASYNC109
                          window: int = 16) -> AsyncIterator[Stream]:
        """Open a stream to a worker of ``service``; ``start`` tells it what to do.

        Args:
            service: Service name.
            start: The message the worker's stream handler receives first.
            timeout: Seconds to wait until a worker accepts the stream (not a limit
                on the stream's duration).
            window: Frames each side may have in flight (credits).

        Raises:
            BusTimeout: no worker accepted within ``timeout``.
            RemoteError: refused (``no_worker``, ``unsupported``) or failed later.
        """
        self._check_open()
        sid = P.pack_u64(next(self._ids))
        rpc = self._rpc

        async def send_frame(kind: bytes, seq: int, payload: bytes) -> None:
            await rpc.send_multipart(P.client_stream(sid, kind, seq, payload))

        stream = Stream(send_frame, window=window, send_credits=0)
        self._streams[sid] = stream
        try:
            with trio.move_on_after(timeout):
                await rpc.send_multipart(P.client_stream_open(
                    service, sid, timeout, window, P.encode_envelope(start, request_id.get())))
                await stream._wait_accepted()
            if not stream._accepted:
                raise BusTimeout(f"no worker of {service!r} accepted the stream in {timeout} s")
            yield stream
        finally:
            del self._streams[sid]
            if not stream.peer_closed and not rpc.closed:
                with contextlib.suppress(trio.WouldBlock, trio.ClosedResourceError):
                    rpc.send_multipart_nowait(P.client_stream(sid, P.CANCEL, 0))

    # -- serving --------------------------------------------------------------------

    async def serve(self, service: str, handler: Handler, *,
                    stream_handler: StreamHandler | None = None, max_concurrency: int = 64,
                    accepts: Container[Family] | None = None,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve requests for ``service`` until cancelled (never returns).

        Args:
            service: The name to register with the broker.
            handler: ``async def handler(msg) -> reply``.  A raised :class:`BusError`
                reaches the caller with its ``code``; anything else as ``internal``.
            stream_handler: ``async def handler(start_msg, stream)`` for streams.
            max_concurrency: Handlers running at once (advertised to the broker).
            accepts: The message families this service serves (say
                ``{capsules.FAMILY, health.FAMILY}``; may grow while serving): a
                request or stream of another family is answered ``unsupported``
                without reaching ``handler``. None accepts every family.
            task_status: Started once the broker has acknowledged the registration.
        """
        self._check_open()
        limiter = trio.CapacityLimiter(max_concurrency)
        started = False

        def mark_started() -> None:
            nonlocal started
            if not started:
                started = True
                task_status.started()

        while True:
            await self._serve_once(service, handler, stream_handler, limiter, max_concurrency,
                                   accepts, mark_started)
            log.info("worker %s: reconnecting to the broker", service)
            await trio.sleep(min(0.1, self.heartbeat))

    async def _serve_once(self, service: str, handler: Handler,
                          stream_handler: StreamHandler | None, limiter: trio.CapacityLimiter,
                          capacity: int, accepts: Container[Family] | None,
                          mark_started: Callable[[], None]) -> None:
        sock = TrioSocket(self._socket(zmq.DEALER, self.endpoints.rpc))
        streams: dict[tuple[bytes, bytes], Stream] = {}
        last_heard = trio.current_time()
        try:
            async with trio.open_nursery() as nursery:

                async def heartbeats() -> None:
                    while True:
                        await trio.sleep(self.heartbeat)
                        if trio.current_time() - last_heard > self.heartbeat * self.liveness:
                            log.warning("worker %s: broker silent, reconnecting", service)
                            nursery.cancel_scope.cancel()
                            return
                        with contextlib.suppress(trio.WouldBlock):
                            sock.send_multipart_nowait(P.worker_heartbeat())

                def on_message(frames: list[bytes]) -> None:
                    # Synchronous (zmqtrio's delivery mode): it starts handler tasks.
                    nonlocal last_heard
                    last_heard = trio.current_time()
                    try:
                        cmd = P.check(frames, P.W_HDR)
                        if cmd == P.REQUEST:
                            if len(frames) == 2 and len(frames[0]) > P.REQ_TAIL:
                                nursery.start_soon(self._handle_request, sock, handler, limiter,
                                                   frames, accepts)
                            else:
                                log.warning("worker %s: malformed request dropped", service)
                        elif cmd == P.STREAM:
                            stream = streams.get((frames[1], frames[2]))
                            if stream is not None:
                                stream._feed(frames[3], P.unpack_int(frames[4]), frames[5])
                        elif cmd == P.STREAM_OPEN:
                            nursery.start_soon(self._handle_stream, sock, stream_handler, limiter,
                                               frames, streams, accepts)
                        elif cmd == P.DISCONNECT:
                            log.info("worker %s: broker asked to reconnect", service)
                            nursery.cancel_scope.cancel()
                            return
                    except (P.ProtocolError, IndexError, ValueError) as exc:
                        log.warning("worker %s: dropping a malformed message: %s", service, exc)
                        return
                    mark_started()  # HEARTBEAT, incl. the acknowledgement of READY

                nursery.start_soon(heartbeats)
                await sock.send_multipart(P.worker_ready(service, capacity, self.heartbeat))
                await sock.deliver(on_message)
        finally:
            if not sock.closed:
                with contextlib.suppress(trio.WouldBlock, trio.ClosedResourceError):
                    sock.send_multipart_nowait(P.worker_disconnect())
            sock.close()

    async def _handle_request(self, sock: TrioSocket, handler: Handler,
                              limiter: trio.CapacityLimiter, frames: list[bytes],
                              accepts: Container[Family] | None) -> None:
        head, body = frames
        corr, timeout_ms, client = head[P.CORR], head[P.REQ_TIMEOUT], head[P.REQ_TAIL:]
        # The broker never sends more than ``max_concurrency`` requests at once,
        # so the limiter is normally free: take it without a schedule point.
        try:
            limiter.acquire_nowait()
        except trio.WouldBlock:
            await limiter.acquire()
        try:
            try:
                msg, rid = P.decode_envelope(body, accepts)
            except P.ProtocolError as exc:
                await sock.send_multipart(P.worker_error(client, corr, exc.code, str(exc)))
                return
            # This task runs in its own copy of the context: no need to reset.
            rid = rid or new_request_id()
            request_id.set(rid)
            with trio.CancelScope(deadline=trio.current_time() + P.unpack_int(timeout_ms) / 1000
                                  + 1.0):
                try:
                    reply = await handler(msg)
                    if not isinstance(reply, Message):
                        raise TypeError(f"handler returned {type(reply).__name__}, not a Message")
                    out = P.worker_reply(client, corr, P.encode_envelope(reply, rid))
                except ServiceError as exc:  # a refusal travels as a Failure reply
                    out = P.worker_reply(client, corr, P.encode_envelope(failure_of(exc), rid))
                except BusError as exc:
                    out = P.worker_error(client, corr, exc.code, getattr(exc, "message", str(exc)))
                except Exception as exc:
                    log.exception("handler for %r failed", type(msg).__name__)
                    out = P.worker_error(client, corr, INTERNAL, f"{type(exc).__name__}: {exc}")
                await sock.send_multipart(out)
        finally:
            limiter.release()

    async def _handle_stream(self, sock: TrioSocket, stream_handler: StreamHandler | None,
                             limiter: trio.CapacityLimiter, frames: list[bytes],
                             streams: dict[tuple[bytes, bytes], Stream],
                             accepts: Container[Family] | None) -> None:
        _, client, sid, _timeout_ms, window_b, body = frames

        async def send_frame(kind: bytes, seq: int, payload: bytes) -> None:
            await sock.send_multipart(P.worker_stream(client, sid, kind, seq, payload))

        if stream_handler is None:
            await send_frame(P.CLOSE, 0, P.encode_error(UNSUPPORTED, "no stream handler"))
            return
        window = max(1, P.unpack_int(window_b))
        stream = Stream(send_frame, window=window, send_credits=window)
        streams[(client, sid)] = stream
        error = b""
        try:
            async with limiter:
                msg, rid = P.decode_envelope(body, accepts)
                await send_frame(P.CREDIT, window, b"")  # accept
                with bind_request_id(rid), trio.CancelScope() as scope:
                    stream.cancel_scope = scope
                    try:
                        await stream_handler(msg, stream)
                    except ServiceError as exc:  # a refusal: the stream's last message
                        with contextlib.suppress(BusError, trio.BrokenResourceError,
                                                 trio.ClosedResourceError):
                            await stream.send(failure_of(exc))
                    except BusError as exc:
                        error = P.encode_error(exc.code, getattr(exc, "message", str(exc)))
                    except Exception as exc:
                        log.exception("stream handler failed")
                        error = P.encode_error(INTERNAL, f"{type(exc).__name__}: {exc}")
        except P.ProtocolError as exc:
            error = P.encode_error(exc.code, str(exc))
        finally:
            del streams[(client, sid)]
        await send_frame(P.CLOSE, 0, error)

    # -- events ---------------------------------------------------------------------

    async def publish(self, topic: str, event: Message) -> None:
        """Publish ``event`` on the dotted ``topic`` (fire and forget).

        Events nobody subscribes to are dropped.  Right after :func:`open_bus`
        (for at most ``publish_wait`` seconds) a publish waits until the broker
        has told this bus its subscriptions, so a service's first events are
        not lost while the connection is being set up.
        """
        self._check_open()
        if not self._pub_ready.is_set():
            with trio.move_on_at(self._pub_ready_deadline):
                await self._pub_ready.wait()
        await self._pub.send_multipart(
            [topic.encode(), P.encode_envelope(event, request_id.get())])

    @contextlib.asynccontextmanager
    async def subscribe(self, *prefixes: str, ready_timeout: float = 5.0
                        ) -> AsyncIterator[Subscription]:
        """Receive events whose topic starts with one of ``prefixes``.

        The block starts once the subscription has reached the broker (checked
        with a private probe event, for at most ``ready_timeout`` seconds), so
        events published after that are not lost to zmq's "slow joiner" effect.
        """
        self._check_open()
        sock = TrioSocket(self._socket(zmq.SUB, self.endpoints.sub))
        try:
            for prefix in prefixes or ("",):
                sock.socket.setsockopt(zmq.SUBSCRIBE, prefix.encode())
            await self._wait_subscribed(sock, ready_timeout)
            yield Subscription(sock)
        finally:
            sock.close()

    async def _wait_subscribed(self, sock: TrioSocket, ready_timeout: float) -> None:
        probe = _PROBE + P.pack_u64(next(self._ids)) + id(sock).to_bytes(8, "big")
        sock.socket.setsockopt(zmq.SUBSCRIBE, probe)
        delay = 0.005
        with trio.move_on_after(ready_timeout):
            while True:
                await self._pub.send_multipart([probe, b""])
                with trio.move_on_after(delay):
                    while True:
                        frames = await sock.recv_multipart()
                        if frames[0] == probe:
                            break
                    break
                delay = min(delay * 2, 0.2)
        sock.socket.setsockopt(zmq.UNSUBSCRIBE, probe)


@contextlib.asynccontextmanager
async def open_bus(endpoints: BusEndpoints, name: str, *, keypair: Keypair | None = None,
                   heartbeat: float = 1.0, liveness: int = 3, publish_wait: float = 0.5
                   ) -> AsyncIterator[Bus]:
    """Connect to the broker for the duration of the block.

    Args:
        endpoints: The broker's endpoints (e.g. ``BusEndpoints.from_env()``).
        name: This process's name (for logs).
        keypair: CURVE client keypair; when ``endpoints.server_key`` is set and this
            is None an ephemeral keypair is used (works only without an allow-list).
        heartbeat: Worker heartbeat interval in seconds.
        liveness: Missed heartbeats before a worker reconnects to the broker.
        publish_wait: How long after opening a publish may wait for the broker's
            subscriptions to arrive (see :meth:`Bus.publish`).
    """
    bus = Bus(endpoints, name, keypair=keypair, heartbeat=heartbeat, liveness=liveness)
    bus._pub_ready_deadline = trio.current_time() + publish_wait
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(bus._receive_replies)
            nursery.start_soon(bus._expire_requests)
            nursery.start_soon(bus._watch_subscriptions)
            nursery.start_soon(bus._watch_broker)
            try:
                yield bus
            finally:
                nursery.cancel_scope.cancel()
    finally:
        bus._close()
