"""The broker: RPC routing (Majordomo-like) and event forwarding (XSUB -> XPUB).

Why a synchronous loop: the broker is its own process, does no application
work, and sits on every request's path twice.  A plain loop of blocking
receives on the ROUTER is the fastest and simplest thing that can do that in
Python: it forwards each frame as received (bodies are never decoded), and a
blocking receive costs half the system calls of a poll over several sockets
(libzmq checks its mailbox with a poll and a getpid per socket looked at).
Nothing else is on that path: events never pass through Python (the XSUB ->
XPUB forwarding, and subscriptions the other way, is libzmq's own proxy,
``zmq.proxy_steerable``, in a thread that does not hold the GIL), and CURVE's
ZAP requests are answered by a thread of their own.  The receive times out
at the next tick (worker expiry, queued deadline) and at least every
``STOP_POLL_S``, when the loop also sees :meth:`Broker.stop`.  All routing
decisions live in :class:`BrokerCore`, which does no I/O: it takes frames and
the time, and emits frames through a ``send`` callable, so it is tested
without sockets (``tests/bus/test_broker_core.py``).

Routing rules:

- Workers register with READY(service, capacity, heartbeat).  Several workers
  per service are load-balanced least-recently-used: the request goes to the
  worker that has waited longest among those with spare capacity.
- A request for a service with no free worker is queued until a worker frees
  up or registers, or until shortly before the client's deadline; then the
  client gets ``no_worker``.
- A worker that misses ``liveness`` heartbeats (or says DISCONNECT, or whose
  routing id becomes unreachable) is dropped and each of its in-flight
  requests and streams fails at once with ``worker_lost``.
- Stream frames are forwarded between the client and the worker that accepted
  the stream; the broker forgets the stream when the worker sends CLOSE.

Running it:

- In a process: ``run_broker(endpoints)`` blocks until SIGTERM/SIGINT, or
  ``python -m dovecote.bus.broker`` (endpoints from ``DOVECOTE_BUS_*``).
- In Trio (tests, ``dovecote up``): ``async with open_broker(endpoints) as b:``
  binds the sockets in the calling thread (bind errors raise there), runs the
  same loop in a worker thread, and stops it cleanly on exit through an
  inproc control socket.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import trio
import zmq

from dovecote.libs.logs import get_logger

from . import protocol as P
from .curve import BrokerSecurity
from .endpoints import BusEndpoints
from .errors import NO_WORKER, WORKER_LOST

log = get_logger("dovecote.bus.broker")

Send = Callable[[list[bytes]], None]

# The binding's own methods with integer flags (see zmqtrio).
_send: Any = zmq.backend.Socket.send
_recv: Any = zmq.backend.Socket.recv
_get: Any = zmq.backend.Socket.get
_NOBLOCK = int(zmq.NOBLOCK)
_SNDMORE_NOBLOCK = int(zmq.SNDMORE | zmq.NOBLOCK)
_RCVMORE = zmq.RCVMORE
_EVENTS = zmq.EVENTS  # the enum member: the binding converts options to it anyway
_POLLIN = int(zmq.POLLIN)
_RCVTIMEO = zmq.RCVTIMEO
_set: Any = zmq.backend.Socket.set

STOP_POLL_S = 0.05
"""How long a stop request may wait for the routing loop's blocking receive."""

# Head frames the broker sends (header and command, see protocol.py).
_W_REQUEST = P.W_HDR + P.REQUEST
_W_STREAM_OPEN = P.W_HDR + P.STREAM_OPEN
_W_STREAM = P.W_HDR + P.STREAM
_W_HEARTBEAT = P.W_HDR + P.HEARTBEAT
_W_DISCONNECT = P.W_HDR + P.DISCONNECT
_C_ERROR = P.C_HDR + P.ERROR
_C_STREAM = P.C_HDR + P.STREAM


@dataclass(eq=False)
class _Worker:
    ident: bytes
    service: str
    capacity: int
    heartbeat: float
    expiry: float
    inflight: dict[tuple[bytes, bytes, bytes], None] = field(default_factory=dict)


