"""What ``dovecote up`` says about capsules after "Dovecote is up".

The suite answers at once, but on a machine's first start vmmgr still has to
build the guest image (minutes: debootstrap, a kernel, a root filesystem) and
then the built-in ``minimal`` template (one VM booted and frozen); until the
image is there creates answer 503 ``image_not_ready``. So the supervisor
follows vmmgr's ``/healthz`` details and prints each step, then one line that
says capsules are ready (or why they are not)::

    [0:03] capsules: building the guest image (the first start on a machine takes a few minutes)
    [0:03] capsules: guest image: debootstrap bookworm (...) from http://deb.debian.org/debian
    [2:41] capsules: guest image: kernel
    [3:05] capsules: building the built-in template "minimal" (one VM boots, then is frozen)
    Capsules are ready. [3m52s] New here? `./dovecote key create --email you@example.com`

vmmgr's details (``dovecote.vmmgr.service``): ``image`` is ``building``,
``ready``, ``failed: ...`` or ``disabled...``; ``image_step`` the builder's
current step; ``template`` ``waiting``/``building``/``ready`` when templates are
on; ``netguard`` ``on``, ``off: ...`` (the operator's choice) or ``failed: ...``
(creates are refused). :func:`capsule_phase` reads them (no I/O; a table
test covers it); :func:`watch_capsules` polls and prints.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import msgspec
import trio

POLL_S = 2.0
REMIND_S = 60.0
"""While a step lasts, say again that it is still going after this long."""
READY_HINT = "New here? `./dovecote key create --email you@example.com`, then `./dovecote capsule create`"


class Phase(msgspec.Struct, frozen=True):
    """Where capsules stand: ``text`` to print, and whether it is the last word."""

    text: str
    final: bool = False
    ready: bool = False


def capsule_phase(details: dict[str, str] | None) -> Phase:
    """The phase that vmmgr's health ``details`` describe (None: vmmgr does not answer yet)."""
    if not details or "image" not in details:
        return Phase("capsules: waiting for vmmgr")
    image = details["image"]
    if image.startswith("disabled"):
        reason = image.partition(":")[2].strip() or "DOVECOTE_VM_DRIVER=none"
        return Phase(f"Capsules are disabled on this machine ({reason}).", final=True)
    if image.startswith("failed"):
        return Phase(f"Capsules are unavailable: the VM driver could not start ({image}).", final=True)
    if image != "ready":
        step = details.get("image_step")
        if step:
            return Phase(f"capsules: guest image: {step}")
        return Phase("capsules: building the guest image (the first start on a machine takes "
                     "a few minutes; later starts reuse it)")
    guard = details.get("netguard", "")
    if guard.startswith("failed"):
        return Phase(f"Capsules are refused: their network guard is not installed ({guard}).",
                     final=True)
    if details.get("template") in ("waiting", "building"):
        return Phase('capsules: building the built-in template "minimal" (one VM boots, then is frozen)')
    warning = f" Warning: netguard {guard}." if guard.startswith("off") else ""
    return Phase(f"Capsules are ready.{warning}", final=True, ready=True)


def _get_health(url: str) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:  # 503 while a service is down: still a body
        body = exc.read()
    except OSError:
        return None
    try:
        health = json.loads(body)
    except ValueError:
        return None
    return health if isinstance(health, dict) else None


def _vmmgr_details(health: dict[str, Any] | None) -> dict[str, str] | None:
    if health is None:
        return None
    vmmgr = (health.get("services") or {}).get("vmmgr") or {}
    if vmmgr.get("status") != "ok":
        return None
    details = vmmgr.get("details")
    return {str(k): str(v) for k, v in details.items()} if isinstance(details, dict) else None


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}:{secs:02d}"


async def watch_capsules(healthz_url: str, *, out: Callable[[str], None] | None = None,
                         poll_s: float = POLL_S) -> Phase:
    """Print each new phase until the final one; returns it."""
    say = out or (lambda line: print(line, file=sys.stdout, flush=True))
    started = trio.current_time()
    last: Phase | None = None
    said_at = started
    while True:
        health = await trio.to_thread.run_sync(_get_health, healthz_url)
        phase = capsule_phase(_vmmgr_details(health))
        now = trio.current_time()
        if phase.final:
            elapsed = now - started
            took = f" [{int(elapsed // 60)}m{int(elapsed % 60):02d}s]" if elapsed >= 5 else ""
            say(phase.text + took + (f" {READY_HINT}" if phase.ready else ""))
            return phase
        if phase != last:
            say(f"[{_clock(now - started)}] {phase.text}")
            last, said_at = phase, now
        elif now - said_at >= REMIND_S:
            say(f"[{_clock(now - started)}] ... still {phase.text.removeprefix('capsules: ')}")
            said_at = now
        await trio.sleep(poll_s)
