"""A fake Gemini upstream: a real aiohttp server on 127.0.0.1 speaking the Generative Language API.

It answers the way generativelanguage.googleapis.com does, under ``/v1beta`` and ``/v1``:

- ``POST /{v}/models/{model}:generateContent``: one ``GenerateContentResponse`` (candidates,
  ``finishReason``, ``usageMetadata``, ``modelVersion``, ``responseId``);
- ``:streamGenerateContent?alt=sse``: SSE ``data:`` chunks ending in ``\\r\\n\\r\\n`` (no
  ``event:`` lines, no ``[DONE]``); without ``alt=sse`` a streamed JSON array
  (``[{…}\\n,\\r\\n{…}]``, pretty-printed like Google's). Text comes one word per chunk, a
  function call whole in one chunk; the last chunk always has ``finishReason``; every chunk
  carries the cumulative ``usageMetadata``;
- ``:countTokens`` → ``{"totalTokens": n, "promptTokensDetails": […]}`` for ``{"contents"}``
  or ``{"generateContentRequest": {…}}`` (n equals ``promptTokenCount`` for the same request);
- ``:embedContent`` / ``:batchEmbedContents`` → stable 8-float vectors;
- ``GET /{v}/models`` (``{"models": [...]}``) and ``GET /{v}/models/{model}``;
- tools (``functionDeclarations`` with ``parameters`` — upper-case types — or
  ``parametersJsonSchema``), ``toolConfig.functionCallingConfig`` (``mode``,
  ``allowedFunctionNames``): ``functionCall`` parts with an ``id``; the first call part
  carries a ``thoughtSignature`` (as Gemini does for parallel calls); see
  :func:`fakes.common.plan`;
- ``generationConfig.responseMimeType: application/json`` with ``responseJsonSchema`` or
  ``responseSchema`` → schema-shaped JSON (numbers: the schema's ``minimum``, or 1);
- ``thinkingConfig.includeThoughts`` → a ``{"text", "thought": true}`` part first and
  ``thoughtsTokenCount``;
- errors: ``{"error": {"code", "message", "status"}}`` (429 with a ``RetryInfo`` detail when
  ``retry_after`` is scripted); a scripted in-stream failure is a chunk holding ``error``.
  The key is read from ``x-goog-api-key`` or ``?key=`` (``Received.key``).

It is strict where the API is (``fake.strict = False`` turns that off): unknown fields at the
top level or in ``generationConfig`` are refused ("Unknown name … Cannot find field"),
``contents`` must not be empty, roles are ``user``/``model``, parts must not be empty, a
function-response turn must answer every call of the call turn, ``thinkingBudget`` and
``thinkingLevel`` exclude each other, and for ``gemini-3*`` models a model turn's first
``functionCall`` part in the current turn needs a ``thoughtSignature``.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from aiohttp import web

from .common import (
    DEFAULT_TEXT,
    Behaviour,
    FakeUpstream,
    Received,
    RequestError,
    Tool,
    arguments_object,
    body_dict,
    estimate_tokens,
    plan,
    signature,
    split_text,
    text_of,
)

__all__ = ["DEFAULT_TEXT", "FakeGemini"]

STATUSES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ABORTED",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "UNIMPLEMENTED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}

_TOP_LEVEL = {"contents", "tools", "toolConfig", "safetySettings", "systemInstruction", "generationConfig", "cachedContent", "model", "labels"}
_GENERATION_CONFIG = {
    "stopSequences", "responseMimeType", "responseSchema", "responseJsonSchema", "responseModalities", "candidateCount",
    "maxOutputTokens", "temperature", "topP", "topK", "seed", "presencePenalty", "frequencyPenalty", "responseLogprobs",
    "logprobs", "enableEnhancedCivicAnswers", "speechConfig", "thinkingConfig", "imageConfig", "mediaResolution",
}  # fmt: skip
_COUNT_TOKENS = {"contents", "generateContentRequest", "model"}


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _get(obj: Any, camel: str, default: Any = None) -> Any:
    """A field by its camelCase or snake_case name (the API accepts both)."""
    if not isinstance(obj, dict):
        return default
    if camel in obj:
        return obj[camel]
    return obj.get(_snake(camel), default)


def _unknown(obj: dict[str, Any], known: set[str]) -> str | None:
    allowed = known | {_snake(k) for k in known}
    return next((k for k in obj if k not in allowed), None)


class FakeGemini(FakeUpstream):
    default_models = ("gemini-2.5-flash", "gemini-2.5-pro", "gemini-3-pro-preview")
    malformed_body = b'{"candidates": [{"content": {"parts": [{"te'

    def routes(self, app: web.Application) -> None:
        for version in ("v1beta", "v1", "v1alpha"):
            app.router.add_post(f"/{version}/models/{{target}}", self._post)
            app.router.add_get(f"/{version}/models", self._models)
            app.router.add_get(f"/{version}/models/{{model}}", self._model)

    @property
    def base_url(self) -> str:
        """What a ``type: gemini`` backend's ``base_url`` should be (with ``/v1beta``)."""
        return self.url + "/v1beta"

    # -- handlers ----------------------------------------------------------------------------
    def _model_info(self, model: str) -> dict[str, Any]:
        return {
            "name": f"models/{model}",
            "version": "001",
            "displayName": model,
            "description": "a fake Gemini model",
            "inputTokenLimit": 1048576,
            "outputTokenLimit": 65536,
            "supportedGenerationMethods": ["generateContent", "countTokens", "streamGenerateContent", "embedContent"],
            "thinking": True,
        }

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"models": [self._model_info(m) for m in self.models]})

    async def _model(self, request: web.Request) -> web.Response:
        model = request.match_info["model"]
        if model not in self.models:
            return web.json_response(self.error_body(404, f"models/{model} is not found for API version v1beta", None, None, None), status=404)
        return web.json_response(self._model_info(model))

    async def _post(self, request: web.Request) -> web.StreamResponse:
        model, _, method = request.match_info["target"].partition(":")
        handlers = {
            "generateContent": self._generate,
            "streamGenerateContent": self._generate,
            "countTokens": self._count_tokens,
            "embedContent": self._embed,
            "batchEmbedContents": self._embed,
        }

        async def answer(request: web.Request, received: Received) -> web.StreamResponse:
            handler = handlers.get(method)
            if handler is None:
                return self.error(received, 404, f"Method {method!r} not found.")
            return await handler(request, received, method)

        return await self.serve(request, answer, model=model)

    def error_body(self, status: int, message: str, error_type: str | None, code: str | None, retry_after: str | None) -> Any:
        error: dict[str, Any] = {"code": status, "message": message, "status": error_type or STATUSES.get(status, "UNKNOWN")}
        if status == 429 and retry_after is not None:
            error["details"] = [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{retry_after}s"}]
        return {"error": error}

    def stream_error_frame(self, behaviour: Behaviour, sequence: int) -> bytes:
        return b"data: " + json.dumps(self.error_body(500, behaviour.message, behaviour.error_type, None, None)).encode() + b"\r\n\r\n"

    def malformed_frame(self) -> bytes:
        return b'data: {"candidates": [{"content": {"par\r\n\r\n'

    async def _count_tokens(self, request: web.Request, received: Received, method: str) -> web.StreamResponse:
        body = body_dict(received)
        fault = await self.faults(received, self.behaviour_for(received.model), False)
        if fault is not None:
            return fault
        if self.strict and (bad := _unknown(body, _COUNT_TOKENS)):
            raise RequestError(f'Invalid JSON payload received. Unknown name "{bad}": Cannot find field.')
        inner = _get(body, "generateContentRequest")
        if isinstance(inner, dict):
            if self.strict and "contents" in body:
                raise RequestError("contents and generate_content_request cannot both be set.")
            tokens = _prompt_tokens(inner)
        else:
            tokens = _prompt_tokens({"contents": body.get("contents")})
        return self.send_json(received, {"totalTokens": tokens, "promptTokensDetails": [{"modality": "TEXT", "tokenCount": tokens}]})

    async def _embed(self, request: web.Request, received: Received, method: str) -> web.StreamResponse:
        body = body_dict(received)
        fault = await self.faults(received, self.behaviour_for(received.model), False)
        if fault is not None:
            return fault
        if method == "embedContent":
            return self.send_json(received, {"embedding": {"values": _vector(body.get("content"))}})
        requests = body.get("requests")
        if not isinstance(requests, list):
            raise RequestError("requests: Field required")
        return self.send_json(received, {"embeddings": [{"values": _vector(r.get("content") if isinstance(r, dict) else r)} for r in requests]})

    async def _generate(self, request: web.Request, received: Received, method: str) -> web.StreamResponse:
        body = body_dict(received)
        behaviour = self.behaviour_for(received.model)
        stream = method == "streamGenerateContent"
        fault = await self.faults(received, behaviour, stream)
        if fault is not None:
            return fault
        if self.strict:
            self._validate(received.model or "", body)
        chunks = self._chunks(received.model or "", body, behaviour)
        if not stream:
            return self.send_json(received, _merge(chunks))
        if request.query.get("alt") == "sse":
            frames = [b"data: " + json.dumps(c).encode() + b"\r\n\r\n" for c in chunks]
            return await self.send_stream(request, received, behaviour, frames)
        # Without alt=sse: one JSON array, written element by element.
        texts = [json.dumps(c, indent=2) for c in chunks]
        frames = [("[" if i == 0 else "\n,\r\n").encode() + t.encode() for i, t in enumerate(texts)]
        frames[-1] += b"]"
        error = json.dumps(self.error_body(500, behaviour.message, behaviour.error_type, None, None), indent=2).encode()
        return await self.send_stream(
            request,
            received,
            behaviour,
            frames,
            headers={"Content-Type": "application/json; charset=UTF-8"},
            malformed=b'\n,\r\n{"candidates": [{"content": {"par',
            error_frame=(b"\n,\r\n" if behaviour.error_after else b"[") + error,
            tail=b"]",
        )

    # -- validation --------------------------------------------------------------------------
    def _validate(self, model: str, body: dict[str, Any]) -> None:
        if bad := _unknown(body, _TOP_LEVEL):
            raise RequestError(f'Invalid JSON payload received. Unknown name "{bad}": Cannot find field.')
        config = _get(body, "generationConfig") or {}
        if isinstance(config, dict) and (bad := _unknown(config, _GENERATION_CONFIG)):
            raise RequestError(f'Invalid JSON payload received. Unknown name "{bad}" at \'generation_config\': Cannot find field.')
        thinking = _get(config, "thinkingConfig") or {}
        if _get(thinking, "thinkingBudget") is not None and _get(thinking, "thinkingLevel") is not None:
            raise RequestError("You can only set only one of thinking budget and thinking level.")
        contents = body.get("contents")
        if not isinstance(contents, list) or not contents:
            raise RequestError("* GenerateContentRequest.contents: contents is not specified")
        calls_in_turn = 0
        current_turn_start = 0
        for i, content in enumerate(contents):
            parts = content.get("parts") if isinstance(content, dict) else None
            if not isinstance(parts, list) or not parts:
                raise RequestError(f"* GenerateContentRequest.contents[{i}].parts: contents.parts must not be empty.")
            role = content.get("role")
            if role not in (None, "user", "model"):
                raise RequestError(f"Please use a valid role: user, model. (contents[{i}].role: {role!r})")
            if role != "model" and any(isinstance(p, dict) and "text" in p for p in parts):
                current_turn_start = i
        for i, content in enumerate(contents):
            parts = content["parts"]
            calls = [p for p in parts if isinstance(p, dict) and _get(p, "functionCall") is not None]
            responses = [p for p in parts if isinstance(p, dict) and _get(p, "functionResponse") is not None]
            if content.get("role") == "model":
                calls_in_turn = len(calls)
                if calls and model.startswith("gemini-3") and i > current_turn_start and not _get(calls[0], "thoughtSignature"):
                    name = _get(calls[0], "functionCall").get("name")
                    raise RequestError(
                        "Function call is missing a thought_signature in functionCall parts. This is required for tools to work "
                        f"correctly, and missing thought_signature may lead to degraded model performance. Additional data, function "
                        f"call `default_api:{name}` , position {i + 1}. Please refer to https://ai.google.dev/gemini-api/docs/thought-signatures "
                        "for more details."
                    )
            elif responses:
                if len(responses) != calls_in_turn:
                    raise RequestError(
                        "Please ensure that the number of function response parts is equal to the number of function call parts of the function call turn."
                    )
                calls_in_turn = 0

    # -- what to answer ----------------------------------------------------------------------
    def _chunks(self, model: str, body: dict[str, Any], behaviour: Behaviour) -> list[dict[str, Any]]:
        seq = self.next_id()
        tools: list[Tool] = []
        for tool in body.get("tools") or ():
            for decl in _get(tool, "functionDeclarations") or ():
                if isinstance(decl, dict) and decl.get("name"):
                    params = _get(decl, "parametersJsonSchema")
                    tools.append(Tool(decl["name"], params if params is not None else decl.get("parameters")))
        results = []
        for content in body.get("contents") or ():
            for part in content.get("parts") or () if isinstance(content, dict) else ():
                response = _get(part, "functionResponse") if isinstance(part, dict) else None
                if isinstance(response, dict):
                    results.append(text_of(response.get("response")))
        calling = _get(_get(body, "toolConfig") or {}, "functionCallingConfig") or {}
        mode = str(calling.get("mode") or "AUTO").upper()
        allowed = _get(calling, "allowedFunctionNames") or []
        if allowed:
            tools = [t for t in tools if t.name in allowed]
        choice = {"NONE": "none", "ANY": "required"}.get(mode, "auto")
        if mode == "ANY" and len(allowed) == 1:
            choice = allowed[0]
        config = _get(body, "generationConfig") or {}
        schema = None
        if _get(config, "responseMimeType") == "application/json":
            schema = _get(config, "responseJsonSchema") or _get(config, "responseSchema") or {"type": "object", "properties": {"answer": {"type": "string"}}}
        decided = plan(behaviour, tools, results, choice, True, schema)

        thinking = _get(config, "thinkingConfig") or {}
        thought = behaviour.thinking if _get(thinking, "includeThoughts") and behaviour.thinking else ""
        prompt = _prompt_tokens(body)
        response_id = f"fake{seq:06d}"
        finish = "STOP" if decided.calls or not behaviour.truncated else "MAX_TOKENS"

        groups: list[list[dict[str, Any]]] = []
        if thought:
            groups.append([{"text": thought, "thought": True}])
        if decided.calls:
            parts = []
            for i, (name, arguments, _) in enumerate(decided.calls):
                part: dict[str, Any] = {"functionCall": {"id": f"{name}_fake{seq:04d}x{i}", "name": name, "args": arguments_object(behaviour, arguments)}}
                if i == 0:
                    part["thoughtSignature"] = "CiQB" + signature("gemini", seq, name)
                parts.append(part)
            groups.append(parts)
        else:
            groups += [[{"text": piece}] for piece in split_text(decided.text or "")]

        chunks = []
        produced = thoughts = 0
        for index, parts in enumerate(groups):
            for part in parts:
                if part.get("thought"):
                    thoughts += len(split_text(part["text"]))
                elif "text" in part:
                    produced += len(split_text(part["text"])) if part["text"] else 0
                else:
                    produced += 2
            usage: dict[str, Any] = {
                "promptTokenCount": prompt,
                "candidatesTokenCount": produced,
                "totalTokenCount": prompt + produced + thoughts,
                "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt}],
            }
            if thoughts:
                usage["thoughtsTokenCount"] = thoughts
            if behaviour.cached_tokens:
                usage["cachedContentTokenCount"] = behaviour.cached_tokens
            candidate: dict[str, Any] = {"content": {"parts": parts, "role": "model"}, "index": 0}
            if index == len(groups) - 1:
                candidate["finishReason"] = finish
            chunks.append({"candidates": [candidate], "usageMetadata": usage, "modelVersion": model, "responseId": response_id})
        return chunks


def _prompt_tokens(body: dict[str, Any]) -> int:
    return estimate_tokens(_get(body, "systemInstruction"), body.get("contents"), body.get("tools"))


def _merge(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """The non-streamed answer: every chunk's parts in one candidate, the last usage."""
    last = chunks[-1]
    parts = [p for c in chunks for p in c["candidates"][0]["content"]["parts"]]
    # Adjacent text parts are one part in a non-streamed answer.
    merged: list[dict[str, Any]] = []
    for part in parts:
        if merged and set(part) == {"text"} and set(merged[-1]) == {"text"}:
            merged[-1] = {"text": merged[-1]["text"] + part["text"]}
        else:
            merged.append(dict(part))
    candidate = {**last["candidates"][0], "content": {"parts": merged, "role": "model"}}
    return {**last, "candidates": [candidate]}


def _vector(content: Any) -> list[float]:
    digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).digest()
    return [round((b - 128) / 128, 4) for b in digest[:8]]
