"""A tool-calling planner over an OpenAI-compatible chat-completions endpoint.

Shared by browser sessions (``initialPrompt`` that is not a URL) and, later,
agent runs. The model is configured by three variables:
``DOVECOTE_MODEL_BASE_URL`` (e.g. ``https://api.openai.com/v1``),
``DOVECOTE_MODEL_API_KEY`` (sent as ``Authorization: Bearer``; never logged)
and ``DOVECOTE_MODEL``; ``DOVECOTE_MODEL_PRICE_PER_1K_TOKENS`` prices a step.
Without a base URL and a model there is no planner (:func:`model_from_env`
answers None and callers fail with ``planner_unavailable``).

The loop: send the task and the tools (:data:`BROWSER_TOOLS`, JSON Schema
function tools), run every ``tool_calls`` entry of the answer through the
caller's :class:`Tools`, send the results back as ``tool`` messages, until the
model calls ``done`` (or answers without a tool call), or :attr:`max_steps`.
Each step's ``usage.total_tokens`` is its cost, reported with the step's tool
results through ``on_step``. A transport failure, a non-2xx answer, a
malformed answer or too many steps raise :class:`PlannerError` with a reason.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx

MAX_RESULT_CHARS = 4000


class PlannerError(Exception):
    """The planner could not finish: ``code`` is ``planner_error`` or ``planner_unavailable``."""

    def __init__(self, message: str, code: str = "planner_error") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    base_url: str
    model: str
    api_key: str = field(default="", repr=False)
    price_per_1k_tokens: float = 0.0
    timeout_s: float = 120.0


def model_from_env(environ: Mapping[str, str]) -> ModelConfig | None:
    """The configured model, or None when there is none."""
    base = environ.get("DOVECOTE_MODEL_BASE_URL", "").strip()
    model = environ.get("DOVECOTE_MODEL", "").strip()
    if not base or not model:
        return None
    try:
        price = float(environ.get("DOVECOTE_MODEL_PRICE_PER_1K_TOKENS", "0") or 0)
    except ValueError:
        price = 0.0
    return ModelConfig(base_url=base.rstrip("/"), model=model,
                       api_key=environ.get("DOVECOTE_MODEL_API_KEY", ""), price_per_1k_tokens=price)


def _tool(name: str, description: str, properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object", "properties": properties, "required": required}}}


BROWSER_TOOLS = [
    _tool("navigate", "Open a URL in the page", {"url": {"type": "string"}}, ["url"]),
    _tool("click", "Click the element a CSS selector finds", {"selector": {"type": "string"}}, ["selector"]),
    _tool("type", "Type text into the element a CSS selector finds",
          {"selector": {"type": "string"}, "text": {"type": "string"}}, ["selector", "text"]),
    _tool("scroll", "Scroll the page by a number of pixels", {"deltaY": {"type": "number"}}, ["deltaY"]),
    _tool("extract_text", "The visible text of the page or of one element",
          {"selector": {"type": "string"}}, []),
    _tool("screenshot", "Take a screenshot of the page", {}, []),
    _tool("done", "The task is finished", {"summary": {"type": "string"}}, []),
]


class Tools(Protocol):
    """What the planner's tools do (the browser session implements it)."""

    async def call(self, name: str, arguments: dict[str, Any]) -> str:
        """Run one tool; the text result the model sees. Raise to report a failed tool."""
        ...


@dataclass(kw_only=True)
class ToolRun:
    name: str
    arguments: dict[str, Any]
    result: str
    success: bool


@dataclass(kw_only=True)
class Step:
    index: int
    tokens: int
    price: float
    tools: list[ToolRun]


@dataclass(kw_only=True)
class PlanResult:
    steps: int
    tokens: int
    summary: str


SYSTEM_PROMPT = ("You operate a web browser for the user with the tools given. Call one or more tools "
                 "per turn; call done when the task is finished.")


