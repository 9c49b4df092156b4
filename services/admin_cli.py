"""``dovecote admin create``: make a platform admin on a running suite.

The command talks to the auth service over the suite's bus (see
:mod:`dovecote.services.client`), so it works wherever ``dovecote outbox``
does. It creates an active account with the admin flag and a team of its
own, or promotes (and activates) the live account that already has the
address; an existing account keeps its password.

The password comes from ``--password`` (visible to other local users in the
process list), else ``DOVECOTE_ADMIN_PASSWORD``, else a prompt on the
terminal, asked twice.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from pathlib import Path
from typing import Any

PASSWORD_ENV = "DOVECOTE_ADMIN_PASSWORD"


def add_parser(sub: Any) -> None:
    """Add ``admin`` and its subcommands to the ``dovecote`` parser."""
    admin = sub.add_parser("admin", help="manage platform admins of a running suite")
    admin_sub = admin.add_subparsers(dest="admin_command", required=True, metavar="ACTION")
    create = admin_sub.add_parser(
        "create", help="create a platform admin, or promote an existing account")
    create.add_argument("--email", required=True)
    create.add_argument("--name", required=True, help="display name of a new account")
    create.add_argument("--password", default=None,
                        help=f"password of a new account (else ${PASSWORD_ENV}, else prompted)")
    create.add_argument("--data-dir", type=Path, default=None)


def _password(args: argparse.Namespace) -> str | None:
    if args.password:
        return str(args.password)
    if os.environ.get(PASSWORD_ENV):
        return os.environ[PASSWORD_ENV]
    if not sys.stdin.isatty():
        print(f"dovecote admin create: give --password or set {PASSWORD_ENV} "
              "(no terminal to prompt on)", file=sys.stderr)
        return None
    first = getpass.getpass("Password: ")
    if first != getpass.getpass("Password (again): "):
        print("dovecote admin create: the passwords differ", file=sys.stderr)
        return None
    return first


def main(args: argparse.Namespace) -> int:
    """Run ``dovecote admin <action>``; returns the exit status."""
    if args.admin_command != "create":
        return 2
    password = _password(args)
    if password is None:
        return 2

    from dovecote.bus.messages.auth_admin import CreateAdmin
    from dovecote.services.client import request_once

    data_dir = args.data_dir or Path(os.environ.get("DOVECOTE_DATA_DIR", ".dovecote"))
    message = CreateAdmin(email=args.email, name=args.name, password=password)
    reply = request_once(data_dir, "auth", message, command="admin create")
    if reply is None:
        return 1
    if reply.created:
        print(f"created platform admin {reply.email} ({reply.user_id})")
    else:
        print(f"promoted {reply.email} ({reply.user_id}) to platform admin; "
              "its password is unchanged")
    return 0
