"""Empty-response recovery: an answer with nothing in it is asked for again, once.

Backends sometimes end an answer without a word: no text (or only whitespace), no tool call —
a ``stop`` with empty content. Agents then stall or end the user's task. This plugin retries
such an answer once, before the client sees anything, with a short note appended to the
request (``prompt``, as a user turn); whatever the second answer is, the client gets it.

What counts as empty: no tool call, no non-blank text, nothing else (images, parts llmproxy
keeps opaque) — reasoning alone is empty. A tool-call-only answer is *not* empty. Answers
that stopped at ``max_tokens`` (the limit ended them; a retry under the same limit would end
the same way), were filtered (``content_filter``) or failed are passed on as they are, and
so are answers a plugin gave without calling a backend.

Non-streamed answers: the ``response`` hook (``tryfirst``, so every other response hook sees
the recovered answer) calls ``flow.context.resend(flow)``. If that second call fails, the
client gets the first, empty answer rather than an error.

Streamed answers: the stream processor holds the first events (``start``, blank text,
usage, block stops) until real content arrives — non-blank text, a tool call, or reasoning —
and then releases them with it, so a normal answer's first token is not delayed. If the stream
ends with nothing, it appends the note and raises ``llmproxy.errors.RetryStream``: llmproxy
closes that upstream and streams the backend's second answer instead (this plugin does not
watch the second one). Reasoning is released as it arrives so that a reasoning model's
thinking shows live; a stream that *reasons and then* ends empty has therefore been seen by
the client and is not retried (a non-streamed one is).

Cost: the ``response`` hook decodes every non-streamed chat answer; streams are watched per
``streams`` (default: those of requests offering tools, which are decoded anyway), about
0.03 µs per event once the answer has begun.

Settings: ``plugins.empty_recovery`` (see :class:`EmptyRecoverySettings`).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Literal, Optional

from pydantic import BaseModel, field_validator, ConfigDict, Field

from llmproxy import Flow, ProxyError, hookimpl
from llmproxy.canonical import EventKind, Message, Response, StreamEvent, TextPart, ThinkingPart
from llmproxy.errors import RetryStream

NAME = "empty_recovery"
log = logging.getLogger("llmproxy.empty_recovery")

RETRIED = "retried"
"""``flow.metadata["empty_recovery"]`` once this flow's answer was asked for again."""

# Stop reasons after which an empty answer is worth asking for again (see the docstring).
_RETRY_STOPS = frozenset((None, "end_turn", "stop_sequence", "tool_use"))


