"""In-chat commands: ``!/backend(openai)``, ``!/model(…)``, ``!/set(temperature=0.2)`` … typed
in the chat by the user, handled by llmproxy, never seen by the model.

How a request is read
---------------------
Only the *current user turn* runs commands: the newest ``user`` message, when no assistant
turn follows it (in a tool loop, the newest message is a tool result and nothing runs).
Assistant text, tool results and system turns are never read, nor is text inside
client-injected wrappers such as Claude Code's ``<system-reminder>`` (``ignore_tags``).
Commands found there are removed from the text before it is forwarded; commands in *older*
user messages are removed again on every later request (the client keeps sending its
history) but never re-run, and llmproxy's own replies (they start with ``reply_marker``) are
taken out of the history with them, so the model never sees the exchange.

A message that holds only commands is answered by llmproxy itself (``flow.response``), in the
client's protocol and streamed if the client asked for a stream; no backend is called. A
message with other text runs its commands and is forwarded without them; if a command fails
(unknown name, bad arguments) the message is not forwarded and the reply says why.

Commands come from the ``register_commands`` hook — the built-ins here (see
:mod:`llmproxy_commands.builtin`) and any other plugin's, through the same registry
(``context.host.commands``). A session's choices (backend, model, oneoff, sampling values)
are applied to every request of that session; plugin switches are applied by the core.

Cost
----
With no prefix in the raw body and no session holding overrides anywhere in this proxy, the
``request`` hook is a settings lookup and a bytes search: the request is not decoded and no
session is looked up. It has no stream processor.
"""

from __future__ import annotations

import inspect
import json
import logging
from functools import lru_cache
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field, field_validator

from llmproxy import hookimpl
from llmproxy.canonical import Message, Response, TextPart, Usage
from llmproxy.commands import CommandCall
from llmproxy.flow import Flow

from .builtin import BUILTINS, PLUGIN, STATE_KEY, apply_session, has_overrides, proxy_state
from .parser import Found, find_commands, remove_commands

__all__ = ["CommandsSettings", "find_commands", "remove_commands"]

log = logging.getLogger("llmproxy.commands")


class CommandsSettings(BaseModel):
    """``plugins.commands``."""

    model_config = ConfigDict(extra="forbid")

    prefix: str = Field(
        "!/",
        description="What starts a command in a message (`!/model(x)`). Must not start with a letter, digit or "
        "space, and must not hold parentheses, so ordinary prose never matches.",
    )
    reply_marker: str = Field(
        "[llmproxy] ",
        description="Start of every reply llmproxy writes itself; replies that start with it are taken out of "
        "the history sent to the model on later requests.",
    )
    ignore_tags: list[str] = Field(
        default_factory=lambda: [
            "system-reminder", "session", "bash-stdout", "bash-stderr", "local-command-stdout",  # Claude Code
            "environment_context", "user_instructions",  # Codex CLI
            "session_context",  # Gemini CLI
        ],
        description="XML-like wrappers that clients put into user messages themselves (context, quoted history, "
        "shell output); text inside them is never read for commands, and does not count as the user's words.",
    )

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not value or value[0].isalnum() or value[0].isspace() or any(c in value for c in "()\n"):
            raise ValueError("the prefix must be non-empty, start with a symbol and hold no parentheses or newlines (e.g. '!/')")
        return value

    @field_validator("ignore_tags")
    @classmethod
    def _tags(cls, value: list[str]) -> list[str]:
        for tag in value:
            if not tag or any(c in tag for c in "<> /"):
                raise ValueError(f"{tag!r} is not a tag name (write system-reminder, not <system-reminder>)")
        return value


_DEFAULTS = CommandsSettings()


