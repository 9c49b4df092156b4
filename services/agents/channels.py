"""Coordination channels and their messages (``channels``, ``messages``, ``cursors``).

A send locks its channel row and takes the channel's next ``seq``, so a
channel's messages commit in ``seq`` order with no gaps; each reader has a
cursor per channel (its last ``seq`` received), advanced in the same
transaction that reads, under a row lock: a message is delivered to each
reader once, in order, even to concurrent ``recv`` calls of one session.
A reader does not receive its own messages, nor messages addressed to
another session (``to_session_id``; replies go to the source's sender).

Both are one round trip to PostgreSQL in the common case, for latency: a
send without an idempotency key is one statement (:data:`SEND`: the channel
row's ``UPDATE`` takes the seq only when the message is acceptable, and the
message and its audit entry are inserted from its result); when it matches
nothing, the send runs again as a transaction that finds the precise
refusal. A ``recv`` is one pipelined transaction of two statements (the
cursor's upsert, which locks it, then the pick that reads the locked cursor).

Refused: metadata naming another channel, run or task than the channel's
(422 ``metadata_mismatch``), a kind the channel does not allow (422), a
``claim_token`` key or a raw claim token anywhere in ``body`` or ``ext``
(422 ``claim_token_forbidden``), a body over ``agents_message_max_bytes``.
"""

from __future__ import annotations

from typing import Any

import msgspec
import trio
from psycopg.types.json import Jsonb

from dovecote.bus.messages import agents as m
from dovecote.libs.db import Connection
from dovecote.libs.errors import UniqueViolation
from dovecote.services.agents import views
from dovecote.services.agents.core import Agents, find_claim_token, new_id
from dovecote.services.agents.errors import BadRequest, NotFound, Unprocessable
from dovecote.services.agents.identity import Identity

MAX_RECV = 200

_INSERT_MESSAGE = (
    "msg AS ("
    "  INSERT INTO messages (id, channel_id, seq, team_id, from_session_id, to_session_id, kind,"
    "    metadata, body, idempotency_key)"
    "  SELECT %(id)s, %(ch)s, {seq}, %(team)s, %(sid)s, %(to)s, %(kind)s, %(md)s, %(body)s,"
    "    %(key)s"
    "  {source}"
    "  RETURNING *"
    "), audited AS ("
    "  INSERT INTO audit_log (team_id, actor_kind, actor_id, action, resource_type, resource_id,"
    "    metadata)"
    "  SELECT %(team)s, 'agent_session', %(sid)s, 'message.send', 'channel', %(ch)s,"
    "    jsonb_build_object('message_id', msg.id, 'kind', msg.kind) FROM msg"
    ") SELECT * FROM msg"
)
_ADDRESSEE_OK = (
    "(%(to)s::text IS NULL OR EXISTS (SELECT 1 FROM sessions WHERE id = %(to)s AND workspace_id = %(ws)s))"
)

SEND = (
    "WITH chan AS ("
    "  UPDATE channels SET last_seq = last_seq + 1, last_activity_at = now()"
    "  WHERE id = %(ch)s AND workspace_id = %(ws)s AND team_id = %(team)s"
    "    AND %(kind)s = ANY(allowed_message_kinds)"
    "    AND (NOT %(binding)s OR ((coalesce(run_id, '') = '' OR run_id = %(run)s)"
    "      AND (coalesce(task_id, '') = '' OR task_id = %(task)s)))"
    f"    AND {_ADDRESSEE_OK}"
    "  RETURNING last_seq"
    "), " + _INSERT_MESSAGE.format(seq="chan.last_seq", source="FROM chan")
)
"""A send that is accepted, in one statement; no row when it is refused (or the channel is not there)."""


