"""The planner a run or live session gets: its model, its bearer and its memory.

- **Bearer**: ``authProvider: "api-key"`` sends ``DOVECOTE_MODEL_API_KEY``;
  ``"codex-oauth"`` sends the team's codex access token
  (:meth:`~dovecote.services.runs.codex.CodexAuth.access_token`, refreshed
  when it expires), fetched before each model call.
- **Memory**: the team's global entries and those of the app profiles the
  task concerns (a run: its scenario's ``target_apps``; a live instruction:
  the profiles whose name it mentions) are added to the system prompt, most
  confident first (at most :data:`MAX_MEMORY` entries); each entry given
  counts one access (``accessCount``, ``lastAccessedAt``).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Iterable

from dovecote.bus.messages import runs as r
from dovecote.libs.planner import ModelConfig, Planner
from dovecote.services.runs.agent import DESKTOP_TOOLS, SYSTEM_PROMPT
from dovecote.services.runs.codex import CodexAuth
from dovecote.services.runs.store import RunStore

MAX_MEMORY = 40
MAX_MEMORY_CHARS = 8000


async def memory_for(store: RunStore, team_id: str, apps: Iterable[str]) -> list[r.MemoryEntry]:
    """The global entries and those of ``apps`` (case-insensitive), each touched once."""
    wanted = {a.lower() for a in apps if a}
    entries = await store.memory(team_id)
    chosen = [e for e in entries if e.scope == "global" or (e.appContext or "").lower() in wanted]
    chosen.sort(key=lambda e: (-e.confidence, e.createdAt))
    chosen = chosen[:MAX_MEMORY]
    if chosen:
        await store.touch_memory(team_id, [e.id for e in chosen])
    return chosen


def mentioned_apps(store_apps: Iterable[str], text: str) -> list[str]:
    lowered = text.lower()
    return [a for a in store_apps if a and a.lower() in lowered]


def memory_prompt(entries: list[r.MemoryEntry]) -> str:
    if not entries:
        return ""
    lines = []
    size = 0
    for e in entries:
        where = f"app {e.appContext}" if e.scope == "app" else "global"
        line = f"- [{e.category}; {where}; confidence {e.confidence:.2f}] {e.content}"
        size += len(line)
        if size > MAX_MEMORY_CHARS:
            break
        lines.append(line)
    return "\n\nWhat you remember about this user and these apps (use it when it applies):\n" + "\n".join(
        lines
    )


def make_planner(
    config: ModelConfig,
    *,
    model: str | None,
    auth_provider: str | None,
    team_id: str,
    codex: CodexAuth | None,
    memory: list[r.MemoryEntry],
) -> Planner:
    if model and model != config.model:
        config = ModelConfig(
            base_url=config.base_url,
            model=model,
            api_key=config.api_key,
            price_per_1k_tokens=config.price_per_1k_tokens,
            timeout_s=config.timeout_s,
        )
    bearer: Callable[[], Awaitable[str]] | None = None
    if auth_provider == "codex-oauth" and codex is not None:
        bearer = functools.partial(codex.access_token, team_id)
    return Planner(
        config, tool_specs=DESKTOP_TOOLS, system_prompt=SYSTEM_PROMPT + memory_prompt(memory), bearer=bearer
    )
