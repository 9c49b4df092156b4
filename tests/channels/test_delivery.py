"""Deliveries over real HTTP: events recorded on the suite's bus reach local receivers
standing in for the providers, with retries, rate limits and a notifier killed mid-retry.

The suite (tests/channels/conftest.py) retries fast: backoff 0.3 s doubling to
1.5 s, 5 attempts, 3 s request timeout, a lease of timeout + 2 s.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import os
import secrets
import signal
import time

import httpx
import pytest

from dovecote.bus.messages.channels import DeliveryAttempt
from tests.channels.helpers import User, attempts, create, lifecycle_event, new_user, record
from tests.channels.receiver import Receiver, Reply
from tests.helpers.suite import Suite


@pytest.fixture
def ana(channel_suite: Suite) -> User:
    return new_user(channel_suite, "Ana")


def wait_attempts(suite: Suite, channel_id: str, done: int, timeout: float = 60) -> list[DeliveryAttempt]:
    """The channel's attempts once ``done`` deliveries are no longer pending."""
    deadline = time.monotonic() + timeout
    while True:
        found = attempts(suite, channel_id)
        finished = {a.delivery_id for a in found if a.delivery_status != "pending"}
        if len(finished) >= done:
            return found
        assert time.monotonic() < deadline, found
        time.sleep(0.3)


def test_each_channel_gets_exactly_its_subscribed_events(
        channel_suite: Suite, ana: User, receiver: Receiver) -> None:
    hook_path, slack_path = f"/hook-{secrets.token_hex(4)}", f"/slack-{secrets.token_hex(4)}"
    webhook = create(ana, "webhook", {"url": receiver.url + hook_path},
                     ["capsule.create", "capsule.destroy"])
    slack = create(ana, "slack", {"webhook_url": receiver.url + slack_path}, ["capsule.pause"])
    bo = new_user(channel_suite, "Bo")
    create(bo, "webhook", {"url": receiver.url + hook_path + "-bo"}, ["capsule.create"])

    cap = "cap-" + secrets.token_hex(6)
    ids = record(channel_suite, ana.team_id, *(lifecycle_event(name, cap) for name in (
        "capsule.create", "capsule.pause", "capsule.resume", "capsule.state.changed",
        "capsule.destroy", "host.up")))
    record(channel_suite, bo.team_id, lifecycle_event("capsule.destroy"))  # Bo's, not subscribed
    record(channel_suite, "", lifecycle_event("capsule.create"))  # a platform event: no team

    hooks = receiver.wait_for(hook_path, 2)
    slacks = receiver.wait_for(slack_path, 1)
    found_hook = wait_attempts(channel_suite, webhook["id"], 2)
    found_slack = wait_attempts(channel_suite, slack["id"], 1)
    time.sleep(1.5)  # anything extra would have arrived by now
    assert len(receiver.received(hook_path)) == 2 and len(receiver.received(slack_path)) == 1
    assert receiver.received(hook_path + "-bo") == []
    assert sorted(a.event_id for a in found_hook) == [ids[0], ids[4]]
    assert [a.event_id for a in found_slack] == [ids[1]]
    assert all(a.delivery_status == "delivered" and a.status_code == 200 and a.error is None
               for a in found_hook + found_slack)

    # The webhook: the event JSON, signed with the secret answered at creation.
    assert sorted(h.json()["event"] for h in hooks) == ["capsule.create", "capsule.destroy"]
    for got in hooks:
        assert got.json()["resource"] == {"id": cap, "type": "capsule"}
        assert got.headers["X-Dovecote-Event"] == got.json()["event"]
        stamp = got.headers["X-Dovecote-Timestamp"]
        assert abs(int(stamp) - time.time()) < 120
        mac = hmac.new(webhook["secret"].encode(), stamp.encode() + b"." + got.body, hashlib.sha256)
        assert hmac.compare_digest(got.headers["X-Dovecote-Signature"], "sha256=" + mac.hexdigest())
    # Slack: text + blocks.
    body = slacks[0].json()
    assert body["text"] == f"Capsule paused: capsule {cap}" and body["blocks"][0]["type"] == "header"


