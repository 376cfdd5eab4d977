"""OpenAI Chat Completions (`/v1/chat/completions`) ⇄ the canonical model.

Used by the OpenAI front-end and by every OpenAI-compatible provider. Fields the canonical
model has no name for stay in ``extra`` and are written back when both sides speak this
protocol, so logprobs, ``n``, ``service_tier``, vendor extensions and the like pass through.
"""

from __future__ import annotations

import re
import time
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
from .base import SSESplitter, SSEStreamDecoder, array, carried, dumps, loads, random_hex, sse_frame, web_url

PROTOCOL = "openai_chat"

# Request keys read into canonical fields; everything else is kept in Request.extra.
_PARAM_KEYS = ("temperature", "top_p", "max_tokens", "stop", "seed", "presence_penalty", "frequency_penalty", "n", "user")
_KNOWN_KEYS = frozenset(
    _PARAM_KEYS
    + (
        "model",
        "messages",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "response_format",
        "stream",
        "stream_options",
        "reasoning_effort",
        "max_completion_tokens",
        "metadata",
    )
)
_ROLES = frozenset(("system", "developer", "user", "assistant", "tool", "function"))

FINISH_TO_STOP = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "content_filter",
}
STOP_TO_FINISH = {
    "end_turn": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "stop_sequence": "stop",
    "content_filter": "content_filter",
    "error": "stop",
    None: "stop",
}


def effort_for_budget(budget: Any) -> str:
    """A reasoning budget in tokens as OpenAI's ``reasoning_effort`` (the same steps as the
    Responses codec uses)."""
    try:
        budget = int(budget)
    except (TypeError, ValueError):
        return "medium"
    return "low" if budget <= 2048 else "medium" if budget <= 8192 else "high"