class EmptyRecoverySettings(BaseModel):
    """``plugins.empty_recovery``."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(
        "(Your previous attempt at this reply came back empty. Answer the request above now: "
        "write your reply, or call a tool.)",
        min_length=1,
        description="The note appended to the request, as the user's, when the answer is asked for again.",
    )
    answers: Literal["all", "with_tools"] = Field(
        "with_tools",
        description="Which non-streamed answers to recover: with_tools (default) those of requests that offer tools, "
        "so a plain chat answer goes out as the backend sent it, undecoded; all: every chat answer.",
    )
    streams: Literal["all", "with_tools", "off"] = Field(
        "with_tools",
        description="Which streamed answers to recover. Events are held only until the first real content, so a "
        "normal answer is not delayed, but a watched stream is decoded. with_tools (default): streams of requests "
        "that offer tools (agent traffic, decoded anyway by the tool-watching plugins); all: every chat stream; "
        "off: none (true and false mean all and off).",
    )

    @field_validator("streams", mode="before")
    @classmethod
    def _booleans(cls, value: Any) -> Any:
        return {True: "all", False: "off"}.get(value, value) if isinstance(value, bool) else value


_DEFAULTS = EmptyRecoverySettings()


def _settings(flow: Flow) -> EmptyRecoverySettings:
    context = flow.context
    settings = context.settings(NAME) if context is not None else None
    return settings if settings is not None else _DEFAULTS


def is_empty(response: Response) -> bool:
    """No tool call, no non-blank text, no other content: reasoning alone is empty."""
    for part in response.parts:
        if isinstance(part, TextPart):
            if part.text.strip():
                return False
        elif not isinstance(part, ThinkingPart):
            return False  # a tool call, an image, a part kept opaque: something
    return True


def add_prompt(flow: Flow, prompt: str) -> None:
    """Append ``prompt`` to the request as the user's: to the last message when it is the
    user's (after a blank line: some protocols join a turn's text parts), else as a new user
    turn (after tool results)."""
    messages = flow.request.messages
    if messages and messages[-1].role == "user":
        messages[-1].parts.append(TextPart("\n\n" + prompt))
    else:
        messages.append(Message("user", [TextPart(prompt)]))


def _retry(flow: Flow, stop_reason: Optional[str]) -> None:
    add_prompt(flow, _settings(flow).prompt)
    flow.metadata[NAME] = RETRIED
    flow.note(NAME, "asked again after an empty answer", stop_reason=stop_reason)
    log.warning("flow %s: the backend's answer was empty (stop: %s); asking once more", flow.id, stop_reason)


@hookimpl
def plugin_settings() -> type[BaseModel]:
    return EmptyRecoverySettings


@hookimpl
def configure(settings: Optional[EmptyRecoverySettings]) -> dict[str, str]:
    s = settings or _DEFAULTS
    when = {"all": "always", "with_tools": "tools", "off": "never"}
    return {"response": when[s.answers], "stream_start": when[s.streams]}


@hookimpl(tryfirst=True)
async def response(flow: Flow) -> None:
    if not flow.attempts or flow.metadata.get(NAME):
        return  # answered by a plugin, not a backend; or retried already
    if _settings(flow).answers == "with_tools" and not flow.raw_request.get("tools"):
        return  # reading the answer would decode it; a plain chat answer passes as it came
    first = flow.response
    if first is None or first.stop_reason not in _RETRY_STOPS or not is_empty(first):
        return
    _retry(flow, first.stop_reason)
    try:
        second = await flow.context.resend(flow)
    except ProxyError as error:
        flow.note(NAME, "asking again failed; passing the empty answer on", error=error.message)
        log.warning("flow %s: asking again failed (%s %s); passing the empty answer on", flow.id, error.status, error.message)
        return
    if is_empty(second):
        flow.note(NAME, "the second answer was empty too")
    flow.response = second


@hookimpl(tryfirst=True)
def stream_start(flow: Flow) -> Optional[Callable[[Optional[StreamEvent]], Any]]:
    # tryfirst: the watch must see the backend's events before any other processor acts on them
    streams = _settings(flow).streams
    if flow.metadata.get(NAME) or flow.has_response or streams == "off":
        return None  # the retry itself, or a plugin's own answer: nothing to ask again
    if streams == "with_tools" and not flow.raw_request.get("tools"):
        return None  # a plain chat stream keeps the pass-through path
    return watch_stream(flow)


_CONTENT = frozenset((EventKind.TOOL_CALL_START, EventKind.TOOL_CALL_DELTA, EventKind.THINKING, EventKind.ERROR))


def watch_stream(flow: Flow) -> Callable[[Optional[StreamEvent]], Any]:
    """The stream processor: holds events until the first real content, then passes
    everything; a stream that ends with nothing raises :class:`RetryStream` (once per flow).
    A closure, as it runs for every event of the stream: about 0.03 µs once live."""
    held: list[StreamEvent] = []
    live = False

    def process(event: Optional[StreamEvent]) -> StreamEvent | list[StreamEvent] | None:
        nonlocal live
        if live:
            return event
        if event is None:
            return None  # the end-of-stream flush: the stop event comes next, and decides
        kind = event.kind
        if (kind == EventKind.TEXT and event.text.strip()) or kind in _CONTENT:
            live = True
            held.append(event)
            return held
        if kind == EventKind.STOP:
            if event.stop_reason in _RETRY_STOPS:
                _retry(flow, event.stop_reason)
                raise RetryStream("the answer was empty")
            live = True
            held.append(event)
            return held
        held.append(event)  # start, usage, block stops, blank text: nothing to show yet
        return None

    return process
