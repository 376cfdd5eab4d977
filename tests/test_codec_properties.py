"""Property tests for the wire-protocol codecs: nothing is lost on the way through one.

1. Round trips, canonical → wire → canonical, for every protocol codec in both directions
   it is used in: requests (``encode_request`` then ``decode_request``), complete responses
   (``encode_response`` then ``decode_response``) and streams (``stream_encoder`` then
   ``stream_decoder``, both sides folded with ``ResponseBuilder``).
2. Stream framing: a stream cut at any byte offsets, with CRLF or CR line ends, comment,
   ``id:``/``retry:`` and ``event:`` lines, parses to exactly the events of the plain stream.
3. The real client captures (``/work/shared/clients/captures``): each same-protocol request
   body survives decode → encode unchanged, and translating it to every other protocol keeps
   its turns, tool names, tool-call ids and the last user text.

A protocol that cannot carry something is not a bug: each normaliser below maps a canonical
value to what that protocol can say, with a comment saying why (and nothing else). They are
applied to both sides of each comparison and are idempotent, so all they erase is what the
protocol has no way to say.
"""

from __future__ import annotations

import copy
import glob
import json
import mimetypes
import os
import re
import urllib.parse
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import strategies as S
from llmproxy.canonical import (
    EventKind,
    ImagePart,
    Message,
    OpaquePart,
    Request,
    Response,
    ResponseBuilder,
    StreamEvent,
    TextPart,
    ThinkingPart,
    ToolCallPart,
    ToolResultPart,
    Usage,
)
from llmproxy.codecs import get_codec
from llmproxy.codecs.base import SSESplitter
from llmproxy.testing import build_flow

PROTOCOLS = S.PROTOCOLS
PAIRS = [pytest.param(a, b, id=f"{a}-to-{b}") for a in PROTOCOLS for b in PROTOCOLS if a != b]
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
QUICK = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# What Anthropic's encoder adds to the system prompt for a JSON-object request (it has no such mode).
ANTHROPIC_JSON_NOTE = "Respond with a single JSON object and nothing else."


def _args(arguments: str) -> Any:
    """Tool-call arguments compared as parsed JSON: every protocol but the two OpenAI ones
    carries them as an object, so spacing and key order are not the model's any more."""
    return json.loads(arguments) if arguments else {}


# == requests ===============================================================================


def roundtrip_request(request: Request, protocol: str) -> tuple[dict[str, Any], Request]:
    codec = get_codec(protocol)
    wire = codec.encode_request(copy.deepcopy(request), "wire-model")
    wire = orjson.loads(orjson.dumps(wire))  # what actually crosses the network
    body = dict(wire)
    if protocol == "gemini":
        # Gemini's model and stream flag live in the URL; the front-end injects them.
        assert "model" not in wire and "stream" not in wire
        body.update(model="wire-model", stream=request.stream)
    else:
        assert wire["model"] == "wire-model"
    return wire, codec.decode_request(body)


def _norm_part(part: Any, protocol: str) -> Any:
    if isinstance(part, TextPart):
        return ("text", part.text)
    if isinstance(part, ImagePart):
        if part.url is not None:
            # Gemini's fileData always names a mime type: where a client gave none, llmproxy
            # names the one of the URL's extension, so that one says no more than None.
            guessed = mimetypes.guess_type(urllib.parse.urlsplit(part.url).path)[0]
            media = None if protocol == "gemini" and part.media_type in (None, guessed) else part.media_type
            return ("image-url", part.url, media)
        return ("image-data", part.data, part.media_type)
    if isinstance(part, ToolCallPart):
        return ("call", part.id, part.name, _args(part.arguments))
    if isinstance(part, ThinkingPart):
        return ("thinking", part.text, part.signature, part.redacted)
    if isinstance(part, OpaquePart):
        return ("opaque", part.protocol, part.data)
    raise AssertionError(f"unexpected part {part!r}")


def _join_texts(parts: list[Any]) -> list[Any]:
    """Text-only content as one string (what the OpenAI-style encoders send)."""
    if parts and all(p[0] == "text" for p in parts):
        return [("text", "".join(p[1] for p in parts))]
    return parts


def _norm_result(part: ToolResultPart, protocol: str) -> Any:
    content = [_norm_part(p, protocol) for p in part.content]
    is_error = part.is_error
    if protocol == "anthropic":
        # The Messages API refuses empty text blocks, so an empty text is left out.
        return ("result", part.tool_call_id, [p for p in content if p != ("text", "")], is_error)
    # The other three carry a result as one string (Gemini: {"output"|"error": text}).
    text = "".join(p[1] for p in content if p[0] == "text")
    if protocol == "openai_chat" and is_error:
        # No error flag in Chat Completions: the encoder says so in the text instead.
        text = text if text.lower().startswith("error") else f"Error: {text}"
        is_error = False
    elif protocol == "openai_responses" and is_error:
        # Nor in function_call_output.
        text, is_error = f"Error: {text}", False
    return ("result", part.tool_call_id, text, is_error)