class OpenAIChatCodec:
    protocol = PROTOCOL
    content_type_stream = "text/event-stream"
    error_ends_connection = False

    # -- requests ----------------------------------------------------------------------
    def peek(self, body: dict[str, Any]) -> tuple[str, bool]:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise bad_request("'model' is required and must be a non-empty string", "model")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise bad_request("'messages' is required and must be a non-empty array", "messages")
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise bad_request(f"messages[{i}] must be an object", f"messages[{i}]")
            role = message.get("role")
            if not isinstance(role, str) or role not in _ROLES:
                raise bad_request(
                    f"messages[{i}].role must be one of {sorted(_ROLES)}, got {message.get('role')!r}",
                    f"messages[{i}].role",
                )
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise bad_request("'stream' must be a boolean", "stream")
        return model, stream

    def decode_request(self, body: dict[str, Any]) -> Request:
        model, stream = self.peek(body)
        request = Request(model=model, stream=stream, protocol=PROTOCOL)
        request.extra = {k: v for k, v in body.items() if k not in _KNOWN_KEYS}
        params = request.params
        for key in _PARAM_KEYS:
            if key in body:
                params[key] = body[key]
        _check_numbers(body)
        if "max_completion_tokens" in body:
            params["max_tokens"] = body["max_completion_tokens"]
            params["_max_tokens_key"] = "max_completion_tokens"
        options = body.get("stream_options")
        if isinstance(options, dict):
            request.include_usage = bool(options.get("include_usage"))
        if isinstance(body.get("metadata"), dict):
            request.metadata = body["metadata"]
        if "reasoning_effort" in body:
            request.reasoning = {"effort": body["reasoning_effort"]}
        if "parallel_tool_calls" in body:
            request.parallel_tool_calls = body["parallel_tool_calls"]
        request.tools = [_decode_tool(t, i) for i, t in enumerate(array(body.get("tools"), "tools"))]
        request.tool_choice = _decode_tool_choice(body.get("tool_choice"))
        request.response_format = _decode_response_format(body.get("response_format"))

        messages = body["messages"]
        start = 0
        # Leading system/developer messages become the canonical system prompt; later ones
        # stay in place as messages (agents do send system turns mid-conversation).
        while start < len(messages) and messages[start]["role"] in ("system", "developer"):
            message = messages[start]
            for part in _decode_content(message.get("content"), f"messages[{start}].content"):
                if isinstance(part, TextPart):
                    if message["role"] == "developer":
                        part.extra["role"] = "developer"
                    request.system.append(part)
            start += 1
        request.messages = [_decode_message(m, i) for i, m in enumerate(messages[start:], start)]
        return request

    def encode_request(self, request: Request, model: str) -> dict[str, Any]:
        same = request.protocol == PROTOCOL
        body: dict[str, Any] = dict(request.extra) if same else {}
        body["model"] = model
        messages: list[dict[str, Any]] = []
        for part in request.system:
            messages.append({"role": part.extra.get("role", "system") if same else "system", "content": part.text})
        for message in request.messages:
            messages.extend(_encode_message(message, same))
        body["messages"] = messages
        params = dict(request.params)
        max_key = params.pop("_max_tokens_key", "max_tokens")
        if "max_tokens" in params:
            params[max_key] = params.pop("max_tokens")
        # Only parameters Chat Completions has: OpenAI answers 400 "Unrecognized request
        # argument" to others, such as the top_k that Gemini CLI (topK) always sends.
        body.update((k, v) for k, v in params.items() if k in _PARAM_KEYS or k == "max_completion_tokens")
        if request.tools:
            body["tools"] = [_encode_tool(t, same) for t in request.tools]
        if request.tool_choice is not None:
            body["tool_choice"] = _encode_tool_choice(request.tool_choice)
        if request.parallel_tool_calls is not None and request.tools:
            body["parallel_tool_calls"] = request.parallel_tool_calls
        if request.response_format is not None:
            body["response_format"] = _encode_response_format(request.response_format)
        reasoning = request.reasoning or {}
        if reasoning.get("effort"):
            body["reasoning_effort"] = reasoning["effort"]
        elif reasoning.get("budget_tokens"):  # Anthropic's / Gemini's budget → an effort
            body["reasoning_effort"] = effort_for_budget(reasoning["budget_tokens"])
        if same and request.metadata:
            body["metadata"] = request.metadata
        if request.stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body

    # -- responses ---------------------------------------------------------------------
    def decode_response(self, body: dict[str, Any]) -> Response:
        choices = body.get("choices")
        if not isinstance(choices, list):
            raise ProxyError(502, "upstream answer has no 'choices' array")
        response = Response(model=body.get("model") or "", id=body.get("id"), protocol=PROTOCOL)
        response.extra = {k: v for k, v in body.items() if k not in ("choices", "usage", "model", "id", "object")}
        if choices:
            choice = choices[0]
            message = choice.get("message") or {}
            parts = response.parts
            reasoning = message.get("reasoning_content") or message.get("reasoning")
            if isinstance(reasoning, str) and reasoning:
                parts.append(ThinkingPart(text=reasoning, protocol=PROTOCOL))
            content = message.get("content")
            if content:
                parts.extend(_decode_content(content, "choices[0].message.content"))
            for call in message.get("tool_calls") or ():
                fn = call.get("function") or {}
                parts.append(ToolCallPart(id=call.get("id") or _call_id(), name=fn.get("name", ""), arguments=fn.get("arguments") or "{}"))
            response.stop_reason = FINISH_TO_STOP.get(choice.get("finish_reason"), "end_turn")
            if response.stop_reason == "end_turn" and message.get("tool_calls"):
                response.stop_reason = "tool_use"  # calls made, yet "stop" (Ollama, some vLLM parsers): the client must run them
            extra_message = {k: v for k, v in message.items() if k not in ("role", "content", "tool_calls", "reasoning_content", "reasoning")}
            if extra_message:
                response.extra["_message"] = extra_message
            if choice.get("logprobs") is not None:
                response.extra["_logprobs"] = choice["logprobs"]
            if len(choices) > 1:
                response.extra["_choices"] = choices[1:]
        response.usage = decode_usage(body.get("usage"))
        return response

    def encode_response(self, response: Response, request: Request | None) -> dict[str, Any]:
        same = response.protocol == PROTOCOL
        extra = response.extra if same else {}
        message: dict[str, Any] = {"role": "assistant", "content": None}
        message.update(extra.get("_message", ()))
        text = "".join(p.text for p in response.parts if isinstance(p, TextPart))
        message["content"] = text if text or not response.tool_calls else None
        reasoning = "".join(p.text for p in response.parts if isinstance(p, ThinkingPart))
        if reasoning:
            message["reasoning_content"] = reasoning
        calls = response.tool_calls
        if calls:
            message["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments or "{}"}} for c in calls
            ]
        choice = {"index": 0, "message": message, "logprobs": extra.get("_logprobs"), "finish_reason": STOP_TO_FINISH.get(response.stop_reason, "stop")}
        body = {
            "id": response.id or f"chatcmpl-{random_hex(24)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": response.model,
            "choices": [choice, *extra.get("_choices", ())],
            "usage": encode_usage(response.usage),
        }
        body.update((k, v) for k, v in extra.items() if not k.startswith("_"))
        return body

    # -- streams -----------------------------------------------------------------------
    def stream_decoder(self) -> "ChatStreamDecoder":
        return ChatStreamDecoder()

    def stream_complete(self, tail: bytes) -> bool:
        return b"[DONE]" in tail

    def stream_encoder(self, flow: Any) -> "ChatStreamEncoder":
        if flow.request_decoded:
            include_usage = flow.request.include_usage
        else:
            options = flow.raw_request.get("stream_options")
            include_usage = bool(options.get("include_usage")) if isinstance(options, dict) else False
        return ChatStreamEncoder(flow.model, include_usage)

    # -- errors ------------------------------------------------------------------------
    def error_body(self, error: ProxyError) -> dict[str, Any]:
        return {"error": {"message": error.message, "type": error.kind, "param": error.param, "code": error.code}}

    def error_event(self, error: ProxyError) -> bytes:
        return sse_frame(dumps(self.error_body(error)))


def decode_usage(usage: Any) -> Usage:
    if not isinstance(usage, dict):
        return Usage()
    prompt = usage.get("prompt_tokens_details") or {}
    completion = usage.get("completion_tokens_details") or {}
    return Usage(
        input_tokens=usage.get("prompt_tokens") or 0,
        output_tokens=usage.get("completion_tokens") or 0,
        cached_input_tokens=prompt.get("cached_tokens") or 0,
        reasoning_tokens=completion.get("reasoning_tokens") or 0,
    )


def encode_usage(usage: Usage) -> dict[str, Any]:
    body: dict[str, Any] = {
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.input_tokens + usage.output_tokens,
    }
    if usage.cached_input_tokens:
        body["prompt_tokens_details"] = {"cached_tokens": usage.cached_input_tokens}
    if usage.reasoning_tokens:
        body["completion_tokens_details"] = {"reasoning_tokens": usage.reasoning_tokens}
    return body


def _call_id() -> str:
    return f"call_{random_hex(24)}"


