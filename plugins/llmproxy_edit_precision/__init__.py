"""edit_precision: after a failed file edit, lower temperature (and optionally top_p) for the
next few calls of that session.

A model that misquotes the text it wants to replace ("String to replace not found") tends to
do it again on the retry. Sampling closer to the most likely tokens makes the retry quote
the file more exactly. This plugin watches the tool results each agent sends back:

| agent | edit tools | failure texts it recognises |
| --- | --- | --- |
| Claude Code | ``Edit``, ``MultiEdit``, ``Write``, ``NotebookEdit`` | "String to replace not found", "… matches of the string to replace" |
| Codex CLI | ``apply_patch`` (a tool, or a command run by ``exec_command``/``shell``) | "Failed to apply patch", "apply_patch verification failed", "Failed to find expected lines", "Failed to find context" |
| Gemini CLI | ``replace``, ``write_file`` | "could not find the string to replace", "0 occurrences found", "Expected 1 occurrence" |
| others | ``str_replace_based_edit_tool``, ``str_replace_editor``, ``edit_file`` | "old_string not found", "No match found" |

When the newest turn of a request (the tool results sent since the model's last answer)
holds such a failure, that request and the next ``calls - 1`` requests of the session are
sent with ``temperature`` lowered to the configured value (never raised: a client asking
for 0 keeps 0), and ``top_p`` too when one is configured. The state lives in
``flow.session.data["edit_precision"]``; each change is recorded with ``flow.note``.
A new failure starts the count again.

Requests that offer no tools (title generation, summaries and other side calls) are neither
tuned nor counted. Some APIs refuse a lowered temperature: Anthropic while thinking is on,
OpenAI's reasoning models always — so requests that ask for reasoning and go to a backend
of a protocol listed in ``skip_reasoning_on`` are left alone (they still count), and
``exclude_models`` lists the reasoning models by name.

::

    plugins:
      edit_precision:
        temperature: 0.1
        top_p: 0.9            # unset by default: Anthropic refuses temperature and top_p together
        calls: 3

Cost: before anything is decoded, the plugin reads the tool results of the client's newest
turn straight from the parsed wire body (the trailing items of ``messages``, ``input`` or
``contents``, after the model's last message or call) and looks for the failure texts there. A request without them,
while no session of this proxy is being tuned, is neither decoded nor assigned a session:
a few microseconds, whatever the length of the conversation. Old failures deeper in the
history are never looked at again. Nothing per streamed event.
"""

from __future__ import annotations

import fnmatch
import time
import weakref
from typing import TYPE_CHECKING, Any, Optional

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from llmproxy import ProxyError, hookimpl
from llmproxy.canonical import Message, OpaquePart, Request, TextPart, ToolCallPart, ToolResultPart

if TYPE_CHECKING:
    from llmproxy import Flow

NAME = "edit_precision"

DEFAULT_PATTERNS = [
    "String to replace not found",  # Claude Code Edit / MultiEdit
    "matches of the string to replace",  # Claude Code: "Found 2 matches of the string to replace, but replace_all is false"
    "old_string not found",
    "Failed to apply patch",  # Codex apply_patch
    "apply_patch verification failed",
    "Failed to find expected lines",
    "Failed to find context",
    "could not find the string to replace",  # Gemini CLI replace
    "0 occurrences found",
    "Expected 1 occurrence",
    "No match found",  # str_replace_based_edit_tool and friends
]
DEFAULT_TOOLS = [
    "Edit", "MultiEdit", "Write", "NotebookEdit",  # Claude Code
    "apply_patch", "exec_command", "shell", "shell_command", "local_shell",  # Codex CLI (apply_patch may run as a command)
    "replace", "write_file", "edit",  # Gemini CLI
    "str_replace_based_edit_tool", "str_replace_editor", "edit_file",  # SDK examples, other agents
]
DEFAULT_EXCLUDED = ["o1*", "o3*", "o4*", "gpt-5*", "*/o1*", "*/o3*", "*/o4*", "*/gpt-5*", "*:o1*", "*:o3*", "*:o4*", "*:gpt-5*"]