def _norm_message(message: Message, protocol: str) -> tuple[str, list[Any]]:
    if message.role == "tool":
        return ("tool", [_norm_result(p, protocol) for p in message.parts])
    parts = [_norm_part(p, protocol) for p in message.parts]
    if protocol == "openai_chat":
        # A Chat message is reasoning_content, then content (one string when it is text
        # only), then tool_calls: parts come back in that order, texts joined.
        thinking = [("thinking", "".join(p[1] for p in parts if p[0] == "thinking"), None, False)] if any(p[0] == "thinking" for p in parts) else []
        content = _join_texts([p for p in parts if p[0] in ("text", "image-url", "image-data")])
        parts = thinking + content + [p for p in parts if p[0] == "call"]
    return (message.role, parts)


def _norm_messages(messages: list[Message], protocol: str) -> list[Any]:
    out: list[Any] = []
    for message in messages:
        role, parts = _norm_message(message, protocol)
        if role == "tool" and out and out[-1][0] == "tool":
            # Chat sends one tool message per result: a run of them is one set of results.
            out[-1] = ("tool", out[-1][1] + parts)
        else:
            out.append((role, parts))
    return out


def _unsigned_tool_turn(messages: list[Message]) -> bool:
    """Does the last assistant message call tools without opening with signed Anthropic
    thinking? (The generated parts are all ones the Anthropic encoder writes.)"""
    for message in reversed(messages):
        if message.role == "assistant":
            if not any(isinstance(p, ToolCallPart) for p in message.parts):
                return False
            first = message.parts[0]
            return not (isinstance(first, ThinkingPart) and first.protocol == "anthropic" and first.signature)
    return False


def norm_request(request: Request, protocol: str, same: bool) -> dict[str, Any]:
    """The fields of ``request`` that ``protocol`` carries, spelled as it carries them."""
    system = [p.text for p in request.system]
    tools = [{"name": t.name, "description": t.description, "parameters": t.parameters, "strict": t.strict} for t in request.tools]
    params = {k: v for k, v in request.params.items() if not k.startswith("_")}
    tool_choice = request.tool_choice
    parallel = request.parallel_tool_calls
    response_format = copy.deepcopy(request.response_format)
    reasoning = copy.deepcopy(request.reasoning)

    if protocol == "openai_responses":
        params.pop("stop", None)  # the Responses API has no stop sequences
        for tool in tools:
            if tool["strict"] is None and not same:
                tool["strict"] = False  # Responses makes functions strict unless told: say no
        if reasoning and reasoning.get("effort") and not same:
            reasoning.setdefault("summary", "auto")  # llmproxy asks for the summaries it can relay

    elif protocol == "anthropic":
        if not same and len(system) > 1:
            system = ["\n\n".join(system)]  # a plain string system prompt
        if response_format and response_format["type"] == "json_object":
            # No JSON-object mode: a sentence in the system prompt asks for one instead.
            system = ["\n\n".join([*system, ANTHROPIC_JSON_NOTE])] if len(system) <= 1 else [*system, ANTHROPIC_JSON_NOTE]
            response_format = None
        elif response_format:
            # output_config.format has a schema only: no name, no strict flag.
            response_format = {"type": "json_schema", "name": "response", "schema": response_format["schema"]}
        for tool in tools:
            if not same:
                tool["strict"] = None  # Anthropic's strict is only echoed to Anthropic
        if isinstance(params.get("stop"), str):
            params["stop"] = [params["stop"]]  # stop_sequences is always a list
        params.setdefault("max_tokens", 8192)  # required by the API: llmproxy's default
        forced = tool_choice is not None and tool_choice not in ("auto", "none") and bool(request.tools or same)
        if reasoning and reasoning.get("budget_tokens") and forced:
            # The API refuses thinking with a forced tool choice (tool_choice any/tool): the
            # tool choice is kept, thinking goes.
            reasoning = None
        if reasoning and reasoning.get("budget_tokens") and _unsigned_tool_turn(request.messages):
            # Mid tool loop, thinking needs the last assistant turn to open with Anthropic's
            # signed thinking block; without one the request goes without thinking (the
            # API's own advice in its 400).
            reasoning = None
        if reasoning and reasoning.get("budget_tokens"):
            params.pop("temperature", None)  # refused together with thinking
            if params["max_tokens"] <= reasoning["budget_tokens"]:
                params["max_tokens"] += reasoning["budget_tokens"]  # room for the answer
        # Parallel calls can only be switched off (disable_parallel_tool_use), and not
        # together with tool_choice none; "auto" is what "no choice" means.
        if parallel is False and tool_choice is None:
            tool_choice = "auto"
        if parallel is True or tool_choice == "none":
            parallel = None

    elif protocol == "gemini":
        for tool in tools:
            tool["strict"] = None  # functionDeclarations have no strict flag
        if isinstance(params.get("stop"), str):
            params["stop"] = [params["stop"]]  # stopSequences is always a list
        if response_format and response_format["type"] == "json_schema":
            # responseJsonSchema has a schema only: no name, no strict flag.
            response_format = {"type": "json_schema", "name": "response", "schema": response_format["schema"]}
        if reasoning and reasoning.get("budget_tokens"):
            reasoning.setdefault("summary", "auto")  # includeThoughts, so summaries reach the client
        parallel = None  # no such setting

    return {
        "system": system,
        "messages": _norm_messages(request.messages, protocol),
        "tools": tools,
        "tool_choice": tool_choice,
        "parallel_tool_calls": parallel,
        "params": params,
        "response_format": response_format,
        "reasoning": reasoning,
        "stream": request.stream,
    }


