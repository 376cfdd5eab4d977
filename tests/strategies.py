"""Hypothesis strategies for the canonical model, shared by the codec property tests.

The strategies that take a wire protocol build what that protocol's own side could have
produced: reasoning signed the way it signs it, tool results with the content it allows,
reasoning settings in its own terms. Everything else (stop reasons, usage fields, text
spread over parts) is generated in full, and the normalisers in ``test_codec_properties.py``
say what each protocol cannot carry. Texts include multi-byte UTF-8, quotes, backslashes,
newlines and ``\\r\\n`` so that escaping and stream splitting are exercised.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
from hypothesis import strategies as st

from llmproxy.canonical import (
    EventKind,
    ImagePart,
    Message,
    Request,
    Response,
    StreamEvent,
    TextPart,
    ThinkingPart,
    Tool,
    ToolCallPart,
    ToolResultPart,
    Usage,
)

PROTOCOLS = ("openai_chat", "openai_responses", "anthropic", "gemini")
STOP_REASONS = ("end_turn", "max_tokens", "tool_use", "stop_sequence", "content_filter", "error")
MEDIA_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp")
# Response ids each protocol keeps (the encoders mint their own for any other shape).
ID_PREFIX = {"openai_chat": "chatcmpl-", "openai_responses": "resp_", "anthropic": "msg_", "gemini": ""}

# Multi-byte characters (2, 3 and 4 bytes in UTF-8) and the characters JSON and SSE care about.
_SPECIAL = "é€😀中\u2028\"\\\n\r\t{}[]:,"
texts = st.text(alphabet=st.one_of(st.characters(codec="utf-8"), st.sampled_from(_SPECIAL)), min_size=1, max_size=30)
short_texts = st.text(alphabet=st.one_of(st.characters(min_codepoint=32, max_codepoint=0x2FFF), st.sampled_from("😀€é")), min_size=1, max_size=12)
names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,15}", fullmatch=True)
call_ids = st.from_regex(r"call_[A-Za-z0-9]{4,12}", fullmatch=True)
signatures = st.from_regex(r"sig~[A-Za-z0-9+/]{8,40}={0,2}", fullmatch=True)  # "~" appears in nothing else generated
base64_data = st.from_regex(r"[A-Za-z0-9+/]{4,40}={0,2}", fullmatch=True)
urls = st.from_regex(r"https://[a-z]{1,10}\.example/[a-z0-9]{1,10}\.png", fullmatch=True)

# JSON values as a model writes them in tool-call arguments. Integers stay within what every
# JSON parser on the path (orjson, JavaScript clients) keeps exact.
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**53), max_value=2**53),
    st.floats(allow_nan=False, allow_infinity=False, width=64),
    short_texts,
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(short_texts, children, max_size=3)),
    max_leaves=8,
)
json_objects = st.dictionaries(short_texts, json_values, max_size=4)


@st.composite
def json_texts(draw: st.DrawFn) -> str:
    """A JSON object as a model may spell it: compact, spaced or indented."""
    value = draw(json_objects)
    style = draw(st.sampled_from(("orjson", "spaced", "indented")))
    if style == "orjson":
        return orjson.dumps(value).decode()
    if style == "spaced":
        return json.dumps(value, ensure_ascii=False)
    return json.dumps(value, ensure_ascii=draw(st.booleans()), indent=2)


@st.composite
def schemas(draw: st.DrawFn) -> dict[str, Any]:
    """A JSON Schema for tool parameters (lower-case types, as JSON Schema spells them)."""
    props = draw(st.dictionaries(names, st.sampled_from(("string", "integer", "number", "boolean")), max_size=4))
    schema: dict[str, Any] = {"type": "object", "properties": {}}
    for name, kind in props.items():
        prop: dict[str, Any] = {"type": kind}
        if draw(st.booleans()):
            prop["description"] = draw(short_texts)
        schema["properties"][name] = prop
    if props and draw(st.booleans()):
        schema["required"] = sorted(draw(st.sets(st.sampled_from(sorted(props)), min_size=1)))
    if draw(st.booleans()):
        schema["additionalProperties"] = False
    return schema


@st.composite
def tools(draw: st.DrawFn) -> Tool:
    return Tool(
        name=draw(names),
        description=draw(st.one_of(st.none(), texts)),
        parameters=draw(schemas()),
        strict=draw(st.one_of(st.none(), st.booleans())),
    )


def images() -> st.SearchStrategy[ImagePart]:
    inline = st.builds(lambda data, mt: ImagePart(data=data, media_type=mt), base64_data, st.sampled_from(MEDIA_TYPES))
    linked = st.builds(lambda url: ImagePart(url=url), urls)
    return st.one_of(inline, linked)


def text_parts() -> st.SearchStrategy[TextPart]:
    return st.builds(TextPart, texts)


@st.composite
def thinking_parts(draw: st.DrawFn, protocol: str) -> ThinkingPart:
    """Reasoning signed by ``protocol``: what a same-family backend must get back."""
    if protocol == "anthropic" and draw(st.booleans()):
        return ThinkingPart(redacted=True, signature=draw(signatures), protocol=protocol)
    if protocol == "openai_chat":  # reasoning_content: text only, never signed
        return ThinkingPart(text=draw(texts), protocol=protocol)
    return ThinkingPart(text=draw(texts), signature=draw(signatures), protocol=protocol)


@st.composite
def requests(draw: st.DrawFn, protocol: str, same: bool) -> Request:
    """A well-formed conversation: user turns, assistant turns (text, tool calls and, when
    ``same``, reasoning signed by ``protocol``), each call answered by a tool result.

    ``same`` builds the request as if the client spoke ``protocol`` too (its own reasoning
    may then be replayed); otherwise it came from another front-end.
    """
    request = Request(model="client-model", protocol=protocol if same else "")
    request.system = draw(st.lists(text_parts(), max_size=2))
    tool_list = draw(st.lists(tools(), max_size=3, unique_by=lambda t: t.name))
    request.tools = tool_list
    used_ids: set[str] = set()
    for turn in range(draw(st.integers(min_value=1, max_value=3))):
        user_parts = draw(st.lists(st.one_of(text_parts(), images()), min_size=1, max_size=3))
        request.messages.append(Message(role="user", parts=user_parts))
        if not draw(st.booleans()):
            break
        parts: list[Any] = draw(st.lists(text_parts(), max_size=2))
        calls = []
        if tool_list:
            for _ in range(draw(st.integers(min_value=0, max_value=2))):
                call_id = draw(call_ids.filter(lambda i: i not in used_ids))
                used_ids.add(call_id)
                calls.append(ToolCallPart(id=call_id, name=draw(st.sampled_from(tool_list)).name, arguments=draw(json_texts())))
        parts.extend(calls)
        if same and draw(st.booleans()):
            parts.insert(0, draw(thinking_parts(protocol)))
        if not parts:
            parts = [draw(text_parts())]
        parts = draw(st.permutations(parts))
        request.messages.append(Message(role="assistant", parts=list(parts)))
        if calls:
            results = []
            for call in calls:
                if protocol == "anthropic" and draw(st.booleans()):
                    content = draw(st.lists(st.one_of(text_parts(), images()), min_size=1, max_size=2))
                else:
                    content = draw(st.lists(st.builds(TextPart, st.one_of(st.just(""), texts)), min_size=1, max_size=2))
                results.append(ToolResultPart(tool_call_id=call.id, content=content, is_error=draw(st.booleans())))
            request.messages.append(Message(role="tool", parts=results))
    if tool_list and draw(st.booleans()):
        request.tool_choice = draw(st.sampled_from(["auto", "none", "required", *(t.name for t in tool_list)]))
    if tool_list and draw(st.booleans()):
        request.parallel_tool_calls = draw(st.booleans())
    params = request.params
    if draw(st.booleans()):
        params["temperature"] = draw(st.sampled_from((0, 0.5, 1, 1.3)))
    if draw(st.booleans()):
        params["top_p"] = draw(st.sampled_from((0.1, 0.9, 1)))
    if draw(st.booleans()):
        params["max_tokens"] = draw(st.integers(min_value=1, max_value=200_000))
    if draw(st.booleans()):
        params["stop"] = draw(st.one_of(short_texts, st.lists(short_texts, min_size=1, max_size=4)))
    fmt = draw(st.sampled_from((None, "json_object", "json_schema")))
    if fmt == "json_object":
        request.response_format = {"type": "json_object"}
    elif fmt == "json_schema":
        request.response_format = {"type": "json_schema", "name": draw(names), "schema": draw(schemas())}
        if draw(st.booleans()):
            request.response_format["strict"] = draw(st.booleans())
    if draw(st.booleans()):
        # Each protocol's own way of asking for reasoning.
        if protocol in ("openai_chat", "openai_responses"):
            request.reasoning = {"effort": draw(st.sampled_from(("low", "medium", "high")))}
        else:
            request.reasoning = {"budget_tokens": draw(st.integers(min_value=1024, max_value=32_000))}
    request.stream = draw(st.booleans())
    return request


@st.composite
def usages(draw: st.DrawFn) -> Usage:
    """Token counts with the canonical invariants: cache reads and writes are part of the
    input, reasoning is part of the output."""
    cached = draw(st.integers(min_value=0, max_value=10_000))
    created = draw(st.integers(min_value=0, max_value=10_000))
    fresh = draw(st.integers(min_value=0, max_value=100_000))
    reasoning = draw(st.integers(min_value=0, max_value=5_000))
    output = reasoning + draw(st.integers(min_value=0, max_value=50_000))
    return Usage(input_tokens=fresh + cached + created, output_tokens=output, cached_input_tokens=cached,
                 cache_creation_input_tokens=created, reasoning_tokens=reasoning)


@st.composite
def responses(draw: st.DrawFn, protocol: str) -> Response:
    """A complete answer as ``protocol``'s backend could have given it."""
    kinds = draw(st.lists(st.sampled_from(("text", "tool", "thinking")), max_size=5))
    parts: list[Any] = []
    used: set[str] = set()
    for kind in kinds:
        if kind == "text":
            parts.append(TextPart(draw(texts)))
        elif kind == "tool":
            call_id = draw(call_ids.filter(lambda i: i not in used))
            used.add(call_id)
            parts.append(ToolCallPart(id=call_id, name=draw(names), arguments=draw(json_texts())))
        else:
            parts.append(draw(thinking_parts(protocol)))
    return Response(
        model=draw(names),
        parts=parts,
        stop_reason=draw(st.sampled_from(STOP_REASONS)),
        usage=draw(usages()),
        id=ID_PREFIX[protocol] + draw(st.from_regex(r"[A-Za-z0-9]{8,20}", fullmatch=True)),
        protocol=protocol,
    )


