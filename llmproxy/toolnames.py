"""Tool names another protocol's backend would refuse, renamed there and back.

Each API has its own rule for a function's name: OpenAI (Chat and Responses) ``[a-zA-Z0-9_-]``
up to 64 characters, Anthropic the same up to 128, Gemini a letter or ``_`` first, then also
``.`` and ``:``, up to 64. A Gemini CLI tool from an MCP server is often named
``github.search``, which OpenAI and Anthropic answer with a 400. So a translated request
whose tools break the backend's rule gets a valid name for each of them (``github_search``)
in its tools, its history and its tool choice, and the answer's calls get the client's names
back: whole answers in the pipeline, streams by a processor the core puts first. A request
whose offered tools' names all pass costs one regex match per tool.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Optional

from .canonical import EventKind, Request, Response, StreamEvent, ToolCallPart, ToolResultPart

_RULES = {
    "openai_chat": (re.compile(r"[a-zA-Z0-9_-]{1,64}"), re.compile(r"[^a-zA-Z0-9_-]"), 64),
    "openai_responses": (re.compile(r"[a-zA-Z0-9_-]{1,64}"), re.compile(r"[^a-zA-Z0-9_-]"), 64),
    "anthropic": (re.compile(r"[a-zA-Z0-9_-]{1,128}"), re.compile(r"[^a-zA-Z0-9_-]"), 128),
    "gemini": (re.compile(r"[a-zA-Z_][a-zA-Z0-9_.:-]{0,63}"), re.compile(r"[^a-zA-Z0-9_.:-]"), 64),
}
METADATA_KEY = "llmproxy.tool_names"  # flow.metadata: {backend's name: client's name}, this attempt's


def renames(request: Request, protocol: str) -> dict[str, str]:
    """``{client's name: valid name}`` for every tool name of ``request`` that a backend of
    ``protocol`` would refuse; empty when all pass."""
    rule = _RULES.get(protocol)
    if rule is None:
        return {}
    valid, invalid, limit = rule
    names = [tool.name for tool in request.tools]
    if request.tool_choice not in (None, "auto", "none", "required"):
        names.append(request.tool_choice)
    if all(valid.fullmatch(name) for name in names):
        # The history's calls are of these tools (an agent's long history is not walked
        # for every request; a call of a tool no longer offered keeps its name).
        return {}
    names += [p.name for m in request.messages if m.role == "assistant" for p in m.parts if isinstance(p, ToolCallPart)]
    bad = [name for name in dict.fromkeys(names) if valid.fullmatch(name) is None]
    taken = set(names)
    mapping: dict[str, str] = {}
    for name in bad:
        safe = (invalid.sub("_", name) or "_")[:limit]
        if valid.fullmatch(safe) is None:  # Gemini: a digit or "-" first
            safe = ("_" + safe)[:limit]
        stem, n = safe, 1
        while safe in taken:  # "a.b" and "a_b" both offered: keep them apart
            suffix = f"_{n}"
            safe, n = stem[: limit - len(suffix)] + suffix, n + 1
        taken.add(safe)
        mapping[name] = safe
    return mapping


def renamed(request: Request, mapping: dict[str, str]) -> Request:
    """A copy of ``request`` with the names in ``mapping`` replaced (the flow's own request
    stays the client's: another attempt may go to a backend with another rule)."""
    tools = [dataclasses.replace(t, name=mapping[t.name]) if t.name in mapping else t for t in request.tools]
    messages = []
    for message in request.messages:
        # Calls, and the results that name their tool (Gemini's functionResponse does)
        if any(isinstance(p, (ToolCallPart, ToolResultPart)) and p.name in mapping for p in message.parts):
            parts = [dataclasses.replace(p, name=mapping[p.name]) if isinstance(p, (ToolCallPart, ToolResultPart)) and p.name in mapping else p for p in message.parts]
            message = dataclasses.replace(message, parts=parts)
        messages.append(message)
    choice = mapping.get(request.tool_choice, request.tool_choice) if request.tool_choice else request.tool_choice
    return dataclasses.replace(request, tools=tools, messages=messages, tool_choice=choice)


def restore_names(response: Optional[Response], client_names: dict[str, str]) -> None:
    """Give the calls of a whole answer the client's names again."""
    if response is None:
        return
    for part in response.parts:
        if isinstance(part, ToolCallPart) and part.name in client_names:
            part.name = client_names[part.name]


def name_restorer(client_names: dict[str, str]) -> Callable[[Optional[StreamEvent]], Any]:
    """A stream processor giving each call that begins the client's name again."""

    def processor(event: Optional[StreamEvent]) -> Any:
        if event is not None and event.kind == EventKind.TOOL_CALL_START and event.name in client_names:
            event.name = client_names[event.name]
        return event

    return processor

