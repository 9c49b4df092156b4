"""Idempotency keys of the notifier's log: an event sent again with its key is appended once.

vmmgr's outbox (``vmmgr/event_outbox.py``) sends each event until the notifier
answers; a reply lost after the notifier's commit must not double the event.
Over the suite's real bus and notifier, read back through ``ListEvents`` and SSE.
"""

from __future__ import annotations

import secrets

import trio

from dovecote.bus.messages.events import (
    EventList,
    EventRecorded,
    EventsRecorded,
    ListEvents,
    RecordEvent,
    RecordEvents,
)
from dovecote.services.client import open_cli_bus
from tests.events.conftest import Member
from tests.events.fakes import capsule_event
from tests.events.helpers import open_sse
from tests.helpers.suite import Suite


async def test_an_event_sent_again_with_its_key_is_logged_once(events_suite: Suite, team_a: Member) -> None:
    tag = secrets.token_hex(4)
    first, second, third = (capsule_event(f"cap-{tag}-{n}") for n in range(3))
    key = f"test:{tag}"
    with trio.fail_after(60):
        async with open_sse(events_suite, key=team_a.key) as sse:
            assert (await sse.frame()).event == "connected"
            async with open_cli_bus(events_suite.data_dir) as bus:
                keyed = RecordEvent(team_id=team_a.team_id, event=first, key=key)
                one = await bus.request("notifier", keyed, timeout=10)
                again = await bus.request("notifier", keyed, timeout=10)
                assert isinstance(one, EventRecorded) and isinstance(again, EventRecorded)
                assert again.id == one.id
                # A batch: the known key answers its id, a key twice in the batch is appended
                # once, an event with no key is appended as always.
                batch = await bus.request("notifier", RecordEvents(events=[
                    RecordEvent(team_id=team_a.team_id, event=first, key=key),
                    RecordEvent(team_id=team_a.team_id, event=second, key=f"{key}:2"),
                    RecordEvent(team_id=team_a.team_id, event=second, key=f"{key}:2"),
                    RecordEvent(team_id=team_a.team_id, event=third)]), timeout=10)
                assert isinstance(batch, EventsRecorded)
                assert batch.ids[0] == one.id and batch.ids[1] == batch.ids[2]
                assert one.id < batch.ids[1] < batch.ids[3]
                listed = await bus.request("notifier", ListEvents(team_id=team_a.team_id, after=one.id - 1),
                                           timeout=10)
                assert isinstance(listed, EventList)
                mine = [(e.id, e.event.resource.id) for e in listed.events if tag in e.event.resource.id]
                assert mine == [(one.id, first.resource.id), (batch.ids[1], second.resource.id),
                                (batch.ids[3], third.resource.id)]
            # The stream saw each once, in order.
            seen: list[str] = []
            while len(seen) < 3:
                frame = await sse.frame()
                if frame.data and tag in frame.data.get("resource", {}).get("id", ""):
                    seen.append(frame.data["resource"]["id"])
            assert seen == [first.resource.id, second.resource.id, third.resource.id]
            bad = await bus_refusal(events_suite, team_a.team_id)
            assert bad == "invalid_event"


async def bus_refusal(suite: Suite, team_id: str) -> str:
    """The code of the notifier's refusal of a key past 200 characters."""
    from dovecote.libs.errors import ServiceError

    async with open_cli_bus(suite.data_dir) as bus:
        try:
            await bus.request("notifier", RecordEvent(team_id=team_id, event=capsule_event("cap-x"),
                                                      key="k" * 201), timeout=10)
        except ServiceError as exc:
            return exc.code
    return "accepted"
