"""OpenAI Responses (`/v1/responses`) ⇄ the canonical model.

Input items map to canonical messages: consecutive assistant-side items (``reasoning``,
assistant ``message``, ``function_call``) form one assistant message; ``function_call_output``
becomes a ``tool`` message; leading ``system``/``developer`` messages and ``instructions``
become the system prompt. Item ids, statuses and encrypted reasoning are kept in ``extra`` so a
Responses backend gets them back exactly. Tools other than functions (``namespace``,
``web_search`` …) pass through to Responses backends and are left out for any other backend,
which could not run them (noted in the flow trace by the pipeline's callers).

``previous_response_id`` needs a response store, which llmproxy does not keep: it is refused
with a 400 that says to send the whole conversation (what Codex does with ``store: false``).
"""

from __future__ import annotations

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
from .base import SSEStreamDecoder, array, carried, dumps, loads, public_extra, random_hex, string
from .openai_chat import effort_for_budget, file_from_data, file_to_data, image_from_url, image_to_url

PROTOCOL = "openai_responses"

_KNOWN_KEYS = frozenset(
    (
        "model", "input", "instructions", "tools", "tool_choice", "parallel_tool_calls", "reasoning", "text",
        "max_output_tokens", "temperature", "top_p", "stream", "metadata", "user",
    )
)
_ASSISTANT_ITEMS = frozenset(("reasoning", "function_call"))
# Stop reasons the API reports as an ``incomplete`` response, with its incomplete_details.reason.
INCOMPLETE_REASONS = {"max_tokens": "max_output_tokens", "content_filter": "content_filter"}


def _new_id(prefix: str) -> str:
    return f"{prefix}_{random_hex(24)}"


