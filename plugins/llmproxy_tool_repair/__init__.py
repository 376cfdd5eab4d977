"""Tool-call repair: tool calls reach the client as proper calls with arguments that parse and
fit the tool's schema.

Two things go wrong with tool calls, more with small and open models:

1. **The call is written as text.** With tools offered, the model answers
   ````` ```json {"name": "Bash", "arguments": {…}} ``` `````, ``<tool_call>{…}</tool_call>``,
   Qwen's ``<function=Bash><parameter=command>ls</parameter></function>``, ``TOOL CALL: Bash
   {…}`` or a bare ``{"tool": …, "args": …}`` (see :mod:`.textcalls`). When such text names
   an offered tool it becomes a real tool call in the client's protocol — the text around it
   stays text — and the stop reason becomes ``tool_use``.
2. **The arguments are broken JSON** (a trailing comma, a missing brace, single quotes),
   in real tool calls as much as in written ones. They are repaired with ``json-repair``.

A call llmproxy converted or repaired is then validated against the tool's JSON schema with
``jsonschema`` (``validate_calls: all`` checks every call, ``none`` none). Values Qwen's XML form
wrote as strings are first typed by the schema (``"3"`` → ``3`` for an integer).

Still invalid → ``on_invalid``:

- ``reask`` (default): llmproxy asks the backend again, once, showing the model its call and
  what was wrong (``reask_prompt``); if the second answer is still invalid the client gets a
  502 error. Non-streamed answers are re-asked with ``flow.context.resend``; a stream is
  re-asked (``RetryStream``) only while nothing of it has reached the client — this plugin
  holds the stream's first event until the first text or call is released, so an answer
  that *begins* with the bad call can be asked again — otherwise the stream ends with an
  error event;
- ``error``: a 502 error (an error event in a stream) saying which tool and why;
- ``pass``: the call goes to the client as repaired as it could be, and the flow is noted.

Streams. Only when the request offers tools (``tools`` in the wire body, not decoded) does
``stream_start`` return a processor. Text passes at once unless it could be the beginning
of a written call — a fence, a tag, a ``TOOL CALL:`` prefix, a JSON object at the start of
the answer, or a trailing piece of one (``<tool_``) — and is held only until the form is
complete or clearly is not a call. Tool calls are held until their block ends (their
arguments must be complete to be repaired), then released unchanged when they parse —
byte for byte — or replaced by the repaired call. The request's tools are decoded only when
a call must be resolved or validated.
"""

from __future__ import annotations

import json
import logging
import uuid
from functools import lru_cache
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from llmproxy import Flow, ProxyError, hookimpl
from llmproxy.canonical import EventKind, Message, Response, StreamEvent, TextPart, Tool, ToolCallPart
from llmproxy.errors import RetryStream

from .textcalls import Scanner, TextCall, find_calls, is_xml_arguments, loads_lenient

__all__ = ["ToolRepairSettings", "Repairer", "Scanner", "find_calls", "fix_arguments"]

NAME = "tool_repair"
log = logging.getLogger("llmproxy.tool_repair")
TEXT, CALL_START, CALL_DELTA, BLOCK_STOP, STOP, USAGE = (
    EventKind.TEXT, EventKind.TOOL_CALL_START, EventKind.TOOL_CALL_DELTA, EventKind.BLOCK_STOP, EventKind.STOP, EventKind.USAGE,
)

DEFAULT_REASK = (
    "Your previous answer tried to call the tool `{tool}`, but the call is not valid: {problem}. "
    "It was: {call}\nCall the tool again, as a proper tool call, with arguments that match its JSON schema."
)


class ToolRepairSettings(BaseModel):
    """``plugins.tool_repair``."""

    model_config = ConfigDict(extra="forbid")

    text_calls: bool = Field(True, description="Turn tool calls the model wrote as text (JSON blocks, <tool_call> tags, TOOL CALL: …) into real tool calls.")
    repair_arguments: bool = Field(True, description="Repair tool-call arguments that are not valid JSON (json-repair).")
    validate_calls: Literal["changed", "all", "none"] = Field(
        "changed",
        description="Which calls to validate against the tool's JSON schema: changed (converted from text or "
        "repaired), all, or none.",
    )
    on_invalid: Literal["reask", "error", "pass"] = Field(
        "reask",
        description="A call that is still invalid: reask asks the backend again once (then a 502 error), error "
        "answers with a 502 error, pass sends the call as it is and notes the flow.",
    )
    reask_prompt: str = Field(DEFAULT_REASK, description="The message added for a re-ask; {tool}, {problem} and {call} are filled in.")
    max_held_chars: int = Field(20000, ge=100, description="The most text held while it could still be a written tool call; beyond that it is released as text.")


