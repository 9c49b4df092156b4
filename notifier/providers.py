"""Notification providers: validate a channel's config, format an event, send it.

Everything here but :func:`send` is pure: :func:`validate_config` checks a
provider's config fields and :func:`build_request` turns a
:class:`~dovecote.bus.messages.events.LifecycleEvent` into the exact HTTP
request that provider's API expects. :func:`send` performs one request with
an overall deadline and classifies the answer (delivered, retryable, final,
``retry_after``). The deliverer and the ``/v1/channels/test`` handler share
both halves.

Configs (all values strings, as in the reference's ``CreateChannelRequest``):

============  ===============================================  =====================================
provider      config                                           request
============  ===============================================  =====================================
discord       ``webhook_url``                                  ``POST`` the URL, ``embeds``
slack         ``webhook_url``                                  ``POST`` the URL, ``text`` + ``blocks``
teams         ``webhook_url`` (incoming webhook / Workflows)   ``POST`` ``type: message`` with one
                                                               Adaptive Card attachment
googlechat    ``webhook_url``                                  ``POST`` the URL, ``cardsV2``
telegram      ``bot_token``, ``chat_id``                       ``POST {DOVECOTE_TELEGRAM_API_URL}/
                                                               bot<token>/sendMessage``, HTML text
matrix        ``homeserver_url``, ``access_token``,            ``PUT {homeserver}/_matrix/client/v3/
              ``room_id``                                      rooms/{room}/send/m.room.message/
                                                               {txnId}``, ``Authorization: Bearer``
webhook       ``url``, ``secret`` (generated when omitted)     ``POST`` the event JSON, signed
============  ===============================================  =====================================

URLs must be ``http`` or ``https``. The Matrix ``txnId`` is the delivery's
key (``<channel id>.<delivery id>``), the same for every retry, so a
homeserver that already took a message ignores its retry.

Generic webhook signature: the body is the event's JSON (the reference's
``SSEEvent``, the same as an SSE ``data:`` line). Each attempt carries

* ``X-Dovecote-Event``: the event name;
* ``X-Dovecote-Delivery``: the delivery key, the same for every retry
  (receivers deduplicate on it: delivery is at least once);
* ``X-Dovecote-Timestamp``: Unix seconds when the attempt was signed;
* ``X-Dovecote-Signature``: ``sha256=`` + hex HMAC-SHA256, keyed with the
  UTF-8 bytes of the channel's ``secret``, over ``timestamp + "." + body``
  (the raw body bytes).

A receiver recomputes the HMAC over the raw body, compares in constant time,
and rejects timestamps older than a few minutes (replays).
"""

from __future__ import annotations

import hashlib
import hmac
import html
import ipaddress
import logging
import math
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import msgspec
import trio

from dovecote.bus.messages.events import EventActor, EventResource, LifecycleEvent
from dovecote.libs.timefmt import now_rfc3339

__all__ = [
    "PROVIDERS",
    "HttpRequest",
    "InvalidConfig",
    "ProviderSettings",
    "SendResult",
    "build_request",
    "generate_secret",
    "sample_event",
    "scrub",
    "send",
    "sign_webhook",
    "summarize",
    "validate_config",
]

PROVIDERS = ("discord", "slack", "teams", "googlechat", "telegram", "matrix", "webhook")

REQUIRED: dict[str, tuple[str, ...]] = {
    "discord": ("webhook_url",),
    "slack": ("webhook_url",),
    "teams": ("webhook_url",),
    "googlechat": ("webhook_url",),
    "telegram": ("bot_token", "chat_id"),
    "matrix": ("homeserver_url", "access_token", "room_id"),
    "webhook": ("url",),
}
OPTIONAL: dict[str, tuple[str, ...]] = {"webhook": ("secret",)}
URL_FIELDS = frozenset({"webhook_url", "homeserver_url", "url"})