@dataclass
class _Queued:
    kind: bytes  # P.REQUEST or P.STREAM_OPEN
    client: bytes
    corr: bytes
    deadline: float
    expire_at: float
    frames: list[bytes]  # the tail to forward after [W_HDR, kind, client]


@dataclass(eq=False)
class _Service:
    name: str
    workers: OrderedDict[bytes, _Worker] = field(default_factory=OrderedDict)
    # The workers with spare capacity, least recently used first: dispatching
    # takes the first one, so it never scans busy workers.
    free: OrderedDict[bytes, _Worker] = field(default_factory=OrderedDict)
    queue: deque[_Queued] = field(default_factory=deque)


class BrokerCore:
    """The broker's routing state machine, free of I/O.

    Args:
        send: Called with ``[destination_routing_id, *frames]`` for each outgoing message.
        liveness: Heartbeats a worker may miss before it is declared dead.
    """

    def __init__(self, send: Send, liveness: int = 3) -> None:
        self.send = send
        self.liveness = liveness
        self.services: dict[str, _Service] = {}
        self.workers: dict[bytes, _Worker] = {}
        self.streams: dict[tuple[bytes, bytes], bytes] = {}  # (client, sid) -> worker
        # No deadline (worker expiry, queued request) is earlier than this, so
        # on_tick has nothing to do before it.  It may be early (expiries only
        # move later); on_tick then rescans and recomputes it.
        self._tick_at = float("inf")

    # -- entry points ---------------------------------------------------------

    def on_frames(self, ident: bytes, frames: list[bytes], now: float) -> None:
        """Handle one message received on the ROUTER from ``ident``."""
        if not frames:
            return
        header = frames[0][:P.HDR_LEN]
        try:
            if header == P.C_HDR:
                self._on_client(ident, frames, now)
            elif header == P.W_HDR:
                self._on_worker(ident, frames, now)
            else:
                log.warning("dropping frames with an unknown header", extra={"header": repr(header[:8])})
        except (IndexError, ValueError) as exc:
            log.warning("dropping a malformed message", extra={"peer": repr(ident), "error": str(exc)})

    def on_tick(self, now: float) -> None:
        """Expire dead workers and queued requests whose time is up."""
        if now < self._tick_at:
            return
        for w in [w for w in self.workers.values() if w.expiry <= now]:
            log.info("worker expired", extra={"peer": repr(w.ident), "service": w.service})
            self._drop_worker(w, "missed heartbeats")
        for svc in self.services.values():
            if svc.queue and any(q.expire_at <= now for q in svc.queue):
                keep: deque[_Queued] = deque()
                for q in svc.queue:
                    if q.expire_at <= now:
                        self._fail(q.kind, q.client, q.corr, NO_WORKER,
                                   f"no worker for {svc.name!r} before the deadline")
                    else:
                        keep.append(q)
                svc.queue = keep
        t = float("inf")
        for w in self.workers.values():
            t = min(t, w.expiry)
        for svc in self.services.values():
            for q in svc.queue:
                t = min(t, q.expire_at)
        self._tick_at = t

    @property
    def tick_at(self) -> float:
        """No deadline is earlier: :meth:`on_tick` has nothing to do before."""
        return self._tick_at

    def next_timeout(self, now: float, default: float = 1.0) -> float:
        """Seconds until :meth:`on_tick` has something to do (at most ``default``)."""
        return max(0.0, min(self._tick_at - now, default))

    def on_unreachable(self, ident: bytes) -> None:
        """``ident`` could not be sent to (ROUTER_MANDATORY): it is gone."""
        w = self.workers.get(ident)
        if w is not None:
            self._drop_worker(w, "unreachable")
            return
        for (client, sid), worker in list(self.streams.items()):
            if client == ident:
                self.send([worker, _W_STREAM, client, sid, P.CANCEL, P.pack_u64(0), b""])
        for svc in self.services.values():
            if any(q.client == ident for q in svc.queue):
                svc.queue = deque(q for q in svc.queue if q.client != ident)

    # -- clients --------------------------------------------------------------

    def _on_client(self, ident: bytes, frames: list[bytes], now: float) -> None:
        head = frames[0]
        cmd = head[P.CMD]
        if cmd == P.REQUEST:
            _, body = frames
            if len(head) < P.REQ_TAIL:
                raise ValueError("short request head")
            self._enqueue(P.REQUEST, ident, head[P.REQ_TAIL:].decode(), head[P.CORR],
                          head[P.REQ_TIMEOUT], [body], now)
        elif cmd == P.STREAM_OPEN:
            _, service, sid, timeout_ms, window, body = frames
            self._enqueue(P.STREAM_OPEN, ident, service.decode(), sid, timeout_ms,
                          [window, body], now)
        elif cmd == P.STREAM:
            _, sid, kind, seq, payload = frames
            worker = self.streams.get((ident, sid))
            if worker is not None:
                self.send([worker, _W_STREAM, ident, sid, kind, seq, payload])
            elif kind == P.CANCEL:
                for svc in self.services.values():
                    svc.queue = deque(q for q in svc.queue
                                      if not (q.client == ident and q.corr == sid))
        else:
            raise ValueError(f"unknown client command {cmd!r}")

    def _enqueue(self, kind: bytes, client: bytes, service: str, corr: bytes,
                 timeout_ms: bytes, tail: list[bytes], now: float) -> None:
        svc = self.services.get(service)
        if svc is None:
            svc = self.services[service] = _Service(service)
        if svc.free and not svc.queue:  # the common case: straight to a worker
            self._assign(svc, kind, client, corr, timeout_ms, tail)
            return
        timeout = P.unpack_int(timeout_ms) / 1000
        # Answer "no_worker" a little before the client's own deadline so it sees why.
        expire_at = now + max(0.0, timeout - min(0.05, timeout / 10))
        svc.queue.append(_Queued(kind, client, corr, now + timeout, expire_at, tail))
        if expire_at < self._tick_at:
            self._tick_at = expire_at
        self._dispatch(svc, now)

    def _assign(self, svc: _Service, kind: bytes, client: bytes, corr: bytes,
                timeout_ms: bytes, tail: list[bytes]) -> None:
        """Send a request or stream to the least recently used free worker of ``svc``."""
        free = svc.free
        ident, worker = next(iter(free.items()))
        inflight = worker.inflight
        inflight[(kind, client, corr)] = None
        if len(inflight) >= worker.capacity:
            del free[ident]
        else:
            free.move_to_end(ident)
        if kind == P.REQUEST:
            self.send([ident, _W_REQUEST + corr + timeout_ms + client, tail[0]])
        else:
            self.streams[(client, corr)] = ident
            self.send([ident, _W_STREAM_OPEN, client, corr, timeout_ms, *tail])

    def _dispatch(self, svc: _Service, now: float) -> None:
        while svc.queue and svc.free:
            q = svc.queue.popleft()
            remaining = P.timeout_to_ms(max(0.0, q.deadline - now))
            self._assign(svc, q.kind, q.client, q.corr, remaining, q.frames)

    def _release(self, w: _Worker, key: tuple[bytes, bytes, bytes], now: float) -> None:
        """``w`` finished the request or stream ``key``: it may take the next one."""
        if w.inflight.pop(key, False) is not None:
            return
        svc = self.services.get(w.service)
        if svc is None or svc.workers.get(w.ident) is not w:
            return
        if w.ident not in svc.free:
            svc.free[w.ident] = w
        if svc.queue:
            self._dispatch(svc, now)

    def _fail(self, kind: bytes, client: bytes, corr: bytes, code: str, message: str) -> None:
        err = P.encode_error(code, message)
        if kind == P.REQUEST:
            self.send([client, _C_ERROR + corr, err])
        else:
            self.send([client, _C_STREAM, corr, P.CLOSE, P.pack_u64(0), err])

    # -- workers --------------------------------------------------------------

    def _on_worker(self, ident: bytes, frames: list[bytes], now: float) -> None:
        head = frames[0]
        cmd = head[P.CMD]
        w = self.workers.get(ident)
        if w is not None:
            w.expiry = now + w.heartbeat * self.liveness
        if cmd == P.HEARTBEAT:
            self.send([ident, _W_DISCONNECT if w is None else _W_HEARTBEAT])
        elif cmd == P.REPLY or cmd == P.ERROR:
            _, body = frames
            corr, client = head[P.CORR], head[P.REPLY_TAIL:]
            if len(corr) != 8 or not client:
                raise ValueError("short reply head")
            self.send([client, P.C_HDR + cmd + corr, body])
            if w is None:
                self.send([ident, _W_DISCONNECT])
            else:
                self._release(w, (P.REQUEST, client, corr), now)
        elif cmd == P.STREAM:
            _, client, sid, kind, seq, payload = frames
            self.send([client, _C_STREAM, sid, kind, seq, payload])
            if kind == P.CLOSE:
                self.streams.pop((client, sid), None)
                if w is not None:
                    self._release(w, (P.STREAM_OPEN, client, sid), now)
        elif cmd == P.READY:
            _, service, capacity, hb_ms = frames
            if w is not None:
                self._drop_worker(w, "registered again")
            hb = max(P.unpack_int(hb_ms) / 1000, 0.001)
            w = _Worker(ident, service.decode(), max(1, P.unpack_int(capacity)), hb,
                        now + hb * self.liveness)
            self.workers[ident] = w
            if w.expiry < self._tick_at:
                self._tick_at = w.expiry
            svc = self.services.get(w.service)
            if svc is None:
                svc = self.services[w.service] = _Service(w.service)
            svc.workers[ident] = w
            svc.free[ident] = w
            self.send([ident, _W_HEARTBEAT])  # acknowledges READY
            self._dispatch(svc, now)
        elif cmd == P.DISCONNECT:
            if w is not None:
                self._drop_worker(w, "disconnected")
        else:
            raise ValueError(f"unknown worker command {cmd!r}")

    def _drop_worker(self, w: _Worker, why: str) -> None:
        self.workers.pop(w.ident, None)
        svc = self.services.get(w.service)
        if svc is not None and svc.workers.get(w.ident) is w:
            del svc.workers[w.ident]
            svc.free.pop(w.ident, None)
        for kind, client, corr in w.inflight:
            if kind == P.STREAM_OPEN:
                self.streams.pop((client, corr), None)
            self._fail(kind, client, corr, WORKER_LOST,
                       f"worker for {w.service!r} was lost ({why})")
        w.inflight.clear()
        if svc is not None and svc.queue and svc.free:
            self._dispatch(svc, time.monotonic())


