"""Model override: config rules that send requests to a ``backend:model`` of your choosing,
whatever model the client asked for.

::

    plugins:
      model_override:
        rules:
          - match: {model: "claude-haiku-*"}          # Claude Code's side calls ...
            target: "openai:gpt-5-mini"               # ... to a cheap model
          - match: {client: ci, frontend: openai_chat}
            target: "local:qwen3-coder"

A rule matches when every condition it names holds — ``model`` (a glob over the model name,
case-sensitive), ``client`` (the client key's name), ``user_agent`` (a glob) and
``frontend`` (the client's protocol) — and a rule with no conditions matches every request.
The first matching rule rewrites ``flow.model`` before routing, and the change is recorded
with ``flow.note``. Rules see the model as it stands when this plugin runs: after in-chat
commands (the ``commands`` plugin runs first), so a ``!/model(...)`` choice is not matched by
a ``claude-*`` rule but is by a catch-all one.

Targets are checked at start-up (an unknown backend or model stops the proxy with a message).
Matching reads only ``flow.model``, ``flow.client`` and ``flow.frontend``: the request is
never decoded, so the plugin costs a few string comparisons per request and nothing per
streamed event.
"""

from __future__ import annotations

import re
from fnmatch import translate
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from llmproxy import ProxyError, hookimpl
from llmproxy.flow import Flow

PLUGIN = "model_override"

Frontend = Literal["openai_chat", "openai_responses", "anthropic", "gemini", "gemini_array"]


class Match(BaseModel):
    """When a rule applies; every field given must match, none given matches everything."""

    model_config = ConfigDict(extra="forbid")

    model: Optional[str] = Field(None, description="Glob over the requested model name (`claude-haiku-*`, `*mini*`); case-sensitive.")
    client: Optional[str] = Field(None, description="The client key's name (`auth.api_keys[].name`); never matches without auth.")
    user_agent: Optional[str] = Field(None, description="Glob over the client's User-Agent (`claude-cli/*`, `codex_*`).")
    frontend: Optional[Frontend] = Field(None, description="The client's protocol: openai_chat, openai_responses, anthropic, gemini.")


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    match: Match = Field(default_factory=Match, description="Conditions; empty matches every request.")
    target: str = Field(..., min_length=1, description="Where matching requests go: `backend:model`, an alias, or a model of the default backend.")


class ModelOverrideSettings(BaseModel):
    """``plugins.model_override``."""

    model_config = ConfigDict(extra="forbid")

    rules: list[Rule] = Field(default_factory=list, description="Rules tried in order; the first that matches rewrites the model. None: the plugin does nothing.")


class Rules:
    """The rules compiled for matching (globs as regular expressions), kept per proxy in
    ``context.state["model_override"]``: reading them per request must cost nothing, and a
    pydantic model's private attributes cost microseconds to read."""

    __slots__ = ("rules",)

    def __init__(self, settings: ModelOverrideSettings) -> None:
        self.rules = tuple(
            (_glob(rule.match.model), rule.match.client, _glob(rule.match.user_agent), rule.match.frontend, rule.target)
            for rule in settings.rules
        )

    def __bool__(self) -> bool:
        return bool(self.rules)

    def target_for(self, flow: Flow) -> tuple[int, str] | None:
        """(rule index, target) of the first rule matching ``flow``, or None."""
        for i, (model, client, agent, frontend, target) in enumerate(self.rules):
            if frontend is not None and flow.frontend != frontend and not (frontend == "gemini" and flow.frontend == "gemini_array"):
                continue
            if client is not None and flow.client.key_name != client:
                continue
            if model is not None and not model(flow.model):
                continue
            if agent is not None and not agent(flow.client.user_agent):
                continue
            return i, target
        return None


def _glob(pattern: Optional[str]) -> Any:
    return re.compile(translate(pattern)).match if pattern is not None else None


@hookimpl
def plugin_settings() -> type[BaseModel]:
    return ModelOverrideSettings


@hookimpl
def configure(settings: Optional[ModelOverrideSettings], context: Any) -> dict[str, str]:
    problems = []
    for i, rule in enumerate(settings.rules if settings is not None else ()):
        try:
            context.router.resolve(rule.target)
        except ProxyError as error:
            problems.append(f"rules[{i}].target {rule.target!r}: {error.message}")
        except KeyError as error:
            problems.append(f"rules[{i}].target {rule.target!r}: unknown backend {error}")
    if problems:
        raise ValueError("; ".join(problems))
    context.state[PLUGIN] = Rules(settings) if settings is not None else None
    return {"request": "always" if settings is not None and settings.rules else "never"}


@hookimpl
def request(flow: Flow) -> None:
    rules = flow.context.state.get(PLUGIN) if flow.context is not None else None
    if not rules:
        return
    hit = rules.target_for(flow)
    if hit is None or hit[1] == flow.model:
        return
    rule, target = hit
    flow.note(PLUGIN, "model", **{"from": flow.model, "to": target, "rule": rule})
    flow.model = target
