"""Loop detection: stop a model that repeats itself, in text or in tool calls.

Two kinds of loop, two remedies.

**Repeated text.** A model stuck in a loop writes the same passage again and again until
``max_tokens`` runs out — minutes of waiting and a bill for nothing. A stream processor feeds
the answer's text to a :class:`~llmproxy_loop_detection.text.RepeatDetector`; once the text
ends in ``repeats`` exact copies of a prose-like unit of at least ``min_unit_chars``
characters, the processor emits a short notice as text and a ``stop`` event (``end_turn``), so
the client gets a well-formed end of answer in its own protocol and llmproxy stops reading the
backend (which closes the upstream connection: the backend stops generating). A non-streamed
answer is cut after the first copy of the passage (at a sentence or line end), and the notice
appended. Legitimately
repetitive output — separators, tables, code, numbered lists, JSON arrays — does not trigger:
see :mod:`llmproxy_loop_detection.text` for why.

**Repeated tool calls.** Agents resend the conversation with every request, so the calls the
model made are in the request. When the conversation ends with ``tool_call_repeats`` turns in
a row that made the same calls (same tools, same arguments compared as JSON values — see
:mod:`llmproxy_loop_detection.tools`), within ``tool_call_window`` seconds as far as this
proxy saw, the request goes to the backend with a steering note appended as a user message
("you have made this call N times; change your approach"). If the model makes the same call
once more after that, llmproxy answers the request itself with a short text saying why it
stopped (``tool_call_action: answer``, the default) or refuses it with a 400
(``tool_call_action: error``).

Why answer rather than error by default: the text answer is a normal assistant turn in the
client's protocol (streamed if it asked for a stream), so the agent ends its turn and hands
control back to the user with the reason on screen, and the conversation stays valid for the
user's next message; an error shows up as "API Error" in agents, looks like a proxy failure,
and some clients retry it.

On by default: loops cost time and money and end only at ``max_tokens``, and the detector
only acts on verbatim repetition of prose. Which streams are watched is ``streams``:
``with_tools`` (default) watches streams of requests that offer tools — agent traffic, which
the tool-watching plugins decode anyway, so watching adds about 0.15 µs an event — and leaves
plain chat streams on the byte-for-byte pass-through path; ``all`` watches every chat stream
(each is then decoded); ``off`` none. Tool-call loops are broken whatever ``streams`` says. The
request hook reads the conversation only when the body holds tool results.

Settings: ``plugins.loop_detection`` (see :class:`LoopDetectionSettings`).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from llmproxy import Flow, ProxyError, hookimpl
from llmproxy.canonical import EventKind, Message, Response, StreamEvent, TextPart, ThinkingPart

from .text import Loop, RepeatDetector, find_loop
from .tools import Run, RunTracker, describe_calls, trailing_run

NAME = "loop_detection"
log = logging.getLogger("llmproxy.loop_detection")

# Where a request body carries tool results, in each protocol this proxy speaks (Chat
# Completions, Anthropic, Responses, Gemini). Only a cheap test before decoding the request:
# without a tool result there cannot be a tool-call loop.
_TOOL_RESULT_MARKERS = (b"tool_call_id", b"tool_use_id", b"_call_output", b"functionResponse")

_TEMPLATE_FIELDS = {
    "text_notice": {"chars": 42, "repeats": 6},
    "steering_message": {"tools": "Bash", "count": 4, "calls": 'Bash {"command":"ls"}'},
    "stop_message": {"tools": "Bash", "count": 5, "calls": 'Bash {"command":"ls"}'},
}


class LoopDetectionSettings(BaseModel):
    """``plugins.loop_detection``."""

    model_config = ConfigDict(extra="forbid")

    text: bool = Field(True, description="Stop answers whose text repeats itself, streamed or not.")
    answers: Literal["all", "with_tools"] = Field(
        "with_tools",
        description="Which non-streamed answers to check: with_tools (default) those of requests that offer tools, "
        "so a plain chat answer goes out as the backend sent it, undecoded; all: every chat answer.",
    )
    streams: Literal["all", "with_tools", "off"] = Field(
        "with_tools",
        description="Which streams to watch for text loops. with_tools (default): streams of requests that offer "
        "tools — agent traffic, which the tool-watching plugins decode anyway, so watching costs ~0.15 µs an event; "
        "all: every chat stream (each is then decoded instead of passed through as bytes); off: none.",
    )
    thinking: bool = Field(
        False,
        description="Watch reasoning (thinking) text as well. Off by default: a reasoning block cut short has no "
        "valid signature, and Anthropic refuses such a block when the client sends the conversation back.",
    )
    min_unit_chars: int = Field(
        40,
        ge=8,
        description="The shortest repeated unit, in characters. A shorter period counts as the smallest multiple of "
        "it that is this long, so short phrases must repeat more often before they count.",
    )
    repeats: int = Field(6, ge=2, description="How many exact copies of the unit in a row make a loop.")
    lookback_chars: int = Field(
        6000,
        ge=256,
        description="How much of the latest text the detector keeps; the longest unit it can see is "
        "lookback_chars / repeats.",
    )
    text_notice: str = Field(
        "\n\n[llmproxy: stopped a repeating loop: the same {chars}-character passage was written {repeats} times in a row]",
        description="Text added where a looping answer is cut. {chars} and {repeats} are filled in.",
    )
    tool_calls: bool = Field(True, description="Break tool-call loops (the same calls made turn after turn).")
    tool_call_repeats: int = Field(
        4, ge=2, description="Turns in a row with the same tool calls (same names and arguments) that make a loop."
    )
    tool_call_window: float = Field(
        600.0,
        gt=0,
        description="Seconds within which those turns must fall; slower repetition (an agent polling a build) is left alone.",
    )
    tool_call_action: Literal["answer", "error"] = Field(
        "answer",
        description="When the model repeats the call again after being steered: answer the request with stop_message "
        "as the assistant's text (the agent ends its turn), or refuse it with a 400 error carrying stop_message.",
    )
    steering_message: str = Field(
        "[llmproxy loop detection] You have made the same tool call {count} times in a row ({calls}) and it will give "
        "the same result again. Do not repeat it. Change your approach: use a different tool or different arguments, "
        "or stop and tell the user what is blocking you.",
        description="The note appended to the request as a user message when a tool-call loop is found. "
        "{count}, {tools} and {calls} are filled in.",
    )
    stop_message: str = Field(
        "[llmproxy: stopped a tool-call loop: the model made the same call ({calls}) {count} times in a row, "
        "also after being told to change its approach. Tell it what to do differently.]",
        description="What the client gets when the model goes on repeating after the steering note. "
        "{count}, {tools} and {calls} are filled in.",
    )

    @field_validator("text_notice", "steering_message", "stop_message")
    @classmethod
    def _template(cls, value: str, info: Any) -> str:
        try:
            value.format(**_TEMPLATE_FIELDS[info.field_name])
        except (KeyError, IndexError, ValueError) as error:
            fields = ", ".join("{%s}" % f for f in _TEMPLATE_FIELDS[info.field_name])
            raise ValueError(f"bad placeholder ({error}); this text may use {fields} (write {{{{ and }}}} for braces)") from None
        return value

    @model_validator(mode="after")
    def _room_for_a_loop(self) -> "LoopDetectionSettings":
        if self.lookback_chars < self.min_unit_chars * self.repeats:
            raise ValueError(
                f"lookback_chars ({self.lookback_chars}) must hold repeats x min_unit_chars "
                f"({self.repeats} x {self.min_unit_chars} = {self.min_unit_chars * self.repeats})"
            )
        return self

    def detector(self) -> RepeatDetector:
        return RepeatDetector(self.min_unit_chars, self.repeats, self.lookback_chars)

    def notice(self, loop: Loop) -> str:
        return self.text_notice.format(chars=len(loop.unit), repeats=loop.repeats)


_DEFAULTS = LoopDetectionSettings()


def _settings(flow: Flow) -> LoopDetectionSettings:
    context = flow.context
    settings = context.settings(NAME) if context is not None else None
    return settings if settings is not None else _DEFAULTS


@hookimpl
def plugin_settings() -> type[BaseModel]:
    return LoopDetectionSettings


@hookimpl
def configure(settings: Optional[LoopDetectionSettings]) -> dict[str, str]:
    s = settings or _DEFAULTS
    watches = s.text or s.thinking
    return {
        "request": "tools" if s.tool_calls else "never",  # a call can loop only where tools are offered
        "response": ("tools" if s.answers == "with_tools" else "always") if watches else "never",
        "stream_start": ("tools" if s.streams == "with_tools" else "always") if watches and s.streams != "off" else "never",
    }


# -- tool-call loops -----------------------------------------------------------------------------


@hookimpl
def request(flow: Flow) -> None:
    settings = _settings(flow)
    if not settings.tool_calls or flow.has_response or not flow.raw_request.get("tools"):
        return  # no tools offered: no tool call can loop
    if not flow.request_decoded and not any(marker in flow.raw_body for marker in _TOOL_RESULT_MARKERS):
        return
    run = trailing_run(flow.request.messages)
    if run is None:
        return
    tracker = flow.session.data.get(NAME)
    if not isinstance(tracker, RunTracker):
        tracker = flow.session.data[NAME] = RunTracker()
    now = time.time()
    seen = tracker.observe(run, now)
    if run.count < settings.tool_call_repeats:
        return
    if tracker.span(seen, run, settings.tool_call_repeats, now) > settings.tool_call_window:
        return  # the same call, but spread out: polling, not a loop
    if seen.steered_at is None or run.count <= seen.steered_at:
        seen.steered_at = run.count if seen.steered_at is None else seen.steered_at
        _steer(flow, run, settings)
    else:
        _stop(flow, run, settings)


def _fields(run: Run) -> dict[str, Any]:
    return {"tools": run.tools, "count": run.count, "calls": describe_calls(run)}


def _steer(flow: Flow, run: Run, settings: LoopDetectionSettings) -> None:
    # A user turn at the end, not a change to the system prompt: the prompt cache of
    # everything before it stays valid.
    flow.request.messages.append(Message("user", [TextPart(settings.steering_message.format(**_fields(run)))]))
    flow.note(NAME, "steered a tool-call loop", tools=run.tools, count=run.count)
    log.warning("flow %s: tool-call loop (%s, %d times in a row); steering the model", flow.id, run.tools, run.count)


def _stop(flow: Flow, run: Run, settings: LoopDetectionSettings) -> None:
    message = settings.stop_message.format(**_fields(run))
    flow.note(NAME, "stopped a tool-call loop", tools=run.tools, count=run.count, action=settings.tool_call_action)
    log.warning("flow %s: tool-call loop (%s, %d times in a row) went on after steering; stopped", flow.id, run.tools, run.count)
    if settings.tool_call_action == "error":
        raise ProxyError(400, message, code="tool_call_loop")
    flow.response = Response(model=flow.model, parts=[TextPart(message)], stop_reason="end_turn")


# -- repeated text -------------------------------------------------------------------------------


@hookimpl
def stream_start(flow: Flow) -> Optional[Callable[[Optional[StreamEvent]], Any]]:
    settings = _settings(flow)
    if not (settings.text or settings.thinking) or settings.streams == "off":
        return None
    if settings.streams == "with_tools" and not flow.raw_request.get("tools"):
        return None  # a plain chat stream keeps the pass-through path
    if flow.request_decoded and not _can_loop(flow, settings):
        return None  # stays on the pass-through path
    return watch_stream(flow, settings)


def _can_loop(flow: Flow, settings: LoopDetectionSettings) -> bool:
    """Whether this answer can hold a text loop at all, judged from the request — only when
    someone decoded it already (decoding it here would cost more than watching the stream).
    Any chat answer can carry text, except one forced to be a tool call, or one too short
    for ``repeats`` copies of ``min_unit_chars`` (a token is rarely over 16 characters)."""
    request = flow.request
    if request.tool_choice not in (None, "auto", "none") and not settings.thinking:
        return False
    limit = request.params.get("max_tokens")
    return not (isinstance(limit, int) and limit * 16 < settings.min_unit_chars * settings.repeats)


def watch_stream(flow: Flow, settings: LoopDetectionSettings) -> Callable[[Optional[StreamEvent]], Any]:
    """The stream processor: passes events through, feeding text (and, if asked, reasoning)
    to a detector per content block; at a loop it emits the notice and a ``stop`` event and
    drops everything after.

    A closure rather than an object because it runs for every event of every chat stream:
    a text event costs an append and an addition until the detector's ``step`` characters
    have come, then one look (see :mod:`llmproxy_loop_detection.text`).
    """
    watch_text = settings.text
    watch_thinking = settings.thinking
    detector = settings.detector()
    pieces = detector.pieces  # appended to here, looked at by the detector
    step = detector.step
    pending = 0
    text_index = 0
    thinking: RepeatDetector | None = None
    thinking_index = -1
    top = -1  # the highest tool-call block index seen (tracked only when watching reasoning)
    stopped = False

    def stop(loop: Loop, events: list[StreamEvent], index: int, reasoning: bool) -> list[StreamEvent]:
        nonlocal stopped
        stopped = True
        _record(flow, loop, reasoning)
        events.append(StreamEvent(EventKind.TEXT, index=index, text=settings.notice(loop)))
        events.append(StreamEvent(EventKind.STOP, stop_reason="end_turn"))
        return events

    def process(event: Optional[StreamEvent]) -> StreamEvent | list[StreamEvent] | None:
        nonlocal detector, pieces, pending, text_index, thinking, thinking_index, top
        if event is None or stopped:
            return None
        if event.kind == _TEXT and watch_text:
            if event.index != text_index:  # a new text block: a loop lives within one
                text_index = event.index
                detector = settings.detector()
                pieces = detector.pieces
                pending = 0
            text = event.text
            pieces.append(text)
            pending += len(text)
            if pending < step:
                return event
            pending = 0
            loop = detector.look()
            return event if loop is None else stop(loop, [event], event.index, False)
        if watch_thinking:
            kind = event.kind
            if kind == EventKind.TOOL_CALL_START and event.index > top:
                top = event.index
            elif kind == EventKind.THINKING and event.text:
                if event.index != thinking_index or thinking is None:
                    thinking_index = event.index
                    thinking = settings.detector()
                loop = thinking.feed(event.text)
                if loop is not None:
                    # the notice goes in a new text block after every block begun so far
                    index = max(top, text_index, event.index) + 1
                    return stop(loop, [event, StreamEvent(EventKind.BLOCK_STOP, index=event.index)], index, True)
        return event

    return process


_TEXT = EventKind.TEXT


def _record(flow: Flow, loop: Loop, thinking: bool) -> None:
    where = "reasoning" if thinking else "text"
    flow.note(NAME, f"stopped a repeating {where} loop", unit_chars=len(loop.unit), repeats=loop.repeats, unit=loop.unit[:200])
    log.warning("flow %s: %s repeats a %d-character passage %d times; stopped", flow.id, where, len(loop.unit), loop.repeats)


@hookimpl
def response(flow: Flow) -> None:
    settings = _settings(flow)
    if not (settings.text or settings.thinking):
        return
    if settings.answers == "with_tools" and not flow.raw_request.get("tools"):
        return  # reading the answer would decode it; a plain chat answer passes as it came
    answer = flow.response
    if answer is None:
        return
    shortest = settings.min_unit_chars * settings.repeats
    for position, part in enumerate(answer.parts):
        if isinstance(part, TextPart) and settings.text:
            thinking = False
        elif isinstance(part, ThinkingPart) and settings.thinking:
            thinking = True
        else:
            continue
        if len(part.text) < shortest:
            continue
        loop = find_loop(part.text, settings.min_unit_chars, settings.repeats, settings.lookback_chars)
        if loop is None:
            continue
        _record(flow, loop, thinking)
        notice = settings.notice(loop)
        part.text = part.text[: loop.cut(part.text)]
        del answer.parts[position + 1 :]
        if thinking:
            part.signature = None  # no longer the text that was signed
            answer.parts.append(TextPart(notice.lstrip()))
        else:
            part.text += notice
        answer.stop_reason = "end_turn"
        return