@pytest.mark.parametrize("same", [False, True], ids=["from-other-protocol", "same-protocol"])
@pytest.mark.parametrize("protocol", PROTOCOLS)
@FAST
@given(data=st.data())
def test_request_roundtrip(protocol: str, same: bool, data: st.DataObject) -> None:
    request = data.draw(S.requests(protocol, same))
    wire, back = roundtrip_request(request, protocol)
    assert norm_request(back, protocol, same) == norm_request(request, protocol, same), json.dumps(wire, indent=1, ensure_ascii=False)[:4000]


@pytest.mark.parametrize("source,target", PAIRS)
@QUICK
@given(data=st.data())
def test_foreign_reasoning_never_forwarded(source: str, target: str, data: st.DataObject) -> None:
    """Reasoning signed by one family reaches a backend of that family only: a signature is
    only valid where it was made, and an unsigned thinking block would be refused."""
    request = data.draw(S.requests(source, same=True))
    thinking = [p for m in request.messages for p in m.parts if isinstance(p, ThinkingPart)]
    _, back = roundtrip_request(request, target)
    for message in back.messages:
        for part in message.parts:
            assert not isinstance(part, ThinkingPart), part
    wire = json.dumps(get_codec(target).encode_request(copy.deepcopy(request), "m"), ensure_ascii=False)
    for part in thinking:
        if part.signature:
            assert part.signature not in wire


# == complete responses =====================================================================


def norm_response(response: Response, protocol: str) -> dict[str, Any]:
    parts = [_norm_part(p, protocol) for p in response.parts]
    usage = response.usage
    stop = response.stop_reason
    calls = any(p[0] == "call" for p in parts)
    if protocol == "openai_chat":
        # reasoning_content, content (one string), tool_calls; no signatures.
        thinking = "".join(p[1] for p in parts if p[0] == "thinking")
        text = "".join(p[1] for p in parts if p[0] == "text")
        parts = ([("thinking", thinking, None, False)] if thinking else []) + ([("text", text)] if text else []) + [p for p in parts if p[0] == "call"]
        stop = {"stop_sequence": "end_turn", "error": "end_turn"}.get(stop, stop)  # finish_reason "stop"
        if stop == "end_turn" and calls:  # calls under "stop" (Ollama's way) are a tool_use turn
            stop = "tool_use"
        usage = Usage(usage.input_tokens, usage.output_tokens, usage.cached_input_tokens, 0, usage.reasoning_tokens)  # cache writes: Anthropic's only
    elif protocol == "openai_responses":
        merged: list[Any] = []
        for p in parts:  # consecutive texts are one message item
            if p[0] == "text" and merged and merged[-1][0] == "text":
                merged[-1] = ("text", merged[-1][1] + p[1])
            else:
                merged.append(p)
        parts = merged
        # status is completed or incomplete(+reason); the rest is read off the output.
        if stop not in ("max_tokens", "content_filter"):
            stop = "tool_use" if calls else "end_turn"
        usage = Usage(usage.input_tokens, usage.output_tokens, usage.cached_input_tokens, 0, usage.reasoning_tokens)  # cache writes: Anthropic's only
    elif protocol == "anthropic":
        stop = "end_turn" if stop == "error" else stop  # no error stop reason
        usage = Usage(usage.input_tokens, usage.output_tokens, usage.cached_input_tokens, usage.cache_creation_input_tokens, 0)  # no reasoning count
    elif protocol == "gemini":
        # A candidate needs a part: an empty answer is one empty text part.
        parts = [p for p in parts if p != ("text", "")]
        # finishReason STOP covers end_turn, tool_use and stop_sequence; tool use is read
        # off the function calls; "error" becomes OTHER, which no Gemini client reads.
        if stop in ("end_turn", "tool_use", "stop_sequence", "error"):
            stop = "tool_use" if calls else "end_turn"
        usage = Usage(usage.input_tokens, usage.output_tokens, usage.cached_input_tokens, 0, usage.reasoning_tokens)  # cache writes: Anthropic's only
    return {"model": response.model, "id": response.id, "parts": parts, "stop_reason": stop, "usage": usage}