def _decode_tool(tool: Any, i: int) -> Tool:
    if not isinstance(tool, dict):
        raise bad_request(f"tools[{i}] must be an object", f"tools[{i}]")
    fn = tool.get("function")
    if tool.get("type", "function") != "function" or not isinstance(fn, dict):
        raise bad_request(f"tools[{i}]: only function tools are supported, with a 'function' object", f"tools[{i}]")
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise bad_request(f"tools[{i}].function.name is required", f"tools[{i}].function.name")
    parameters = fn.get("parameters")
    if parameters is None:
        parameters = {"type": "object", "properties": {}}
    elif not isinstance(parameters, dict):
        raise bad_request(f"tools[{i}].function.parameters must be a JSON schema object", f"tools[{i}].function.parameters")
    extra = {k: v for k, v in fn.items() if k not in ("name", "description", "parameters", "strict")}
    return Tool(name=name, description=fn.get("description"), parameters=parameters, strict=fn.get("strict"), extra=extra)


def _encode_tool(tool: Tool, same: bool) -> dict[str, Any]:
    fn: dict[str, Any] = dict(tool.extra) if same else {}
    fn["name"] = tool.name
    if tool.description is not None:
        fn["description"] = tool.description
    fn["parameters"] = tool.parameters
    if tool.strict is not None:
        fn["strict"] = tool.strict
    return {"type": "function", "function": fn}


def _decode_tool_choice(choice: Any) -> str | None:
    if choice is None or isinstance(choice, str):
        if choice not in (None, "auto", "none", "required"):
            raise bad_request("tool_choice must be 'auto', 'none', 'required' or a function", "tool_choice")
        return choice
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        if isinstance(name, str) and name:
            return name
    raise bad_request("tool_choice must be 'auto', 'none', 'required' or {type: function, function: {name}}", "tool_choice")


def _encode_tool_choice(choice: str) -> Any:
    if choice in ("auto", "none", "required"):
        return choice
    return {"type": "function", "function": {"name": choice}}


def _decode_response_format(fmt: Any) -> dict[str, Any] | None:
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise bad_request("response_format.type must be 'text', 'json_object' or 'json_schema'", "response_format.type")
    if fmt["type"] == "text":
        return None
    if fmt["type"] == "json_object":
        return {"type": "json_object"}
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
        raise bad_request("response_format.json_schema must be an object with a 'schema'", "response_format.json_schema")
    out = {"type": "json_schema", "name": spec.get("name", "response"), "schema": spec.get("schema", {})}
    if "strict" in spec:
        out["strict"] = spec["strict"]
    if "description" in spec:
        out["description"] = spec["description"]
    return out


def _encode_response_format(fmt: dict[str, Any]) -> dict[str, Any]:
    if fmt["type"] == "json_object":
        return {"type": "json_object"}
    spec = {k: v for k, v in fmt.items() if k != "type"}
    spec.setdefault("name", "response")
    return {"type": "json_schema", "json_schema": spec}


def _decode_content(content: Any, where: str) -> list[Part]:
    if content is None:
        return []
    if isinstance(content, str):
        return [TextPart(content)]
    if not isinstance(content, list):
        raise bad_request(f"{where} must be a string or an array of content parts", where)
    parts: list[Part] = []
    for i, item in enumerate(content):
        if not isinstance(item, dict):
            raise bad_request(f"{where}[{i}] must be an object", f"{where}[{i}]")
        kind = item.get("type")
        if kind == "text":
            text = item.get("text")
            if not isinstance(text, str):
                raise bad_request(f"{where}[{i}].text must be a string", f"{where}[{i}].text")
            parts.append(TextPart(text, extra={k: v for k, v in item.items() if k not in ("type", "text")}))
        elif kind == "image_url":
            image = item.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str):
                raise bad_request(f"{where}[{i}].image_url.url must be a string", f"{where}[{i}].image_url")
            extra = {k: v for k, v in image.items() if k != "url"} if isinstance(image, dict) else {}
            parts.append(image_from_url(url, extra))
        elif kind == "file":
            file = item.get("file")
            data = file.get("file_data") if isinstance(file, dict) else None
            if isinstance(data, str):
                parts.append(file_from_data(data, file.get("filename"), {k: v for k, v in file.items() if k not in ("file_data", "filename")}))  # type: ignore[union-attr]
            else:
                parts.append(OpaquePart(PROTOCOL, item, essential=True))  # a file_id: OpenAI's own
        else:
            parts.append(OpaquePart(PROTOCOL, item))
    return parts


def _data_url(url: str) -> tuple[str, str] | None:
    """(media type, base64 data) of a ``data:…;base64,…`` URL, else None."""
    if url.startswith("data:") and ";base64," in url:
        header, data = url[5:].split(";base64,", 1)
        return header, data
    return None


def file_from_data(data: str, name: Any = None, extra: dict[str, Any] | None = None) -> FilePart:
    """OpenAI's ``file_data``: a data: URL, or (as some clients send it) bare base64 of a PDF."""
    media_type, data = _data_url(data) or ("application/pdf", data)
    return FilePart(data=data, media_type=media_type or "application/pdf", name=name if isinstance(name, str) and name else None, extra=extra or {})


def file_to_data(part: FilePart) -> str:
    return f"data:{part.media_type or 'application/pdf'};base64,{part.data}"


def image_from_url(url: str, extra: dict[str, Any] | None = None) -> ImagePart:
    """A data: URL becomes inline data with its media type; anything else stays a URL."""
    inline = _data_url(url)
    if inline is not None:
        return ImagePart(data=inline[1], media_type=inline[0] or "application/octet-stream", extra=extra or {})
    return ImagePart(url=url, extra=extra or {})


def image_to_url(part: ImagePart) -> str:
    if part.data is not None:
        return f"data:{part.media_type or 'image/png'};base64,{part.data}"
    return web_url(part.url or "", "OpenAI")