class Channels:
    def __init__(self, agents: Agents, identity: Identity) -> None:
        self.agents = agents
        self.identity = identity

    def register(self, handle: Any) -> None:
        handle(m.ListAgentChannels, self.list_channels)
        handle(m.SendMessage, self.send)
        handle(m.ReplyMessage, self.reply)
        handle(m.ReceiveMessages, self.recv)

    async def list_channels(self, msg: m.ListAgentChannels) -> m.ChannelsReply:
        me = await self.identity.resolve(msg.identity)
        return m.ChannelsReply(channels=await self.workspace_channels(me, 500))

    async def workspace_channels(self, me: dict[str, Any], limit: int) -> list[m.Channel]:
        rows = await self.agents.db.fetchall(
            "SELECT * FROM channels WHERE workspace_id = %s AND team_id = %s "
            "ORDER BY last_activity_at DESC NULLS LAST, created_at DESC, id LIMIT %s",
            (me["workspace_id"], me["team_id"], limit),
        )
        return [views.channel(r) for r in rows]

    def _check_payload(self, body: Any, ext: Any) -> None:
        if find_claim_token(body) or find_claim_token(ext):
            raise Unprocessable("messages must not carry a claim token", code="claim_token_forbidden")
        size = len(msgspec.json.encode(body)) + len(msgspec.json.encode(ext))
        if size > self.agents.config.agents_message_max_bytes:
            raise Unprocessable(
                f"the message is over {self.agents.config.agents_message_max_bytes} bytes",
                code="message_too_large",
            )

    async def send(self, msg: m.SendMessage) -> m.MessageReply:
        me = await self.identity.resolve(msg.identity)
        md = msg.metadata
        if md.coordination_channel_id != msg.channel_id:
            raise Unprocessable(
                "metadata.coordination_channel_id must be the channel sent to", code="metadata_mismatch"
            )
        for name in ("correlation_id", "run_id", "task_id"):
            value = getattr(md, name)
            if not value or len(value) > 200:
                raise Unprocessable(
                    f"metadata.{name} is required (1..200 characters)", code="metadata_required"
                )
        self._check_payload(msg.body, md.ext)
        return await self._post(
            me, msg.channel_id, md, msg.body, msg.to_session_id, msg.idempotency_key, check_binding=True
        )

    async def reply(self, msg: m.ReplyMessage) -> m.MessageReply:
        me = await self.identity.resolve(msg.identity)
        source = await self.agents.db.fetchone(
            "SELECT m.* FROM messages m JOIN channels c ON c.id = m.channel_id "
            "WHERE m.id = %s AND c.workspace_id = %s AND c.team_id = %s",
            (msg.reply_to_message_id, me["workspace_id"], me["team_id"]),
        )
        if source is None:
            raise NotFound("no such message", code="message_not_found")
        self._check_payload(msg.body, msg.ext)
        inherited = msgspec.convert(source["metadata"], m.MessageMetadata)
        md = msgspec.structs.replace(
            inherited,
            message_kind="reply",
            correlation_id=msg.correlation_id or inherited.correlation_id,
            ext=msg.ext if msg.ext is not None else inherited.ext,
        )
        return await self._post(
            me,
            source["channel_id"],
            md,
            msg.body,
            source["from_session_id"],
            msg.idempotency_key,
            check_binding=False,
        )

    async def _post(
        self,
        me: dict[str, Any],
        channel_id: str,
        md: m.MessageMetadata,
        body: Any,
        to_session_id: str | None,
        idempotency_key: str | None,
        *,
        check_binding: bool,
    ) -> m.MessageReply:
        if idempotency_key is not None and not 0 < len(idempotency_key) <= 200:
            raise BadRequest("idempotency_key must be 1..200 characters")
        params = {
            "id": new_id("msg_"),
            "ch": channel_id,
            "team": me["team_id"],
            "sid": me["id"],
            "to": to_session_id,
            "kind": md.message_kind,
            "md": Jsonb(msgspec.to_builtins(md)),
            "body": Jsonb(body),
            "key": idempotency_key,
            "ws": me["workspace_id"],
        }
        if idempotency_key is None:
            sent = await self.agents.db.fetchone(
                SEND, {**params, "binding": check_binding, "run": md.run_id, "task": md.task_id}
            )
            if sent is not None:
                self.agents.channel_wakeups.fire(channel_id)
                return m.MessageReply(message=views.message(sent))

        def work(conn: Connection) -> dict[str, Any]:
            if idempotency_key is not None:
                same = conn.execute(
                    "SELECT * FROM messages WHERE channel_id = %s AND from_session_id = %s "
                    "AND idempotency_key = %s",
                    (channel_id, me["id"], idempotency_key),
                ).fetchone()
                if same is not None:
                    return same
            # Locks the channel and takes its next seq; a refusal below rolls it back.
            chan = conn.execute(
                "UPDATE channels SET last_seq = last_seq + 1, last_activity_at = now() "
                "WHERE id = %s AND workspace_id = %s AND team_id = %s RETURNING *",
                (channel_id, me["workspace_id"], me["team_id"]),
            ).fetchone()
            if chan is None:
                raise NotFound("no such channel", code="channel_not_found")
            if md.message_kind not in chan["allowed_message_kinds"]:
                raise Unprocessable(
                    f"the channel does not allow {md.message_kind!r} messages",
                    code="message_kind_not_allowed",
                )
            if check_binding and (
                (chan["run_id"] and chan["run_id"] != md.run_id)
                or (chan["task_id"] and chan["task_id"] != md.task_id)
            ):
                raise Unprocessable(
                    "metadata.run_id and task_id must be the channel's", code="metadata_mismatch"
                )
            row = conn.execute(
                "WITH " + _INSERT_MESSAGE.format(seq="%(seq)s", source=f"WHERE {_ADDRESSEE_OK}"),
                {**params, "seq": chan["last_seq"]},
            ).fetchone()
            if row is None:  # addressed to a session that is not in the workspace
                raise NotFound("no such session in the workspace", code="session_not_found")
            return dict(row)

        try:
            row = await self.agents.db.transaction(work)
        except UniqueViolation:
            again = await self.agents.db.fetchone(
                "SELECT * FROM messages WHERE channel_id = %s AND from_session_id = %s AND "
                "idempotency_key = %s",
                (channel_id, me["id"], idempotency_key),
            )
            if again is None:
                raise
            row = again
        self.agents.channel_wakeups.fire(channel_id)
        return m.MessageReply(message=views.message(row))

    async def recv(self, msg: m.ReceiveMessages) -> m.MessagesReply:
        me = await self.identity.resolve(msg.identity)
        if not 1 <= msg.limit <= MAX_RECV:
            raise BadRequest(f"limit must be in 1..{MAX_RECV}")
        deadline = trio.current_time() + self.agents.wait_bound(msg.wait_s)

        def work(conn: Connection) -> list[dict[str, Any]] | None:
            # One transaction, pipelined (one round trip): the reader's cursor, created if new and
            # locked (concurrent recv calls of one session queue here), then the next messages for
            # this reader and the cursor moved past them. No cursor: no such channel of the
            # caller's workspace (and the pick found nothing).
            with conn.pipeline():
                with conn.transaction():
                    cursor = conn.execute(
                        "INSERT INTO cursors (session_id, channel_id) SELECT %(sid)s, id FROM channels "
                        "WHERE id = %(ch)s AND workspace_id = %(ws)s AND team_id = %(team)s "
                        "ON CONFLICT (session_id, channel_id) DO UPDATE SET last_seq = cursors.last_seq "
                        "RETURNING last_seq",
                        params,
                    )
                    picked = conn.execute(
                        "WITH picked AS ("
                        "  SELECT * FROM messages WHERE channel_id = %(ch)s AND seq > ("
                        "    SELECT last_seq FROM cursors WHERE session_id = %(sid)s AND channel_id = %(ch)s)"
                        "  AND from_session_id <> %(sid)s"
                        "  AND (to_session_id IS NULL OR to_session_id = %(sid)s)"
                        "  ORDER BY seq LIMIT %(limit)s"
                        "), moved AS ("
                        "  UPDATE cursors SET last_seq = (SELECT max(seq) FROM picked)"
                        "  WHERE session_id = %(sid)s AND channel_id = %(ch)s"
                        "    AND EXISTS (SELECT 1 FROM picked)"
                        ") SELECT * FROM picked ORDER BY seq",
                        params,
                    )
            if cursor.fetchone() is None:
                return None
            return picked.fetchall()

        params = {
            "ch": msg.channel_id,
            "sid": me["id"],
            "ws": me["workspace_id"],
            "team": me["team_id"],
            "limit": msg.limit,
        }
        while True:
            wake = self.agents.channel_wakeups.event(msg.channel_id)
            rows = await self.agents.db.run_with_connection(work)
            if rows is None:
                raise NotFound("no such channel", code="channel_not_found")
            if rows or trio.current_time() >= deadline:
                return m.MessagesReply(messages=[views.message(r) for r in rows])
            with trio.move_on_at(deadline):
                await wake.wait()
