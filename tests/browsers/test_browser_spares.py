"""The warm pool's bookkeeping of browser spares (no VM: the spares are ids here).

That a VM browser session really runs on a claimed spare (its VM ran before the
create) is asserted end to end in ``test_vm_sessions.py``.
"""

from __future__ import annotations

from types import SimpleNamespace

import trio

from dovecote.bus.messages.capsules import CapsuleSpec
from dovecote.vmmgr.pool import DESKTOP_REFILL_DELAY_S, WarmPool

BROWSER = CapsuleSpec(template="browser", vcpus=2, memory_mb=2048)
DESKTOP = CapsuleSpec(template="desktop", vcpus=2, memory_mb=2048)


def pool(browser: bool = True) -> WarmPool:
    files = SimpleNamespace(vcpus=2, memory_mb=2048)
    capsules = SimpleNamespace(minimal=None, lifecycle=SimpleNamespace(
        desktop=files, browser=files if browser else None))
    return WarmPool(capsules, 1, 5120)


async def test_a_browser_create_claims_a_browser_spare_and_a_refused_one_gives_it_back() -> None:
    warm = pool()
    warm._browsers.append("cap-browser")
    warm._desktops.append("cap-desk")
    assert "cap-browser" in warm
    assert warm.claim(CapsuleSpec()) is None  # a minimal capsule never gets a browser spare
    assert warm.claim(CapsuleSpec(template="browser", vcpus=1, memory_mb=2048)) is None
    began = trio.current_time()
    assert warm.claim(BROWSER) == "cap-browser"
    assert "cap-browser" not in warm and warm.claim(BROWSER) is None
    assert warm._desktop_refill_at >= began + DESKTOP_REFILL_DELAY_S
    warm.give_back("cap-browser")  # back among the browser spares, not the desktop ones
    assert warm._browsers == ["cap-browser"] and warm._desktops == ["cap-desk"]
    assert warm.claim(DESKTOP) == "cap-desk"
    assert warm.claim(BROWSER) == "cap-browser"


async def test_no_browser_template_no_browser_spare() -> None:
    warm = pool(browser=False)
    warm._browsers.append("cap-browser")
    assert warm.claim(BROWSER) is None