def _encode_parts(parts: list[Part], same: bool) -> str | list[dict[str, Any]] | None:
    """Plain string content when the message is text only (what most servers expect)."""
    content: list[dict[str, Any]] = []
    simple = True
    for part in parts:
        if isinstance(part, TextPart):
            if part.extra and same:
                simple = False
                content.append({"type": "text", "text": part.text, **part.extra})
            else:
                content.append({"type": "text", "text": part.text})
        elif isinstance(part, ImagePart):
            simple = False
            image = {"url": image_to_url(part)}
            if same:
                image.update(part.extra)
            content.append({"type": "image_url", "image_url": image})
        elif isinstance(part, FilePart):
            if part.data is None:
                raise ProxyError(400, "a document given by URL cannot be sent to an OpenAI Chat backend, which takes files inline only")
            simple = False
            file = {"filename": part.name or "document", "file_data": file_to_data(part)}
            if same:
                file.update(part.extra)
            content.append({"type": "file", "file": file})
        elif isinstance(part, OpaquePart):
            if part.text is not None and part.protocol != PROTOCOL:
                content.append({"type": "text", "text": part.text})
            elif carried(part, PROTOCOL):
                simple = False
                content.append(part.data)
    if not content:
        return None
    if simple:
        return "".join(c["text"] for c in content)
    return content


# Numeric settings and the JSON types OpenAI takes for them: checked when a request is
# translated, so that another backend never receives "lots" as max_tokens.
_NUMBERS = {"max_tokens": int, "max_completion_tokens": int, "n": int, "seed": int, "top_logprobs": int,
            "temperature": (int, float), "top_p": (int, float), "presence_penalty": (int, float), "frequency_penalty": (int, float)}


def _check_numbers(body: dict[str, Any]) -> None:
    for key, kind in _NUMBERS.items():
        value = body.get(key)
        if value is not None and (value.__class__ is bool or not isinstance(value, kind)):
            expected = "an integer" if kind is int else "a number"
            raise bad_request(f"'{key}' must be {expected}, got {value!r}", key)


def _decode_message(message: dict[str, Any], i: int) -> Message:
    role = message["role"]
    where = f"messages[{i}]"
    if role == "user" and message.get("content") is None:
        raise bad_request(f"{where}.content is required for user messages (a string or an array of parts)", f"{where}.content")
    extra = {k: v for k, v in message.items() if k not in ("role", "content", "tool_calls", "tool_call_id", "name", "reasoning_content")}
    if role in ("tool", "function"):
        call_id = message.get("tool_call_id") or message.get("name")
        if not isinstance(call_id, str):
            raise bad_request(f"{where}.tool_call_id is required for tool messages", f"{where}.tool_call_id")
        content = _decode_content(message.get("content"), f"{where}.content")
        return Message(role="tool", parts=[ToolResultPart(tool_call_id=call_id, content=content, name=message.get("name"))], extra=extra)
    parts: list[Part] = []
    reasoning = message.get("reasoning_content")
    if isinstance(reasoning, str) and reasoning:
        parts.append(ThinkingPart(text=reasoning, protocol=PROTOCOL))
    parts.extend(_decode_content(message.get("content"), f"{where}.content"))
    for j, call in enumerate(message.get("tool_calls") or ()):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise bad_request(f"{where}.tool_calls[{j}].function.name is required", f"{where}.tool_calls[{j}].function")
        arguments = fn.get("arguments")
        if not isinstance(arguments, str):
            arguments = dumps(arguments or {}).decode()
        parts.append(ToolCallPart(id=call.get("id") or _call_id(), name=fn["name"], arguments=arguments))
    return Message(role=role, parts=parts, name=message.get("name"), extra=extra)


def _encode_message(message: Message, same: bool) -> list[dict[str, Any]]:
    if message.role == "tool" or any(isinstance(p, ToolResultPart) for p in message.parts):
        out: list[dict[str, Any]] = []
        rest: list[Part] = []
        for part in message.parts:
            if isinstance(part, ToolResultPart):
                # A tool message holds text only: images or files a tool returned (a
                # screenshot Claude Code's Read tool took, say) follow in a user message,
                # after every tool message, as the API wants them next to the calls.
                media = [p for p in part.content if isinstance(p, (ImagePart, FilePart))]
                if media:
                    rest += [TextPart(f"(attached by the result of tool call {part.tool_call_id})"), *media]
                content = _encode_parts([p for p in part.content if not isinstance(p, (ImagePart, FilePart))], same)
                if content is None:
                    content = ""
                if part.is_error and isinstance(content, str):
                    content = content if content.lower().startswith("error") else f"Error: {content}"
                out.append({"role": "tool", "tool_call_id": part.tool_call_id, "content": content})
            else:
                rest.append(part)
        if rest:
            out.append({"role": "user", "content": _encode_parts(rest, same) or ""})
        return out
    body: dict[str, Any] = dict(message.extra) if same else {}
    body["role"] = message.role if message.role != "developer" or same else "system"
    if message.name:
        body["name"] = message.name
    if message.role == "assistant":
        calls = [p for p in message.parts if isinstance(p, ToolCallPart)]
        body["content"] = _encode_parts(message.parts, same)
        if body["content"] is None and not calls and not same:
            return []  # only what another protocol's backend alone can read: nothing to send
        if calls:
            body["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments or "{}"}} for c in calls
            ]
        reasoning = [p for p in message.parts if isinstance(p, ThinkingPart) and p.protocol == PROTOCOL]
        if reasoning and same:
            body["reasoning_content"] = "".join(p.text for p in reasoning)
    else:
        content = _encode_parts(message.parts, same)
        if content is None and message.parts and not same:
            return []  # (as above)
        body["content"] = content if content is not None else ""
    return [body]