# -- the I/O loop -------------------------------------------------------------------


class Broker:
    """Sockets plus the poll loop around :class:`BrokerCore`.

    Args:
        endpoints: Where to bind.
        security: CURVE identity and allow-list, or None for no CURVE.
        liveness: Heartbeats a worker may miss.
        context: zmq context (a private one by default, terminated on close).
    """

    def __init__(self, endpoints: BusEndpoints, *, security: BrokerSecurity | None = None,
                 liveness: int = 3, context: zmq.Context[Any] | None = None) -> None:
        self.endpoints = endpoints
        self.security = security
        self._own_ctx = context is None
        self.ctx = context or zmq.Context()
        self.core = BrokerCore(self._send, liveness)
        self._unreachable: list[bytes] = []
        self._stop_addr = f"inproc://dovecote-broker-stop-{id(self)}"
        self._sockets: list[zmq.Socket[Any]] = []
        # Reentrant: run_broker's signal handler calls stop() in the loop's own
        # thread, possibly while _close or stop holds the lock (a second SIGTERM,
        # e.g. multiprocessing terminating its daemon children at exit).
        self._stop_lock = threading.RLock()
        self._stop_requested = False
        self._closed = False
        try:
            self._bind()
        except BaseException:
            self._close()
            raise

    def _socket(self, kind: int) -> zmq.Socket[Any]:
        s = self.ctx.socket(kind)
        s.linger = 0
        self._sockets.append(s)
        return s

    def _bind(self) -> None:
        self.zap: zmq.Socket[bytes] | None = None
        if self.security is not None:
            self.zap = self._socket(zmq.REP)
            self.zap.bind("inproc://zeromq.zap.01")
        self.router = self._socket(zmq.ROUTER)
        self.router.router_mandatory = True
        self.router.sndhwm = 100_000
        self.router.rcvhwm = 100_000
        self.xsub = self._socket(zmq.XSUB)
        self.xpub = self._socket(zmq.XPUB)
        self.xpub.sndhwm = 100_000
        for s in (self.router, self.xsub, self.xpub):
            if self.security is not None:
                self.security.apply_server(s)
        self.router.bind(self.endpoints.rpc)
        self.xsub.bind(self.endpoints.pub)
        self.xpub.bind(self.endpoints.sub)
        self.events_ctl_peer = self._socket(zmq.PAIR)  # the event proxy's control socket
        self.events_ctl_peer.bind(self._stop_addr)
        self.events_ctl = self._socket(zmq.PAIR)
        self.events_ctl.connect(self._stop_addr)

    def _send(self, frames: list[bytes]) -> None:
        router = self.router
        last = len(frames) - 1
        try:
            # Frame by frame with integer flags (pyzmq's send_multipart costs
            # microseconds per frame).  Atomic: the ROUTER refuses (unroutable
            # or full) on the routing id frame, before anything is queued.
            for i in range(last):
                _send(router, frames[i], _SNDMORE_NOBLOCK)
            _send(router, frames[last], _NOBLOCK)
        except zmq.ZMQError as exc:
            if exc.errno in (zmq.EHOSTUNREACH, zmq.EAGAIN):
                log.debug("peer unreachable", extra={"peer": repr(frames[0]), "error": str(exc)})
                self._unreachable.append(frames[0])
            else:
                raise

    def stop(self) -> None:
        """Ask the loop to return, within ``STOP_POLL_S`` (thread-safe, idempotent)."""
        self._stop_requested = True

    def run(self) -> None:
        """Route until :meth:`stop`; then close all sockets."""
        threads = [threading.Thread(target=self._forward_events, name="broker-events", daemon=True)]
        if self.zap is not None:
            threads.append(threading.Thread(target=self._serve_zap, name="broker-zap", daemon=True))
        for t in threads:
            t.start()
        try:
            self._route()
        finally:
            self._stop_requested = True
            with contextlib.suppress(zmq.ZMQError):
                self.events_ctl.send(b"TERMINATE")
            for t in threads:
                t.join(5.0)
            self._close()

    def _forward_events(self) -> None:
        """XSUB -> XPUB (and subscriptions back) in libzmq, until TERMINATE on the control socket."""
        with contextlib.suppress(zmq.ContextTerminated):
            zmq.proxy_steerable(self.xsub, self.xpub, None, self.events_ctl_peer)

    def _serve_zap(self) -> None:
        zap, security = self.zap, self.security
        assert zap is not None and security is not None
        while not self._stop_requested:
            if zap.poll(int(STOP_POLL_S * 1000)):
                zap.send_multipart(security.zap_reply(zap.recv_multipart()))

    def _route(self) -> None:
        core, router = self.core, self.router
        monotonic = time.monotonic
        unreachable = self._unreachable
        cap_ms = int(STOP_POLL_S * 1000)
        timeout_ms = -2
        while not self._stop_requested:
            now = monotonic()
            want = min(cap_ms, int(core.next_timeout(now) * 1000) + 1)
            if want != timeout_ms:
                _set(router, _RCVTIMEO, want)
                timeout_ms = want
            try:
                parts = [_recv(router, 0)]
            except zmq.Again:
                parts = None
            now = monotonic()
            if parts is not None:
                while _get(router, _RCVMORE):
                    parts.append(_recv(router, 0))
                core.on_frames(parts[0], parts[1:], now)
                while unreachable:
                    core.on_unreachable(unreachable.pop())
            if now >= core.tick_at:
                core.on_tick(now)
                while unreachable:
                    core.on_unreachable(unreachable.pop())

    def _close(self) -> None:
        with self._stop_lock:
            if self._closed:
                return
            self._closed = True
            for s in self._sockets:
                s.close(linger=0)
        if self._own_ctx:
            self.ctx.term()