class OpenAIResponsesCodec:
    protocol = PROTOCOL
    content_type_stream = "text/event-stream"
    error_ends_connection = False

    # -- requests ----------------------------------------------------------------------
    def peek(self, body: dict[str, Any]) -> tuple[str, bool]:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise bad_request("'model' is required and must be a non-empty string", "model")
        items = body.get("input")
        if not isinstance(items, (str, list)):
            raise bad_request("'input' is required: a string or an array of input items", "input")
        if body.get("previous_response_id"):
            raise bad_request(
                "previous_response_id is not supported: llmproxy keeps no response store. "
                "Send the whole conversation in 'input' (store: false).",
                "previous_response_id",
            )
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise bad_request("'stream' must be a boolean", "stream")
        return model, stream

    def decode_request(self, body: dict[str, Any]) -> Request:
        model, stream = self.peek(body)
        request = Request(model=model, stream=stream, protocol=PROTOCOL)
        request.extra = {k: v for k, v in body.items() if k not in _KNOWN_KEYS}
        if "stream" in body:
            request.extra["_stream"] = True
        params = request.params
        if "max_output_tokens" in body:
            params["max_tokens"] = body["max_output_tokens"]
        for key in ("temperature", "top_p", "user"):
            if key in body:
                params[key] = body[key]
        if isinstance(body.get("metadata"), dict):
            request.metadata = dict(body["metadata"])
        if "parallel_tool_calls" in body:
            request.parallel_tool_calls = body["parallel_tool_calls"]
        instructions = body.get("instructions")
        if isinstance(instructions, str) and instructions:
            request.system.append(TextPart(instructions, extra={"_instructions": True}))
        reasoning = body.get("reasoning")
        if isinstance(reasoning, dict):
            request.reasoning = {k: v for k, v in reasoning.items() if v is not None} or None
        text = body.get("text")
        if isinstance(text, dict):
            fmt = text.get("format")
            if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
                request.response_format = {"type": "json_schema", "name": fmt.get("name", "response"), "schema": fmt.get("schema") or {}}
                if "strict" in fmt:
                    request.response_format["strict"] = fmt["strict"]
            elif isinstance(fmt, dict) and fmt.get("type") == "json_object":
                request.response_format = {"type": "json_object"}
            request.extra["_text"] = text
        other_tools = []
        for i, tool in enumerate(array(body.get("tools"), "tools")):
            if not isinstance(tool, dict):
                raise bad_request(f"tools[{i}] must be an object", f"tools[{i}]")
            if tool.get("type") == "function":
                if not isinstance(tool.get("name"), str):
                    raise bad_request(f"tools[{i}].name is required", f"tools[{i}].name")
                request.tools.append(_function_tool(tool))
            else:
                other_tools.append((i, tool))  # with its position, to put it back in place
        if other_tools:
            request.extra["_other_tools"] = other_tools
        choice = body.get("tool_choice")
        if isinstance(choice, str):
            request.tool_choice = choice
        elif isinstance(choice, dict) and choice.get("type") == "function":
            request.tool_choice = choice.get("name")
        items = body["input"]
        if isinstance(items, str):
            request.messages = [Message(role="user", parts=[TextPart(items)], extra={"_string": True})]
        else:
            self._decode_items(items, request)
        return request

    def _decode_items(self, items: list[Any], request: Request) -> None:
        messages = request.messages
        leading = True
        for i, item in enumerate(items):
            where = f"input[{i}]"
            if not isinstance(item, dict):
                raise bad_request(f"{where} must be an object", where)
            kind = item.get("type", "message")
            if kind == "message":
                role = item.get("role")
                if role not in ("user", "assistant", "system", "developer"):
                    raise bad_request(f"{where}.role must be user, assistant, system or developer", f"{where}.role")
                parts = _decode_content(item.get("content"), f"{where}.content")
                extra = {k: v for k, v in item.items() if k not in ("type", "role", "content")}
                extra["_typed"] = "type" in item
                extra["_string"] = isinstance(item.get("content"), str)
                if leading and role in ("system", "developer"):
                    for part in parts:
                        if isinstance(part, TextPart):
                            part.extra = {**part.extra, "_role": role, "_item": extra, "_index": i}
                            request.system.append(part)
                    continue
                leading = False
                if role == "assistant":
                    target = _assistant(messages)
                    target.parts.extend(parts)
                    target.extra.setdefault("_items", []).append(("message", extra))
                else:
                    messages.append(Message(role=role, parts=parts, extra=extra))
            elif kind == "function_call":
                leading = False
                if not isinstance(item.get("name"), str) or not isinstance(item.get("call_id"), str):
                    raise bad_request(f"{where}: a function_call needs 'name' and 'call_id'", where)
                arguments = item.get("arguments")
                extra = {k: v for k, v in item.items() if k not in ("type", "call_id", "name", "arguments")}
                _assistant(messages).parts.append(
                    ToolCallPart(id=item["call_id"], name=item["name"], arguments=arguments if isinstance(arguments, str) else dumps(arguments or {}).decode(), extra=extra)
                )
            elif kind == "function_call_output":
                leading = False
                if not isinstance(item.get("call_id"), str):
                    raise bad_request(f"{where}.call_id is required", f"{where}.call_id")
                output = item.get("output")
                content = _decode_content(output, f"{where}.output") if not isinstance(output, str) else [TextPart(output)]
                extra = {k: v for k, v in item.items() if k not in ("type", "call_id", "output")}
                part = ToolResultPart(tool_call_id=item["call_id"], content=content, extra=extra)
                if messages and messages[-1].role == "tool":
                    messages[-1].parts.append(part)
                else:
                    messages.append(Message(role="tool", parts=[part]))
            elif kind == "reasoning":
                leading = False
                summary = item.get("summary") or []
                text = "\n\n".join(s.get("text", "") for s in summary if isinstance(s, dict))
                extra = {k: v for k, v in item.items() if k not in ("type", "encrypted_content")}
                _assistant(messages).parts.append(ThinkingPart(text=text, signature=item.get("encrypted_content"), protocol=PROTOCOL, extra=extra))
            elif kind == "additional_tools":
                # Tools declared as an input item (Codex's built-in provider does so): its
                # functions are tools like any; the rest (namespaces, custom tools) only a
                # Responses backend can run, so the item is kept whole for one. It is no
                # message: the developer messages after it are still the system prompt.
                request.extra.setdefault("_additional_tools", []).append(item)
                for tool in item.get("tools") or ():
                    if isinstance(tool, dict) and tool.get("type") == "function" and isinstance(tool.get("name"), str):
                        request.tools.append(_function_tool(tool, _additional=True))
            else:
                leading = False
                # Other item types (custom tool calls, shell calls, references …) only make
                # sense to a Responses backend; keep them in place for one.
                # A custom tool's call and output read as text to another backend.
                target = _assistant(messages) if kind.endswith("_call") else None
                if target is not None:
                    target.parts.append(OpaquePart(PROTOCOL, item, text=_custom_reading(item)))
                else:
                    messages.append(Message(role="user", parts=[OpaquePart(PROTOCOL, item, text=_custom_reading(item))]))

    def encode_request(self, request: Request, model: str) -> dict[str, Any]:
        same = request.protocol == PROTOCOL
        body: dict[str, Any] = public_extra(request.extra) if same else {}
        body["model"] = model
        items: list[dict[str, Any]] = list(request.extra.get("_additional_tools", ())) if same else []
        instructions = []
        last_index = None
        for part in request.system:
            if same and part.extra.get("_instructions"):
                instructions.append(part.text)
                continue
            content = {"type": "input_text", "text": part.text}
            if same:
                content.update({k: v for k, v in part.extra.items() if not k.startswith("_")})
                index = part.extra.get("_index")
                if index is not None and index == last_index:  # several parts of one item
                    items[-1]["content"].append(content)
                    continue
                last_index = index
                meta = part.extra.get("_item", {})
                role = part.extra.get("_role", "developer")
                item = {**({"type": "message"} if meta.get("_typed", True) else {}), **public_extra(meta), "role": role, "content": [content]}
            else:
                item = {"type": "message", "role": "developer", "content": [content]}
            items.append(item)
        if instructions:
            body["instructions"] = "\n\n".join(instructions)
        for message in request.messages:
            items.extend(_encode_message(message, same))
        if same and len(request.messages) == 1 and request.messages[0].extra.get("_string") and not items[:-1] and not request.system:
            body["input"] = request.messages[0].text
        else:
            body["input"] = items
        params = request.params
        if "max_tokens" in params:
            body["max_output_tokens"] = params["max_tokens"]
        for key in ("temperature", "top_p", "user"):
            if key in params:
                body[key] = params[key]
        tools = _encode_tools(request, same)
        if tools:
            body["tools"] = tools
        if request.tool_choice is not None:
            body["tool_choice"] = _encode_tool_choice(request.tool_choice)
        if request.parallel_tool_calls is not None:
            body["parallel_tool_calls"] = request.parallel_tool_calls
        reasoning = request.reasoning or {}
        if same and reasoning:
            body["reasoning"] = reasoning
        elif reasoning.get("effort") or reasoning.get("budget_tokens"):
            effort = reasoning.get("effort") or effort_for_budget(reasoning["budget_tokens"])
            body["reasoning"] = {"effort": effort, "summary": "auto"}
        text: dict[str, Any] = dict(request.extra.get("_text", {})) if same else {}
        fmt = request.response_format
        if fmt is not None:
            if fmt["type"] == "json_schema":
                wire = {"type": "json_schema", "name": fmt.get("name", "response"), "schema": fmt.get("schema") or {}}
                if "strict" in fmt:
                    wire["strict"] = fmt["strict"]
                text["format"] = wire
            else:
                text["format"] = {"type": "json_object"}
        if text:
            body["text"] = text
        if same and request.metadata:
            body["metadata"] = request.metadata
        if not same:
            body["store"] = False  # llmproxy never relies on a server-side store
            if any(isinstance(p, ThinkingPart) for m in request.messages for p in m.parts) or body.get("reasoning"):
                body["include"] = ["reasoning.encrypted_content"]
        if request.stream or not same or "_stream" in request.extra:
            body["stream"] = request.stream
        return body

    # -- responses ---------------------------------------------------------------------
    def decode_response(self, body: dict[str, Any]) -> Response:
        output = body.get("output")
        if not isinstance(output, list):
            if body.get("error"):
                err = body["error"]
                raise ProxyError(502, f"upstream error: {err.get('message', err) if isinstance(err, dict) else err}")
            raise ProxyError(502, "upstream answer has no 'output' array")
        response = Response(model=body.get("model") or "", id=body.get("id"), protocol=PROTOCOL)
        for item in output:
            if isinstance(item, dict):
                response.parts.extend(_decode_output_item(item))
        response.usage = decode_usage(body.get("usage"))
        response.stop_reason = _stop_reason(body, response)
        return response

    def encode_response(self, response: Response, request: Request | None) -> dict[str, Any]:
        output = _output_items(response)
        reason = INCOMPLETE_REASONS.get(response.stop_reason or "")
        return _response_object(response.id, response.model, "incomplete" if reason else "completed", output, response.usage, request, reason)

    # -- streams -----------------------------------------------------------------------
    def stream_decoder(self) -> "ResponsesStreamDecoder":
        return ResponsesStreamDecoder()

    def stream_encoder(self, flow: Any) -> "ResponsesStreamEncoder":
        return ResponsesStreamEncoder(flow.model, flow.request if flow.request_decoded else None)

    def stream_complete(self, tail: bytes) -> bool:
        return b"response.completed" in tail or b"response.incomplete" in tail

    # -- errors ------------------------------------------------------------------------
    def error_body(self, error: ProxyError) -> dict[str, Any]:
        return {"error": {"message": error.message, "type": error.kind, "param": error.param, "code": error.code}}

    def error_event(self, error: ProxyError) -> bytes:
        return ResponsesStreamEncoder("", None).failed(error)