@lru_cache(maxsize=16)
def _needles(prefix: str) -> tuple[tuple[int, tuple[bytes, ...]], ...]:
    """The prefix as it may appear in a JSON body (``/`` may be escaped, non-ASCII too),
    grouped by first byte: ``(first byte, (forms…))``."""
    quoted = json.dumps(prefix)[1:-1]
    forms = {prefix.encode(), quoted.encode(), quoted.replace("/", "\\/").encode()}
    firsts = sorted({form[0] for form in forms})
    return tuple((first, tuple(f for f in forms if f[0] == first)) for first in firsts)


def mentions(raw: bytes, prefix: str) -> bool:
    """Whether the raw body may hold ``prefix``. A two-byte ``in`` runs at about 1 ns per byte
    (70 µs for a Claude Code request); finding the first byte is a memchr, and a prefix's
    first character is rare in prompts, so this is about 1 µs."""
    for first, forms in _needles(prefix):
        at = raw.find(first)
        while at >= 0:
            for form in forms:
                if raw.startswith(form, at):
                    return True
            at = raw.find(first, at + 1)
    return False


# -- registration ----------------------------------------------------------------------------


@hookimpl
def plugin_settings() -> type[BaseModel]:
    return CommandsSettings


@hookimpl
def register_commands(register: Callable[..., None]) -> None:
    for name, handler, help in BUILTINS:
        register(name, handler, help)


@hookimpl
def configure(context: Any) -> None:
    proxy_state(context)


# -- the flow --------------------------------------------------------------------------------


@hookimpl(tryfirst=True)
def request(flow: Flow) -> Any:
    # tryfirst: every other plugin sees the request without the commands, and a message of
    # commands alone is answered before anyone else does work on it.
    context = flow.context
    if context is None:
        return None
    settings = context.settings(PLUGIN) or _DEFAULTS
    raw = flow.raw_body
    # A request for JSON output is an agent's own side call (Gemini CLI's model router
    # classifies the user's prompt so): the commands are the user's turn's, which runs them;
    # answering this call with prose would break the agent.
    if raw and not mentions(raw, settings.prefix) or flow.request.response_format is not None:
        state = context.state.get(STATE_KEY)
        if state is not None and state.overrides:
            session = flow.session
            if has_overrides(session):
                apply_session(flow, session)
        return None
    return _handle(flow, context, settings)


async def _handle(flow: Flow, context: Any, settings: CommandsSettings) -> None:
    messages = flow.request.messages
    index = _current_turn(messages)
    current = messages[index] if index is not None else None
    _clean_history(messages, current, settings, context.host.commands)
    found: list[tuple[TextPart, list[Found]]] = []
    if current is not None:
        for part in current.parts:
            if isinstance(part, TextPart):
                commands = find_commands(part.text, settings.prefix, tuple(settings.ignore_tags))
                if commands:
                    found.append((part, commands))
    if found:
        assert current is not None
        await _run(flow, context, settings, current, found)
        if flow.has_response:
            return
    if proxy_state(context).overrides:
        session = flow.session
        if has_overrides(session):
            apply_session(flow, session)


def _current_turn(messages: list[Message]) -> int | None:
    """Index of the user message this request answers, or None (a tool loop, say)."""
    for i in range(len(messages) - 1, -1, -1):
        role = messages[i].role
        if role == "user":
            return i
        if role in ("assistant", "tool"):
            return None
    return None