@pytest.mark.parametrize("protocol", PROTOCOLS)
@FAST
@given(data=st.data())
def test_response_roundtrip(protocol: str, data: st.DataObject) -> None:
    response = data.draw(S.responses(protocol))
    codec = get_codec(protocol)
    wire = orjson.loads(orjson.dumps(codec.encode_response(copy.deepcopy(response), None)))
    back = codec.decode_response(wire)
    assert norm_response(back, protocol) == norm_response(response, protocol), json.dumps(wire, indent=1, ensure_ascii=False)[:4000]


# == streams ================================================================================

# What a client of each protocol sends, so that stream_encoder(flow) sees a real flow.
CLIENT_BODIES: dict[str, dict[str, Any]] = {
    "openai_chat": {"model": "client-model", "messages": [{"role": "user", "content": "hi"}], "stream": True, "stream_options": {"include_usage": True}},
    "openai_responses": {"model": "client-model", "input": "hi", "stream": True},
    "anthropic": {"model": "client-model", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}], "stream": True},
    "gemini": {"model": "client-model", "stream": True, "contents": [{"role": "user", "parts": [{"text": "hi"}]}]},
}
CLIENT_BODIES["gemini_array"] = CLIENT_BODIES["gemini"]


def encode_stream(protocol: str, batches: list[list[StreamEvent]]) -> bytes:
    encoder = get_codec(protocol).stream_encoder(build_flow(copy.deepcopy(CLIENT_BODIES[protocol]), protocol))
    return b"".join(encoder.encode(copy.deepcopy(batch)) for batch in batches)


def decode_stream(protocol: str, pieces: list[bytes]) -> list[StreamEvent]:
    decoder = get_codec(protocol).stream_decoder()
    events: list[StreamEvent] = []
    for piece in pieces:
        events.extend(decoder.feed(piece))
    events.extend(decoder.close())
    return events


def fold(events: list[StreamEvent]) -> Response:
    builder = ResponseBuilder("folded")
    for event in events:
        builder.add(copy.deepcopy(event))
    return builder.build()


def norm_folded(response: Response, protocol: str) -> dict[str, Any]:
    parts = [_norm_part(p, protocol) for p in response.parts]
    usage = response.usage
    stop = response.stop_reason
    calls = any(p[0] == "call" for p in parts)
    if protocol == "openai_chat":
        # A choice has one content string and one reasoning string, however many blocks
        # they came in: each is kept where it first appeared. No signatures.
        out: list[Any] = []
        seen: dict[str, int] = {}
        for p in parts:
            if p[0] in ("text", "thinking"):
                if p[0] in seen:
                    prev = out[seen[p[0]]]
                    out[seen[p[0]]] = (p[0], prev[1] + p[1], *((None, False) if p[0] == "thinking" else ()))
                    continue
                seen[p[0]] = len(out)
                p = (p[0], p[1], *((None, False) if p[0] == "thinking" else ()))
            out.append(p)
        parts = out
        stop = {"stop_sequence": "end_turn", "error": "end_turn"}.get(stop, stop)
        if stop == "end_turn" and calls:  # calls under "stop" (Ollama's way) are a tool_use turn
            stop = "tool_use"
        usage = Usage(usage.input_tokens, usage.output_tokens, usage.cached_input_tokens, 0, usage.reasoning_tokens)  # cache writes: Anthropic's only
    elif protocol == "openai_responses":
        if stop not in ("max_tokens", "content_filter"):
            stop = "tool_use" if calls else "end_turn"
        usage = Usage(usage.input_tokens, usage.output_tokens, usage.cached_input_tokens, 0, usage.reasoning_tokens)  # cache writes: Anthropic's only
    elif protocol == "anthropic":
        stop = "end_turn" if stop == "error" else stop
        usage = Usage(usage.input_tokens, usage.output_tokens, usage.cached_input_tokens, usage.cache_creation_input_tokens, 0)  # no reasoning count
    elif protocol == "gemini":
        # Gemini streams parts, not blocks: adjacent text (or thought) parts are one block.
        out = []
        for p in parts:
            if out and p[0] in ("text", "thinking") and out[-1][0] == p[0]:
                prev = out[-1]
                if p[0] == "text":
                    out[-1] = ("text", prev[1] + p[1])
                else:
                    out[-1] = ("thinking", prev[1] + p[1], (prev[2] or "") + (p[2] or "") or None, False)
            else:
                out.append(p)
        parts = out
        if stop in ("end_turn", "tool_use", "stop_sequence", "error"):
            stop = "tool_use" if calls else "end_turn"
        usage = Usage(usage.input_tokens, usage.output_tokens, usage.cached_input_tokens, 0, usage.reasoning_tokens)  # cache writes: Anthropic's only
    return {"model": response.model, "id": response.id, "parts": parts, "stop_reason": stop, "usage": usage}