def decode_usage(usage: Any) -> Usage:
    if not isinstance(usage, dict):
        return Usage()
    return Usage(
        input_tokens=usage.get("input_tokens") or 0,
        output_tokens=usage.get("output_tokens") or 0,
        cached_input_tokens=(usage.get("input_tokens_details") or {}).get("cached_tokens") or 0,
        reasoning_tokens=(usage.get("output_tokens_details") or {}).get("reasoning_tokens") or 0,
    )


def encode_usage(usage: Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.input_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_input_tokens},
        "output_tokens": usage.output_tokens,
        "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
        "total_tokens": usage.input_tokens + usage.output_tokens,
    }


def _stop_reason(body: dict[str, Any], response: Response) -> str:
    if body.get("status") == "incomplete":
        reason = (body.get("incomplete_details") or {}).get("reason")
        return "content_filter" if reason == "content_filter" else "max_tokens"
    return "tool_use" if response.tool_calls else "end_turn"


def _custom_reading(item: dict[str, Any]) -> str | None:
    """How a custom (freeform) tool's call or output reads to a backend of another protocol,
    which has no such tool: as text, so the conversation still says what was done (Codex's
    apply_patch). None for the other item types, which are left out there."""
    kind = item.get("type")
    if kind == "custom_tool_call":
        return f"[called the tool {item.get('name')} (call {item.get('call_id')}) with this input]\n{item.get('input', '')}"
    if kind == "custom_tool_call_output":
        output = item.get("output")
        if not isinstance(output, str):
            output = dumps(output).decode()
        return f"[the output of tool call {item.get('call_id')}]\n{output}"
    return None