class EditPrecisionSettings(BaseModel):
    """``plugins.edit_precision``."""

    model_config = ConfigDict(extra="forbid")

    temperature: Optional[float] = Field(0.2, ge=0.0, le=2.0, description="Temperature for the tuned calls (lowered to, never raised to); unset leaves temperature alone.")
    top_p: Optional[float] = Field(
        None, gt=0.0, le=1.0, description="top_p for the tuned calls (lowered to); unset leaves top_p alone (Anthropic refuses both together)."
    )
    calls: int = Field(3, ge=1, le=100, description="How many calls are tuned after a failed edit, the one carrying the failure included.")
    patterns: list[str] = Field(
        default_factory=lambda: list(DEFAULT_PATTERNS),
        description="Texts (case-insensitive) that mark a tool result as a failed edit.",
    )
    tools: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TOOLS),
        description="Tool names whose results are checked; empty checks every tool's results.",
    )
    models: list[str] = Field(default_factory=lambda: ["*"], description="Model globs to tune (requested name or first target).")
    exclude_models: list[str] = Field(
        default_factory=lambda: list(DEFAULT_EXCLUDED),
        description="Model globs never tuned (reasoning models that refuse a temperature).",
    )
    skip_reasoning_on: list[str] = Field(
        default_factory=lambda: ["anthropic", "openai_responses"],
        description="Backend protocols whose APIs refuse a lowered temperature while reasoning is on: a request asking "
        "for reasoning that goes to such a backend is left alone (it still counts).",
    )

    _lowered: list[str] = PrivateAttr(default_factory=list)
    _tools: frozenset[str] = PrivateAttr(frozenset())

    @model_validator(mode="after")
    def _prepare(self) -> "EditPrecisionSettings":
        if any(not p.strip() for p in self.patterns):
            raise ValueError("patterns must not be empty strings")
        self._lowered = [p.lower() for p in self.patterns]
        self._tools = frozenset(self.tools)
        return self

    @property
    def active(self) -> bool:
        return bool(self.patterns) and (self.temperature is not None or self.top_p is not None)

    def wants_model(self, names: list[str]) -> bool:
        def any_match(globs: list[str]) -> bool:
            return any(fnmatch.fnmatchcase(name, glob) for glob in globs for name in names)

        return any_match(self.models) and not any_match(self.exclude_models)

    def failure_in(self, text: str) -> Optional[str]:
        lowered = text.lower()
        for pattern, low in zip(self.patterns, self._lowered):
            if low in lowered:
                return pattern
        return None


_DEFAULT = EditPrecisionSettings()


class _ProxyState:
    """Per proxy: the sessions being tuned, so a flow with nothing to look at skips its session."""

    def __init__(self) -> None:
        # session id -> session; a session the store forgets drops out by itself
        self.tuning: "weakref.WeakValueDictionary[str, Any]" = weakref.WeakValueDictionary()


@hookimpl
def plugin_settings() -> type[BaseModel]:
    return EditPrecisionSettings


@hookimpl
def configure(settings: Optional[EditPrecisionSettings]) -> dict[str, str]:
    return {"request": "tools" if (settings or _DEFAULT).active else "never"}  # only agents' edit turns are tuned


# trylast: after plugins that change the model or the request (commands, overrides).
@hookimpl(trylast=True)
def request(flow: "Flow") -> None:
    context = flow.context
    settings: EditPrecisionSettings = (context.settings(NAME) if context is not None else None) or _DEFAULT
    if not settings.active or not flow.raw_request.get("tools"):
        return  # off, or a call offering no tools (plain chat, side calls): never tuned nor counted
    state = _proxy_state(flow)
    results = newest_results_text(flow.raw_request)
    maybe_failure = results is None or (results != "" and settings.failure_in(results) is not None)
    if not maybe_failure and not state.tuning:
        return  # no failure text in the newest turn and no session being tuned
    session = flow.session
    data: dict[str, Any] = session.data.setdefault(NAME, {"remaining": 0})
    if not maybe_failure and data["remaining"] <= 0:
        return
    request = flow.request
    if not request.tools:
        return  # a side call (title, summary): neither tuned nor counted
    if maybe_failure:
        failure = failed_edit(request, settings)
        if failure is not None:
            tool, pattern, call_id = failure
            # The same result at the same place, sent again (a client's retry), is not a new
            # failure. (Gemini CLI's results carry no call id, so the place tells them apart.)
            seen = f"{call_id}@{len(request.messages)}"
            if seen != data.get("seen"):
                data.update(remaining=settings.calls, tool=tool, pattern=pattern, seen=seen, since=time.time())
                state.tuning[session.id] = session
                flow.note(NAME, "failed edit seen", tool=tool, pattern=pattern, calls=settings.calls)
    if data["remaining"] <= 0:
        return
    data["remaining"] -= 1
    if data["remaining"] <= 0:
        state.tuning.pop(session.id, None)
    target = _first_target(flow)
    names = [flow.model] + ([target.label, target.model] if target is not None else [])
    if not settings.wants_model(names):
        flow.note(NAME, "model excluded: sampling left alone", model=flow.model, calls_left=data["remaining"])
        return
    if _reasoning_on(request) and target is not None and target.provider.protocol in settings.skip_reasoning_on:
        flow.note(NAME, "reasoning on: sampling left alone", protocol=target.provider.protocol, calls_left=data["remaining"])
        return
    changed = tune(request, settings)
    flow.note(NAME, "lowered sampling", **changed, calls_left=data["remaining"])


# The model's own items in each protocol's conversation list: the newest turn is what follows
# the last of them.
_MODEL_ROLES = frozenset(("assistant", "model"))
_MAX_TURN_ITEMS = 64


