"""BrokerCore routing without sockets: frames in, frames out."""

from __future__ import annotations

from dovecote.bus import protocol as P
from dovecote.bus.broker import BrokerCore


class Out(list):
    def __call__(self, frames):
        self.append(frames)

    def to(self, ident):
        return [f[1:] for f in self if f[0] == ident]

    def take(self):
        items = list(self)
        self.clear()
        return items


def _ready(core, ident, service="svc", capacity=1, hb=1.0, now=0.0):
    core.on_frames(ident, P.worker_ready(service, capacity, hb), now)


def _request(core, client, corr, service="svc", timeout=5.0, now=0.0):
    core.on_frames(client, P.client_request(service, corr, timeout, b"body"), now)


def test_ready_is_acknowledged_with_heartbeat():
    out = Out()
    core = BrokerCore(out)
    _ready(core, b"w1")
    assert out.to(b"w1") == [[P.W_HDR + P.HEARTBEAT]]


def test_requests_round_robin_least_recently_used_worker():
    out = Out()
    core = BrokerCore(out)
    _ready(core, b"w1", capacity=10)
    _ready(core, b"w2", capacity=10)
    out.clear()
    for i in range(4):
        _request(core, b"c", P.pack_u64(i))
    assert [f[0] for f in out] == [b"w1", b"w2", b"w1", b"w2"]


def test_request_queues_until_capacity_frees_then_reply_is_forwarded():
    out = Out()
    core = BrokerCore(out)
    _ready(core, b"w1", capacity=1)
    out.clear()
    r1, r2 = P.pack_u64(1), P.pack_u64(2)
    _request(core, b"c", r1)
    _request(core, b"c", r2)
    [first] = out.take()
    assert first[0] == b"w1" and first[1][P.CORR] == r1 and first[1][P.REQ_TAIL:] == b"c"
    assert first[2] == b"body"
    core.on_frames(b"w1", P.worker_reply(b"c", r1, b"answer"), 0.1)
    sent = out.take()
    assert sent[0] == [b"c", P.C_HDR + P.REPLY + r1, b"answer"]  # two frames: head and body
    assert sent[1][0] == b"w1" and sent[1][1][P.CORR] == r2


def test_no_worker_fails_shortly_before_client_deadline():
    out = Out()
    core = BrokerCore(out)
    _request(core, b"c", P.pack_u64(1), service="nobody", timeout=1.0)
    core.on_tick(0.5)
    assert out == []
    assert 0.9 <= core.next_timeout(0.0, default=10) < 1.0
    core.on_tick(0.96)
    [(client, head, body)] = out
    assert (client, head) == (b"c", P.C_HDR + P.ERROR + P.pack_u64(1))
    assert P.decode_error(body).code == "no_worker"


def test_expired_worker_fails_its_inflight_requests_with_worker_lost():
    out = Out()
    core = BrokerCore(out, liveness=3)
    _ready(core, b"w1", hb=0.1)
    _request(core, b"c", P.pack_u64(1))
    out.clear()
    core.on_tick(0.2)
    assert out == []
    core.on_tick(0.31)
    [(client, head, body)] = out
    assert (client, head) == (b"c", P.C_HDR + P.ERROR + P.pack_u64(1))
    assert P.decode_error(body).code == "worker_lost"
    assert core.workers == {}


def test_heartbeat_from_unknown_worker_gets_disconnect():
    out = Out()
    core = BrokerCore(out)
    core.on_frames(b"ghost", P.worker_heartbeat(), 0.0)
    assert out == [[b"ghost", P.W_HDR + P.DISCONNECT]]


def test_stream_frames_are_routed_and_close_releases_worker():
    out = Out()
    core = BrokerCore(out)
    _ready(core, b"w1", capacity=1)
    out.clear()
    core.on_frames(b"c", P.client_stream_open("svc", b"s1", 5.0, 4, b"start"), 0.0)
    assert out.take()[0][:3] == [b"w1", P.W_HDR + P.STREAM_OPEN, b"c"]
    core.on_frames(b"w1", P.worker_stream(b"c", b"s1", P.CREDIT, 4), 0.0)
    core.on_frames(b"c", P.client_stream(b"s1", P.DATA_BYTES, 1, b"x"), 0.0)
    sent = out.take()
    assert sent[0] == [b"c", P.C_HDR + P.STREAM, b"s1", P.CREDIT, P.pack_u64(4), b""]
    assert sent[1] == [b"w1", P.W_HDR + P.STREAM, b"c", b"s1", P.DATA_BYTES, P.pack_u64(1), b"x"]
    core.on_frames(b"w1", P.worker_stream(b"c", b"s1", P.CLOSE, 0), 0.0)
    assert core.streams == {} and core.workers[b"w1"].inflight == {}


def test_malformed_frames_are_dropped():
    out = Out()
    core = BrokerCore(out)
    core.on_frames(b"x", [b"junk"], 0.0)
    core.on_frames(b"x", [P.C_HDR + P.REQUEST], 0.0)  # no body
    core.on_frames(b"x", [P.C_HDR + P.REQUEST + b"short", b"body"], 0.0)  # head too short
    core.on_frames(b"x", [P.C_HDR[:3]], 0.0)
    core.on_frames(b"x", [b"DCC1", P.REQUEST, b"svc", P.pack_u64(1), b"\0\0\0\1", b"body"], 0.0)
    assert out == []