def _assistant(messages: list[Message]) -> Message:
    if messages and messages[-1].role == "assistant":
        return messages[-1]
    message = Message(role="assistant")
    messages.append(message)
    return message


def _function_tool(tool: dict[str, Any], **notes: Any) -> Tool:
    """A ``function`` tool declaration; ``notes`` are the codec's own (``_``-prefixed) extras."""
    extra = {k: v for k, v in tool.items() if k not in ("type", "name", "description", "parameters", "strict")}
    return Tool(tool["name"], tool.get("description"), tool.get("parameters") or {"type": "object", "properties": {}}, tool.get("strict"), {**extra, **notes})


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
        if kind in ("input_text", "output_text", "text"):
            parts.append(TextPart(string(item.get("text", ""), f"{where}[{i}].text"), extra={k: v for k, v in item.items() if k != "text"}))
        elif kind == "input_image":
            url = item.get("image_url")
            if isinstance(url, str):
                parts.append(image_from_url(url, {k: v for k, v in item.items() if k not in ("type", "image_url")}))
            else:
                parts.append(OpaquePart(PROTOCOL, item))
        elif kind == "input_file":
            extra = {k: v for k, v in item.items() if k not in ("type", "file_data", "file_url", "filename")}
            if isinstance(item.get("file_data"), str):
                parts.append(file_from_data(item["file_data"], item.get("filename"), extra))
            elif isinstance(item.get("file_url"), str):
                name = item.get("filename")
                parts.append(FilePart(url=item["file_url"], name=name if isinstance(name, str) and name else None, extra=extra))
            else:
                parts.append(OpaquePart(PROTOCOL, item, essential=True))  # a file_id: OpenAI's own
        else:
            parts.append(OpaquePart(PROTOCOL, item))
    return parts


def _encode_content(parts: list[Part], same: bool, assistant: bool) -> list[dict[str, Any]]:
    text_type = "output_text" if assistant else "input_text"
    out: list[dict[str, Any]] = []
    for part in parts:
        if isinstance(part, TextPart):
            entry = {"type": text_type, "text": part.text}
            if same:
                entry.update({k: v for k, v in part.extra.items() if not k.startswith("_")})
                entry["type"] = part.extra.get("type", text_type)
            elif assistant:
                entry["annotations"] = []
            out.append(entry)
        elif isinstance(part, ImagePart):
            entry = {"type": "input_image", "image_url": image_to_url(part)}
            entry.setdefault("detail", part.extra.get("detail", "auto"))
            out.append(entry)
        elif isinstance(part, FilePart):
            entry = {"type": "input_file", "filename": part.name or "document"}
            if part.data is not None:
                entry["file_data"] = file_to_data(part)
            else:
                entry["file_url"] = part.url
            if same:
                entry.update(part.extra)
            out.append(entry)
        elif isinstance(part, OpaquePart) and carried(part, PROTOCOL):
            out.append(part.data)
    return out


def _encode_message(message: Message, same: bool) -> list[dict[str, Any]]:
    if message.role == "tool":
        items = []
        for part in message.parts:
            if isinstance(part, ToolResultPart):
                texts = [p.text for p in part.content if isinstance(p, TextPart)]
                if len(texts) == len(part.content):
                    output: Any = "".join(texts)
                else:
                    output = _encode_content(part.content, same, False)
                if part.is_error and isinstance(output, str):
                    # function_call_output has no error flag: say it in the output. (A request
                    # decoded from this protocol never sets is_error, so this never alters a
                    # pass-through; a plugin's or another protocol's flag must not be lost.)
                    output = f"Error: {output}"
                item: dict[str, Any] = {"type": "function_call_output", "call_id": part.tool_call_id, "output": output}
                if same:
                    item = {"type": "function_call_output", **{k: v for k, v in part.extra.items() if not k.startswith("_")}, "call_id": part.tool_call_id, "output": output}
                items.append(item)
        return items
    if message.role == "assistant":
        return _assistant_items(message, same)
    parts = [p for p in message.parts if not isinstance(p, OpaquePart)]
    opaque = [p.data for p in message.parts if isinstance(p, OpaquePart) and carried(p, PROTOCOL)]
    items = []
    if parts:
        role = message.role if message.role in ("user", "system", "developer") else "user"
        item = {"type": "message", "role": role, "content": _encode_content(parts, same, False)}
        if same:
            content = item["content"]
            if message.extra.get("_string") and len(content) == 1 and content[0]["type"] == "input_text" and len(content[0]) == 2:
                content = content[0]["text"]
            item = {**({"type": "message"} if message.extra.get("_typed", True) else {}), **public_extra(message.extra), "role": role, "content": content}
        items.append(item)
    items.extend(opaque)
    return items


