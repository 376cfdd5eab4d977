"""Google Gemini (`generateContent`, `streamGenerateContent`) ⇄ the canonical model.

The model and the stream flag live in the URL, not the body: the front-end puts them in the
body as ``model`` and ``stream`` (both fields this codec strips again before anything is
sent upstream). ``thoughtSignature``s ride on the canonical part they came with and go back
to Gemini untouched; function calls that come from another protocol carry none, so they get
Google's documented placeholder ``skip_thought_signature_validator``. Function responses need
the function's name, which other protocols do not send: the encoder looks it up from the
call. Schemas written with Gemini's upper-case OpenAPI types (``responseSchema``,
``parameters``) are turned into JSON Schema for other backends.
"""

from __future__ import annotations

import math
import mimetypes
import re
import urllib.parse
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
from ..errors import ProxyError, bad_request, retry_after_seconds
from .base import SSEStreamDecoder, array, carried, dumps, loads, random_hex, sse_frame, string

PROTOCOL = "gemini"
SKIP_SIGNATURE = "skip_thought_signature_validator"
_SNAKE = {
    "system_instruction": "systemInstruction",
    "generation_config": "generationConfig",
    "tool_config": "toolConfig",
    "safety_settings": "safetySettings",
    "cached_content": "cachedContent",
}
_PART_SNAKE = {"inline_data": "inlineData", "file_data": "fileData", "function_call": "functionCall", "function_response": "functionResponse", "thought_signature": "thoughtSignature"}
_KNOWN_KEYS = frozenset(("model", "stream", "contents", "systemInstruction", "tools", "toolConfig", "generationConfig"))
FINISH_TO_STOP = {
    "STOP": "end_turn",
    "MAX_TOKENS": "max_tokens",
    "SAFETY": "content_filter",
    "RECITATION": "content_filter",
    "BLOCKLIST": "content_filter",
    "PROHIBITED_CONTENT": "content_filter",
    "SPII": "content_filter",
    "IMAGE_SAFETY": "content_filter",
}
STOP_TO_FINISH = {"end_turn": "STOP", "tool_use": "STOP", "max_tokens": "MAX_TOKENS", "stop_sequence": "STOP", "content_filter": "SAFETY", "error": "OTHER", None: "STOP"}
STATUS_NAMES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND", 413: "INVALID_ARGUMENT",
                429: "RESOURCE_EXHAUSTED", 499: "CANCELLED", 500: "INTERNAL", 501: "UNIMPLEMENTED", 502: "UNAVAILABLE", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}
LEVEL_FROM_EFFORT = {"minimal": "LOW", "low": "LOW", "medium": "MEDIUM", "high": "HIGH", "xhigh": "HIGH", "max": "HIGH"}
BUDGET_FROM_EFFORT = {"minimal": 512, "low": 2048, "medium": 8192, "high": 24576, "xhigh": 32768, "max": 32768}


def _camel(data: dict[str, Any], table: dict[str, str]) -> dict[str, Any]:
    if not any(k in table for k in data):
        return data
    return {table.get(k, k): v for k, v in data.items()}