def test_a_receiver_failing_three_times_still_gets_the_event(
        channel_suite: Suite, ana: User, receiver: Receiver) -> None:
    path = receiver.script(f"/flaky-{secrets.token_hex(4)}", Reply(500), Reply(502), Reply(503))
    path = path.removeprefix(receiver.url)
    channel = create(ana, "webhook", {"url": receiver.url + path}, ["capsule.create"])
    [event_id] = record(channel_suite, ana.team_id, lifecycle_event("capsule.create"))
    got = receiver.wait_for(path, 4)
    found = wait_attempts(channel_suite, channel["id"], 1)
    assert [(a.attempt, a.status_code) for a in found] == [(1, 500), (2, 502), (3, 503), (4, 200)]
    assert {a.event_id for a in found} == {event_id} and found[-1].delivery_status == "delivered"
    assert found[0].error == 'HTTP 500: {"ok": true}' and found[-1].error is None
    assert all(a.latency_ms >= 0 for a in found)
    # Every retry is the same delivery, freshly signed.
    assert len({g.headers["X-Dovecote-Delivery"] for g in got}) == 1
    assert len({g.body for g in got}) == 1
    gaps = [b.at - a.at for a, b in itertools.pairwise(got)]
    assert all(gap >= 0.1 for gap in gaps), gaps  # backoff, not a hot loop


def test_a_429_retry_after_is_honoured(channel_suite: Suite, ana: User, receiver: Receiver) -> None:
    path = f"/limited-{secrets.token_hex(4)}"
    receiver.script(path, Reply(429, b'{"message": "You are being rate limited.", "retry_after": 2.5}',
                                {"Retry-After": "3"}))
    channel = create(ana, "discord", {"webhook_url": receiver.url + path}, ["host.down"])
    record(channel_suite, ana.team_id, lifecycle_event("host.down", "host-1"))
    first, second = receiver.wait_for(path, 2, timeout=30)
    assert second.at - first.at >= 3.0  # the backoff alone would have been under 0.3 s
    found = wait_attempts(channel_suite, channel["id"], 1)
    assert [a.status_code for a in found] == [429, 200]
    assert "embeds" in second.json()


def test_final_answers_and_exhausted_attempts_fail_the_delivery(
        channel_suite: Suite, ana: User, receiver: Receiver) -> None:
    gone = receiver.script(f"/gone-{secrets.token_hex(4)}", Reply(404, b"no such webhook"))
    down_path = f"/down-{secrets.token_hex(4)}"
    down = receiver.script(down_path, *[Reply(500)] * 10)
    ch_gone = create(ana, "slack", {"webhook_url": gone}, ["capsule.resume"])
    ch_down = create(ana, "teams", {"webhook_url": down}, ["capsule.resume"])
    record(channel_suite, ana.team_id, lifecycle_event("capsule.resume"))
    found = wait_attempts(channel_suite, ch_gone["id"], 1)
    assert [(a.status_code, a.delivery_status) for a in found] == [(404, "failed")]
    found = wait_attempts(channel_suite, ch_down["id"], 1, timeout=60)
    assert [a.attempt for a in found] == [1, 2, 3, 4, 5]  # DOVECOTE_DELIVERY_MAX_ATTEMPTS
    assert {a.delivery_status for a in found} == {"failed"}
    assert len(receiver.received(down_path)) == 5
    card = receiver.received(down_path)[0].json()
    assert card["attachments"][0]["contentType"] == "application/vnd.microsoft.card.adaptive"