# A JSON string literal, unrolled so that matching is linear: runs of plain characters
# between escapes. What it admits orjson still parses (and may refuse: bad UTF-8, a lone
# surrogate), so it only has to prove where each literal begins and ends.
_STRING = rb'"[^"\\\x00-\x1f]*(?:\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4})[^"\\\x00-\x1f]*)*"'
_STRINGS = re.compile(_STRING + rb"(?:\n" + _STRING + rb")*")
_NAME = rb'"[\x20\x21\x23-\x5b\x5d-\x7e]*"'  # an id or model name without escapes
# The payload of a chunk that carries nothing but text for the first choice, as OpenAI and
# most compatible servers send it; group 1 is the content's literal. Everything around it
# is the same in every such chunk of a stream.
_PLAIN_TEXT_CHUNK = re.compile(
    rb'\{"id":' + _NAME + rb',"object":"chat\.completion\.chunk","created":(?:0|[1-9][0-9]{0,17}),"model":' + _NAME
    + rb'(?:,"service_tier":' + _NAME + rb')?(?:,"system_fingerprint":(?:' + _NAME + rb'|null))?'
    + rb',"choices":\[\{"index":0,"delta":\{"content":(' + _STRING + rb')\},"logprobs":null,"finish_reason":null\}\]'
    + rb'(?:,"usage":null)?\}'
)
# A JSON string literal that can be copied into another JSON document as it is, with no
# need to parse it to be sure: printable ASCII, UTF-8 (checked apart) and the short escapes.
# A \u escape (which may be a lone surrogate, refused by the parser) or a control byte is
# left to the parse.
_COPYABLE = re.compile(rb'"[\x20\x21\x23-\x5b\x5d-\x7e\x80-\xff]*(?:\\["\\/bfnrt][\x20\x21\x23-\x5b\x5d-\x7e\x80-\xff]*)*"')
_LEARN_ATTEMPTS = 3  # text chunks looked at for that shape before giving up on the stream
_SEGMENT = 32 * 1024  # bytes of frames mapped at a time (see ChatStreamDecoder._whole_frames)


