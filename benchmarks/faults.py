"""Faults under load, the long version of ``tests/suite/test_faults.py``.

Run: ``.venv/bin/python benchmarks/faults.py [--rounds 3] [--capsules 2] [--creates 20]
[--sse 4] [--spacing 5]`` (as root, with libvirt; about ``rounds * 7 * spacing``
seconds plus the boots). Starts its own ``dovecote up`` with VMs, boots
``--capsules`` capsules and drives execs and file writes on them, create →
(pause → resume) → destroy cycles and ``--sse`` event-stream clients, while
every supervised process (broker, auth, vmmgr, gateway, notifier, metrics,
recorder) is SIGKILLed in turn, ``--rounds`` times. It prints the recovery
time of each kill (p50 and max per service), the requests by outcome, the
failed requests on a timeline around the kills, and every broken promise
(see ``tests/helpers/faults.py``); the exit status is 1 if there is one.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.helpers.capsules import libvirt_ready  # noqa: E402
from tests.helpers.faults import KILLED_IN_TURN, FaultRun, running_capsules, start_faults_suite  # noqa: E402  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="kills of each service")
    parser.add_argument("--capsules", type=int, default=2, help="long-lived capsules under load")
    parser.add_argument("--creates", type=int, default=20, help="create cycles at most")
    parser.add_argument("--sse", type=int, default=4, help="event-stream clients")
    parser.add_argument("--spacing", type=float, default=5.0, help="seconds between kills")
    parser.add_argument("--limit", type=float, default=10.0, help="seconds a service has to come back")
    args = parser.parse_args()
    reason = libvirt_ready()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    suite, top = start_faults_suite("dcfaultb-")
    try:
        suite.wait_ready()
        key, capsules = running_capsules(suite, args.capsules)
        print(f"suite up, {len(capsules)} capsules running; {args.rounds} rounds of kills", flush=True)
        run = FaultRun(suite, key, capsules, max_creates=args.creates, sse_clients=args.sse)
        problems = trio.run(lambda: run.run(KILLED_IN_TURN, rounds=args.rounds,
                                            spacing_s=args.spacing, limit_s=args.limit))
        print(run.summary())
        by_service: dict[str, list[float]] = defaultdict(list)
        for fault in run.faults:
            if fault.recovery_s is not None:
                by_service[fault.service].append(fault.recovery_s)
        print("recovery (kill -> new process and /healthz 200):")
        for service in KILLED_IN_TURN:
            times = by_service.get(service, [])
            if times:
                print(f"  {service:9} n={len(times)} p50={statistics.median(times):.2f}s "
                      f"max={max(times):.2f}s")
        print("failed requests around the kills:")
        print(run.timeline())
        print(f"broken promises: {len(problems)}")
        for problem in problems:
            print(f"  {problem}")
        return 1 if problems else 0
    finally:
        suite.stop()
        shutil.rmtree(top, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
