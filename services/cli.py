"""The ``dovecote`` command.

``dovecote up`` runs the whole suite on this machine (see
:mod:`dovecote.services.supervisor`); ``dovecote <service>`` runs one service
process, which is what containers and the supervisor use; ``dovecote test``
runs the test suite; ``dovecote health`` asks a running gateway; ``dovecote
key create`` gives a new local user an API key and ``dovecote capsule ...``
uses capsules with it over the public API.
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
from pathlib import Path

from dovecote.services import admin_cli, capsule_cli, key_cli

# service name -> module holding its SPEC
SERVICE_MODULES = {
    "gateway": "dovecote.gateway.service",
    "auth": "dovecote.services.auth.service",
    "vmmgr": "dovecote.vmmgr.service",
    "recorder": "dovecote.recorder.service",
    "notifier": "dovecote.notifier.service",
    "metrics": "dovecote.services.metrics.service",
    "desktops": "dovecote.services.desktops.service",
    "agents": "dovecote.services.agents.service",
    "browsers": "dovecote.services.browsers.service",
    "runs": "dovecote.services.runs.service",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dovecote", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    up = sub.add_parser("up", help="run the whole suite on this machine")
    up.add_argument("--host", help="gateway address (DOVECOTE_HTTP_HOST, 127.0.0.1)")
    up.add_argument("--port", type=int, help="gateway port (DOVECOTE_HTTP_PORT, 8080)")
    up.add_argument("--data-dir", type=Path, help="data directory (DOVECOTE_DATA_DIR, ./.dovecote)")
    up.add_argument("--grace", type=float, help="shutdown grace, seconds (DOVECOTE_SHUTDOWN_GRACE_S)")
    up.add_argument("--keep-running", action="store_true",
                    help="leave capsules running when stopped (default: pause them, resume at next up)")
    sub.add_parser("broker", help="run the bus broker")
    keygen = sub.add_parser("bus-keygen", help="print a new CURVE keypair as environment variables")
    keygen.add_argument("--kubernetes", metavar="NAMESPACE", nargs="?", const="dovecote",
                        help="print a Secret with broker and client keys instead (infra/k8s)")
    probe = sub.add_parser("probe", help="exit 0 if SERVICE answers the health RPC on the bus")
    probe.add_argument("service", help="broker name of the service (gateway, auth, vmmgr, ...)")
    probe.add_argument("--timeout", type=float, default=3.0)
    probe.add_argument("--data-dir", type=Path, default=None)
    for name in SERVICE_MODULES:
        service = sub.add_parser(name, help=f"run the {name} service")
        if name == "vmmgr":  # join another machine to a suite (services/host_registration.py)
            service.add_argument("--register", metavar="TOKEN", help="one-time host registration token")
            service.add_argument("--control-plane", metavar="URL", help="the suite's public URL")
    health = sub.add_parser("health", help="print a running gateway's /healthz")
    health.add_argument("--url", default="http://127.0.0.1:8080")
    outbox = sub.add_parser("outbox", help="print the mails waiting in the outbox (no SMTP_URL)")
    outbox.add_argument("--limit", type=int, default=10)
    outbox.add_argument("--data-dir", type=Path, default=None)
    outbox.add_argument("--json", action="store_true", help="one JSON object per mail")
    admin_cli.add_parser(sub)
    key_cli.add_parser(sub)
    capsule_cli.add_parser(sub)
    test = sub.add_parser("test", help="run the test suite (arguments go to pytest)")
    test.add_argument("pytest_args", nargs=argparse.REMAINDER)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dovecote`` console script."""
    args = _parser().parse_args(argv)
    if args.command == "up":
        import trio

        from dovecote.gateway.state import GatewayConfig
        from dovecote.libs.config import load_config
        from dovecote.libs.errors import ConfigError
        from dovecote.libs.logs import setup_logging
        from dovecote.services.supervisor import UpOptions, run_up
        from dovecote.vmmgr.service import VmmgrConfig

        try:
            config = load_config(GatewayConfig)
            vm_config = load_config(VmmgrConfig)
        except ConfigError as exc:
            print(f"dovecote up: {exc}", file=sys.stderr)
            return 2
        data_dir = (args.data_dir or Path(config.data_dir)).resolve()
        setup_logging("up", config.log_level, config.log_format, log_dir=data_dir / "logs",
                      max_bytes=config.log_file_max_bytes, backups=config.log_file_backups)
        options = UpOptions(
            data_dir=data_dir,
            host=args.host or config.http_host,
            port=config.http_port if args.port is None else args.port,
            grace_s=config.shutdown_grace_s if args.grace is None else args.grace,
            keep_running=args.keep_running or vm_config.vm_keep_running,
            vm_stop_timeout_s=vm_config.vm_stop_timeout_s)
        return trio.run(run_up, options)
    if args.command == "broker":
        from dovecote.bus.broker import main as broker_main

        return broker_main()
    if args.command == "vmmgr":
        from dovecote.services.host_registration import has_registration, join

        # A machine that holds a registration always starts as that host.
        if (args.register or args.control_plane or has_registration()) and join(
                args.register, args.control_plane):
            return 1
    if args.command == "bus-keygen" and args.kubernetes:
        from dovecote.services.kube import render

        print(render(args.kubernetes))
        return 0
    if args.command == "probe":
        from dovecote.services import probe as probe_mod

        return probe_mod.main(args.service, _data_dir(args.data_dir), args.timeout)
    if args.command == "bus-keygen":
        from dovecote.bus import generate_keypair
        from dovecote.bus.curve import ENV_PUBLIC, ENV_SECRET

        pair = generate_keypair()
        print(f"{ENV_PUBLIC}={pair.public}\n{ENV_SECRET}={pair.secret}")
        return 0
    if args.command in SERVICE_MODULES:
        from dovecote.libs.runtime import run_service

        spec = importlib.import_module(SERVICE_MODULES[args.command]).SPEC
        return run_service(spec)
    if args.command == "health":
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(args.url.rstrip("/") + "/healthz", timeout=5) as resp:
                print(resp.read().decode())
                return 0
        except urllib.error.HTTPError as exc:
            print(exc.read().decode())
            return 1
        except OSError as exc:
            print(f"gateway unreachable: {exc}", file=sys.stderr)
            return 1
    if args.command == "outbox":
        return _outbox(args)
    if args.command == "admin":
        return admin_cli.main(args)
    if args.command == "key":
        return key_cli.main(args)
    if args.command == "capsule":
        return capsule_cli.main(args)
    if args.command == "test":
        extra = [a for a in args.pytest_args if a != "--"]
        return subprocess.call([sys.executable, "-m", "pytest", *extra])
    return 2


