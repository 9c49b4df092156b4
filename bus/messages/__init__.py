"""Bus message types, one module per domain, all deriving from :class:`Message`."""

from . import (
    agents,  # noqa: F401  (registers the agent runtime messages of the agents service)
    auth_admin,  # noqa: F401  (registers the audit log and admin messages)
    auth_oauth,  # noqa: F401  (registers the OAuth sign-in and provider messages)
    auth_teams,  # noqa: F401  (registers the team, user search and API key messages)
    browsers,  # noqa: F401  (registers the browser session and CDP stream messages)
    builds,  # noqa: F401  (registers the template build messages of vmmgr)
    capsule_streams,  # noqa: F401  (registers the capsule stream messages of vmmgr)
    capsules,  # noqa: F401  (registers the capsule messages of vmmgr)
    channels,  # noqa: F401  (registers the notification channel messages of the notifier)
    codex,  # noqa: F401  (registers the model sign-in messages of the runs service)
    desktops,  # noqa: F401  (registers the desktop session, action and task messages)
    events,  # noqa: F401  (registers the lifecycle event log messages of the notifier)
    hosts,  # noqa: F401  (registers the host registration, token and heartbeat messages)
    metrics,  # noqa: F401  (registers the metrics, stats, usage and scrape messages)
    recorder,  # noqa: F401  (registers the recorder's evidence and the live view messages)
    runs,  # noqa: F401  (registers the scenario, run, live session, memory and history messages)
)
from .base import Family, Message, UnservedMessage, decode, encode, family_of, registered_messages
from .common import ClientInfo, Failure, Principal
from .errors import ErrorReply
from .health import Ping, Pong

__all__ = [
    "ClientInfo",
    "ErrorReply",
    "Failure",
    "Family",
    "Message",
    "Ping",
    "Pong",
    "Principal",
    "UnservedMessage",
    "decode",
    "encode",
    "family_of",
    "registered_messages",
]