def run_broker(endpoints: BusEndpoints, *, security: BrokerSecurity | None = None,
               liveness: int = 3, handle_signals: bool = True) -> None:
    """Run the broker in this thread until SIGTERM/SIGINT (blocking; for its own process).

    Args:
        endpoints: Where to bind.
        security: CURVE identity and client allow-list, or None.
        liveness: Heartbeats a worker may miss before it is dropped.
        handle_signals: Install SIGTERM/SIGINT handlers that stop the loop
            (only possible in the main thread).
    """
    broker = Broker(endpoints, security=security, liveness=liveness)
    if handle_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: broker.stop())
    log.info("broker listening", extra={"endpoints": str(endpoints)})
    broker.run()


@contextlib.asynccontextmanager
async def open_broker(endpoints: BusEndpoints, *, security: BrokerSecurity | None = None,
                      liveness: int = 3) -> AsyncIterator[Broker]:
    """Run a broker in a thread for the duration of an ``async with`` block.

    The sockets are bound before the block starts; leaving the block (also by
    cancellation) stops the loop, closes the sockets and waits for the thread.
    """
    broker = Broker(endpoints, security=security, liveness=liveness)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.to_thread.run_sync, broker.run)
        try:
            yield broker
        finally:
            broker.stop()
    broker._close()  # in case the thread never got to run


