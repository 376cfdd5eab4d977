"""A fake OpenAI Responses upstream: a real aiohttp server on 127.0.0.1 speaking ``/v1/responses``.

It answers the way api.openai.com does, so tests exercise llmproxy over real sockets:

- ``POST /v1/responses`` non-streamed: the full ``response`` object (``output`` items and
  ``usage``); streamed (``stream: true``): every event with its ``event:`` line and a
  ``sequence_number`` counting from 0 — ``response.created``, ``response.in_progress``, then
  per output item ``response.output_item.added`` …  ``response.output_item.done``, and
  ``response.completed`` (``response.incomplete`` when ``truncated``) with ``usage``:

  - a message: ``content_part.added``, ``output_text.delta`` × n, ``output_text.done``,
    ``content_part.done``;
  - a function call: ``function_call_arguments.delta`` × 2, ``function_call_arguments.done``;
  - a reasoning item first, when the request has ``reasoning`` or ``include`` asks for
    ``reasoning.encrypted_content``: ``reasoning_summary_part.added``,
    ``reasoning_summary_text.delta`` × n, ``reasoning_summary_text.done``,
    ``reasoning_summary_part.done`` when ``reasoning.summary`` is set, and the item carries
    ``encrypted_content`` when ``include`` asks for it;
  - a ``local_shell_call`` item (no deltas) when the built-in ``local_shell`` tool is offered
    in the tool scenario;
- input: a string or items (messages of any role incl. ``developer``, ``function_call``,
  ``function_call_output``, ``reasoning``, ``local_shell_call_output`` …); function tools are
  read at the top level and inside ``namespace`` tools; ``tool_choice`` and
  ``parallel_tool_calls`` are honoured (see :func:`fakes.common.plan`);
- ``text.format`` ``json_schema`` gets JSON shaped by the schema, ``json_object`` gets
  ``{"answer": <text>}``;
- errors: ``{"error": {"message", "type", "param", "code"}}`` with the status; a scripted
  in-stream failure is a ``response.failed`` event;
- ``GET /v1/responses`` (Codex's WebSocket attempt) answers 426, ``GET /v1/models`` lists
  ``models``.

It is strict where the API is (``fake.strict = False`` turns that off): ``model`` required,
``previous_response_id`` is unknown (nothing is stored), and a ``function_call_output`` must
answer a ``function_call`` in the same input ("No tool call found …").
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
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
    body_dict,
    estimate_tokens,
    local_shell_command,
    plan,
    signature,
    split_arguments,
    split_text,
    sse,
    text_of,
)

__all__ = ["DEFAULT_TEXT", "FakeResponses"]

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    429: "rate_limit_exceeded",
    500: "server_error",
    503: "server_error",
}

_RESULT_TYPES = ("function_call_output", "local_shell_call_output", "custom_tool_call_output", "shell_call_output")
_CALL_TYPES = ("function_call", "local_shell_call", "custom_tool_call", "shell_call")


class FakeResponses(FakeUpstream):
    default_models = ("gpt-5", "gpt-5.1-codex", "gpt-4o-mini")
    error_types = ERROR_TYPES
    malformed_body = b'{"id": "resp_broken", "object": "response", "output": [{"type": "mess'

    def routes(self, app: web.Application) -> None:
        for prefix in ("/v1", ""):
            app.router.add_post(prefix + "/responses", self._responses)
            app.router.add_get(prefix + "/responses", self._websocket)
            app.router.add_get(prefix + "/models", self._models)

    @property
    def base_url(self) -> str:
        """What a ``type: openai-responses`` backend's ``base_url`` should be."""
        return self.url + "/v1"

    # -- handlers ----------------------------------------------------------------------------
    async def _models(self, request: web.Request) -> web.Response:
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "fake"} for m in self.models]
        return web.json_response({"object": "list", "data": data})

    async def _websocket(self, request: web.Request) -> web.Response:
        error = {"message": "WebSocket is not supported here", "type": "invalid_request_error", "param": None, "code": None}
        return web.json_response({"error": error}, status=426)

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        return await self.serve(request, self._answer)

    async def _answer(self, request: web.Request, received: Received) -> web.StreamResponse:
        body = body_dict(received)
        behaviour = self.behaviour_for(body.get("model"))
        stream = body.get("stream") is True
        fault = await self.faults(received, behaviour, stream)
        if fault is not None:
            return fault
        if self.strict:
            self._validate(body)
        response = self._response(body, behaviour)
        if not stream:
            return self.send_json(received, response)
        # A failure mid-stream belongs to the same response (clients check the id).
        echoing = replace(behaviour, message=behaviour.message.replace("{key}", received.key or ""))  # as the other fakes do
        failed = self.stream_error_frame(echoing, behaviour.error_after or 0, response) if behaviour.error_after is not None else None
        return await self.send_stream(request, received, behaviour, list(self._events(response)), error_frame=failed)

    def error_body(self, status: int, message: str, error_type: str | None, code: str | None, retry_after: str | None) -> Any:
        return {"error": {"message": message, "type": error_type or ERROR_TYPES.get(status, "server_error"), "param": None, "code": code}}

    def stream_error_frame(self, behaviour: Behaviour, sequence: int, response: dict[str, Any] | None = None) -> bytes:
        failed = {
            "id": response["id"] if response else "resp_failed",
            "object": "response",
            "created_at": response["created_at"] if response else int(time.time()),
            "status": "failed",
            "error": {"code": behaviour.error_code or "server_error", "message": behaviour.message},
            "incomplete_details": None,
            "model": response["model"] if response else "unknown",
            "output": [],
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "usage": None,
        }
        return sse({"type": "response.failed", "sequence_number": sequence, "response": failed}, "response.failed")

    def malformed_frame(self) -> bytes:
        return b'event: response.output_text.delta\ndata: {"type": "response.output_text.delta", "del\n\n'

    # -- validation --------------------------------------------------------------------------
    def _validate(self, body: dict[str, Any]) -> None:
        if not isinstance(body.get("model"), str):
            raise RequestError("Missing required parameter: 'model'.")
        if body.get("previous_response_id"):
            raise RequestError(f"Previous response with id '{body['previous_response_id']}' not found.", 400)
        items = body.get("input")
        if not isinstance(items, list):
            return
        calls = {item.get("call_id") for item in items if isinstance(item, dict) and item.get("type") in _CALL_TYPES}
        for item in items:
            if isinstance(item, dict) and item.get("type") in _RESULT_TYPES and item.get("call_id") not in calls:
                raise RequestError(f"No tool call found for function call output with call_id {item.get('call_id')}.")

    # -- what to answer ----------------------------------------------------------------------
    def _response(self, body: dict[str, Any], behaviour: Behaviour) -> dict[str, Any]:
        seq = self.next_id()
        tools: list[Tool] = []
        for tool in body.get("tools") or ():
            if not isinstance(tool, dict):
                continue
            if tool.get("type") == "function":
                tools.append(Tool(tool.get("name", ""), tool.get("parameters")))
            elif tool.get("type") == "local_shell":
                tools.append(Tool("local_shell", None, kind="local_shell"))
            elif tool.get("type") == "namespace":
                tools += [Tool(t.get("name", ""), t.get("parameters")) for t in tool.get("tools") or () if isinstance(t, dict) and t.get("type") == "function"]
        items = body.get("input") if isinstance(body.get("input"), list) else []
        results = [text_of(item.get("output")) for item in items if isinstance(item, dict) and item.get("type") in _RESULT_TYPES]
        choice = body.get("tool_choice", "auto")
        if isinstance(choice, dict):
            choice = choice.get("mode", "auto") if choice.get("type") == "allowed_tools" else choice.get("name") or choice.get("type")
        text_config = body.get("text") if isinstance(body.get("text"), dict) else {}
        fmt = text_config.get("format") if isinstance(text_config.get("format"), dict) else {}
        schema = (fmt.get("schema") or {"type": "object"}) if fmt.get("type") == "json_schema" else None
        decided = plan(behaviour, tools, results, choice, body.get("parallel_tool_calls") is not False, schema)

        output: list[dict[str, Any]] = []
        reasoning = body.get("reasoning") if isinstance(body.get("reasoning"), dict) else None
        include = body.get("include") or []
        reasoning_tokens = 0
        if (reasoning is not None or "reasoning.encrypted_content" in include) and behaviour.thinking:
            item: dict[str, Any] = {"id": f"rs_fake{seq:06d}", "type": "reasoning", "summary": []}
            if reasoning and reasoning.get("summary"):
                item["summary"] = [{"type": "summary_text", "text": behaviour.thinking}]
            if "reasoning.encrypted_content" in include:
                item["encrypted_content"] = "gAAAAB" + signature("reasoning", seq, behaviour.thinking)
            output.append(item)
            reasoning_tokens = len(split_text(behaviour.thinking))
        for i, (name, arguments, tool) in enumerate(decided.calls):
            if tool.kind == "local_shell":
                action = {"type": "exec", "command": local_shell_command(behaviour), "env": {}, "timeout_ms": None, "user": None, "working_directory": None}
                call = {"id": f"lsh_fake{seq:04d}x{i}", "type": "local_shell_call", "call_id": f"call_fake{seq:04d}x{i}", "action": action}
                output.append({**call, "status": "completed"})
            else:
                output.append(
                    {
                        "id": f"fc_fake{seq:04d}x{i}",
                        "type": "function_call",
                        "status": "completed",
                        "arguments": arguments_json(behaviour, arguments),
                        "call_id": f"call_fake{seq:04d}x{i}",
                        "name": name,
                    }
                )
        if not decided.calls:
            text = decided.text or ""
            if fmt.get("type") == "json_object" and not behaviour.raw_text:
                text = json.dumps({"answer": text})
            part = {"type": "output_text", "annotations": [], "logprobs": [], "text": text}
            output.append({"id": f"msg_fake{seq:06d}", "type": "message", "status": "completed", "content": [part], "role": "assistant"})

        input_tokens = estimate_tokens(body.get("instructions"), body.get("input"), body.get("tools"))
        output_tokens = reasoning_tokens + sum(_item_tokens(item) for item in output if item["type"] != "reasoning")
        truncated = behaviour.truncated and not decided.calls
        now = int(time.time())
        return {
            "id": f"resp_fake{seq:06d}",
            "object": "response",
            "created_at": now,
            "status": "incomplete" if truncated else "completed",
            "background": False,
            "completed_at": now,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if truncated else None,
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "max_tool_calls": None,
            "model": body.get("model"),
            "output": output,
            "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "previous_response_id": None,
            "prompt_cache_key": body.get("prompt_cache_key"),
            "reasoning": {"effort": (reasoning or {}).get("effort"), "summary": (reasoning or {}).get("summary")},
            "safety_identifier": None,
            "service_tier": "default",
            "store": body.get("store", True),
            "temperature": body.get("temperature", 1.0),
            "text": {"format": fmt or {"type": "text"}, "verbosity": text_config.get("verbosity", "medium")},
            "tool_choice": body.get("tool_choice", "auto"),
            "tools": body.get("tools") or [],
            "top_logprobs": 0,
            "top_p": body.get("top_p", 1.0),
            "truncation": "disabled",
            "usage": {
                "input_tokens": input_tokens,
                "input_tokens_details": {"cached_tokens": behaviour.cached_tokens, "cache_write_tokens": behaviour.cache_write_tokens},
                "output_tokens": output_tokens,
                "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
                "total_tokens": input_tokens + output_tokens,
            },
            "user": None,
            "metadata": body.get("metadata") or {},
        }

    def _events(self, response: dict[str, Any]) -> Any:
        counter = iter(range(1 << 30))

        def event(kind: str, **fields: Any) -> bytes:
            return sse({"type": kind, "sequence_number": next(counter), **fields}, kind)

        pending = {**response, "status": "in_progress", "output": [], "usage": None, "completed_at": None, "incomplete_details": None}
        yield event("response.created", response=pending)
        yield event("response.in_progress", response=pending)
        for index, item in enumerate(response["output"]):
            item_id = item["id"]
            kind = item["type"]
            if kind == "message":
                yield event("response.output_item.added", output_index=index, item={**item, "status": "in_progress", "content": []})
                for c, part in enumerate(item["content"]):
                    yield event("response.content_part.added", item_id=item_id, output_index=index, content_index=c, part={**part, "text": ""})
                    for piece in split_text(part["text"]):
                        yield event("response.output_text.delta", item_id=item_id, output_index=index, content_index=c, delta=piece, logprobs=[])
                    yield event("response.output_text.done", item_id=item_id, output_index=index, content_index=c, text=part["text"], logprobs=[])
                    yield event("response.content_part.done", item_id=item_id, output_index=index, content_index=c, part=part)
            elif kind == "function_call":
                yield event("response.output_item.added", output_index=index, item={**item, "status": "in_progress", "arguments": ""})
                for piece in split_arguments(item["arguments"], 2):
                    yield event("response.function_call_arguments.delta", item_id=item_id, output_index=index, delta=piece)
                yield event("response.function_call_arguments.done", item_id=item_id, output_index=index, arguments=item["arguments"])
            elif kind == "reasoning":
                added = {k: v for k, v in item.items() if k != "encrypted_content"}
                yield event("response.output_item.added", output_index=index, item={**added, "summary": []})
                for s, summary in enumerate(item["summary"]):
                    yield event("response.reasoning_summary_part.added", item_id=item_id, output_index=index, summary_index=s, part={**summary, "text": ""})
                    for piece in split_text(summary["text"]):
                        yield event("response.reasoning_summary_text.delta", item_id=item_id, output_index=index, summary_index=s, delta=piece)
                    yield event("response.reasoning_summary_text.done", item_id=item_id, output_index=index, summary_index=s, text=summary["text"])
                    yield event("response.reasoning_summary_part.done", item_id=item_id, output_index=index, summary_index=s, part=summary)
            else:
                yield event("response.output_item.added", output_index=index, item={**item, "status": "in_progress"})
            yield event("response.output_item.done", output_index=index, item=item)
        final = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
        yield event(final, response=response)


def _item_tokens(item: dict[str, Any]) -> int:
    if item["type"] == "message":
        return sum(len(split_text(p["text"])) for p in item["content"])
    if item["type"] == "function_call":
        return len(split_arguments(item["arguments"], 2)) + 1
    return 1
