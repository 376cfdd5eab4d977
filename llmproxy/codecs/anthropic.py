"""Anthropic Messages (`/v1/messages`) ⇄ the canonical model.

Canonical conventions this codec maps to and from: tool results live in ``tool`` messages
(Anthropic puts them at the head of a user turn; the encoder merges them back); ``role:
system`` turns in the middle of a conversation stay in place; thinking blocks keep their
signature and are only ever sent back to Anthropic when signed by Anthropic; canonical
``input_tokens`` counts all input (Anthropic's ``input_tokens`` excludes cache reads and
writes, which are added in and taken out here). Extra keys starting with ``_`` are this
codec's private notes and never reach the wire.
"""

from __future__ import annotations

from typing import Any

from ..canonical import (
    EventKind,
    FilePart,
    ImagePart,
    Message,
    OpaquePart,
    Part,
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
from ..errors import ProxyError, bad_request
from .base import SSEStreamDecoder, array, carried, dumps, loads, public_extra, random_hex, sse_frame, string, web_url

PROTOCOL = "anthropic"
DEFAULT_MAX_TOKENS = 8192
# Thinking budgets used when a client asks for an effort level and the backend wants tokens.
EFFORT_BUDGET = {"minimal": 1024, "low": 2048, "medium": 8192, "high": 16384, "xhigh": 32000, "max": 32000}

_KNOWN_KEYS = frozenset(
    (
        "model", "messages", "system", "max_tokens", "metadata", "stop_sequences", "stream", "temperature",
        "top_p", "top_k", "tools", "tool_choice", "thinking", "output_config",
    )
)
STOP_FROM_WIRE = {
    "end_turn": "end_turn",
    "max_tokens": "max_tokens",
    "stop_sequence": "stop_sequence",
    "tool_use": "tool_use",
    "pause_turn": "end_turn",
    "refusal": "content_filter",
    "model_context_window_exceeded": "max_tokens",
}
STOP_TO_WIRE = {
    "end_turn": "end_turn",
    "max_tokens": "max_tokens",
    "stop_sequence": "stop_sequence",
    "tool_use": "tool_use",
    "content_filter": "refusal",
    "error": "end_turn",
    None: "end_turn",
}
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
    503: "overloaded_error",
    504: "timeout_error",
}