MAX_VALUE = 2048
MIN_SECRET = 16
USER_AGENT = "Dovecote-Notifier/0.1"
MAX_ERROR_BODY = 16 * 1024
MAX_RETRY_AFTER_S = 24 * 3600.0
RETRYABLE_STATUSES = frozenset({408, 425, 429})

SIGNATURE_HEADER = "X-Dovecote-Signature"
TIMESTAMP_HEADER = "X-Dovecote-Timestamp"
EVENT_HEADER = "X-Dovecote-Event"
DELIVERY_HEADER = "X-Dovecote-Delivery"

_encode = msgspec.json.Encoder().encode

# httpx logs every request's full URL at INFO, and provider URLs are secrets
# (Telegram's bot token is in the path, webhook URLs carry their tokens).
logging.getLogger("httpx").setLevel(logging.WARNING)

TITLES = {
    "capsule.create": "Capsule created",
    "capsule.pause": "Capsule paused",
    "capsule.resume": "Capsule resumed",
    "capsule.destroy": "Capsule destroyed",
    "capsule.state.changed": "Capsule state changed",
    "template.snapshot.create": "Snapshot created",
    "template.snapshot.delete": "Snapshot deleted",
    "host.up": "Host up",
    "host.down": "Host down",
    "channel.test": "Test notification from Dovecote",
}