class Planner:
    """See the module docstring."""

    def __init__(self, config: ModelConfig, *, max_steps: int = 20,
                 client: httpx.AsyncClient | None = None,
                 tool_specs: list[dict[str, Any]] | None = None, system_prompt: str | None = None,
                 bearer: Callable[[], Awaitable[str]] | None = None) -> None:
        self.config = config
        self.bearer = bearer
        """Called before each model call for the bearer token (an OAuth access token that may be
        refreshed); without it the config's ``api_key`` is sent."""
        self.max_steps = max_steps
        self._client = client
        self.tool_specs = BROWSER_TOOLS if tool_specs is None else tool_specs
        self.system_prompt = SYSTEM_PROMPT if system_prompt is None else system_prompt

    async def run(self, task: str, tools: Tools,
                  on_step: Callable[[Step], Awaitable[None]] | None = None) -> PlanResult:
        messages: list[dict[str, Any]] = [{"role": "system", "content": self.system_prompt},
                                          {"role": "user", "content": task}]
        total = 0
        async with self._http() as client:
            for index in range(1, self.max_steps + 1):
                answer, tokens = await self._complete(client, messages)
                total += tokens
                calls = answer.get("tool_calls") or []
                messages.append({k: v for k, v in answer.items() if k in ("role", "content", "tool_calls")})
                step = Step(index=index, tokens=tokens,
                            price=tokens * self.config.price_per_1k_tokens / 1000, tools=[])
                finished: str | None = None if calls else str(answer.get("content") or "")
                for call in calls:
                    name, arguments, call_id = _parse_call(call)
                    if name == "done":
                        finished = str(arguments.get("summary", ""))
                        result, ok = "ok", True
                    else:
                        try:
                            result, ok = (await tools.call(name, arguments))[:MAX_RESULT_CHARS], True
                        except Exception as exc:  # a failed tool is reported to the model
                            result, ok = f"error: {exc}", False
                    step.tools.append(ToolRun(name=name, arguments=arguments, result=result, success=ok))
                    messages.append({"role": "tool", "tool_call_id": call_id, "content": result})
                if on_step is not None:
                    await on_step(step)
                if finished is not None:
                    return PlanResult(steps=index, tokens=total, summary=finished)
        raise PlannerError(f"the task did not finish within {self.max_steps} steps")

    def _http(self) -> Any:
        if self._client is not None:
            return _Borrowed(self._client)
        return httpx.AsyncClient(timeout=self.config.timeout_s)

    async def _complete(self, client: httpx.AsyncClient,
                        messages: list[dict[str, Any]]) -> tuple[dict[str, Any], int]:
        token = await self.bearer() if self.bearer is not None else self.config.api_key
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            response = await client.post(f"{self.config.base_url}/chat/completions", headers=headers, json={
                "model": self.config.model, "messages": messages, "tools": self.tool_specs,
                "tool_choice": "auto"})
        except httpx.HTTPError as exc:
            raise PlannerError(f"the model endpoint failed: {type(exc).__name__}: {exc}") from None
        if response.status_code >= 300:
            raise PlannerError(f"the model endpoint answered {response.status_code}: {response.text[:300]}")
        try:
            body = response.json()
            answer = body["choices"][0]["message"]
            tokens = int((body.get("usage") or {}).get("total_tokens", 0))
        except (ValueError, KeyError, IndexError, TypeError):
            raise PlannerError("the model endpoint's answer is not a chat completion") from None
        if not isinstance(answer, dict):
            raise PlannerError("the model endpoint's answer is not a chat completion")
        return answer, tokens


class _Borrowed:
    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def __aenter__(self) -> httpx.AsyncClient:
        return self.client

    async def __aexit__(self, *exc: object) -> None:
        return None


def _parse_call(call: Any) -> tuple[str, dict[str, Any], str]:
    try:
        function = call["function"]
        name = str(function["name"])
        raw = function.get("arguments") or "{}"
        arguments = json.loads(raw) if isinstance(raw, str) else dict(raw)
        if not isinstance(arguments, dict):
            raise ValueError
    except (KeyError, TypeError, ValueError):
        raise PlannerError("the model sent a malformed tool call") from None
    return name, arguments, str(call.get("id", ""))
