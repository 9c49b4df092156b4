"""Provider formats, config validation, signatures, retry hints and sealing, without a suite.

Each payload test checks the fields the provider's API documents (Discord
Execute Webhook, Slack incoming webhooks with Block Kit, Teams incoming
webhooks with an Adaptive Card, Google Chat ``cardsV2``, Telegram
``sendMessage``, Matrix ``PUT .../send/m.room.message/{txnId}``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import stat
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import trio

from dovecote.bus.messages.capsules import Capsule
from dovecote.bus.messages.events import EventActor, EventResource, LifecycleEvent
from dovecote.libs.errors import ConfigError
from dovecote.notifier import providers as p
from dovecote.notifier.channels import KEY_FILE, ConfigUnreadable, Sealer, load_channel_key
from tests.channels.receiver import Receiver, Reply

SETTINGS = p.ProviderSettings(telegram_api_url="https://tg.example/")
KEY = "ch_0123456789abcdef.42"


def event(name: str = "capsule.create", **kw: Any) -> LifecycleEvent:
    fields: dict[str, Any] = {
        "event": name, "resource": EventResource(id="cap-1234", type="capsule"),
        "actor": EventActor(type="user", id="usr_1", name="Ana <ana@example.com>"),
        "timestamp": "2025-01-02T03:04:05Z", "outcome": "success",
        "metadata": {"reason": "*bold* & <tag>"},
        "sandbox": Capsule(id="cap-1234", status="running", template="base", vcpus=1, memory_mb=512,
                           timeout_sec=0)}
    fields.update(kw)
    return LifecycleEvent(**fields)


def request(provider: str, config: dict[str, str], ev: LifecycleEvent | None = None) -> p.HttpRequest:
    return p.build_request(provider, config, ev or event(), key=KEY, settings=SETTINGS, now=1700000000)


def body(req: p.HttpRequest) -> Any:
    return json.loads(req.body)


# -- formats ----------------------------------------------------------------------------


def test_discord_sends_one_embed_without_mentions() -> None:
    req = request("discord", {"webhook_url": "https://discord.com/api/webhooks/1/tok"})
    assert (req.method, req.url) == ("POST", "https://discord.com/api/webhooks/1/tok")
    assert req.headers["Content-Type"].startswith("application/json")
    data = body(req)
    assert data["allowed_mentions"] == {"parse": []}
    [embed] = data["embeds"]
    assert embed["title"] == "Capsule created"
    assert embed["timestamp"] == "2025-01-02T03:04:05Z"
    assert isinstance(embed["color"], int)
    names = {f["name"]: f["value"] for f in embed["fields"]}
    assert names["Capsule"] == "cap-1234" and names["Event"] == "capsule.create"
    assert names["reason"] == "\\*bold\\* & <tag>"  # markdown escaped
    assert all(len(f["name"]) <= 256 and len(f["value"]) <= 1024 for f in embed["fields"])
    assert len(embed["fields"]) <= 25


def test_discord_failed_outcome_puts_the_error_in_the_description() -> None:
    data = body(request("discord", {"webhook_url": "https://d.example/x"},
                        event(outcome="error", error="no space left")))
    [embed] = data["embeds"]
    assert embed["title"] == "Capsule created (failed)" and embed["description"] == "no space left"


def test_slack_sends_text_and_block_kit_blocks() -> None:
    data = body(request("slack", {"webhook_url": "https://hooks.slack.com/services/T/B/x"}))
    assert data["text"] == "Capsule created: capsule cap-1234"
    blocks = data["blocks"]
    assert isinstance(blocks, list)
    assert blocks[0] == {"type": "header", "text": {"type": "plain_text", "text": "Capsule created",
                                                    "emoji": False}}
    sections = [b for b in blocks if b["type"] == "section"]
    assert sections and all(len(s["fields"]) <= 10 for s in sections if "fields" in s)
    texts = [f["text"] for s in sections for f in s.get("fields", [])]
    assert all(f["type"] == "mrkdwn" for s in sections for f in s.get("fields", []))
    assert "*reason*\n*bold* &amp; &lt;tag&gt;" in texts  # &, <, > escaped for mrkdwn
    assert blocks[-1]["type"] == "context"


def test_teams_sends_a_message_with_an_adaptive_card() -> None:
    data = body(request("teams", {"webhook_url": "https://example.webhook.office.com/x"}))
    assert data["type"] == "message"
    [attachment] = data["attachments"]
    assert attachment["contentType"] == "application/vnd.microsoft.card.adaptive"
    card = attachment["content"]
    assert card["type"] == "AdaptiveCard" and card["version"] == "1.4"
    assert card["$schema"] == "http://adaptivecards.io/schemas/adaptive-card.json"
    assert card["body"][0]["type"] == "TextBlock" and card["body"][0]["text"] == "Capsule created"
    facts = {f["title"]: f["value"] for f in card["body"][1]["facts"]}
    assert facts["Capsule"] == "cap-1234"


def test_google_chat_sends_a_cards_v2_card() -> None:
    data = body(request("googlechat", {"webhook_url": "https://chat.googleapis.com/v1/spaces/x"}))
    [entry] = data["cardsV2"]
    assert entry["cardId"].startswith("dovecote-")
    card = entry["card"]
    assert card["header"]["title"] == "Capsule created"
    widgets = card["sections"][0]["widgets"]
    texts = {w["decoratedText"]["topLabel"]: w["decoratedText"]["text"] for w in widgets}
    assert texts["reason"] == "*bold* &amp; &lt;tag&gt;"  # HTML-escaped


def test_telegram_calls_send_message_on_the_configured_api() -> None:
    req = request("telegram", {"bot_token": "123:ABC-def", "chat_id": "-1001"})
    assert (req.method, req.url) == ("POST", "https://tg.example/bot123:ABC-def/sendMessage")
    data = body(req)
    assert data["chat_id"] == "-1001" and data["parse_mode"] == "HTML"
    text = data["text"]
    assert isinstance(text, str) and len(text) <= 4096
    assert text.startswith("<b>Capsule created</b>")
    assert "Ana &lt;ana@example.com&gt;" in text and "*bold* &amp; &lt;tag&gt;" in text


def test_matrix_puts_an_m_text_message_with_a_stable_txn_id() -> None:
    config = {"homeserver_url": "https://matrix.example/", "access_token": "syt_abc",
              "room_id": "!room:matrix.example"}
    req = request("matrix", config)
    assert req.method == "PUT"
    assert req.url == ("https://matrix.example/_matrix/client/v3/rooms/%21room%3Amatrix.example"
                       "/send/m.room.message/ch_0123456789abcdef.42")
    assert req.headers["Authorization"] == "Bearer syt_abc"
    data = body(req)
    assert data["msgtype"] == "m.text" and data["format"] == "org.matrix.custom.html"
    assert str(data["body"]).startswith("Capsule created\n")
    assert "<b>Capsule created</b><br>" in str(data["formatted_body"])
    assert request("matrix", config).url == req.url  # the same on every retry


def test_webhook_body_is_the_event_and_the_signature_verifies() -> None:
    secret = "whsec_" + "x" * 30
    ev = event()
    req = request("webhook", {"url": "https://example.com/hook", "secret": secret}, ev)
    assert req.body == msgspec.json.encode(ev)  # the SSE event body, as is
    data = body(req)
    assert data["event"] == "capsule.create" and data["resource"] == {"id": "cap-1234", "type": "capsule"}
    assert req.headers["X-Dovecote-Event"] == "capsule.create"
    assert req.headers["X-Dovecote-Delivery"] == KEY
    assert req.headers["X-Dovecote-Timestamp"] == "1700000000"
    expected = hmac.new(secret.encode(), b"1700000000." + req.body, hashlib.sha256).hexdigest()
    assert req.headers["X-Dovecote-Signature"] == "sha256=" + expected


def test_every_provider_formats_every_channel_event() -> None:
    configs = {
        "discord": {"webhook_url": "https://d.example/x"}, "slack": {"webhook_url": "https://s.example/x"},
        "teams": {"webhook_url": "https://t.example/x"}, "googlechat": {"webhook_url": "https://g.example/x"},
        "telegram": {"bot_token": "1:a", "chat_id": "@chan_name"},
        "matrix": {"homeserver_url": "http://m.example", "access_token": "t", "room_id": "!r:m"},
        "webhook": {"url": "http://w.example/x", "secret": "s" * 16}}
    assert set(configs) == set(p.PROVIDERS)
    names = ["capsule.create", "capsule.pause", "capsule.resume", "capsule.destroy",
             "template.snapshot.create", "template.snapshot.delete", "host.up", "host.down",
             "something.new"]
    for provider, config in configs.items():
        for name in names:
            ev = LifecycleEvent(event=name, resource=EventResource(id="x" * 500, type="host"),
                                actor=EventActor(type="system"), timestamp="not a time",
                                metadata={f"k{i}": "v" * 3000 for i in range(30)})
            req = p.build_request(provider, config, ev, key=KEY, settings=SETTINGS)
            assert json.loads(req.body)
            if provider == "discord":
                [embed] = json.loads(req.body)["embeds"]
                assert "timestamp" not in embed  # Discord refuses a bad timestamp
            if provider == "telegram":
                assert len(json.loads(req.body)["text"]) <= 4096


# -- config validation ---------------------------------------------------------------------


@pytest.mark.parametrize(("provider", "config", "field"), [
    ("slack", {}, "config.webhook_url"),
    ("discord", {"webhook_url": " "}, "config.webhook_url"),
    ("teams", {"webhook_url": "ftp://x.example/"}, "config.webhook_url"),
    ("googlechat", {"webhook_url": "javascript:alert(1)"}, "config.webhook_url"),
    ("telegram", {"bot_token": "123:abc"}, "config.chat_id"),
    ("telegram", {"bot_token": "abc", "chat_id": "1"}, "config.bot_token"),
    ("telegram", {"bot_token": "1:a/../x", "chat_id": "1"}, "config.bot_token"),
    ("matrix", {"homeserver_url": "https://m", "access_token": "t"}, "config.room_id"),
    ("matrix", {"homeserver_url": "https://m", "access_token": "t", "room_id": "#alias:m"},
     "config.room_id"),
    ("webhook", {"secret": "s" * 20}, "config.url"),
    ("webhook", {"url": "http://x.example", "secret": "short"}, "config.secret"),
    ("webhook", {"url": "http://x.example", "extra": "1"}, "config.extra"),
    ("pigeon", {}, "provider"),
])
def test_invalid_configs_name_the_field(provider: str, config: dict[str, str], field: str) -> None:
    with pytest.raises(p.InvalidConfig) as info:
        p.validate_config(provider, config)
    assert info.value.field == field
    assert field.removeprefix("config.") in info.value.message


def test_valid_configs_are_trimmed() -> None:
    assert p.validate_config("webhook", {"url": " https://x.example/h ", "secret": ""}) == {
        "url": "https://x.example/h"}
    assert p.validate_config("telegram", {"bot_token": "12:A_b-c", "chat_id": "@my_channel"})


# -- retry hints and errors -----------------------------------------------------------------


def test_retry_after_reads_headers_and_provider_bodies() -> None:
    assert p.retry_after(httpx.Headers({"Retry-After": "7"}), b"") == 7
    assert p.retry_after(httpx.Headers(), b'{"retry_after": 1.5, "global": false}') == 1.5  # Discord
    assert p.retry_after(httpx.Headers(), b'{"ok":false,"parameters":{"retry_after":3}}') == 3  # Telegram
    assert p.retry_after(httpx.Headers(), b'{"errcode":"M_LIMIT_EXCEEDED","retry_after_ms":2500}') == 2.5
    assert p.retry_after(httpx.Headers({"Retry-After": "nonsense"}), b"not json") is None
    http_date = p.retry_after(httpx.Headers({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}), b"")
    assert http_date == 0  # in the past


def test_scrub_masks_config_values() -> None:
    config = {"bot_token": "123:SECRETTOKEN", "chat_id": "42"}
    assert p.scrub("GET /bot123:SECRETTOKEN/sendMessage\nfailed", config) == "GET /bot***/sendMessage failed"


async def test_send_classifies_answers() -> None:
    with Receiver() as receiver:
        receiver.script("/r", Reply(500, b"boom token=abcdef"), Reply(429, b"{}", {"Retry-After": "2"}),
                        Reply(404, b"gone"), Reply(204, b""), Reply(200, b"", delay_s=2))
        url = receiver.url + "/r"
        req = p.HttpRequest("POST", url, {}, b"{}")
        config = {"secret": "abcdef"}
        async with httpx.AsyncClient() as client:
            refused = await p.send(client, req, timeout_s=5, config=config)  # 127.0.0.1: not public
            assert not refused.ok and not refused.retryable and refused.status_code is None
            assert "not a public address" in str(refused.error) and receiver.received("/r") == []
            first = await p.send(client, req, timeout_s=5, config=config, allow_private=True)
            assert (first.ok, first.status_code, first.retryable) == (False, 500, True)
            assert first.error == "HTTP 500: boom token=***"
            limited = await p.send(client, req, timeout_s=5, config=config, allow_private=True)
            assert (limited.status_code, limited.retryable, limited.retry_after_s) == (429, True, 2)
            final = await p.send(client, req, timeout_s=5, config=config, allow_private=True)
            assert (final.status_code, final.retryable) == (404, False)
            ok = await p.send(client, req, timeout_s=5, config=config, allow_private=True)
            assert ok.ok and ok.status_code == 204 and ok.error is None
            with trio.fail_after(5):
                slow = await p.send(client, req, timeout_s=0.5, config=config, allow_private=True)
            assert not slow.ok and slow.retryable and "timed out" in str(slow.error)
            refused = await p.send(client, p.HttpRequest("POST", "http://127.0.0.1:1/x", {}, b""),
                                   timeout_s=5, config=config, allow_private=True)
            assert not refused.ok and refused.retryable and refused.status_code is None


@pytest.mark.parametrize(("url", "public"), [
    ("http://127.0.0.1:8080/x", False), ("http://10.1.2.3/x", False), ("http://169.254.169.254/", False),
    ("http://[::1]/x", False), ("http://[::ffff:192.168.0.1]/x", False), ("http://100.64.0.1/", False),
    ("http://localhost/x", False), ("https://8.8.8.8/x", True), ("https://[2001:4860:4860::8888]/", True),
    ("https://no-such-host.invalid/x", True),  # left to the request, which cannot connect
])
async def test_private_destinations_are_refused(url: str, public: bool) -> None:
    reason = await p.refused_destination(url)
    assert (reason is None) is public, reason


# -- the key and sealed configs ----------------------------------------------------------------


def test_the_key_file_is_created_once_with_mode_0600(tmp_path: Path) -> None:
    key = load_channel_key(None, str(tmp_path))
    assert len(key) == 32
    assert stat.S_IMODE(os.stat(tmp_path / KEY_FILE).st_mode) == 0o600
    assert load_channel_key(None, str(tmp_path)) == key


def test_the_key_comes_from_the_environment_when_set(tmp_path: Path) -> None:
    raw = os.urandom(32)
    assert load_channel_key(base64.b64encode(raw).decode(), str(tmp_path)) == raw
    assert load_channel_key(base64.urlsafe_b64encode(raw).decode().rstrip("="), str(tmp_path)) == raw
    assert not (tmp_path / KEY_FILE).exists()
    with pytest.raises(ConfigError):
        load_channel_key(base64.b64encode(b"short").decode(), str(tmp_path))


def test_sealed_configs_open_only_with_their_key_and_channel() -> None:
    sealer = Sealer(os.urandom(32))
    sealed = sealer.seal("ch_a", {"webhook_url": "https://hooks.example/very-secret"})
    assert b"very-secret" not in sealed
    assert sealer.open("ch_a", sealed, sealer.key_id) == {"webhook_url": "https://hooks.example/very-secret"}
    with pytest.raises(ConfigUnreadable):
        sealer.open("ch_b", sealed, sealer.key_id)
    other = Sealer(os.urandom(32))
    with pytest.raises(ConfigUnreadable):
        other.open("ch_a", sealed, other.key_id)
    with pytest.raises(ConfigUnreadable, match="another channel key"):
        other.open("ch_a", sealed, sealer.key_id)