def _call_signatures(events: list[StreamEvent]) -> list[Any]:
    return [(e.id, (e.extra or {}).get("thoughtSignature")) for e in events if e.kind == EventKind.TOOL_CALL_START]


@pytest.mark.parametrize("protocol", PROTOCOLS)
@FAST
@given(data=st.data())
def test_stream_roundtrip(protocol: str, data: st.DataObject) -> None:
    events = data.draw(S.event_streams(protocol))
    wire = encode_stream(protocol, data.draw(S.batches(events)))
    decoded = decode_stream(protocol, [wire])
    assert norm_folded(fold(decoded), protocol) == norm_folded(fold(events), protocol), wire.decode(errors="replace")[:4000]
    assert [e.kind for e in decoded][:1] == [EventKind.START] and decoded[-1].kind == EventKind.STOP
    if protocol == "gemini":
        # thoughtSignatures on function calls must come back with the call they signed.
        assert _call_signatures(decoded) == _call_signatures(events)


@pytest.mark.parametrize("source,target", PAIRS)
@QUICK
@given(data=st.data())
def test_stream_cross_protocol(source: str, target: str, data: st.DataObject) -> None:
    """A stream from one protocol's backend, written for another protocol's client, keeps
    text, reasoning text, tool calls, stop reason and usage (as far as ``target`` carries
    them). Signatures are the source family's and are compared by the same-protocol test."""
    events = data.draw(S.event_streams(source))
    decoded = decode_stream(target, [encode_stream(target, data.draw(S.batches(events)))])

    def unsigned(response: Response) -> dict[str, Any]:
        for part in response.parts:
            if isinstance(part, ThinkingPart):
                part.signature = None
        # Reasoning with no text (redacted, or only a signature) has nothing to show.
        response.parts = [p for p in response.parts if not (isinstance(p, ThinkingPart) and not p.text)]
        folded = norm_folded(response, target)
        folded["id"] = None  # ids are only kept when they have the target's shape
        return folded

    assert unsigned(fold(decoded)) == unsigned(fold(events))


@FAST
@given(data=st.data())
def test_gemini_array_stream(data: st.DataObject) -> None:
    """``streamGenerateContent`` without ``alt=sse`` is one JSON array of chunks."""
    events = data.draw(S.event_streams("gemini"))
    wire = encode_stream("gemini_array", data.draw(S.batches(events)))
    chunks = json.loads(wire)
    assert isinstance(chunks, list) and chunks
    back = get_codec("gemini").decode_response(chunks)
    # Each chunk needs a part, so one without content carries an empty text (see norm_response).
    back.parts = [p for p in back.parts if not (isinstance(p, TextPart) and not p.text)]
    assert norm_folded(back, "gemini") == norm_folded(fold(events), "gemini")


# == stream framing =========================================================================


def _frames(data: bytes) -> list[list[bytes]]:
    """An encoder's output as frames of lines (every encoder ends frames with a blank line)."""
    text = data.replace(b"\r\n", b"\n")
    return [frame.split(b"\n") for frame in text.split(b"\n\n") if frame]


@st.composite
def reframed(draw: st.DrawFn, data: bytes, protocol: str) -> bytes:
    """The same stream as another server could frame it: LF, CRLF or CR line ends (mixed
    per line, too), ``event:`` lines added or left out, ``data:`` with or without its space,
    a payload over two ``data:`` lines, comment, ``id:`` and ``retry:`` lines, and
    comment-only frames (keep-alives)."""
    eols = draw(st.lists(st.sampled_from((b"\n", b"\r\n", b"\r")), min_size=1, max_size=3))
    out: list[bytes] = []

    def line(value: bytes) -> None:
        eol = draw(st.sampled_from(eols))
        if not value and eol == b"\n" and out and out[-1].endswith(b"\r"):
            eol = b"\r\n"  # CR then a lone LF would be one CRLF, not a blank line
        out.append(value + eol)

    if draw(st.booleans()):
        line(b": stream opened")
        line(b"")
    for frame in _frames(data):
        if draw(st.integers(0, 4)) == 0:
            line(b":" + draw(st.sampled_from((b"", b" ping", b" keep-alive \xc3\xa9"))))
            line(b"")
        for value in frame:
            if value.startswith(b"event:"):
                if protocol in ("anthropic", "openai_responses") and draw(st.integers(0, 3)) == 0:
                    continue  # event names are also in the payload's "type"
                line(value)
                continue
            if draw(st.integers(0, 5)) == 0:
                line(draw(st.sampled_from((b": comment", b"id: 42", b"retry: 1000", b":"))))
            if value.startswith(b"data: ") and protocol in ("openai_chat", "gemini") and draw(st.integers(0, 4)) == 0:
                line(b"event: message")
            if value.startswith(b"data: {") and draw(st.integers(0, 3)) == 0:
                # One payload in two data lines (joined by a newline, which JSON reads as
                # whitespace after the opening brace).
                line(b"data: {")
                value = b"data: " + value[7:]
            if value.startswith(b"data: ") and draw(st.booleans()):
                value = b"data:" + value[6:]
            line(value)
        line(b"")
    return b"".join(out)