# -- arguments --------------------------------------------------------------------------------------


class Fixed:
    """A call's arguments after :func:`fix_arguments`: ``text`` (JSON), ``changed``, ``problem``."""

    __slots__ = ("text", "changed", "problem")

    def __init__(self, text: str, changed: bool = False, problem: str | None = None) -> None:
        self.text = text
        self.changed = changed
        self.problem = problem


def fix_arguments(arguments: Any, tool: Tool | None, settings: ToolRepairSettings, converted: bool = False) -> Fixed:
    """Parse (and repair) a call's arguments — JSON text, or a dict from a written call —
    and validate them against ``tool``'s schema as the settings say."""
    changed = converted
    if isinstance(arguments, str):
        text = arguments
        try:
            value = json.loads(text) if text.strip() else {}
        except ValueError:
            if not settings.repair_arguments:
                return Fixed(text, problem="the arguments are not valid JSON")
            value = loads_lenient(text)
            if value is None:
                return Fixed(text, problem="the arguments are not JSON and could not be repaired")
            changed = True
        if isinstance(value, str) and value.strip().startswith("{"):  # JSON encoded twice
            inner = loads_lenient(value)
            if isinstance(inner, dict):
                value, changed = inner, True
    else:
        value = arguments
    if not isinstance(value, dict):
        return Fixed(arguments if isinstance(arguments, str) else json.dumps(value), problem="the arguments are not a JSON object")
    schema = tool.parameters if tool is not None else None
    if is_xml_arguments(value) and schema:
        value = _typed(value, schema)
    out = json.dumps(value, ensure_ascii=False) if changed or not isinstance(arguments, str) else arguments
    mode = settings.validate_calls
    if schema and (mode == "all" or (mode == "changed" and changed)):
        problem = schema_problem(value, schema)
        if problem is not None:
            return Fixed(out, changed, problem)
    return Fixed(out, changed)