class InvalidConfig(ValueError):
    """A channel config the provider cannot use; ``field`` names the culprit."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


@dataclass(frozen=True)
class ProviderSettings:
    """Where the providers with a fixed API live (configurable for tests and proxies),
    and whether channels may reach non-public addresses."""

    telegram_api_url: str = "https://api.telegram.org"
    allow_private_urls: bool = False


@dataclass(frozen=True)
class HttpRequest:
    """One request to a provider."""

    method: str
    url: str
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True)
class SendResult:
    """What one attempt came to.

    ``ok``: a 2xx answer. ``retryable``: worth another attempt (network
    error, timeout, 408/425/429, 5xx). ``retry_after_s``: what the provider
    asked for (``Retry-After``, Discord's and Telegram's ``retry_after``,
    Matrix's ``retry_after_ms``). ``error`` is safe to store and show: config
    values are masked.
    """

    ok: bool
    status_code: int | None
    latency_ms: int
    error: str | None = None
    retryable: bool = False
    retry_after_s: float | None = None


# -- config ----------------------------------------------------------------------------


def _check_url(name: str, value: str) -> None:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidConfig(f"config.{name}", f"config.{name} must be an http(s) URL")


def validate_config(provider: str, config: dict[str, str]) -> dict[str, str]:
    """The provider's config with values trimmed, or :class:`InvalidConfig`.

    Every required field must be present and non-empty; unknown fields are
    refused (nothing the provider does not use is stored).
    """
    if provider not in REQUIRED:
        raise InvalidConfig("provider", f"provider must be one of {', '.join(PROVIDERS)}")
    allowed = REQUIRED[provider] + OPTIONAL.get(provider, ())
    clean: dict[str, str] = {}
    for name, raw in config.items():
        if name not in allowed:
            raise InvalidConfig(f"config.{name}",
                                f"config.{name} is not a field of provider {provider} "
                                f"(fields: {', '.join(allowed)})")
        value = raw.strip()
        if len(value) > MAX_VALUE or not value.isprintable():
            raise InvalidConfig(f"config.{name}",
                                f"config.{name} must be printable and at most {MAX_VALUE} characters")
        if value:
            clean[name] = value
    for name in REQUIRED[provider]:
        if name not in clean:
            raise InvalidConfig(f"config.{name}", f"config.{name} is required for provider {provider}")
    for name in URL_FIELDS & clean.keys():
        _check_url(name, clean[name])
    if provider == "telegram":
        token, chat = clean["bot_token"], clean["chat_id"]
        head, _, tail = token.partition(":")
        if not head.isdigit() or not tail or not all(c.isalnum() or c in "_-" for c in tail):
            raise InvalidConfig("config.bot_token", "config.bot_token must look like 123456:ABC-def")
        if not (chat.lstrip("-").isdigit() or (chat.startswith("@") and len(chat) > 1
                                               and all(c.isalnum() or c == "_" for c in chat[1:]))):
            raise InvalidConfig("config.chat_id", "config.chat_id must be a number or @channelname")
    if provider == "matrix":
        if not clean["room_id"].startswith("!") or " " in clean["room_id"]:
            raise InvalidConfig("config.room_id", "config.room_id must be a room id (!opaque:server)")
        if any(c.isspace() for c in clean["access_token"]):
            raise InvalidConfig("config.access_token", "config.access_token must not contain spaces")
    if provider == "webhook" and "secret" in clean and len(clean["secret"]) < MIN_SECRET:
        raise InvalidConfig("config.secret", f"config.secret must have at least {MIN_SECRET} characters")
    return clean


def generate_secret() -> str:
    """A new webhook signing secret (``whsec_`` + 43 URL-safe characters)."""
    return "whsec_" + secrets.token_urlsafe(32)


# -- what an event says ----------------------------------------------------------------


@dataclass(frozen=True)
class Summary:
    """The provider-neutral reading of an event."""

    event: str
    title: str
    ok: bool
    subject: str
    fields: list[tuple[str, str]] = field(default_factory=list)
    error: str | None = None
    timestamp: str = ""


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def summarize(event: LifecycleEvent) -> Summary:
    """Title, subject line and fields of ``event`` (values cut to sane lengths)."""
    ok = event.outcome != "error"
    title = TITLES.get(event.event, event.event)
    if not ok:
        title += " (failed)"
    kind = event.resource.type or "resource"
    subject = f"{kind} {event.resource.id}".strip()
    actor = event.actor.name or event.actor.id or event.actor.type
    fields: list[tuple[str, str]] = [(kind.capitalize(), event.resource.id or "-"),
                                     ("By", f"{actor} ({event.actor.type})" if actor != event.actor.type
                                      else actor)]
    if event.outcome:
        fields.append(("Outcome", event.outcome))
    if event.sandbox is not None:
        fields.append(("Status", event.sandbox.status))
        if event.sandbox.template:
            fields.append(("Template", event.sandbox.template))
    for key, value in sorted(event.metadata.items())[:8]:
        fields.append((_cut(key, 64), _cut(value, 256)))
    fields.append(("Event", event.event))
    return Summary(event=event.event, title=title, ok=ok, subject=subject,
                   fields=[(name, _cut(value, 256) or "-") for name, value in fields],
                   error=_cut(event.error, 1000) if event.error else None,
                   timestamp=event.timestamp)


def sample_event() -> LifecycleEvent:
    """The event ``POST /v1/channels/test`` sends (name ``channel.test``)."""
    return LifecycleEvent(
        event="channel.test", resource=EventResource(id="test", type="channel"),
        actor=EventActor(type="system", name="Dovecote"), timestamp=now_rfc3339(), outcome="success",
        metadata={"message": "If you can read this, the channel works."})


# -- formats ---------------------------------------------------------------------------


def _json_request(method: str, url: str, payload: Any, headers: dict[str, str] | None = None
                  ) -> HttpRequest:
    base = {"Content-Type": "application/json; charset=utf-8", "User-Agent": USER_AGENT}
    return HttpRequest(method, url, {**base, **(headers or {})}, _encode(payload))


def _iso_or_none(text: str) -> str | None:
    try:
        datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return text


def _discord_escape(text: str) -> str:
    return "".join("\\" + c if c in "\\*_~`|" else c for c in text)


def discord_payload(s: Summary) -> dict[str, Any]:
    """Discord "Execute Webhook": one embed (limits: title 256, field 256/1024, 25 fields)."""
    embed: dict[str, Any] = {
        "title": _cut(s.title, 256),
        "color": 0x2EB67D if s.ok else 0xE01E5A,
        "fields": [{"name": _cut(n, 256), "value": _cut(_discord_escape(v), 1024), "inline": True}
                   for n, v in s.fields[:25]],
        "footer": {"text": "Dovecote"},
    }
    if s.error:
        embed["description"] = _cut(_discord_escape(s.error), 4096)
    if _iso_or_none(s.timestamp):
        embed["timestamp"] = s.timestamp
    return {"username": "Dovecote", "allowed_mentions": {"parse": []}, "embeds": [embed]}


def _slack_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack_payload(s: Summary) -> dict[str, Any]:
    """Slack incoming webhook: ``text`` (notification fallback) and Block Kit ``blocks``."""
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": _cut(s.title, 150), "emoji": False}}]
    items = [{"type": "mrkdwn", "text": _cut(f"*{_slack_escape(n)}*\n{_slack_escape(v)}", 2000)}
             for n, v in s.fields]
    for start in range(0, len(items), 10):  # at most 10 fields per section
        blocks.append({"type": "section", "fields": items[start:start + 10]})
    if s.error:
        blocks.append({"type": "section", "text": {
            "type": "mrkdwn", "text": _cut(f"*Error*\n{_slack_escape(s.error)}", 3000)}})
    blocks.append({"type": "context", "elements": [
        {"type": "mrkdwn", "text": _slack_escape(f"Dovecote · {s.event} · {s.timestamp}")}]})
    return {"text": _slack_escape(f"{s.title}: {s.subject}"), "blocks": blocks}


ADAPTIVE_CARD = "application/vnd.microsoft.card.adaptive"


def teams_payload(s: Summary) -> dict[str, Any]:
    """Microsoft Teams incoming webhook / Workflows: a message with one Adaptive Card."""
    body: list[dict[str, Any]] = [
        {"type": "TextBlock", "text": s.title, "weight": "Bolder", "size": "Medium", "wrap": True,
         "color": "Good" if s.ok else "Attention"},
        {"type": "FactSet", "facts": [{"title": n, "value": v} for n, v in s.fields]},
    ]
    if s.error:
        body.append({"type": "TextBlock", "text": s.error, "wrap": True, "color": "Attention"})
    if s.timestamp:
        body.append({"type": "TextBlock", "text": s.timestamp, "isSubtle": True, "size": "Small"})
    card = {"$schema": "http://adaptivecards.io/schemas/adaptive-card.json", "type": "AdaptiveCard",
            "version": "1.4", "body": body, "msteams": {"width": "Full"}}
    return {"type": "message",
            "attachments": [{"contentType": ADAPTIVE_CARD, "contentUrl": None, "content": card}]}


def googlechat_payload(s: Summary, key: str) -> dict[str, Any]:
    """Google Chat webhook: one card (``cardsV2``; decoratedText takes basic HTML)."""
    widgets: list[dict[str, Any]] = [
        {"decoratedText": {"topLabel": html.escape(n), "text": html.escape(v), "wrapText": True}}
        for n, v in s.fields]
    if s.error:
        widgets.append({"decoratedText": {"topLabel": "Error", "text": html.escape(s.error),
                                          "wrapText": True}})
    card = {"header": {"title": s.title, "subtitle": f"{s.subject} · {s.timestamp}"},
            "sections": [{"widgets": widgets}]}
    return {"cardsV2": [{"cardId": _cut(f"dovecote-{key}", 64), "card": card}]}


def _html_lines(s: Summary) -> str:
    lines = [f"<b>{html.escape(s.title)}</b>"]
    lines += [f"<b>{html.escape(n)}:</b> {html.escape(v)}" for n, v in s.fields]
    if s.error:
        lines.append(f"<b>Error:</b> {html.escape(s.error)}")
    return "\n".join(lines)


def _plain_lines(s: Summary) -> str:
    lines = [s.title] + [f"{n}: {v}" for n, v in s.fields]
    if s.error:
        lines.append(f"Error: {s.error}")
    return "\n".join(lines)


def telegram_payload(s: Summary, chat_id: str) -> dict[str, Any]:
    """Telegram Bot API ``sendMessage`` (HTML parse mode, at most 4096 characters)."""
    text = _html_lines(s)
    if len(text) > 4096:
        text = html.escape(_cut(_plain_lines(s), 4096))[:4096]
    return {"chat_id": chat_id, "text": text, "parse_mode": "HTML",
            "link_preview_options": {"is_disabled": True}}


def matrix_payload(s: Summary) -> dict[str, Any]:
    """Matrix ``m.room.message`` of ``msgtype: m.text`` with an HTML rendering."""
    return {"msgtype": "m.text", "body": _plain_lines(s), "format": "org.matrix.custom.html",
            "formatted_body": _html_lines(s).replace("\n", "<br>")}


def sign_webhook(secret: str, timestamp: str, body: bytes) -> str:
    """The ``X-Dovecote-Signature`` value: ``sha256=`` + hex HMAC over ``timestamp.body``."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def build_request(provider: str, config: dict[str, str], event: LifecycleEvent, *, key: str,
                  settings: ProviderSettings, now: float | None = None) -> HttpRequest:
    """The request delivering ``event`` through ``provider`` with ``config``.

    ``key`` identifies the delivery across retries (Matrix txnId, webhook
    ``X-Dovecote-Delivery``); ``now`` is the webhook signature time.
    """
    if provider == "webhook":
        body = _encode(event)
        stamp = str(int(time.time() if now is None else now))
        headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT,
                   EVENT_HEADER: event.event, DELIVERY_HEADER: key, TIMESTAMP_HEADER: stamp,
                   SIGNATURE_HEADER: sign_webhook(config.get("secret", ""), stamp, body)}
        return HttpRequest("POST", config["url"], headers, body)
    s = summarize(event)
    if provider == "discord":
        return _json_request("POST", config["webhook_url"], discord_payload(s))
    if provider == "slack":
        return _json_request("POST", config["webhook_url"], slack_payload(s))
    if provider == "teams":
        return _json_request("POST", config["webhook_url"], teams_payload(s))
    if provider == "googlechat":
        return _json_request("POST", config["webhook_url"], googlechat_payload(s, key))
    if provider == "telegram":
        url = f"{settings.telegram_api_url.rstrip('/')}/bot{config['bot_token']}/sendMessage"
        return _json_request("POST", url, telegram_payload(s, config["chat_id"]))
    if provider == "matrix":
        url = (f"{config['homeserver_url'].rstrip('/')}/_matrix/client/v3/rooms/"
               f"{quote(config['room_id'], safe='')}/send/m.room.message/{quote(key, safe='')}")
        return _json_request("PUT", url, matrix_payload(s),
                             {"Authorization": f"Bearer {config['access_token']}"})
    raise InvalidConfig("provider", f"provider must be one of {', '.join(PROVIDERS)}")


