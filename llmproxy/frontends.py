"""Front-end routes: what clients call, in each of the four wire protocols.

| route | protocol |
| --- | --- |
| POST /v1/chat/completions | OpenAI Chat Completions |
| POST /v1/responses | OpenAI Responses |
| POST /v1/messages, /v1/messages/count_tokens (also under /anthropic) | Anthropic Messages |
| POST /v1beta/models/{model}:generateContent, :streamGenerateContent, :countTokens (also /v1/) | Gemini |
| GET /v1/models, /v1beta/models | model lists, in the caller's format |

``GET /v1/models`` is shared by OpenAI, Anthropic and google-genai 3.x (which uses ``/v1``):
a Gemini client is told apart by its ``x-goog-api-key``/``x-goog-api-client`` headers or a
``key=`` query parameter, and the OpenAI and Anthropic list formats are served as one JSON
object both SDKs accept.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web

from .codecs import get_codec
from .codecs.base import Codec, dumps, loads
from .codecs.gemini import gemini_embeddings_from_openai, openai_embeddings_from_gemini
from .context import CONTEXT, ProxyContext
from .errors import ProxyError
from .flow import Flow
from .manager import call_chain
from .pipeline import Writer, authenticate, failover, handle
from .tokens import count_request

log = logging.getLogger("llmproxy.frontends")

OPENAI_CHAT = get_codec("openai_chat")
OPENAI_RESPONSES = get_codec("openai_responses")
ANTHROPIC = get_codec("anthropic")
GEMINI = get_codec("gemini")
GEMINI_ARRAY = get_codec("gemini_array")


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await handle(request, OPENAI_CHAT)


async def responses(request: web.Request) -> web.StreamResponse:
    return await handle(request, OPENAI_RESPONSES)


async def messages(request: web.Request) -> web.StreamResponse:
    return await handle(request, ANTHROPIC)


async def messages_count_tokens(request: web.Request) -> web.StreamResponse:
    return await count_tokens(request, ANTHROPIC, lambda n: {"input_tokens": n})


async def gemini_model_call(request: web.Request) -> web.StreamResponse:
    """``/v1beta/models/{model}:{method}``: the model and the method share one path segment."""
    target = request.match_info["target"]
    model, sep, method = target.rpartition(":")
    if not sep or not model:
        return error_response(GEMINI, ProxyError(404, f"no such endpoint: {request.path} (expected models/MODEL:METHOD)"))
    if method == "generateContent":
        return await handle(request, GEMINI, inject={"model": model, "stream": False})
    if method == "streamGenerateContent":
        codec = GEMINI if request.query.get("alt") == "sse" else GEMINI_ARRAY
        return await handle(request, codec, inject={"model": model, "stream": True})
    if method == "countTokens":
        return await count_tokens(request, GEMINI, lambda n: {"totalTokens": n}, inject={"model": model})
    if method in ("embedContent", "batchEmbedContents"):
        return await gemini_embed(request, model, batch=method == "batchEmbedContents")
    served = "generateContent, streamGenerateContent, countTokens, embedContent, batchEmbedContents"
    return error_response(GEMINI, ProxyError(404, f"llmproxy does not serve the Gemini method {method!r} (served: {served})"))


async def gemini_embed(request: web.Request, model: str, batch: bool) -> web.StreamResponse:
    """Gemini embeddings, served by whichever backend the model routes to (its embeddings
    endpoint is asked in OpenAI's shape, which every embedding backend here speaks)."""

    async def run(flow: Flow, ctx: ProxyContext, writer: Writer) -> None:
        flow.model = model.removeprefix("models/")
        flow.raw_request = openai_embeddings_from_gemini(flow.raw_request, flow.model, batch)
        result = await failover(flow, ctx, lambda target: target.provider.forward(flow, target, "embeddings", False))
        try:
            answer = loads(result.body) if result.body is not None else result.response
        except ValueError:
            raise ProxyError(502, "the backend's embeddings answer is not JSON") from None
        await writer.json(dumps(gemini_embeddings_from_openai(answer, batch)))

    return await handle(request, GEMINI, run=run, frontend="gemini_embeddings")


async def count_tokens(request: web.Request, codec: Codec, shape: Any, inject: dict[str, Any] | None = None) -> web.StreamResponse:
    """The backend's own count when it has a counting endpoint, else a local tiktoken count
    of system prompt, messages and tools. The request chain runs first, as for a chat call
    (``flow.metadata["kind"] == "count_tokens"``): a prompt a plugin blocks or redacts is
    blocked or redacted before anything counts it."""

    async def run(flow: Flow, ctx: ProxyContext, writer: Writer) -> None:
        body = flow.raw_request
        if "contents" not in body and isinstance(body.get("generateContentRequest"), dict):
            flow.raw_request = body = {**body["generateContentRequest"], **(inject or {})}  # Gemini's other form
        flow.model, _ = codec.peek(body)
        flow.metadata["kind"] = "count_tokens"
        flow.request  # noqa: B018 - decode now: a malformed body is the client's 400
        chains = ctx.chains.of(flow)
        if chains.request:
            await call_chain(chains.request, stop=lambda: flow.has_response, skip=flow.disabled_plugins, flow=flow)
        total = None
        try:
            total = await failover(flow, ctx, lambda target: target.provider.count_tokens(flow, target), scheduled=False)
        except ProxyError as error:
            if error.status in (400, 401, 403) or flow.target is None:  # the client's mistake, or no such model
                raise
            log.debug("backend count failed (%s); counting locally", error.message)
        if total is None:
            # The tokenizer costs ~40 MB and ~0.2 s to load, so it loads on first use,
            # off the event loop; after that a count is a plain call.
            total = await asyncio.get_running_loop().run_in_executor(None, count_request, flow.request)
        await writer.json(dumps(shape(total)))

    return await handle(request, codec, inject=inject, run=run)


def error_response(codec: Codec, error: ProxyError) -> web.Response:
    return web.Response(body=dumps(codec.error_body(error)), status=error.status, content_type="application/json", headers=error.headers or None)


def _is_gemini_client(request: web.Request) -> bool:
    headers = request.headers
    return "x-goog-api-key" in headers or "x-goog-api-client" in headers or "key" in request.query


def _gemini_model(name: str) -> dict[str, Any]:
    return {
        "name": f"models/{name}",
        "displayName": name,
        "description": "served by llmproxy",
        "inputTokenLimit": 1_048_576,
        "outputTokenLimit": 65_536,
        "supportedGenerationMethods": ["generateContent", "streamGenerateContent", "countTokens", "embedContent"],
    }


def _listed_model(ctx: ProxyContext, name: str) -> dict[str, Any]:
    """One entry both SDKs read: OpenAI's fields and Anthropic's."""
    backend, sep, _ = name.partition(":")
    owner = backend if sep and backend in ctx.providers else ("llmproxy" if name in ctx.config.models else ctx.config.default_backend)
    return {"id": name, "object": "model", "created": 0, "owned_by": owner,
            "type": "model", "display_name": name, "created_at": "1970-01-01T00:00:00Z"}


async def list_models(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CONTEXT]
    gemini = request.path.startswith("/v1beta") or _is_gemini_client(request)
    codec = GEMINI if gemini else OPENAI_CHAT
    try:
        authenticate(request, ctx)
    except ProxyError as error:
        return error_response(codec, error)
    names = ctx.router.known_models()
    if gemini:
        body: dict[str, Any] = {"models": [_gemini_model(name) for name in names]}
    else:
        data = [_listed_model(ctx, name) for name in names]
        body = {"object": "list", "data": data, "has_more": False,
                "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}
    return web.Response(body=dumps(body), content_type="application/json")


async def get_model(request: web.Request) -> web.StreamResponse:
    """One model (the SDKs' ``models.retrieve``/``models.get``): any name the router would
    serve, in the caller's format; 404 listing what exists otherwise."""
    ctx = request.app[CONTEXT]
    name = request.match_info["model"].removeprefix("models/")
    gemini = request.path.startswith("/v1beta") or _is_gemini_client(request)
    codec = GEMINI if gemini else ANTHROPIC if "anthropic-version" in request.headers else OPENAI_CHAT
    try:
        authenticate(request, ctx)
        ctx.router.resolve(name)
    except ProxyError as error:
        return error_response(codec, error)
    body = _gemini_model(name) if gemini else _listed_model(ctx, name)
    return web.Response(body=dumps(body), content_type="application/json")


def add_routes(app: web.Application) -> None:
    routes = app.router
    for prefix in ("/v1", ""):
        routes.add_post(prefix + "/chat/completions", chat_completions)
        routes.add_post(prefix + "/responses", responses)
    for prefix in ("", "/anthropic"):
        routes.add_post(prefix + "/v1/messages", messages)
        routes.add_post(prefix + "/v1/messages/count_tokens", messages_count_tokens)
        routes.add_get(prefix + "/v1/models", list_models)
    routes.add_get("/models", list_models)
    for version in ("/v1beta", "/v1"):
        routes.add_post(version + "/models/{target}", gemini_model_call)
    routes.add_get("/v1beta/models", list_models)
    for prefix in ("/v1beta", "/v1", "/anthropic/v1", ""):
        routes.add_get(prefix + "/models/{model}", get_model)