def test_telegram_and_matrix_deliveries_reach_their_apis(
        channel_suite: Suite, ana: User, receiver: Receiver) -> None:
    token = "777:" + secrets.token_hex(8)
    tg_path = f"/telegram/bot{token}/sendMessage"  # DOVECOTE_TELEGRAM_API_URL = receiver/telegram
    receiver.script(tg_path, Reply(429, b'{"ok":false,"error_code":429,'
                                        b'"description":"Too Many Requests: retry after 2",'
                                        b'"parameters":{"retry_after":2}}'))
    telegram = create(ana, "telegram", {"bot_token": token, "chat_id": "-100123"},
                      ["template.snapshot.create"])
    hs = f"/matrix-{secrets.token_hex(4)}"
    mx_prefix = f"{hs}/_matrix/client/v3/rooms/%21room%3Aexample.org/send/m.room.message/"
    receiver.script(mx_prefix, Reply(502, b"bad gateway"))
    matrix = create(ana, "matrix", {"homeserver_url": receiver.url + hs, "access_token": "syt_secret",
                                    "room_id": "!room:example.org"}, ["template.snapshot.create"])
    record(channel_suite, ana.team_id, lifecycle_event("template.snapshot.create", "tpl-1"))

    first, second = receiver.wait_for(tg_path, 2)
    assert second.at - first.at >= 2.0
    body = second.json()
    assert body["chat_id"] == "-100123" and body["parse_mode"] == "HTML"
    assert body["text"].startswith("<b>Snapshot created</b>")
    put1, put2 = receiver.wait_for(mx_prefix, 2)
    assert put1.method == put2.method == "PUT"
    assert put1.path == put2.path  # the same txnId: the retry is idempotent
    assert put1.headers["Authorization"] == "Bearer syt_secret"
    assert put2.json()["msgtype"] == "m.text" and "Snapshot created" in put2.json()["body"]
    assert [a.status_code for a in wait_attempts(channel_suite, telegram["id"], 1)] == [429, 200]
    found = wait_attempts(channel_suite, matrix["id"], 1)
    assert [a.status_code for a in found] == [502, 200]
    assert all("syt_secret" not in (a.error or "") for a in found)
    logs = "".join(channel_suite.output)
    assert token not in logs and "syt_secret" not in logs  # never logged


def notifier_pid(suite: Suite) -> tuple[int, int]:
    """(pid, start count) of the suite's notifier, from /healthz."""
    health = httpx.get(suite.url + "/healthz", timeout=10).json()
    details = health["services"]["notifier"].get("details", {})
    return int(details.get("pid", 0)), int(details.get("starts", 0))


def test_killing_the_notifier_mid_retry_loses_no_delivery(
        channel_suite: Suite, ana: User, receiver: Receiver) -> None:
    # Attempt 1 fails; attempt 2 hangs, and the notifier is SIGKILLed while it
    # waits. The supervisor restarts it; the claim's lease ends and attempt 3
    # delivers the same delivery.
    path = f"/killed-{secrets.token_hex(4)}"
    receiver.script(path, Reply(500), Reply(200, delay_s=8))
    channel = create(ana, "webhook", {"url": receiver.url + path}, ["capsule.destroy"])
    pid, starts = notifier_pid(channel_suite)
    assert pid
    [event_id] = record(channel_suite, ana.team_id, lifecycle_event("capsule.destroy"))
    receiver.wait_for(path, 2)
    os.kill(pid, signal.SIGKILL)

    got = receiver.wait_for(path, 3, timeout=90)
    deadline = time.monotonic() + 60
    while notifier_pid(channel_suite)[0] in (0, pid):
        assert time.monotonic() < deadline, "the notifier did not come back"
        time.sleep(0.5)
    assert notifier_pid(channel_suite)[1] > starts
    found = wait_attempts(channel_suite, channel["id"], 1)
    # The killed attempt was never recorded; the delivery still ends delivered.
    assert [(a.attempt, a.status_code) for a in found] == [(1, 500), (3, 200)]
    assert found[-1].delivery_status == "delivered" and found[-1].event_id == event_id
    assert len({g.headers["X-Dovecote-Delivery"] for g in got}) == 1
    assert json.loads(got[-1].body)["event"] == "capsule.destroy"
