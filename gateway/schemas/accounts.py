"""Bodies of ``/v1/auth/*`` and ``/v1/me*`` (capsules reference)."""

from __future__ import annotations

from typing import Annotated

import msgspec

from dovecote.bus.messages.auth import MeResponse, SessionEntry, SessionResponse

Email = Annotated[str, msgspec.Meta(min_length=3, max_length=254, extra_json_schema={"format": "email"})]
Password = Annotated[str, msgspec.Meta(min_length=8, max_length=256)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=100)]
Token = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
Id = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]


class Request(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Base of request bodies: unknown fields are an error."""


class SignupRequest(Request):
    email: Email
    password: Password
    name: Name


class SignupResponse(msgspec.Struct, kw_only=True):
    message: str


class ActivateRequest(Request):
    token: Token


class LoginRequest(Request):
    email: Email
    password: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


class SwitchTeamRequest(Request):
    team_id: Id


class SessionsResponse(msgspec.Struct, kw_only=True):
    sessions: list[SessionEntry]


class UpdateNameRequest(Request):
    name: Name


class DeleteAccountRequest(Request):
    confirmation: Annotated[str, msgspec.Meta(max_length=254)]


class ChangePasswordRequest(Request):
    new_password: Password
    current_password: Annotated[str, msgspec.Meta(max_length=256)] | None = None
    confirm_password: Annotated[str, msgspec.Meta(max_length=256)] | None = None


class PasswordResetRequest(Request):
    email: Email


class PasswordResetConfirmRequest(Request):
    token: Token
    new_password: Password


__all__ = [
    "ActivateRequest", "ChangePasswordRequest", "DeleteAccountRequest", "LoginRequest",
    "MeResponse", "PasswordResetConfirmRequest", "PasswordResetRequest", "SessionResponse",
    "SessionsResponse", "SignupRequest", "SignupResponse", "SwitchTeamRequest", "UpdateNameRequest",
]