@pytest.mark.parametrize("protocol", PROTOCOLS)
@FAST
@given(data=st.data())
def test_stream_split_anywhere(protocol: str, data: st.DataObject) -> None:
    """Any framing, cut into any pieces, decodes to exactly the events of the plain stream."""
    events = data.draw(S.event_streams(protocol))
    wire = encode_stream(protocol, [events])
    expected = decode_stream(protocol, [wire])
    variant = data.draw(reframed(wire, protocol))
    assert decode_stream(protocol, [variant]) == expected
    pieces = data.draw(S.splits(variant))
    assert b"".join(pieces) == variant
    assert decode_stream(protocol, pieces) == expected


# A fixed stream per protocol with every block kind, multi-byte text and split-worthy JSON.
_SAMPLE_EVENTS = [
    StreamEvent(EventKind.START, id="x", model="mödel-😀"),
    StreamEvent(EventKind.THINKING, index=0, text="Thinking about “€” and 中文…"),
    StreamEvent(EventKind.BLOCK_STOP, index=0),
    StreamEvent(EventKind.TEXT, index=1, text="Héllo 😀 wörld\r\n"),
    StreamEvent(EventKind.TEXT, index=1, text=" — ünïcode ✓"),
    StreamEvent(EventKind.BLOCK_STOP, index=1),
    StreamEvent(EventKind.TOOL_CALL_START, index=2, id="call_1", name="shell"),
    StreamEvent(EventKind.TOOL_CALL_DELTA, index=2, text='{"command": "echo '),
    StreamEvent(EventKind.TOOL_CALL_DELTA, index=2, text='ünï 😀"}'),
    StreamEvent(EventKind.BLOCK_STOP, index=2),
    StreamEvent(EventKind.USAGE, usage=Usage(12, 7, 3, 0, 2)),
    StreamEvent(EventKind.STOP, stop_reason="tool_use", usage=Usage(12, 7, 3, 0, 2)),
]


@pytest.mark.parametrize("multiline", [False, True], ids=["one-data-line", "two-data-lines"])
@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"], ids=["LF", "CRLF", "CR"])
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_stream_split_at_every_offset(protocol: str, eol: bytes, multiline: bool) -> None:
    """Exhaustively: the sample stream cut in two at every byte offset (so inside every
    multi-byte character and every CRLF) parses to the events of the whole."""
    wire = encode_stream(protocol, [_SAMPLE_EVENTS]).replace(b"\r\n", b"\n")
    if multiline:
        wire = wire.replace(b"data: {", b"data: {\ndata: ")
    wire = wire.replace(b"\n", eol)
    assert "😀".encode() in wire and (eol != b"\r\n" or b"\r\n\r\n" in wire)
    expected = decode_stream(protocol, [wire])
    assert norm_folded(fold(expected), protocol)["parts"]  # the sample really decodes to something
    for offset in range(1, len(wire)):
        assert decode_stream(protocol, [wire[:offset], wire[offset:]]) == expected, offset
    assert decode_stream(protocol, [bytes([b]) for b in wire]) == expected  # one byte at a time


# -- the SSE splitter on its own ------------------------------------------------------------

_field_values = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=12)


@st.composite
def sse_streams(draw: st.DrawFn) -> bytes:
    """Arbitrary SSE: frames of data (several lines, too), event, id, retry and comment
    lines, each line ended by LF, CRLF or CR, frames separated by blank lines."""
    out: list[bytes] = []
    for _ in range(draw(st.integers(0, 5))):
        for _ in range(draw(st.integers(1, 4))):
            kind = draw(st.sampled_from(("data", "data", "event", "comment", "id", "retry")))
            value = draw(_field_values).encode()
            if kind == "data":
                raw = b"data:" + draw(st.sampled_from((b"", b" "))) + value
            elif kind == "event":
                raw = b"event: " + draw(st.from_regex(r"[a-z][a-z_.]{0,10}", fullmatch=True)).encode()
            elif kind == "comment":
                raw = b":" + value
            else:
                raw = kind.encode() + b": " + value
            out.append(raw + draw(st.sampled_from((b"\n", b"\r\n", b"\r"))))
        out.append(draw(st.sampled_from((b"\n", b"\r\n", b"\r"))))
    return b"".join(out)


