"""``/v1/channels*`` (capsules reference, tag channels): notification channels.

Every route is ``sessionAuth`` in the reference, like the other team
management routes: a request with only ``X-API-Key`` gets 403
``session_required`` (API keys are for capsule operations), and state
changes need the CSRF header. The notifier decides the rest (see
``notifier/channels.py``): channels are the caller's active team's (another
team's is 404); members list and read them; owners and admins create,
update, rotate, delete and test them.

Bodies are validated twice on purpose: here for shape (a missing field is
400 naming it), in the notifier for meaning (provider config fields, event
names, URL schemes), which is the one place those rules live.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from dovecote.bus.messages import channels as ch
from dovecote.bus.messages.events import CHANNEL_EVENT_NAMES
from dovecote.gateway.errors import ApiError
from dovecote.gateway.routing import Call, Family, Route, path_id, register_routes
from dovecote.gateway.schemas.accounts import Request
from dovecote.gateway.state import GatewayState

MAX_ID = 64
PROVIDERS = ["discord", "slack", "teams", "googlechat", "telegram", "matrix", "webhook"]

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=100,
                                   description="Unique channel name within the team.")]
Provider = Annotated[str, msgspec.Meta(max_length=32, extra_json_schema={"enum": PROVIDERS})]
Config = Annotated[dict[str, Annotated[str, msgspec.Meta(max_length=4096)]], msgspec.Meta(
    max_length=16, description=(
        "Provider-specific configuration fields. Discord/Slack/Teams/Google Chat: "
        '{"webhook_url": "..."}. Telegram: {"bot_token": "...", "chat_id": "..."}. '
        'Matrix: {"homeserver_url": "...", "access_token": "...", "room_id": "..."}. '
        'Webhook: {"url": "...", "secret": "..."} (secret is auto-generated if omitted).'))]
Events = Annotated[list[Annotated[str, msgspec.Meta(
    max_length=64, extra_json_schema={"enum": list(CHANNEL_EVENT_NAMES)})]], msgspec.Meta(max_length=32)]


class CreateChannelRequest(Request):
    name: Name
    provider: Provider
    config: Config
    events: Events


class TestChannelRequest(Request):

    provider: Provider
    config: Config


class RotateConfigRequest(Request):
    config: Config


class UpdateChannelRequest(Request):
    name: Name
    events: Events


def _id(value: str) -> str:
    """A path identifier, or 400."""
    return path_id(value, ApiError(400, "invalid_request", "invalid channel id"))


def _channel(ctx: Call) -> str:
    return _id(ctx.params["id"])


CHANNELS = Family(tags=["channels"], service="notifier", auth="session")

ROUTES = [
    Route(method="POST", path="/v1/channels", name="create_channel",
          summary="Create a notification channel", request=CreateChannelRequest,
          response=ch.ChannelResponse, status=201,
          message=lambda ctx: ch.CreateChannel(actor=ctx.actor, name=ctx.body.name,
                                               provider=ctx.body.provider, config=ctx.body.config,
                                               events=ctx.body.events),
          reply=lambda reply: reply.body),
    Route(method="GET", path="/v1/channels", name="list_channels", summary="List notification channels",
          response=list[ch.ChannelResponse], message=lambda ctx: ch.ListChannels(actor=ctx.actor),
          reply=lambda reply: reply.channels),
    # The notifier waits up to DOVECOTE_CHANNEL_TEST_TIMEOUT_S for the receiver.
    Route(method="POST", path="/v1/channels/test", name="test_channel",
          summary="Test a channel configuration", request=TestChannelRequest,
          response=ch.ChannelTestResult, timeout_s=30,
          message=lambda ctx: ch.SendChannelTest(actor=ctx.actor, provider=ctx.body.provider,
                                                 config=ctx.body.config),
          reply=lambda reply: reply.body),
    Route(method="GET", path="/v1/channels/{id}", name="get_channel",
          summary="Get a notification channel", response=ch.ChannelResponse,
          message=lambda ctx: ch.GetChannel(actor=ctx.actor, channel_id=_channel(ctx)),
          reply=lambda reply: reply.body),
    Route(method="PATCH", path="/v1/channels/{id}", name="update_channel",
          summary="Update a notification channel", request=UpdateChannelRequest,
          response=ch.ChannelResponse,
          message=lambda ctx: ch.UpdateChannel(actor=ctx.actor, channel_id=_channel(ctx),
                                               name=ctx.body.name, events=ctx.body.events),
          reply=lambda reply: reply.body),
    Route(method="DELETE", path="/v1/channels/{id}", name="delete_channel",
          summary="Delete a notification channel", status=204,
          message=lambda ctx: ch.DeleteChannel(actor=ctx.actor, channel_id=_channel(ctx))),
    Route(method="PUT", path="/v1/channels/{id}/config", name="rotate_channel_config",
          summary="Rotate channel secrets", request=RotateConfigRequest, response=ch.ChannelResponse,
          message=lambda ctx: ch.RotateChannelConfig(actor=ctx.actor, channel_id=_channel(ctx),
                                                     config=ctx.body.config),
          reply=lambda reply: reply.body),
]


def register(state: GatewayState) -> None:
    """Add the channel routes (the table above)."""
    register_routes(state, CHANNELS, ROUTES)
