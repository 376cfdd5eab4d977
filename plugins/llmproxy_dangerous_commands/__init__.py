"""Dangerous-command blocking: a tool call that would run a destructive shell command never
reaches the client.

Agents run shell commands by asking for a tool call — Claude Code's ``Bash`` (``command``),
Codex CLI's ``exec_command`` (``cmd``), ``shell`` / ``local_shell`` (``command`` as an argv
array such as ``["bash", "-lc", "…"]``), Gemini CLI's ``run_shell_command`` (``command``) and
the like. This plugin reads the command of every such call before the client sees it and,
when a rule matches (``rm -rf /``, ``git reset --hard``, ``git push --force``, ``mkfs``,
``dd of=/dev/sda``, a fork bomb, ``curl … | sh``, ``DROP TABLE`` through ``psql`` … see
:data:`.rules.RULES`), replaces the call:

- ``action: steer`` (default): by a text block that says what was blocked and why, so the
  user and, on the next turn, the model read it and the agent carries on; the stop reason
  becomes ``end_turn`` when no other tool call remains;
- ``action: error``: the client gets a 403 error (an error event once a stream has begun).

Commands are judged on what runs, not on text: ``bash -c "…"``, ``sh -lc``, ``eval``,
``sudo``, ``env`` and ``VAR=value`` prefixes, ``timeout``/``nohup``/``xargs`` wrappers,
``$(…)`` substitutions and every command of a ``&&``/``;``/``|`` chain are unwrapped, while
quoted text given to a harmless program (``echo "rm -rf /"``, ``grep "DROP TABLE"``) passes.
``extra_rules`` add regular expressions, ``allow`` exempts matching commands, and
``disabled_rules`` switches built-in rules off.

Streams. Only when the request offers a shell-like (or SQL) tool — read from the wire body's
tool list, without decoding the request — does ``stream_start`` return a processor. It
passes text and other events on at once and holds a watched tool call's events until the
call's block ends, then releases them untouched or replaces them. Non-streamed answers are
checked in ``response``. Both hooks run last (``trylast``), after plugins that repair or
convert tool calls, so what is judged is what the client would run.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

from llmproxy import Flow, ProxyError, hookimpl
from llmproxy.canonical import EventKind, OpaquePart, StreamEvent, TextPart, ToolCallPart

from .rules import RULES, Finding, check, check_sql

__all__ = ["DangerousCommandsSettings", "Guard", "Policy", "RULES", "check"]

NAME = "dangerous_commands"
log = logging.getLogger("llmproxy.dangerous_commands")
TEXT, CALL_START, CALL_DELTA, BLOCK_STOP, STOP = EventKind.TEXT, EventKind.TOOL_CALL_START, EventKind.TOOL_CALL_DELTA, EventKind.BLOCK_STOP, EventKind.STOP

DEFAULT_MESSAGE = (
    "llmproxy blocked a dangerous command: `{command}` ({reason}). It was not run. "
    "If it is really wanted, the user can run it by hand; otherwise continue with a safer approach."
)


class ExtraRule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pattern: str = Field(description="A regular expression (Python syntax) searched in the command line and in each simple command.")
    reason: str = Field("matches a blocking rule in the proxy's configuration", description="Why it is blocked (shown in the message).")
    id: str = Field("custom", description="A name for the rule (shown in the flow notes).")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as error:
            raise ValueError(f"not a valid regular expression: {error}") from None
        return value


class DangerousCommandsSettings(BaseModel):
    """``plugins.dangerous_commands``."""

    model_config = ConfigDict(extra="forbid")

    action: Literal["steer", "error"] = Field(
        "steer",
        description="steer: replace the blocked tool call by a text answer saying what was blocked and why, so the "
        "agent can carry on; error: answer with a 403 error (an error event in a stream that has begun).",
    )
    message: str = Field(
        DEFAULT_MESSAGE,
        description="The steering text; {command}, {reason} and {rule} are filled in.",
    )
    shell_tools: list[str] = Field(
        default_factory=lambda: [
            "Bash", "exec_command", "shell", "local_shell", "shell_command", "run_shell_command",
            "run_terminal_cmd", "execute_command", "run_command", "terminal", "container.exec",
        ],
        description="Names of tools whose calls run shell commands (compared without regard to case).",
    )
    command_keys: list[str] = Field(
        default_factory=lambda: ["command", "cmd", "commands", "script"],
        description="Argument names that hold the command of a shell tool: a string, or an argv array such as "
        '["bash", "-lc", "…"]. A Responses local_shell_call\'s action.command is always read.',
    )
    sql_tools: str = Field(
        r"(?i)sql|postgres|mysql|sqlite|database",
        description="A regular expression for names of tools that run SQL; their sql/query/statement arguments "
        "are checked for DROP DATABASE/SCHEMA/TABLE (rule sql_drop). Empty: none.",
    )
    disabled_rules: list[str] = Field(
        default_factory=list,
        description="Built-in rules to switch off, by id: " + ", ".join(RULES) + ".",
    )
    extra_rules: list[ExtraRule] = Field(default_factory=list, description="More commands to block: {pattern, reason, id}.")
    allow: list[str] = Field(
        default_factory=list,
        description="Regular expressions for commands that are never blocked: a finding is dropped when one of them "
        "is found in the simple command that matched (e.g. '^git push --force-with-lease').",
    )

    @field_validator("disabled_rules")
    @classmethod
    def _known_rules(cls, value: list[str]) -> list[str]:
        unknown = [r for r in value if r not in RULES]
        if unknown:
            raise ValueError(f"unknown rule(s) {', '.join(unknown)}; the rules are {', '.join(RULES)}")
        return value

    @field_validator("allow", "sql_tools")
    @classmethod
    def _patterns(cls, value: Any) -> Any:
        for pattern in value if isinstance(value, list) else [value]:
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"{pattern!r} is not a valid regular expression: {error}") from None
        return value


class Policy:
    """The settings compiled once per configuration: which tools to watch, how to judge."""

    __slots__ = ("settings", "shell_names", "sql_names", "disabled", "extra", "allow", "_offered")

    def __init__(self, settings: DangerousCommandsSettings) -> None:
        self.settings = settings
        self.shell_names = frozenset(name.lower() for name in settings.shell_tools)
        self.sql_names = re.compile(settings.sql_tools) if settings.sql_tools else None
        self.disabled = frozenset(settings.disabled_rules)
        self.extra = tuple((rule.id, re.compile(rule.pattern), rule.reason) for rule in settings.extra_rules)
        self.allow = tuple(re.compile(p) for p in settings.allow)
        self._offered: dict[tuple[str, ...], bool] = {}  # an agent sends the same tools every time

    def watches(self, name: str | None) -> bool:
        if not name:
            return False
        return name.lower() in self.shell_names or (self.sql_names is not None and self.sql_names.search(name) is not None)

    def offered(self, raw_request: dict[str, Any]) -> bool:
        """Does the request (its wire body, not decoded) offer a watched tool?"""
        tools = raw_request.get("tools")
        if not tools or not isinstance(tools, list):
            return False
        names = tuple(_tool_names(tools))
        known = self._offered.get(names)
        if known is None:
            if len(self._offered) > 256:
                self._offered.clear()
            known = self._offered[names] = any(self.watches(name) for name in names)
        return known

    def judge(self, name: str, arguments: str) -> list[Finding]:
        """Every reason to block a call of tool ``name`` with ``arguments`` (JSON text)."""
        value = _arguments(arguments)
        findings: list[Finding] = []
        if name.lower() in self.shell_names:
            for command in self.commands(value, arguments):
                findings += check(command, self.disabled, self.extra)
        elif self.sql_names is not None and isinstance(value, dict):
            for key in ("sql", "query", "statement"):
                if isinstance(value.get(key), str):
                    findings += check_sql(value[key], self.disabled)
        return self.allowed_out(findings)

    def judge_argv(self, argv: Any) -> list[Finding]:
        command = _command_line(argv)
        return self.allowed_out(check(command, self.disabled, self.extra)) if command else []

    def commands(self, value: Any, raw: str) -> list[str]:
        if not isinstance(value, dict):
            return [raw] if raw.strip() else []  # unreadable arguments: judge the text itself
        found = []
        for key in self.settings.command_keys:
            command = _command_line(value.get(key))
            if command:
                found.append(command)
        action = value.get("action")
        if isinstance(action, dict):
            command = _command_line(action.get("command"))
            if command:
                found.append(command)
        return found

    def allowed_out(self, findings: list[Finding]) -> list[Finding]:
        if not self.allow or not findings:
            return findings
        return [f for f in findings if not any(p.search(f.command) for p in self.allow)]

    def message(self, finding: Finding) -> str:
        command = finding.command if len(finding.command) <= 300 else finding.command[:297] + "..."
        return self.settings.message.format(command=command.replace("`", "'"), reason=finding.reason, rule=finding.rule)

    def error(self, finding: Finding) -> ProxyError:
        return ProxyError(403, f"llmproxy blocked a dangerous command ({finding.reason}): {finding.command[:300]}", code="dangerous_command")


def _tool_names(tools: list[Any]) -> list[str]:
    """Tool names in any protocol's tool list: ``name``, ``function.name`` (Chat), built-in
    ``type`` (Responses ``local_shell``), ``functionDeclarations`` (Gemini), namespaces."""
    names = []
    for tool in tools:
        if not isinstance(tool, dict):
            continue
        for key in ("name", "type"):
            if isinstance(tool.get(key), str):
                names.append(tool[key])
        function = tool.get("function")
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            names.append(function["name"])
        for key in ("functionDeclarations", "function_declarations", "tools"):
            inner = tool.get(key)
            if isinstance(inner, list):
                names.extend(_tool_names(inner))
    return names


def _arguments(text: str) -> Any:
    try:
        return json.loads(text or "{}")
    except ValueError:
        pass
    try:
        from json_repair import repair_json

        value = repair_json(text, return_objects=True)
    except Exception:
        return None
    return value if isinstance(value, dict) else None


def _command_line(value: Any) -> str:
    """A command as one shell line: a string as it is, an argv array quoted word by word."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return shlex.join(value)
    return ""


