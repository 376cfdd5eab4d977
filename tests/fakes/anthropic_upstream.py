"""A fake Anthropic upstream: a real aiohttp server on 127.0.0.1 speaking the Messages API.

It answers the way api.anthropic.com does, so tests exercise llmproxy over real sockets:

- ``POST /v1/messages`` (``?beta=true`` too), non-streamed: one ``message`` object whose
  ``usage`` has the cache counts; streamed (``stream: true``): exactly Anthropic's SSE, every
  event with its ``event:`` line — ``message_start`` (with usage) first, then per content
  block ``content_block_start`` / ``content_block_delta``… / ``content_block_stop`` (a
  ``ping`` after the first start), then ``message_delta`` (stop reason, cumulative usage)
  and ``message_stop``. Text comes as ``text_delta`` pieces, a tool call as ``tool_use``
  with ``input_json_delta`` pieces (the first one empty, as the API does), and when the
  request enables ``thinking`` (``enabled`` or ``adaptive``) a ``thinking`` block comes first
  with ``thinking_delta`` and ``signature_delta`` (or a ``redacted_thinking`` block);
- tools: as :func:`fakes.common.plan` decides, honouring ``tool_choice``
  (``auto``/``any``/``tool``/``none``, ``disable_parallel_tool_use``);
- ``output_config.format`` ``json_schema`` gets JSON shaped by the schema;
- ``POST /v1/messages/count_tokens`` → ``{"input_tokens": n}`` (the same n that ``usage``
  reports for the same system, messages and tools);
- ``GET /v1/models`` lists ``models``; ``HEAD /`` answers 200 (Claude Code's preflight);
- errors: ``{"type": "error", "error": {"type", "message"}, "request_id"}`` with the status;
  a scripted in-stream failure is an ``event: error`` frame.

It is strict where the API is (``fake.strict = False`` turns that off): ``anthropic-version``
header, ``model``, ``max_tokens`` and ``messages`` required; ``thinking`` blocks need their
``signature``; a ``tool_result`` must answer a ``tool_use`` of the assistant turn before it;
``role: system`` messages only with the ``mid-conversation-system`` beta; a thinking
``budget_tokens`` must be ≥ 1024 and below ``max_tokens``; thinking may not be combined with a
``tool_choice`` that forces a tool; with ``thinking: enabled``, a last assistant turn that
calls tools must begin with a thinking block; a custom tool's ``input_schema`` must be
``type: object`` (so Gemini's upper-case ``OBJECT`` is refused).

Scripting and recording are shared with the other fakes (:mod:`fakes.common`)::

    async with FakeAnthropic() as fake:
        fake.script(status=529, message="Overloaded")
        ... point a ``type: anthropic`` backend at fake.base_url ...
        assert fake.last.headers["x-api-key"] == "upstream-key"
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from .common import (
    DEFAULT_TEXT,
    Behaviour,
    FakeUpstream,
    Received,
    RequestError,
    Tool,
    arguments_json,
    arguments_object,
    body_dict,
    estimate_tokens,
    plan,
    signature,
    split_arguments,
    split_text,
    sse,
    text_of,
)

__all__ = ["DEFAULT_TEXT", "FakeAnthropic"]

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}


class FakeAnthropic(FakeUpstream):
    default_models = ("claude-sonnet-4-5", "claude-haiku-4-5", "claude-opus-4-8")
    error_types = ERROR_TYPES
    malformed_body = b'{"id": "msg_broken", "type": "message", "content": [{"type": "te'

    def routes(self, app: web.Application) -> None:
        for prefix in ("/v1", "/anthropic/v1"):
            app.router.add_post(prefix + "/messages", self._messages)
            app.router.add_post(prefix + "/messages/count_tokens", self._count_tokens)
            app.router.add_get(prefix + "/models", self._models)

    @property
    def base_url(self) -> str:
        """What a ``type: anthropic`` backend's ``base_url`` should be (no ``/v1``)."""
        return self.url

    # -- handlers ----------------------------------------------------------------------------
    async def _models(self, request: web.Request) -> web.Response:
        data = [{"type": "model", "id": m, "display_name": m, "created_at": "2025-01-01T00:00:00Z"} for m in self.models]
        first, last = (self.models[0], self.models[-1]) if self.models else (None, None)
        return web.json_response({"data": data, "has_more": False, "first_id": first, "last_id": last})

    async def _count_tokens(self, request: web.Request) -> web.StreamResponse:
        async def answer(request: web.Request, received: Received) -> web.StreamResponse:
            body = body_dict(received)
            behaviour = self.behaviour_for(body.get("model"))
            fault = await self.faults(received, behaviour, False)
            if fault is not None:
                return fault
            if self.strict:
                self._validate_headers(received)
                for name in ("model", "messages"):
                    if name not in body:
                        raise RequestError(f"{name}: Field required")
                self._validate_messages(received, body)
            return self.send_json(received, {"input_tokens": _input_tokens(body)})

        return await self.serve(request, answer)

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        return await self.serve(request, self._answer)

    async def _answer(self, request: web.Request, received: Received) -> web.StreamResponse:
        body = body_dict(received)
        behaviour = self.behaviour_for(body.get("model"))
        stream = body.get("stream") is True
        fault = await self.faults(received, behaviour, stream)
        if fault is not None:
            return fault
        if self.strict:
            self._validate(received, body)
        message = self._message(body, behaviour)
        if not stream:
            return self.send_json(received, message)
        return await self.send_stream(request, received, behaviour, list(self._events(message, behaviour)))

    def error_body(self, status: int, message: str, error_type: str | None, code: str | None, retry_after: str | None) -> Any:
        kind = error_type or ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
        return {"type": "error", "error": {"type": kind, "message": message}, "request_id": f"req_fake{self.next_id():06d}"}

    def stream_error_frame(self, behaviour: Behaviour, sequence: int) -> bytes:
        kind = behaviour.error_type or "overloaded_error"
        return sse({"type": "error", "error": {"type": kind, "message": behaviour.message}, "request_id": "req_fake_stream"}, "error")

    def malformed_frame(self) -> bytes:
        return b'event: content_block_delta\ndata: {"type": "content_block_delta", "index": 0, "del\n\n'

    # -- validation (what the real API refuses) ----------------------------------------------
    def _validate_headers(self, received: Received) -> None:
        if "anthropic-version" not in received.headers:
            raise RequestError("anthropic-version: header is required")

    def _validate(self, received: Received, body: dict[str, Any]) -> None:
        self._validate_headers(received)
        for name in ("model", "max_tokens", "messages"):
            if name not in body:
                raise RequestError(f"{name}: Field required")
        if not isinstance(body["max_tokens"], int) or body["max_tokens"] < 1:
            raise RequestError("max_tokens: Input should be a valid integer greater than or equal to 1")
        thinking = body.get("thinking")
        if isinstance(thinking, dict) and thinking.get("type") == "enabled":
            budget = thinking.get("budget_tokens")
            if not isinstance(budget, int) or budget < 1024:
                raise RequestError("thinking.enabled.budget_tokens: Input should be greater than or equal to 1024")
            if budget >= body["max_tokens"]:
                raise RequestError("`max_tokens` must be greater than `thinking.budget_tokens`.")
        if isinstance(thinking, dict) and thinking.get("type") in ("enabled", "adaptive"):
            if isinstance(body.get("tool_choice"), dict) and body["tool_choice"].get("type") in ("any", "tool"):
                raise RequestError("Thinking may not be enabled when tool_choice forces tool use.")
        for i, tool in enumerate(body.get("tools") or ()):
            if isinstance(tool, dict) and tool.get("type") in (None, "custom"):
                schema = tool.get("input_schema")
                if not isinstance(schema, dict) or schema.get("type") != "object":
                    raise RequestError(f"tools.{i}.custom.input_schema.type: Input should be 'object'")
        self._validate_messages(received, body)

    def _validate_messages(self, received: Received, body: dict[str, Any]) -> None:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError("messages: at least one message is required")
        betas = received.headers.get("anthropic-beta", "")
        previous_tool_uses: set[str] = set()
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise RequestError(f"messages.{i}: Input should be a valid dictionary")
            role = message.get("role")
            if role == "system" and "mid-conversation-system" not in betas:
                raise RequestError(f"messages.{i}.role: Input should be 'user' or 'assistant'")
            if role not in ("user", "assistant", "system"):
                raise RequestError(f"messages.{i}.role: Input should be 'user' or 'assistant'")
            content = message.get("content")
            blocks = content if isinstance(content, list) else []
            if not isinstance(content, (str, list)):
                raise RequestError(f"messages.{i}.content: Field required")
            tool_uses: set[str] = set()
            for j, block in enumerate(blocks):
                kind = block.get("type") if isinstance(block, dict) else None
                if kind == "thinking" and not block.get("signature"):
                    raise RequestError(f"messages.{i}.content.{j}.thinking.signature: Field required")
                if kind == "tool_use":
                    tool_uses.add(str(block.get("id")))
                if kind == "tool_result" and block.get("tool_use_id") not in previous_tool_uses:
                    raise RequestError(
                        f"messages.{i}.content.{j}: unexpected `tool_use_id` found in `tool_result` blocks: "
                        f"{block.get('tool_use_id')}. Each `tool_result` block must have a corresponding `tool_use` block in the previous message."
                    )
            if role == "assistant":
                previous_tool_uses = tool_uses
            elif role == "user":
                previous_tool_uses = set()
        thinking = body.get("thinking")
        if isinstance(thinking, dict) and thinking.get("type") == "enabled":
            # Mid tool loop, the last assistant turn must begin with its (signed) thinking.
            last = next((i for i in range(len(messages) - 1, -1, -1) if isinstance(messages[i], dict) and messages[i].get("role") == "assistant"), None)
            blocks = messages[last].get("content") if last is not None else None
            if isinstance(blocks, list) and blocks and any(isinstance(b, dict) and b.get("type") == "tool_use" for b in blocks):
                first = blocks[0].get("type") if isinstance(blocks[0], dict) else None
                if first not in ("thinking", "redacted_thinking"):
                    raise RequestError(
                        f"messages.{last}.content.0.type: Expected `thinking` or `redacted_thinking`, but found `{first}`. When `thinking` is enabled, "
                        "a final `assistant` message must start with a thinking block (preceeding the lastmost set of `tool_use` and `tool_result` "
                        "blocks). We recommend you include thinking blocks from previous turns. To avoid this requirement, disable `thinking`."
                    )

    # -- what to answer ----------------------------------------------------------------------
    def _message(self, body: dict[str, Any], behaviour: Behaviour) -> dict[str, Any]:
        seq = self.next_id()
        tools = [Tool(t.get("name", ""), t.get("input_schema")) for t in body.get("tools") or () if isinstance(t, dict) and "name" in t]
        results = []
        for message in body.get("messages") or ():
            for block in message.get("content") if isinstance(message, dict) and isinstance(message.get("content"), list) else ():
                if isinstance(block, dict) and block.get("type") == "tool_result":
                    results.append(text_of(block.get("content", "")))
        choice: Any = "auto"
        parallel = True
        tool_choice = body.get("tool_choice")
        if isinstance(tool_choice, dict):
            parallel = not tool_choice.get("disable_parallel_tool_use", False)
            kind = tool_choice.get("type")
            choice = tool_choice.get("name") if kind == "tool" else kind
        fmt = (body.get("output_config") or {}).get("format") if isinstance(body.get("output_config"), dict) else None
        schema = (fmt.get("schema") or {"type": "object"}) if isinstance(fmt, dict) and fmt.get("type") == "json_schema" else None
        decided = plan(behaviour, tools, results, choice, parallel, schema)

        content: list[dict[str, Any]] = []
        thinking = body.get("thinking")
        if isinstance(thinking, dict) and thinking.get("type") in ("enabled", "adaptive") and behaviour.thinking:
            if behaviour.redacted_thinking:
                content.append({"type": "redacted_thinking", "data": "EmwKAhgBEgy" + signature("redacted", seq)})
            else:
                content.append({"type": "thinking", "thinking": behaviour.thinking, "signature": "EqQB" + signature("thinking", seq, behaviour.thinking)})
        for i, (name, arguments, _) in enumerate(decided.calls):
            content.append({"type": "tool_use", "id": f"toolu_fake{seq:04d}x{i}", "name": name, "input": arguments})
            if behaviour.tool_arguments is not None and not body.get("stream"):
                content[-1]["input"] = arguments_object(behaviour, arguments)
        if not decided.calls:
            content.append({"type": "text", "text": decided.text or ""})
        stop = "tool_use" if decided.calls else "max_tokens" if behaviour.truncated else "stop_sequence" if behaviour.stop_sequence else "end_turn"
        output = sum(_block_tokens(b) for b in content)
        usage = {
            "input_tokens": _input_tokens(body),
            "cache_creation_input_tokens": behaviour.cache_write_tokens,
            "cache_read_input_tokens": behaviour.cached_tokens,
            "cache_creation": {"ephemeral_5m_input_tokens": behaviour.cache_write_tokens, "ephemeral_1h_input_tokens": 0},
            "output_tokens": output,
            "service_tier": "standard",
        }
        return {
            "id": f"msg_fake{seq:06d}",
            "type": "message",
            "role": "assistant",
            "model": body.get("model"),
            "content": content,
            "stop_reason": stop,
            "stop_sequence": behaviour.stop_sequence if stop == "stop_sequence" else None,
            "usage": usage,
        }

    def _events(self, message: dict[str, Any], behaviour: Behaviour | None = None) -> Any:
        usage = message["usage"]
        start_usage = {**usage, "output_tokens": 1}
        start_message = {**message, "content": [], "stop_reason": None, "stop_sequence": None, "usage": start_usage}
        yield sse({"type": "message_start", "message": start_message}, "message_start")
        for index, block in enumerate(message["content"]):
            kind = block["type"]
            if kind == "text":
                start: dict[str, Any] = {"type": "text", "text": ""}
                deltas = [{"type": "text_delta", "text": piece} for piece in split_text(block["text"])]
            elif kind == "thinking":
                start = {"type": "thinking", "thinking": "", "signature": ""}
                deltas = [{"type": "thinking_delta", "thinking": piece} for piece in split_text(block["thinking"])]
                deltas.append({"type": "signature_delta", "signature": block["signature"]})
            elif kind == "tool_use":
                start = {"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}
                pieces = [""] + split_arguments(arguments_json(behaviour or Behaviour(), block["input"]))
                deltas = [{"type": "input_json_delta", "partial_json": piece} for piece in pieces]
            else:  # redacted_thinking arrives whole
                start, deltas = block, []
            yield sse({"type": "content_block_start", "index": index, "content_block": start}, "content_block_start")
            if index == 0:
                yield sse({"type": "ping"}, "ping")
            for delta in deltas:
                yield sse({"type": "content_block_delta", "index": index, "delta": delta}, "content_block_delta")
            yield sse({"type": "content_block_stop", "index": index}, "content_block_stop")
        final_usage = {k: usage[k] for k in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens", "output_tokens")}
        yield sse(
            {"type": "message_delta", "delta": {"stop_reason": message["stop_reason"], "stop_sequence": message["stop_sequence"]}, "usage": final_usage},
            "message_delta",
        )
        yield sse({"type": "message_stop"}, "message_stop")


def _input_tokens(body: dict[str, Any]) -> int:
    return estimate_tokens(body.get("system"), body.get("messages"), body.get("tools"))


def _block_tokens(block: dict[str, Any]) -> int:
    if block["type"] == "text":
        return len(split_text(block["text"]))
    if block["type"] == "thinking":
        return len(split_text(block["thinking"]))
    if block["type"] == "tool_use":
        return len(split_arguments(json.dumps(block["input"]))) + 1
    return 1