def _assistant_items(message: Message, same: bool) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    metas = [meta for kind, meta in message.extra.get("_items", ())] if same else []
    pending: list[Part] = []

    def flush_text() -> None:
        if pending:
            meta = metas.pop(0) if metas else {}
            meta = {k: v for k, v in meta.items() if not k.startswith("_")}
            item = {"type": "message", **meta, "role": "assistant", "content": _encode_content(pending, same, True)}
            items.append(item)
            pending.clear()

    for part in message.parts:
        if isinstance(part, TextPart):
            pending.append(part)
            continue
        flush_text()
        if isinstance(part, ToolCallPart):
            item = {"type": "function_call", "call_id": part.id, "name": part.name, "arguments": part.arguments or "{}"}
            if same:
                item.update(part.extra)
            items.append(item)
        elif isinstance(part, ThinkingPart):
            if part.protocol != PROTOCOL or not part.signature and not same:
                continue  # reasoning from another model family cannot be replayed here
            item = {"type": "reasoning", **part.extra}
            item.setdefault("summary", [{"type": "summary_text", "text": part.text}] if part.text else [])
            if part.signature:
                item["encrypted_content"] = part.signature
            items.append(item)
        elif isinstance(part, OpaquePart) and part.protocol == PROTOCOL and same:
            items.append(part.data)
    flush_text()
    return items


def _decode_output_item(item: dict[str, Any]) -> list[Part]:
    kind = item.get("type")
    if kind == "message":
        return [p for p in _decode_content(item.get("content"), "output") if isinstance(p, TextPart)]
    if kind == "function_call":
        return [ToolCallPart(id=item.get("call_id") or _new_id("call"), name=item.get("name", ""), arguments=item.get("arguments") or "{}", extra={"id": item["id"]} if item.get("id") else {})]
    if kind == "reasoning":
        summary = item.get("summary") or []
        text = "\n\n".join(s.get("text", "") for s in summary if isinstance(s, dict))
        return [ThinkingPart(text=text, signature=item.get("encrypted_content"), protocol=PROTOCOL, extra={"id": item["id"]} if item.get("id") else {})]
    return [OpaquePart(PROTOCOL, item)]


def _output_items(response: Response) -> list[dict[str, Any]]:
    items = []
    text: list[str] = []

    def flush() -> None:
        if text:
            items.append(_message_item(_new_id("msg"), "".join(text)))
            text.clear()

    for part in response.parts:
        if isinstance(part, TextPart):
            text.append(part.text)
            continue
        flush()
        if isinstance(part, ToolCallPart):
            items.append({"type": "function_call", "id": part.extra.get("id") or _new_id("fc"), "call_id": part.id, "name": part.name, "arguments": part.arguments or "{}", "status": "completed"})
        elif isinstance(part, ThinkingPart):
            item: dict[str, Any] = {"type": "reasoning", "id": part.extra.get("id") or _new_id("rs"), "summary": [{"type": "summary_text", "text": part.text}] if part.text else []}
            if part.protocol == PROTOCOL and part.signature:
                item["encrypted_content"] = part.signature
            items.append(item)
        elif isinstance(part, OpaquePart) and part.protocol == PROTOCOL:
            items.append(part.data)
    flush()
    return items


def _message_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def _encode_tools(request: Request, same: bool) -> list[dict[str, Any]]:
    tools = []
    for tool in request.tools:
        if same and tool.extra.get("_additional"):
            continue  # in its additional_tools item
        entry: dict[str, Any] = {"type": "function", "name": tool.name}
        if tool.description is not None:
            entry["description"] = tool.description
        entry["parameters"] = tool.parameters
        if tool.strict is not None or not same:
            # The Responses API makes functions strict unless told otherwise.
            entry["strict"] = bool(tool.strict)
        if same:
            entry.update(public_extra(tool.extra))
        tools.append(entry)
    if same:
        for position, tool in request.extra.get("_other_tools", ()):
            tools.insert(position, tool)
    return tools


def _encode_tool_choice(choice: str) -> Any:
    return choice if choice in ("auto", "none", "required") else {"type": "function", "name": choice}