def _data_dir(arg: Path | None) -> Path:
    return arg or Path(os.environ.get("DOVECOTE_DATA_DIR", ".dovecote"))


def _outbox(args: argparse.Namespace) -> int:
    import msgspec
    import trio

    from dovecote.bus import BusError
    from dovecote.bus.messages.auth import ListOutbox, OutboxReply
    from dovecote.services.client import open_cli_bus

    async def fetch() -> OutboxReply:
        async with open_cli_bus(_data_dir(args.data_dir)) as bus:
            reply: OutboxReply = await bus.request("auth", ListOutbox(limit=args.limit), timeout=10)
            return reply

    reply: OutboxReply | None = None
    try:
        reply = trio.run(fetch)
    except* BusError as group:
        print(f"dovecote outbox: the suite does not answer ({group.exceptions[0]}); "
              "is `dovecote up` running?", file=sys.stderr)
    if reply is None:
        return 1
    for mail in reversed(reply.mails):
        if args.json:
            print(msgspec.json.encode(mail).decode())
        else:
            print(f"--- #{mail.id} {mail.created_at}\nTo: {mail.to}\nSubject: {mail.subject}\n\n"
                  f"{mail.body}")
    if not reply.mails and not args.json:
        print("the outbox is empty")
    return 0


if __name__ == "__main__":
    sys.exit(main())
