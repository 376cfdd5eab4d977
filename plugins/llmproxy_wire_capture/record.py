"""One capture record: a cheap :class:`Snapshot` taken on the event loop when a flow ends,
turned into one masked JSON line by :func:`build_line` in the writer thread.

The snapshot holds references only (the flow is finished, so nothing it points to changes
any more); everything that costs — parsing bodies, splitting streams into events, decoding
the answer for its usage, the request diff, serialising and masking — happens off the loop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import orjson

from llmproxy.canonical import (
    ImagePart,
    Request,
    Response,
    ResponseBuilder,
    TextPart,
    ThinkingPart,
    ToolCallPart,
    ToolResultPart,
    fingerprint,
)
from llmproxy.codecs import CODECS
from llmproxy.codecs.base import SSESplitter
from llmproxy.flow import Attempt, Flow
from llmproxy.redact import Redactor

FORMAT_VERSION = 1
_CONTEXT = 60  # characters of unchanged text shown around a change in the request diff


@dataclass(slots=True)
class Snapshot:
    """What a record needs from a finished flow (references, no copies of bodies)."""

    id: str
    wall_start: float
    started: float
    ended: float | None
    first_token_at: float | None
    frontend: str
    kind: str
    model: str
    stream: bool
    status: int | None
    error: dict[str, Any] | None
    key_name: str | None
    address: str | None
    user_agent: str
    headers: dict[str, str]
    raw_body: bytes
    raw_request: dict[str, Any]
    request: Request | None  # the canonical request, when a plugin decoded it
    response: Response | None  # the canonical answer, when already decoded
    backend: str | None
    target: str | None
    attempts: list[Attempt]
    protocols: dict[str, str]  # backend name -> wire protocol
    trace: list[dict[str, Any]]
    sent: list[tuple[float, bytes]] | None
    include_bodies: bool
    redactor: Redactor

    @classmethod
    def of(cls, flow: Flow, include_bodies: bool, redactor: Redactor) -> "Snapshot":
        context = flow.context
        protocols = {name: provider.protocol for name, provider in context.providers.items()} if context is not None else {}
        target = flow.target
        return cls(
            id=flow.id,
            wall_start=time.time() - (time.monotonic() - flow.started),
            started=flow.started,
            ended=flow.ended,
            first_token_at=flow.first_token_at,
            frontend=flow.frontend,
            kind=kind_of(flow),
            model=flow.model,
            stream=flow.stream,
            status=flow.status,
            error=flow.error.to_dict() if flow.error is not None else None,
            key_name=flow.client.key_name,
            address=flow.client.address,
            user_agent=flow.client.user_agent,
            headers=dict(flow.client.headers) if flow.client.headers else {},
            raw_body=flow.raw_body,
            raw_request=flow.raw_request,
            request=flow.request if flow.request_decoded else None,
            # Reading a pending (lazy) answer would decode it here, on the loop: the writer
            # thread decodes what was sent instead.
            response=flow.response if flow.has_response and not flow.response_pending else None,
            backend=target.backend if target is not None else None,
            target=target.label if target is not None else None,
            attempts=list(flow.attempts),
            protocols=protocols,
            trace=list(flow.trace),
            sent=flow.sent,
            include_bodies=include_bodies,
            redactor=redactor,
        )


def kind_of(flow: Flow) -> str:
    """``chat``, or what else the flow was: ``count_tokens`` (a flow's own note in
    ``metadata["kind"]``), ``embeddings``, ``completions``, ``images`` (the endpoint)."""
    kind = flow.metadata.get("kind")
    if isinstance(kind, str) and kind:
        return kind
    return "chat" if flow.frontend in CODECS else flow.frontend.removeprefix("openai_")


def build_line(snap: Snapshot) -> bytes:
    """The masked JSONL line (with its newline) for one flow."""
    record = build_record(snap)
    text = orjson.dumps(record, default=_default, option=orjson.OPT_NON_STR_KEYS).decode()
    # Credential headers were masked by name already; this pass masks every secret and key
    # format wherever it sits (bodies, events, URLs, notes). The labels keep the JSON valid.
    return snap.redactor.text(text).encode() + b"\n"


def build_record(snap: Snapshot) -> dict[str, Any]:
    t0 = snap.started
    redactor = snap.redactor
    codec = CODECS.get(snap.frontend)
    requested = snap.raw_request.get("model") if isinstance(snap.raw_request, dict) else None
    answer = snap.response if snap.response is not None else _decode_sent(snap)
    record: dict[str, Any] = {
        "v": FORMAT_VERSION,
        "ts": round(snap.wall_start, 6),
        "time": datetime.fromtimestamp(snap.wall_start, timezone.utc).isoformat(timespec="milliseconds"),
        "id": snap.id,
        "frontend": snap.frontend,
        "kind": snap.kind,
        "model": snap.model or requested,
        "stream": snap.stream,
        "backend": snap.backend,
        "target": snap.target,
        "status": snap.status,
        "error": snap.error,
        "duration": _rel(snap.ended, t0),
        "ttft": _rel(snap.first_token_at, t0),
        "usage": _usage(answer),
        "stop_reason": answer.stop_reason if answer is not None else None,
    }
    if isinstance(requested, str) and requested != record["model"]:
        record["requested_model"] = requested
    canonical = snap.request
    if canonical is None and codec is not None and snap.raw_request:
        try:
            canonical = codec.decode_request(snap.raw_request)
        except Exception:
            canonical = None
    if canonical is not None:
        record["fingerprint"] = fingerprint(canonical)
    record["client"] = {"key_name": snap.key_name, "address": snap.address, "user_agent": snap.user_agent}
    request: dict[str, Any] = {"headers": redactor.headers(snap.headers)}
    if snap.include_bodies and snap.raw_body:
        request["body"] = _json_or_text(snap.raw_body)
    record["request"] = request
    record["changes"] = {"plugins": snap.trace, "request": _request_diff(snap, codec)}
    record["attempts"] = [_attempt(snap, a) for a in snap.attempts]
    record["response"] = _client_response(snap)
    for stream in [a.get("response", {}).get("events") for a in record["attempts"]] + [record["response"].get("events")]:
        if stream:
            mask_split_secrets(stream, redactor)
    return record


# -- pieces -------------------------------------------------------------------------------------


def _attempt(snap: Snapshot, attempt: Attempt) -> dict[str, Any]:
    t0 = snap.started
    protocol = snap.protocols.get(attempt.backend)
    entry: dict[str, Any] = {
        "backend": attempt.backend,
        "model": attempt.model,
        "protocol": protocol,
        "key_name": attempt.key_name,
        "start": _rel(attempt.started, t0),
        "end": _rel(attempt.ended, t0),
        "status": attempt.status,
        "error": attempt.error,
    }
    sent = attempt.request
    if sent is not None:
        request: dict[str, Any] = {"method": sent.method, "url": snap.redactor.url(sent.url), "headers": snap.redactor.headers(sent.headers)}
        if snap.include_bodies:
            request["body"] = sent.body
        entry["request"] = request
    response: dict[str, Any] = {}
    if attempt.response_headers is not None:
        response["headers"] = snap.redactor.headers(attempt.response_headers)
    if snap.include_bodies:
        if attempt.response_chunks is not None:
            response["events"] = _events(attempt.response_chunks, t0, _is_sse(protocol))
        elif attempt.response_body is not None:
            response["body"] = _json_or_text(attempt.response_body)
    if response:
        entry["response"] = response
    return entry


def _client_response(snap: Snapshot) -> dict[str, Any]:
    response: dict[str, Any] = {"status": snap.status}
    if snap.error is not None:
        response["error"] = snap.error
    if not snap.include_bodies or not snap.sent:
        return response
    data = b"".join(chunk for _, chunk in snap.sent)
    # A pass-through answer is byte for byte what the backend sent: say so, not twice.
    for index in range(len(snap.attempts) - 1, -1, -1):
        attempt = snap.attempts[index]
        upstream = attempt.response_body if attempt.response_chunks is None else b"".join(c for _, c in attempt.response_chunks)
        if upstream is not None and upstream == data and attempt.status is not None and attempt.status < 400:
            response["same_as_attempt"] = index
            return response
    codec = CODECS.get(snap.frontend)
    streamed = snap.stream and len(snap.sent) > 0 and (snap.status or 0) < 400
    if streamed and not (len(snap.sent) == 1 and _looks_like_json(snap.sent[0][1])):
        response["events"] = _events(snap.sent, snap.started, codec is None or codec.content_type_stream == "text/event-stream")
    else:
        response["body"] = _json_or_text(data)
    return response


def _events(chunks: list[tuple[float, bytes]], t0: float, sse: bool) -> list[dict[str, Any]]:
    """A stream's reads as events: each SSE frame with the time of the read that completed it
    (seconds since the flow began), or each read as text for streams that are not SSE."""
    if not sse:
        return [{"t": round(t - t0, 6), "raw": chunk.decode(errors="replace")} for t, chunk in chunks]
    splitter = SSESplitter()
    events: list[dict[str, Any]] = []
    last = t0
    for t, chunk in chunks:
        last = t
        for name, data in splitter.feed(chunk):
            events.append(_frame(t - t0, name, data))
    for name, data in splitter.close():
        events.append(_frame(last - t0, name, data))
    return events


def mask_split_secrets(events: list[dict[str, Any]], redactor: Redactor) -> None:
    """Mask secrets that a stream split over several events ("sk-pro" + "j-Ab3…"), which no
    event holds whole, so the per-string masking of the line cannot see them.

    Protocol-blind: the strings at the same place in successive events (the same event name
    and JSON path: ``choices[0].delta.content``, ``delta.text``, ``candidates[0].content
    .parts[0].text`` …, or the raw text of streams that are not SSE) are joined, secrets are
    found in the joined text, and each event keeps only its share of the text around them;
    the label goes where the secret began."""
    channels: dict[tuple[Any, ...], list[tuple[Any, Any, str]]] = {}

    def walk(value: Any, path: tuple[Any, ...]) -> None:
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            if isinstance(item, str):
                channels.setdefault((*path, key), []).append((value, key, item))
            elif isinstance(item, (dict, list)):
                walk(item, (*path, key))

    for event in events:
        if "raw" in event:
            channels.setdefault(("raw",), []).append((event, "raw", event["raw"]))
        elif isinstance(event.get("data"), (dict, list)):
            walk(event["data"], (event.get("event"),))
    for pieces in channels.values():
        if len(pieces) > 1:
            _mask_pieces(pieces, redactor)


def _mask_pieces(pieces: list[tuple[Any, Any, str]], redactor: Redactor) -> None:
    joined = "".join(text for _, _, text in pieces)
    spans = redactor.spans(joined)
    if not spans:
        return
    start = 0
    for container, key, text in pieces:
        end = start + len(text)
        out: list[str] = []
        position = start
        for s, e, label in spans:
            if e <= start or s >= end:
                continue
            out.append(joined[position : max(s, start)])
            if s >= start:
                out.append(label)
            position = min(e, end)
        if out:
            out.append(joined[position:end])
            container[key] = "".join(out)
        start = end


def _frame(t: float, name: str | None, data: bytes) -> dict[str, Any]:
    frame: dict[str, Any] = {"t": round(t, 6)}
    if name is not None:
        frame["event"] = name
    frame["data"] = _json_or_text(data)
    return frame


def _decode_sent(snap: Snapshot) -> Response | None:
    """The answer the client got, decoded from the bytes it was sent (for usage and stop)."""
    codec = CODECS.get(snap.frontend)
    if codec is None or not snap.sent or (snap.status or 0) >= 400:
        return None
    try:
        if snap.stream:
            decoder = codec.stream_decoder()
            builder = ResponseBuilder(snap.model)
            for _, chunk in snap.sent:
                for event in decoder.feed(chunk):
                    builder.add(event)
            for event in decoder.close():
                builder.add(event)
            return builder.build()
        return codec.decode_response(orjson.loads(b"".join(c for _, c in snap.sent)))
    except Exception:
        return None


def _usage(response: Response | None) -> dict[str, int] | None:
    if response is None:
        return None
    usage = response.usage
    out = {"input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens}
    for name in ("cached_input_tokens", "cache_creation_input_tokens", "reasoning_tokens"):
        value = getattr(usage, name)
        if value:
            out[name] = value
    return out


# -- what the plugins changed -------------------------------------------------------------------


def _request_diff(snap: Snapshot, codec: Any) -> list[dict[str, Any]]:
    """How the canonical request changed between the client and the backend: fields that
    differ between the request as the client sent it and as the request hooks left it.
    Computed only when a plugin decoded the request (no plugin can have changed it else);
    a model change is reported either way."""
    changes: list[dict[str, Any]] = []
    requested = snap.raw_request.get("model") if isinstance(snap.raw_request, dict) else None
    if snap.request is None or codec is None:
        if isinstance(requested, str) and snap.model and requested != snap.model:
            changes.append({"field": "model", "before": requested, "after": snap.model})
        return changes
    try:
        before = codec.decode_request(snap.raw_request)
        before.model = requested if isinstance(requested, str) else before.model
    except Exception:
        return changes
    old, new = _view(before), _view(snap.request)
    for key in dict.fromkeys([*old, *new]):
        a, b = old.get(key), new.get(key)
        if a != b:
            if isinstance(a, str) and isinstance(b, str):
                a, b = trim(a, b)
            changes.append({"field": key, "before": a, "after": b})
    return changes


def _view(request: Request) -> dict[str, Any]:
    view: dict[str, Any] = {
        "model": request.model,
        "system": "\n".join(p.text for p in request.system),
        "tools": [t.name for t in request.tools],
        "tool_choice": request.tool_choice,
        "params": request.params,
        "response_format": request.response_format,
        "reasoning": request.reasoning,
    }
    for i, message in enumerate(request.messages):
        view[f"messages[{i}]"] = f"{message.role}: " + " ".join(_part(p) for p in message.parts)
    return view


def _part(part: Any) -> str:
    if isinstance(part, TextPart):
        return part.text
    if isinstance(part, ToolCallPart):
        return f"[call {part.name}({part.arguments})]"
    if isinstance(part, ToolResultPart):
        return f"[result {part.tool_call_id}: " + "".join(p.text for p in part.content if isinstance(p, TextPart)) + "]"
    if isinstance(part, ThinkingPart):
        return f"[thinking: {part.text}]"
    if isinstance(part, ImagePart):
        return f"[image {part.url or part.media_type or ''}]"
    return f"[{getattr(part, 'type', 'part')}]"


def trim(a: str, b: str) -> tuple[str, str]:
    """The differing middle of two strings, with a little unchanged context around it."""
    prefix = 0
    limit = min(len(a), len(b))
    while prefix < limit and a[prefix] == b[prefix]:
        prefix += 1
    suffix = 0
    while suffix < limit - prefix and a[-1 - suffix] == b[-1 - suffix]:
        suffix += 1
    start = max(0, prefix - _CONTEXT)
    head = "…" if start else ""

    def cut(s: str) -> str:
        end = len(s) - max(0, suffix - _CONTEXT)
        return head + s[start:end] + ("…" if end < len(s) else "")

    return cut(a), cut(b)


# -- helpers ------------------------------------------------------------------------------------


def _rel(t: float | None, t0: float) -> float | None:
    return None if t is None else round(t - t0, 6)


def _is_sse(protocol: str | None) -> bool:
    codec = CODECS.get(protocol or "")
    return codec is None or codec.content_type_stream == "text/event-stream"


def _looks_like_json(data: bytes) -> bool:
    head = data.lstrip()[:1]
    return head in (b"{", b"[")


def _json_or_text(data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return data.decode(errors="replace")


def _default(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return value.decode(errors="replace")
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    to_dict = getattr(value, "to_dict", None)
    if callable(to_dict):
        return to_dict()
    return repr(value)