def _response_object(response_id: str | None, model: str, status: str, output: list[dict[str, Any]], usage: Usage | None, request: Request | None,
                     reason: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": response_id if response_id and response_id.startswith("resp_") else _new_id("resp"),
        "object": "response",
        "created_at": int(time.time()),
        "status": status,
        "error": None,
        "incomplete_details": {"reason": reason or "max_output_tokens"} if status == "incomplete" else None,
        "model": model,
        "output": output,
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": encode_usage(usage) if usage is not None else None,
    }
    if request is not None and request.protocol == PROTOCOL:
        # The settings the answer was made with, echoed as the API does, whichever backend
        # served it (SDK users read response.tools, response.instructions …).
        body["store"] = request.extra.get("store", False)
        if request.metadata:
            body["metadata"] = request.metadata
        body["tools"] = _encode_tools(request, True)
        if request.tool_choice is not None:
            body["tool_choice"] = _encode_tool_choice(request.tool_choice)
        if request.parallel_tool_calls is not None:
            body["parallel_tool_calls"] = request.parallel_tool_calls
        instructions = [part.text for part in request.system if part.extra.get("_instructions")]
        body["instructions"] = "\n\n".join(instructions) if instructions else None
        for key, wire in (("temperature", "temperature"), ("top_p", "top_p"), ("max_tokens", "max_output_tokens")):
            if key in request.params:
                body[wire] = request.params[key]
    return body


class ResponsesStreamDecoder(SSEStreamDecoder):
    """Responses SSE events → canonical events (block index = output_index, plus one per
    reasoning summary part so summaries stay separate)."""

    __slots__ = ("_done", "_calls", "_has_call", "_text_seen", "_summarised")

    def __init__(self) -> None:
        super().__init__()
        self._done = False
        self._calls: dict[int, str] = {}
        self._has_call = False
        self._text_seen: set[int] = set()
        self._summarised: set[int] = set()  # output indexes whose reasoning summary streamed

    def _end(self, events: list[StreamEvent]) -> None:
        if not self._done:
            raise ProxyError(502, "upstream stream ended before response.completed")

    def _frame(self, name: str | None, data: bytes, events: list[StreamEvent]) -> None:
        if self._done or not data or data == b"[DONE]":
            return
        try:
            event = loads(data)
        except ValueError:
            raise ProxyError(502, f"upstream sent a malformed stream event: {data[:200]!r}") from None
        kind = event.get("type") or name
        if kind == "response.output_text.delta":
            index = event.get("output_index", 0)
            events.append(StreamEvent(EventKind.TEXT, index=index, text=event.get("delta", "")))
        elif kind == "response.function_call_arguments.delta":
            events.append(StreamEvent(EventKind.TOOL_CALL_DELTA, index=event.get("output_index", 0), text=event.get("delta", "")))
        elif kind == "response.reasoning_summary_text.delta":
            self._summarised.add(event.get("output_index", 0))
            events.append(StreamEvent(EventKind.THINKING, index=event.get("output_index", 0), text=event.get("delta", "")))
        elif kind == "response.output_item.added":
            item = event.get("item") or {}
            index = event.get("output_index", 0)
            if item.get("type") == "function_call":
                self._has_call = True
                events.append(StreamEvent(EventKind.TOOL_CALL_START, index=index, id=item.get("call_id"), name=item.get("name"), extra={"id": item.get("id")}))
                if item.get("arguments"):
                    events.append(StreamEvent(EventKind.TOOL_CALL_DELTA, index=index, text=item["arguments"]))
            elif item.get("type") == "reasoning" and item.get("id"):
                # The id now, before the summary: a Responses client echoes the item back by
                # the id announced in output_item.added, which the encoder writes first.
                events.append(StreamEvent(EventKind.THINKING, index=index, extra={"id": item["id"]}))
        elif kind == "response.output_item.done":
            item = event.get("item") or {}
            index = event.get("output_index", 0)
            if item.get("type") == "reasoning":
                if index not in self._summarised:
                    # a server that sends the summary only with the finished item: the
                    # same thinking a non-streamed answer would have
                    summary = "\n\n".join(s.get("text", "") for s in item.get("summary") or () if isinstance(s, dict) and isinstance(s.get("text"), str))
                    if summary:
                        events.append(StreamEvent(EventKind.THINKING, index=index, text=summary))
                extra = {"id": item.get("id"), "signed_by": PROTOCOL}
                events.append(StreamEvent(EventKind.THINKING, index=index, signature=item.get("encrypted_content"), extra=extra))
            elif item.get("type") not in ("message", "function_call", "reasoning"):
                events.append(StreamEvent(EventKind.TEXT, index=index, extra={"responses_item": item}))
            events.append(StreamEvent(EventKind.BLOCK_STOP, index=index))
        elif kind == "response.reasoning_summary_part.added" and event.get("summary_index", 0) > 0:
            events.append(StreamEvent(EventKind.THINKING, index=event.get("output_index", 0), text="\n\n"))
        elif kind == "response.created":
            response = event.get("response") or {}
            events.append(StreamEvent(EventKind.START, id=response.get("id"), model=response.get("model")))
        elif kind in ("response.completed", "response.incomplete"):
            response = event.get("response") or {}
            usage = decode_usage(response.get("usage"))
            if kind == "response.incomplete":
                reason = (response.get("incomplete_details") or {}).get("reason")
                stop = "content_filter" if reason == "content_filter" else "max_tokens"
            else:
                stop = "tool_use" if self._has_call else "end_turn"
            events.append(StreamEvent(EventKind.USAGE, usage=usage))
            events.append(StreamEvent(EventKind.STOP, stop_reason=stop, usage=usage))
            self._done = True
        elif kind in ("response.failed", "error"):
            err = (event.get("response") or {}).get("error") if kind == "response.failed" else event
            err = err or {}
            raise ProxyError(502, f"upstream error mid-stream: {err.get('message', err)}", kind=err.get("code") or "upstream_error", in_stream=True)


