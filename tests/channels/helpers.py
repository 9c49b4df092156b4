"""Users, events, attempts and database rows of the channel tests."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

import httpx
import psycopg
import trio
from psycopg.rows import dict_row

from dovecote.bus.messages.channels import DeliveryAttempt, DeliveryAttempts, ListDeliveryAttempts
from dovecote.bus.messages.events import (
    EventActor,
    EventRecorded,
    EventResource,
    LifecycleEvent,
    RecordEvent,
)
from dovecote.libs.embedded_pg import start_embedded_postgres
from dovecote.libs.timefmt import now_rfc3339
from dovecote.services.client import open_cli_bus
from tests.accounts.helpers import Browser, signed_up_user
from tests.helpers.suite import Suite


@dataclass
class User:
    browser: Browser
    user_id: str
    team_id: str
    email: str


def new_user(suite: Suite, name: str = "Ana") -> User:
    """A new account, signed in to its own default team (as owner)."""
    browser, email, password = signed_up_user(suite, name)
    login = browser.post("/v1/auth/login", {"email": email, "password": password})
    assert login.status_code == 200, login.text
    body = login.json()
    return User(browser, body["user_id"], body["team_id"], email)


def error(response: httpx.Response, status: int) -> tuple[str, str]:
    """(code, message) of a refused request, after checking its status and shape."""
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    return body["error"]["code"], body["error"]["message"]


def create(user: User, provider: str, config: dict[str, str], events: list[str],
           name: str | None = None) -> dict[str, Any]:
    response = user.browser.post("/v1/channels", {
        "name": name or f"{provider}-{secrets.token_hex(3)}", "provider": provider,
        "config": config, "events": events})
    assert response.status_code == 201, response.text
    channel: dict[str, Any] = response.json()
    return channel


def lifecycle_event(name: str, resource_id: str = "", **kw: Any) -> LifecycleEvent:
    return LifecycleEvent(
        event=name, resource=EventResource(id=resource_id or "cap-" + secrets.token_hex(6),
                                           type=name.split(".")[0] if "snapshot" not in name else "template"),
        actor=EventActor(type="user", id="usr_test", name="Tester"), timestamp=now_rfc3339(),
        outcome=kw.pop("outcome", "success"), **kw)


def record(suite: Suite, team_id: str, *events: LifecycleEvent) -> list[int]:
    """Append events to the suite's log over the bus (as vmmgr would); their ids."""

    async def send() -> list[int]:
        ids = []
        with trio.fail_after(60):
            async with open_cli_bus(suite.data_dir) as bus:
                for event in events:
                    reply = await bus.request("notifier", RecordEvent(team_id=team_id, event=event),
                                              timeout=20)
                    assert isinstance(reply, EventRecorded), reply
                    ids.append(reply.id)
        return ids

    return trio.run(send)


def attempts(suite: Suite, channel_id: str = "", event_id: int = 0) -> list[DeliveryAttempt]:
    """The recorded delivery attempts of a channel/event, oldest first."""

    async def ask() -> list[DeliveryAttempt]:
        with trio.fail_after(60):
            async with open_cli_bus(suite.data_dir) as bus:
                reply = await bus.request("notifier", ListDeliveryAttempts(
                    channel_id=channel_id, event_id=event_id), timeout=20)
        assert isinstance(reply, DeliveryAttempts), reply
        return reply.attempts

    return trio.run(ask)


def notifier_rows(suite: Suite, query: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    """Rows of the suite's notifier schema, read from its embedded PostgreSQL."""
    handle = start_embedded_postgres(suite.data_dir)  # borrowed: the suite owns the server
    assert not handle.owned
    with psycopg.connect(handle.url, autocommit=True, row_factory=dict_row) as conn:
        conn.execute("SET search_path TO notifier")
        return list(conn.execute(query.encode(), params).fetchall())