def _typed(values: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """String values of an XML-written call, typed by the schema's property types."""
    properties = schema.get("properties") or {}
    out: dict[str, Any] = {}
    for key, value in values.items():
        kind = (properties.get(key) or {}).get("type")
        kinds = kind if isinstance(kind, list) else [kind]
        if isinstance(value, str) and "string" not in kinds and kind is not None:
            parsed = loads_lenient(value) if value.strip()[:1] in "{[" else _scalar(value.strip())
            out[key] = value if parsed is None else parsed
        else:
            out[key] = value
    return out


def _scalar(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


@lru_cache(maxsize=512)
def _validator(schema_json: str) -> Any:
    import jsonschema

    schema = json.loads(schema_json)
    cls = jsonschema.validators.validator_for(schema)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError:
        return None  # a schema jsonschema cannot use: nothing to validate against
    return cls(schema)


def schema_problem(value: Any, schema: dict[str, Any]) -> str | None:
    validator = _validator(json.dumps(schema, sort_keys=True))
    if validator is None:
        return None
    error = next(iter(validator.iter_errors(value)), None)
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path)
    return f"{error.message}" + (f" (at {where})" if where else "")


# -- per flow --------------------------------------------------------------------------------------


def _settings(flow: Flow) -> ToolRepairSettings:
    settings = flow.context.settings(NAME) if flow.context is not None else None
    return settings if isinstance(settings, ToolRepairSettings) else _DEFAULTS


_DEFAULTS = ToolRepairSettings()


def offers_tools(raw: dict[str, Any]) -> bool:
    """Does the wire body offer tools? (Every protocol names them ``tools``.)"""
    tools = raw.get("tools")
    return bool(tools) and isinstance(tools, list)


class Tools:
    """The request's tools by name, decoded on first use."""

    __slots__ = ("flow", "_by_name", "_by_lower")

    def __init__(self, flow: Flow) -> None:
        self.flow = flow
        self._by_name: dict[str, Tool] | None = None
        self._by_lower: dict[str, str] = {}

    def _load(self) -> dict[str, Tool]:
        if self._by_name is None:
            self._by_name = {tool.name: tool for tool in self.flow.request.tools}
            lower: dict[str, list[str]] = {}
            for name in self._by_name:
                lower.setdefault(name.lower(), []).append(name)
            self._by_lower = {k: v[0] for k, v in lower.items() if len(v) == 1}
        return self._by_name

    def resolve(self, name: str) -> str | None:
        """The offered tool ``name`` means: exact, else the one that differs only in case."""
        tools = self._load()
        if name in tools:
            return name
        return self._by_lower.get(name.lower())

    def get(self, name: str) -> Tool | None:
        return self._load().get(name)


def _call_id(flow: Flow) -> str:
    prefix = "toolu_" if flow.frontend == "anthropic" else "call_"
    return prefix + uuid.uuid4().hex[:24]


def _invalid_error(tool: str, problem: str) -> ProxyError:
    return ProxyError(502, f"the model's call of tool {tool!r} is not valid: {problem}", code="invalid_tool_call")


def _reask(flow: Flow, settings: ToolRepairSettings, tool: str, problem: str, written: str) -> None:
    """Add the failed call and what was wrong to ``flow.request``, for a re-ask."""
    request = flow.request
    request.messages.append(Message(role="assistant", parts=[TextPart(written or f"(a call of {tool})")]))
    prompt = settings.reask_prompt.format(tool=tool, problem=problem, call=written[:2000])
    request.messages.append(Message(role="user", parts=[TextPart(prompt)]))
    flow.metadata[NAME] = "reasked"
    flow.note(NAME, "reask", tool=tool, problem=problem)


# -- hooks ------------------------------------------------------------------------------------------


@hookimpl
def plugin_settings() -> type[BaseModel]:
    return ToolRepairSettings


@hookimpl
def configure() -> dict[str, str]:
    return {"response": "tools", "stream_start": "tools"}  # no tools offered, no tool call to repair


@hookimpl
def response(flow: Flow) -> Any:
    if not offers_tools(flow.raw_request):
        return None
    answer = flow.response
    if answer is None:
        return None
    settings = _settings(flow)
    problem = _repair_response(flow, answer, Tools(flow), settings)
    if problem is None:
        return None
    tool, why, written = problem
    if settings.on_invalid == "pass":
        flow.note(NAME, "invalid", tool=tool, problem=why)
        return None
    if settings.on_invalid == "error" or flow.metadata.get(NAME) == "reasked" or flow.context is None:
        flow.note(NAME, "invalid", tool=tool, problem=why)
        raise _invalid_error(tool, why)
    _reask(flow, settings, tool, why, written)
    return _ask_again(flow, settings)  # awaited by llmproxy: only a re-ask costs a coroutine


async def _ask_again(flow: Flow, settings: ToolRepairSettings) -> None:
    second = await flow.context.resend(flow)
    problem = _repair_response(flow, second, Tools(flow), settings)
    if problem is not None:
        flow.note(NAME, "invalid", tool=problem[0], problem=problem[1])
        raise _invalid_error(problem[0], problem[1])
    flow.response = second


def _repair_response(flow: Flow, answer: Response, tools: Tools, settings: ToolRepairSettings) -> tuple[str, str, str] | None:
    """Convert written calls and repair arguments in place; the first (tool, problem,
    written) that stays invalid, or None."""
    parts: list[Any] = []
    created = False
    first_problem = None
    has_calls = any(isinstance(p, ToolCallPart) for p in answer.parts)
    for part in answer.parts:
        if isinstance(part, ToolCallPart):
            if settings.validate_calls == "all" or not _parses(part.arguments):
                tool = tools.get(part.name) if tools.resolve(part.name) else None
                fixed = fix_arguments(part.arguments, tool, settings)
                if fixed.changed:
                    flow.note(NAME, "repaired", tool=part.name)
                    part.arguments = fixed.text
                if fixed.problem and first_problem is None:
                    first_problem = (part.name, fixed.problem, f"{part.name}({part.arguments})")
            parts.append(part)
        elif isinstance(part, TextPart) and settings.text_calls and not has_calls and part.text:
            pieces = find_calls(part.text, tools.resolve)
            if all(isinstance(piece, str) for piece in pieces):
                parts.append(part)
                continue
            for piece in pieces:
                if isinstance(piece, str):
                    if piece.strip():  # the blank lines that set a call apart go with it
                        parts.append(TextPart(piece.strip("\n").rstrip() if parts else piece.rstrip()))
                    continue
                converted = _convert(flow, piece, tools, settings)
                if converted is None:
                    parts.append(TextPart(piece.written))
                    continue
                call, problem = converted
                created = True
                parts.append(call)
                if problem and first_problem is None:
                    first_problem = (piece.name, problem, piece.written)
        else:
            parts.append(part)
    answer.parts = parts
    if created and answer.stop_reason in ("end_turn", "stop_sequence", None):
        answer.stop_reason = "tool_use"
    return first_problem


def _parses(arguments: str) -> bool:
    try:
        return isinstance(json.loads(arguments or "{}"), dict)
    except ValueError:
        return False


def _convert(flow: Flow, found: TextCall, tools: Tools, settings: ToolRepairSettings) -> tuple[ToolCallPart, str | None] | None:
    """A written call as a ToolCallPart and its problem; None when it is no call after all
    (an object without an arguments key whose other keys do not fit the schema)."""
    tool = tools.get(found.name)
    fixed = fix_arguments(found.arguments, tool, settings, converted=True)
    if not found.explicit:
        schema = tool.parameters if tool is not None else None
        if fixed.problem or (schema and schema_problem(json.loads(fixed.text), schema)):
            return None
    flow.note(NAME, "converted", tool=found.name)
    return ToolCallPart(id=_call_id(flow), name=found.name, arguments=fixed.text), fixed.problem


@hookimpl
def stream_start(flow: Flow) -> Optional["Repairer"]:
    if not offers_tools(flow.raw_request):
        return None
    return Repairer(flow, _settings(flow))


class Repairer:
    """Stream processor (one per stream): finds written calls in text, holds real calls
    until complete and repairs them, renumbers blocks when it inserts calls."""

    __slots__ = (
        "flow", "settings", "text_calls", "tools", "scanners", "calls", "head", "created", "text_open", "text_seen",
        "remap", "out_of", "identity_below", "next_out", "top",
    )

    def __init__(self, flow: Flow, settings: ToolRepairSettings) -> None:
        self.flow = flow
        self.settings = settings
        self.text_calls = settings.text_calls
        self.tools = Tools(flow)
        self.scanners: dict[int, Scanner] = {}
        self.calls: dict[int, list[StreamEvent]] = {}  # real tool calls held until their block stops
        # Events held until the first content goes out, so that a bad call at the very
        # beginning can still be asked for again; None once anything was released.
        self.head: list[StreamEvent] | None = [] if settings.on_invalid == "reask" and NAME not in flow.metadata else None
        self.created = 0
        self.text_open: dict[int, bool] = {}  # upstream text block → its current output block has text
        self.text_seen = False
        # Output block numbering: the upstream's own until a call is inserted, then remapped.
        self.remap = False
        self.out_of: dict[int, int] = {}
        self.identity_below = 0
        self.next_out = 0
        self.top = 0

    # -- numbering ----------------------------------------------------------------------------------
    def out(self, index: int) -> int:
        if not self.remap:
            if index >= self.top:
                self.top = index + 1
            return index
        o = self.out_of.get(index)
        if o is None or o < 0:
            if o is None and index < self.identity_below:
                o = index
            else:
                o = self.next_out
                self.next_out += 1
            self.out_of[index] = o
        return o

    def new_block(self) -> int:
        if not self.remap:
            self.remap = True
            self.identity_below = self.next_out = self.top
        o = self.next_out
        self.next_out += 1
        return o

    # -- the processor -----------------------------------------------------------------------------
    def __call__(self, event: Optional[StreamEvent]) -> StreamEvent | list[StreamEvent] | None:
        if event is None:
            return self.release(self.flush())
        kind = event.kind
        if kind == TEXT:
            if event.extra is not None or not self.text_calls:
                event.index = self.out(event.index)
                return self.release([event])
            index = event.index
            scanner = self.scanners.get(index)
            if scanner is None:
                scanner = self.scanners[index] = Scanner(self.tools.resolve, self.settings.max_held_chars, not self.text_seen)
            text = event.text
            if not text:
                return None
            pieces = scanner.feed(text)
            if len(pieces) == 1 and pieces[0] is text:  # the common case: the event goes on as it came
                self.text_open[index] = True
                if not self.text_seen and text.strip():
                    self.text_seen = True
                if self.remap:
                    event.index = self.out(index)
                elif index >= self.top:
                    self.top = index + 1
                return event if self.head is None else self.release([event])
            return self.release(self.emit(index, pieces)) if pieces else None
        if kind == CALL_DELTA:
            held = self.calls.get(event.index)
            if held is not None:
                held.append(event)
                return None
            event.index = self.out(event.index)
            return self.release([event])
        if kind == CALL_START:
            out = self.finish_texts(event.index)
            self.calls[event.index] = [event]
            return self.release(out) if out else None
        if kind == BLOCK_STOP:
            index = event.index
            if index in self.calls:
                return self.release(self.finish_call(index, event))
            scanner = self.scanners.get(index)
            if scanner is not None:
                out = self.emit(index, scanner.finish())
                if self.text_open.get(index):
                    self.text_open[index] = False
                    event.index = self.out(index)
                    out.append(event)
                return self.release(out) if out else None
            event.index = self.out(index)
            return self.release([event])
        if kind == STOP:
            if self.created and event.stop_reason in ("end_turn", "stop_sequence", None):
                event.stop_reason = "tool_use"
            return self.release([event], force=True)
        if kind == EventKind.START or kind == USAGE:
            if self.head is not None:
                self.head.append(event)
                return None
            return event
        if kind != EventKind.ERROR:
            event.index = self.out(event.index)
        return self.release([event], force=kind == EventKind.ERROR)

    def release(self, events: list[StreamEvent], force: bool = False) -> list[StreamEvent] | StreamEvent | None:
        """Events going out; the held head goes first, once there is content to show."""
        if self.head is not None:
            if not events and not force:
                return None
            events = [*self.head, *events]
            self.head = None
        if len(events) == 1:
            return events[0]
        return events

    def emit(self, index: int, pieces: list[Any]) -> list[StreamEvent]:
        """Text pieces and written calls of upstream text block ``index`` as events."""
        out: list[StreamEvent] = []
        for piece in pieces:
            if isinstance(piece, str):
                if not piece:
                    continue
                out.append(StreamEvent(TEXT, index=self.out(index), text=piece))
                self.text_open[index] = True
                if piece.strip():
                    self.text_seen = True
                continue
            converted = _convert(self.flow, piece, self.tools, self.settings)
            if converted is None:
                out.append(StreamEvent(TEXT, index=self.out(index), text=piece.written))
                self.text_open[index] = True
                self.text_seen = True
                continue
            call, problem = converted
            if problem is not None:
                failed = self.invalid(piece.name, problem, piece.written)
                if failed is not None:
                    return out + failed
            if self.text_open.get(index):  # close the text before the call
                out.append(StreamEvent(BLOCK_STOP, index=self.out(index)))
                self.text_open[index] = False
            position = self.new_block()
            if self.remap:
                self.out_of[index] = -1  # text after the call starts a new block
            out += [
                StreamEvent(CALL_START, index=position, id=call.id, name=call.name),
                StreamEvent(CALL_DELTA, index=position, text=call.arguments),
                StreamEvent(BLOCK_STOP, index=position),
            ]
            self.created += 1
            self.text_seen = True
        return out

    def finish_texts(self, but: int) -> list[StreamEvent]:
        """Another block begins: text held in the others is judged as it stands."""
        out: list[StreamEvent] = []
        for index, scanner in self.scanners.items():
            if index != but and scanner.holding:
                out += self.emit(index, scanner.finish())
        return out

    def finish_call(self, index: int, stop: StreamEvent | None) -> list[StreamEvent]:
        held = self.calls.pop(index)
        start = held[0]
        arguments = "".join(e.text for e in held[1:])
        mode = self.settings.validate_calls
        if mode != "all" and _parses(arguments):
            fixed = None  # the common case: sent as it came, byte for byte
        else:
            name = start.name or ""
            fixed = fix_arguments(arguments, self.tools.get(name) if self.tools.resolve(name) else None, self.settings)
            if fixed.problem is not None:
                failed = self.invalid(name, fixed.problem, f"{name}({arguments})")
                if failed is not None:
                    return failed
            if not fixed.changed:
                fixed = None
            else:
                self.flow.note(NAME, "repaired", tool=name)
        position = self.out(index)
        start.index = position
        if fixed is None:
            for event in held:
                event.index = position
            out = held
        else:
            out = [start, StreamEvent(CALL_DELTA, index=position, text=fixed.text)]
        if stop is not None:
            stop.index = position
            out.append(stop)
        return out

    def invalid(self, tool: str, problem: str, written: str) -> list[StreamEvent] | None:
        """A call that stays invalid: None to send it anyway (pass), else the events that
        replace the rest of the stream. A re-ask happens here, by raising RetryStream."""
        settings = self.settings
        if settings.on_invalid == "pass":
            self.flow.note(NAME, "invalid", tool=tool, problem=problem)
            return None
        if settings.on_invalid == "reask" and self.head is not None:
            _reask(self.flow, settings, tool, problem, written)
            raise RetryStream()
        self.flow.note(NAME, "invalid", tool=tool, problem=problem)
        return [StreamEvent(EventKind.ERROR, error=_invalid_error(tool, problem))]

    def flush(self) -> list[StreamEvent]:
        out: list[StreamEvent] = []
        for index, scanner in list(self.scanners.items()):
            if scanner.holding:
                out += self.emit(index, scanner.finish())
        for index in sorted(self.calls):
            out += self.finish_call(index, None)
        return out