def _clean_history(messages: list[Message], current: Message | None, settings: CommandsSettings, known: dict[str, Any]) -> None:
    """Take commands out of older user messages, and llmproxy's replies out of the history."""
    prefix, tags, marker = settings.prefix, tuple(settings.ignore_tags), settings.reply_marker
    drop: set[int] = set()
    for i, message in enumerate(messages):
        if message is current or message.role != "user":
            continue
        # llmproxy's reply follows the message, maybe after system messages a client put in
        # between (Claude Code's reminders, which belong to that turn).
        reply = i + 1
        while reply < len(messages) and messages[reply].role == "system":
            reply += 1
        answered = reply < len(messages) and _is_our_reply(messages[reply], marker)
        touched = False
        kept = []
        for part in message.parts:
            if isinstance(part, TextPart) and prefix in part.text:
                commands = [c for c in find_commands(part.text, prefix, tags) if c.name in known or answered]
                if commands:
                    touched = True
                    if answered:
                        continue  # llmproxy answered this message: the model never saw any of it
                    part.text = remove_commands(part.text, commands)
                    if not part.text.strip():
                        continue
            kept.append(part)
        if touched:
            message.parts = kept
            if not kept:
                drop.add(i)
            if answered:
                drop.add(reply)
                if not kept:  # the whole exchange goes, its system messages with it
                    drop.update(range(i + 1, reply))
    if drop:
        messages[:] = [m for i, m in enumerate(messages) if i not in drop]


def _is_our_reply(message: Message, marker: str) -> bool:
    return (
        message.role == "assistant"
        and bool(message.parts)
        and all(isinstance(p, TextPart) for p in message.parts)
        and message.text.startswith(marker)
    )


async def _run(flow: Flow, context: Any, settings: CommandsSettings, message: Message, found: list[tuple[TextPart, list[Found]]]) -> None:
    registry = context.host.commands
    prefix = settings.prefix
    session = flow.session
    replies: list[str] = []
    failed = False
    ran = []
    for part, commands in found:
        part.text = remove_commands(part.text, commands)
        for command in commands:
            label = f"{prefix}{command.name}"
            entry = registry.get(command.name)
            if entry is None:
                failed = True
                names = ", ".join(prefix + n for n in sorted(registry))
                replies.append(f"{label}: unknown command. Commands: {names} ({prefix}help explains them)")
                continue
            if entry.plugin in flow.disabled_plugins:
                failed = True
                replies.append(f"{label}: plugin {entry.plugin!r} is off for this session ({prefix}set(plugin.{entry.plugin}=on) turns it back on)")
                continue
            call = CommandCall(command.name, command.args or "", flow, session, context)
            try:
                reply = entry.handler(call)
                if inspect.isawaitable(reply):
                    reply = await reply
            except ValueError as error:
                failed = True
                replies.append(f"{label}: {error}")
                continue
            except Exception as error:  # a broken handler is that plugin's bug, not a reason to fail the flow
                log.exception("flow %s: command %s of plugin %s failed", flow.id, command.name, entry.plugin)
                failed = True
                replies.append(f"{label}: failed in plugin {entry.plugin!r} ({type(error).__name__}); see the proxy log, flow {flow.id}")
                continue
            ran.append(command.name)
            if reply:
                replies.append(str(reply))
    if ran:
        flow.note(PLUGIN, "ran", commands=ran)
    message.parts = [p for p in message.parts if not (isinstance(p, TextPart) and not p.text.strip() and any(p is q for q, _ in found))]
    alone = not any(_authored(p, settings) for p in message.parts)
    if failed and not alone:
        replies.append("Your message was not sent to the model; correct the command and send it again.")
    if alone or failed:
        text = settings.reply_marker + "\n".join(replies or ["done"])
        flow.response = Response(model=flow.model, parts=[TextPart(text)], stop_reason="end_turn", usage=Usage())
        flow.note(PLUGIN, "answered", commands=ran, failed=failed)
    elif replies:
        log.info("flow %s: %s", flow.id, "; ".join(r.replace("\n", "; ") for r in replies))


def _authored(part: Any, settings: CommandsSettings) -> bool:
    """Whether ``part`` is something the user wrote or attached (not a client wrapper)."""
    if not isinstance(part, TextPart):
        return True
    text = part.text
    for tag in settings.ignore_tags:
        opening, closing = f"<{tag}>", f"</{tag}>"
        while opening in text:
            start = text.find(opening)
            stop = text.find(closing, start)
            text = text[:start] + ("" if stop < 0 else text[stop + len(closing) :])
    return bool(text.strip())
