"""Event plane: XSUB -> XPUB fan-out with dotted prefix subscriptions."""

from __future__ import annotations

import trio

from dovecote.bus import open_broker, open_bus

from .messages_for_tests import StateChanged


async def test_events_fan_out_to_every_matching_subscriber_by_prefix(endpoints, broker):
    got: dict[str, list[tuple[str, str]]] = {"all": [], "capsule": [], "state": [], "host": []}
    prefixes = {"all": ("",), "capsule": ("capsule.",), "state": ("capsule.state.",),
                "host": ("host.",)}
    async with open_bus(endpoints, "pub") as pub, open_bus(endpoints, "sub") as sub:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:

                async def listen(key: str, task_status=trio.TASK_STATUS_IGNORED) -> None:
                    async with sub.subscribe(*prefixes[key]) as events:
                        task_status.started()
                        async for topic, event in events:
                            got[key].append((topic, event.capsule))

                for key in got:
                    await nursery.start(listen, key)
                await pub.publish("capsule.state.changed", StateChanged(capsule="c1", state="up"))
                await pub.publish("capsule.deleted", StateChanged(capsule="c2", state="gone"))
                await pub.publish("host.added", StateChanged(capsule="-", state="x"))
                await pub.publish("capsulex.nope", StateChanged(capsule="c3", state="x"))
                await trio.sleep(0.2)  # let every subscriber receive what it will
                nursery.cancel_scope.cancel()
    assert got["capsule"] == [("capsule.state.changed", "c1"), ("capsule.deleted", "c2")]
    assert got["state"] == [("capsule.state.changed", "c1")]
    assert got["host"] == [("host.added", "-")]
    assert [t for t, _ in got["all"]] == ["capsule.state.changed", "capsule.deleted",
                                          "host.added", "capsulex.nope"]


async def test_subscriber_keeps_receiving_after_broker_restart(endpoints):
    async with open_bus(endpoints, "pub") as pub, open_bus(endpoints, "sub") as sub:
        with trio.fail_after(15):
            async with open_broker(endpoints):
                async with sub.subscribe("capsule.") as events:
                    await pub.publish("capsule.a", StateChanged(capsule="1", state="x"))
                    assert (await events.receive())[1].capsule == "1"
                    await trio.sleep(0.05)
                    # the SUB and PUB sockets reconnect by themselves and resend subscriptions
                    async with open_broker(endpoints):
                        while True:
                            await pub.publish("capsule.b", StateChanged(capsule="2", state="x"))
                            with trio.move_on_after(0.05):
                                topic, event = await events.receive()
                                break
                        assert (topic, event.capsule) == ("capsule.b", "2")