def _camel_keys(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with its snake_case keys (one level only) in lowerCamelCase. The API takes
    either spelling at any depth, and google-genai 3.x mixes them: ``thinkingConfig:
    {include_thoughts, thinking_budget}``."""
    if not any("_" in k for k in data):
        return data
    return {re.sub(r"_([a-z])", lambda m: m.group(1).upper(), k): v for k, v in data.items()}


# Schema keywords only Gemini reads (google-genai writes propertyOrdering from a pydantic
# model's field order); JSON Schema validators elsewhere refuse or ignore them.
_GEMINI_ONLY_SCHEMA_KEYS = frozenset(("nullable", "propertyOrdering", "property_ordering"))


RETRY_INFO = "google.rpc.RetryInfo"  # the error detail saying how long to wait
_INT64_SCHEMA_KEYS = frozenset(("minItems", "maxItems", "minLength", "maxLength", "minProperties", "maxProperties"))


def json_schema_from_gemini(schema: Any) -> Any:
    """Gemini's OpenAPI-style schema (``type: STRING``) → JSON Schema (``type: string``)."""
    if isinstance(schema, dict):
        out = {}
        for key, value in schema.items():
            if key == "type" and isinstance(value, str):
                out[key] = value.lower()
            elif key in _GEMINI_ONLY_SCHEMA_KEYS:
                continue
            elif key in _INT64_SCHEMA_KEYS and isinstance(value, str) and value.lstrip("-").isdigit():
                out[key] = int(value)  # proto3 JSON writes int64 as a string ("1"); JSON Schema wants a number
            elif key in ("properties",) and isinstance(value, dict):
                out[key] = {k: json_schema_from_gemini(v) for k, v in value.items()}
            else:
                out[key] = json_schema_from_gemini(value)
        if schema.get("nullable") is True and isinstance(out.get("type"), str):
            out["type"] = [out["type"], "null"]
        return out
    if isinstance(schema, list):
        return [json_schema_from_gemini(v) for v in schema]
    return schema


class GeminiCodec:
    protocol = PROTOCOL
    content_type_stream = "text/event-stream"
    array_stream = False
    # Gemini clients (Gemini CLI's bundled SDK) skip an error frame and take a stream that
    # ends cleanly as a complete answer; the API itself drops the connection instead.
    error_ends_connection = True

    # -- requests ----------------------------------------------------------------------
    def peek(self, body: dict[str, Any]) -> tuple[str, bool]:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise bad_request("the model is missing from the URL (models/{model}:generateContent)", "model")
        contents = body.get("contents")
        if not isinstance(contents, list) or not contents:
            raise bad_request("contents is required and must not be empty", "contents")
        for i, content in enumerate(contents):
            if not isinstance(content, dict) or not isinstance(content.get("parts"), list):
                raise bad_request(f"contents[{i}].parts is required", f"contents[{i}].parts")
            if content.get("role", "user") not in ("user", "model", "function", "system"):
                raise bad_request(f"contents[{i}].role must be 'user' or 'model'", f"contents[{i}].role")
        return model, bool(body.get("stream"))

    def decode_request(self, body: dict[str, Any]) -> Request:
        body = _camel(body, _SNAKE)
        model, stream = self.peek(body)
        request = Request(model=model, stream=stream, protocol=PROTOCOL)
        request.extra = {k: v for k, v in body.items() if k not in _KNOWN_KEYS}
        system = body.get("systemInstruction")
        if isinstance(system, dict):
            for part in system.get("parts") or ():
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    request.system.append(TextPart(part["text"]))  # a string: checked just above
            request.extra["_system"] = system
        elif isinstance(system, str):
            request.system.append(TextPart(system))
        config = body.get("generationConfig")
        if isinstance(config, dict):
            _decode_config(config, request)
            request.extra["_generationConfig"] = config
        other_tools = []
        for i, tool in enumerate(array(body.get("tools"), "tools")):
            if not isinstance(tool, dict):
                raise bad_request(f"tools[{i}] must be an object", f"tools[{i}]")
            tool = _camel(tool, {"function_declarations": "functionDeclarations"})
            declarations = tool.get("functionDeclarations")
            if declarations is None:
                other_tools.append(tool)  # googleSearch, codeExecution …: Gemini only
                continue
            for j, fn in enumerate(declarations):
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise bad_request(f"tools[{i}].functionDeclarations[{j}].name is required", f"tools[{i}].functionDeclarations[{j}].name")
                if "parametersJsonSchema" in fn or "parameters_json_schema" in fn:
                    schema = fn.get("parametersJsonSchema", fn.get("parameters_json_schema"))
                    style = "json"
                else:
                    schema = json_schema_from_gemini(fn.get("parameters") or {"type": "object", "properties": {}})
                    style = "openapi"
                extra = {k: v for k, v in fn.items() if k not in ("name", "description", "parameters", "parametersJsonSchema", "parameters_json_schema")}
                extra["_style"] = style
                extra["_original"] = fn
                request.tools.append(Tool(fn["name"], fn.get("description"), schema if isinstance(schema, dict) else {"type": "object"}, None, extra))
        if other_tools:
            request.extra["_other_tools"] = other_tools
        tool_config = body.get("toolConfig")
        if isinstance(tool_config, dict):
            calling = tool_config.get("functionCallingConfig") or tool_config.get("function_calling_config") or {}
            mode = str(calling.get("mode", "AUTO")).upper()
            allowed = calling.get("allowedFunctionNames") or calling.get("allowed_function_names") or []
            if mode == "ANY" and len(allowed) == 1:
                request.tool_choice = allowed[0]
            else:
                request.tool_choice = {"AUTO": "auto", "ANY": "required", "NONE": "none", "VALIDATED": "auto"}.get(mode, "auto")
            request.extra["_toolConfig"] = tool_config
        names: dict[str, list[str]] = {}  # function name -> ids of its calls not yet answered
        for i, content in enumerate(body["contents"]):
            request.messages.extend(_decode_content(content, i, names))
        return request

    def encode_request(self, request: Request, model: str) -> dict[str, Any]:
        same = request.protocol == PROTOCOL
        body: dict[str, Any] = {k: v for k, v in request.extra.items() if not k.startswith("_")} if same else {}
        if request.system:
            system = dict(request.extra.get("_system", {})) if same else {}
            system["parts"] = [{"text": p.text} for p in request.system]
            body["systemInstruction"] = system
        contents: list[dict[str, Any]] = []
        names: dict[str, str] = {}
        for message in request.messages:
            _encode_message(message, same, contents, names)
        body["contents"] = contents
        tools = []
        declarations = []
        for tool in request.tools:
            if same and "_original" in tool.extra and tool.extra["_original"].get("name") == tool.name and _unchanged(tool):
                declarations.append(tool.extra["_original"])
                continue
            fn: dict[str, Any] = {"name": tool.name}
            if tool.description:
                fn["description"] = tool.description
            fn["parametersJsonSchema"] = tool.parameters
            declarations.append(fn)
        if declarations:
            tools.append({"functionDeclarations": declarations})
        if same:
            tools.extend(request.extra.get("_other_tools", ()))
        if tools:
            body["tools"] = tools
        if same and "_toolConfig" in request.extra:
            body["toolConfig"] = request.extra["_toolConfig"]
        elif request.tool_choice is not None and request.tools:
            choice = request.tool_choice
            mode = {"auto": "AUTO", "required": "ANY", "none": "NONE"}.get(choice)
            calling: dict[str, Any] = {"mode": mode or "ANY"}
            if mode is None:
                calling["allowedFunctionNames"] = [choice]
            body["toolConfig"] = {"functionCallingConfig": calling}
        config = dict(request.extra.get("_generationConfig", {})) if same else {}
        _encode_config(request, model, config, same)
        if config or (same and "_generationConfig" in request.extra):
            body["generationConfig"] = config
        return body

    # -- responses ---------------------------------------------------------------------
    def decode_response(self, body: dict[str, Any]) -> Response:
        if isinstance(body, list):  # a non-SSE stream answer
            merged = _merge_chunks(body)
            return self.decode_response(merged)
        if "error" in body and "candidates" not in body:
            err = body["error"] if isinstance(body["error"], dict) else {"message": str(body["error"])}
            raise ProxyError(502, f"upstream error: {err.get('message', err)}")
        response = Response(model=body.get("modelVersion") or "", id=body.get("responseId"), protocol=PROTOCOL)
        candidates = body.get("candidates") or []
        finish = None
        if candidates:
            candidate = candidates[0]
            content = candidate.get("content") or {}
            names: dict[str, list[str]] = {}
            for message in _decode_content({"role": "model", "parts": content.get("parts") or []}, 0, names):
                response.parts.extend(message.parts)
            finish = candidate.get("finishReason")
        elif (body.get("promptFeedback") or {}).get("blockReason"):
            finish = "SAFETY"
        response.usage = decode_usage(body.get("usageMetadata"))
        stop = FINISH_TO_STOP.get(finish or "STOP", "end_turn")
        response.stop_reason = "tool_use" if stop == "end_turn" and response.tool_calls else stop
        return response

    def encode_response(self, response: Response, request: Request | None) -> dict[str, Any]:
        parts = []
        for part in response.parts:
            wire = _encode_part(part, response.protocol == PROTOCOL, outgoing=False)
            if wire is not None:
                parts.append(wire)
        if not parts:
            parts = [{"text": ""}]
        return {
            "candidates": [{"content": {"role": "model", "parts": parts}, "finishReason": STOP_TO_FINISH.get(response.stop_reason, "STOP"), "index": 0}],
            "usageMetadata": encode_usage(response.usage),
            "modelVersion": response.model,
            "responseId": response.id or random_hex(22),
        }

    # -- streams -----------------------------------------------------------------------
    def stream_decoder(self) -> "GeminiStreamDecoder":
        return GeminiStreamDecoder()

    def stream_encoder(self, flow: Any) -> "GeminiStreamEncoder":
        return GeminiStreamEncoder(flow.model, array=self.array_stream)

    def stream_complete(self, tail: bytes) -> bool:
        return b'"finishReason"' in tail

    # -- errors ------------------------------------------------------------------------
    def error_body(self, error: ProxyError) -> dict[str, Any]:
        # Anthropic's 529 (overloaded) is what Gemini calls 503 UNAVAILABLE.
        status = 503 if error.status == 529 else error.status
        body: dict[str, Any] = {"code": status, "message": error.message, "status": STATUS_NAMES.get(status, "UNKNOWN")}
        details = list(error.details or ())
        seconds = retry_after_seconds((error.headers or {}).get("Retry-After"))
        if seconds is not None and not any(str(d.get("@type", "")).endswith(RETRY_INFO) for d in details):
            # Where Gemini clients (Gemini CLI) read how long to wait; the header alone they
            # ignore. (Delay-seconds or an HTTP date, as the backend sent it.)
            details.append({"@type": "type.googleapis.com/" + RETRY_INFO, "retryDelay": f"{math.ceil(seconds)}s"})
        if details:
            body["details"] = details
        return {"error": body}

    def error_event(self, error: ProxyError) -> bytes:
        if self.array_stream:
            return b"," + dumps(self.error_body(error)) + b"]"
        return sse_frame(dumps(self.error_body(error)))


def error_details(payload: bytes) -> tuple[list[dict[str, Any]] | None, float | None]:
    """A Gemini error body's ``details`` and the delay its RetryInfo asks for ("37s",
    "0.5s"): the API says how long to wait there, not in a Retry-After header."""
    try:
        error = loads(payload).get("error")
    except (ValueError, AttributeError):
        return None, None
    details = error.get("details") if isinstance(error, dict) else None
    if not isinstance(details, list) or not all(isinstance(d, dict) for d in details) or not details:
        return None, None
    delay = None
    for detail in details:
        text = detail.get("retryDelay")
        if str(detail.get("@type", "")).endswith(RETRY_INFO) and isinstance(text, str) and text.endswith("s"):
            try:
                delay = float(text[:-1])
            except ValueError:
                continue
            if not math.isfinite(delay) or delay < 0:
                delay = None
    return details, delay


class GeminiArrayCodec(GeminiCodec):
    """The same protocol streamed as a JSON array (``streamGenerateContent`` without
    ``alt=sse``). A separate protocol name keeps the SSE pass-through from applying."""

    protocol = "gemini_array"
    content_type_stream = "application/json"
    array_stream = True


def _unchanged(tool: Tool) -> bool:
    original = tool.extra["_original"]
    if tool.description != original.get("description"):
        return False
    if tool.extra.get("_style") == "json":
        return tool.parameters is original.get("parametersJsonSchema", original.get("parameters_json_schema"))
    return True


def _decode_config(config: dict[str, Any], request: Request) -> None:
    config = _camel_keys(config)
    params = request.params
    for wire, key in (("temperature", "temperature"), ("topP", "top_p"), ("topK", "top_k"), ("maxOutputTokens", "max_tokens"),
                      ("stopSequences", "stop"), ("seed", "seed"), ("candidateCount", "n"), ("presencePenalty", "presence_penalty"),
                      ("frequencyPenalty", "frequency_penalty")):
        if wire in config:
            params[key] = config[wire]
    mime = config.get("responseMimeType")
    schema = config.get("responseJsonSchema", config.get("responseSchema"))
    if mime == "application/json":
        if isinstance(schema, dict):
            # Gemini takes upper-case OpenAPI types in responseJsonSchema too (Gemini CLI sends
            # them there); other backends need JSON Schema, which passes through unchanged.
            schema = json_schema_from_gemini(schema)
            request.response_format = {"type": "json_schema", "name": "response", "schema": schema}
        else:
            request.response_format = {"type": "json_object"}
    thinking = config.get("thinkingConfig")
    if isinstance(thinking, dict):
        thinking = _camel_keys(thinking)
        reasoning: dict[str, Any] = {}
        if thinking.get("thinkingBudget") is not None:
            budget = thinking["thinkingBudget"]
            if budget == 0:
                reasoning["enabled"] = False
            elif budget > 0:
                reasoning["budget_tokens"] = budget
            else:  # -1: dynamic, the model decides how much; elsewhere, a middle effort
                reasoning["adaptive"] = True
                reasoning["effort"] = "medium"
        if thinking.get("thinkingLevel"):
            reasoning["effort"] = str(thinking["thinkingLevel"]).lower()
        if thinking.get("includeThoughts"):
            reasoning["summary"] = "auto"
        request.reasoning = reasoning or None


def _encode_config(request: Request, model: str, config: dict[str, Any], same: bool) -> None:
    params = request.params
    for key, wire in (("temperature", "temperature"), ("top_p", "topP"), ("top_k", "topK"), ("max_tokens", "maxOutputTokens"),
                      ("seed", "seed"), ("presence_penalty", "presencePenalty"), ("frequency_penalty", "frequencyPenalty")):
        if key in params and params[key] is not None:
            config[wire] = params[key]
    stop = params.get("stop")
    if stop:
        config["stopSequences"] = [stop] if isinstance(stop, str) else list(stop)
    # A Gemini client's own settings keep their spelling (responseSchema with upper-case
    # types, thinkingLevel …) while the canonical fields still say the same; a plugin's change,
    # or a request built without a generationConfig, is written from the canonical fields.
    client = Request(model=model)
    if same:
        _decode_config(config, client)
    fmt = request.response_format
    if not same or fmt != client.response_format:
        for key in ("responseMimeType", "responseSchema", "responseJsonSchema", "response_mime_type", "response_schema", "response_json_schema"):
            config.pop(key, None)
        if fmt is not None:
            config["responseMimeType"] = "application/json"
            if fmt["type"] == "json_schema":
                config["responseJsonSchema"] = fmt.get("schema") or {}
    if same and request.reasoning == client.reasoning:
        return
    config.pop("thinkingConfig", None)
    config.pop("thinking_config", None)
    reasoning = request.reasoning or {}
    if reasoning.get("enabled") is False or reasoning.get("effort") == "none":
        # Gemini 2.x turns thinking off with a zero budget; Gemini 3 cannot turn it off,
        # and LOW is the least every Gemini 3 model takes.
        config["thinkingConfig"] = {"thinkingBudget": 0} if "gemini-2" in model else {"thinkingLevel": "LOW"}
    elif reasoning.get("budget_tokens") or reasoning.get("effort"):
        thinking: dict[str, Any] = {"includeThoughts": True}
        if reasoning.get("budget_tokens"):
            thinking["thinkingBudget"] = int(reasoning["budget_tokens"])
        elif "gemini-2" in model:
            budget = BUDGET_FROM_EFFORT.get(str(reasoning["effort"]), 8192)
            limit = config.get("maxOutputTokens")
            if isinstance(limit, int) and limit > 0:
                # maxOutputTokens caps thinking and answer together (as max_tokens does for
                # OpenAI and Anthropic clients): an effort's budget takes at most half of the
                # client's limit, so the answer is not starved by the thinking.
                budget = min(budget, max(limit // 2, 128))
            thinking["thinkingBudget"] = budget
        else:
            thinking["thinkingLevel"] = LEVEL_FROM_EFFORT.get(str(reasoning["effort"]), "HIGH")
        config["thinkingConfig"] = thinking
    elif reasoning.get("adaptive"):  # the model decides how much: Gemini's dynamic thinking
        config["thinkingConfig"] = {"includeThoughts": True, "thinkingBudget": -1} if "gemini-2" in model else {"includeThoughts": True}


def decode_usage(usage: Any) -> Usage:
    if not isinstance(usage, dict):
        return Usage()
    thoughts = usage.get("thoughtsTokenCount") or 0
    return Usage(
        input_tokens=usage.get("promptTokenCount") or 0,
        output_tokens=(usage.get("candidatesTokenCount") or 0) + thoughts,
        cached_input_tokens=usage.get("cachedContentTokenCount") or 0,
        reasoning_tokens=thoughts,
    )


def encode_usage(usage: Usage) -> dict[str, Any]:
    body = {
        "promptTokenCount": usage.input_tokens,
        "candidatesTokenCount": max(0, usage.output_tokens - usage.reasoning_tokens),
        "totalTokenCount": usage.input_tokens + usage.output_tokens,
    }
    if usage.reasoning_tokens:
        body["thoughtsTokenCount"] = usage.reasoning_tokens
    if usage.cached_input_tokens:
        body["cachedContentTokenCount"] = usage.cached_input_tokens
    return body


def _is_document(media_type: Any) -> bool:
    """Gemini's inline and file data carry any media: images stay images, the rest
    (PDFs, text, audio, video) are files to the other protocols."""
    return isinstance(media_type, str) and not media_type.startswith("image/")


def _call_id(name: str) -> str:
    return f"call_{name}_{random_hex(12)}"


def _decode_content(content: dict[str, Any], i: int, names: dict[str, list[str]]) -> list[Message]:
    role = content.get("role", "user")
    where = f"contents[{i}].parts"
    parts: list[Part] = []
    results: list[Part] = []
    for j, part in enumerate(content["parts"]):
        if not isinstance(part, dict):
            raise bad_request(f"{where}[{j}] must be an object", f"{where}[{j}]")
        part = _camel(part, _PART_SNAKE)
        signature = part.get("thoughtSignature")
        extra = {"thoughtSignature": signature} if signature else {}
        if "text" in part:
            if part.get("thought"):
                parts.append(ThinkingPart(text=string(part["text"], f"{where}[{j}].text"), signature=signature, protocol=PROTOCOL))
            else:
                parts.append(TextPart(string(part["text"], f"{where}[{j}].text"), extra=extra))
        elif "functionCall" in part:
            call = part["functionCall"] or {}
            if not isinstance(call, dict):
                raise bad_request(f"{where}[{j}].functionCall must be an object", f"{where}[{j}].functionCall")
            name = call.get("name", "")
            call_id = call.get("id") or _call_id(name)
            names.setdefault(name, []).append(call_id)
            if not call.get("id"):
                extra["_no_id"] = True
            if not signature:
                extra["_unsigned"] = True  # the client sent it so: no placeholder going back
            parts.append(ToolCallPart(id=call_id, name=name, arguments=dumps(call.get("args") or {}).decode(), extra=extra))
        elif "functionResponse" in part:
            response = part["functionResponse"] or {}
            name = response.get("name", "")
            payload = response.get("response")
            # Gemini pairs calls and responses without ids by order: the n-th response to
            # a function answers its n-th open call, even when one name was called twice.
            waiting = names.get(name) or []
            call_id = response.get("id")
            if call_id in waiting:
                waiting.remove(call_id)
            elif not call_id:
                call_id = waiting.pop(0) if waiting else _call_id(name)
            is_error = isinstance(payload, dict) and "error" in payload and len(payload) == 1
            if isinstance(payload, dict) and len(payload) == 1 and isinstance(next(iter(payload.values())), str):
                text = next(iter(payload.values()))
            else:
                text = dumps(payload).decode()
            results.append(ToolResultPart(tool_call_id=call_id, content=[TextPart(text)], is_error=is_error, name=name,
                                          extra={"_response": payload, "_id": response.get("id")}))
        elif "inlineData" in part:
            data = part["inlineData"] or {}
            if not isinstance(data, dict):
                raise bad_request(f"{where}[{j}].inlineData must be an object", f"{where}[{j}].inlineData")
            media_type = data.get("mimeType") or data.get("mime_type")
            payload = string(data.get("data"), f"{where}[{j}].inlineData.data")
            if _is_document(media_type):
                parts.append(FilePart(data=payload, media_type=media_type, extra=extra))
            else:
                parts.append(ImagePart(data=payload, media_type=media_type, extra=extra))
        elif "fileData" in part:
            data = part["fileData"] or {}
            if not isinstance(data, dict):
                raise bad_request(f"{where}[{j}].fileData must be an object", f"{where}[{j}].fileData")
            media_type = data.get("mimeType") or data.get("mime_type")
            uri = string(data.get("fileUri") or data.get("file_uri"), f"{where}[{j}].fileData.fileUri")
            if _is_document(media_type):
                parts.append(FilePart(url=uri, media_type=media_type, extra=extra))
            else:
                parts.append(ImagePart(url=uri, media_type=media_type, extra=extra))
        else:
            parts.append(OpaquePart(PROTOCOL, part))
    messages = []
    if results:
        messages.append(Message(role="tool", parts=results))
    if parts or not results:
        canonical_role = "assistant" if role == "model" else "system" if role == "system" else "user"
        # Split off the results of the same content: the encoder joins them up again.
        messages.append(Message(role=canonical_role, parts=parts, extra={"_joined": True} if results else {}))
    return messages


def _image_type_of(url: str) -> str:
    """The MIME type of an image by its URL's extension, which Gemini's fileData must name
    (an OpenAI or Anthropic client sends a bare URL)."""
    media_type, _ = mimetypes.guess_type(urllib.parse.urlsplit(url).path)
    if media_type is None or not media_type.startswith("image/"):
        raise ProxyError(400, f"the image {url[:200]!r} has no image file extension, and Gemini needs its type: send it as a data: URL (base64) instead")
    return media_type


def _encode_part(part: Part, same: bool, outgoing: bool) -> dict[str, Any] | None:
    if isinstance(part, TextPart):
        wire: dict[str, Any] = {"text": part.text}
        if same and part.extra.get("thoughtSignature"):
            wire["thoughtSignature"] = part.extra["thoughtSignature"]
        return wire
    if isinstance(part, ThinkingPart):
        own = part.protocol == PROTOCOL
        if part.redacted or not own and (outgoing or not part.text):
            return None  # another family's reasoning never goes to Gemini
        # A Gemini client still sees another family's reasoning as a thought (as it does
        # when streamed), only without that family's signature.
        wire = {"text": part.text, "thought": True}
        if own and part.signature:
            wire["thoughtSignature"] = part.signature
        return wire
    if isinstance(part, ToolCallPart):
        try:
            args = loads(part.arguments) if part.arguments else {}
        except ValueError:
            args = {}
        call: dict[str, Any] = {"name": part.name, "args": args if isinstance(args, dict) else {"value": args}}
        if not (same and part.extra.get("_no_id")):
            call["id"] = part.id
        wire = {"functionCall": call}
        signature = part.extra.get("thoughtSignature") if same else None
        if signature or (outgoing and not (same and part.extra.get("_unsigned"))):
            wire["thoughtSignature"] = signature or SKIP_SIGNATURE
        return wire
    if isinstance(part, ImagePart):
        if part.data is not None:
            return {"inlineData": {"mimeType": part.media_type or "image/png", "data": part.data}}
        return {"fileData": {"mimeType": part.media_type or _image_type_of(part.url or ""), "fileUri": part.url}}
    if isinstance(part, FilePart):
        if part.data is not None:
            return {"inlineData": {"mimeType": part.media_type or "application/pdf", "data": part.data}}
        return {"fileData": {"mimeType": part.media_type or "application/pdf", "fileUri": part.url}}
    if isinstance(part, OpaquePart):
        if part.text is not None and part.protocol != PROTOCOL:
            return {"text": part.text}
        if carried(part, PROTOCOL):
            return part.data
    return None


def _encode_message(message: Message, same: bool, contents: list[dict[str, Any]], names: dict[str, str]) -> None:
    if message.role == "tool":
        parts = []
        media: list[dict[str, Any]] = []  # images or files a tool returned: beside the responses
        for part in message.parts:
            if not isinstance(part, ToolResultPart):
                continue
            media += [wire for wire in (_encode_part(p, same, False) for p in part.content if isinstance(p, (ImagePart, FilePart))) if wire]
            if same and "_response" in part.extra:
                payload = part.extra["_response"]
            else:
                text = "".join(p.text for p in part.content if isinstance(p, TextPart))
                payload = {"error": text} if part.is_error else {"output": text}
            response: dict[str, Any] = {"name": part.name or names.get(part.tool_call_id, "tool"), "response": payload}
            if not (same and part.extra.get("_id") is None and "_response" in part.extra):
                response["id"] = part.tool_call_id
            parts.append({"functionResponse": response})
        _append(contents, "user", parts + media, merge=not same)
        return
    for part in message.parts:
        if isinstance(part, ToolCallPart):
            names[part.id] = part.name
    parts = [w for w in (_encode_part(p, same, outgoing=True) for p in message.parts) if w is not None]
    if message.role in ("system", "developer"):
        parts = [{"text": f"<system>\n{p['text']}\n</system>"} for p in parts if "text" in p]
    if not parts:
        return
    # Another protocol's turns are merged where Gemini wants one content (a tool result and
    # the user text after it); a Gemini client's own contents stay as it sent them.
    _append(contents, "model" if message.role == "assistant" else "user", parts, merge=not same or bool(message.extra.get("_joined")))


def _append(contents: list[dict[str, Any]], role: str, parts: list[dict[str, Any]], merge: bool = True) -> None:
    if merge and contents and contents[-1]["role"] == role:
        contents[-1]["parts"].extend(parts)
    else:
        contents.append({"role": role, "parts": parts})


def _merge_chunks(chunks: list[Any]) -> dict[str, Any]:
    parts: list[Any] = []
    merged: dict[str, Any] = {}
    finish = None
    for chunk in chunks:
        if not isinstance(chunk, dict):
            continue
        for candidate in chunk.get("candidates") or ():
            parts.extend((candidate.get("content") or {}).get("parts") or ())
            finish = candidate.get("finishReason") or finish
        for key in ("usageMetadata", "modelVersion", "responseId"):
            if key in chunk:
                merged[key] = chunk[key]
    merged["candidates"] = [{"content": {"role": "model", "parts": parts}, "finishReason": finish}]
    return merged


class GeminiStreamDecoder(SSEStreamDecoder):
    """Gemini SSE chunks (each a GenerateContentResponse) → canonical events."""

    __slots__ = ("_started", "_finish", "_usage", "_index", "_kind", "_calls", "_done")

    def __init__(self) -> None:
        super().__init__()
        self._started = False
        self._finish: str | None = None
        self._usage: Usage | None = None
        self._index = -1
        self._kind: str | None = None
        self._calls = False
        self._done = False

    def _end(self, events: list[StreamEvent]) -> None:
        if self._finish is None:
            raise ProxyError(502, "upstream stream ended without a finishReason")
        if self._kind is not None:
            events.append(StreamEvent(EventKind.BLOCK_STOP, index=self._index))
            self._kind = None
        stop = FINISH_TO_STOP.get(self._finish, "end_turn")
        if stop == "end_turn" and self._calls:
            stop = "tool_use"
        events.append(StreamEvent(EventKind.STOP, stop_reason=stop, usage=self._usage))
        self._done = True

    def _switch(self, kind: str, events: list[StreamEvent]) -> int:
        if self._kind != kind or kind == "call":
            if self._kind is not None:
                events.append(StreamEvent(EventKind.BLOCK_STOP, index=self._index))
            self._index += 1
            self._kind = kind
        return self._index

    def _frame(self, name: str | None, data: bytes, events: list[StreamEvent]) -> None:
        if self._done or not data:
            return
        try:
            chunk = loads(data)
        except ValueError:
            raise ProxyError(502, f"upstream sent a malformed stream event: {data[:200]!r}") from None
        if not isinstance(chunk, dict):
            return
        if "error" in chunk and "candidates" not in chunk:
            err = chunk["error"] if isinstance(chunk["error"], dict) else {}
            raise ProxyError(502, f"upstream error mid-stream: {err.get('message', chunk['error'])}", in_stream=True)
        if not self._started:
            self._started = True
            events.append(StreamEvent(EventKind.START, id=chunk.get("responseId"), model=chunk.get("modelVersion")))
        for candidate in chunk.get("candidates") or ():
            if candidate.get("index", 0) != 0:
                continue
            for part in (candidate.get("content") or {}).get("parts") or ():
                part = _camel(part, _PART_SNAKE)
                signature = part.get("thoughtSignature")
                if "functionCall" in part:
                    call = part["functionCall"] or {}
                    index = self._switch("call", events)
                    self._calls = True
                    events.append(StreamEvent(EventKind.TOOL_CALL_START, index=index, id=call.get("id") or _call_id(call.get("name", "")), name=call.get("name", ""),
                                              extra={"thoughtSignature": signature} if signature else None))
                    events.append(StreamEvent(EventKind.TOOL_CALL_DELTA, index=index, text=dumps(call.get("args") or {}).decode()))
                elif "text" in part:
                    if not part["text"] and not signature:
                        continue  # a final chunk's empty part: it would open an empty block
                    if part.get("thought"):
                        index = self._switch("thought", events)
                        events.append(StreamEvent(EventKind.THINKING, index=index, text=part["text"], signature=signature,
                                                  extra={"signed_by": PROTOCOL} if signature else None))
                    else:
                        index = self._switch("text", events)
                        events.append(StreamEvent(EventKind.TEXT, index=index, text=part["text"], extra={"thoughtSignature": signature} if signature else None))
                elif signature and self._kind is not None:
                    events.append(StreamEvent(EventKind.THINKING, index=self._index, signature=signature, extra={"signed_by": PROTOCOL}))
            if candidate.get("finishReason"):
                self._finish = candidate["finishReason"]
        if (chunk.get("promptFeedback") or {}).get("blockReason"):
            self._finish = "SAFETY"
        if chunk.get("usageMetadata"):
            self._usage = decode_usage(chunk["usageMetadata"])
            events.append(StreamEvent(EventKind.USAGE, usage=self._usage))


# A chunk of one plain text part, up to the text (what _chunk writes for [{"text": ...}]).
_TEXT_CHUNK_HEAD = b'{"candidates":[{"content":{"role":"model","parts":[{"text":'


class GeminiStreamEncoder:
    """Canonical events → Gemini stream chunks (SSE ``data:`` lines, or a JSON array)."""

    __slots__ = ("_model", "_id", "_array", "_first", "_calls", "_usage", "_ended", "_text_tail")

    def __init__(self, model: str, array: bool = False) -> None:
        self._model = model
        self._id = random_hex(22)
        self._array = array
        self._first = True
        self._calls: dict[int, list[Any]] = {}  # index -> [id, name, args text, signature]
        self._usage: Usage | None = None
        self._ended = False
        self._text_tail: bytes | None = None  # after the text of a plain text chunk; reset when model or id change

    def _text_chunk(self, text: str) -> bytes:
        """``_chunk([{"text": text}])``, the chunk nearly every stream is made of. All of its
        bytes but the text are the same for the whole stream, so they are built once and
        kept instead of a dict tree and a dump per event."""
        tail = self._text_tail
        if tail is None:
            tail = self._text_tail = b'}]},"index":0}],"modelVersion":' + dumps(self._model) + b',"responseId":' + dumps(self._id) + b"}"
        return self._framed(_TEXT_CHUNK_HEAD + dumps(text) + tail)

    def _framed(self, data: bytes) -> bytes:
        """One chunk as the client reads it: an SSE event, or the next element of the array."""
        if self._array:
            prefix = b"[" if self._first else b",\r\n"
            self._first = False
            return prefix + data
        return b"data: " + data + b"\r\n\r\n"

    def _chunk(self, parts: list[dict[str, Any]], finish: str | None = None, usage: Usage | None = None) -> bytes:
        candidate: dict[str, Any] = {"content": {"role": "model", "parts": parts}, "index": 0}
        if finish:
            candidate["finishReason"] = finish
        chunk: dict[str, Any] = {"candidates": [candidate]}
        if usage is not None:
            chunk["usageMetadata"] = encode_usage(usage)
        chunk["modelVersion"] = self._model
        chunk["responseId"] = self._id
        return self._framed(dumps(chunk))

    def encode(self, events: list[StreamEvent]) -> bytes:
        out: list[bytes] = []
        for event in events:
            kind = event.kind
            if kind == EventKind.TEXT:
                if event.text:
                    if event.extra and event.extra.get("thoughtSignature"):
                        out.append(self._chunk([{"text": event.text, "thoughtSignature": event.extra["thoughtSignature"]}]))
                    else:
                        out.append(self._text_chunk(event.text))
            elif kind == EventKind.TOOL_CALL_DELTA:
                call = self._calls.get(event.index)
                if call is not None:
                    call[2] += event.text
            elif kind == EventKind.TOOL_CALL_START:
                signature = (event.extra or {}).get("thoughtSignature")
                self._calls[event.index] = [event.id, event.name or "", "", signature]
            elif kind == EventKind.BLOCK_STOP:
                call = self._calls.pop(event.index, None)
                if call is not None:
                    out.append(self._chunk([self._call_part(call)]))
            elif kind == EventKind.THINKING:
                if event.text:
                    part = {"text": event.text, "thought": True}
                    if event.signature:
                        part["thoughtSignature"] = event.signature
                    out.append(self._chunk([part]))
            elif kind == EventKind.USAGE:
                self._usage = event.usage
            elif kind == EventKind.START:
                if event.model:
                    self._model = event.model
                if event.id:  # any id is a valid responseId (as in encode_response)
                    self._id = event.id
                self._text_tail = None
            elif kind == EventKind.STOP:
                parts = [self._call_part(c) for c in self._calls.values()]
                self._calls.clear()
                out.append(self._chunk(parts or [{"text": ""}], STOP_TO_FINISH.get(event.stop_reason, "STOP"), event.usage or self._usage or Usage()))
                if self._array:
                    out.append(b"]")
                self._ended = True
            elif kind == EventKind.ERROR:
                error = event.error if isinstance(event.error, ProxyError) else ProxyError(500, str(event.error))
                body = dumps(GeminiCodec().error_body(error))
                if self._array:
                    out.append((b"[" if self._first else b",\r\n") + body + b"]")
                    self._first = False
                else:
                    out.append(b"data: " + body + b"\r\n\r\n")
        return b"".join(out)

    @staticmethod
    def _call_part(call: list[Any]) -> dict[str, Any]:
        try:
            args = loads(call[2]) if call[2] else {}
        except ValueError:
            args = {}
        part: dict[str, Any] = {"functionCall": {"id": call[0], "name": call[1], "args": args if isinstance(args, dict) else {}}}
        if call[3]:
            part["thoughtSignature"] = call[3]
        return part


# -- embeddings: Gemini's embedContent/batchEmbedContents ⇄ OpenAI's /v1/embeddings ----------


def openai_embeddings_to_gemini(body: dict[str, Any], model: str) -> dict[str, Any]:
    """OpenAI ``input`` (a string or list of strings) → Gemini ``batchEmbedContents``."""
    inputs = body.get("input")
    texts = [inputs] if isinstance(inputs, str) else inputs
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise bad_request("'input' must be a string or an array of strings for this backend", "input")
    request: dict[str, Any] = {"model": f"models/{model}", "content": {"parts": []}}
    requests = []
    for text in texts:
        entry = dict(request, content={"parts": [{"text": text}]})
        if body.get("dimensions"):
            entry["outputDimensionality"] = body["dimensions"]
        requests.append(entry)
    return {"requests": requests}


def gemini_embeddings_to_openai(result: dict[str, Any], model: str) -> dict[str, Any]:
    vectors = [e.get("values", []) for e in result.get("embeddings", [])]
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
        "model": model,
        "usage": {"prompt_tokens": 0, "total_tokens": 0},
    }


def openai_embeddings_from_gemini(body: dict[str, Any], model: str, batch: bool) -> dict[str, Any]:
    """A Gemini ``embedContent`` (or ``batchEmbedContents``) body as an OpenAI embeddings body."""
    requests = array(body.get("requests"), "requests") if batch else [body]
    texts = []
    for i, entry in enumerate(requests):
        content = entry.get("content") if isinstance(entry, dict) else None
        if not isinstance(content, dict):
            raise bad_request(f"requests[{i}].content is required" if batch else "content is required", "content")
        parts = array(content.get("parts"), "content.parts")
        texts.append("".join(string(p.get("text", ""), "content.parts.text") for p in parts if isinstance(p, dict)))
    out: dict[str, Any] = {"model": model, "input": texts}
    # One OpenAI call carries one setting for the whole batch: requests asking for different
    # sizes cannot share it (and are refused rather than given the first one's).
    sizes = {entry.get("outputDimensionality") for entry in requests if isinstance(entry, dict)}
    if len(sizes) > 1:
        raise bad_request(f"the requests ask for different outputDimensionality ({', '.join(map(str, sorted(sizes, key=str)))}): "
                          "llmproxy sends a batch to this backend as one call, so send one batch per size", "requests")
    dimensions = sizes.pop() if sizes else None
    if dimensions:
        out["dimensions"] = dimensions
    return out


def gemini_embeddings_from_openai(result: Any, batch: bool) -> dict[str, Any]:
    """An OpenAI embeddings answer as Gemini's (``embedding``, or ``embeddings`` for a batch)."""
    data = result.get("data") if isinstance(result, dict) else None
    if not isinstance(data, list):
        raise ProxyError(502, "backend's embeddings answer has no 'data' array")
    vectors = [{"values": entry.get("embedding", [])} for entry in sorted(data, key=lambda e: e.get("index", 0))]
    if batch:
        return {"embeddings": vectors}
    return {"embedding": vectors[0] if vectors else {"values": []}}