def _fragments(draw: st.DrawFn, text: str) -> list[str]:
    """``text`` cut into 1–4 consecutive pieces (code-point boundaries)."""
    cuts = sorted(draw(st.sets(st.integers(min_value=1, max_value=max(1, len(text) - 1)), max_size=3))) if len(text) > 1 else []
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


@st.composite
def event_streams(draw: st.DrawFn, protocol: str) -> list[StreamEvent]:
    """A canonical stream in the grammar every encoder is fed: START, content blocks one
    after another (deltas then BLOCK_STOP; indexes in order), optional USAGE, STOP.

    Reasoning carries what ``protocol`` would have produced itself: an Anthropic signature
    as a trailing signature delta (or a redacted block), a Responses ``encrypted_content``
    with its item id, a Gemini ``thoughtSignature`` on the thought text; Chat reasoning is
    unsigned. Gemini tool calls may carry a ``thoughtSignature``.
    """
    E = EventKind
    events = [StreamEvent(E.START, id=ID_PREFIX[protocol] + draw(st.from_regex(r"[A-Za-z0-9]{6,12}", fullmatch=True)), model=draw(names))]
    used: set[str] = set()
    kinds = draw(st.lists(st.sampled_from(("text", "tool", "thinking")), max_size=5))
    for index, kind in enumerate(kinds):
        if kind == "text":
            for delta in draw(st.lists(texts, min_size=1, max_size=3)):
                events.append(StreamEvent(E.TEXT, index=index, text=delta))
        elif kind == "tool":
            call_id = draw(call_ids.filter(lambda i: i not in used))
            used.add(call_id)
            extra = None
            if protocol == "gemini" and draw(st.booleans()):
                extra = {"thoughtSignature": draw(signatures)}
            events.append(StreamEvent(E.TOOL_CALL_START, index=index, id=call_id, name=draw(names), extra=extra))
            for fragment in _fragments(draw, draw(json_texts())):
                events.append(StreamEvent(E.TOOL_CALL_DELTA, index=index, text=fragment))
        else:
            deltas = draw(st.lists(texts, min_size=1, max_size=3))
            if protocol == "anthropic":
                if draw(st.booleans()):
                    events.append(StreamEvent(E.THINKING, index=index, signature=draw(signatures), extra={"redacted": True}))
                else:
                    events.extend(StreamEvent(E.THINKING, index=index, text=d) for d in deltas)
                    if draw(st.booleans()):
                        events.append(StreamEvent(E.THINKING, index=index, signature=draw(signatures)))
            elif protocol == "openai_responses":
                item = {"id": "rs_" + draw(st.from_regex(r"[a-z0-9]{8}", fullmatch=True))}
                events.extend(StreamEvent(E.THINKING, index=index, text=d, extra=item) for d in deltas)
                if draw(st.booleans()):
                    events.append(StreamEvent(E.THINKING, index=index, signature=draw(signatures), extra=item))
            elif protocol == "gemini":
                signed = draw(st.booleans())
                for i, delta in enumerate(deltas):
                    last = i == len(deltas) - 1
                    events.append(StreamEvent(E.THINKING, index=index, text=delta, signature=draw(signatures) if signed and last else None))
            else:
                events.extend(StreamEvent(E.THINKING, index=index, text=d) for d in deltas)
        events.append(StreamEvent(E.BLOCK_STOP, index=index))
    usage = draw(usages())
    if draw(st.booleans()):
        events.append(StreamEvent(E.USAGE, usage=usage))
    events.append(StreamEvent(E.STOP, stop_reason=draw(st.sampled_from(STOP_REASONS)), usage=usage))
    return events


@st.composite
def batches(draw: st.DrawFn, events: list[StreamEvent]) -> list[list[StreamEvent]]:
    """``events`` grouped into consecutive batches, as upstream reads would group them."""
    cuts = sorted(draw(st.sets(st.integers(min_value=1, max_value=max(1, len(events) - 1)), max_size=4)))
    bounds = [0, *cuts, len(events)]
    return [events[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


@st.composite
def splits(draw: st.DrawFn, data: bytes, max_pieces: int = 40) -> list[bytes]:
    """``data`` cut at arbitrary byte offsets (inside UTF-8 sequences and CRLFs included)."""
    if len(data) < 2:
        return [data]
    cuts = sorted(draw(st.sets(st.integers(min_value=1, max_value=len(data) - 1), max_size=max_pieces)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]