class ChatStreamDecoder(SSEStreamDecoder):
    """Chat completion chunks → canonical events for the first choice.

    Bulk fast path: once a stream has sent a plain text chunk (see ``_PLAIN_TEXT_CHUNK``),
    its bytes around the content are known, and a run of chunks with exactly those bytes (a
    read, or a segment of one) is mapped by cutting them off, proving each remainder is one
    JSON string and parsing all of them in one call, instead of a parse per chunk. Anything
    else takes the general path, and both give the same events
    (tests/test_stream_fast_paths.py).
    """

    __slots__ = ("_started", "_blocks", "_naming", "_next_index", "_open", "_stop", "_usage", "_done", "_frame_head", "_frame_tail", "_learn",
                 "_current", "_current_args", "_held")

    def __init__(self) -> None:
        super().__init__()
        self._started = False
        self._blocks: dict[Any, int] = {}  # "text" | "thinking" | tool index -> canonical index
        self._naming: dict[Any, list[Any]] = {}  # tool index -> [id, name so far], until the call begins
        # Parallel calls go out one after the other, in the order they were announced, as
        # Anthropic's, Gemini's and Responses' clients need them: the call whose arguments
        # are being sent, its arguments so far, and the arguments of later calls held until
        # it is done (some servers interleave the calls' argument pieces).
        self._current: Any = None
        self._current_args: list[str] = []
        self._held: dict[Any, list[str]] = {}
        self._next_index = 0
        self._open: list[int] = []
        self._stop: str | None = None
        self._usage: Usage | None = None
        self._done = False
        # The bytes before and after the content of this stream's plain text chunks, SSE
        # framing included, once learned (then the bulk fast path is on).
        self._frame_head = b""
        self._frame_tail = b""
        self._learn = _LEARN_ATTEMPTS

    def _read(self, chunk: bytes, events: list[StreamEvent]) -> None:
        # A read of exactly one plain frame, as paced streams come, with nothing buffered
        # before it, is the commonest read of all: it skips the splitter altogether.
        if self._frame_head and chunk.find(b"\n\n") == len(chunk) - 2 and self._sse.between_frames() and self._plain_frame(chunk, events):
            return
        frames = self._sse.whole_frames(chunk) if self._frame_head or self._learn else None
        if frames is not None:
            self._whole_frames(*frames, events)
        else:
            for event_name, data in self._sse.feed(chunk):
                self._frame(event_name, data, events)

    def text_literal(self, chunk: bytes) -> tuple[int, bytes] | None:
        """If ``chunk`` is exactly one plain text frame of the learned shape, with nothing
        buffered before it, whose content is a literal that can be copied as it is (see
        ``_COPYABLE``): ``(block index, literal)``, the TEXT event :meth:`feed` would give,
        undecoded. Else None. Changes nothing either way (see StreamDecoder.text_literal)."""
        head = self._frame_head
        if not head or not chunk.startswith(head) or not chunk.endswith(self._frame_tail) or self._failed is not None:
            return None
        sse = self._sse
        if sse._buffer or sse._cr:  # (between_frames, inline: this runs once per event)
            return None
        # Head and tail hold no line end but the frame's final one, and a copyable literal
        # holds none, so a match proves the read is that one frame.
        literal = chunk[len(head) : len(chunk) - len(self._frame_tail)]
        if len(literal) < 3 or _COPYABLE.fullmatch(literal) is None:
            return None  # empty text, or one to parse: feed() says what it is
        if not literal.isascii():
            try:
                literal.decode()
            except UnicodeDecodeError:
                return None
        return self._blocks["text"], literal

    def _plain_frame(self, frame: bytes, events: list[StreamEvent]) -> bool:
        """If ``frame``, one whole frame, is a plain text chunk of the learned shape, append
        its event and return True; else change nothing and return False."""
        head, tail = self._frame_head, self._frame_tail
        if len(frame) < len(head) + len(tail) or not frame.startswith(head) or not frame.endswith(tail):
            return False
        # The general path reads whatever JSON value lies between head and tail as the
        # content (a string nearly always), so one parse of it is all the proof needed,
        # unless a line end (LF or CR, both JSON whitespace) made the frame two lines.
        literal = frame[len(head) : len(frame) - len(tail)]
        if b"\n" in literal or b"\r" in literal:
            return False
        try:
            text = loads(literal)
        except ValueError:
            return False  # the general path reports it
        if text and text.__class__ is not str:
            text = _delta_text(text)
        if text:
            events.append(StreamEvent(EventKind.TEXT, self._blocks["text"], text))
        return True

    def _whole_frames(self, whole: bytes, rest: bytes, events: list[StreamEvent]) -> None:
        """Append the events of the complete frames ``whole`` (LF line ends only) to
        ``events``, ``rest`` being the partial frame after them: runs of plain text chunks of
        the learned shape the fast way, anything else frame by frame as :meth:`feed` would."""
        self._sse.keep(rest)
        if self._frame_head and whole.find(b"\n\n") == len(whole) - 2 and self._plain_frame(whole, events):
            return  # one frame, completing what an earlier read began
        # A read is mapped a segment of whole frames at a time: a segment that is not all
        # plain text chunks (the first of a stream, the last, anything unusual) takes the
        # general path, and the others need not. Segments of cache size also copy faster
        # than the hundreds of KB a proxy slower than its backend reads at once.
        start = 0
        while start < len(whole):
            end = whole.find(b"\n\n", start + _SEGMENT)  # the first frame end past the size
            end = len(whole) if end < 0 else end + 2
            segment = whole[start:end] if start or end < len(whole) else whole
            start = end
            if self._frame_head:  # learned, possibly in an earlier segment of this read
                texts = self._texts(segment, self._frame_head, self._frame_tail)
                if texts is not None:
                    text = "".join(texts)
                    if text:
                        events.append(StreamEvent(EventKind.TEXT, self._blocks["text"], text))
                    continue
            for event_name, data in SSESplitter.frames(segment[:-2]):
                self._frame(event_name, data, events)

    @staticmethod
    def _texts(frames: bytes, head: bytes, tail: bytes) -> list[Any] | None:
        """The content of each frame in ``frames`` if every one is ``head`` + a JSON string
        literal + ``tail``, else None."""
        pieces = frames.split(tail)  # splitting on the long head would cost twice as much
        if pieces.pop():
            return None  # the last frame is not a plain text chunk
        start = len(head)
        literals = [piece[start:] for piece in pieces]
        # However they were cut, these are the frames if they rebuild them byte for byte.
        if head + (tail + head).join(literals) + tail != frames:
            return None
        # Joined by LF, which no literal may hold unescaped: if the regex reads the whole
        # as literals and every LF is one of ours, each piece is exactly one literal, so
        # each frame was exactly head + literal + tail.
        joined = b"\n".join(literals)
        if joined.count(b"\n") != len(literals) - 1 or _STRINGS.fullmatch(joined) is None:
            return None
        try:
            return loads(b"[" + b",".join(literals) + b"]")  # type: ignore[no-any-return]
        except ValueError:
            return None  # the general path reports it, at the chunk it is in

    def _learn_frame(self, data: bytes) -> None:
        """``data``, a chunk the fast path of :meth:`_frame` took: if it has the plain
        shape, keep the bytes around its content for :meth:`_text_run`."""
        self._learn -= 1
        match = _PLAIN_TEXT_CHUNK.fullmatch(data)
        if match is not None:
            self._frame_head = b"data: " + data[: match.start(1)]
            self._frame_tail = data[match.end(1) :] + b"\n\n"

    def _end(self, events: list[StreamEvent]) -> None:
        if not self._done:
            if self._stop is None:
                raise ProxyError(502, "upstream stream ended before the response was complete")
            self._finish(events)

    def _block(self, key: Any, events: list[StreamEvent], kind: str | None = None, **start: Any) -> int:
        index = self._blocks.get(key)
        if index is None:
            index = self._blocks[key] = self._next_index
            self._next_index += 1
            self._open.append(index)
            if key != "text":
                # The fast paths write to the text block, which is no longer the last: they
                # wait until a new run of text is begun and its frames are learned again.
                self._frame_head = b""
            if kind is not None:
                events.append(StreamEvent(kind, index=index, **start))
        return index

    def _run(self, key: str, events: list[StreamEvent]) -> int:
        """The block of a run of ``"text"`` or ``"thinking"``: a new one when another block
        began after this kind's last run (reasoning, text, reasoning again), for clients
        whose blocks cannot be reopened once the next began (Anthropic's, Responses')."""
        index = self._blocks.get(key)
        if index is not None and index != self._next_index - 1:
            del self._blocks[key]
        return self._block(key, events)

    def _finish(self, events: list[StreamEvent]) -> None:
        self._close_blocks(events)
        events.append(StreamEvent(EventKind.STOP, stop_reason=self._stop or "end_turn", usage=self._usage))
        self._done = True
        self._frame_head = b""

    def _begin_call(self, key: Any, events: list[StreamEvent]) -> int:
        """Begin the call ``key`` (it becomes the current one) and pass on what it held."""
        call_id, name = self._naming.pop(key)
        index = self._block(key, events, EventKind.TOOL_CALL_START, id=call_id or _call_id(), name=name)
        self._current, self._current_args = key, []
        held = self._held.pop(key, None)
        if held:
            text = "".join(held)
            events.append(StreamEvent(EventKind.TOOL_CALL_DELTA, index=index, text=text))
            self._current_args.append(text)
        return index

    def _current_done(self) -> bool:
        """Whether the current call (if any) has sent arguments that are a whole JSON value."""
        if self._current is None:
            return True
        # Arguments are a JSON object (or, from an odd server, an array): only a piece ending
        # in "}" or "]" can complete them, so the parse of everything so far is tried only
        # then, not at every interleaved piece.
        tail = next((piece.rstrip() for piece in reversed(self._current_args) if piece.strip()), "")
        if not tail.endswith(("}", "]")):
            return False
        try:
            loads("".join(self._current_args))
        except ValueError:
            return False
        return True

    def _may_begin(self, key: Any, events: list[StreamEvent]) -> bool:
        """Arguments came for ``key``, a call not begun: begin the first call announced, if
        the current one is done. True if that is ``key`` (its arguments may go out now)."""
        if not self._current_done():
            return False
        return self._begin_first(events) == key

    def _begin_first(self, events: list[StreamEvent]) -> Any:
        key = next(iter(self._naming))
        self._begin_call(key, events)
        return key

    def _promote(self, events: list[StreamEvent]) -> None:
        """While calls wait and the current one is done, the next announced begins."""
        while self._held and self._current_done():
            self._begin_first(events)

    def _close_blocks(self, events: list[StreamEvent]) -> None:
        while self._naming:  # calls not begun (no arguments, or held) begin now, in order
            self._begin_first(events)
        for index in self._open:
            events.append(StreamEvent(EventKind.BLOCK_STOP, index=index))
        self._open = []

    def _text_delta(self, chunk: dict[str, Any], events: list[StreamEvent]) -> bool:
        """The fast path, for the chunk nearly every stream is made of: one choice, a delta
        with nothing but text for the text block already begun, no finish reason, logprobs
        or usage. Appends the one TEXT event the general path in :meth:`_frame` would make
        of it and returns True; returns False (having done nothing) for any other chunk."""
        choices = chunk.get("choices")
        if choices.__class__ is not list or len(choices) != 1 or chunk.get("usage"):
            return False
        choice = choices[0]
        if choice.__class__ is not dict:
            return False
        delta = choice.get("delta")
        if (
            delta.__class__ is not dict
            or choice.get("finish_reason")
            or choice.get("logprobs") is not None
            or choice.get("index", 0) != 0
            # some servers repeat "role" or send "reasoning_content": null beside the text
            or (len(delta) != 1 and (delta.get("tool_calls") or delta.get("reasoning_content") or delta.get("reasoning")))
        ):
            return False
        content = delta.get("content")
        index = self._blocks.get("text")
        if content.__class__ is not str or index is None or index != self._next_index - 1:
            return False  # (text after another block is a new block: the general path begins it)
        if content:
            events.append(StreamEvent(EventKind.TEXT, index, content))
        return True

    def _frame(self, event_name: str | None, data: bytes, events: list[StreamEvent]) -> None:
        if self._done:
            return
        if data == b"[DONE]":
            if not self._started:
                # [DONE] before any chunk: no answer at all, not an empty one (which would
                # still have had a chunk with its finish reason)
                raise ProxyError(502, "upstream stream ended before sending any answer", kind="api_error")
            self._finish(events)
            return
        try:
            chunk = loads(data)
        except ValueError:
            raise ProxyError(502, f"upstream sent a malformed stream event: {data[:200]!r}") from None
        if not isinstance(chunk, dict):
            raise ProxyError(502, "upstream sent a stream event that is not a JSON object")
        if self._started and self._text_delta(chunk, events):
            if self._learn and event_name is None and not self._frame_head:
                self._learn_frame(data)
            return
        if "error" in chunk and not chunk.get("choices"):
            err = chunk["error"] if isinstance(chunk["error"], dict) else {"message": str(chunk["error"])}
            raise ProxyError(502, f"upstream error mid-stream: {err.get('message', err)}", kind=err.get("type") or "upstream_error", in_stream=True)
        if not self._started:
            self._started = True
            events.append(StreamEvent(EventKind.START, id=chunk.get("id"), model=chunk.get("model")))
        usage = chunk.get("usage")
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            if reasoning and isinstance(reasoning, str):
                index = self._run("thinking", events)
                events.append(StreamEvent(EventKind.THINKING, index=index, text=reasoning))
            content = delta.get("content")
            if content and content.__class__ is not str:
                content = _delta_text(content)
            if content:
                index = self._run("text", events)
                event = StreamEvent(EventKind.TEXT, index=index, text=content)
                if choice.get("logprobs") is not None:
                    event.extra = {"logprobs": choice["logprobs"]}
                events.append(event)
            for call in delta.get("tool_calls") or ():
                key = ("tool", call.get("index", 0))
                fn = call.get("function") or {}
                arguments = fn.get("arguments")
                index = self._blocks.get(key)
                if index is None:
                    # The call begins once its arguments do: until then its name may still be
                    # coming in pieces ("get_", "weather"), as some servers send it.
                    naming = self._naming.setdefault(key, [None, ""])
                    naming[0] = naming[0] or call.get("id")
                    piece = fn.get("name")
                    if isinstance(piece, str) and piece != naming[1]:  # a repeated whole name is not a piece
                        naming[1] += piece
                    if not arguments:
                        continue
                    if key in self._held or not self._may_begin(key, events):
                        self._held.setdefault(key, []).append(arguments)
                        self._promote(events)  # (a call begun just now may be done already)
                        continue
                    index = self._blocks[key]
                if arguments:
                    events.append(StreamEvent(EventKind.TOOL_CALL_DELTA, index=index, text=arguments))
                    if key == self._current:
                        self._current_args.append(arguments)
                        if self._held:
                            self._promote(events)
            finish = choice.get("finish_reason")
            if finish:
                self._close_blocks(events)
                self._stop = FINISH_TO_STOP.get(finish, "end_turn")
                if self._stop == "end_turn" and any(key.__class__ is tuple for key in self._blocks):
                    self._stop = "tool_use"  # calls made, yet "stop" (Ollama, some vLLM parsers): the client must run them
        if usage:
            self._usage = decode_usage(usage)
            events.append(StreamEvent(EventKind.USAGE, usage=self._usage))


