"""A fake OpenAI-compatible upstream: a real aiohttp server on 127.0.0.1 speaking Chat Completions.

It answers ``POST /v1/chat/completions`` (and ``/chat/completions``) the way api.openai.com
does, so tests exercise llmproxy over real sockets with real wire bytes:

- non-streamed: one ``chat.completion`` JSON object with ``usage``;
- streamed (``stream: true``): ``chat.completion.chunk`` SSE frames — the role chunk, one
  chunk per content piece, tool calls as ``tool_calls`` deltas (index, id, type and name
  first, then the arguments in pieces), a chunk carrying ``finish_reason``, a usage chunk
  (``choices: []``) when ``stream_options.include_usage``, then ``data: [DONE]``;
- tools: when the request offers function tools, has no tool result yet and
  ``tool_choice`` is not ``"none"``, it calls a tool instead of answering text — the tool
  ``tool_choice`` names, else every offered tool at once (parallel tool calls) unless
  ``parallel_tool_calls`` is false, then only the first. Arguments are built from each
  tool's JSON schema (see :func:`example_value`);
- ``response_format``: ``json_schema`` gets JSON shaped by the schema, ``json_object``
  gets ``{"answer": <text>}``;
- ``logprobs`` (with ``top_logprobs``) adds log probabilities to the text, per chunk when
  streamed;
- ``GET /v1/models`` lists ``models``;
- the shell-tool scenario (``script(tool_scenario=True)``, see :func:`fakes.common.plan`):
  one call running ``echo hi`` to the shell-like tool, then text quoting the tool result.

Each test scripts it with :meth:`FakeOpenAI.script` (for every request, or for one model):
an HTTP error status with an OpenAI error body (and ``Retry-After``), a body that is not
JSON, a stream whose connection drops after N events, a stream (or answer) that hangs, a
delay before each event, an error frame mid-stream (``error_after``), a ``length`` stop
(``truncated``), cached prompt tokens (``cached_tokens``); the fields are shared by all the
fakes (:class:`fakes.common.Behaviour`). Every request is recorded as a :class:`Received` — path, headers,
JSON body, the bytes sent back, and whether the peer closed the connection before the
answer was complete (``disconnected``, an :class:`asyncio.Event` to wait on)::

    async with FakeOpenAI() as fake:
        fake.script(status=429, message="slow down", retry_after="7")
        fake.script(model="gpt-good")          # this model answers normally
        ... point a backend at fake.base_url ...
        assert fake.requests[-1].headers["Authorization"] == "Bearer upstream-key"
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from .common import (
    DEFAULT_TEXT,
    Behaviour,
    FakeUpstream,
    Received,
    Tool,
    arguments_json,
    example_value,
    plan,
    split_arguments,
    split_text,
    sse,
)
from .common import forever as _forever

__all__ = ["DEFAULT_TEXT", "Behaviour", "FakeOpenAI", "Received", "example_value", "split_arguments", "split_text", "_forever"]

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    429: "rate_limit_exceeded",
    500: "server_error",
    503: "server_error",
}


class FakeOpenAI(FakeUpstream):
    """The server. ``await start()`` (or ``async with``), then point a backend at
    :attr:`base_url`; :meth:`close` stops it."""

    default_models = ("gpt-4o-mini", "gpt-5")
    error_types = _ERROR_TYPES
    malformed_body = b'{"id": "chatcmpl-broken", "object": "chat.completion", "choices": [{"index": 0, "mess'

    def routes(self, app: web.Application) -> None:
        for prefix in ("/v1", ""):
            app.router.add_post(prefix + "/chat/completions", self._chat)
            app.router.add_get(prefix + "/models", self._models)
            app.router.add_post(prefix + "/embeddings", self._embeddings)
            app.router.add_post(prefix + "/completions", self._legacy_completions)
            app.router.add_post(prefix + "/images/generations", self._images)

    # -- the endpoints beside chat (answered simply, recorded like chat) -------------------------
    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        async def answer(request: web.Request, received: Received) -> web.StreamResponse:
            fault = await self.faults(received, self.behaviour_for(received.model), False)
            if fault is not None:
                return fault
            inputs = received.json.get("input")
            texts = [inputs] if isinstance(inputs, str) else list(inputs or [])
            data = [{"object": "embedding", "index": i, "embedding": [float(len(t)), 0.5, -0.5]} for i, t in enumerate(texts)]
            return self.send_json(received, {"object": "list", "data": data, "model": received.model,
                                             "usage": {"prompt_tokens": len(texts), "total_tokens": len(texts)}})

        return await self.serve(request, answer)

    async def _legacy_completions(self, request: web.Request) -> web.StreamResponse:
        async def answer(request: web.Request, received: Received) -> web.StreamResponse:
            fault = await self.faults(received, self.behaviour_for(received.model), received.json.get("stream") is True)
            if fault is not None:
                return fault
            base = {"id": "cmpl-fake", "object": "text_completion", "created": 0, "model": received.model}
            if received.json.get("stream") is True:
                response = web.StreamResponse(headers=self.sse_headers)
                await response.prepare(request)
                for word in ("completed", " text"):
                    await response.write(b"data: " + json.dumps({**base, "choices": [{"index": 0, "text": word, "finish_reason": None}]}).encode() + b"\n\n")
                await response.write(b"data: " + json.dumps({**base, "choices": [{"index": 0, "text": "", "finish_reason": "stop"}]}).encode() + b"\n\n")
                await response.write(b"data: [DONE]\n\n")
                await response.write_eof()
                return response
            return self.send_json(received, {**base, "choices": [{"index": 0, "text": "completed text", "finish_reason": "stop"}],
                                             "usage": {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}})

        return await self.serve(request, answer)

    async def _images(self, request: web.Request) -> web.StreamResponse:
        async def answer(request: web.Request, received: Received) -> web.StreamResponse:
            return self.send_json(received, {"created": 0, "data": [{"b64_json": "aGVsbG8="}]})

        return await self.serve(request, answer)

    @property
    def base_url(self) -> str:
        """What a ``type: openai`` backend's ``base_url`` should be."""
        return self.url + "/v1"

    # -- handlers ----------------------------------------------------------------------------
    async def _models(self, request: web.Request) -> web.Response:
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "fake"} for m in self.models]
        return web.json_response({"object": "list", "data": data})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self.serve(request, self._answer)

    async def _answer(self, request: web.Request, received: Received) -> web.StreamResponse:
        body = received.json
        if not isinstance(body, dict):
            return self.error(received, 400, "We could not parse the JSON body of your request.", "invalid_request_error")
        behaviour = self.behaviour_for(body.get("model"))
        stream = body.get("stream") is True
        fault = await self.faults(received, behaviour, stream)
        if fault is not None:
            return fault
        answer = self._plan(body, behaviour)
        if stream:
            return await self._stream(request, received, body, behaviour, answer)
        return self.send_json(received, self._completion(body, answer))

    def error_body(self, status: int, message: str, error_type: str | None, code: str | None, retry_after: str | None) -> Any:
        return {"error": {"message": message, "type": error_type or _ERROR_TYPES.get(status, "server_error"), "param": None, "code": code}}

    def stream_error_frame(self, behaviour: Behaviour, sequence: int) -> bytes:
        # What api.openai.com sends when a stream fails part-way: a data frame holding an error.
        return sse({"error": {"message": behaviour.message, "type": behaviour.error_type or "server_error", "param": None, "code": behaviour.error_code}})

    def malformed_frame(self) -> bytes:
        return b"data: {\"id\": \"chatcmpl-broken\", \"choices\": [{\"delta\n\n"

    # -- what to answer ----------------------------------------------------------------------
    def _plan(self, body: dict[str, Any], behaviour: Behaviour) -> "_Answer":
        seq = self.next_id()
        answer = _Answer(id=f"chatcmpl-fake{seq:06d}", model=str(body.get("model")))
        messages = body.get("messages") or []
        answer.prompt_tokens = max(1, len(json.dumps(messages)) // 4)
        answer.cached_tokens = behaviour.cached_tokens
        answer.truncated = behaviour.truncated
        tools = [
            Tool(t["function"].get("name", ""), t["function"].get("parameters"))
            for t in body.get("tools") or ()
            if isinstance(t, dict) and isinstance(t.get("function"), dict)
        ]
        results = [_text(m.get("content")) for m in messages if isinstance(m, dict) and m.get("role") == "tool"]
        choice = body.get("tool_choice", "auto")
        if isinstance(choice, dict):
            choice = (choice.get("function") or {}).get("name") or ""
        fmt = body.get("response_format")
        schema = None
        if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
            schema = (fmt.get("json_schema") or {}).get("schema") or {"type": "object"}
        decided = plan(behaviour, tools, results, choice, body.get("parallel_tool_calls") is not False, schema)
        for i, (name, arguments, _) in enumerate(decided.calls):
            answer.tool_calls.append((f"call_fake{seq:04d}x{i}", name, arguments_json(behaviour, arguments)))
        if decided.calls:
            return answer
        answer.text = decided.text
        if isinstance(fmt, dict) and fmt.get("type") == "json_object" and not behaviour.raw_text:
            answer.text = json.dumps({"answer": decided.text})
        if body.get("logprobs"):
            answer.top_logprobs = int(body.get("top_logprobs") or 0)
            answer.logprobs = True
        return answer

    def _completion(self, body: dict[str, Any], answer: "_Answer") -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": answer.text, "refusal": None, "annotations": []}
        if answer.tool_calls:
            message["tool_calls"] = [
                {"id": cid, "type": "function", "function": {"name": name, "arguments": args}} for cid, name, args in answer.tool_calls
            ]
        logprobs = None
        if answer.logprobs:
            logprobs = {"content": [answer.token_logprob(p, i) for i, p in enumerate(split_text(answer.text or ""))], "refusal": None}
        return {
            "id": answer.id,
            "object": "chat.completion",
            "created": answer.created,
            "model": answer.model,
            "choices": [{"index": 0, "message": message, "logprobs": logprobs, "finish_reason": answer.finish_reason}],
            "usage": answer.usage(),
            "service_tier": "default",
            "system_fingerprint": "fp_fake",
        }

    async def _stream(
        self, request: web.Request, received: Received, body: dict[str, Any], behaviour: Behaviour, answer: "_Answer"
    ) -> web.StreamResponse:
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return await self.send_stream(request, received, behaviour, list(self._chunks(answer, include_usage)))

    def _chunks(self, answer: "_Answer", include_usage: bool) -> Any:
        head: dict[str, Any] = {
            "id": answer.id,
            "object": "chat.completion.chunk",
            "created": answer.created,
            "model": answer.model,
            "service_tier": "default",
            "system_fingerprint": "fp_fake",
        }

        def frame(delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> bytes:
            chunk = {**head, "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}
            if include_usage:
                chunk["usage"] = None
            return b"data: " + json.dumps(chunk).encode() + b"\n\n"

        if answer.tool_calls:
            for i, (cid, name, arguments) in enumerate(answer.tool_calls):
                start = {"index": i, "id": cid, "type": "function", "function": {"name": name, "arguments": ""}}
                delta: dict[str, Any] = {"tool_calls": [start]}
                if i == 0:  # as OpenAI does: the role arrives with the first call
                    delta = {"role": "assistant", "content": None, **delta, "refusal": None}
                yield frame(delta)
                for piece in split_arguments(arguments):
                    yield frame({"tool_calls": [{"index": i, "function": {"arguments": piece}}]})
        else:
            yield frame({"role": "assistant", "content": "", "refusal": None})
            for i, piece in enumerate(split_text(answer.text or "")):
                logprobs = {"content": [answer.token_logprob(piece, i)], "refusal": None} if answer.logprobs else None
                yield frame({"content": piece}, logprobs=logprobs)
        yield frame({}, answer.finish_reason)
        if include_usage:
            yield b"data: " + json.dumps({**head, "choices": [], "usage": answer.usage()}).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"


@dataclass
class _Answer:
    id: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))
    text: str | None = None
    tool_calls: list[tuple[str, str, str]] = field(default_factory=list)
    prompt_tokens: int = 1
    logprobs: bool = False
    top_logprobs: int = 0
    cached_tokens: int = 0
    truncated: bool = False

    @property
    def finish_reason(self) -> str:
        return "tool_calls" if self.tool_calls else "length" if self.truncated else "stop"

    def usage(self) -> dict[str, Any]:
        if self.tool_calls:
            completion = sum(len(split_arguments(args)) + 1 for _, _, args in self.tool_calls)
        else:
            completion = len(split_text(self.text or ""))
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }

    def token_logprob(self, token: str, i: int) -> dict[str, Any]:
        logprob = round(-0.01 * (i + 1), 4)
        top = [{"token": token, "logprob": logprob, "bytes": list(token.encode())}]
        top += [{"token": f"alt{k}", "logprob": logprob - k, "bytes": list(f"alt{k}".encode())} for k in range(1, self.top_logprobs)]
        return {"token": token, "logprob": logprob, "bytes": list(token.encode()), "top_logprobs": top[: self.top_logprobs]}


def _text(content: Any) -> str:
    """A tool message's content as text (a string, or a list of text parts)."""
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else json.dumps(content)