# -- sending ---------------------------------------------------------------------------


def scrub(text: str, config: dict[str, str]) -> str:
    """``text`` with every config value (URLs, tokens, secrets) masked, on one line."""
    for value in sorted(config.values(), key=len, reverse=True):
        if len(value) >= 4:
            text = text.replace(value, "***")
    return " ".join(text.split())


def _seconds(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) and number >= 0 else None


def retry_after(headers: httpx.Headers, body: bytes) -> float | None:
    """Seconds a provider asks to wait: ``Retry-After`` (seconds or HTTP date),
    ``retry_after`` (Discord), ``parameters.retry_after`` (Telegram),
    ``retry_after_ms`` (Matrix); the largest one given."""
    found: list[float] = []
    header = headers.get("Retry-After", "").strip()
    if header:
        seconds = _seconds(header)
        if seconds is None:
            try:
                seconds = max(0.0, parsedate_to_datetime(header).timestamp() - time.time())
            except (TypeError, ValueError, IndexError):
                seconds = None
        if seconds is not None:
            found.append(seconds)
    try:
        data = msgspec.json.decode(body) if body[:1] == b"{" else None
    except msgspec.DecodeError:
        data = None
    if isinstance(data, dict):
        for value in (data.get("retry_after"),
                      (data.get("parameters") or {}).get("retry_after")
                      if isinstance(data.get("parameters"), dict) else None):
            seconds = _seconds(value)
            if seconds is not None:
                found.append(seconds)
        ms = _seconds(data.get("retry_after_ms"))
        if ms is not None:
            found.append(ms / 1000)
    return min(max(found), MAX_RETRY_AFTER_S) if found else None