def _delta_text(content: Any) -> str:
    """The text of a delta's ``content`` that is not a string: some servers (Mistral's, for
    one) stream a list of parts, whose text parts are the text; any other value is passed on
    as its JSON rather than dropped (a client must get a string either way)."""
    if isinstance(content, list):
        return "".join(part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str))
    return dumps(content).decode()


# The end of a text chunk without logprobs or finish reason (see ChatStreamEncoder.encode).
_TEXT_CHUNK_TAIL = b'},"logprobs":null,"finish_reason":null}]}\n\n'


class ChatStreamEncoder:
    """Canonical events → chat completion chunks, one SSE frame per chunk."""

    __slots__ = ("_prefix", "_suffix", "_text_head", "_include_usage", "_usage", "_tool_slots", "_argless", "_id", "_model", "_created")

    def __init__(self, model: str, include_usage: bool) -> None:
        self._id = f"chatcmpl-{random_hex(24)}"
        self._model = model
        self._created = int(time.time())
        self._include_usage = include_usage
        self._usage: Usage | None = None
        self._tool_slots: dict[int, int] = {}  # canonical index -> OpenAI tool_calls index
        # Calls begun whose arguments have not come yet: one that ends without any (an
        # Anthropic tool_use with empty input) gets "{}", as OpenAI sends, and never "".
        self._argless: set[int] = set()
        self._set_envelope()

    def _set_envelope(self) -> None:
        # Every chunk shares this envelope; pre-serialising it saves a dict and a dump per event.
        head = dumps({"id": self._id, "object": "chat.completion.chunk", "created": self._created, "model": self._model})
        self._prefix = b"data: " + head[:-1] + b',"choices":[{"index":0,"delta":'
        self._suffix = b"}]}\n\n"
        self._text_head = self._prefix + b'{"content":'

    def _chunk(self, delta: dict[str, Any], finish: str | None = None, extra: dict[str, Any] | None = None) -> bytes:
        if extra:
            # Choice fields the event carried (logprobs) take the defaults' place: a key
            # written twice is not JSON every client accepts.
            choice = {"logprobs": None, "finish_reason": finish, **extra}
            return self._prefix + dumps(delta) + b"," + dumps(choice)[1:-1] + self._suffix
        tail = b',"logprobs":null,"finish_reason":' + (dumps(finish) if finish else b"null")
        return self._prefix + dumps(delta) + tail + self._suffix

    def _no_arguments(self, index: int, out: list[bytes]) -> None:
        self._argless.discard(index)
        out.append(self._chunk({"tool_calls": [{"index": self._tool_slots.get(index, 0), "function": {"arguments": "{}"}}]}))

    def encode(self, events: list[StreamEvent]) -> bytes:
        out: list[bytes] = []
        for event in events:
            kind = event.kind
            if kind == EventKind.TEXT:
                if event.text and event.extra:
                    out.append(self._chunk({"content": event.text}, extra=event.extra))
                elif event.text:
                    # The chunk nearly every stream is made of: the bytes _chunk would write,
                    # with only the text serialised per event.
                    out.append(self._text_head + dumps(event.text) + _TEXT_CHUNK_TAIL)
            elif kind == EventKind.TOOL_CALL_DELTA:
                if event.text:
                    self._argless.discard(event.index)
                    slot = self._tool_slots.get(event.index, 0)
                    out.append(self._chunk({"tool_calls": [{"index": slot, "function": {"arguments": event.text}}]}))
            elif kind == EventKind.TOOL_CALL_START:
                slot = self._tool_slots[event.index] = len(self._tool_slots)
                call = {"index": slot, "id": event.id, "type": "function", "function": {"name": event.name, "arguments": ""}}
                out.append(self._chunk({"tool_calls": [call]}))
                self._argless.add(event.index)
            elif kind == EventKind.BLOCK_STOP:
                if event.index in self._argless:
                    self._no_arguments(event.index, out)
            elif kind == EventKind.THINKING:
                if event.text:
                    out.append(self._chunk({"reasoning_content": event.text}))
            elif kind == EventKind.START:
                if event.id and event.id.startswith("chatcmpl-"):
                    self._id = event.id
                if event.model:
                    self._model = event.model
                self._set_envelope()
                out.append(self._chunk({"role": "assistant", "content": ""}))
            elif kind == EventKind.USAGE:
                self._usage = event.usage
            elif kind == EventKind.STOP:
                for index in sorted(self._argless):
                    self._no_arguments(index, out)
                out.append(self._chunk({}, STOP_TO_FINISH.get(event.stop_reason, "stop")))
                usage = event.usage or self._usage
                if self._include_usage:
                    head = {"id": self._id, "object": "chat.completion.chunk", "created": self._created, "model": self._model}
                    out.append(sse_frame(dumps({**head, "choices": [], "usage": encode_usage(usage or Usage())})))
                out.append(b"data: [DONE]\n\n")
            elif kind == EventKind.ERROR:
                error = event.error if isinstance(event.error, ProxyError) else ProxyError(500, str(event.error))
                out.append(sse_frame(dumps({"error": {"message": error.message, "type": error.kind, "param": error.param, "code": error.code}})))
        return b"".join(out)