def _reference_frames(data: bytes) -> list[tuple[str | None, bytes]]:
    """The SSE spec's line and field rules, written the slow obvious way."""
    frames = []
    event: str | None = None
    lines: list[bytes] | None = None
    for raw in re.split(rb"\r\n|\r|\n", data) + [b""]:
        if raw == b"":
            if lines is not None or event is not None:
                frames.append((event, b"\n".join(lines or [])))
            event, lines = None, None
            continue
        if raw.startswith(b"data:"):
            value = raw[5:]
            (lines := lines if lines is not None else []).append(value[1:] if value.startswith(b" ") else value)
        elif raw.startswith(b"event:"):
            event = raw[6:].strip().decode()
    return frames


def _split_frames(pieces: list[bytes]) -> list[tuple[str | None, bytes]]:
    splitter = SSESplitter()
    frames = []
    for piece in pieces:
        frames.extend(splitter.feed(piece))
    return frames + splitter.close()


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_sse_splitter_any_split(data: st.DataObject) -> None:
    stream = data.draw(sse_streams())
    expected = _reference_frames(stream)
    assert _split_frames([stream]) == expected
    assert _split_frames(data.draw(S.splits(stream))) == expected


# == the real client captures ===============================================================

CAPTURES = "/work/shared/clients/captures"


def _protocol_for(path: str) -> str | None:
    if path == "/v1/messages":
        return "anthropic"
    if path == "/v1/responses":
        return "openai_responses"
    if path == "/v1/chat/completions":
        return "openai_chat"
    if path.endswith((":generateContent", ":streamGenerateContent")):
        return "gemini"
    return None  # count_tokens, model lists … are not generation requests


def _captured_requests() -> list[tuple[str, str, dict[str, Any]]]:
    """(label, protocol, body) for every generation request the clients made."""
    found = []
    for name in sorted(glob.glob(os.path.join(CAPTURES, "**", "*.jsonl"), recursive=True)):
        with open(name, encoding="utf-8") as f:
            for line in f:
                record = json.loads(line)
                protocol = _protocol_for(record.get("path", ""))
                if record.get("method") != "POST" or protocol is None or not isinstance(record.get("json"), dict):
                    continue
                body = record["json"]
                if protocol == "gemini":
                    # What the front-end does: model and stream flag from the URL.
                    model, method = record["path"].rsplit("/", 1)[1].split(":")
                    body = {**body, "model": model, "stream": method == "streamGenerateContent"}
                found.append((f"{os.path.relpath(name, CAPTURES)}#{record.get('seq')}", protocol, body))
    return found


_REQUESTS = _captured_requests() if os.path.isdir(CAPTURES) else []
CAPTURED = [pytest.param(protocol, body, id=label) for label, protocol, body in _REQUESTS]
CAPTURED_CROSS = [pytest.param(protocol, body, target, id=f"{label}-to-{target}")
                  for label, protocol, body in _REQUESTS for target in PROTOCOLS if target != protocol]
needs_captures = pytest.mark.skipif(not CAPTURED, reason=f"no client captures at {CAPTURES}")


def _spelling(body: Any, protocol: str) -> Any:
    """Where the wire has two spellings of the same thing and the encoder picks one, this
    picks the same one on both sides. Nothing else is normalised:

    - Anthropic: content that is a single plain text block is sent as a string (what
      clients write), and ``tools: []`` is no tools, so it is left out;
    - Chat: ``stream: false`` is the default, so it is left out, and an assistant message
      that only calls tools has ``content: null`` (the SDKs leave the key out).
    """
    body = copy.deepcopy(body)
    if protocol == "anthropic":
        if body.get("tools") == []:
            del body["tools"]
        for message in body.get("messages", ()):
            content = message.get("content")
            if isinstance(content, list) and len(content) == 1 and content[0].keys() == {"type", "text"} and content[0]["type"] == "text":
                message["content"] = content[0]["text"]
    elif protocol == "openai_chat":
        if body.get("stream") is False:
            del body["stream"]
        for message in body.get("messages", ()):
            if message.get("role") == "assistant" and message.get("tool_calls") and message.get("content", None) is None:
                message["content"] = None
    return body


def _deliberate(body: dict[str, Any], protocol: str) -> dict[str, Any]:
    """What llmproxy adds on purpose when it sends a request on, applied to the original:
    a streamed Chat request always asks for the usage chunk (the proxy counts tokens; the
    front-end hands the chunk on only to clients that asked for it)."""
    expected = copy.deepcopy(body)
    if protocol == "openai_chat" and expected.get("stream"):
        expected["stream_options"] = {**expected.get("stream_options", {}), "include_usage": True}
    return expected


