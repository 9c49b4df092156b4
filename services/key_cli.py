"""``dovecote key create``: an account and a working API key on a running suite, in one step.

The command talks to the auth service over the suite's bus (like
``dovecote admin create``: access to the bus is the right to ask). The
account with ``--email`` is created when missing (active, no password: set
one with the web UI's password reset when you want to sign in there),
activated when pending, and gets a new key on its default team.

The key goes to standard output (so ``KEY=$(dovecote key create ...)``
works) and into the client config file (:mod:`dovecote.services.cli_config`)
that ``dovecote capsule ...`` reads, unless ``--no-save``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from dovecote.services.cli_config import ENV_URL, ConfigFileError, save_settings


def add_parser(sub: Any) -> None:
    """Add ``key`` and its subcommands to the ``dovecote`` parser."""
    key = sub.add_parser("key", help="API keys for the command line and scripts")
    key_sub = key.add_subparsers(dest="key_command", required=True, metavar="ACTION")
    create = key_sub.add_parser(
        "create", help="create an API key (and its account if needed); prints the key")
    create.add_argument("--email", required=True, help="the account's email address")
    create.add_argument("--name", default="", help="display name of a new account")
    create.add_argument("--key-name", default="dovecote CLI", help="the key's name")
    create.add_argument("--no-save", action="store_true",
                        help="do not write the key into the client config file")
    create.add_argument("--data-dir", type=Path, default=None)


def main(args: argparse.Namespace) -> int:
    """Run ``dovecote key <action>``; returns the exit status."""
    if args.key_command != "create":
        return 2

    from dovecote.bus.messages.auth_teams import CreateLocalKey
    from dovecote.services.client import request_once

    data_dir = args.data_dir or Path(os.environ.get("DOVECOTE_DATA_DIR", ".dovecote"))
    message = CreateLocalKey(email=args.email, name=args.name, key_name=args.key_name)
    reply = request_once(data_dir, "auth", message, command="key create")
    if reply is None:
        return 1
    who = "created the account" if reply.account_created else "account"
    note = f"{who} {reply.email}; API key {reply.body.key_prefix} on team {reply.body.team_id}"
    if not args.no_save:
        values = {"api_key": reply.body.key}
        if os.environ.get(ENV_URL):
            values["url"] = os.environ[ENV_URL]
        try:
            path = save_settings(values)
            note += f"\nsaved in {path} for `dovecote capsule ...`"
        except (OSError, ConfigFileError) as exc:
            note += f"\nnot saved ({exc}); set DOVECOTE_API_KEY to use it"
    print(note + "\nthe key is shown only once:", file=sys.stderr)
    print(reply.body.key, flush=True)
    return 0