# -- per flow --------------------------------------------------------------------------------


def _policy(flow: Flow) -> Policy:
    context = flow.context
    if context is None:
        return _DEFAULT_POLICY
    policy = context.state.get(NAME)
    if policy is None:
        settings = context.settings(NAME)
        policy = context.state[NAME] = Policy(settings if isinstance(settings, DangerousCommandsSettings) else DangerousCommandsSettings())
    return policy


_DEFAULT_POLICY = Policy(DangerousCommandsSettings())


def _note(flow: Flow, finding: Finding, tool: str) -> None:
    flow.note(NAME, "blocked", rule=finding.rule, tool=tool, command=finding.command[:500])
    log.warning("flow %s: blocked a %s call (%s): %s", flow.id, tool, finding.rule, finding.command[:200])


# -- hooks -------------------------------------------------------------------------------------


@hookimpl
def plugin_settings() -> type[BaseModel]:
    return DangerousCommandsSettings


@hookimpl
def configure(settings: DangerousCommandsSettings, context: Any) -> dict[str, str]:
    context.state[NAME] = Policy(settings)
    return {"response": "tools", "stream_start": "tools"}  # only a tool call runs a command


@hookimpl(trylast=True)
def stream_start(flow: Flow) -> Optional["Guard"]:
    policy = _policy(flow)
    if not policy.offered(flow.raw_request):
        return None  # no shell tool offered: this stream costs nothing
    return Guard(policy, flow)