class AnthropicCodec:
    protocol = PROTOCOL
    content_type_stream = "text/event-stream"
    error_ends_connection = False

    # -- requests ----------------------------------------------------------------------
    def peek(self, body: dict[str, Any]) -> tuple[str, bool]:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise bad_request("model: field required (a non-empty string)", "model")
        messages = body.get("messages")
        if not isinstance(messages, list):
            raise bad_request("messages: field required (an array of messages)", "messages")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str) or message["role"] not in ("user", "assistant", "system"):
                raise bad_request(f"messages.{i}.role: must be 'user' or 'assistant'", f"messages.{i}.role")
            if "content" not in message:
                raise bad_request(f"messages.{i}.content: field required", f"messages.{i}.content")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise bad_request("stream: must be a boolean", "stream")
        return model, stream

    def decode_request(self, body: dict[str, Any]) -> Request:
        model, stream = self.peek(body)
        request = Request(model=model, stream=stream, protocol=PROTOCOL)
        request.extra = {k: v for k, v in body.items() if k not in _KNOWN_KEYS}
        params = request.params
        if "max_tokens" in body:
            params["max_tokens"] = body["max_tokens"]
        for key in ("temperature", "top_p", "top_k"):
            if key in body:
                params[key] = body[key]
        if "stop_sequences" in body:
            params["stop"] = body["stop_sequences"]
        if isinstance(body.get("metadata"), dict):
            request.metadata = dict(body["metadata"])
        system = body.get("system")
        if isinstance(system, str):
            request.system = [TextPart(system)] if system else []
        elif isinstance(system, list):
            for i, block in enumerate(system):
                if not isinstance(block, dict) or block.get("type") != "text":
                    raise bad_request(f"system.{i}: only text blocks are allowed in system", f"system.{i}")
                request.system.append(TextPart(string(block.get("text", ""), f"system.{i}.text"), extra={k: v for k, v in block.items() if k not in ("type", "text")}))
        elif system is not None:
            raise bad_request("system: must be a string or an array of text blocks", "system")
        tools = array(body.get("tools"), "tools")
        other_tools = []
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
                raise bad_request(f"tools.{i}.name: field required", f"tools.{i}.name")
            if tool.get("type") not in (None, "custom"):
                other_tools.append(tool)  # server tools (web search, code execution …)
                continue
            schema = tool.get("input_schema")
            if not isinstance(schema, dict):
                raise bad_request(f"tools.{i}.input_schema: field required (a JSON schema object)", f"tools.{i}.input_schema")
            extra = {k: v for k, v in tool.items() if k not in ("name", "description", "input_schema", "strict")}
            request.tools.append(Tool(tool["name"], tool.get("description"), schema, tool.get("strict"), extra))
        if other_tools:
            request.extra["_server_tools"] = other_tools
        choice = body.get("tool_choice")
        if isinstance(choice, dict):
            kind = choice.get("type")
            request.tool_choice = {"auto": "auto", "any": "required", "none": "none"}.get(kind) or choice.get("name")
            if choice.get("disable_parallel_tool_use"):
                request.parallel_tool_calls = False
        thinking = body.get("thinking")
        reasoning: dict[str, Any] = {}
        if isinstance(thinking, dict):
            kind = thinking.get("type")
            if kind == "enabled":
                reasoning["budget_tokens"] = thinking.get("budget_tokens")
            elif kind == "adaptive":
                reasoning["adaptive"] = True
            elif kind == "disabled":
                reasoning["enabled"] = False
            request.extra["_thinking"] = thinking
        output = body.get("output_config")
        if isinstance(output, dict):
            if output.get("effort"):
                reasoning["effort"] = output["effort"]
            fmt = output.get("format")
            if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
                request.response_format = {"type": "json_schema", "name": "response", "schema": fmt.get("schema") or {}}
            request.extra["_output_config"] = output
        request.reasoning = reasoning or None
        if not body["messages"]:  # as Anthropic says, and before another backend answers in its own words
            raise bad_request("messages: at least one message is required", "messages")
        for i, message in enumerate(body["messages"]):
            request.messages.extend(_decode_message(message, i))
        return request

    def encode_request(self, request: Request, model: str) -> dict[str, Any]:
        same = request.protocol == PROTOCOL
        body: dict[str, Any] = public_extra(request.extra) if same else {}
        body["model"] = model
        params = request.params
        max_tokens = params.get("max_tokens") or DEFAULT_MAX_TOKENS
        body["max_tokens"] = max_tokens
        for key in ("temperature", "top_p", "top_k"):
            if key in params:
                body[key] = params[key]
        stop = params.get("stop")
        if stop:
            body["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
        if request.system:
            if same and any(p.extra for p in request.system):
                body["system"] = [{"type": "text", "text": p.text, **p.extra} for p in request.system]
            elif same and len(request.system) > 1:
                body["system"] = [{"type": "text", "text": p.text} for p in request.system]
            else:
                body["system"] = "\n\n".join(p.text for p in request.system)
        body["messages"] = _encode_messages(request.messages, same)
        if request.tools or (same and request.extra.get("_server_tools")):
            tools = []
            for tool in request.tools:
                entry: dict[str, Any] = {"name": tool.name}
                if tool.description is not None:
                    entry["description"] = tool.description
                entry["input_schema"] = tool.parameters
                if tool.strict is not None and same:
                    entry["strict"] = tool.strict
                if same:
                    entry.update(tool.extra)
                tools.append(entry)
            if same:
                tools.extend(request.extra.get("_server_tools", ()))
            body["tools"] = tools
        if request.tool_choice is not None and (request.tools or same):
            choice = request.tool_choice
            if choice == "auto":
                wire: dict[str, Any] = {"type": "auto"}
            elif choice == "required":
                wire = {"type": "any"}
            elif choice == "none":
                wire = {"type": "none"}
            else:
                wire = {"type": "tool", "name": choice}
            if request.parallel_tool_calls is False and wire["type"] != "none":
                wire["disable_parallel_tool_use"] = True
            body["tool_choice"] = wire
        elif request.parallel_tool_calls is False and request.tools:
            body["tool_choice"] = {"type": "auto", "disable_parallel_tool_use": True}
        reasoning = request.reasoning or {}
        wants_thinking = reasoning.get("budget_tokens") or (reasoning.get("effort") and reasoning.get("effort") not in ("none",))
        own = request.extra.get("_thinking") if same else None
        if isinstance(own, dict) and own.get("type") == "enabled" and _unsigned_tool_turn(body["messages"]):
            # An Anthropic client's own thinking, but its last tool turn came from a backend
            # of another family (a failover, !/oneoff), whose unsigned thinking was left out
            # above: the rule below for other clients' tool turns holds for it too. (Adaptive
            # thinking may skip a turn's thinking, so it takes such turns as they are.)
            own = None
        thinking_on = isinstance(own, dict) and own.get("type") in ("enabled", "adaptive")
        if own is not None:
            body["thinking"] = own  # an Anthropic client's own, as it sent it
            if thinking_on:  # a plugin's setting (!/set) may not add what thinking refuses
                if body.get("temperature") not in (None, 1):
                    body.pop("temperature")
                body.pop("top_k", None)
        elif wants_thinking and (body.get("tool_choice", {}).get("type") in ("any", "tool") or _unsigned_tool_turn(body["messages"])):
            # Anthropic refuses thinking with a forced tool choice; forcing the tool matters more.
            # Mid tool loop, Anthropic wants the last assistant turn to start with its signed
            # thinking block, or answers 400 ("Expected `thinking` ... but found `tool_use`").
            # Clients of other protocols cannot hand Anthropic's signature back (and unsigned
            # thinking is never forwarded), so this request goes without thinking, as the
            # API's own error message advises, and without thinking's other changes (more
            # max_tokens, no temperature).
            pass
        elif wants_thinking:
            budget = reasoning.get("budget_tokens") or EFFORT_BUDGET.get(str(reasoning.get("effort")), 8192)
            budget = max(1024, int(budget))
            body["thinking"] = {"type": "enabled", "budget_tokens": budget}
            if body["max_tokens"] <= budget:
                body["max_tokens"] = budget + max_tokens
            body.pop("temperature", None)  # Anthropic refuses temperature with thinking
            body.pop("top_k", None)
        output: dict[str, Any] = dict(request.extra.get("_output_config", {})) if same else {}
        fmt = request.response_format
        if fmt and fmt.get("type") == "json_schema":
            output["format"] = {"type": "json_schema", "schema": fmt.get("schema") or {}}
        elif fmt and fmt.get("type") == "json_object":
            # No JSON-object mode: say so in the system prompt, which every model honours.
            note = "Respond with a single JSON object and nothing else."
            system = body.get("system")
            if isinstance(system, list):
                body["system"] = [*system, {"type": "text", "text": note}]
            else:
                body["system"] = f"{system}\n\n{note}" if system else note
        if output:
            body["output_config"] = output
        user_id = request.metadata.get("user_id")
        if same and request.metadata:
            body["metadata"] = request.metadata
        elif isinstance(user_id, str):
            body["metadata"] = {"user_id": user_id}
        elif request.params.get("user"):
            body["metadata"] = {"user_id": str(request.params["user"])}
        if request.stream:
            body["stream"] = True
        else:
            body.pop("stream", None)
        return body

    # -- responses ---------------------------------------------------------------------
    def decode_response(self, body: dict[str, Any]) -> Response:
        if body.get("type") == "error":
            err = body.get("error") or {}
            raise ProxyError(502, f"upstream error: {err.get('message', err)}", kind=err.get("type"))
        content = body.get("content")
        if not isinstance(content, list):
            raise ProxyError(502, "upstream answer has no 'content' array")
        response = Response(model=body.get("model") or "", id=body.get("id"), protocol=PROTOCOL)
        response.parts = [_decode_block(b, "content") for b in content if isinstance(b, dict)]
        response.parts = [p for p in response.parts if p is not None]
        response.stop_reason = STOP_FROM_WIRE.get(body.get("stop_reason"), "end_turn")
        response.usage = decode_usage(body.get("usage"))
        response.extra = {k: v for k, v in body.items() if k in ("stop_sequence", "container")}
        return response

    def encode_response(self, response: Response, request: Request | None) -> dict[str, Any]:
        same = response.protocol == PROTOCOL
        content = []
        for part in response.parts:
            block = _encode_block(part, same, outgoing=False)
            if block is not None:
                content.append(block)
        stop = STOP_TO_WIRE.get(response.stop_reason, "end_turn")
        body = {
            "id": response.id if response.id and response.id.startswith("msg_") else f"msg_{random_hex(24)}",
            "type": "message",
            "role": "assistant",
            "model": response.model,
            "content": content,
            "stop_reason": stop,
            "stop_sequence": response.extra.get("stop_sequence") if same else None,
            "usage": encode_usage(response.usage),
        }
        return body

    # -- streams -----------------------------------------------------------------------
    def stream_decoder(self) -> "AnthropicStreamDecoder":
        return AnthropicStreamDecoder()

    def stream_encoder(self, flow: Any) -> "AnthropicStreamEncoder":
        return AnthropicStreamEncoder(flow.model)

    def stream_complete(self, tail: bytes) -> bool:
        return b"message_stop" in tail

    # -- errors ------------------------------------------------------------------------
    def error_body(self, error: ProxyError) -> dict[str, Any]:
        kind = error.kind if error.kind in ERROR_TYPES.values() else ERROR_TYPES.get(error.status, "api_error" if error.status >= 500 else "invalid_request_error")
        return {"type": "error", "error": {"type": kind, "message": error.message}}

    def error_event(self, error: ProxyError) -> bytes:
        return sse_frame(dumps(self.error_body(error)), "error")


def decode_usage(usage: Any) -> Usage:
    if not isinstance(usage, dict):
        return Usage()
    cached = usage.get("cache_read_input_tokens") or 0
    created = usage.get("cache_creation_input_tokens") or 0
    return Usage(
        input_tokens=(usage.get("input_tokens") or 0) + cached + created,
        output_tokens=usage.get("output_tokens") or 0,
        cached_input_tokens=cached,
        cache_creation_input_tokens=created,
    )


def encode_usage(usage: Usage) -> dict[str, Any]:
    return {
        "input_tokens": max(0, usage.input_tokens - usage.cached_input_tokens - usage.cache_creation_input_tokens),
        "cache_creation_input_tokens": usage.cache_creation_input_tokens,
        "cache_read_input_tokens": usage.cached_input_tokens,
        "output_tokens": usage.output_tokens,
    }


def _decode_image(block: dict[str, Any], where: str) -> ImagePart:
    source = block.get("source")
    if not isinstance(source, dict):
        raise bad_request(f"{where}.source: field required", f"{where}.source")
    extra = {k: v for k, v in block.items() if k not in ("type", "source")}
    if source.get("type") == "base64":
        return ImagePart(data=string(source.get("data"), f"{where}.source.data"), media_type=source.get("media_type"), extra=extra)
    if source.get("type") == "url":
        return ImagePart(url=string(source.get("url"), f"{where}.source.url"), extra=extra)
    raise bad_request(f"{where}.source.type: must be 'base64' or 'url'", f"{where}.source.type")


def _decode_document(block: dict[str, Any], where: str) -> Part:
    source = block.get("source")
    kind = source.get("type") if isinstance(source, dict) else None
    title = block.get("title") if isinstance(block.get("title"), str) and block.get("title") else None
    extra = {k: v for k, v in block.items() if k not in ("type", "source", "title")}
    if kind == "text":
        # A plain-text document is text to any model: titled, so it reads as the file it was.
        text = string(source.get("data"), f"{where}.source.data")  # type: ignore[union-attr]
        return TextPart(f"{title}:\n{text}" if title else text)
    if kind == "base64":
        data = string(source.get("data"), f"{where}.source.data")  # type: ignore[union-attr]
        return FilePart(data=data, media_type=source.get("media_type") or "application/pdf", name=title, extra=extra)  # type: ignore[union-attr]
    if kind == "url":
        return FilePart(url=string(source.get("url"), f"{where}.source.url"), name=title, extra=extra)  # type: ignore[union-attr]
    if kind is None:
        raise bad_request(f"{where}.source: field required", f"{where}.source")
    return OpaquePart(PROTOCOL, block, essential=True)  # a file id, or content blocks: Anthropic's own


def _decode_block(block: dict[str, Any], where: str) -> Part | None:
    kind = block.get("type")
    if kind == "text":
        return TextPart(string(block.get("text"), f"{where}.text"), extra={k: v for k, v in block.items() if k not in ("type", "text")})
    if kind == "image":
        return _decode_image(block, where)
    if kind == "tool_use":
        arguments = block.get("input")
        return ToolCallPart(
            id=block.get("id") or f"toolu_{random_hex(24)}",
            name=block.get("name", ""),
            arguments=dumps(arguments if arguments is not None else {}).decode(),
            extra={k: v for k, v in block.items() if k not in ("type", "id", "name", "input")},
        )
    if kind == "thinking":
        return ThinkingPart(text=string(block.get("thinking", ""), f"{where}.thinking"), signature=block.get("signature") or None, protocol=PROTOCOL)
    if kind == "redacted_thinking":
        return ThinkingPart(redacted=True, signature=block.get("data"), protocol=PROTOCOL)
    if kind == "document":
        return _decode_document(block, where)
    return OpaquePart(PROTOCOL, block)


def _decode_message(message: dict[str, Any], i: int) -> list[Message]:
    role = message["role"]
    content = message["content"]
    where = f"messages.{i}.content"
    extra = {k: v for k, v in message.items() if k not in ("role", "content")}
    if isinstance(content, str):
        return [Message(role=role, parts=[TextPart(content)], extra=extra)]
    if not isinstance(content, list):
        raise bad_request(f"{where}: must be a string or an array of content blocks", where)
    results: list[Part] = []
    parts: list[Part] = []
    for j, block in enumerate(content):
        if not isinstance(block, dict):
            raise bad_request(f"{where}.{j}: must be an object", f"{where}.{j}")
        if block.get("type") == "tool_result":
            call_id = block.get("tool_use_id")
            if not isinstance(call_id, str):
                raise bad_request(f"{where}.{j}.tool_use_id: field required", f"{where}.{j}.tool_use_id")
            inner = block.get("content")
            if isinstance(inner, str):
                inner_parts: list[Part] = [TextPart(inner)]
            elif isinstance(inner, list):
                inner_parts = [p for p in (_decode_block(b, f"{where}.{j}.content") for b in inner if isinstance(b, dict)) if p is not None]
            else:
                inner_parts = []
            results.append(
                ToolResultPart(
                    tool_call_id=call_id,
                    content=inner_parts,
                    is_error=bool(block.get("is_error")),
                    extra={k: v for k, v in block.items() if k not in ("type", "tool_use_id", "content")},
                )
            )
        else:
            part = _decode_block(block, f"{where}.{j}")
            if isinstance(part, OpaquePart) and role == "user":
                part.essential = True  # what a user sent, the model must see: never dropped on the way
            if part is not None:
                parts.append(part)
    messages = []
    if results:
        messages.append(Message(role="tool", parts=results))
    if parts or not results:
        messages.append(Message(role=role, parts=parts, extra=extra))
    return messages


def _encode_block(part: Part, same: bool, outgoing: bool) -> dict[str, Any] | None:
    """``outgoing``: the block goes to the Anthropic API (so unsigned thinking must not)."""
    if isinstance(part, TextPart):
        if not part.text and not outgoing:
            return {"type": "text", "text": ""}
        if not part.text:
            return None  # the API refuses empty text blocks
        block = {"type": "text", "text": part.text}
        if same:
            block.update(part.extra)
        elif part.extra.get("cache_control"):
            block["cache_control"] = part.extra["cache_control"]
        return block
    if isinstance(part, ImagePart):
        if part.data is not None:
            source: dict[str, Any] = {"type": "base64", "media_type": part.media_type or "image/png", "data": part.data}
        else:
            source = {"type": "url", "url": web_url(part.url or "", PROTOCOL)}
        block = {"type": "image", "source": source}
        if same:
            block.update(part.extra)
        return block
    if isinstance(part, FilePart):
        if part.data is not None:
            source = {"type": "base64", "media_type": part.media_type or "application/pdf", "data": part.data}
        else:
            source = {"type": "url", "url": web_url(part.url or "", PROTOCOL)}
        block = {"type": "document", "source": source}
        if part.name:
            block["title"] = part.name
        if same:
            block.update(part.extra)
        return block
    if isinstance(part, ToolCallPart):
        try:
            arguments = loads(part.arguments) if part.arguments else {}
        except ValueError:
            arguments = {"_raw_arguments": part.arguments}
        if not isinstance(arguments, dict):
            arguments = {"value": arguments}
        block = {"type": "tool_use", "id": part.id, "name": part.name, "input": arguments}
        if same:
            block.update(part.extra)
        return block
    if isinstance(part, ThinkingPart):
        if part.redacted:
            if part.protocol == PROTOCOL and part.signature:
                return {"type": "redacted_thinking", "data": part.signature}
            return None
        if outgoing and (part.protocol != PROTOCOL or not part.signature):
            return None  # never forward thinking Anthropic did not sign
        block = {"type": "thinking", "thinking": part.text}
        if part.signature and part.protocol == PROTOCOL:
            block["signature"] = part.signature
        elif not outgoing:
            block["signature"] = ""
        return block
    if isinstance(part, OpaquePart):
        if part.text is not None and part.protocol != PROTOCOL:
            return {"type": "text", "text": part.text}
        if carried(part, PROTOCOL):
            return part.data
    return None


def unsigned_thinking_in_last_turn(messages: Any) -> bool:
    """Whether the last assistant message of a wire body has a thinking block without a
    signature: another backend's thinking, which llmproxy handed an Anthropic client without
    the foreign signature, and which the API refuses (the provider then re-encodes)."""
    if not isinstance(messages, list):
        return False
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "assistant":
            content = message.get("content")
            return isinstance(content, list) and any(
                isinstance(block, dict) and block.get("type") == "thinking" and not block.get("signature") for block in content
            )
    return False


def _unsigned_tool_turn(messages: list[dict[str, Any]]) -> bool:
    """Whether the last assistant message calls tools without starting with a thinking block."""
    for message in reversed(messages):
        if message.get("role") == "assistant":
            content = message.get("content")
            if not isinstance(content, list) or not any(b.get("type") == "tool_use" for b in content):
                return False
            return content[0].get("type") not in ("thinking", "redacted_thinking")
    return False


def _encode_messages(messages: list[Message], same: bool) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for message in messages:
        if message.role == "tool":
            blocks = []
            for part in message.parts:
                if isinstance(part, ToolResultPart):
                    inner = [b for b in (_encode_block(p, same, True) for p in part.content) if b is not None]
                    if inner and all(b["type"] == "text" and len(b) == 2 for b in inner):
                        content: Any = "".join(b["text"] for b in inner) if len(inner) == 1 else inner
                    else:
                        content = inner
                    block: dict[str, Any] = {"type": "tool_result", "tool_use_id": part.tool_call_id, "content": content}
                    if part.is_error:
                        block["is_error"] = True
                    if same:
                        block.update(part.extra)
                    blocks.append(block)
            _append(out, "user", blocks)
            continue
        role = message.role
        blocks = [b for b in (_encode_block(p, same, True) for p in message.parts) if b is not None]
        if role in ("system", "developer"):
            if same and role == "system":
                text = "".join(b.get("text", "") for b in blocks if b.get("type") == "text")
                out.append({"role": "system", "content": text})
                continue
            role = "user"
            blocks = [{"type": "text", "text": f"<system>\n{b['text']}\n</system>"} for b in blocks if b.get("type") == "text"]
        if not blocks:
            continue
        if same and message.extra:
            entry = {"role": role, "content": blocks, **message.extra}
            out.append(entry)
            continue
        _append(out, role, blocks)
    for entry in out:  # a lone plain text block is sent as a string, as clients write it
        content = entry["content"]
        if isinstance(content, list) and len(content) == 1 and content[0].keys() == {"type", "text"} and content[0]["type"] == "text":
            entry["content"] = content[0]["text"]
    return out


def _append(out: list[dict[str, Any]], role: str, blocks: list[dict[str, Any]]) -> None:
    """Merge into the previous turn when it has the same role (tool results + user text)."""
    if out and out[-1]["role"] == role and isinstance(out[-1]["content"], list) and len(out[-1]) == 2:
        out[-1]["content"].extend(blocks)
    else:
        out.append({"role": role, "content": list(blocks)})


class AnthropicStreamDecoder(SSEStreamDecoder):
    """Anthropic SSE events → canonical events."""

    __slots__ = ("_stop", "_stop_sequence", "_usage", "_done", "_kinds")

    def __init__(self) -> None:
        super().__init__()
        self._stop: str | None = None
        self._stop_sequence: str | None = None  # which of the request's stop_sequences ended it
        self._usage = Usage()
        self._done = False
        self._kinds: dict[int, str] = {}

    def _end(self, events: list[StreamEvent]) -> None:
        if not self._done:
            if self._stop is None:
                raise ProxyError(502, "upstream stream ended before message_stop")
            events.append(self._stop_event())
            self._done = True

    def _stop_event(self) -> StreamEvent:
        event = StreamEvent(EventKind.STOP, stop_reason=self._stop or "end_turn", usage=self._usage)
        if self._stop_sequence:
            event.extra = {"stop_sequence": self._stop_sequence}
        return event

    def _frame(self, name: str | None, data: bytes, events: list[StreamEvent]) -> None:
        if self._done or not data:
            return
        try:
            event = loads(data)
        except ValueError:
            raise ProxyError(502, f"upstream sent a malformed stream event: {data[:200]!r}") from None
        kind = event.get("type") or name
        if kind == "content_block_delta":
            index = event.get("index", 0)
            delta = event.get("delta") or {}
            dtype = delta.get("type")
            if dtype == "text_delta":
                events.append(StreamEvent(EventKind.TEXT, index=index, text=delta.get("text", "")))
            elif dtype == "input_json_delta":
                if delta.get("partial_json"):
                    events.append(StreamEvent(EventKind.TOOL_CALL_DELTA, index=index, text=delta["partial_json"]))
            elif dtype == "thinking_delta":
                events.append(StreamEvent(EventKind.THINKING, index=index, text=delta.get("thinking", "")))
            elif dtype == "signature_delta":
                events.append(StreamEvent(EventKind.THINKING, index=index, signature=delta.get("signature")))
            elif dtype == "citations_delta":
                events.append(StreamEvent(EventKind.TEXT, index=index, extra={"citation": delta.get("citation")}))
        elif kind == "content_block_start":
            index = event.get("index", 0)
            block = event.get("content_block") or {}
            btype = block.get("type")
            self._kinds[index] = btype
            if btype == "tool_use":
                events.append(StreamEvent(EventKind.TOOL_CALL_START, index=index, id=block.get("id"), name=block.get("name")))
                if block.get("input"):
                    events.append(StreamEvent(EventKind.TOOL_CALL_DELTA, index=index, text=dumps(block["input"]).decode()))
            elif btype == "text":
                if block.get("text"):
                    events.append(StreamEvent(EventKind.TEXT, index=index, text=block["text"]))
            elif btype == "thinking":
                events.append(StreamEvent(EventKind.THINKING, index=index, text=block.get("thinking", ""), signature=block.get("signature") or None))
            elif btype == "redacted_thinking":
                events.append(StreamEvent(EventKind.THINKING, index=index, signature=block.get("data"), extra={"redacted": True}))
            else:
                events.append(StreamEvent(EventKind.TEXT, index=index, extra={"anthropic_block": block}))
        elif kind == "content_block_stop":
            events.append(StreamEvent(EventKind.BLOCK_STOP, index=event.get("index", 0)))
        elif kind == "message_start":
            message = event.get("message") or {}
            self._usage = decode_usage(message.get("usage"))
            # The input tokens are known from the start (clients show them as the context used)
            events.append(StreamEvent(EventKind.START, id=message.get("id"), model=message.get("model"), usage=self._usage))
        elif kind == "message_delta":
            delta = event.get("delta") or {}
            if delta.get("stop_reason"):
                self._stop = STOP_FROM_WIRE.get(delta["stop_reason"], "end_turn")
            if isinstance(delta.get("stop_sequence"), str):
                self._stop_sequence = delta["stop_sequence"]
            usage = event.get("usage")
            if isinstance(usage, dict):
                merged = decode_usage({**encode_usage(self._usage), **{k: v for k, v in usage.items() if v is not None}})
                self._usage = merged
                events.append(StreamEvent(EventKind.USAGE, usage=merged))
        elif kind == "message_stop":
            events.append(self._stop_event())
            self._done = True
        elif kind == "error":
            err = event.get("error") or {}
            status = {"overloaded_error": 529, "rate_limit_error": 429, "api_error": 500}.get(err.get("type"), 502)
            raise ProxyError(status, f"upstream error mid-stream: {err.get('message', err)}", kind=err.get("type"), in_stream=True)
        # ping and unknown events carry nothing canonical


# A content_block_delta frame up to its value: index, delta type and the delta's field name.
# orjson writes the same bytes for the whole dict, so the frames are identical.
_TEXT = EventKind.TEXT
_DELTA_HEAD = b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,"delta":{"type":"%s","%s":'


class AnthropicStreamEncoder:
    """Canonical events → Anthropic SSE, with every event's ``event:`` line."""

    __slots__ = ("_model", "_id", "_started", "_open", "_blocks", "_next", "_usage", "_kinds", "_signed", "_heads", "_text_index", "_text_head")

    def __init__(self, model: str) -> None:
        self._model = model
        self._id = f"msg_{random_hex(24)}"
        self._heads: dict[tuple[int, str], bytes] = {}  # (wire index, delta type) -> frame head
        self._started = False
        self._open: int | None = None  # wire index of the open block
        self._blocks: dict[int, int] = {}  # canonical index -> wire index
        self._kinds: dict[int, str] = {}
        self._next = 0
        self._usage = Usage()
        self._signed: set[int] = set()
        # Text for the block that is open, what nearly every event of a stream is, takes a
        # short way: the canonical index of that block and its frame head, kept from one
        # text event to the next (and from one batch to the next: a paced stream's batch is
        # one event). Any other event may open or close blocks, so it clears them.
        self._text_index: int | None = None
        self._text_head = b""

    def _start(self, out: list[bytes], event: StreamEvent | None = None) -> None:
        if event is not None:
            if event.model:
                self._model = event.model
            if event.id and event.id.startswith("msg_"):
                self._id = event.id
            if event.usage is not None:
                self._usage = event.usage
        message = {
            "id": self._id, "type": "message", "role": "assistant", "model": self._model, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": {**encode_usage(self._usage), "output_tokens": 1},
        }
        out.append(sse_frame(dumps({"type": "message_start", "message": message}), "message_start"))
        out.append(b'event: ping\ndata: {"type":"ping"}\n\n')
        self._started = True

    def _close_open(self, out: list[bytes]) -> None:
        if self._open is not None:
            out.append(sse_frame(b'{"type":"content_block_stop","index":%d}' % self._open, "content_block_stop"))
            self._open = None

    def _block(self, index: int, kind: str, out: list[bytes], start: dict[str, Any]) -> int | None:
        wire = self._blocks.get(index)
        if wire is None:
            self._close_open(out)
            wire = self._blocks[index] = self._next
            self._kinds[wire] = kind
            self._next += 1
            self._open = wire
            out.append(sse_frame(dumps({"type": "content_block_start", "index": wire, "content_block": start}), "content_block_start"))
        elif wire != self._open:
            return None  # that block was already closed; Anthropic blocks cannot reopen
        return wire

    def _delta(self, wire: int, kind: str, field: str, value: Any, out: list[bytes]) -> bytes:
        """A ``content_block_delta`` frame. Every delta of one kind in one block is the same
        bytes around its value, so those are built once per block and kept: a dict and a
        dump per event would cost more than all the rest of encoding a text delta. Returns
        those bytes (the frame's head)."""
        head = self._heads.get((wire, kind))
        if head is None:
            head = self._heads[(wire, kind)] = _DELTA_HEAD % (wire, kind.encode(), field.encode())
        out.append(head + dumps(value) + b"}}\n\n")
        return head

    def text_literal(self, index: int, literal: bytes) -> bytes | None:
        """(StreamEncoder.text_literal) The literal in the open text block's remembered
        frame head, as :meth:`encode` would write its text."""
        if index != self._text_index or self._text_index is None:
            return None
        return self._text_head + literal + b"}}\n\n"

    def encode(self, events: list[StreamEvent]) -> bytes:
        text_index, text_head = self._text_index, self._text_head
        if len(events) == 1:  # a paced stream's read: one event, nearly always text
            event = events[0]
            if event.kind == _TEXT and event.index == text_index and text_index is not None:
                return text_head + dumps(event.text) + b"}}\n\n" if event.text else b""
        out: list[bytes] = []
        for event in events:
            kind = event.kind
            if kind == _TEXT and event.index == text_index:
                if event.text:
                    out.append(text_head + dumps(event.text) + b"}}\n\n")
                continue
            text_index = self._text_index = None
            if not self._started and kind != EventKind.ERROR:
                self._start(out, event if kind == EventKind.START else None)
                if kind == EventKind.START:
                    continue
            if kind == EventKind.TEXT:
                if event.text:
                    wire = self._blocks.get(event.index)
                    if wire is None or wire != self._open:  # not the open block: _block knows what to do
                        wire = self._block(event.index, "text", out, {"type": "text", "text": ""})
                    if wire is not None:
                        text_head = self._text_head = self._delta(wire, "text_delta", "text", event.text, out)
                        text_index = self._text_index = event.index
            elif kind == EventKind.TOOL_CALL_DELTA:
                wire = self._blocks.get(event.index)
                if wire is not None and wire == self._open:
                    self._delta(wire, "input_json_delta", "partial_json", event.text, out)
            elif kind == EventKind.TOOL_CALL_START:
                self._block(event.index, "tool_use", out, {"type": "tool_use", "id": event.id, "name": event.name, "input": {}})
            elif kind == EventKind.THINKING:
                if event.extra and event.extra.get("redacted"):
                    self._block(event.index, "redacted_thinking", out, {"type": "redacted_thinking", "data": event.signature or ""})
                    continue
                wire = self._block(event.index, "thinking", out, {"type": "thinking", "thinking": "", "signature": ""})
                if wire is None:
                    continue
                if event.text:
                    self._delta(wire, "thinking_delta", "thinking", event.text, out)
                # Another family's signature (decoders name theirs in ``signed_by``) stays
                # out: the client would hand it back as Anthropic's, which the API refuses.
                if event.signature and (event.extra or {}).get("signed_by", PROTOCOL) == PROTOCOL:
                    self._signed.add(wire)
                    self._delta(wire, "signature_delta", "signature", event.signature, out)
            elif kind == EventKind.BLOCK_STOP:
                wire = self._blocks.get(event.index)
                if wire is not None and wire == self._open:
                    self._close_open(out)
            elif kind == EventKind.USAGE:
                if event.usage is not None:
                    self._usage = event.usage
            elif kind == EventKind.STOP:
                self._close_open(out)
                usage = event.usage or self._usage
                stop_sequence = event.extra.get("stop_sequence") if event.extra else None
                delta = {"type": "message_delta", "delta": {"stop_reason": STOP_TO_WIRE.get(event.stop_reason, "end_turn"), "stop_sequence": stop_sequence},
                         "usage": encode_usage(usage)}
                out.append(sse_frame(dumps(delta), "message_delta"))
                out.append(b'event: message_stop\ndata: {"type":"message_stop"}\n\n')
            elif kind == EventKind.START:
                pass
            elif kind == EventKind.ERROR:
                error = event.error if isinstance(event.error, ProxyError) else ProxyError(500, str(event.error))
                out.append(AnthropicCodec().error_event(error))
        return b"".join(out)
