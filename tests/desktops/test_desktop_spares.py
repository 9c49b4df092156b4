"""The warm pool's bookkeeping of desktop spares (no VM: the spares are ids here)."""

from __future__ import annotations

from types import SimpleNamespace

import trio

from dovecote.bus.messages.capsules import CapsuleSpec
from dovecote.vmmgr.pool import DESKTOP_REFILL_DELAY_S, WarmPool

DESKTOP = CapsuleSpec(template="desktop", vcpus=2, memory_mb=2048)


def pool(desktop: bool = True) -> WarmPool:
    files = SimpleNamespace(vcpus=2, memory_mb=2048) if desktop else None
    capsules = SimpleNamespace(minimal=None, lifecycle=SimpleNamespace(desktop=files, browser=None))
    return WarmPool(capsules, 1, 5120)  # type: ignore[arg-type]


async def test_a_desktop_create_claims_a_desktop_spare_and_a_refused_one_gives_it_back() -> None:
    warm = pool()
    warm._desktops.append("cap-desk")
    assert "cap-desk" in warm
    assert warm.claim(CapsuleSpec()) is None  # a minimal capsule never gets a desktop spare
    assert warm.claim(CapsuleSpec(template="desktop", vcpus=1, memory_mb=2048)) is None
    began = trio.current_time()
    assert warm.claim(DESKTOP) == "cap-desk"
    assert "cap-desk" not in warm and warm.claim(DESKTOP) is None
    assert warm._desktop_refill_at >= began + DESKTOP_REFILL_DELAY_S
    warm.give_back("cap-desk")
    assert warm.claim(DESKTOP) == "cap-desk"


async def test_no_desktop_template_no_desktop_spare() -> None:
    warm = pool(desktop=False)
    warm._desktops.append("cap-desk")
    assert warm.claim(DESKTOP) is None