@hookimpl(trylast=True)
def response(flow: Flow) -> None:
    policy = _policy(flow)
    if not policy.offered(flow.raw_request):
        return
    answer = flow.response
    if answer is None:
        return
    parts: list[Any] = []
    blocked: list[Finding] = []
    calls_left = 0
    for part in answer.parts:
        findings: list[Finding] = []
        tool = ""
        if isinstance(part, ToolCallPart) and policy.watches(part.name):
            findings, tool = policy.judge(part.name, part.arguments), part.name
        elif isinstance(part, OpaquePart) and part.data.get("type") == "local_shell_call":
            findings, tool = policy.judge_argv((part.data.get("action") or {}).get("command")), "local_shell"
        if not findings:
            calls_left += isinstance(part, ToolCallPart) or isinstance(part, OpaquePart) and part.data.get("type") == "local_shell_call"
            parts.append(part)
            continue
        for finding in findings:
            _note(flow, finding, tool)
        if policy.settings.action == "error":
            raise policy.error(findings[0])
        blocked.append(findings[0])
        parts.append(TextPart(("\n\n" if any(isinstance(p, TextPart) for p in parts) else "") + policy.message(findings[0])))
    if blocked:
        answer.parts = parts
        if not calls_left and answer.stop_reason == "tool_use":
            answer.stop_reason = "end_turn"