def main() -> int:
    """``dovecote broker``: run a broker configured by the environment.

    Binds ``DOVECOTE_BUS_{RPC,PUB,SUB}_BIND`` when set (containers bind
    ``tcp://*:port`` while clients connect to ``tcp://broker:port``), else the
    same ``DOVECOTE_BUS_*`` endpoints the clients use. Stops on SIGTERM/SIGINT,
    and when ``DOVECOTE_PARENT_PID`` is set, once that process is gone.
    """
    import os
    import threading
    import time

    from dovecote.libs.logs import setup_logging

    setup_logging("broker", os.environ.get("DOVECOTE_LOG_LEVEL", "info"),
                  os.environ.get("DOVECOTE_LOG_FORMAT", "json"))
    endpoints = BusEndpoints.from_env()
    binds = {k: os.environ.get(f"DOVECOTE_BUS_{k.upper()}_BIND") for k in ("rpc", "pub", "sub")}
    if any(binds.values()):
        endpoints = BusEndpoints(rpc=binds["rpc"] or endpoints.rpc, pub=binds["pub"] or endpoints.pub,
                                 sub=binds["sub"] or endpoints.sub,
                                 server_key=endpoints.server_key)
    from .curve import broker_security_from_env

    broker = Broker(endpoints, security=broker_security_from_env(os.environ))
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: broker.stop())
    parent = os.environ.get("DOVECOTE_PARENT_PID", "")
    if parent.isdigit():
        def watch_parent() -> None:
            while os.getppid() == int(parent):
                time.sleep(1.0)
            log.warning("parent process gone; stopping")
            broker.stop()

        threading.Thread(target=watch_parent, name="parent-watch", daemon=True).start()
    log.info("broker listening", extra={"rpc": endpoints.rpc, "pub": endpoints.pub,
                                         "sub": endpoints.sub})
    broker.run()
    log.info("broker stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
