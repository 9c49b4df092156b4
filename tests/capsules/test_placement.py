"""Placement rules: per-capsule validation and clamps, team caps, host capacity."""

from __future__ import annotations

import pytest

from dovecote.bus.messages.capsules import CapsuleSpec
from dovecote.libs.errors import ServiceError
from dovecote.vmmgr.placement import (
    Candidate,
    Limits,
    Usage,
    check_host_capacity,
    check_team_caps,
    choose_host,
    normalize_spec,
)

LIMITS = Limits(team_max_capsules=2, team_max_vcpus=3, team_max_memory_mb=1024)


def test_defaults_are_the_references_and_short_timeouts_are_clamped_to_60() -> None:
    spec = normalize_spec(CapsuleSpec(timeout_sec=5, disk_size_mb=99999), Limits())
    assert (spec.template, spec.vcpus, spec.memory_mb) == ("minimal", 1, 512)
    assert spec.timeout_sec == 60
    assert spec.disk_size_mb == 5120
    assert normalize_spec(CapsuleSpec(timeout_sec=0), Limits()).timeout_sec == 0


@pytest.mark.parametrize(("spec", "status", "code"), [
    (CapsuleSpec(template="nope"), 404, "template_not_found"),
    (CapsuleSpec(vcpus=0), 400, "invalid_request"),
    (CapsuleSpec(vcpus=99), 400, "invalid_request"),
    (CapsuleSpec(memory_mb=16), 400, "invalid_request"),
    (CapsuleSpec(metadata={f"k{i}": "v" for i in range(51)}), 400, "invalid_request"),
])
def test_bad_specs_are_refused_with_their_code(spec: CapsuleSpec, status: int, code: str) -> None:
    with pytest.raises(ServiceError) as caught:
        normalize_spec(spec, Limits())
    assert (caught.value.status, caught.value.code) == (status, code)


@pytest.mark.parametrize(("usage", "spec", "code"), [
    (Usage(capsules=2, vcpus=2, memory_mb=512), CapsuleSpec(), "quota_capsules"),
    (Usage(capsules=1, vcpus=2, memory_mb=256), CapsuleSpec(vcpus=2), "quota_vcpus"),
    (Usage(capsules=1, vcpus=1, memory_mb=768), CapsuleSpec(memory_mb=512), "quota_memory"),
])
def test_team_caps_answer_429_naming_the_cap(usage: Usage, spec: CapsuleSpec, code: str) -> None:
    with pytest.raises(ServiceError) as caught:
        check_team_caps(usage, spec, LIMITS)
    assert (caught.value.status, caught.value.code) == (429, code)


def test_a_capsule_that_fits_passes_and_host_limits_zero_mean_unlimited() -> None:
    check_team_caps(Usage(capsules=1, vcpus=2, memory_mb=512), CapsuleSpec(), LIMITS)
    check_host_capacity(Usage(capsules=1000), CapsuleSpec(), max_capsules=0, max_memory_mb=0)
    with pytest.raises(ServiceError) as caught:
        check_host_capacity(Usage(capsules=4), CapsuleSpec(), max_capsules=4, max_memory_mb=0)
    assert (caught.value.status, caught.value.code) == (503, "host_full")


def _host(id: str, type: str = "regular", team: str = "", tags: tuple[str, ...] = (),
          memory: int | None = 16384, used: int = 0, capsules: int = 0) -> Candidate:
    return Candidate(id=id, type=type, team_id=team, tags=frozenset(tags), memory_mb=memory,
                     usage=Usage(capsules=capsules, memory_mb=used))


def test_choose_host_prefers_the_least_loaded_then_this_host() -> None:
    spec = CapsuleSpec(memory_mb=512)
    hosts = [_host("b", used=4096), _host("a", used=1024), _host("local", used=1024)]
    assert choose_host(hosts, team_id="t", spec=spec, local_host_id="local") == "local"
    assert choose_host(hosts[:2], team_id="t", spec=spec, local_host_id="local") == "a"
    # A host whose memory is unknown is ranked by its capsule count.
    assert choose_host([_host("x", memory=None, capsules=3), _host("y", memory=None, capsules=1)],
                       team_id="t", spec=spec, local_host_id="z") == "y"


def test_choose_host_honours_tags_byoc_and_room() -> None:
    spec = CapsuleSpec(memory_mb=2048, metadata={"host_tags": "gpu, ssd"})
    plain = CapsuleSpec(memory_mb=2048)
    hosts = [_host("p1", tags=("gpu", "ssd")), _host("p2"), _host("mine", "byoc", "t1"),
             _host("theirs", "byoc", "t2", tags=("gpu", "ssd"))]
    # Tags: only p1 qualifies for t1 (t2's BYOC host never runs t1's capsules).
    assert choose_host(hosts, team_id="t1", spec=spec, local_host_id="p2") == "p1"
    # The team's own BYOC host wins over platform hosts...
    assert choose_host(hosts, team_id="t1", spec=plain, local_host_id="p2") == "mine"
    assert choose_host(hosts, team_id="t2", spec=spec, local_host_id="p1") == "theirs"
    # A full BYOC pool is refused rather than spilled onto platform hosts.
    full = [_host("mine", "byoc", "t1", memory=2048, used=1024), _host("p2")]
    with pytest.raises(ServiceError) as refused:
        choose_host(full, team_id="t1", spec=plain, local_host_id="p2")
    assert (refused.value.status, refused.value.code) == (503, "no_host_available")
    with pytest.raises(ServiceError) as unmatched:
        choose_host(hosts, team_id="t1", spec=CapsuleSpec(metadata={"host_tags": "tpu"}),
                    local_host_id="p2")
    assert (unmatched.value.status, unmatched.value.code) == (409, "no_matching_host")


def test_a_capsule_larger_than_every_host_is_the_clients_error() -> None:
    hosts = [_host("a", memory=8192), _host("b", memory=4096, used=4096)]
    with pytest.raises(ServiceError) as refused:
        choose_host(hosts, team_id="t", spec=CapsuleSpec(memory_mb=16000), local_host_id="a")
    assert (refused.value.status, refused.value.code) == (400, "invalid_request")
    assert "8192" in refused.value.message
    # Larger than what is free now, but not than a host: retry later.
    with pytest.raises(ServiceError) as full:
        choose_host([_host("a", memory=8192, used=8000)], team_id="t",
                    spec=CapsuleSpec(memory_mb=4096), local_host_id="a")
    assert (full.value.status, full.value.code) == (503, "no_host_available")