class Guard:
    """Stream processor: holds each watched tool call until its block ends, then lets it go
    untouched or replaces it (one instance per stream)."""

    __slots__ = ("policy", "flow", "held", "blocked", "passed", "text_seen")

    def __init__(self, policy: Policy, flow: Flow) -> None:
        self.policy = policy
        self.flow = flow
        self.held: dict[int, list[StreamEvent]] = {}
        self.blocked = 0
        self.passed = 0
        self.text_seen = False

    def __call__(self, event: Optional[StreamEvent]) -> StreamEvent | list[StreamEvent] | None:
        if event is None:
            return self.flush()
        kind = event.kind
        if kind == TEXT:
            if event.extra is not None and "responses_item" in event.extra:
                return self.local_shell(event)
            self.text_seen = True
            return event
        if kind == CALL_DELTA:
            held = self.held.get(event.index)
            if held is None:
                return event
            held.append(event)
            return None
        if kind == CALL_START:
            if self.policy.watches(event.name):
                self.held[event.index] = [event]
                return None
            self.passed += 1
            return event
        if kind == BLOCK_STOP:
            held = self.held.pop(event.index, None)
            return event if held is None else self.decide(held, event)
        if kind == STOP and self.blocked and not self.passed and event.stop_reason == "tool_use":
            event.stop_reason = "end_turn"
        return event

    def decide(self, held: list[StreamEvent], stop: StreamEvent | None) -> list[StreamEvent]:
        start = held[0]
        name = start.name or ""
        findings = self.policy.judge(name, "".join(e.text for e in held[1:]))
        if not findings:
            self.passed += 1
            return held if stop is None else [*held, stop]
        return self.replace(start.index, findings, name)

    def replace(self, index: int, findings: list[Finding], tool: str) -> list[StreamEvent]:
        for finding in findings:
            _note(self.flow, finding, tool)
        if self.policy.settings.action == "error":
            return [StreamEvent(EventKind.ERROR, error=self.policy.error(findings[0]))]
        self.blocked += 1
        text = ("\n\n" if self.text_seen else "") + self.policy.message(findings[0])
        self.text_seen = True
        return [StreamEvent(TEXT, index=index, text=text), StreamEvent(BLOCK_STOP, index=index)]

    def local_shell(self, event: StreamEvent) -> StreamEvent | list[StreamEvent]:
        item = event.extra["responses_item"] if event.extra else None
        if not isinstance(item, dict) or item.get("type") != "local_shell_call":
            return event
        findings = self.policy.judge_argv((item.get("action") or {}).get("command"))
        if not findings:
            self.passed += 1
            return event
        out = self.replace(event.index, findings, "local_shell")
        return out[0] if out[0].kind == TEXT else out  # the item's own block stop follows

    def flush(self) -> list[StreamEvent] | None:
        """The stream ended with calls still open: judge them as they are."""
        if not self.held:
            return None
        held, self.held = self.held, {}
        out: list[StreamEvent] = []
        for index in sorted(held):
            out += self.decide(held[index], None)
        return out
