"""vmmgr's sampler with a scripted driver and a synthetic clock (no VM, no database)."""

from __future__ import annotations

from typing import Any, cast

import pytest

from dovecote.bus.errors import BusTimeout
from dovecote.bus.messages.common import Principal
from dovecote.bus.messages.metrics import GetCapsuleMetrics, RecordSamples, SamplesRecorded
from dovecote.libs.errors import ServiceError
from dovecote.vmmgr.capsules import Machines
from dovecote.vmmgr.driver import DriverError, VmNotFound, VmStats
from dovecote.vmmgr.sampler import Sampler, Tracked

START = 1_700_000_100.0  # a multiple of 30 and 300
SECOND_NS = 1_000_000_000


class Clock:
    def __init__(self) -> None:
        self.now = START

    def wall(self) -> float:
        return self.now

    def mono(self) -> float:
        return self.now - START


class ScriptedDriver:
    """Each capsule uses ``busy`` of its vCPUs; ``fail`` makes its reading raise."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.busy: dict[str, float] = {}
        self.fail: dict[str, Exception] = {}

    async def stats(self, capsule_id: str) -> VmStats:
        if capsule_id in self.fail:
            raise self.fail[capsule_id]
        used = int((self.clock.now - START) * 2 * self.busy.get(capsule_id, 0.0) * SECOND_NS)
        return VmStats(cpu_time_ns=used, vcpus=2, memory_bytes=256 << 20, disk_bytes=3 << 20)


class Sent:
    def __init__(self) -> None:
        self.batches: list[RecordSamples] = []
        self.failures: list[Exception] = []

    async def __call__(self, batch: RecordSamples) -> Any:
        if self.failures:
            raise self.failures.pop(0)
        self.batches.append(batch)
        return SamplesRecorded(accepted=len(batch.points))


def tracked(capsule_id: str, team: str = "team-1", status: str = "running") -> Tracked:
    return Tracked(capsule_id=capsule_id, team_id=team, vcpus=2, memory_mb=512, status=status,
                   started_at=START)


def actor(team: str = "team-1", *, admin: bool = False) -> Principal:
    return Principal(auth_type="api_key", team_id=team, is_admin=admin)


@pytest.fixture
def world() -> tuple[Sampler, ScriptedDriver, Clock, Sent]:
    clock = Clock()
    driver = ScriptedDriver(clock)
    machines = Machines()
    machines.driver = cast(Any, driver)
    sent = Sent()
    sampler = Sampler(db=None, host_id="h1", machines=machines, send=sent, wall=clock.wall, mono=clock.mono)
    return sampler, driver, clock, sent


async def run(sampler: Sampler, clock: Clock, seconds: float) -> None:
    for _ in range(int(seconds * 2)):
        await sampler.sample_once()
        clock.now += 0.5


async def test_running_capsules_are_sampled_into_30s_averages(world: Any) -> None:
    sampler, driver, clock, _ = world
    driver.busy = {"cap-a": 0.25, "cap-b": 1.0}
    sampler.set_tracked([tracked("cap-a"), tracked("cap-b", team="team-2"),
                         tracked("cap-c", status="starting")])
    await run(sampler, clock, 65)
    by_capsule: dict[str, list[Any]] = {}
    for p in sampler.pending:
        by_capsule.setdefault(p.capsule_id, []).append(p)
    assert sorted(by_capsule) == ["cap-a", "cap-b"]  # a starting capsule is not sampled
    first, second = by_capsule["cap-a"]
    assert (first.ts, second.ts) == (START, START + 30)
    assert first.samples == 59 and second.samples == 60  # the first reading has no rate yet
    assert first.cpu_pct == pytest.approx(25.0) and second.cpu_pct == pytest.approx(25.0)
    assert first.team_id == "team-1" and first.vcpus == 2 and first.memory_mb == 512
    assert first.mem_bytes == 256 << 20 and first.disk_bytes == 3 << 20
    assert [p.cpu_pct for p in by_capsule["cap-b"]] == [pytest.approx(100.0)] * 2
    assert by_capsule["cap-b"][0].team_id == "team-2"


async def test_the_capsules_vmmgr_answers_from_its_rings(world: Any) -> None:
    sampler, driver, clock, _ = world
    driver.busy = {"cap-a": 0.5}
    sampler.set_tracked([tracked("cap-a")])
    await run(sampler, clock, 90)
    reply = await sampler.capsule_metrics(GetCapsuleMetrics(actor=actor(), capsule_id="cap-a", range="5m"))
    assert reply.available and reply.body.sandbox_id == "cap-a" and reply.body.range == "5m"
    assert len(reply.body.points) == 179
    assert {p.cpu_pct for p in reply.body.points} == {50.0}
    assert reply.body.points[-1].timestamp_unix == int(START + 89.5)
    reply = await sampler.capsule_metrics(GetCapsuleMetrics(actor=actor(), capsule_id="cap-a", range="1h"))
    assert [p.timestamp_unix for p in reply.body.points] == [START, START + 30]  # the third is open
    # An admin through an admin route sees any team's capsule.
    reply = await sampler.capsule_metrics(GetCapsuleMetrics(
        actor=actor("other", admin=True), capsule_id="cap-a", admin=True, range="5m"))
    assert reply.available and len(reply.body.points) == 179
    # Another team's capsule is not found, and no one but an admin uses the admin flag.
    with pytest.raises(ServiceError) as caught:
        await sampler.capsule_metrics(GetCapsuleMetrics(actor=actor("other"), capsule_id="cap-a"))
    assert caught.value.status == 404
    with pytest.raises(ServiceError) as caught:
        await sampler.capsule_metrics(GetCapsuleMetrics(actor=actor(), capsule_id="cap-a", admin=True))
    assert caught.value.status == 403
    with pytest.raises(ServiceError) as caught:
        await sampler.capsule_metrics(GetCapsuleMetrics(actor=actor(), capsule_id="cap-a", range="1y"))
    assert caught.value.status == 400
    unknown = await sampler.capsule_metrics(GetCapsuleMetrics(actor=actor(), capsule_id="cap-x"))
    assert not unknown.available and unknown.body.points == []


async def test_rings_that_began_late_do_not_answer_for_earlier_times(world: Any) -> None:
    sampler, driver, clock, _ = world
    driver.busy = {"cap-a": 0.5}
    # The capsule started an hour before this vmmgr (restarted) began sampling it.
    sampler.set_tracked([Tracked(capsule_id="cap-a", team_id="team-1", vcpus=2, memory_mb=512,
                                 status="running", started_at=START - 3600)])
    await run(sampler, clock, 60)
    short = await sampler.capsule_metrics(GetCapsuleMetrics(actor=actor(), capsule_id="cap-a", range="5m"))
    assert not short.available  # the last 5 minutes were not all seen
    clock.now += 300
    await run(sampler, clock, 1)
    short = await sampler.capsule_metrics(GetCapsuleMetrics(actor=actor(), capsule_id="cap-a", range="5m"))
    assert short.available
    longer = await sampler.capsule_metrics(GetCapsuleMetrics(actor=actor(), capsule_id="cap-a", range="1h"))
    assert not longer.available


async def test_a_paused_capsule_keeps_its_rings_and_a_stopped_one_hands_over(world: Any) -> None:
    sampler, driver, clock, _ = world
    driver.busy = {"cap-a": 0.5}
    sampler.set_tracked([tracked("cap-a")])
    await run(sampler, clock, 10)
    assert sampler.pending == []
    sampler.set_tracked([tracked("cap-a", status="paused")])
    await run(sampler, clock, 30)  # no readings, but the bucket's end passes
    assert [(p.ts, p.samples) for p in sampler.pending] == [(START, 19)]
    reply = await sampler.capsule_metrics(GetCapsuleMetrics(actor=actor(), capsule_id="cap-a"))
    assert reply.available and len(reply.body.points) == 19
    # Resumed: no rate across the pause, then sampling again.
    sampler.set_tracked([tracked("cap-a")])
    await run(sampler, clock, 5)
    sampler.set_tracked([])  # stopped: the open bucket is handed over, the rings dropped
    assert [(p.ts, p.samples) for p in sampler.pending] == [(START, 19), (START + 30, 9)]
    reply = await sampler.capsule_metrics(GetCapsuleMetrics(actor=actor(), capsule_id="cap-a"))
    assert not reply.available


async def test_one_capsules_failure_does_not_stop_the_others(world: Any) -> None:
    sampler, driver, clock, _ = world
    driver.busy = {"cap-a": 0.5, "cap-b": 0.5}
    driver.fail = {"cap-b": DriverError("libvirt hiccup"), "cap-c": VmNotFound("gone")}
    sampler.set_tracked([tracked("cap-a"), tracked("cap-b"), tracked("cap-c")])
    await run(sampler, clock, 31)
    assert {p.capsule_id for p in sampler.pending} == {"cap-a"}
    driver.fail = {}
    await run(sampler, clock, 30)
    assert {p.capsule_id for p in sampler.pending} == {"cap-a", "cap-b", "cap-c"}


async def test_averages_wait_for_the_metrics_service(world: Any) -> None:
    sampler, driver, clock, sent = world
    driver.busy = {"cap-a": 0.1}
    sampler.set_tracked([tracked("cap-a")])
    await run(sampler, clock, 61)
    assert len(sampler.pending) == 2
    sent.failures = [BusTimeout("metrics did not answer")]
    assert not await sampler.send_pending()
    assert len(sampler.pending) == 2 and sent.batches == []
    assert await sampler.send_pending()
    assert sampler.pending == []
    (batch,) = sent.batches
    assert batch.host_id == "h1" and batch.interval_s == 0.5 and [p.ts for p in batch.points] == [
        START, START + 30]