def _is_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


async def refused_destination(url: str) -> str | None:
    """Why ``url`` may not be contacted when private URLs are not allowed, or None.

    Every address the host resolves to must be public (not loopback, private,
    link-local, shared, reserved or multicast). A name that does not resolve
    is left to the request, which then fails to connect.
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        addresses = [ipaddress.ip_address(host)]
    except ValueError:
        try:
            infos = await trio.socket.getaddrinfo(host, parts.port or 443, type=trio.socket.SOCK_STREAM)
        except OSError:
            return None
        addresses = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
    if all(_is_public(a) for a in addresses):
        return None
    return (f"refused: {host} is not a public address "
            "(DOVECOTE_CHANNEL_ALLOW_PRIVATE_URLS=true allows it)")


async def send(client: httpx.AsyncClient, req: HttpRequest, *, timeout_s: float,
               config: dict[str, str], allow_private: bool = False) -> SendResult:
    """Perform ``req`` within ``timeout_s`` (all of it: connect, send, answer) and classify it.

    Never raises for the receiver's failures; redirects are not followed (a
    3xx is a final failure: a webhook URL that moved must be rotated). Unless
    ``allow_private``, a URL whose host is not a public address is refused
    without a request (a final failure): channels are created by any team's
    owner and must not reach the platform's own network.
    """
    started = time.monotonic()

    def elapsed() -> int:
        return int((time.monotonic() - started) * 1000)

    status: int | None = None
    body = b""
    headers = httpx.Headers()
    try:
        with trio.fail_after(timeout_s):
            if not allow_private:
                reason = await refused_destination(req.url)
                if reason is not None:
                    return SendResult(ok=False, status_code=None, latency_ms=elapsed(), error=reason)
            request = client.build_request(req.method, req.url, headers=req.headers, content=req.body,
                                           timeout=timeout_s)
            response = await client.send(request, stream=True, follow_redirects=False)
            try:
                status, headers = response.status_code, response.headers
                if not 200 <= status < 300:
                    async for chunk in response.aiter_bytes():
                        body += chunk
                        if len(body) >= MAX_ERROR_BODY:
                            break
            finally:
                await response.aclose()
    except trio.TooSlowError:
        return SendResult(ok=False, status_code=status, latency_ms=elapsed(), retryable=True,
                          error=f"timed out after {timeout_s:g}s")
    except httpx.HTTPError as exc:
        message = scrub(f"{type(exc).__name__}: {exc}", config)[:500]
        return SendResult(ok=False, status_code=status, latency_ms=elapsed(), retryable=True,
                          error=message)
    if 200 <= status < 300:
        return SendResult(ok=True, status_code=status, latency_ms=elapsed())
    snippet = scrub(body[:1000].decode("utf-8", "replace"), config)[:300]
    error = f"HTTP {status}" + (f": {snippet}" if snippet else "")
    retryable = status >= 500 or status in RETRYABLE_STATUSES
    return SendResult(ok=False, status_code=status, latency_ms=elapsed(), error=error,
                      retryable=retryable, retry_after_s=retry_after(headers, body) if retryable else None)