@needs_captures
@pytest.mark.parametrize("protocol,body", CAPTURED)
def test_capture_same_protocol_nothing_lost(protocol: str, body: dict[str, Any]) -> None:
    codec = get_codec(protocol)
    original = copy.deepcopy(body)
    request = codec.decode_request(copy.deepcopy(body))
    out = orjson.loads(orjson.dumps(codec.encode_request(request, body["model"])))
    if protocol == "gemini":
        for key in ("model", "stream"):  # in the URL again, not the body
            original.pop(key)
    assert _spelling(out, protocol) == _spelling(_deliberate(original, protocol), protocol)


def _kept(message: Message, target: str) -> bool:
    """Does ``message`` have anything ``target`` can carry? (Reasoning from another model
    family and other protocols' item types are left out, so a message of only those goes.)"""
    for part in message.parts:
        if isinstance(part, ThinkingPart) and part.protocol != target:
            continue
        if isinstance(part, OpaquePart) and part.protocol != target:
            continue
        if isinstance(part, TextPart) and not part.text and target == "anthropic":
            continue
        return True
    return False


def _turns(messages: list[Message]) -> list[str]:
    """The conversation's shape: user-side turns (user, system, developer), assistant turns
    and tool-result turns, consecutive ones of a kind counted once (protocols that need
    alternation merge them)."""
    kinds = {"user": "U", "system": "U", "developer": "U", "assistant": "A", "tool": "T"}
    shape: list[str] = []
    for message in messages:
        kind = kinds[message.role]
        if not shape or shape[-1] != kind:
            shape.append(kind)
    return shape


def _wrapped_system(part: Any) -> bool:
    """A system turn from the middle of a conversation, as a protocol with no system role
    there (Gemini, Anthropic for other protocols' turns) carries it: user text in tags."""
    return isinstance(part, TextPart) and part.text.startswith("<system>\n") and part.text.endswith("\n</system>")


def _last_user_text(request: Request) -> str:
    """The text of the last run of user messages (the prompt being answered). Text parts
    are joined with nothing between them, as the Chat encoder joins them into one string
    and as the model reads consecutive blocks."""
    texts: list[str] = []
    for message in reversed(request.messages):
        if message.role == "user":
            texts.insert(0, "".join(p.text for p in message.parts if isinstance(p, TextPart) and not _wrapped_system(p)))
        elif texts:
            break
    return "".join(texts)


def _tool_ids(request: Request) -> tuple[list[str], list[str]]:
    calls = [p.id for m in request.messages for p in m.parts if isinstance(p, ToolCallPart)]
    results = [p.tool_call_id for m in request.messages for p in m.parts if isinstance(p, ToolResultPart)]
    return calls, results


@needs_captures
@pytest.mark.parametrize("protocol,body,target", CAPTURED_CROSS)
def test_capture_cross_protocol(protocol: str, body: dict[str, Any], target: str) -> None:
    source = get_codec(protocol).decode_request(copy.deepcopy(body))
    wire = get_codec(target).encode_request(copy.deepcopy(source), "target-model")
    wire = orjson.loads(orjson.dumps(wire))
    if target == "gemini":
        wire = {**wire, "model": "target-model", "stream": source.stream}
    back = get_codec(target).decode_request(wire)

    assert back.stream == source.stream
    assert [t.name for t in back.tools] == [t.name for t in source.tools]
    assert _tool_ids(back) == _tool_ids(source)
    assert _last_user_text(back) == _last_user_text(source)
    kept = [m for m in source.messages if _kept(m, target)]
    assert _turns(back.messages) == _turns(kept)
    if target != "gemini":
        # Schemas reach OpenAI and Anthropic as JSON Schema, whatever Gemini spelling
        # (upper-case OpenAPI types) the client used.
        for tool in back.tools:
            assert _schema_types(tool.parameters) <= JSON_SCHEMA_TYPES, tool.name
        if back.response_format and back.response_format.get("schema"):
            assert _schema_types(back.response_format["schema"]) <= JSON_SCHEMA_TYPES


JSON_SCHEMA_TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}


def _schema_types(schema: Any) -> set[str]:
    """Every ``type`` a JSON schema names (property names are not types)."""
    found: set[str] = set()
    if isinstance(schema, dict):
        for key, value in schema.items():
            if key == "type":
                found.update([value] if isinstance(value, str) else value if isinstance(value, list) else [])
            elif key == "properties" and isinstance(value, dict):
                for sub in value.values():
                    found |= _schema_types(sub)
            else:
                found |= _schema_types(value)
    elif isinstance(schema, list):
        for item in schema:
            found |= _schema_types(item)
    return found
