"""Choosing the accelerator: KVM only when a guest really boots under it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dovecote.vmmgr.accel import Accel, AccelError, choose_accel, read_cached


class Probe:
    def __init__(self, answer: bool) -> None:
        self.answer = answer
        self.calls = 0

    async def __call__(self) -> bool:
        self.calls += 1
        return self.answer


async def pick(probe: Probe, key: str, cache: Path | None, requested: str, device: Path) -> Accel:
    return await choose_accel(probe=probe, key=key, cache_file=cache, requested=requested, kvm_device=device)


@pytest.fixture
def kvm_device(tmp_path: Path) -> Path:
    """A stand-in for /dev/kvm that we can read and write."""
    device = tmp_path / "kvm"
    device.write_bytes(b"")
    return device


async def test_no_kvm_device_means_tcg_without_probing(tmp_path: Path) -> None:
    probe = Probe(True)
    accel = await choose_accel(
        probe=probe, key="k", cache_file=tmp_path / "c.json", requested="auto", kvm_device=tmp_path / "none"
    )
    assert accel is Accel.TCG and probe.calls == 0


async def test_kvm_device_that_hangs_guests_means_tcg_and_is_cached(tmp_path: Path, kvm_device: Path) -> None:
    cache = tmp_path / "c.json"
    probe = Probe(False)
    for _ in range(2):
        accel = await pick(probe, "k", cache, "auto", kvm_device)
        assert accel is Accel.TCG
    assert probe.calls == 1
    assert read_cached(cache, "k") is False


async def test_kvm_that_boots_is_chosen_and_a_new_key_probes_again(tmp_path: Path, kvm_device: Path) -> None:
    cache = tmp_path / "c.json"
    probe = Probe(True)
    assert await pick(probe, "a", cache, "auto", kvm_device) is Accel.KVM
    probe.answer = False
    assert await pick(probe, "a", cache, "auto", kvm_device) is Accel.KVM
    assert await pick(probe, "b", cache, "auto", kvm_device) is Accel.TCG
    assert probe.calls == 2


async def test_explicit_requests(tmp_path: Path, kvm_device: Path) -> None:
    probe = Probe(True)
    assert await pick(probe, "k", None, "tcg", kvm_device) is Accel.TCG
    assert await pick(probe, "k", None, "kvm", kvm_device) is Accel.KVM
    assert probe.calls == 0
    with pytest.raises(AccelError):
        await pick(probe, "k", None, "kvm", tmp_path / "none")
    with pytest.raises(AccelError):
        await pick(probe, "k", None, "warp", kvm_device)


async def test_environment_variable_is_the_default_request(
    tmp_path: Path, kvm_device: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOVECOTE_VM_ACCEL", "tcg")
    probe = Probe(True)
    assert await choose_accel(probe=probe, key="k", cache_file=None, kvm_device=kvm_device) is Accel.TCG
    assert probe.calls == 0


async def test_answers_for_several_keys_are_all_kept(tmp_path: Path, kvm_device: Path) -> None:
    # Two installations with different images share one cache: neither evicts the other.
    cache = tmp_path / "c.json"
    probe = Probe(False)
    for _ in range(3):
        for key in ("image-a", "image-b"):
            assert await pick(probe, key, cache, "auto", kvm_device) is Accel.TCG
    assert probe.calls == 2
    assert read_cached(cache, "image-a") is False and read_cached(cache, "image-b") is False


def test_the_one_answer_cache_of_earlier_versions_is_read(tmp_path: Path) -> None:
    cache = tmp_path / "c.json"
    cache.write_text('{"key": "k", "kvm_boots": true}')
    assert read_cached(cache, "k") is True and read_cached(cache, "other") is None


def test_a_corrupt_cache_is_ignored(tmp_path: Path) -> None:
    cache = tmp_path / "c.json"
    cache.write_text("{not json")
    assert read_cached(cache, "k") is None
    assert os.path.exists(cache)


def test_domain_types() -> None:
    assert Accel.KVM.domain_type == "kvm"
    assert Accel.TCG.domain_type == "qemu"
