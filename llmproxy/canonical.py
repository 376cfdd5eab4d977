"""The canonical model: one request, response and stream-event shape for every wire protocol.

Codecs (``llmproxy.codecs``) translate each wire protocol to and from these types; plugins
only ever see these. They are plain slotted dataclasses rather than pydantic models because
they are built per request and per streamed event, where validation would cost more than the
proxying itself (the codecs validate what they read).

Nothing is lost: every type carries ``extra``, the wire fields the canonical model does not
know, tagged with the protocol they came from (``Request.protocol``). A codec writing the same
protocol puts them back untouched; a codec for another protocol ignores them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal, Union

Role = Literal["system", "developer", "user", "assistant", "tool"]


@dataclass(slots=True)
class TextPart:
    text: str
    extra: dict[str, Any] = field(default_factory=dict)
    type: Literal["text"] = "text"


@dataclass(slots=True)
class ImagePart:
    """An image, by URL or inline base64 ``data`` with its ``media_type``."""

    url: str | None = None
    data: str | None = None
    media_type: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    type: Literal["image"] = "image"


@dataclass(slots=True)
class FilePart:
    """A document the model reads (a PDF, say): inline base64 ``data`` with its
    ``media_type``, or a ``url``; ``name`` is its file name or title when the client gave one."""

    url: str | None = None
    data: str | None = None
    media_type: str | None = None
    name: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    type: Literal["file"] = "file"


@dataclass(slots=True)
class ToolCallPart:
    """A call the model made; ``arguments`` is the JSON text exactly as the model wrote it."""

    id: str
    name: str
    arguments: str = "{}"
    extra: dict[str, Any] = field(default_factory=dict)
    type: Literal["tool_call"] = "tool_call"


@dataclass(slots=True)
class ToolResultPart:
    tool_call_id: str
    content: list["Part"] = field(default_factory=list)
    is_error: bool = False
    name: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    type: Literal["tool_result"] = "tool_result"


@dataclass(slots=True)
class ThinkingPart:
    """Model reasoning. ``signature`` is opaque and only valid for the protocol that made it."""

    text: str = ""
    signature: str | None = None
    redacted: bool = False
    protocol: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    type: Literal["thinking"] = "thinking"


@dataclass(slots=True)
class OpaquePart:
    """A content part the canonical model has no type for, kept verbatim for ``protocol``.

    Written back untouched when the other side speaks the same protocol, dropped otherwise
    (a server tool's trace in an earlier turn, say), unless ``essential``: content the model
    must see, such as a PDF a user attached, which a backend of another protocol cannot be
    sent without (a 400 then, never a request quietly missing it). A part with a ``text``
    reading (a Responses custom tool's call or output) goes to another protocol as that text,
    so the conversation keeps what happened.
    """

    protocol: str
    data: dict[str, Any] = field(default_factory=dict)
    essential: bool = False
    text: str | None = None
    type: Literal["opaque"] = "opaque"


Part = Union[TextPart, ImagePart, FilePart, ToolCallPart, ToolResultPart, ThinkingPart, OpaquePart]


@dataclass(slots=True)
class Message:
    role: Role
    parts: list[Part] = field(default_factory=list)
    name: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        """The message's text parts joined; handy for plugins that read or match prose."""
        return "".join(p.text for p in self.parts if isinstance(p, TextPart))


@dataclass(slots=True)
class Tool:
    name: str
    description: str | None = None
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    cache_creation_input_tokens: int = 0
    reasoning_tokens: int = 0

    def add(self, other: "Usage") -> None:
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.cached_input_tokens += other.cached_input_tokens
        self.cache_creation_input_tokens += other.cache_creation_input_tokens
        self.reasoning_tokens += other.reasoning_tokens


@dataclass(slots=True)
class Request:
    """What the client asked for, whatever protocol it spoke.

    ``params`` holds sampling settings under canonical names (``temperature``, ``top_p``,
    ``max_tokens``, ``stop``, ``seed``, ``presence_penalty``, ``frequency_penalty``, ``n``,
    ``user``). ``tool_choice`` is ``"auto"``, ``"none"``, ``"required"`` or a tool name.
    ``response_format`` is ``{"type": "json_object"}`` or ``{"type": "json_schema",
    "name": ..., "schema": ..., "strict": ...}``. ``reasoning`` is ``{"effort": ...,
    "budget_tokens": ..., "summary": ..., "enabled": False, "adaptive": True}`` with whichever
    keys the client set (``enabled: False`` or effort ``"none"``: no reasoning; ``adaptive``:
    the model decides how much, as Anthropic's adaptive thinking and Gemini's budget -1).
    """

    model: str
    messages: list[Message] = field(default_factory=list)
    system: list[TextPart] = field(default_factory=list)
    tools: list[Tool] = field(default_factory=list)
    tool_choice: str | None = None
    parallel_tool_calls: bool | None = None
    params: dict[str, Any] = field(default_factory=dict)
    response_format: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    stream: bool = False
    include_usage: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)
    protocol: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def last_user_message(self) -> Message | None:
        for message in reversed(self.messages):
            if message.role == "user":
                return message
        return None


StopReason = Literal["end_turn", "max_tokens", "tool_use", "stop_sequence", "content_filter", "error"]


@dataclass(slots=True)
class Response:
    """A complete answer: the non-streamed reply, or a stream's events folded together."""

    model: str
    parts: list[Part] = field(default_factory=list)
    stop_reason: StopReason | None = "end_turn"
    usage: Usage = field(default_factory=Usage)
    id: str | None = None
    protocol: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return "".join(p.text for p in self.parts if isinstance(p, TextPart))

    @property
    def tool_calls(self) -> list[ToolCallPart]:
        return [p for p in self.parts if isinstance(p, ToolCallPart)]


class EventKind:
    """Names of canonical stream events (plain strings, so comparisons stay cheap)."""

    START = "start"  # message begins; model, id
    TEXT = "text"  # text delta at ``index``
    THINKING = "thinking"  # reasoning delta (text and/or signature) at ``index``
    TOOL_CALL_START = "tool_call_start"  # id and name of a tool call at ``index``
    TOOL_CALL_DELTA = "tool_call_delta"  # a fragment of the call's argument JSON
    BLOCK_STOP = "block_stop"  # the content block at ``index`` is complete
    USAGE = "usage"  # token counts so far
    STOP = "stop"  # the message ends with ``stop_reason``
    ERROR = "error"  # the stream fails; ``error`` holds the ProxyError


@dataclass(slots=True)
class StreamEvent:
    """One canonical stream event. Stream processors may change fields or build new ones.

    ``index`` numbers content blocks in the order they start (text, thinking and tool calls
    share one sequence), so every protocol's notion of a block or choice index maps to it.
    """

    kind: str
    index: int = 0
    text: str = ""
    id: str | None = None
    name: str | None = None
    signature: str | None = None
    stop_reason: StopReason | None = None
    usage: Usage | None = None
    model: str | None = None
    error: Any = None
    extra: dict[str, Any] | None = None


class ResponseBuilder:
    """Folds stream events into a :class:`Response` (for ``flow_done``, captures, history).

    Fragments are kept in lists and joined once in :meth:`build`: appending to a string per
    event would make folding a long stream quadratic.
    """

    __slots__ = ("response", "_blocks", "_texts", "_signatures")

    def __init__(self, model: str, protocol: str = "") -> None:
        self.response = Response(model=model, stop_reason=None, protocol=protocol)
        self._blocks: dict[int, Part] = {}
        self._texts: dict[int, list[str]] = {}  # text, tool-call arguments or thinking, per block
        self._signatures: dict[int, list[str]] = {}

    def add(self, event: StreamEvent) -> None:
        kind = event.kind
        if kind == EventKind.TEXT or kind == EventKind.TOOL_CALL_DELTA:
            index = event.index
            texts = self._texts.get(index)
            if texts is None:
                if kind == EventKind.TOOL_CALL_DELTA:
                    return  # arguments for a call that never started
                self._blocks[index] = TextPart("")
                texts = self._texts[index] = []
            texts.append(event.text)
        elif kind == EventKind.TOOL_CALL_START:
            self._blocks[event.index] = ToolCallPart(id=event.id or "", name=event.name or "", arguments="")
            self._texts[event.index] = []
        elif kind == EventKind.THINKING:
            index = event.index
            if not isinstance(self._blocks.get(index), ThinkingPart):
                self._blocks[index] = ThinkingPart(protocol=self.response.protocol)
                self._texts[index] = []
            self._texts[index].append(event.text)
            if event.signature:
                self._signatures.setdefault(index, []).append(event.signature)
        elif kind == EventKind.USAGE and event.usage is not None:
            self.response.usage = event.usage
        elif kind == EventKind.STOP:
            self.response.stop_reason = event.stop_reason
            if event.usage is not None:
                self.response.usage = event.usage
            if event.extra:  # wire fields of the stop (Anthropic's stop_sequence)
                self.response.extra.update(event.extra)
        elif kind == EventKind.START:
            if event.model:
                self.response.model = event.model
            self.response.id = event.id
        elif kind == EventKind.ERROR:
            self.response.stop_reason = "error"

    def build(self) -> Response:
        parts = []
        for index in sorted(self._blocks):
            part = self._blocks[index]
            text = "".join(self._texts.get(index, ()))
            if isinstance(part, ToolCallPart):
                part.arguments = text or "{}"
            elif isinstance(part, (TextPart, ThinkingPart)):
                part.text = text
                if isinstance(part, ThinkingPart) and index in self._signatures:
                    part.signature = "".join(self._signatures[index])
            parts.append(part)
        self.response.parts = parts
        return self.response


def response_events(response: Response) -> list[StreamEvent]:
    """A complete response as the stream of events that would have produced it."""
    events = [StreamEvent(EventKind.START, id=response.id, model=response.model)]
    for index, part in enumerate(response.parts):
        if isinstance(part, TextPart):
            events.append(StreamEvent(EventKind.TEXT, index=index, text=part.text))
        elif isinstance(part, ToolCallPart):
            events.append(StreamEvent(EventKind.TOOL_CALL_START, index=index, id=part.id, name=part.name))
            events.append(StreamEvent(EventKind.TOOL_CALL_DELTA, index=index, text=part.arguments))
        elif isinstance(part, ThinkingPart):
            events.append(StreamEvent(EventKind.THINKING, index=index, text=part.text, signature=part.signature))
        else:
            continue
        events.append(StreamEvent(EventKind.BLOCK_STOP, index=index))
    events.append(StreamEvent(EventKind.USAGE, usage=response.usage))
    stop = StreamEvent(EventKind.STOP, stop_reason=response.stop_reason or "end_turn", usage=response.usage)
    if response.extra.get("stop_sequence"):
        stop.extra = {"stop_sequence": response.extra["stop_sequence"]}
    events.append(stop)
    return events


def fingerprint(request: Request) -> str:
    """A stable hash of what a conversation says: the text of user and assistant turns, tool
    calls (name and arguments, JSON key order ignored), tool results and images — in order.

    Left out, because clients vary them between runs of the same conversation or between
    protocols: the system prompt and system/developer turns, sampling parameters, the
    offered tools, ids, reasoning, and how turns are split into messages and parts. Two
    requests with the same fingerprint ask the model the same thing (for replay, caches,
    loop detection).
    """
    items: list[list[Any]] = []
    for message in request.messages:
        if message.role in ("system", "developer"):
            continue
        side = "assistant" if message.role == "assistant" else "user"
        for part in message.parts:
            if isinstance(part, TextPart):
                text = part.text.strip()
                if not text:
                    continue
                if items and items[-1][0] == "text" and items[-1][1] == side:
                    items[-1][2] += "\n" + text
                else:
                    items.append(["text", side, text])
            elif isinstance(part, ToolCallPart):
                try:
                    arguments = json.dumps(json.loads(part.arguments or "{}"), sort_keys=True, separators=(",", ":"))
                except ValueError:
                    arguments = part.arguments.strip()
                items.append(["call", part.name, arguments])
            elif isinstance(part, ToolResultPart):
                result = "".join(p.text for p in part.content if isinstance(p, TextPart)).strip()
                items.append(["result", result])
            elif isinstance(part, (ImagePart, FilePart)):
                source = part.url or hashlib.sha256((part.data or "").encode()).hexdigest()
                items.append([part.type, source])
    data = json.dumps(items, ensure_ascii=False, separators=(",", ":")).encode()
    return hashlib.sha256(data).hexdigest()