# A response.output_text.delta event up to its sequence number (see _text_delta).
_TEXT_DELTA_HEAD = b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","sequence_number":'


class ResponsesStreamEncoder:
    """Canonical events → Responses SSE, the full event sequence Codex and the SDK expect."""

    __slots__ = ("_model", "_id", "_seq", "_started", "_items", "_order", "_open", "_request", "_usage", "_created")

    def __init__(self, model: str, request: Request | None) -> None:
        self._model = model
        self._id = _new_id("resp")
        self._seq = 0
        self._started = False
        self._items: dict[int, dict[str, Any]] = {}  # canonical index -> output item being built
        self._order: list[dict[str, Any]] = []
        self._open: dict[str, Any] | None = None
        self._request = request
        self._usage: Usage | None = None
        self._created = int(time.time())

    def _event(self, kind: str, payload: dict[str, Any]) -> bytes:
        payload = {"type": kind, "sequence_number": self._seq, **payload}
        self._seq += 1
        return b"event: " + kind.encode() + b"\ndata: " + dumps(payload) + b"\n\n"

    def _text_delta(self, entry: dict[str, Any], text: str) -> bytes:
        """``response.output_text.delta`` for the message item ``entry``: what :meth:`_event`
        writes, from bytes built once per item, since every delta of an item is the same
        but for its sequence number and text (a dict and a dump per event cost more)."""
        middle = entry.get("delta_bytes")
        if middle is None:
            position = b',"item_id":' + dumps(entry["item"]["id"]) + b',"output_index":%d' % entry["output_index"]
            middle = entry["delta_bytes"] = position + b',"content_index":0,"delta":'
        seq = self._seq
        self._seq += 1
        return _TEXT_DELTA_HEAD + b"%d" % seq + middle + dumps(text) + b',"logprobs":[]}\n\n'

    def _snapshot(self, status: str, usage: Usage | None = None, reason: str | None = None) -> dict[str, Any]:
        body = _response_object(self._id, self._model, status, [i["item"] for i in self._order if i.get("done")] if status != "in_progress" else [], usage, self._request, reason)
        body["created_at"] = self._created
        return body

    def _begin(self, out: list[bytes], event: StreamEvent | None) -> None:
        if event is not None:
            if event.model:
                self._model = event.model
            if event.id and event.id.startswith("resp_"):
                self._id = event.id
        self._started = True
        out.append(self._event("response.created", {"response": self._snapshot("in_progress")}))
        out.append(self._event("response.in_progress", {"response": self._snapshot("in_progress")}))

    def _add(self, index: int, item: dict[str, Any], out: list[bytes]) -> dict[str, Any]:
        self._close_open(out)
        entry = {"item": item, "output_index": len(self._order), "done": False}
        self._items[index] = entry
        self._order.append(entry)
        self._open = entry
        shown = dict(item)
        if item["type"] == "message":
            shown["content"] = []  # parts arrive with content_part.added
        elif item["type"] == "reasoning":
            shown["summary"] = []
        else:
            shown["status"] = "in_progress"
        out.append(self._event("response.output_item.added", {"output_index": entry["output_index"], "item": shown}))
        return entry

    def _close_open(self, out: list[bytes]) -> None:
        entry = self._open
        if entry is None:
            return
        self._open = None
        item = entry["item"]
        position = {"item_id": item["id"], "output_index": entry["output_index"]}
        if item["type"] == "message":
            if "texts" in entry:  # a streamed text's pieces, joined once (see encode)
                item["content"][0]["text"] = "".join(entry["texts"])
            text = item["content"][0]["text"]
            out.append(self._event("response.output_text.done", {**position, "content_index": 0, "text": text, "logprobs": []}))
            out.append(self._event("response.content_part.done", {**position, "content_index": 0, "part": item["content"][0]}))
        elif item["type"] == "function_call":
            if not item["arguments"]:
                item["arguments"] = "{}"  # a call without arguments (a Chat backend may stream none): still JSON
            out.append(self._event("response.function_call_arguments.done", {**position, "arguments": item["arguments"]}))
        elif item["type"] == "reasoning" and item["summary"]:
            part = item["summary"][0]
            out.append(self._event("response.reasoning_summary_text.done", {**position, "summary_index": 0, "text": part["text"]}))
            out.append(self._event("response.reasoning_summary_part.done", {**position, "summary_index": 0, "part": part}))
        if item["type"] != "reasoning":
            item["status"] = "completed"
        entry["done"] = True
        out.append(self._event("response.output_item.done", {"output_index": entry["output_index"], "item": item}))

    def encode(self, events: list[StreamEvent]) -> bytes:
        out: list[bytes] = []
        for event in events:
            kind = event.kind
            if not self._started:
                # Even a failure before any output: the SDK's stream helper refuses events
                # (``error`` included) that come before ``response.created``.
                self._begin(out, event if kind == EventKind.START else None)
                if kind == EventKind.START:
                    continue
            if kind == EventKind.TEXT:
                if not event.text:
                    item = event.extra.get("responses_item") if event.extra else None
                    if isinstance(item, dict) and event.index not in self._items:
                        # an output item llmproxy has no type for (local_shell_call …): whole
                        self._add(event.index, {"id": _new_id("item"), **item}, out)
                        self._close_open(out)
                    continue
                entry = self._items.get(event.index)
                if entry is None or entry["item"]["type"] != "message":
                    item = _message_item(_new_id("msg"), "", "in_progress")
                    entry = self._add(event.index, item, out)
                    # The text's pieces, joined into the item when it closes: adding to the
                    # string per event would make a long answer quadratic.
                    entry["texts"] = []
                    out.append(self._event("response.content_part.added", {"item_id": item["id"], "output_index": entry["output_index"], "content_index": 0,
                                                                           "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}}))
                if entry is not self._open:
                    continue
                entry["texts"].append(event.text)
                out.append(self._text_delta(entry, event.text))
            elif kind == EventKind.TOOL_CALL_DELTA:
                entry = self._items.get(event.index)
                if entry is None or entry is not self._open:
                    continue
                entry["item"]["arguments"] += event.text
                out.append(self._event("response.function_call_arguments.delta", {"item_id": entry["item"]["id"], "output_index": entry["output_index"], "delta": event.text}))
            elif kind == EventKind.TOOL_CALL_START:
                fc_id = (event.extra or {}).get("id") or _new_id("fc")
                self._add(event.index, {"type": "function_call", "id": fc_id, "call_id": event.id or _new_id("call"), "name": event.name or "", "arguments": "", "status": "in_progress"}, out)
            elif kind == EventKind.THINKING:
                entry = self._items.get(event.index)
                if entry is None:
                    rs_id = (event.extra or {}).get("id") or _new_id("rs")
                    entry = self._add(event.index, {"type": "reasoning", "id": rs_id, "summary": []}, out)
                if entry is not self._open:
                    continue
                item = entry["item"]
                position = {"item_id": item["id"], "output_index": entry["output_index"]}
                if event.text:
                    if not item["summary"]:
                        item["summary"].append({"type": "summary_text", "text": ""})
                        out.append(self._event("response.reasoning_summary_part.added", {**position, "summary_index": 0, "part": {"type": "summary_text", "text": ""}}))
                    item["summary"][0]["text"] += event.text
                    out.append(self._event("response.reasoning_summary_text.delta", {**position, "summary_index": 0, "delta": event.text}))
                # Only a Responses backend's encrypted reasoning (its events carry the item
                # id) may be replayed to one; another family's signature would be refused.
                if event.signature and (event.extra or {}).get("id"):
                    item["encrypted_content"] = event.signature
            elif kind == EventKind.BLOCK_STOP:
                entry = self._items.get(event.index)
                if entry is not None and entry is self._open:
                    self._close_open(out)
            elif kind == EventKind.USAGE:
                self._usage = event.usage
            elif kind == EventKind.STOP:
                self._close_open(out)
                usage = event.usage or self._usage or Usage()
                reason = INCOMPLETE_REASONS.get(event.stop_reason or "")
                status = "incomplete" if reason else "completed"
                out.append(self._event(f"response.{status}", {"response": self._snapshot(status, usage, reason)}))
            elif kind == EventKind.ERROR:
                error = event.error if isinstance(event.error, ProxyError) else ProxyError(500, str(event.error))
                out.append(self.failed(error))
        return b"".join(out)

    def failed(self, error: ProxyError) -> bytes:
        """An ``error`` event, then ``response.failed``: what the API sends when it fails mid-stream."""
        payload = {"code": error.code or error.kind, "message": error.message, "param": error.param}
        response = self._snapshot("failed")
        response["error"] = {"code": error.code or error.kind, "message": error.message}
        return self._event("error", payload) + self._event("response.failed", {"response": response})