def newest_results_text(raw: Any) -> Optional[str]:
    """The tool results of the client's newest turn in a wire body (what follows the model's
    last message or call), as lower-cased text; "" when that turn holds no tool result, None
    when the body has no conversation list.

    A cheap look before decoding: it walks only the trailing items of ``messages`` (OpenAI
    Chat, Anthropic), ``input`` (Responses) or ``contents`` (Gemini), and reads only tool
    results: Anthropic ``tool_result`` blocks, OpenAI ``tool`` messages, Responses
    ``*_call_output`` items, Gemini ``functionResponse`` parts."""
    if not isinstance(raw, dict):
        return None
    items = raw.get("messages")
    if items is None:
        items = raw.get("input", raw.get("contents"))
    if isinstance(items, str):
        return ""
    if not isinstance(items, list):
        return None
    strings: list[str] = []
    for item in reversed(items[-_MAX_TURN_ITEMS:]):
        if not isinstance(item, dict):
            continue
        kind = item.get("type")
        role = item.get("role")
        if role in _MODEL_ROLES or kind == "reasoning" or (isinstance(kind, str) and kind.endswith("_call")):
            break
        if role in ("tool", "function") or (isinstance(kind, str) and kind.endswith("_output")):
            _strings(item, strings)
            continue
        blocks = item.get("content", item.get("parts"))
        if isinstance(blocks, list):
            for block in blocks:
                if isinstance(block, dict) and (
                    block.get("type") == "tool_result" or "functionResponse" in block or "function_response" in block
                ):
                    _strings(block, strings)
    return "\n".join(strings).lower()


def _strings(value: Any, out: list[str]) -> None:
    if isinstance(value, str):
        out.append(value)
    elif isinstance(value, dict):
        for item in value.values():
            _strings(item, out)
    elif isinstance(value, list):
        for item in value:
            _strings(item, out)


def _proxy_state(flow: "Flow") -> _ProxyState:
    context = flow.context
    if context is None:
        return _LOCAL
    state = context.state.get(NAME)
    if state is None:
        state = context.state[NAME] = _ProxyState()
    return state  # type: ignore[no-any-return]


_LOCAL = _ProxyState()  # flows built without a proxy (unit tests)


def _first_target(flow: "Flow") -> Any:
    context = flow.context
    if context is None:
        return None
    try:
        targets = context.router.resolve(flow.model)
    except ProxyError:
        return None
    return targets[0] if targets else None


def _reasoning_on(request: Request) -> bool:
    reasoning = request.reasoning
    if not reasoning or reasoning.get("enabled") is False:
        return False
    effort = reasoning.get("effort")
    return bool(reasoning.get("budget_tokens") or reasoning.get("adaptive") or (effort and effort != "none"))


def tune(request: Request, settings: EditPrecisionSettings) -> dict[str, Any]:
    """Lower the request's temperature and top_p to the settings' values; return the changes."""
    changed: dict[str, Any] = {}
    params = request.params
    for key, target in (("temperature", settings.temperature), ("top_p", settings.top_p)):
        if target is None:
            continue
        current = params.get(key)
        if isinstance(current, (int, float)) and current <= target:
            continue
        params[key] = target
        changed[key] = {"from": current, "to": target}
    return changed


def newest_turn(request: Request) -> list[Message]:
    """The messages after the model's last answer: the tool results the client just sent."""
    messages = request.messages
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].role == "assistant":
            return messages[i + 1 :]
    return messages


def failed_edit(request: Request, settings: EditPrecisionSettings) -> Optional[tuple[str, str, str]]:
    """(tool name, pattern, tool call id) of the first failed edit in the newest turn, or None."""
    turn = newest_turn(request)
    if not turn:
        return None
    names: dict[str, str] = {}
    for message in request.messages:
        if message.role == "assistant":
            for part in message.parts:
                if isinstance(part, ToolCallPart):
                    names[part.id] = part.name
                elif isinstance(part, OpaquePart) and isinstance(part.data.get("call_id"), str) and isinstance(part.data.get("name"), str):
                    names[part.data["call_id"]] = part.data["name"]  # e.g. Codex's custom apply_patch tool
    for message in turn:
        for part in message.parts:
            if isinstance(part, ToolResultPart):
                call_id, name, text = part.tool_call_id, part.name, _result_text(part.content)
            elif isinstance(part, OpaquePart) and str(part.data.get("type", "")).endswith("_call_output"):
                call_id, name, output = part.data.get("call_id"), None, part.data.get("output")
                text = output if isinstance(output, str) else ""
            else:
                continue
            name = name or names.get(call_id or "") or ""
            if settings._tools and name and name not in settings._tools:
                continue
            pattern = settings.failure_in(text)
            if pattern is not None:
                return name or "?", pattern, str(call_id or "")
    return None


def _result_text(content: list[Any]) -> str:
    texts = []
    for part in content:
        if isinstance(part, TextPart):
            texts.append(part.text)
        elif isinstance(part, ToolResultPart):
            texts.append(_result_text(part.content))
    return "\n".join(texts)
