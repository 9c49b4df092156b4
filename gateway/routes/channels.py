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
from quart import Response

from dovecote.bus.messages import channels as ch
from dovecote.bus.messages.common import Principal
from dovecote.bus.messages.events import CHANNEL_EVENT_NAMES
from dovecote.gateway.calls import call, json_response, no_content, parse_body
from dovecote.gateway.errors import ApiError
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
    if not value or len(value) > MAX_ID or not value.isprintable():
        raise ApiError(400, "invalid_request", "invalid channel id")
    return value


def register(state: GatewayState) -> None:
    """Add the channel routes."""
    api, app, edge = state.api, state.app, state.edge

    async def session() -> Principal:
        actor: Principal = await edge.authenticate(session_only=True)
        return actor

    @api.route(app, "POST", "/v1/channels", summary="Create a notification channel",
               tags=["channels"], request=CreateChannelRequest, responses={201: ch.ChannelResponse})
    async def create_channel() -> Response:
        actor = await session()
        body = await parse_body(CreateChannelRequest)
        reply = await call(state, "notifier", ch.CreateChannel(
            actor=actor, name=body.name, provider=body.provider, config=body.config,
            events=body.events))
        return json_response(reply.body, 201)

    @api.route(app, "GET", "/v1/channels", summary="List notification channels", tags=["channels"],
               responses={200: list[ch.ChannelResponse]})
    async def list_channels() -> Response:
        reply = await call(state, "notifier", ch.ListChannels(actor=await session()))
        return json_response(reply.channels)

    @api.route(app, "POST", "/v1/channels/test", summary="Test a channel configuration",
               tags=["channels"], request=TestChannelRequest, responses={200: ch.ChannelTestResult})
    async def test_channel() -> Response:
        actor = await session()
        body = await parse_body(TestChannelRequest)
        # The notifier waits up to DOVECOTE_CHANNEL_TEST_TIMEOUT_S for the receiver.
        reply = await call(state, "notifier", ch.SendChannelTest(
            actor=actor, provider=body.provider, config=body.config), timeout_s=30)
        return json_response(reply.body)

    @api.route(app, "GET", "/v1/channels/{id}", summary="Get a notification channel",
               tags=["channels"], responses={200: ch.ChannelResponse})
    async def get_channel(id: str) -> Response:
        reply = await call(state, "notifier", ch.GetChannel(actor=await session(), channel_id=_id(id)))
        return json_response(reply.body)

    @api.route(app, "PATCH", "/v1/channels/{id}", summary="Update a notification channel",
               tags=["channels"], request=UpdateChannelRequest, responses={200: ch.ChannelResponse})
    async def update_channel(id: str) -> Response:
        actor = await session()
        body = await parse_body(UpdateChannelRequest)
        reply = await call(state, "notifier", ch.UpdateChannel(
            actor=actor, channel_id=_id(id), name=body.name, events=body.events))
        return json_response(reply.body)

    @api.route(app, "DELETE", "/v1/channels/{id}", summary="Delete a notification channel",
               tags=["channels"], responses={204: None})
    async def delete_channel(id: str) -> Response:
        actor = await session()
        await call(state, "notifier", ch.DeleteChannel(actor=actor, channel_id=_id(id)))
        return no_content()

    @api.route(app, "PUT", "/v1/channels/{id}/config", summary="Rotate channel secrets",
               tags=["channels"], request=RotateConfigRequest, responses={200: ch.ChannelResponse})
    async def rotate_channel_config(id: str) -> Response:
        actor = await session()
        body = await parse_body(RotateConfigRequest)
        reply = await call(state, "notifier", ch.RotateChannelConfig(
            actor=actor, channel_id=_id(id), config=body.config))
        return json_response(reply.body)
